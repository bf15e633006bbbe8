/*
 * FUSE export: the session served by the export's loops.
 *
 * Theory of operation.  The session is served by queues (struct
 * fuse_queue), one per loop: a single-threaded export has one, on the
 * export's loop; a multi-threaded one (`iothread` given as a list) one per
 * iothread.  Queue 0 reads the session's /dev/fuse fd; every other queue
 * reads a clone of it (FUSE_DEV_IOC_CLONE): the kernel hands each request
 * to whichever fd reads it first, and takes its reply only on that fd.
 * Each fd is non-blocking and watched by its queue's loop.  Each readable
 * event reads up to FUSE_RX_BATCH requests with fuse_session_receive_buf()
 * and hands each to fuse_session_process_buf(), which calls the operation
 * in fuse-ops.c.  An operation either replies at once or takes a request
 * slot (struct fuse_ioreq), submits a struct breq to the block layer of
 * its queue's loop and returns; the breq completion replies with
 * fuse_reply_*.  No thread per request, no blocking read.
 *
 * libfuse reads and writes through the session's custom I/O (fuse_io_read,
 * fuse_io_writev): a read goes to the fd of the queue receiving, a reply to
 * the fd of the queue whose loop sends it, or into its io_uring entry when
 * the request came over FUSE io_uring (fuse-uring.c).  With io_uring, the
 * INIT reply also asks the kernel for it (FUSE_OVER_IO_URING), and the
 * queues register their ring entries once the kernel has taken that reply;
 * /dev/fuse still carries INIT, FORGET and INTERRUPT, and everything when
 * the kernel refuses the rings (it then falls back by itself).
 *
 * Buffers.  Every buffer of a queue is a page-aligned receive buffer of
 * FUSE_RX_ALLOC bytes (q->rx_buf).  libfuse reads a request into it at
 * FUSE_RX_SKEW (q->fbuf.mem): the WRITE headers (fuse_in_header and
 * fuse_write_in) end on the page boundary, so a WRITE's payload starts
 * page-aligned, as O_DIRECT nodes need it.  A WRITE keeps its payload where
 * the kernel put it: the request slot takes the whole receive buffer (the
 * allocation, not fbuf.mem) and the next receive gets another from the pool,
 * so data is never copied, on O_DIRECT nodes too.  READs borrow a pooled
 * buffer for the data they return, from its start.  Slots and buffers go
 * back to small per-queue free lists, so a steady workload allocates
 * nothing.  Over io_uring both use the ring entry's payload buffer (page-
 * aligned, apart from the headers), which stays the request's until its
 * reply.  A payload that still had to be copied for alignment is counted
 * in the queue's write-copied-bytes (none is, with the kernel's layout).
 *
 * Moving (x-blockdev-set-iothread; one queue over /dev/fuse): the main
 * thread asks the queue's loop to quiesce it.  The loop stops watching the
 * fd (the kernel keeps new requests queued), answers the requests in
 * flight, then (from a call of its own, so the last completion has
 * returned) hands the queue to the main thread, which sets its loop and
 * posts it there; the new loop watches the fd again and serves what the
 * kernel queued meanwhile.  A shutdown that comes during a move waits for
 * its end.
 *
 * Shutdown.  fuse_session_stop() (main thread) asks each queue's loop to
 * stop reading; requests already handed to the block layer are still
 * answered.  When every queue has none left, each queue's loop closes its
 * io_uring rings (the thread that submitted their commands: see
 * fuse_ring_close_in_loop), then the main thread unmounts, destroys the
 * session and reports export_shutdown_done().  Requests the kernel still
 * holds are failed by the kernel (ENOTCONN) once the session fds are
 * closed.
 */
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <linux/fuse.h>
#include "export/fuse/fuse-export.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/xalloc.h"

#ifndef FUSE_DEV_IOC_CLONE
#define FUSE_DEV_IOC_CLONE _IOR(229, 0, uint32_t)
#endif
#define FUSE_OVER_IO_URING_FLAGS2 (1u << (41 - 32))   /* FUSE_OVER_IO_URING in flags2 */

/* Receive buffers (see Buffers above).  A WRITE request is the two headers
 * and then its payload; reading it at FUSE_RX_SKEW puts the payload on a
 * page.  One read fills at most FUSE_RX_LEN bytes (libfuse asks for its
 * bufsize, max_pages of payload plus a page for headers; the kernel sends
 * at most max_write of payload). */
