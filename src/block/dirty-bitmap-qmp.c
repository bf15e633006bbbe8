/*
 * QMP commands of dirty bitmaps: block-dirty-bitmap-add, -remove, -clear,
 * -enable, -disable, -merge and x-debug-block-dirty-bitmap-sha256, with
 * QEMU 7.2's checks in QEMU's order and its messages.
 *
 * The operations themselves (dirty_bitmap_op_*) are separate from the
 * handlers so that `transaction` runs the very same code and can undo it.
 */
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "block/dirty-bitmap-qmp.h"
#include "qmp/qmp.h"
#include "util/opts.h"
#include "util/pbitmap.h"

struct dirty_bitmap *dirty_bitmap_op_add(json_t *args, error **errp)
{
    const char *node = opt_str(args, "node", "");
    const char *name = opt_str(args, "name", "");
    json_t *gran = json_object_get(args, "granularity");
    uint32_t granularity = 0;

    if (!name[0]) {
        error_setg(errp, "Bitmap name cannot be empty");
        return NULL;
    }
    struct bnode *bs = bnode_find(node);
    if (!bs) {
        error_setg(errp, "Cannot find device='%s' nor node-name='%s'", node, node);
        return NULL;
    }
    if (gran) {
        json_int_t g = json_integer_value(gran);
        if (g < 512 || (g & (g - 1))) {
            error_setg(errp, "Granularity must be power of 2 and at least 512");
            return NULL;
        }
        granularity = (uint32_t)g;
    } else {
        granularity = dirty_bitmap_default_granularity(bs);
    }
    bool persistent = opt_bool(args, "persistent", false);
    if (persistent && dirty_bitmap_can_persist(bs, name, granularity, errp) < 0)
        return NULL;
    if (strlen(name) > DIRTY_BITMAP_NAME_MAX) {
        error_setg(errp, "Bitmap name too long: %s", name);
        return NULL;
    }
    struct dirty_bitmap *bm = dirty_bitmap_create(bs, granularity, name, errp);
    if (!bm)
        return NULL;
    if (opt_bool(args, "disabled", false))
        dirty_bitmap_set_enabled(bm, false);
    if (persistent) {
        /* the image's entry may take a while (qmp_call_co): meanwhile the
         * bitmap is busy and the node held */
        bnode_ref(bs);
        dirty_bitmap_set_busy(bm, true);
        int ret = dirty_bitmap_persist(bm, errp);
        dirty_bitmap_set_busy(bm, false);
        bnode_unref(bs);
        if (ret < 0) {
            dirty_bitmap_release(bm);
            return NULL;
        }
    }
    return bm;
}

/* Lookup and the checks of remove: the bitmap to release, or NULL. */
struct dirty_bitmap *dirty_bitmap_op_remove_check(json_t *args, error **errp)
{
    struct dirty_bitmap *bm = dirty_bitmap_lookup(opt_str(args, "node", ""),
                                                  opt_str(args, "name", ""), NULL, errp);
    if (!bm || dirty_bitmap_check(bm, DBM_CHECK_BUSY | DBM_CHECK_RO, errp) < 0)
        return NULL;
    return bm;
}

/* The lookup and check of clear, enable and disable. */
struct dirty_bitmap *dirty_bitmap_op_lookup(json_t *args, unsigned check, error **errp)
{
    struct dirty_bitmap *bm = dirty_bitmap_lookup(opt_str(args, "node", ""),
                                                  opt_str(args, "name", ""), NULL, errp);
    if (!bm || dirty_bitmap_check(bm, check, errp) < 0)
        return NULL;
    return bm;
}

/* Merge: the target is checked, then the sources are gathered into a
 * scratch bitmap of the target's granularity, so a bad source leaves the
 * target untouched. */
struct dirty_bitmap *dirty_bitmap_op_merge(json_t *args, struct pbitmap **backup, error **errp)
{
    struct bnode *bs;
    struct dirty_bitmap *dst = dirty_bitmap_lookup(opt_str(args, "node", ""),
                                                   opt_str(args, "target", ""), &bs, errp);
    if (!dst || dirty_bitmap_check(dst, DBM_CHECK_DEFAULT, errp) < 0)
        return NULL;
    struct dirty_bitmap *anon = dirty_bitmap_create(bs, dst->granularity, NULL, errp);
    if (!anon)
        return NULL;
    dirty_bitmap_set_enabled(anon, false);

