/* QMP commands of the block layer: blockdev-add, blockdev-del, query-named-block-nodes. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include "block/block.h"
#include "block/cbw.h"
#include "block/dirty-bitmap.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/opts.h"


static json_t *qmp_blockdev_add(json_t *args, error **errp)
{
    return blockdev_add(args, errp) ? json_object() : NULL;
}
QMP_COMMAND("blockdev-add", qmp_blockdev_add)

static json_t *qmp_blockdev_del(json_t *args, error **errp)
{
    return blockdev_del(opt_str(args, "node-name", ""), errp) < 0 ? NULL : json_object();
}
QMP_COMMAND("blockdev-del", qmp_blockdev_del)

/* A filter as QEMU's drivers declare it (is_filter): blkdebug and
 * copy-before-write; QEMU's snapshot-access is not one. */
static bool qemu_filter(struct bnode *bs)
{
    return bs->drv->is_filter && strcmp(bs->drv->name, "snapshot-access");
}

/* QEMU's bdrv_filter_or_cow_child: the backing node, or a filter's child. */
static struct bnode *filter_or_cow_child(struct bnode *bs)
{
    if (bs->backing)
        return bs->backing;
    return qemu_filter(bs) ? bs->file : NULL;
}

/* QEMU 7.2's bdrv_get_allocated_file_size: a file's own blocks, none
 * (-ENOTSUP) for the other protocols but null-co, a filter's child's, and
 * for the other drivers the sum over their children but the backing one
 * (qcow2: its file and its data file). */
static int64_t allocated_size(struct bnode *bs)
{
    if (!strcmp(bs->drv->name, "null-co"))
        return 0;
    if (bs->drv->is_protocol)
        return bs->file ? -ENOTSUP : bnode_leaf_allocated(bs);
    if (qemu_filter(bs))
        return allocated_size(bs->file);
    int64_t sum = 0;
    for (struct bnode *c = bnode_first(); c; c = c->next)
        for (struct bnode_user *u = c->users; u; u = u->next) {
            if (u->parent != bs || !strcmp(u->role, "backing"))
                continue;
            int64_t n = allocated_size(c);
            if (n < 0)
                return n;
            sum += n;
        }
    return sum;
}

static json_t *node_info(struct bnode *bs, bool flat)
{
    CLEANUP_FREE char *filename = bnode_filename(bs);
    int64_t allocated = allocated_size(bs);
    static const char *const dz[] = { "off", "on", "unmap" };
    json_t *image = json_pack("{s:I, s:s, s:s, s:b}",
                              "virtual-size", (json_int_t)bs->size, "filename", filename,
                              "format", bs->drv->name, "dirty-flag", 0);
    if (allocated >= 0)
        json_object_set_new(image, "actual-size", json_integer(allocated));
    json_t *info = json_pack("{s:I, s:s, s:o, s:I, s:b, s:s, s:I, s:s, s:I, s:I, s:I, s:b,"
                     " s:I, s:I, s:{s:b, s:b, s:b}, s:s}",
                     "iops_rd", (json_int_t)0, "detect_zeroes", dz[bs->detect_zeroes],
                     "image", image, "iops_wr", (json_int_t)0, "ro", bs->read_only,
                     "node-name", bs->node_name, "backing_file_depth", (json_int_t)0,
                     "drv", bs->drv->name, "iops", (json_int_t)0, "bps_wr", (json_int_t)0,
                     "write_threshold",
                     (json_int_t)__atomic_load_n(&bs->write_threshold, __ATOMIC_RELAXED), "encrypted", 0,
                     "bps", (json_int_t)0, "bps_rd", (json_int_t)0,
                     "cache", "no-flush", bs->cache_no_flush, "direct", bs->cache_direct,
                     "writeback", 1,
                     "file", filename);
    struct bnode *leaf = bs;
    while (leaf->file)
        leaf = leaf->file;
    if (leaf->drv->query_info)
        leaf->drv->query_info(leaf, info);
    if (bs != leaf && (bs->drv->is_format || bs->drv->is_filter) && bs->drv->query_info)
        bs->drv->query_info(bs, info);          /* qcow2: its own image info */
    /* QEMU's bdrv_get_info, which gives cluster-size and dirty-flag: raw and
     * the filters pass it to their file child; snapshot-access has none. */
    struct bnode *src = bs;
    bool snap_fallback = true;      /* bdrv_snapshot_list falls back to it */
    while (src->file && (!strcmp(src->drv->name, "raw") || qemu_filter(src))) {
        snap_fallback &= !cbw_of(src);      /* its target is a second data child */
        src = src->file;
    }
    if (!strcmp(src->drv->name, "snapshot-access")) {
        json_object_del(image, "dirty-flag");
    } else if (src != bs && src != leaf && src->drv->query_info) {
        json_t *si = json_pack("{s:{}}", "image");
        src->drv->query_info(src, si);
        json_t *simg = json_object_get(si, "image");
        const char *keys[] = { "cluster-size", "dirty-flag", "snapshots" };
        for (unsigned i = 0; i < ARRAY_SIZE(keys) - !snap_fallback; i++)
            if (json_object_get(simg, keys[i]))
                json_object_set(image, keys[i], json_object_get(simg, keys[i]));
        json_decref(si);
    }
    /* As QEMU 7.2's bdrv_block_device_info: unless flat, the image info of
     * each filtered or backing node below nests under "backing-image", and
     * backing_file_depth counts them. */
    json_int_t depth = 0;
    json_t *img = json_object_get(info, "image");
    for (struct bnode *b = bs; !flat && (b = filter_or_cow_child(b)); depth++) {
        json_t *bi = node_info(b, true);
        json_object_set(img, "backing-image", json_object_get(bi, "image"));
        img = json_object_get(bi, "image");
        json_decref(bi);            /* img lives on in its parent image */
    }
    json_object_set_new(info, "backing_file_depth", json_integer(depth));
    json_t *bitmaps = json_array();
    if (cbw_of(bs))
        cbw_query_bitmaps(cbw_of(bs), true, bitmaps);
    for (struct bnode *n = bnode_first(); n; n = n->next)
        if (cbw_of(n) && n->file == bs)
            cbw_query_bitmaps(cbw_of(n), false, bitmaps);
    json_t *own = dirty_bitmaps_query(bs);
    if (own)
        json_array_extend(bitmaps, own);
    json_decref(own);
    if (json_array_size(bitmaps))
        json_object_set(info, "dirty-bitmaps", bitmaps);
    json_decref(bitmaps);
    return info;
}

json_t *query_named_block_nodes(bool flat)
{
    json_t *list = json_array();
    for (struct bnode *bs = bnode_first(); bs; bs = bs->next)
        json_array_append_new(list, node_info(bs, flat));
    return list;
}

static json_t *qmp_query_named_block_nodes(json_t *args, error **errp)
{
    return query_named_block_nodes(opt_bool(args, "flat", false));
}
QMP_COMMAND("query-named-block-nodes", qmp_query_named_block_nodes)