#define FUSE_WRITE_HDRS (sizeof(struct fuse_in_header) + sizeof(struct fuse_write_in))
#define FUSE_RX_SKEW    (FUSE_BUF_ALIGN - FUSE_WRITE_HDRS)
#define FUSE_RX_LEN     ((size_t)FUSE_RW_MAX + FUSE_BUF_ALIGN)
#define FUSE_RX_ALLOC   (FUSE_RX_SKEW + FUSE_RX_LEN)
_Static_assert(FUSE_WRITE_HDRS == 80, "the WRITE headers of FUSE protocol 7.9+");

static __thread struct fuse_queue *cur_q;

struct fuse_queue *fuse_current_queue(void)
{
    return cur_q;
}

/* The queue of this export served by the calling thread's loop, or NULL. */
static struct fuse_queue *queue_here(struct fuse_export *exp)
{
    struct loop *l;

    if (cur_q && cur_q->exp == exp)
        return cur_q;
    l = loop_current();
    for (unsigned i = 0; l && i < exp->nqueues; i++)
        if (exp->queues[i].loop == l)
            return &exp->queues[i];
    return NULL;
}

/* ---- buffer pool (queue's loop) ---- */

/* An idle buffer of FUSE_RX_ALLOC bytes, page-aligned, or NULL. */
static void *buf_pool_get(struct fuse_queue *q)
{
    void *b = q->buf_pool;
    if (b) {
        q->buf_pool = *(void **)b;
        q->buf_pool_len--;
    }
    return b;
}

/* A buffer of FUSE_RX_ALLOC bytes, page-aligned: from the pool, else new. */
static char *buf_get(struct fuse_queue *q)
{
    void *b = buf_pool_get(q);

    if (!b && posix_memalign(&b, FUSE_BUF_ALIGN, FUSE_RX_ALLOC))
        xalloc_die();
    return b;
}

static void buf_pool_put(struct fuse_queue *q, void *b)
{
    if (!b)
        return;
    if (q->buf_pool_len >= FUSE_POOL_KEEP) {
        free(b);
        return;
    }
    *(void **)b = q->buf_pool;
    q->buf_pool = b;
    q->buf_pool_len++;
}

/* ---- request slots (queue's loop) ---- */

struct fuse_ioreq *fuse_ioreq_get(struct fuse_export *exp, fuse_req_t req)
{
    struct fuse_queue *q = queue_here(exp);
    struct fuse_ioreq *r;

    if (!q)
        q = &exp->queues[0];
    r = q->req_pool;
    if (r) {
        q->req_pool = r->next_free;
        q->req_pool_len--;
    } else {
        r = xmalloc(sizeof(*r));
    }
    memset(r, 0, sizeof(*r));
    r->exp = exp;
    r->q = q;
    r->req = req;
    q->inflight++;
    return r;
}

static void fuse_rx_resume(struct fuse_queue *q);

void fuse_ioreq_put(struct fuse_ioreq *r)
{
    struct fuse_queue *q = r->q;

    buf_pool_put(q, r->mem);
    r->mem = NULL;
    if (q->req_pool_len < FUSE_POOL_KEEP) {
        r->next_free = q->req_pool;
        q->req_pool = r;
        q->req_pool_len++;
    } else {
        free(r);
    }
    q->inflight--;
    fuse_rx_resume(q);
    fuse_queue_maybe_drained(q);
}

int fuse_ioreq_take_data(struct fuse_ioreq *r, const void *data, size_t len)
{
    struct fuse_queue *q = r->q;
    const char *d = data;
    const char *mem = q->fbuf.mem;
    /* O_DIRECT nodes need memory aligned to their request alignment; the
     * payloads of both transports start on a page (see Buffers above). */
    uint32_t a = r->exp->common.node->request_alignment;
    bool aligned = a <= 1 || (a <= FUSE_BUF_ALIGN && ((uintptr_t)d & (a - 1)) == 0);

    if (q->ur && cur_q == q && aligned) {
        /* Over io_uring the payload stays in the ring entry until the
         * reply. */
        size_t size;
        char *p = fuse_uring_current_payload(q->ur, &size);
        if (p && d >= p && d + len <= p + size) {
            r->mem = NULL;
            r->iov.iov_base = (void *)data;
            r->iov.iov_len = len;
            return 0;
        }
    }
    if (aligned && q->rx_buf && mem && !(q->fbuf.flags & FUSE_BUF_IS_FD) &&
        d >= mem && d + len <= mem + q->fbuf.size) {
        r->mem = q->rx_buf;           /* steal: the next receive uses another */
        q->rx_buf = NULL;
        q->fbuf.mem = NULL;
        r->iov.iov_base = (void *)data;
        r->iov.iov_len = len;
        return 0;
    }
    if (fuse_ioreq_alloc(r, len) < 0)
        return -ENOMEM;
    memcpy(r->iov.iov_base, data, len);
    client_stats_copied(&q->st, len);
    return 0;
}

