/*
 * Block layer core: node registry, graph users and permissions, request
 * validation, block status through backing chains.
 *
 * Theory of operation: blockdev_add() opens a tree of nodes from one
 * checked BlockdevOptions object (children given inline are opened first
 * and get generated names; children given by name are looked up).  Every
 * user of a node (a parent node, an export) holds a reference; a node is
 * deleted by blockdev-del only when the monitor's reference is the last.
 * The WRITE permission is counted separately: the first writer asks the
 * driver for write access (file: image locks), the last one gives it back.
 *
 * bnode_submit() checks each request once at this edge; drivers trust it.
 * On nodes with request_alignment > 1 it hands requests that do not fit
 * (offset, length or memory) to align.c, which bounces or read-modify-writes.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "block/align.h"
#include "block/dirty-bitmap.h"
#include "block/stats.h"
#include "util/cleanup.h"
#include "block/throttle-group.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/xalloc.h"
#include "util/opts.h"
#include "util/id.h"

static struct bnode *nodes;           /* all nodes, named or generated */
static const struct bdrv *drivers[16];
static int n_drivers;
static unsigned auto_name_counter;
static uint64_t name_seq_counter;

void bdrv_register(const struct bdrv *drv)
{
    if (n_drivers < (int)ARRAY_SIZE(drivers))
        drivers[n_drivers++] = drv;
}

const struct bdrv *bdrv_find(const char *name)
{
    for (int i = 0; i < n_drivers; i++)
        if (!strcmp(drivers[i]->name, name))
            return drivers[i];
    return NULL;
}

struct bnode *bnode_find(const char *name)
{
    for (struct bnode *bs = nodes; bs; bs = bs->next)
        if (!strcmp(bs->node_name, name))
            return bs;
    return NULL;
}

struct bnode *bnode_lookup(const char *name, error **errp)
{
    struct bnode *bs = bnode_find(name);
    if (!bs)
        error_setg(errp, "Cannot find device='' nor node-name='%s'", name);
    return bs;
}

static char *generate_node_name(void)
{
    char *s;
    s = xasprintf("#block%u%02d", auto_name_counter++, rand() % 100);
    return s;
}

/* QEMU's bdrv_assign_node_name: the name is checked (or generated) when
 * the node's own open starts, after its "file" child. */
static int assign_node_name(struct bnode *bs, const char *name, error **errp)
{
    if (name) {
        if (!id_wellformed(name)) {
            error_setg(errp, "Invalid node-name: '%s'", name);
            return -1;
        }
        if (bnode_find(name)) {
            error_setg(errp, "Duplicate nodes with node-name='%s'", name);
            return -1;
        }
    }
    bs->node_name = name ? xstrdup(name) : generate_node_name();
    bs->auto_named = !name;
    bs->name_seq = ++name_seq_counter;
    return 0;
}

/* bdrv_open_common's checks of the generic options: after the "file"
 * child is open, before the node gets its name. */
static int check_common(struct bnode *bs, json_t *opts, error **errp)
{
    if (bs->force_share && !bs->read_only) {
        error_setg(errp, "force-share=on can only be used with read-only images");
        return -1;
    }
    if (bs->drv->needs_filename && !*opt_str(opts, "filename", "")) {
        error_setg(errp, "The '%s' block driver requires a file name", bs->drv->name);
        return -1;
    }
    if (bs->detect_zeroes == DETECT_ZEROES_UNMAP && !bs->discard) {
        error_setg(errp, "setting detect-zeroes to unmap is not allowed "
                         "without setting discard operation to unmap");
        return -1;
    }
    return 0;
}

/* A node joins the list once it is open (a half-open node is never listed),
 * at the place its name gave it: newest name first. */
static void node_list_insert(struct bnode *bs)
{
    struct bnode **p = &nodes;
    while (*p && (*p)->name_seq > bs->name_seq)
        p = &(*p)->next;
    bs->next = *p;
    *p = bs;
}

/* ---- references ---- */

void bnode_ref(struct bnode *bs)
{
    bs->refcnt++;
}

static void bnode_close(struct bnode *bs);

void bnode_unref(struct bnode *bs)
{
    if (--bs->refcnt == 0)
        bnode_close(bs);
}

