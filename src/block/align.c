/*
 * Unaligned requests on nodes with request_alignment > 1 (O_DIRECT).
 *
 * Theory of operation.  The kernel refuses O_DIRECT I/O whose offset,
 * length or memory is not a multiple of the node's alignment A, while
 * exports pass on whatever their clients ask.  bnode_submit() sends every
 * request on such a node through bnode_align_submit(), which lets aligned
 * ones through and takes over the others as an "align op" (allocated: this
 * is the slow path) that drives internal requests to the driver:
 *
 *   READ           read the covering aligned range into a bounce buffer,
 *                  copy the asked part out to the caller's iovecs;
 *   WRITE (range)  read-modify-write: read the partial head and tail blocks
 *                  into a bounce buffer of the aligned range, copy the
 *                  payload between them, write the aligned range;
 *   WRITE (memory) aligned range, unaligned buffers: copy and write;
 *   WRITE_ZEROES   RMW of the partial head/tail blocks, the aligned middle
 *                  zeroed natively;
 *   DISCARD        shrunk to its aligned part (discard is advisory).
 *
 * Serialisation.  An RMW must not interleave with another write to one of
 * its blocks: it would write back stale bytes around its payload.  Each
 * node keeps, under a mutex, a FIFO list of the writes it tracks (align ops
 * that write, by aligned range).  An op waits while an earlier listed op
 * overlaps it and one of the two is an RMW; FIFO order means nobody starves.
 * Aligned writes are not listed while no RMW is around: they bump an atomic
 * counter (fast_writes) and go straight to the driver, with no lock and no
 * allocation.  An RMW announces itself in rmw_count, then also waits for
 * fast_writes to drain; a write that sees rmw_count > 0 backs off and is
 * listed instead.  Both sides store first and load second (seq_cst), so at
 * least one of them sees the other.
 *
 * Threads.  A node may be used from several loops (exports on iothreads).
 * An op runs in its request's loop: its internal requests carry req->loop,
 * and a waiter is woken with loop_call(req->loop), whichever thread
 * released the range it waited for, so req->done runs there too.
 *
 * Memory.  Bounce buffers are as large as the request's aligned range (a
 * virtio-blk request may be 2 GiB; QEMU bounces whole requests too), and a
 * peer has many requests in flight, so their bytes are reserved from one
 * budget for all nodes (ALIGN_BOUNCE_BUDGET) before the buffer is
 * allocated.  A peer's request (BREQ_PEER, set by the exports) that does
 * not fit waits, before it holds anything (not listed, no buffer), in one
 * FIFO; releases start the waiters at its head that now fit, each in its
 * request's loop.  One larger than the whole budget starts once nothing
 * else holds any, alone.  The block layer's own requests (a driver's on
 * its child, a job's) reserve without waiting: one may be issued while
 * serving a peer's request that holds budget, which must not wait for it
 * (an op's internal requests drop BREQ_PEER).  So peers' bounce buffers
 * never hold more than the budget or one request, and the others are
 * bounded by the requests that issue them.  Ops that hold budget only wait
 * for each other's ranges and for fast writes, never for budget, so they
 * all finish.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "block/align.h"
#include "util/cleanup.h"
#include "util/loop.h"
#include "util/xalloc.h"

struct align_op;

/* Bounce buffers of all nodes together; BEXD_BOUNCE_BUDGET (environment,
 * bytes, read at the first bounce) lowers it for tests. */
#define ALIGN_BOUNCE_BUDGET (256ull << 20)

struct bnode_align {
    pthread_mutex_t lock;
    struct align_op *head, *tail;   /* tracked writes, in arrival order */
    unsigned rmw_count;             /* atomic: RMW ops listed */
    unsigned fast_writes;           /* atomic: unlisted writes in flight */
};

enum align_kind {
    AK_READ,           /* bounce read */
    AK_WRITE_BOUNCE,   /* aligned range, unaligned memory */
    AK_WRITE_RMW,
    AK_ZERO_RMW,
    AK_PASS,           /* the request as is, or shrunk (discard), but listed */
};