int fuse_ioreq_alloc(struct fuse_ioreq *r, size_t len)
{
    struct fuse_queue *q = r->q;
    void *b;

    if (q->ur && cur_q == q) {
        /* Over io_uring, read into the ring entry's payload: the reply
         * then needs no copy of ours. */
        size_t size;
        void *p = fuse_uring_current_payload(q->ur, &size);
        if (p && len <= size) {
            r->mem = NULL;
            r->iov.iov_base = p;
            r->iov.iov_len = len;
            return 0;
        }
    }
    if (len > FUSE_RX_ALLOC)
        return -EINVAL;         /* never: reads and writes are at most FUSE_RW_MAX */
    /* A receive buffer from its start: page-aligned, as O_DIRECT nodes
     * need; it goes back to the pool with the request. */
    b = buf_get(q);
    r->mem = b;
    r->iov.iov_base = b;
    r->iov.iov_len = len;
    return 0;
}

static void fuse_ioreq_done(struct breq *b, int ret)
{
    struct fuse_ioreq *r = b->opaque;
    client_stats_account(&r->q->st, client_op_of(b->op), b->len, b->acct_lat_ns,
                         ret == -ENOTSUP && b->op == BREQ_DISCARD ? 0 : ret);
    r->breq_done(b, ret);
}

void fuse_ioreq_submit(struct fuse_ioreq *r, enum breq_op op, unsigned flags,
                       uint64_t offset, uint64_t len,
                       void (*done)(struct breq *, int))
{
    struct breq *b = &r->breq;

    memset(b, 0, sizeof(*b));
    b->op = op;
    b->flags = flags | BREQ_PEER;
    b->offset = offset;
    b->len = len;
    if (op == BREQ_READ || op == BREQ_WRITE) {
        b->iov = &r->iov;
        b->iovcnt = 1;
    }
    b->loop = r->q->loop;
    b->done = fuse_ioreq_done;
    b->opaque = r;
    r->breq_done = done;
    bnode_submit(r->exp->common.node, b);
}

static void queue_free_pools(struct fuse_queue *q)
{
    void *b;
    while ((b = buf_pool_get(q)))
        free(b);
    while (q->req_pool) {
        struct fuse_ioreq *r = q->req_pool;
        q->req_pool = r->next_free;
        free(r);
    }
    q->req_pool_len = 0;
    free(q->rx_buf);
    q->rx_buf = NULL;
    q->fbuf.mem = NULL;
}

/* ---- the session's I/O (libfuse calls these in the queue's thread) ---- */

static ssize_t fuse_io_read(int fd, void *buf, size_t len, void *userdata)
{
    struct fuse_queue *q = queue_here(userdata);

    /* Our receive buffer holds FUSE_RX_LEN bytes from fbuf.mem (libfuse
     * asks for as much, or more should its bufsize ever grow: the kernel
     * fills no more than max_write and the headers). */
    if (q && buf == q->fbuf.mem && len > FUSE_RX_LEN)
        len = FUSE_RX_LEN;
    return read(q ? q->fd : fd, buf, len);   /* libfuse reads errno itself */
}

/* INIT reply: ask for FUSE over io_uring (libfuse 3.14 cannot). */
static void patch_init_reply(struct fuse_export *exp, struct iovec *iov, int count)
{
    struct fuse_out_header *oh = iov[0].iov_base;
    struct fuse_init_out *out;

    if (oh->error || count < 2 || iov[1].iov_len < offsetof(struct fuse_init_out, flags2) +
                                                  sizeof(uint32_t))
        return;
    out = iov[1].iov_base;
    out->flags |= FUSE_INIT_EXT;
    out->flags2 |= FUSE_OVER_IO_URING_FLAGS2;
}

static void register_in_loop(void *opaque)
{
    struct fuse_queue *q = opaque;
    if (!q->stopping && q->ur)
        fuse_uring_register(q);
}