static void node_list_remove(struct bnode *bs)
{
    for (struct bnode **p = &nodes; *p; p = &(*p)->next)
        if (*p == bs) {
            *p = bs->next;
            return;
        }
}

static void bnode_close(struct bnode *bs)
{
    node_list_remove(bs);
    for (struct bnode *n = nodes; n; n = n->next)
        if (n->inherits_from == bs)
            n->inherits_from = NULL;
    if (bs->drv->bitmaps_store)
        bs->drv->bitmaps_store(bs);
    dirty_bitmaps_release_all(bs);
    if (bs->drv->close)
        bs->drv->close(bs);
    bnode_align_free(bs->align);
    if (bs->file_link)
        bnode_detach(bs->file_link);
    if (bs->backing)
        bnode_unref(bs->backing);
    json_decref(bs->options);
    bstats_free(bs->stats);
    free(bs->auto_backing_file);
    free(bs->node_name);
    free(bs);
}

/* ---- opening ---- */

static int parse_common(struct bnode *bs, json_t *opts, error **errp)
{
    bs->read_only = opt_bool(opts, "read-only", false);
    bs->force_share = opt_bool(opts, "force-share", false);
    const char *discard = opt_str(opts, "discard", "ignore");
    bs->discard = !strcmp(discard, "unmap") || !strcmp(discard, "on");
    const char *dz = opt_str(opts, "detect-zeroes", "off");
    bs->detect_zeroes = !strcmp(dz, "unmap") ? DETECT_ZEROES_UNMAP :
                        !strcmp(dz, "on") ? DETECT_ZEROES_ON : DETECT_ZEROES_OFF;
    json_t *cache = json_object_get(opts, "cache");
    bs->cache_direct = opt_bool(cache, "direct", false);
    bs->cache_no_flush = opt_bool(cache, "no-flush", false);
    bs->request_alignment = 1;
    return 0;
}

static struct bnode *bnode_open(json_t *opts, bool root, error **errp);

/* The file child of a node changed size: the node may follow it. */
static void file_child_resized(struct bnode_user *u)
{
    struct bnode *parent = u->opaque;
    if (parent->drv->child_resized)
        parent->drv->child_resized(parent);
}

/* BlockdevRef: a node name (string) or inline options (object).  An inline
 * child takes what QEMU's bdrv_inherited_options gives it, unless it says
 * otherwise: read-only from its parent (on for a backing file: cow), the
 * parent's cache.direct and cache.no-flush, and discard=unmap (the parent
 * already applies its own discard policy to what it passes down).  parent
 * NULL: read-only from parent_ro only. */
static struct bnode *open_child_of(json_t *ref, struct bnode *parent, bool parent_ro,
                                   bool cow, error **errp)
{
    if (json_is_string(ref)) {
        struct bnode *child = bnode_find(json_string_value(ref));
        if (!child) {
            error_setg(errp, "Cannot find device='%s' nor node-name='%s'",
                       json_string_value(ref), json_string_value(ref));
            return NULL;
        }
        child->refcnt++;
        return child;
    }
    CLEANUP_JSON json_t *copy = json_deep_copy(ref);
    bool inherit_ro = (cow || parent_ro) && !json_object_get(copy, "read-only");
    if (inherit_ro)
        json_object_set_new(copy, "read-only", json_true());
    unsigned cache_inh = 0;
    bool discard_inh = false;
    if (parent && json_is_object(copy)) {
        json_t *cache = json_object_get(copy, "cache");
        if (!json_is_object(cache)) {
            cache = json_object();
            json_object_set_new(copy, "cache", cache);
        }
        if (!json_object_get(cache, "direct")) {
            json_object_set_new(cache, "direct", json_boolean(parent->cache_direct));
            cache_inh |= INHERITED_DIRECT;
        }
        if (!json_object_get(cache, "no-flush")) {
            json_object_set_new(cache, "no-flush", json_boolean(parent->cache_no_flush));
            cache_inh |= INHERITED_NO_FLUSH;
        }
        if (!json_object_get(copy, "discard")) {
            json_object_set_new(copy, "discard", json_string("unmap"));
            discard_inh = true;
        }
        if (parent->force_share && !json_object_get(copy, "force-share"))
            json_object_set_new(copy, "force-share", json_true());
    }
    struct bnode *bs = bnode_open(copy, false, errp);   /* reference owned by the parent */
    if (bs) {
        bs->ro_inherited = inherit_ro;
        bs->cache_inherited = cache_inh;
        bs->discard_inherited = discard_inh;
    }
    return bs;
}

