/*
 * blockdev-snapshot and blockdev-snapshot-sync (the commands, and the
 * transaction actions): an overlay node, opened beforehand with
 * blockdev-add and no backing file (or, -sync, made and opened here), takes
 * the place of a node under its exports, with that node as its backing file.
 * What the exports write from then on goes to the overlay; the old node
 * keeps the point in time and is reopened read-only (QEMU 7.2's
 * external_snapshot_prepare/commit and bdrv_append).
 *
 * Theory of operation.  prepare checks in QEMU's order and changes the
 * graph: the overlay's backing link to the old node, then every export's
 * use of the old node moved to the overlay, each checked against the
 * overlay's other users ("Block node is read-only" for a read-only
 * overlay under a writable export); abort moves them back.  commit
 * switches the data path: every new write of a peer is held (block_writes_hold),
 * the exports serve the overlay, and held writes addressed to the old
 * node are redirected to the overlay.  Once the writes issued before have
 * completed, and every loop thread has finished what it was doing (so no
 * thread still submits to the old node from a pointer it read before the
 * switch, loop_barrier), the old node is flushed and reopened read-only,
 * the held writes go on, into the overlay, and the command's reply,
 * held until then (qmp_reply_hold), is sent: when it comes, the old image
 * no longer changes, as with QEMU, which drains before it answers.
 *
 * Not done: a node that other nodes use (a parent's file or backing
 * child) is refused with a clear error rather than re-linked under its
 * parents; QEMU re-links them.  -sync makes qcow2 images only.
 */
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "block/block-job.h"
#include "block/transaction.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/opts.h"
#include "util/xalloc.h"

struct snap {
    struct bnode *old, *overlay;
    struct bnode_user *backing_link;
    struct bnode_user **moved;      /* the old node's users now on the overlay */
    size_t nmoved;
    bool referenced;
    bool owned;                     /* blockdev-snapshot-sync opened the overlay */
    bool appended;
    bool committed;
    struct qmp_reply *reply;
};

static int check_busy(struct bnode *bs, error **errp)
{
    if (block_node_check_busy(bs, errp) < 0)
        return -1;
    struct bnode *over = bnode_backing_parent(bs);
    if (over) {
        error_setg(errp, "Node '%s' is busy: node is used as backing hd of '%s'",
                   bs->node_name, over->node_name);
        return -1;
    }
    return 0;
}

static struct bnode *find(const char *name, error **errp)
{
    struct bnode *bs = bnode_find(name);
    if (!bs)
        error_setg(errp, "Cannot find device='%s' nor node-name='%s'", name, name);
    return bs;
}

/* Used by an export (QEMU's BlockBackend), itself or through the nodes
 * above it: qsd 7.2 refuses such an overlay ("already in use"). */
static bool has_root_user(struct bnode *bs)
{
    for (struct bnode_user *u = bs->users; u; u = u->next)
        if (!u->parent || has_root_user(u->parent))
            return true;
    return false;
}

static void unappend(struct snap *s)
{
    while (s->nmoved > 0)
        bnode_user_move(s->moved[--s->nmoved], s->old, NULL);
    if (s->backing_link) {
        *s->overlay->drv->reopen_backing_link(s->overlay) = NULL;
        __atomic_store_n(&s->overlay->backing, NULL, __ATOMIC_RELEASE);
        bnode_detach(s->backing_link);
        s->backing_link = NULL;
    }
    s->appended = false;
}

/* QEMU's bdrv_append(overlay, old): old becomes the overlay's backing
 * file, and the overlay takes old's place under every export. */