static ssize_t fuse_io_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    struct fuse_export *exp = userdata;
    struct fuse_queue *q = queue_here(exp);
    struct fuse_out_header *oh = iov[0].iov_base;
    bool init = false;
    ssize_t ret;

    if (q && q->ur && oh->unique && fuse_uring_reply(q->ur, iov, count, &ret))
        return ret;
    if (exp->want_uring && oh->unique && oh->unique == exp->init_unique) {
        exp->init_unique = 0;
        patch_init_reply(exp, iov, count);
        init = true;
    }
    /* Notifications (unique 0) may go on any fd of the session; a reply
     * only on the fd that read its request. */
    ret = writev(q ? q->fd : fd, iov, count);
    if (init && ret >= 0) {
        /* The kernel took the INIT reply: the rings may register now. */
        for (unsigned i = 0; i < exp->nqueues; i++) {
            if (exp->queues[i].loop == loop_current())
                register_in_loop(&exp->queues[i]);
            else
                loop_call(exp->queues[i].loop, register_in_loop, &exp->queues[i]);
        }
    }
    return ret;
}

static const struct fuse_custom_io fuse_export_io = {
    .read = fuse_io_read,
    .writev = fuse_io_writev,
};

/* ---- receiving ---- */

void fuse_queue_process(struct fuse_queue *q, struct fuse_buf *buf)
{
    struct fuse_export *exp = q->exp;
    struct fuse_queue *outer = cur_q;

    if (exp->want_uring && buf->size >= sizeof(struct fuse_in_header)) {
        const struct fuse_in_header *ih = buf->mem;
        if (ih->opcode == FUSE_INIT)
            exp->init_unique = ih->unique;
    }
    /* Count this request in flight while processing, so that a reply made
     * inside cannot make a stopping queue look drained too early. */
    q->inflight++;
    cur_q = q;
    fuse_session_process_buf(exp->se, buf);
    cur_q = outer;
    q->inflight--;
    fuse_queue_maybe_drained(q);
}

static void fuse_stop_watching(struct fuse_queue *q)
{
    if (q->watch) {
        loop_watch_del(q->watch);
        q->watch = NULL;
    }
}

/* Returns false when no more requests should be read now. */
static bool fuse_receive_one(struct fuse_queue *q)
{
    struct fuse_export *exp = q->exp;
    struct fuse_queue *outer = cur_q;
    int ret;

    /* Ours, never libfuse's: it would malloc one without the skew. */
    if (!q->rx_buf)
        q->rx_buf = buf_get(q);
    q->fbuf.mem = q->rx_buf + FUSE_RX_SKEW;
    q->fbuf.size = 0;
    q->fbuf.flags = 0;
    cur_q = q;                               /* fuse_io_read reads q->fd */
    ret = fuse_session_receive_buf(exp->se, &q->fbuf);
    cur_q = outer;
    if (ret == -EINTR)
        return true;
    if (ret == -EAGAIN)
        return false;
    if (ret <= 0 || fuse_session_exited(exp->se)) {
        /* 0: the kernel says ENODEV (unmounted behind our back); anything
         * else is an fd we can no longer use.  Stop watching, else the
         * loop would spin on a permanently readable fd. */
        log_warn("FUSE export '%s': session on '%s' ended (%s)",
                 exp->common.id, exp->mountpoint,
                 ret < 0 ? strerror(-ret) : "unmounted");
        fuse_stop_watching(q);
        if (q->ur)
            fuse_uring_stop(q->ur);
        return false;
    }
    q->n_dev++;
    fuse_queue_process(q, &q->fbuf);
    return !q->stopping;
}

/* A request was answered: read again if the limit had paused the fd. */
static void fuse_rx_resume(struct fuse_queue *q)
{
    if (q->rx_paused && q->inflight < q->exp->max_inflight) {
        q->rx_paused = false;
        if (q->watch)
            loop_watch_set(q->watch, LOOP_IN);
    }
}

/*
 * Reading until the fd runs dry batches a deep queue's requests into one
 * submission to the disk (one doorbell for many).  A client that has one
 * request at a time (qd 1) pays a read failing with EAGAIN for each, in
 * front of the submission of its I/O (the loop submits after this).  So
 * once a batch brought one request that then waited for its I/O alone and
 * the next read found nothing, read one request per readable event while
 * that request is the only one in flight; the first batch with a second
 * request goes back to reading until dry.
 */
