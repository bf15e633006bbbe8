/*
 * FUSE export: unaligned requests on nodes that need alignment.
 *
 * A node opened with O_DIRECT (cache.direct=on) takes only requests whose
 * offset, length and memory are multiples of its request_alignment, while
 * FUSE passes on whatever the application asked (a buffered write of 100
 * bytes at offset 10 arrives as exactly that).  QEMU's block layer hides
 * this; here the export does it for itself:
 *
 *  - a read is widened to aligned bounds, and the reply is cut out of the
 *    middle of the aligned buffer;
 *  - a write copies its payload into an aligned work buffer, reads the
 *    partial head and tail blocks into scratch space after it, merges their
 *    outer parts around the payload and writes the aligned range.
 *
 * Read-modify-write cycles run one at a time per export (a FIFO), so that
 * two of them never interleave their read and write of a shared block.
 * Buffered writes, where unaligned requests come from, are serialized by
 * the kernel anyway.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "export/fuse/fuse-export.h"
#include "util/cleanup.h"

static uint64_t align_of(struct fuse_export *exp)
{
    uint32_t a = exp->common.node->request_alignment;
    return a > 1 ? a : 1;
}

bool fuse_needs_rmw(struct fuse_export *exp, uint64_t off, uint64_t len)
{
    uint64_t a = align_of(exp);
    return a > 1 && (off % a || len % a);
}

/* ---- reads ---- */

static void rmw_read_done(struct breq *b, int ret)
{
    struct fuse_ioreq *r = b->opaque;

    if (ret < 0)
        fuse_reply_err(r->req, -ret);
    else
        fuse_reply_buf(r->req, (char *)r->iov.iov_base + r->rmw_skip, r->user_len);
    fuse_ioreq_put(r);
}

void fuse_rmw_read(struct fuse_ioreq *r, uint64_t off, size_t len)
{
    uint64_t a = align_of(r->exp);
    uint64_t size = r->exp->common.node->size;
    uint64_t aoff = off - off % a;
    uint64_t aend = MIN((off + len + a - 1) / a * a, size);

    if (fuse_ioreq_alloc(r, aend - aoff) < 0) {
        fuse_reply_err(r->req, ENOMEM);
        fuse_ioreq_put(r);
        return;
    }
    r->rmw_skip = off - aoff;
    r->user_len = len;
    fuse_ioreq_submit(r, BREQ_READ, 0, aoff, aend - aoff, rmw_read_done);
}

/* ---- writes ---- */

static void rmw_step(struct fuse_ioreq *r);

static void rmw_next_in_queue(struct fuse_export *exp)
{
    struct fuse_ioreq *next = exp->rmw_queue;

    if (!next) {
        exp->rmw_busy = false;
        return;
    }
    exp->rmw_queue = next->rmw_next;
    if (!exp->rmw_queue)
        exp->rmw_tail = NULL;
    rmw_step(next);
}

static void rmw_finish(struct fuse_ioreq *r, int ret)
{
    struct fuse_export *exp = r->exp;

    if (ret < 0)
        fuse_reply_err(r->req, -ret);
    else
        fuse_reply_write(r->req, r->user_len);
    fuse_ioreq_put(r);
    rmw_next_in_queue(exp);
}

static void rmw_done(struct breq *b, int ret)
{
    struct fuse_ioreq *r = b->opaque;

    if (ret < 0) {
        rmw_finish(r, ret);
        return;
    }
    r->rmw_stage++;
    rmw_step(r);
}

/* Stages: 0 read head block, 1 read tail block, 2 merge and write, 3 done. */
static void rmw_step(struct fuse_ioreq *r)
{
    uint64_t a = align_of(r->exp);
    uint64_t off = r->offset, end = off + r->user_len;
    uint64_t aoff = off - off % a, aend = (end + a - 1) / a * a;
    char *work = r->rmw_work, *head = work + (aend - aoff), *tail = head + a;
    bool one_block = aend - aoff == a;

    switch (r->rmw_stage) {
    case 0:
        if (off % a) {
            r->iov = (struct iovec){ head, a };
            fuse_ioreq_submit(r, BREQ_READ, 0, aoff, a, rmw_done);
            return;
        }
        r->rmw_stage = 1;
        /* fall through */
    case 1:
        if (end % a && !(one_block && off % a)) {
            r->iov = (struct iovec){ tail, a };
            fuse_ioreq_submit(r, BREQ_READ, 0, aend - a, a, rmw_done);
            return;
        }
        r->rmw_stage = 2;
        /* fall through */
    case 2:
        if (off % a)
            memcpy(work, head, off - aoff);
        if (end % a) {
            const char *src = (one_block && off % a) ? head : tail;
            memcpy(work + (end - aoff), src + (end - (aend - a)), aend - end);
        }
        r->iov = (struct iovec){ work, aend - aoff };
        fuse_ioreq_submit(r, BREQ_WRITE, r->exp->common.writethrough ? BREQ_FUA : 0,
                          aoff, aend - aoff, rmw_done);
        return;
    default:
        rmw_finish(r, 0);
        return;
    }
}

void fuse_rmw_write(struct fuse_ioreq *r)
{
    struct fuse_export *exp = r->exp;
    uint64_t a = align_of(exp);
    uint64_t off = r->offset, len = r->iov.iov_len, end = off + len;
    uint64_t aoff = off - off % a, aend = (end + a - 1) / a * a;
    void *work = NULL;

    /* work: [aligned range][head scratch][tail scratch] */
    if (posix_memalign(&work, MAX(a, (uint64_t)FUSE_BUF_ALIGN), (aend - aoff) + 2 * a)) {
        fuse_reply_err(r->req, ENOMEM);
        fuse_ioreq_put(r);
        return;
    }
    memcpy((char *)work + (off - aoff), r->iov.iov_base, len);
    r->rmw_work = work;
    r->user_len = len;
    r->rmw_stage = 0;
    if (exp->rmw_busy) {
        r->rmw_next = NULL;
        if (exp->rmw_tail)
            exp->rmw_tail->rmw_next = r;
        else
            exp->rmw_queue = r;
        exp->rmw_tail = r;
        return;
    }
    exp->rmw_busy = true;
    rmw_step(r);
}
