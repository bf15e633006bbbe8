/*
 * blockdev-snapshot-internal-sync (the command and the transaction action)
 * and blockdev-snapshot-delete-internal-sync: snapshots kept inside an
 * image (qcow2), as QEMU 7.2's blockdev.c and block/snapshot.c do them:
 * the same checks in the same order, the same errors, and the same
 * fallback of a driver without snapshots (raw) to its file child.
 *
 * Theory of operation.  Both run once the peers' writes are held and
 * drained (txn_call_drained; QEMU drains the node), in a coroutine of the
 * main loop, and the driver changes the image there (qcow2-snapshot.c).
 * The action creates the snapshot in prepare and deletes it again if a
 * later action fails.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include "block/block.h"
#include "block/block-job.h"
#include "block/chain.h"
#include "block/transaction.h"
#include "qmp/qmp.h"
#include "util/log.h"
#include "util/opts.h"
#include "util/xalloc.h"

void bsnapshot_clear(struct bsnapshot *sn)
{
    free(sn->id);
    free(sn->name);
    sn->id = sn->name = NULL;
}

void bsnapshots_free(struct bsnapshot *list, int n)
{
    for (int i = 0; list && i < n; i++)
        bsnapshot_clear(&list[i]);
    free(list);
}

json_t *bsnapshot_info(const struct bsnapshot *sn)
{
    json_t *o = json_pack("{s:s, s:s, s:I, s:I, s:I, s:I, s:I}", "id", sn->id,
                          "name", sn->name, "vm-state-size", (json_int_t)sn->vm_state_size,
                          "date-sec", (json_int_t)sn->date_sec,
                          "date-nsec", (json_int_t)sn->date_nsec,
                          "vm-clock-sec", (json_int_t)(sn->vm_clock_nsec / 1000000000),
                          "vm-clock-nsec", (json_int_t)(sn->vm_clock_nsec % 1000000000));
    if (o && sn->icount != UINT64_MAX)
        json_object_set_new(o, "icount", json_integer((json_int_t)sn->icount));
    return o;
}

/* The node whose driver keeps bs's snapshots: bs, or (QEMU's
 * bdrv_snapshot_fallback) the file child of a driver that has none and
 * no other child holding data; NULL if there is none. */
static struct bnode *snapshot_node(struct bnode *bs)
{
    while (bs && !bs->drv->snapshot_list) {
        if (!strcmp(bs->drv->name, "copy-before-write"))
            return NULL;                /* its target holds data too */
        bs = bs->file;
    }
    return bs;
}

/* QEMU's bdrv_snapshot_find_by_id_and_name: 1 and *found, 0, or -1 */
static int find(struct bnode *bs, const char *id, const char *name, struct bsnapshot *found,
                error **errp)
{
    struct bnode *n = snapshot_node(bs);
    struct bsnapshot *list = NULL;
    int nb = n ? n->drv->snapshot_list(n, &list) : -ENOTSUP;
    if (nb < 0) {
        error_setg_errno(errp, -nb, "Failed to get a snapshot list");
        return -1;
    }
    int ret = 0;
    for (int i = 0; i < nb && !ret; i++) {
        if ((!id || !strcmp(list[i].id, id)) && (!name || !strcmp(list[i].name, name))) {
            *found = list[i];
            list[i].id = list[i].name = NULL;
            ret = 1;
        }
    }
    bsnapshots_free(list, nb);
    return ret;
}

/* ---- blockdev-snapshot-internal-sync ---- */

#define MAX_NAME 255

struct isnap {
    struct bnode *bs;
    char *device;
    struct bsnapshot sn;
    bool created;
};