static void fuse_rx_batch(struct fuse_queue *q, bool until_dry)
{
    int got = 0;

    for (int i = 0; i < FUSE_RX_BATCH && q->watch; i++) {
        if (q->inflight >= q->exp->max_inflight) {
            q->rx_paused = true;      /* fuse_rx_resume() watches it again */
            loop_watch_set(q->watch, 0);
            break;
        }
        if (!fuse_receive_one(q)) {
            if (got == 1 && q->inflight == 1)
                q->rx_lone = true;
            break;
        }
        if (++got > 1)
            q->rx_lone = false;
        else if (q->rx_lone && q->inflight == 1 && !until_dry)
            break;
    }
}

static void fuse_on_readable(void *opaque, uint32_t revents)
{
    fuse_rx_batch(opaque, false);
}

static void poll_queue_now(struct fuse_queue *q)
{
    if (q->ur && !q->stopping)
        fuse_uring_poll(q->ur);
    if (q->watch)
        fuse_rx_batch(q, true);     /* callers want all that is queued */
}

/* poll_queue_now() run in another queue's loop, waited for by the caller;
 * whichever of the two lets go last frees it. */
struct poll_sync {
    struct fuse_queue *q;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool done;
    int refs;
};

static void poll_sync_put(struct poll_sync *ps)
{
    pthread_mutex_lock(&ps->lock);
    bool last = --ps->refs == 0;
    pthread_mutex_unlock(&ps->lock);
    if (last) {
        pthread_mutex_destroy(&ps->lock);
        pthread_cond_destroy(&ps->cond);
        free(ps);
    }
}

static void poll_sync_run(void *opaque)
{
    struct poll_sync *ps = opaque;
    poll_queue_now(ps->q);
    pthread_mutex_lock(&ps->lock);
    ps->done = true;
    pthread_cond_signal(&ps->cond);
    pthread_mutex_unlock(&ps->lock);
    poll_sync_put(ps);
}

/*
 * Take what the kernel has queued on every queue.  A queue served by
 * another loop (an iothread) does it in that loop, and the caller waits
 * for it, at most POLL_SYNC_MS in all: a RELEASE sent when a file was
 * closed just before the caller asked may wait on a second queue (seen as
 * "export still in use" right after the client closed the file).  A loop
 * that does not answer in time (stuck behind a slow device) leaves that
 * queue as it is.  The call runs in the loop before anything queued there
 * later, such as the export's shutdown, so the queue outlives it.
 */
#define POLL_SYNC_MS 200
void fuse_session_poll_now(struct fuse_export *exp)
{
    struct poll_sync **ps = xcalloc(exp->nqueues, sizeof(*ps));
    unsigned n = 0;

    for (unsigned i = 0; i < exp->nqueues; i++) {
        struct fuse_queue *q = &exp->queues[i];
        if (loop_in_thread(q->loop)) {
            poll_queue_now(q);
            continue;
        }
        struct poll_sync *p = xmalloc(sizeof(*p));
        *p = (struct poll_sync){ .q = q, .refs = 2 };
        pthread_mutex_init(&p->lock, NULL);
        pthread_cond_init(&p->cond, NULL);
        ps[n++] = p;
        loop_call(q->loop, poll_sync_run, p);
    }
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += POLL_SYNC_MS * 1000000L;
    until.tv_sec += until.tv_nsec / 1000000000L;
    until.tv_nsec %= 1000000000L;
    for (unsigned i = 0; i < n; i++) {
        pthread_mutex_lock(&ps[i]->lock);
        while (!ps[i]->done && pthread_cond_timedwait(&ps[i]->cond, &ps[i]->lock, &until) == 0)
            ;
        pthread_mutex_unlock(&ps[i]->lock);
        poll_sync_put(ps[i]);
    }
    free(ps);
}

static void fuse_start_in_loop(void *opaque)
{
    struct fuse_queue *q = opaque;

    if (q->stopping)
        return;
    q->rx_paused = false;
    q->watch = loop_watch_fd(q->loop, q->fd, LOOP_IN, fuse_on_readable, q);
    if (!q->watch)
        log_error("FUSE export '%s': cannot watch the session fd", q->exp->common.id);
}