static int append(struct snap *s, error **errp)
{
    struct bnode *old = s->old, *ov = s->overlay;
    if (bnode_is_ancestor_or_self(old, ov)) {
        error_setg(errp, "Making '%s' a backing child of '%s' would create a cycle",
                   old->node_name, ov->node_name);
        return -1;
    }
    size_t n = 0;
    for (struct bnode_user *u = old->users; u; u = u->next)
        n++;
    struct bnode_user **users = xcalloc(n ? n : 1, sizeof(*users));
    n = 0;
    for (struct bnode_user *u = old->users; u; u = u->next) {
        if (u->parent) {
            error_setg(errp, "Node '%s' is the '%s' child of node '%s': bexd puts an "
                       "overlay only under exports", old->node_name, u->role,
                       u->parent->node_name);
            free(users);
            return -1;
        }
        if (!u->replaced) {
            error_setg(errp, "Node '%s' is in use by %s, which cannot move to an overlay",
                       old->node_name, u->name);
            free(users);
            return -1;
        }
        users[n++] = u;
    }
    s->moved = users;
    s->backing_link = bnode_attach_child(ov, old, "backing", errp);
    if (!s->backing_link)
        return -1;
    *ov->drv->reopen_backing_link(ov) = s->backing_link;
    __atomic_store_n(&ov->backing, old, __ATOMIC_RELEASE);
    s->appended = true;
    if (bnode_users_move(users, n, ov, errp) < 0) {
        unappend(s);
        return -1;
    }
    s->nmoved = n;
    if (bnode_refresh_perms(ov, errp) < 0) {
        unappend(s);
        return -1;
    }
    return 0;
}

/* The overlay's checks (QEMU's order), then the append. */
static int overlay_prepare(struct snap *s, error **errp)
{
    if (has_root_user(s->overlay)) {
        error_setg(errp, "The overlay is already in use");
        return -1;
    }
    if (check_busy(s->overlay, errp) < 0)
        return -1;
    if (s->overlay->backing) {
        error_setg(errp, "The overlay already has a backing image");
        return -1;
    }
    if (!s->overlay->drv->reopen_backing_link) {
        error_setg(errp, "The overlay does not support backing images");
        return -1;
    }
    bnode_ref(s->old);
    bnode_ref(s->overlay);
    s->referenced = true;
    return append(s, errp);
}

static int snap_prepare(struct txn_action *a, json_t *data, error **errp)
{
    struct snap *s = xzalloc(sizeof(*s));
    a->opaque = s;
    s->old = find(opt_str(data, "node", ""), errp);
    if (!s->old || check_busy(s->old, errp) < 0)
        return -1;
    s->overlay = find(opt_str(data, "overlay", ""), errp);
    if (!s->overlay)
        return -1;
    return overlay_prepare(s, errp);
}

/* blockdev-snapshot-sync's image: as big as the old node, naming it as
 * backing file with its driver as format. */
static int make_image(struct bnode *old, const char *path, const char *format,
                      error **errp)
{
    CLEANUP_FREE char *backing = bnode_filename(old);
    return image_create(path, format, bnode_round_size(old->size), backing, old->drv->name,
                        errp);
}

static int sync_prepare(struct txn_action *a, json_t *data, error **errp)
{
    struct snap *s = xzalloc(sizeof(*s));
    a->opaque = s;
    const char *device = opt_str(data, "device", NULL);
    const char *node = opt_str(data, "node-name", NULL);
    const char *snode = opt_str(data, "snapshot-node-name", NULL);
    const char *path = opt_str(data, "snapshot-file", "");
    const char *format = opt_str(data, "format", "qcow2");
    s->old = node ? bnode_find(node) : NULL;       /* qsd has no devices */
    if (!s->old) {
        error_setg(errp, "Cannot find device='%s' nor node-name='%s'", device ? device : "",
                   node ? node : "");
        return -1;
    }
    if (check_busy(s->old, errp) < 0)
        return -1;
    if (!snode) {
        error_setg(errp, "New overlay node-name missing");
        return -1;
    }
    if (bnode_find(snode)) {
        error_setg(errp, "New overlay node-name already in use");
        return -1;
    }
    if (strcmp(opt_str(data, "mode", "absolute-paths"), "existing") &&
        make_image(s->old, path, format, errp) < 0)
        return -1;
    /* opened as the old node is (read-only, cache modes), without the
     * backing file its header names: the old node becomes it */
    CLEANUP_JSON json_t *opts = json_pack(
        "{s:s, s:s, s:b, s:{s:b, s:b}, s:{s:s, s:s}}", "driver", format, "node-name", snode,
        "read-only", s->old->read_only, "cache", "direct", s->old->cache_direct, "no-flush",
        s->old->cache_no_flush, "file", "driver", "file", "filename", path);
    if (!strcmp(format, "qcow2"))
        json_object_set_new(opts, "backing", json_null());
    s->overlay = blockdev_add(opts, errp);
    if (!s->overlay)
        return -1;
    s->owned = true;
    return overlay_prepare(s, errp);
}

