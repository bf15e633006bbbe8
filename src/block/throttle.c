/*
 * Driver "throttle": a filter node whose reads, writes, write-zeroes and
 * discards go through the limits of a throttle group (throttle-group.h),
 * as QEMU 7.2's block/throttle.c; flush, cache and block status pass
 * straight to its file child.  blockdev-reopen may name another group.
 */
#include <stdlib.h>
#include "block/block.h"
#include "block/throttle-group.h"
#include "util/opts.h"

static int throttle_open(struct bnode *bs, json_t *opts, error **errp)
{
    struct throttle_group *g = throttle_group_get(opt_str(opts, "throttle-group", ""), errp);
    if (!g)
        return -1;
    bs->opaque = g;
    bs->size = bs->file->size;
    return 0;
}

static void throttle_close(struct bnode *bs)
{
    throttle_group_put(bs->opaque);
}

static void throttle_submit(struct bnode *bs, struct breq *r, uint64_t offset)
{
    struct throttle_group *g = __atomic_load_n((struct throttle_group **)&bs->opaque,
                                               __ATOMIC_ACQUIRE);
    bool counted = r->op == BREQ_READ || r->op == BREQ_WRITE ||
                   r->op == BREQ_WRITE_ZEROES || r->op == BREQ_DISCARD;
    if (counted && throttle_group_intercept(g, r->op != BREQ_READ, bs, r, offset))
        return;                         /* the group submits it in its turn */
    bnode_submit_child(bs->file, r, offset);
}

static int throttle_reopen_prepare(struct reopen_state *rs, error **errp)
{
    rs->drv = throttle_group_get(opt_str(rs->opts, "throttle-group", ""), errp);
    return rs->drv ? 0 : -1;
}

static void throttle_reopen_commit(struct reopen_state *rs)
{
    struct throttle_group *old = rs->bs->opaque;
    __atomic_store_n((struct throttle_group **)&rs->bs->opaque, rs->drv, __ATOMIC_RELEASE);
    throttle_group_put(old);            /* requests waiting in it hold it */
    rs->drv = NULL;
}

static void throttle_reopen_abort(struct reopen_state *rs)
{
    throttle_group_put(rs->drv);
    rs->drv = NULL;
}

static const char *const throttle_strong_opts[] = { "throttle-group", NULL };
static const char *const throttle_reopen_keys[] = { "throttle-group", NULL };

static const struct bdrv bdrv_throttle = {
    .name = "throttle",
    .is_filter = true,
    .strong_opts = throttle_strong_opts,
    .open = throttle_open,
    .close = throttle_close,
    .submit = throttle_submit,
    .block_status = bnode_filter_block_status,
    .child_resized = bnode_filter_child_resized,
    .truncate = bnode_filter_truncate,
    .can_write_zeroes_fast = bnode_filter_can_write_zeroes_fast,
    .can_discard = bnode_filter_can_discard,
    .reopen_keys = throttle_reopen_keys,
    .reopen_prepare = throttle_reopen_prepare,
    .reopen_commit = throttle_reopen_commit,
    .reopen_abort = throttle_reopen_abort,
};
BDRV_REGISTER(bdrv_throttle)