void fuse_session_start(struct fuse_export *exp)
{
    for (unsigned i = 0; i < exp->nqueues; i++) {
        struct fuse_queue *q = &exp->queues[i];
        int fl = fcntl(q->fd, F_GETFL);

        if (fl >= 0)
            fcntl(q->fd, F_SETFL, fl | O_NONBLOCK);
        if (loop_in_thread(q->loop))
            fuse_start_in_loop(q);
        else
            loop_call(q->loop, fuse_start_in_loop, q);
    }
}

/* ---- queues ---- */

static int clone_fd(int master, error **errp)
{
    uint32_t m = master;
    int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC | O_NONBLOCK);

    if (fd < 0) {
        error_setg_errno(errp, errno, "Failed to open /dev/fuse for another queue");
        return -1;
    }
    if (ioctl(fd, FUSE_DEV_IOC_CLONE, &m) < 0) {
        error_setg_errno(errp, errno, "Failed to clone the FUSE session fd");
        close(fd);
        return -1;
    }
    return fd;
}

int fuse_queues_setup(struct fuse_export *exp, bool io_uring, error **errp)
{
    struct export *e = &exp->common;
    unsigned n = e->n_loops ? e->n_loops : 1;
    const char *why = NULL;

    if (fuse_session_custom_io(exp->se, &fuse_export_io, fuse_session_fd(exp->se)) < 0) {
        error_setg(errp, "Failed to set up FUSE session I/O");
        return -EIO;
    }
    exp->queues = xcalloc(n, sizeof(*exp->queues));
    exp->nqueues = n;
    for (unsigned i = 0; i < n; i++) {
        struct fuse_queue *q = &exp->queues[i];
        q->exp = exp;
        q->index = i;
        q->loop = e->n_loops ? e->loops[i] : e->loop;
        q->fd = i ? clone_fd(fuse_session_fd(exp->se), errp) : fuse_session_fd(exp->se);
        if (q->fd < 0)
            return -EIO;
    }
    if (!io_uring)
        return 0;
    if (!fuse_uring_kernel_enabled(&why)) {
        log_warn("FUSE export '%s': io-uring unavailable (%s): serving /dev/fuse", e->id, why);
        return 0;
    }
    /* The kernel wants every CPU's queue registered; queue i of ours
     * serves the kernel's queues i, i + n, i + 2n... */
    unsigned ncpu = fuse_uring_nr_cpu_queues();
    uint16_t *qids = xcalloc(ncpu, sizeof(*qids));
    for (unsigned i = 0; i < n && i < ncpu; i++) {
        unsigned k = 0;
        error *err = NULL;
        for (unsigned c = i; c < ncpu; c += n)
            qids[k++] = c;
        exp->queues[i].ur = fuse_uring_new(&exp->queues[i], qids, k, &err);
        if (!exp->queues[i].ur) {
            log_warn("FUSE export '%s': io-uring unavailable (%s): serving /dev/fuse",
                     e->id, err ? err->msg : "?");
            error_free(err);
            for (unsigned j = 0; j < i; j++) {
                fuse_uring_free(exp->queues[j].ur);
                exp->queues[j].ur = NULL;
            }
            free(qids);
            return 0;
        }
    }
    free(qids);
    exp->want_uring = true;
    return 0;
}

void fuse_queues_free(struct fuse_export *exp)
{
    for (unsigned i = 0; i < exp->nqueues; i++) {
        struct fuse_queue *q = &exp->queues[i];
        if (q->ur) {
            fuse_uring_free(q->ur);
            q->ur = NULL;
        }
        if (i && q->fd >= 0)
            close(q->fd);
        q->fd = -1;
        queue_free_pools(q);
    }
    free(exp->queues);
    exp->queues = NULL;
    exp->nqueues = 0;
}

/* ---- shutdown ---- */

/* The rings are closed: unmount, end the session, report. */
static void fuse_finish_unmount(struct fuse_export *exp)
{
    if (exp->mounted) {
        fuse_session_unmount(exp->se);
        exp->mounted = false;
    }
    fuse_queues_free(exp);
    fuse_session_destroy(exp->se);
    exp->se = NULL;
    export_shutdown_done(&exp->common);
}

static void fuse_ring_closed_in_main(void *opaque)
{
    struct fuse_queue *q = opaque;
    struct fuse_export *exp = q->exp;

    if (--exp->rings_open == 0)
        fuse_finish_unmount(exp);
}