struct align_op {
    enum align_kind kind;
    struct breq *req;            /* the caller's */
    struct bnode *bs;
    struct bnode_align *al;
    uint64_t a;                  /* the node's alignment */
    uint64_t aoff, aend;         /* aligned range covered */
    bool tracked, rmw, waiting;  /* in the list; serialising; not yet started */
    struct align_op *next;       /* in the list */
    char *buf;                   /* aligned bounce buffer */
    size_t bsize;                /* its size, reserved from the budget */
    struct align_op *bnext;      /* waiting for budget */
    int stage;
    struct breq sub;             /* internal request to the driver */
    struct iovec iov;
};

/* ---- the bounce budget (see Memory above) ---- */

static struct {
    pthread_mutex_t lock;
    pthread_once_t once;
    uint64_t limit, used, peak;
    struct align_op *head, *tail;    /* waiting, in arrival order */
} bounce = { .lock = PTHREAD_MUTEX_INITIALIZER, .once = PTHREAD_ONCE_INIT };

static void bounce_init(void)
{
    const char *knob = getenv("BEXD_BOUNCE_BUDGET");
    unsigned long long v = knob ? strtoull(knob, NULL, 10) : 0;

    bounce.limit = v > 0 && v < ALIGN_BOUNCE_BUDGET ? v : ALIGN_BOUNCE_BUDGET;
}

/* Under bounce.lock: may `size` more bytes be reserved now? */
static bool bounce_fits(uint64_t size)
{
    return bounce.used == 0 || bounce.used + size <= bounce.limit;
}

static void bounce_reserve(uint64_t size)
{
    bounce.used += size;
    if (bounce.used > bounce.peak)
        bounce.peak = bounce.used;
}

void bnode_bounce_stats(uint64_t *used, uint64_t *peak, uint64_t *limit)
{
    pthread_once(&bounce.once, bounce_init);
    pthread_mutex_lock(&bounce.lock);
    *used = bounce.used;
    *peak = bounce.peak;
    *limit = bounce.limit;
    pthread_mutex_unlock(&bounce.lock);
}

static void op_begin(struct align_op *op);

static void op_begin_fn(void *opaque)
{
    op_begin(opaque);
}

/* Reserve op->bsize; false: op waits in the FIFO, op_begin() runs later in
 * its request's loop.  Only a peer's request waits: the block layer's own
 * (a driver's request on its child, issued while serving one that may
 * hold budget; a job's) take theirs at once, or an op holding budget could
 * wait for its own child's. */
static bool bounce_take(struct align_op *op, bool may_wait)
{
    bool ok;

    pthread_once(&bounce.once, bounce_init);
    pthread_mutex_lock(&bounce.lock);
    ok = !may_wait || (!bounce.head && bounce_fits(op->bsize));
    if (ok) {
        bounce_reserve(op->bsize);
    } else {
        op->bnext = NULL;
        if (bounce.tail)
            bounce.tail->bnext = op;
        else
            bounce.head = op;
        bounce.tail = op;
    }
    pthread_mutex_unlock(&bounce.lock);
    return ok;
}

static void bounce_give(uint64_t size)
{
    struct align_op *start = NULL, **last = &start;

    pthread_mutex_lock(&bounce.lock);
    bounce.used -= size;
    while (bounce.head && bounce_fits(bounce.head->bsize)) {
        struct align_op *w = bounce.head;
        bounce.head = w->bnext;
        if (!bounce.head)
            bounce.tail = NULL;
        bounce_reserve(w->bsize);
        w->bnext = NULL;
        *last = w;
        last = &w->bnext;
    }
    pthread_mutex_unlock(&bounce.lock);
    while (start) {
        struct align_op *w = start;
        start = w->bnext;
        loop_call(w->req->loop, op_begin_fn, w);
    }
}

static uint64_t round_down(uint64_t x, uint64_t a) { return x - x % a; }
static uint64_t round_up(uint64_t x, uint64_t a) { return round_down(x + a - 1, a); }