static struct bnode *open_child(json_t *ref, bool parent_ro, error **errp)
{
    return open_child_of(ref, NULL, parent_ro, false, errp);
}

struct bnode *bnode_open_child(json_t *ref, struct bnode *parent, bool cow, error **errp)
{
    return open_child_of(ref, parent, parent->read_only, cow, errp);
}

/* QEMU's last check of bdrv_open_inherit: an option nobody took.  The
 * schema lets only one kind through: an empty object such as "cache": {},
 * which qdict_flatten keeps as a value that no driver absorbs. */
static int left_over(struct bnode *bs, json_t *opts, error **errp)
{
    const char *k;
    json_t *v;
    json_object_foreach(opts, k, v) {
        if (!json_is_object(v) || json_object_size(v))
            continue;
        if (bs->drv->is_protocol)
            error_setg(errp, "Block protocol '%s' doesn't support the option '%s'",
                       bs->drv->name, k);
        else
            error_setg(errp, "Block format '%s' does not support the option '%s'",
                       bs->drv->name, k);
        return -1;
    }
    return 0;
}

static struct bnode *bnode_open(json_t *opts, bool root, error **errp)
{
    const char *driver = opt_str(opts, "driver", "");
    const char *name = opt_str(opts, "node-name", NULL);
    const struct bdrv *drv = bdrv_find(driver);

    if (!drv) {
        error_setg(errp, "Unknown driver '%s'", driver);
        return NULL;
    }
    if (root && !name) {
        error_setg(errp, "'node-name' must be specified for the root node");
        return NULL;
    }
    /* "backing": "" is QEMU's deprecated spelling of null, and the only one
     * a command line's keyval form has (backing=) */
    json_t *backing = json_object_get(opts, "backing");
    if (json_is_string(backing) && !*json_string_value(backing)) {
        log_warn("Use of \"backing\": \"\" is deprecated; use \"backing\": null instead");
        json_object_set_new(opts, "backing", json_null());
    }
    /* QEMU opens the "file" child of a format or filter driver before the
     * node itself gets its name (bdrv_open_inherit, then bdrv_open_common);
     * blkdebug's image and every other child (backing, data-file, target)
     * come after.  The node list and the generated names follow that order. */
    bool child_first = (drv->is_format || drv->is_filter) &&
                       (!drv->child_key || !strcmp(drv->child_key, "file"));
    struct bnode *bs = xzalloc(sizeof(*bs));
    dirty_bitmaps_init(bs);
    bs->drv = drv;
    bs->refcnt = 1;
    bs->options = json_incref(opts);
    bs->stats = bstats_new();
    if (parse_common(bs, opts, errp) < 0)
        goto fail;
    if (!child_first && (check_common(bs, opts, errp) < 0 || assign_node_name(bs, name, errp) < 0))
        goto fail;
    if (drv->open_prepare && drv->open_prepare(bs, opts, errp) < 0)
        goto fail;
    if (drv->is_format || drv->is_filter) {
        const char *key = drv->child_key ? drv->child_key : "file";
        json_t *ref = json_object_get(opts, key);
        if (!ref) {
            error_setg(errp, "A block device must be specified for \"%s\"", key);
            goto fail;
        }
        bs->file = bnode_open_child(ref, bs, false, errp);
        if (!bs->file)
            goto fail;
        if (json_is_object(ref))
            bs->file->inherits_from = bs;
        if (child_first &&
            (check_common(bs, opts, errp) < 0 || assign_node_name(bs, name, errp) < 0)) {
            bnode_unref(bs->file);
            bs->file = NULL;
            goto fail;
        }
        /* The parent's users' permissions reach the child through this link. */
        bs->file_link = bnode_attach_child(bs, bs->file, key, errp);
        bnode_unref(bs->file);          /* the link now holds the reference */
        if (!bs->file_link)
            goto fail;
        bs->file_link->resized = file_child_resized;
        bs->file_link->opaque = bs;
    }
    if (drv->open(bs, opts, errp) < 0)
        goto fail;
    bs->size = bnode_round_size(bs->size);
    if (drv->reopen_needs_rw_file && bs->file_link && bnode_refresh_perms(bs, errp) < 0)
        goto fail;
    if (drv->bitmaps_load && drv->bitmaps_load(bs, errp) < 0)
        goto fail;
    if (left_over(bs, opts, errp) < 0)
        goto fail;
    if (bs->request_alignment > 1)
        bs->align = bnode_align_new();
    node_list_insert(bs);
    return bs;

fail:
    if (bs->opaque && drv->close)
        drv->close(bs);             /* whatever the driver set up before failing */
    if (bs->file_link)
        bnode_detach(bs->file_link);
    dirty_bitmaps_release_all(bs);
    bstats_free(bs->stats);
    json_decref(bs->options);
    free(bs->auto_backing_file);
    free(bs->node_name);
    free(bs);
    return NULL;
}