static int isnap_prepare(struct txn_action *a, json_t *data, error **errp)
{
    struct isnap *s = a->opaque = xzalloc(sizeof(*s));
    const char *device = opt_str(data, "device", "");
    const char *name = opt_str(data, "name", "");
    error *err = NULL;

    struct bnode *bs = chain_root_node(device, errp);
    if (!bs || block_node_check_busy(bs, errp) < 0)
        return -1;
    if (bs->read_only) {
        error_setg(errp, "Device '%s' is read only", device);
        return -1;
    }
    struct bnode *n = snapshot_node(bs);
    if (!n || n->read_only) {
        error_setg(errp, "Block format '%s' used by device '%s' does not support internal "
                   "snapshots", bs->drv->name, device);
        return -1;
    }
    if (!*name) {
        error_setg(errp, "Name is empty");
        return -1;
    }
    /* QEMU keeps 255 bytes of a name (its QEMUSnapshotInfo), and then
     * looks for the whole one, so a long name can be taken twice; here
     * the name looked for is the one kept, cut where a character ends */
    size_t len = strlen(name);
    if (len > MAX_NAME) {
        len = MAX_NAME;
        while (len && ((unsigned char)name[len] & 0xc0) == 0x80)
            len--;
    }
    s->sn.name = xstrndup(name, len);
    struct bsnapshot old = { 0 };
    int found = find(bs, NULL, s->sn.name, &old, &err);
    bsnapshot_clear(&old);
    if (found < 0) {
        error_propagate(errp, err);
        return -1;
    }
    if (found) {
        error_setg(errp, "Snapshot with name '%s' already exists on device '%s'", name, device);
        return -1;
    }

    struct timeval tv;
    gettimeofday(&tv, NULL);
    s->sn = (struct bsnapshot){
        .name = s->sn.name,
        .date_sec = (uint32_t)tv.tv_sec,
        .date_nsec = (uint32_t)tv.tv_usec * 1000,
        /* qemu-storage-daemon's virtual clock is the host's */
        .vm_clock_nsec = (uint64_t)tv.tv_sec * 1000000000 + (uint64_t)tv.tv_usec * 1000,
        .icount = UINT64_MAX,
    };
    s->bs = bs;
    s->device = xstrdup(device);
    bnode_ref(bs);
    int ret = n->drv->snapshot_create(n, &s->sn);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "Failed to create snapshot '%s' on device '%s'", name,
                         device);
        return -1;
    }
    s->created = true;
    return 0;
}

static void isnap_abort(struct txn_action *a)
{
    struct isnap *s = a->opaque;
    if (!s->created)
        return;
    struct bnode *n = snapshot_node(s->bs);
    struct bsnapshot gone = { 0 };
    error *err = NULL;
    if (n->drv->snapshot_delete(n, s->sn.id, s->sn.name, &gone, &err) < 0) {
        log_error("Failed to delete snapshot with id '%s' and name '%s' on device '%s' in "
                  "abort: %s", s->sn.id, s->sn.name, s->device, err->msg);
        error_free(err);
    }
    bsnapshot_clear(&gone);
}

static void isnap_clean(struct txn_action *a)
{
    struct isnap *s = a->opaque;
    if (!s)
        return;
    if (s->bs)
        bnode_unref(s->bs);
    bsnapshot_clear(&s->sn);
    free(s->device);
    free(s);
}

static struct txn_ops isnap_ops = {
    .type = "blockdev-snapshot-internal-sync", .prepare = isnap_prepare,
    .abort = isnap_abort, .clean = isnap_clean, .drained = true,
};
TRANSACTION_ACTION(isnap_ops)

static json_t *isnap_one(json_t *args, error **errp)
{
    struct txn_action a = { .ops = &isnap_ops };
    int ret = isnap_prepare(&a, args, errp);
    isnap_clean(&a);
    return ret < 0 ? NULL : json_object();
}

static json_t *qmp_blockdev_snapshot_internal_sync(json_t *args, error **errp)
{
    return txn_call_drained(isnap_one, args);
}
QMP_COMMAND("blockdev-snapshot-internal-sync", qmp_blockdev_snapshot_internal_sync)

/* ---- blockdev-snapshot-delete-internal-sync ---- */

static json_t *isnap_delete(json_t *args, error **errp)
{
    const char *device = opt_str(args, "device", "");
    const char *id = opt_str(args, "id", NULL), *name = opt_str(args, "name", NULL);
    struct bnode *bs = chain_root_node(device, errp);
    if (!bs)
        return NULL;
    if (!id && !name) {
        error_setg(errp, "Name or id must be provided");
        return NULL;
    }
    if (block_node_check_busy(bs, errp) < 0)
        return NULL;
    struct bsnapshot sn = { 0 }, gone = { 0 };
    error *err = NULL;
    int found = find(bs, id, name, &sn, &err);
    if (found <= 0) {
        if (!err)
            error_setg(&err, "Snapshot with id '%s' and name '%s' does not exist on device "
                       "'%s'", id ? id : "null", name ? name : "null", device);
        error_propagate(errp, err);
        return NULL;
    }
    struct bnode *n = snapshot_node(bs);
    bnode_ref(bs);
    int ret = n->drv->snapshot_delete(n, id, name, &gone, errp);
    bnode_unref(bs);
    bsnapshot_clear(&gone);
    json_t *info = ret < 0 ? NULL : bsnapshot_info(&sn);
    bsnapshot_clear(&sn);
    return info;
}

static json_t *qmp_blockdev_snapshot_delete_internal_sync(json_t *args, error **errp)
{
    return txn_call_drained(isnap_delete, args);
}
QMP_COMMAND("blockdev-snapshot-delete-internal-sync", qmp_blockdev_snapshot_delete_internal_sync)