struct bnode_align *bnode_align_new(void)
{
    struct bnode_align *al = xzalloc(sizeof(*al));
    pthread_mutex_init(&al->lock, NULL);
    return al;
}

void bnode_align_free(struct bnode_align *al)
{
    if (!al)
        return;
    pthread_mutex_destroy(&al->lock);
    free(al);
}

/* ---- serialisation ---- */

static bool conflicts(const struct align_op *x, const struct align_op *y)
{
    return (x->rmw || y->rmw) && x->aoff < y->aend && y->aoff < x->aend;
}

/* Under lock: may op start, given the ops listed before `upto`? */
static bool may_start(struct bnode_align *al, struct align_op *op, struct align_op *upto)
{
    for (struct align_op *e = al->head; e && e != upto; e = e->next)
        if (conflicts(e, op))
            return false;
    return !op->rmw || __atomic_load_n(&al->fast_writes, __ATOMIC_SEQ_CST) == 0;
}

static void op_step(struct align_op *op);

static void op_resume(void *opaque)
{
    op_step(opaque);
}

/* Under lock: start every waiter nothing earlier holds back, in its loop. */
static void wake_ready(struct bnode_align *al)
{
    for (struct align_op *w = al->head; w; w = w->next) {
        if (w->waiting && may_start(al, w, w)) {
            w->waiting = false;
            loop_call(w->req->loop, op_resume, w);
        }
    }
}

static void op_admit(struct align_op *op)
{
    struct bnode_align *al = op->al;
    bool ready;

    pthread_mutex_lock(&al->lock);
    if (op->rmw)
        __atomic_add_fetch(&al->rmw_count, 1, __ATOMIC_SEQ_CST);
    ready = may_start(al, op, NULL);
    op->waiting = !ready;
    op->tracked = true;
    if (al->tail)
        al->tail->next = op;
    else
        al->head = op;
    al->tail = op;
    pthread_mutex_unlock(&al->lock);
    if (ready)
        op_step(op);
}

static void op_release(struct align_op *op)
{
    struct bnode_align *al = op->al;
    struct align_op *prev = NULL;

    pthread_mutex_lock(&al->lock);
    for (struct align_op *e = al->head; e; prev = e, e = e->next) {
        if (e == op) {
            if (prev)
                prev->next = op->next;
            else
                al->head = op->next;
            if (al->tail == op)
                al->tail = prev;
            break;
        }
    }
    if (op->rmw)
        __atomic_sub_fetch(&al->rmw_count, 1, __ATOMIC_SEQ_CST);
    wake_ready(al);
    pthread_mutex_unlock(&al->lock);
}

void bnode_align_fast_end(struct bnode_align *al)
{
    if (__atomic_sub_fetch(&al->fast_writes, 1, __ATOMIC_SEQ_CST) == 0 &&
        __atomic_load_n(&al->rmw_count, __ATOMIC_SEQ_CST) != 0) {
        pthread_mutex_lock(&al->lock);
        wake_ready(al);
        pthread_mutex_unlock(&al->lock);
    }
}

static bool fast_write_begin(struct bnode_align *al)
{
    __atomic_add_fetch(&al->fast_writes, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&al->rmw_count, __ATOMIC_SEQ_CST) == 0)
        return true;
    bnode_align_fast_end(al);        /* back off: an RMW may be waiting for us */
    return false;
}

/* ---- copies between the caller's iovecs and a bounce buffer ---- */

static void iov_to_buf(const struct breq *req, char *buf)
{
    uint64_t left = req->len;
    for (int i = 0; i < req->iovcnt && left; i++) {
        size_t n = MIN((uint64_t)req->iov[i].iov_len, left);
        memcpy(buf, req->iov[i].iov_base, n);
        buf += n;
        left -= n;
    }
}

static void buf_to_iov(const struct breq *req, const char *buf)
{
    uint64_t left = req->len;
    for (int i = 0; i < req->iovcnt && left; i++) {
        size_t n = MIN((uint64_t)req->iov[i].iov_len, left);
        memcpy(req->iov[i].iov_base, buf, n);
        buf += n;
        left -= n;
    }
}