/* A child given as a BlockdevRef (backing, data-file): see block.h. */
struct bnode *bnode_open_ref(json_t *ref, bool parent_ro, error **errp)
{
    return open_child(ref, parent_ro, errp);
}

struct bnode *blockdev_add(json_t *opts, error **errp)
{
    return bnode_open(opts, true, errp);
}

/* Linked below another node: as file or backing, or as any other child
 * (a copy-before-write target, a qcow2 data file). */
static bool has_parent(struct bnode *child)
{
    for (struct bnode *bs = nodes; bs; bs = bs->next)
        if (bs->file == child || bs->backing == child)
            return true;
    for (struct bnode_user *u = child->users; u; u = u->next)
        if (u->parent)
            return true;
    return false;
}

struct bnode *bnode_job_filter_above(struct bnode *bs)
{
    for (struct bnode_user *u = bs->users; u; u = u->next)
        if (u->parent && u->parent->drv->job_filter)
            return u->parent;
    return NULL;
}

bool bnode_has_parent_node(struct bnode *bs)
{
    return has_parent(bs);
}

struct bnode *bnode_backing_parent(struct bnode *bs)
{
    for (struct bnode *p = nodes; p; p = p->next)
        if (p->backing == bs)
            return p;
    return NULL;
}

int blockdev_del(const char *node_name, error **errp)
{
    struct bnode *bs = bnode_find(node_name);
    if (!bs) {
        error_setg(errp, "Failed to find node with node-name='%s'", node_name);
        return -1;
    }
    if (bs->auto_named) {
        error_setg(errp, "Node %s is not owned by the monitor", node_name);
        return -1;
    }
    bool under_job_filter = bnode_job_filter_above(bs);
    for (struct bnode_user *u = bs->users; u && !under_job_filter; u = u->next) {
        if (!strcmp(u->role, "root")) {      /* used by an export */
            error_setg(errp, "Node %s is in use", node_name);
            return -1;
        }
    }
    if (bs->blocker) {
        error_setg(errp, "Node '%s' is busy: %s", node_name, bs->blocker);
        return -1;
    }
    struct bnode *over = bnode_backing_parent(bs);
    if (over) {
        error_setg(errp, "Node '%s' is busy: node is used as backing hd of '%s'", node_name,
                   over->node_name);
        return -1;
    }
    if (bs->refcnt > 1 || has_parent(bs)) {
        error_setg(errp, "Block device %s is in use", node_name);
        return -1;
    }
    bnode_unref(bs);
    return 0;
}

static struct bnode *retired;      /* children a reopen unlinked, kept open */

/* Out of the node list: bs and the children only it holds (they close with it). */
static void hide_subtree(struct bnode *bs)
{
    node_list_remove(bs);
    bs->next = NULL;
    struct bnode *kids[] = { bs->file, bs->backing };
    for (unsigned i = 0; i < ARRAY_SIZE(kids); i++) {
        struct bnode *c = kids[i];
        if (!c || c->refcnt != 1)
            continue;
        bool only_bs = true;
        for (struct bnode_user *u = c->users; u; u = u->next)
            only_bs &= u->parent == bs;
        if (only_bs)
            hide_subtree(c);
    }
}