    json_t *sources = json_object_get(args, "bitmaps"), *v;
    size_t i;
    struct dirty_bitmap *ret = dst;
    json_array_foreach(sources, i, v) {
        struct dirty_bitmap *src;
        if (json_is_string(v)) {
            src = dirty_bitmap_find(bs, json_string_value(v));
            if (!src)
                error_setg(errp, "Dirty bitmap '%s' not found", json_string_value(v));
        } else {
            src = dirty_bitmap_lookup(opt_str(v, "node", ""), opt_str(v, "name", ""), NULL, errp);
        }
        if (!src || dirty_bitmap_merge(anon, src, NULL, errp) < 0) {
            ret = NULL;
            goto out;
        }
    }
    if (dirty_bitmap_merge(dst, anon, backup, errp) < 0)
        ret = NULL;
out:
    dirty_bitmap_release(anon);
    return ret;
}

/* ---- the commands ---- */

/* add and remove write a persistent bitmap's entry in the image: as work
 * of the main loop that may wait for the image's I/O (qmp_call_co), not
 * blocking the loop that serves exports without an iothread and jobs. */
static json_t *bitmap_add_work(json_t *args, error **errp)
{
    return dirty_bitmap_op_add(args, errp) ? json_object() : NULL;
}

static json_t *qmp_block_dirty_bitmap_add(json_t *args, error **errp)
{
    return qmp_call_co(bitmap_add_work, args, errp);
}
QMP_COMMAND("block-dirty-bitmap-add", qmp_block_dirty_bitmap_add)

static json_t *bitmap_remove_work(json_t *args, error **errp)
{
    struct dirty_bitmap *bm = dirty_bitmap_op_remove_check(args, errp);
    if (!bm)
        return NULL;
    if (bm->persistent) {
        struct bnode *bs = bm->bs;
        bnode_ref(bs);
        dirty_bitmap_set_busy(bm, true);    /* nobody else takes it meanwhile */
        int ret = dirty_bitmap_unpersist(bm, errp);
        dirty_bitmap_set_busy(bm, false);
        bnode_unref(bs);
        if (ret < 0)
            return NULL;
    }
    dirty_bitmap_release(bm);
    return json_object();
}

static json_t *qmp_block_dirty_bitmap_remove(json_t *args, error **errp)
{
    return qmp_call_co(bitmap_remove_work, args, errp);
}
QMP_COMMAND("block-dirty-bitmap-remove", qmp_block_dirty_bitmap_remove)

static json_t *qmp_block_dirty_bitmap_clear(json_t *args, error **errp)
{
    struct dirty_bitmap *bm = dirty_bitmap_op_lookup(args, DBM_CHECK_DEFAULT, errp);
    if (!bm)
        return NULL;
    dirty_bitmap_clear(bm, NULL);
    return json_object();
}
QMP_COMMAND("block-dirty-bitmap-clear", qmp_block_dirty_bitmap_clear)

static json_t *qmp_block_dirty_bitmap_enable(json_t *args, error **errp)
{
    struct dirty_bitmap *bm = dirty_bitmap_op_lookup(args, DBM_CHECK_ALLOW_RO, errp);
    if (!bm)
        return NULL;
    dirty_bitmap_set_enabled(bm, true);
    return json_object();
}
QMP_COMMAND("block-dirty-bitmap-enable", qmp_block_dirty_bitmap_enable)

static json_t *qmp_block_dirty_bitmap_disable(json_t *args, error **errp)
{
    struct dirty_bitmap *bm = dirty_bitmap_op_lookup(args, DBM_CHECK_ALLOW_RO, errp);
    if (!bm)
        return NULL;
    dirty_bitmap_set_enabled(bm, false);
    return json_object();
}
QMP_COMMAND("block-dirty-bitmap-disable", qmp_block_dirty_bitmap_disable)

static json_t *qmp_block_dirty_bitmap_merge(json_t *args, error **errp)
{
    return dirty_bitmap_op_merge(args, NULL, errp) ? json_object() : NULL;
}
QMP_COMMAND("block-dirty-bitmap-merge", qmp_block_dirty_bitmap_merge)

static json_t *qmp_x_debug_block_dirty_bitmap_sha256(json_t *args, error **errp)
{
    struct dirty_bitmap *bm = dirty_bitmap_lookup(opt_str(args, "node", ""),
                                                  opt_str(args, "name", ""), NULL, errp);
    char hex[65];
    if (!bm)
        return NULL;
    dirty_bitmap_sha256(bm, hex);
    return json_pack("{s:s}", "sha256", hex);
}
QMP_COMMAND("x-debug-block-dirty-bitmap-sha256", qmp_x_debug_block_dirty_bitmap_sha256)
