/*
 * block_resize and block-set-write-threshold.
 *
 * block_resize: change a node's size, as qemu-storage-daemon 7.2 does it,
 * and tell the exports on it.
 *
 * Theory of operation: the node is looked up (QEMU looks for a device
 * first; qsd has no devices, so a device name is never found), a node
 * that a block job or a backing link blocks is refused, then a
 * temporary user takes the RESIZE permission (a user that does not share
 * it refuses the resize with QEMU's permission conflict), and
 * bnode_truncate() asks the driver.  A successful resize reaches every
 * user of the node through bnode_user.resized: parent nodes whose size
 * follows their file child (raw without "size"), and exports, which tell
 * their clients as their protocol allows (export.h, node_resized).
 */
#include <stdio.h>
#include "block/block.h"
#include "qmp/qmp.h"
#include "util/opts.h"

static json_t *block_resize_work(json_t *args, error **errp)
{
    const char *device = opt_str(args, "device", NULL);
    const char *node_name = opt_str(args, "node-name", NULL);
    long long size = opt_int(args, "size", 0);
    struct bnode *bs = node_name ? bnode_find(node_name) : NULL;

    if (!bs) {
        error_setg(errp, "Cannot find device='%s' nor node-name='%s'",
                   device ? device : "", node_name ? node_name : "");
        return NULL;
    }
    if (size < 0) {
        error_setg(errp, "Parameter 'size' expects a >0 size");
        return NULL;
    }
    if (bs->blocker || bnode_backing_parent(bs)) {
        /* QEMU's op blocker, with its message: a device name, which is
         * NULL here (glibc prints "(null)") */
        error_setg(errp, "Device '%s' is in use", device ? device : "(null)");
        return NULL;
    }
    struct bnode_user *u = bnode_attach(bs, PERM_RESIZE, PERM_ALL, "an unnamed block device",
                                        "root", errp);
    if (!u)
        return NULL;
    int ret = bnode_truncate(bs, size, errp);
    bnode_detach(u);
    return ret < 0 ? NULL : json_object();
}
/* A qcow2 image's metadata may take a while to grow: work of the main loop
 * that waits there (qmp_call_co), the loop serving exports and jobs. */
static json_t *qmp_block_resize(json_t *args, error **errp)
{
    return qmp_call_co(block_resize_work, args, errp);
}
QMP_COMMAND("block_resize", qmp_block_resize)

/* The data path crossed bs's threshold (any thread; qmp_event forwards). */
void bnode_write_threshold_hit(struct bnode *bs, uint64_t end)
{
    uint64_t t = __atomic_load_n(&bs->write_threshold, __ATOMIC_RELAXED);
    /* One event per threshold, however many writers cross it at once. */
    if (!t || end <= t ||
        !__atomic_compare_exchange_n(&bs->write_threshold, &t, 0, false,
                                     __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        return;
    qmp_event("BLOCK_WRITE_THRESHOLD",
              json_pack("{s:s, s:I, s:I}", "node-name", bs->node_name,
                        "amount-exceeded", (json_int_t)(end - t),
                        "write-threshold", (json_int_t)t));
}

/* block-set-write-threshold: arm (or, with 0, disarm) BLOCK_WRITE_THRESHOLD. */
static json_t *qmp_block_set_write_threshold(json_t *args, error **errp)
{
    const char *name = opt_str(args, "node-name", "");
    struct bnode *bs = bnode_find(name);
    if (!bs) {
        error_setg(errp, "Device '%s' not found", name);
        return NULL;
    }
    __atomic_store_n(&bs->write_threshold, (uint64_t)opt_int(args, "write-threshold", 0),
                     __ATOMIC_RELAXED);
    return json_object();
}
QMP_COMMAND("block-set-write-threshold", qmp_block_set_write_threshold)