/* Close a queue's rings and free their buffers in the queue's own loop.
 * The kernel copies a request into a ring entry's buffers in task work of
 * the thread that submitted the entry's command (this loop's), or inside
 * our own submit calls, which run here too: done in this thread, the close
 * cannot overlap such a copy, and once it has returned the ring is dying
 * and the kernel no longer copies into it (its task work ends the command
 * instead).  Freed from another thread, the buffers could be written while
 * or after they were freed.  The deferred submit of the ring is also only
 * safe to cancel from here. */
static void fuse_ring_close_in_loop(void *opaque)
{
    struct fuse_queue *q = opaque;

    fuse_uring_free(q->ur);
    q->ur = NULL;
    if (loop_in_thread(loop_main()))
        fuse_ring_closed_in_main(q);
    else
        loop_call(loop_main(), fuse_ring_closed_in_main, q);
}

static void fuse_finish_in_main(struct fuse_export *exp)
{
    char dev[256] = "", uring[256] = "";
    size_t ld = 0, lu = 0;

    /* What each queue served, for operators (and tests): "N M" per queue. */
    for (unsigned i = 0; i < exp->nqueues; i++) {
        if (ld < sizeof(dev))
            ld += snprintf(dev + ld, sizeof(dev) - ld, "%s%" PRIu64, i ? " " : "",
                           exp->queues[i].n_dev);
        if (lu < sizeof(uring))
            lu += snprintf(uring + lu, sizeof(uring) - lu, "%s%" PRIu64, i ? " " : "",
                           exp->queues[i].n_uring);
    }
    log_info("FUSE export '%s': requests served per queue: /dev/fuse %s; io_uring %s",
             exp->common.id, dev, uring);
    /* The rings first: their pending commands pin the session's file.
     * Each closes in its queue's loop (see fuse_ring_close_in_loop); one
     * count more than there are rings keeps this loop's inline closes from
     * finishing the export under it. */
    exp->rings_open = 1;
    for (unsigned i = 0; i < exp->nqueues; i++) {
        struct fuse_queue *q = &exp->queues[i];
        if (!q->ur)
            continue;
        exp->rings_open++;
        if (loop_in_thread(q->loop))
            fuse_ring_close_in_loop(q);
        else
            loop_call(q->loop, fuse_ring_close_in_loop, q);
    }
    fuse_ring_closed_in_main(&exp->queues[0]);
}

static void fuse_queue_drained_in_main(void *opaque)
{
    struct fuse_queue *q = opaque;
    struct fuse_export *exp = q->exp;

    if (++exp->queues_drained == exp->nqueues && !exp->finishing) {
        if (exp->invals) {
            exp->finish_after_invals = true;   /* fuse_inval_done_main finishes */
            return;
        }
        exp->finishing = true;
        fuse_finish_in_main(exp);
    }
}

/* Posted to the queue's own loop so that the completion which released
 * the last request has fully returned before the main thread frees it. */
static void fuse_drained_in_loop(void *opaque)
{
    loop_call(loop_main(), fuse_queue_drained_in_main, opaque);
}

static void fuse_handoff_in_loop(void *opaque);
static void fuse_moved_in_main(void *opaque);

void fuse_queue_maybe_drained(struct fuse_queue *q)
{
    if (q->quiescing && !q->inflight && !q->handoff_posted) {
        q->handoff_posted = true;
        loop_call(q->loop, fuse_handoff_in_loop, q);
    }
    if (!q->stopping || q->inflight || q->drained_posted)
        return;
    q->drained_posted = true;
    loop_call(q->loop, fuse_drained_in_loop, q);
}

/* ---- invalidation after block_resize ----
 * The kernel caches the file's size (attr timeout) and pages.  The
 * cached attributes are dropped at once, from the main thread, before
 * block_resize answers: that notification touches no page, so it cannot
 * wait, and the next stat() asks for the new size (a shrink then also
 * truncates the kernel's pages past it).  The pages are dropped by a
 * notification written from a thread of its own: invalidating pages
 * waits for page locks that requests the queues have yet to read may hold
 * (so it must not hold up a queue's drain before a move either).  The
 * main thread counts these threads (exp->invals): the export is finished
 * only after the last one has returned. */

static void fuse_inval_done_main(void *opaque)
{
    struct fuse_export *exp = opaque;

    if (--exp->invals == 0 && exp->finish_after_invals && !exp->finishing) {
        exp->finishing = true;
        fuse_finish_in_main(exp);
    }
}

