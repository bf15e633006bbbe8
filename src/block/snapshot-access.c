/*
 * Driver "snapshot-access" (QEMU 7.2): the point-in-time view a
 * copy-before-write node keeps, as a node of its own (export it, read it).
 * Reads come from the filter's target where a cluster was copied and from
 * its source elsewhere (cbw.c keeps writers off what is being read);
 * discards drop clusters the reader no longer needs, freeing the target;
 * writes are not supported.  Each read or discard runs as a coroutine in
 * the request's loop.
 */
#include <errno.h>
#include <string.h>
#include "block/block.h"
#include "block/cbw.h"
#include "util/coroutine.h"
#include "util/xalloc.h"

static int sa_open(struct bnode *bs, json_t *opts, error **errp)
{
    bs->size = bs->file->size;
    return 0;
}

struct sa_req {
    struct bnode *bs;
    struct breq *req;
    uint64_t offset;
};

static void read_co(void *opaque)
{
    struct sa_req *r = opaque;
    struct breq *req = r->req;
    struct cbw *s = cbw_of(r->bs->file);
    /* a reader that copies in its own loop (an NBD client on a worker
     * loop) has that done for the reads of the snapshot too: handing each
     * cluster run to the copy pool cost more thread switches than copying */
    unsigned flags = req->flags & BREQ_COPY_INLINE;
    int ret;

    if (!s) {
        ret = -ENOTSUP;
    } else if (req->iovcnt == 1) {
        ret = cbw_co_snapshot_read(s, r->offset, req->len, req->iov[0].iov_base, flags);
    } else {
        char *buf = xmalloc_io(req->len);
        ret = cbw_co_snapshot_read(s, r->offset, req->len, buf, flags);
        for (int i = 0, at = 0; ret == 0 && i < req->iovcnt; at += req->iov[i].iov_len, i++)
            memcpy(req->iov[i].iov_base, buf + at, req->iov[i].iov_len);
        free(buf);
    }
    free(r);
    breq_complete(req, ret);
}

static void discard_co(void *opaque)
{
    struct sa_req *r = opaque;
    struct breq *req = r->req;
    struct cbw *s = cbw_of(r->bs->file);
    int ret = s ? cbw_co_snapshot_discard(s, r->offset, req->len) : -ENOTSUP;
    free(r);
    breq_complete(req, ret);
}

static void start(struct bnode *bs, struct breq *req, uint64_t offset, co_fn *fn)
{
    struct sa_req *r = xmalloc(sizeof(*r));
    *r = (struct sa_req){ .bs = bs, .req = req, .offset = offset };
    co_enter(co_create(fn, r));
}

static void sa_submit(struct bnode *bs, struct breq *req, uint64_t offset)
{
    switch (req->op) {
    case BREQ_READ:
        start(bs, req, offset, read_co);
        break;
    case BREQ_DISCARD:
        start(bs, req, offset, discard_co);
        break;
    case BREQ_FLUSH:
        breq_complete(req, 0);
        break;
    default:
        breq_complete(req, -ENOTSUP);
        break;
    }
}

static int sa_block_status(struct bnode *bs, uint64_t offset, uint64_t bytes,
                           uint64_t *pnum, unsigned *flags)
{
    struct cbw *s = cbw_of(bs->file);
    if (!s)
        return -ENOTSUP;
    return cbw_snapshot_block_status(s, offset, bytes, pnum, flags);
}

/* QEMU's snapshot_access_child_perm: it reads through the filter's own
 * snapshot API, so it takes nothing of its child and shares everything. */
static void sa_child_perm(struct bnode *bs, uint64_t *perm, uint64_t *shared)
{
    *perm = 0;
    *shared = PERM_ALL;
}

static const struct bdrv bdrv_snapshot_access = {
    .filename_rule = FNAME_FILE_CHILD,
    .name = "snapshot-access",
    .is_filter = true,
    .open = sa_open,
    .submit = sa_submit,
    .block_status = sa_block_status,
    .child_perm = sa_child_perm,
};
BDRV_REGISTER(bdrv_snapshot_access)
