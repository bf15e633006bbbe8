/*
 * Driver "raw": the format driver for plain images.  Passes requests to its
 * "file" child, optionally as a window [offset, offset+size) of it.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdlib.h>
#include "block/block.h"
#include "block/bitmap-sidecar.h"
#include "util/xalloc.h"

struct raw_state {
    uint64_t offset;
    bool has_size;
};

static int raw_open(struct bnode *bs, json_t *opts, error **errp)
{
    struct raw_state *s = xzalloc(sizeof(*s));
    bs->opaque = s;
    uint64_t file_size = bs->file->size;
    s->offset = json_integer_value(json_object_get(opts, "offset"));
    s->has_size = json_object_get(opts, "size") != NULL;
    uint64_t size = s->has_size ? (uint64_t)json_integer_value(json_object_get(opts, "size"))
                                : (s->offset <= file_size ? file_size - s->offset : 0);
    if (s->offset > file_size || size > file_size - s->offset) {
        error_setg(errp, "The sum of offset (%" PRIu64 ") and size (%" PRIu64 ") has to be "
                   "smaller or equal to the  actual size of the containing file (%" PRIu64 ")",
                   s->offset, size, file_size);
        return -1;
    }
    bs->size = size;
    bs->request_alignment = bs->file->request_alignment;
    if (bs->file->read_only)
        bs->read_only = true;
    return 0;
}

static void raw_close(struct bnode *bs)
{
    free(bs->opaque);
}

static void raw_submit(struct bnode *bs, struct breq *r, uint64_t offset)
{
    struct raw_state *s = bs->opaque;
    if (r->op == BREQ_DISCARD && !bs->file->discard) {
        breq_complete(r, 0);
        return;
    }
    bnode_submit_child(bs->file, r, offset + s->offset);
}

static int raw_block_status(struct bnode *bs, uint64_t offset, uint64_t bytes,
                            uint64_t *pnum, unsigned *flags)
{
    struct raw_state *s = bs->opaque;
    int depth;
    return bnode_block_status(bs->file, offset + s->offset, bytes, pnum, flags, &depth);
}

static int raw_splice_source(struct bnode *bs, uint64_t offset, uint64_t bytes, bool need_holes,
                             int *fd, uint64_t *fd_offset)
{
    struct raw_state *s = bs->opaque;
    return bnode_splice_source(bs->file, offset + s->offset, bytes, need_holes, fd, fd_offset);
}

static int raw_truncate(struct bnode *bs, uint64_t size, error **errp)
{
    struct raw_state *s = bs->opaque;
    if (s->has_size) {
        error_setg(errp, "Cannot resize fixed-size raw disks");
        return -ENOTSUP;
    }
    if (size > INT64_MAX - s->offset) {
        error_setg(errp, "Disk size too large for the chosen offset");
        return -EINVAL;
    }
    /* The file follows; raw_child_resized() then sets this node's size. */
    return bnode_truncate(bs->file, size + s->offset, errp);
}

/* Without a fixed size, a raw node is its file from offset to the end. */
static void raw_child_resized(struct bnode *bs)
{
    struct raw_state *s = bs->opaque;
    uint64_t file_size = bs->file->size;
    if (s->has_size)
        return;
    uint64_t size = file_size > s->offset ? file_size - s->offset : 0;
    if (size != bs->size) {
        bs->size = size;
        bnode_notify_resized(bs);
    }
}

static bool raw_can_zero_fast(struct bnode *bs) { return bnode_can_write_zeroes_fast(bs->file); }
static bool raw_can_discard(struct bnode *bs) { return bs->file->drv->can_discard &&
                                                       bs->file->drv->can_discard(bs->file); }

static const struct bdrv bdrv_raw = {
    .name = "raw",
    .is_format = true,
    .open = raw_open,
    .close = raw_close,
    .submit = raw_submit,
    .block_status = raw_block_status,
    .truncate = raw_truncate,
    .child_resized = raw_child_resized,
    .splice_source = raw_splice_source,
    .can_write_zeroes_fast = raw_can_zero_fast,
    .can_discard = raw_can_discard,
    .bitmaps_load = sidecar_raw_load,
    .bitmaps_store = sidecar_raw_store,
    .bitmap_can_store = sidecar_can_store,
    .bitmaps_update = sidecar_update,
};
BDRV_REGISTER(bdrv_raw)