static void *fuse_inval_thread(void *opaque)
{
    struct fuse_export *exp = opaque;
    int r = fuse_lowlevel_notify_inval_inode(exp->se, FUSE_ROOT_ID, 0, 0);
    if (r < 0 && r != -ENOENT)
        log_warn("FUSE export %s: could not invalidate the cached size: %s",
                 exp->common.id, strerror(-r));
    loop_call(loop_main(), fuse_inval_done_main, exp);
    return NULL;
}

void fuse_session_node_resized(struct fuse_export *exp)
{
    pthread_t th;
    pthread_attr_t attr;

    if (exp->finishing)
        return;
    int r = fuse_lowlevel_notify_inval_inode(exp->se, FUSE_ROOT_ID, -1, 0);
    if (r < 0 && r != -ENOENT)
        log_warn("FUSE export %s: could not invalidate the cached size: %s",
                 exp->common.id, strerror(-r));
    exp->invals++;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&th, &attr, fuse_inval_thread, exp) != 0) {
        log_warn("FUSE export %s: no thread to invalidate the cached size", exp->common.id);
        exp->invals--;
    }
    pthread_attr_destroy(&attr);
}

static void fuse_stop_in_loop(void *opaque)
{
    struct fuse_queue *q = opaque;

    q->stopping = true;
    fuse_stop_watching(q);
    if (q->ur)
        fuse_uring_stop(q->ur);
    fuse_queue_maybe_drained(q);
}

void fuse_session_stop(struct fuse_export *exp)
{
    struct fuse_queue *q0 = &exp->queues[0];

    if (exp->moving) {
        exp->stop_after_move = true;      /* after the move (fuse_moved_in_main) */
        return;
    }
    if (exp->nqueues == 1 && loop_in_thread(q0->loop) && loop_in_thread(loop_main()) &&
        !q0->inflight && !exp->invals && !exp->finishing) {
        /* Nothing in flight, already in the main thread: unmount now, so
         * BLOCK_EXPORT_DELETED precedes the command's reply as in QEMU. */
        q0->stopping = true;
        exp->finishing = true;
        fuse_stop_watching(q0);
        if (q0->ur)
            fuse_uring_stop(q0->ur);
        fuse_finish_in_main(exp);
        return;
    }
    for (unsigned i = 0; i < exp->nqueues; i++) {
        struct fuse_queue *q = &exp->queues[i];
        if (loop_in_thread(q->loop))
            fuse_stop_in_loop(q);
        else
            loop_call(q->loop, fuse_stop_in_loop, q);
    }
}

/* ---- moving to another loop (see the top) ---- */

bool fuse_session_can_move(struct fuse_export *exp, error **errp)
{
    if (exp->want_uring || exp->queues[0].ur) {
        error_setg(errp, "Cannot move export '%s': it is served over io_uring "
                   "(__org.bexd_io-uring)", exp->common.id);
        return false;
    }
    return true;
}

/* The old loop, idle since the call was queued: let go of the queue. */
static void fuse_handoff_in_loop(void *opaque)
{
    struct fuse_queue *q = opaque;

    q->handoff_posted = false;
    if (!q->quiescing)
        return;
    if (q->inflight)
        return;                 /* cannot happen (nothing is read), but wait */
    q->quiescing = false;
    loop_call(loop_main(), fuse_moved_in_main, q);
}

static void fuse_quiesce_in_loop(void *opaque)
{
    struct fuse_queue *q = opaque;

    q->quiescing = true;
    q->watch_on = q->watch != NULL;
    fuse_stop_watching(q);
    fuse_queue_maybe_drained(q);
}

static void fuse_resume_in_loop(void *opaque)
{
    struct fuse_queue *q = opaque;

    if (q->watch_on && !q->stopping)
        fuse_start_in_loop(q);
    q->watch_on = false;
}

/* Main thread: the queue is idle and no loop's. */
static void fuse_moved_in_main(void *opaque)
{
    struct fuse_queue *q = opaque;
    struct fuse_export *exp = q->exp;

    exp->moving = false;
    q->loop = exp->common.loop;
    loop_call(q->loop, fuse_resume_in_loop, q);
    if (exp->stop_after_move)
        loop_call(q->loop, fuse_stop_in_loop, q);
    exp->stop_after_move = false;
}

void fuse_session_move(struct fuse_export *exp)
{
    struct fuse_queue *q = &exp->queues[0];

    if (exp->moving || q->loop == exp->common.loop)
        return;                 /* a move under way ends where the export is then */
    exp->moving = true;
    loop_call(q->loop, fuse_quiesce_in_loop, q);
}