void bnode_retire_link(struct bnode_user *u)
{
    struct bnode *child = u->bs;
    if (child->refcnt > 1) {
        bnode_detach(u);
        return;
    }
    /* The last reference: give the permissions back (image locks), leave
     * the graph, stay open. */
    bnode_user_set_perm(u, 0, PERM_ALL, NULL);
    bnode_ref(child);
    bnode_detach(u);
    hide_subtree(child);
    child->next = retired;
    retired = child;
}

void block_close_all(void)
{
    while (retired) {
        struct bnode *bs = retired;
        retired = bs->next;
        bs->next = nodes;          /* closed below with the others */
        nodes = bs;
    }
    /* Exports are gone by now; drop the monitor's reference of every root. */
    bool progress = true;
    while (nodes && progress) {
        progress = false;
        for (struct bnode *bs = nodes; bs; bs = bs->next) {
            if (!has_parent(bs)) {
                bnode_close(bs);
                progress = true;
                break;
            }
        }
    }
}

void block_flush_all_sync(void)
{
    for (struct bnode *bs = nodes; bs; bs = bs->next)
        if (bs->drv->flush_sync && !bs->read_only)
            bs->drv->flush_sync(bs);
}

/* ---- data path ---- */

/* ---- holding writes ---- */

struct drain_waiter {
    void (*fn)(void *opaque);
    void *opaque;
    struct drain_waiter *next;
};

static int writes_held;                   /* atomic: holds in force */
static pthread_mutex_t held_lock = PTHREAD_MUTEX_INITIALIZER;
static struct breq *held_head, **held_tail = &held_head;
static struct drain_waiter *drain_waiters;   /* main thread */
static bool drain_poll_queued;               /* main thread */

/* Held writes to send elsewhere when they go on (main thread). */
struct redirect {
    struct bnode *from, *to;
    struct redirect *next;
};
static struct redirect *redirects;

static bool all_writes_done(void)
{
    for (struct bnode *bs = nodes; bs; bs = bs->next)
        if (__atomic_load_n(&bs->writes_in_flight, __ATOMIC_SEQ_CST))
            return false;
    return true;
}

static void drain_poll(void *opaque)
{
    drain_poll_queued = false;
    if (!drain_waiters || !all_writes_done())
        return;                   /* the last completion polls again */
    struct drain_waiter *w = drain_waiters;
    drain_waiters = NULL;
    while (w) {
        struct drain_waiter *next = w->next;
        w->fn(w->opaque);
        free(w);
        w = next;
    }
}

static void drain_poll_soon(void *opaque)
{
    if (!drain_poll_queued) {
        drain_poll_queued = true;
        loop_call(loop_main(), drain_poll, NULL);
    }
}

/* From any thread: a counted write finished (or was held). */
static void write_uncount(struct bnode *bs)
{
    if (__atomic_sub_fetch(&bs->writes_in_flight, 1, __ATOMIC_SEQ_CST) == 0 &&
        __atomic_load_n(&writes_held, __ATOMIC_SEQ_CST))
        loop_call(loop_main(), drain_poll_soon, NULL);
}

void block_writes_hold(void (*drained)(void *opaque), void *opaque)
{
    struct drain_waiter *w = xzalloc(sizeof(*w));
    w->fn = drained;
    w->opaque = opaque;
    w->next = drain_waiters;
    drain_waiters = w;
    /* a writer counts itself, then looks at writes_held; we raise it, then
     * look at the counts (both seq_cst): one of us sees the other */
    __atomic_add_fetch(&writes_held, 1, __ATOMIC_SEQ_CST);
    throttle_bypass_begin();            /* throttled writes go now, as QEMU's drain */
    drain_poll_soon(NULL);
}

static void held_resubmit(void *opaque)
{
    struct breq *req = opaque;
    bnode_submit(req->bs, req);
}

void block_writes_redirect(struct bnode *from, struct bnode *to)
{
    struct redirect *r = xzalloc(sizeof(*r));
    r->from = from;
    r->to = to;
    r->next = redirects;
    redirects = r;
}

/* Where a held write to bs goes: redirected as often as it was. */
static struct bnode *redirected(struct bnode *bs)
{
    for (struct redirect *r = redirects; r; ) {
        if (r->from == bs) {
            bs = r->to;
            r = redirects;            /* chains: from -> to -> ... */
        } else {
            r = r->next;
        }
    }
    return bs;
}

