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
    uint64_t size;              /* reopen: the new size */
};

/* QEMU's raw_apply_options checks, in its order and words. */
static int raw_check(uint64_t file_size, uint64_t offset, bool has_size, uint64_t size,
                     error **errp)
{
    if (offset > file_size) {
        error_setg(errp, "Offset (%" PRIu64 ") cannot be greater than size of the "
                   "containing file (%" PRIu64 ")", offset, file_size);
        return -1;
    }
    if (has_size && file_size - offset < size) {
        error_setg(errp, "The sum of offset (%" PRIu64 ") and size (%" PRIu64 ") has to be "
                   "smaller or equal to the  actual size of the containing file (%" PRIu64 ")",
                   offset, size, file_size);
        return -1;
    }
    if (has_size && size % 512) {
        error_setg(errp, "Specified size is not multiple of 512");
        return -1;
    }
    return 0;
}

static int raw_open(struct bnode *bs, json_t *opts, error **errp)
{
    struct raw_state *s = xzalloc(sizeof(*s));
    bs->opaque = s;
    uint64_t file_size = bs->file->size;
    s->offset = json_integer_value(json_object_get(opts, "offset"));
    s->has_size = json_object_get(opts, "size") != NULL;
    uint64_t size = s->has_size ? (uint64_t)json_integer_value(json_object_get(opts, "size"))
                                : (s->offset <= file_size ? file_size - s->offset : 0);
    if (raw_check(file_size, s->offset, s->has_size, size, errp) < 0)
        return -1;
    bs->size = size;
    bs->request_alignment = bs->file->request_alignment;
    bs->max_transfer = bs->file->max_transfer;
    /* Over a read-only file, the node stays read-write as in QEMU: a
     * writer is refused by the permissions ("Block node is read-only"). */
    return 0;
}

/* blockdev-reopen: offset and size may change (QEMU's raw_reopen_prepare). */
static const char *const raw_reopen_keys[] = { "offset", "size", NULL };

static int raw_reopen_prepare(struct reopen_state *rs, error **errp)
{
    struct bnode *bs = rs->bs;
    struct raw_state *n = xzalloc(sizeof(*n));
    uint64_t file_size = bs->file->size;
    n->offset = json_integer_value(json_object_get(rs->opts, "offset"));
    n->has_size = json_object_get(rs->opts, "size") != NULL;
    n->size = n->has_size ? (uint64_t)json_integer_value(json_object_get(rs->opts, "size"))
                          : (n->offset <= file_size ? file_size - n->offset : 0);
    if (raw_check(file_size, n->offset, n->has_size, n->size, errp) < 0) {
        free(n);
        return -1;
    }
    rs->drv = n;
    return 0;
}

static void raw_reopen_commit(struct reopen_state *rs)
{
    struct raw_state *s = rs->bs->opaque, *n = rs->drv;
    __atomic_store_n(&s->offset, n->offset, __ATOMIC_RELAXED);
    s->has_size = n->has_size;
    __atomic_store_n(&rs->bs->size, bnode_round_size(n->size), __ATOMIC_RELAXED);
    free(n);
    rs->drv = NULL;
}

static void raw_reopen_abort(struct reopen_state *rs)
{
    free(rs->drv);
    rs->drv = NULL;
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
    struct bnode *file = __atomic_load_n(&bs->file, __ATOMIC_ACQUIRE);
    if (r->op == BREQ_READ)
        bnode_debug_event(file, BLKDBG_READ_AIO);
    else if (r->op == BREQ_WRITE)
        bnode_debug_event(file, BLKDBG_WRITE_AIO);
    bnode_submit_child(file, r, offset + __atomic_load_n(&s->offset, __ATOMIC_RELAXED));
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
    uint64_t size = bnode_round_size(file_size > s->offset ? file_size - s->offset : 0);
    if (size != bs->size) {
        bs->size = size;
        bnode_notify_resized(bs);
    }
}

static const char *const raw_strong_opts[] = { "offset", "size", NULL };

static const struct bdrv bdrv_raw = {
    .strong_opts = raw_strong_opts,
    .name = "raw",
    .is_format = true,
    .open = raw_open,
    .close = raw_close,
    .submit = raw_submit,
    .block_status = raw_block_status,
    .truncate = raw_truncate,
    .child_resized = raw_child_resized,
    .splice_source = raw_splice_source,
    .can_write_zeroes_fast = bnode_filter_can_write_zeroes_fast,
    .can_discard = bnode_filter_can_discard,
    .bitmaps_load = sidecar_raw_load,
    .bitmaps_store = sidecar_raw_store,
    .bitmap_can_store = sidecar_can_store,
    .bitmaps_update = sidecar_update,
    .reopen_keys = raw_reopen_keys,
    .reopen_resettable = raw_reopen_keys,
    .reopen_prepare = raw_reopen_prepare,
    .reopen_commit = raw_reopen_commit,
    .reopen_abort = raw_reopen_abort,
};
BDRV_REGISTER(bdrv_raw)