static bool iov_aligned(const struct breq *req, uint64_t a)
{
    for (int i = 0; i < req->iovcnt; i++)
        if ((uintptr_t)req->iov[i].iov_base % a || req->iov[i].iov_len % a)
            return false;
    return true;
}

/* ---- the op's stages ---- */

static void op_finish(struct align_op *op, int ret)
{
    struct breq *req = op->req;

    if (op->tracked)
        op_release(op);
    free(op->buf);
    if (op->bsize)
        bounce_give(op->bsize);
    free(op);
    breq_complete(req, ret);
}

static void sub_done(struct breq *sub, int ret)
{
    struct align_op *op = sub->opaque;

    if (ret < 0) {
        op_finish(op, ret);
        return;
    }
    op->stage++;
    op_step(op);
}

/* Send one internal request; sub_done() moves to the next stage. */
static void sub_submit_iov(struct align_op *op, enum breq_op bop, unsigned flags,
                           uint64_t offset, uint64_t len, struct iovec *iov, int iovcnt)
{
    struct breq *s = &op->sub;

    memset(s, 0, sizeof(*s));
    s->op = bop;
    s->flags = flags & ~BREQ_PEER;    /* this op holds the budget already */
    s->offset = offset;
    s->len = len;
    s->iov = iov;
    s->iovcnt = iovcnt;
    s->loop = op->req->loop;
    s->done = sub_done;
    s->opaque = op;
    s->bs = op->bs;
    op->bs->drv->submit(op->bs, s, offset);
}

/* The same on [mem, mem+len) of the bounce buffer (NULL: no data). */
static void sub_submit(struct align_op *op, enum breq_op bop, unsigned flags,
                       uint64_t offset, uint64_t len, char *mem)
{
    op->iov = (struct iovec){ mem, mem ? len : 0 };
    sub_submit_iov(op, bop, flags, offset, len, mem ? &op->iov : NULL, mem ? 1 : 0);
}

static void step_read(struct align_op *op)
{
    if (op->stage == 0) {
        sub_submit(op, BREQ_READ, 0, op->aoff, op->aend - op->aoff, op->buf);
        return;
    }
    buf_to_iov(op->req, op->buf + (op->req->offset - op->aoff));
    op_finish(op, 0);
}

static void step_write_bounce(struct align_op *op)
{
    struct breq *req = op->req;

    if (op->stage == 0) {
        iov_to_buf(req, op->buf);
        sub_submit(op, BREQ_WRITE, req->flags & BREQ_FUA, req->offset, req->len, op->buf);
        return;
    }
    op_finish(op, 0);
}

/*
 * QEMU's pwritev_rmw_* events (bdrv_padding_rmw_read), raised on the node
 * whose alignment asked for the read-modify-write.  QEMU reads head and
 * tail in one request when the padded range is one block, or two blocks
 * both padded ("merge_reads"): then the head and tail events come before
 * that read and both after-events after it; otherwise each read has its
 * own pair.  bexd reads the two blocks separately, so for a merged pair
 * the events go before the first read and after the last.
 * At stage 0 (before the head read), 1 (before the tail read) and 2
 * (after both), with the stage's reads of this op.
 */