void block_writes_release(void)
{
    throttle_bypass_end();
    if (__atomic_sub_fetch(&writes_held, 1, __ATOMIC_SEQ_CST) > 0)
        return;
    pthread_mutex_lock(&held_lock);
    struct breq *req = held_head;
    held_head = NULL;
    held_tail = &held_head;
    pthread_mutex_unlock(&held_lock);
    while (req) {
        struct breq *next = req->held_next;
        req->bs = redirected(req->bs);
        loop_call(req->loop, held_resubmit, req);   /* in the submitter's loop, in order */
        req = next;
    }
    while (redirects) {
        struct redirect *r = redirects;
        redirects = r->next;
        free(r);
    }
}

/* A write that found writes held: it waits in the queue, uncounted. */
static void write_hold(struct bnode *bs, struct breq *req)
{
    req->write_counted = false;
    req->held_next = NULL;
    pthread_mutex_lock(&held_lock);
    *held_tail = req;
    held_tail = &req->held_next;
    pthread_mutex_unlock(&held_lock);
    write_uncount(bs);
}

void breq_complete(struct breq *req, int ret)
{
    bstats_complete(req, ret);
    if (req->write_counted) {
        req->write_counted = false;
        write_uncount(req->counted_bs);   /* req->bs may be a child's by now */
    }
    if (unlikely(req->align_track)) {
        struct bnode_align *al = req->align_track;
        req->align_track = NULL;
        bnode_align_fast_end(al);
    }
    req->done(req, ret);
}

/* Writes mark the dirty bitmaps of every node they pass through, when
 * they are issued: a bitmap never misses a change (a write that then fails
 * leaves its granules dirty, as in QEMU). */
static inline void mark_dirty(struct bnode *bs, const struct breq *req, uint64_t offset)
{
    if (unlikely(__atomic_load_n(&bs->dirty_recording, __ATOMIC_RELAXED)) &&
        (req->op == BREQ_WRITE || req->op == BREQ_WRITE_ZEROES || req->op == BREQ_DISCARD))
        bnode_set_dirty(bs, offset, req->len);
}

static inline bool is_write(const struct breq *req)
{
    return req->op == BREQ_WRITE || req->op == BREQ_WRITE_ZEROES || req->op == BREQ_DISCARD;
}

void bnode_debug_event_slow(struct bnode *bs, int event)
{
    while (bs && !bs->drv->debug_event)
        bs = bs->file;
    if (bs)
        bs->drv->debug_event(bs, event);
}

/* The events QEMU's generic block layer raises as a request reaches bs. */
static inline void request_events(struct bnode *bs, const struct breq *req)
{
    if (likely(!__atomic_load_n(&blkdebug_nodes, __ATOMIC_RELAXED)))
        return;
    if (req->op == BREQ_WRITE)
        bnode_debug_event_slow(bs, BLKDBG_PWRITEV);
    else if (req->op == BREQ_WRITE_ZEROES)
        bnode_debug_event_slow(bs, BLKDBG_PWRITEV_ZERO);
    else if (req->op == BREQ_FLUSH && bs->file) {
        bnode_debug_event_slow(bs->file, BLKDBG_FLUSH_TO_OS);
        if (!bs->cache_no_flush)
            bnode_debug_event_slow(bs->file, BLKDBG_FLUSH_TO_DISK);
    }
}

void bnode_submit_child(struct bnode *child, struct breq *req, uint64_t offset)
{
    request_events(child, req);
    mark_dirty(child, req, offset);
    req->acct_fwd++;
    bnode_check_write_threshold(child, req, offset);
    struct bnode_intercept *ic = __atomic_load_n(&child->intercept, __ATOMIC_ACQUIRE);
    if (unlikely(ic) && is_write(req)) {
        ic->submit(ic, child, req, offset);
        return;
    }
    child->drv->submit(child, req, offset);
}

void bnode_submit_driver(struct bnode *bs, struct breq *req, uint64_t offset)
{
    if (bs->align && offset == req->offset && req->bs == bs && bnode_align_submit(bs, req))
        return;
    bs->drv->submit(bs, req, offset);
}

