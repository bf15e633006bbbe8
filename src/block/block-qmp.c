/* QMP commands of the block layer: blockdev-add, blockdev-del, query-named-block-nodes. */
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include "block/block.h"
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

static json_t *node_info(struct bnode *bs)
{
    CLEANUP_FREE char *filename = bnode_filename(bs);
    int64_t allocated = bnode_leaf_allocated(bs);
    json_int_t actual = allocated > 0 ? allocated : 0;
    static const char *const dz[] = { "off", "on", "unmap" };
    json_t *image = json_pack("{s:I, s:s, s:s, s:I, s:b}",
                              "virtual-size", (json_int_t)bs->size, "filename", filename,
                              "format", bs->drv->name, "actual-size", actual,
                              "dirty-flag", 0);
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
    if (bs->backing) {
        /* as QEMU: the chain's image info nests under "backing-image" */
        json_t *bi = node_info(bs->backing);
        json_object_set(json_object_get(info, "image"), "backing-image",
                        json_object_get(bi, "image"));
        json_decref(bi);
    }
    json_t *bitmaps = dirty_bitmaps_query(bs);
    if (bitmaps)
        json_object_set_new(info, "dirty-bitmaps", bitmaps);
    return info;
}

json_t *query_named_block_nodes(bool flat)
{
    json_t *list = json_array();
    for (struct bnode *bs = bnode_first(); bs; bs = bs->next)
        json_array_append_new(list, node_info(bs));
    return list;
}

static json_t *qmp_query_named_block_nodes(json_t *args, error **errp)
{
    return query_named_block_nodes(opt_bool(args, "flat", false));
}
QMP_COMMAND("query-named-block-nodes", qmp_query_named_block_nodes)