static void rmw_events(struct align_op *op, int at, bool head_read, bool tail_read)
{
    struct breq *req = op->req;
    uint64_t a = op->a, off = req->offset, end = off + req->len, sum = op->aend - op->aoff;
    bool h = off % a, t = end % a;
    bool merge = sum == ((sum > a && h && t) ? 2 * a : a);

    if (likely(!__atomic_load_n(&blkdebug_nodes, __ATOMIC_RELAXED)))
        return;
    if (merge) {
        if (at == 0) {
            if (h)
                bnode_debug_event_slow(op->bs, BLKDBG_PWRITEV_RMW_HEAD);
            if (t)
                bnode_debug_event_slow(op->bs, BLKDBG_PWRITEV_RMW_TAIL);
        } else if (at == 2) {
            if (h)
                bnode_debug_event_slow(op->bs, BLKDBG_PWRITEV_RMW_AFTER_HEAD);
            if (t)
                bnode_debug_event_slow(op->bs, BLKDBG_PWRITEV_RMW_AFTER_TAIL);
        }
        return;
    }
    if (at == 0 && head_read)
        bnode_debug_event_slow(op->bs, BLKDBG_PWRITEV_RMW_HEAD);
    if (at == 1 && head_read)
        bnode_debug_event_slow(op->bs, BLKDBG_PWRITEV_RMW_AFTER_HEAD);
    if (at == 1 && tail_read)
        bnode_debug_event_slow(op->bs, BLKDBG_PWRITEV_RMW_TAIL);
    if (at == 2 && tail_read)
        bnode_debug_event_slow(op->bs, BLKDBG_PWRITEV_RMW_AFTER_TAIL);
}

/* Stages: 0 read head block, 1 read tail block, 2 merge and write, 3 done. */
static void step_write_rmw(struct align_op *op)
{
    struct breq *req = op->req;
    uint64_t a = op->a, off = req->offset, end = off + req->len;
    bool head = off % a, tail = end % a && !(head && op->aend - op->aoff == a);

    switch (op->stage) {
    case 0:
        rmw_events(op, 0, head, tail);
        if (head) {
            sub_submit(op, BREQ_READ, 0, op->aoff, a, op->buf);
            return;
        }
        op->stage++;
        /* fall through */
    case 1:
        rmw_events(op, 1, head, tail);
        if (tail) {
            sub_submit(op, BREQ_READ, 0, op->aend - a, a, op->buf + (op->aend - a - op->aoff));
            return;
        }
        op->stage++;
        /* fall through */
    case 2:
        rmw_events(op, 2, head, tail);
        iov_to_buf(req, op->buf + (off - op->aoff));
        sub_submit(op, BREQ_WRITE, req->flags & BREQ_FUA, op->aoff, op->aend - op->aoff,
                   op->buf);
        return;
    default:
        op_finish(op, 0);
    }
}

/* Blocks [aoff, aoff+a) (head, in buf) and [aend-a, aend) (tail, in buf+a)
 * are zeroed in part by RMW; [round_up(off), round_down(end)) natively.
 * Stages: 0/1 read head/tail, 2/3 write head/tail, 4 zero the middle. */
static void step_zero_rmw(struct align_op *op)
{
    struct breq *req = op->req;
    uint64_t a = op->a, off = req->offset, end = off + req->len;
    bool head = off % a, tail = end % a && !(head && op->aend - op->aoff == a);
    uint64_t mid = round_up(off, a), mid_end = round_down(end, a);
    unsigned fua = req->flags & BREQ_FUA;
    char *hb = op->buf, *tb = op->buf + a;

    switch (op->stage) {
    case 0:
        rmw_events(op, 0, head, tail);
        if (head) {
            sub_submit(op, BREQ_READ, 0, op->aoff, a, hb);
            return;
        }
        op->stage++;
        /* fall through */
    case 1:
        rmw_events(op, 1, head, tail);
        if (tail) {
            sub_submit(op, BREQ_READ, 0, op->aend - a, a, tb);
            return;
        }
        op->stage++;
        /* fall through */
    case 2:
        rmw_events(op, 2, head, tail);
        if (head) {
            memset(hb + (off - op->aoff), 0, MIN(end, op->aoff + a) - off);
            sub_submit(op, BREQ_WRITE, fua, op->aoff, a, hb);
            return;
        }
        op->stage++;
        /* fall through */
    case 3:
        if (tail) {
            memset(tb, 0, end - (op->aend - a));
            sub_submit(op, BREQ_WRITE, fua, op->aend - a, a, tb);
            return;
        }
        op->stage++;
        /* fall through */
    case 4:
        if (mid_end > mid) {
            sub_submit(op, BREQ_WRITE_ZEROES, req->flags, mid, mid_end - mid, NULL);
            return;
        }
        op->stage++;
        /* fall through */
    default:
        op_finish(op, 0);
    }
}