static bool buffer_is_zero(const struct iovec *iov, int iovcnt)
{
    for (int i = 0; i < iovcnt; i++) {
        const unsigned char *p = iov[i].iov_base;
        size_t n = iov[i].iov_len;
        if (n && (p[0] || memcmp(p, p + 1, n - 1)))
            return false;
    }
    return true;
}

void bnode_submit(struct bnode *bs, struct breq *req)
{
    req->bs = bs;
    req->align_track = NULL;
    bstats_submit(bs, req);
    req->write_counted = false;
    switch (req->op) {
    case BREQ_WRITE:
    case BREQ_DISCARD:
    case BREQ_WRITE_ZEROES:
        if (bs->read_only) {
            bstats_invalid(req);
            breq_complete(req, -EPERM);
            return;
        }
        break;
    default:
        break;
    }
    uint64_t size = __atomic_load_n(&bs->size, __ATOMIC_RELAXED);
    if (req->op != BREQ_FLUSH && !(req->flags & BREQ_BEYOND_EOF) &&
        (req->offset > size || req->len > size - req->offset)) {
        bstats_invalid(req);
        breq_complete(req, -EINVAL);
        return;
    }
    if (unlikely(req->flags & BREQ_WRITE_COMPRESSED) &&
        (req->op != BREQ_WRITE || !bs->drv->compressed_writes)) {
        bstats_invalid(req);
        breq_complete(req, -ENOTSUP);
        return;
    }
    if (req->op == BREQ_FLUSH && bs->cache_no_flush) {
        breq_complete(req, 0);
        return;
    }
    if (req->op == BREQ_DISCARD && !bs->discard) {
        breq_complete(req, 0);       /* discard=ignore: a successful no-op */
        return;
    }
    if (req->op == BREQ_CACHE) {
        breq_complete(req, 0);       /* the page cache already serves reads */
        return;
    }
    if (req->op == BREQ_WRITE && bs->detect_zeroes != DETECT_ZEROES_OFF &&
        buffer_is_zero(req->iov, req->iovcnt)) {
        req->op = BREQ_WRITE_ZEROES;
        if (bs->detect_zeroes == DETECT_ZEROES_UNMAP)
            req->flags |= BREQ_MAY_UNMAP;
    }
    if (req->len == 0 && req->op != BREQ_FLUSH) {
        breq_complete(req, 0);
        return;
    }
    if (is_write(req)) {
        /* Marked before the hold is looked at (and again when a held write
         * goes on): a write a transaction's new bitmap misses passed its
         * hold, so it is before the snapshot and in the frozen bitmap. */
        bool unchanged = req->flags & BREQ_WRITE_UNCHANGED;
        if (!unchanged)
            mark_dirty(bs, req, req->offset);
        __atomic_add_fetch(&bs->writes_in_flight, 1, __ATOMIC_SEQ_CST);
        req->write_counted = true;
        req->counted_bs = bs;
        if (unlikely(__atomic_load_n(&writes_held, __ATOMIC_SEQ_CST)) &&
            (req->flags & BREQ_PEER)) {
            write_hold(bs, req);
            return;
        }
        bnode_check_write_threshold(bs, req, req->offset);
        struct bnode_intercept *ic = __atomic_load_n(&bs->intercept, __ATOMIC_ACQUIRE);
        if (unlikely(ic) && !unchanged) {
            ic->submit(ic, bs, req, req->offset);
            return;
        }
    }
    request_events(bs, req);
    if (bs->align && bnode_align_submit(bs, req))
        return;
    bs->drv->submit(bs, req, req->offset);
}

int bnode_pread_sync(struct bnode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    if (!bs->drv->pread_sync)
        return -ENOTSUP;
    return bs->drv->pread_sync(bs, offset, bytes, buf);
}

int bnode_splice_source(struct bnode *bs, uint64_t offset, uint64_t bytes, bool need_holes,
                        int *fd, uint64_t *fd_offset)
{
    if (!bs->drv->splice_source || bs->backing || offset > bs->size || bytes > bs->size - offset)
        return -ENOTSUP;
    return bs->drv->splice_source(bs, offset, bytes, need_holes, fd, fd_offset);
}