static void snap_abort(struct txn_action *a)
{
    struct snap *s = a->opaque;
    if (s->appended)
        unappend(s);
}

/* A failed blockdev-snapshot-sync closes the overlay it opened (its
 * image file stays, as QEMU leaves it). */
static void close_owned(struct snap *s)
{
    if (s->owned)
        blockdev_del(s->overlay->node_name, NULL);
}

/* Every loop has passed the switch: nothing reaches the old node any more. */
static void snap_settled(void *opaque)
{
    struct snap *s = opaque;
    struct bnode *old = s->old;
    error *err = NULL;
    /* QEMU's bdrv_flush: the node and those below it (a raw node's file) */
    for (struct bnode *n = old; n; n = n->file)
        if (!n->read_only && n->drv->flush_sync && n->drv->flush_sync(n) < 0)
            log_error("blockdev-snapshot: flushing node '%s' failed", n->node_name);
    if (!old->read_only && bnode_reopen_set_read_only(old, true, &err) < 0) {
        log_warn("blockdev-snapshot: node '%s' stays read-write: %s", old->node_name,
                 err->msg);
        error_free(err);
    }
    block_writes_release();
    qmp_reply_release(s->reply);
    bnode_unref(s->old);
    bnode_unref(s->overlay);
    if (s->owned)       /* -sync's overlay is not the monitor's (QEMU): it lives */
        bnode_unref(s->overlay);        /* while an export or a node uses it */
    free(s->moved);
    free(s);
}

/* The writes issued before the switch have completed. */
static void snap_drained(void *opaque)
{
    loop_barrier(snap_settled, opaque);
}

static void snap_commit(struct txn_action *a)
{
    struct snap *s = a->opaque;
    s->committed = true;
    s->reply = qmp_reply_hold();
    block_writes_hold(snap_drained, s);
    bnode_users_replaced(s->moved, s->nmoved, s->old->size);
    block_writes_redirect(s->old, s->overlay);
}

static void snap_clean(struct txn_action *a)
{
    struct snap *s = a->opaque;
    if (!s || s->committed)
        return;                     /* snap_settled frees it */
    if (s->referenced) {
        bnode_unref(s->old);
        bnode_unref(s->overlay);
    }
    close_owned(s);
    free(s->moved);
    free(s);
}

static struct txn_ops snapshot_ops = {
    .type = "blockdev-snapshot", .prepare = snap_prepare, .commit = snap_commit,
    .abort = snap_abort, .clean = snap_clean,
};
TRANSACTION_ACTION(snapshot_ops)

static struct txn_ops snapshot_sync_ops = {
    .type = "blockdev-snapshot-sync", .prepare = sync_prepare, .commit = snap_commit,
    .abort = snap_abort, .clean = snap_clean,
};
TRANSACTION_ACTION(snapshot_sync_ops)

/* The command: the action alone. */
static json_t *run_one(const struct txn_ops *ops, json_t *args, error **errp)
{
    struct txn_action a = { .ops = ops };
    int ret = ops->prepare(&a, args, errp);
    if (ret < 0)
        ops->abort(&a);
    else
        ops->commit(&a);
    ops->clean(&a);
    return ret < 0 ? NULL : json_object();
}

static json_t *qmp_blockdev_snapshot(json_t *args, error **errp)
{
    return run_one(&snapshot_ops, args, errp);
}
QMP_COMMAND("blockdev-snapshot", qmp_blockdev_snapshot)

static json_t *qmp_blockdev_snapshot_sync(json_t *args, error **errp)
{
    return run_one(&snapshot_sync_ops, args, errp);
}
QMP_COMMAND("blockdev-snapshot-sync", qmp_blockdev_snapshot_sync)