/* A listed write sent as it is (iovecs included), or a shrunk discard. */
static void step_pass(struct align_op *op)
{
    struct breq *req = op->req;

    if (op->stage == 0) {
        sub_submit_iov(op, req->op, req->flags, op->aoff, op->aend - op->aoff,
                       req->iov, req->iovcnt);
        return;
    }
    op_finish(op, 0);
}

static void op_step(struct align_op *op)
{
    switch (op->kind) {
    case AK_READ:         step_read(op); return;
    case AK_WRITE_BOUNCE: step_write_bounce(op); return;
    case AK_WRITE_RMW:    step_write_rmw(op); return;
    case AK_ZERO_RMW:     step_zero_rmw(op); return;
    case AK_PASS:         step_pass(op); return;
    }
}

/* ---- entry ---- */

static size_t buf_size(enum align_kind kind, uint64_t a, uint64_t aoff, uint64_t aend)
{
    switch (kind) {
    case AK_ZERO_RMW: return 2 * a;
    case AK_PASS:     return 0;
    default:          return aend - aoff;
    }
}

/* Take req over as an op of `kind` covering [aoff, aend). */
static bool op_start(struct bnode *bs, struct breq *req, enum align_kind kind,
                     uint64_t aoff, uint64_t aend)
{
    uint64_t a = bs->request_alignment;
    size_t size = buf_size(kind, a, aoff, aend);
    struct align_op *op = xzalloc(sizeof(*op));

    *op = (struct align_op){ .kind = kind, .req = req, .bs = bs, .al = bs->align,
                             .a = a, .aoff = aoff, .aend = aend, .bsize = size,
                             .rmw = kind == AK_WRITE_RMW || kind == AK_ZERO_RMW };
    if (!size || bounce_take(op, req->flags & BREQ_PEER))
        op_begin(op);
    return true;
}

/* The op's budget is reserved: allocate its buffer and start it. */
static void op_begin(struct align_op *op)
{
    void *buf = NULL;

    if (op->bsize && posix_memalign(&buf, MAX(op->a, (uint64_t)4096), op->bsize)) {
        struct breq *req = op->req;
        bounce_give(op->bsize);
        free(op);
        breq_complete(req, -ENOMEM);
        return;
    }
    op->buf = buf;
    if (op->kind == AK_READ)
        op_step(op);                 /* reads are never held back */
    else
        op_admit(op);
}

static bool plain_write(struct bnode *bs, struct breq *req)
{
    if (fast_write_begin(bs->align)) {
        req->align_track = bs->align;
        return false;
    }
    return op_start(bs, req, AK_PASS, req->offset, req->offset + req->len);
}

bool bnode_align_submit(struct bnode *bs, struct breq *req)
{
    uint64_t a = bs->request_alignment;
    uint64_t off = req->offset, end = off + req->len;
    bool range_ok = off % a == 0 && end % a == 0;

    switch (req->op) {
    case BREQ_READ:
        if (range_ok && iov_aligned(req, a))
            return false;
        return op_start(bs, req, AK_READ, round_down(off, a), round_up(end, a));
    case BREQ_WRITE:
        if (!range_ok)
            return op_start(bs, req, AK_WRITE_RMW, round_down(off, a), round_up(end, a));
        if (!iov_aligned(req, a))
            return op_start(bs, req, AK_WRITE_BOUNCE, off, end);
        return plain_write(bs, req);
    case BREQ_WRITE_ZEROES:
        if (!range_ok)
            return op_start(bs, req, AK_ZERO_RMW, round_down(off, a), round_up(end, a));
        return plain_write(bs, req);
    case BREQ_DISCARD:
        if (range_ok)
            return plain_write(bs, req);
        if (round_down(end, a) <= round_up(off, a)) {
            breq_complete(req, 0);   /* nothing aligned left to discard */
            return true;
        }
        return op_start(bs, req, AK_PASS, round_up(off, a), round_down(end, a));
    default:
        return false;
    }
}