int bnode_block_status(struct bnode *bs, uint64_t offset, uint64_t bytes,
                       uint64_t *pnum, unsigned *flags, int *depth)
{
    if (offset >= bs->size) {
        *pnum = 0;
        *flags = 0;
        *depth = 0;
        return -EINVAL;
    }
    bytes = MIN(bytes, bs->size - offset);
    int d = 1;
    for (struct bnode *n = bs; n; n = n->backing, d++) {
        uint64_t nsize = __atomic_load_n(&n->size, __ATOMIC_RELAXED);
        if (offset >= nsize) {
            /* past the end of a shorter backing layer: zeros that count as
             * allocated there (QEMU's rule) */
            *pnum = bytes;
            *flags = BS_ZERO | BS_ALLOCATED;
            *depth = d;
            return 0;
        }
        bytes = MIN(bytes, nsize - offset);
        uint64_t num = bytes;
        unsigned f = BS_DATA | BS_ALLOCATED;
        if (n->drv->block_status) {
            int ret = n->drv->block_status(n, offset, bytes, &num, &f);
            if (ret < 0)
                return ret;
        }
        if ((f & BS_ALLOCATED) || !n->backing) {
            *pnum = num;
            *flags = f;
            *depth = (f & BS_ALLOCATED) ? d : 0;
            return 0;
        }
        bytes = num;     /* unallocated here: ask the backing file for this much */
    }
    *pnum = bytes;
    *flags = BS_ZERO;
    *depth = 0;
    return 0;
}

int bnode_truncate(struct bnode *bs, uint64_t size, error **errp)
{
    if (size > BNODE_MAX_LENGTH) {
        error_setg(errp, "offset(%" PRIu64 ") exceeds maximum(%" PRIu64 ")",
                   size, (uint64_t)BNODE_MAX_LENGTH);
        return -EINVAL;
    }
    if (bs->read_only) {
        error_setg(errp, "Image is read-only");
        return -EPERM;
    }
    if (!bs->drv->truncate) {
        error_setg(errp, "Image format driver does not support resize");
        return -ENOTSUP;
    }
    int ret = bs->drv->truncate(bs, size, errp);
    if (ret < 0)
        return ret;
    if (ret > 0)
        return 0;                   /* the driver kept the size */
    /* A driver whose size follows its child's was told already. */
    size = bnode_round_size(size);
    if (bs->size != size) {
        bs->size = size;
        bnode_notify_resized(bs);
    }
    return 0;
}

void bnode_notify_resized(struct bnode *bs)
{
    dirty_bitmaps_truncate(bs, bs->size);
    /* A callback may detach its user: step past it first. */
    for (struct bnode_user *u = bs->users, *next; u; u = next) {
        next = u->next;
        if (u->resized)
            u->resized(u);
    }
}

bool bnode_can_write_zeroes_fast(struct bnode *bs)
{
    return bs->drv->can_write_zeroes_fast && bs->drv->can_write_zeroes_fast(bs);
}

struct bnode *bnode_first(void) { return nodes; }

void bnode_account_read(struct bnode *bs, uint64_t bytes)
{
    struct breq req = { .op = BREQ_READ, .len = bytes };
    bstats_submit(bs, &req);
    for (struct bnode *n = bs->file; n; n = n->file)
        req.acct_fwd++;              /* it was read from the leaf */
    bstats_complete(&req, 0);
}

/* ---- filters: hooks that only pass on to the file child ---- */

int bnode_filter_block_status(struct bnode *bs, uint64_t offset, uint64_t bytes,
                              uint64_t *pnum, unsigned *flags)
{
    int depth;
    return bnode_block_status(bs->file, offset, bytes, pnum, flags, &depth);
}

void bnode_filter_child_resized(struct bnode *bs)
{
    if (bs->size != bs->file->size) {
        bs->size = bs->file->size;
        bnode_notify_resized(bs);
    }
}

int bnode_filter_truncate(struct bnode *bs, uint64_t size, error **errp)
{
    return bnode_truncate(bs->file, size, errp);
}

bool bnode_filter_can_write_zeroes_fast(struct bnode *bs)
{
    return bnode_can_write_zeroes_fast(bs->file);
}

bool bnode_filter_can_discard(struct bnode *bs)
{
    return bs->file->drv->can_discard && bs->file->drv->can_discard(bs->file);
}
