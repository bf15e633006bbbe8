/*
 * File I/O engine (see aio.h).
 *
 * Theory of operation: every loop owns an engine with an io_uring ring and an
 * eventfd, and for aio=native a Linux AIO context (aio-linux.c).  Requests
 * are first tried inline with RWF_NOWAIT (a page-cache hit completes with no
 * ring round trip at all); what would block goes to the ring (io_uring), the
 * context (native) or the worker pool (threads).  Ring submissions are
 * batched: one io_uring_submit() per loop iteration, from a loop_defer.  The
 * loop watches the ring's own fd, readable while its completion queue holds
 * entries, so reaping them needs no system call (an eventfd registered with
 * the ring cost a read() per wake-up: one of the 7 system calls per 4k
 * O_DIRECT read at qd1 over NBD, 0.09 of 0.65 per read at qd32).  Thread
 * completions are pushed on the engine's lock-free list and signalled on an
 * eventfd, once per batch (only the push onto an empty list writes it).
 * Completion callbacks always run in the owning loop thread.  While worker
 * threads, the ring or the context hold requests of a loop, the loop
 * sleeps rather than polls: a blocking call, a large copy or a device (only
 * what would block goes to the ring) takes far longer than the poll window,
 * and on a small machine the polling loop takes the CPU its client needs
 * (4k O_DIRECT reads at qd32 over NBD: 10.7 instead of 13.4 us of server
 * CPU per read).  QEMU polls its AIO completions too; here a window of the
 * device's own (adapting as the clients' does) cost 5-13% of qd1 reads and
 * 7-30% more CPU per read on this machine's disk, and polling with
 * poll-max-ns raised to 200 us, the client polling as well, was slower
 * still (session 26, docs/performance.md).
 */
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include "util/aio.h"
#include "util/aio-int.h"
#include "util/loop.h"
#include "util/log.h"
#include "util/xalloc.h"

#define RING_ENTRIES 256
#define POOL_MAX_THREADS 16
#define FIXED_BUFS 1024         /* registered buffers per ring */

struct aio_engine {
    struct loop *loop;
    bool ring_ok;
    struct io_uring ring;
    int efd;                    /* thread completions */
    struct loop_watch *watch;   /* on efd */
    struct loop_watch *ring_watch;  /* on the ring's fd: completions to reap */
    struct aio_stats stats;     /* loop thread */
    struct loop_defer flush;
    unsigned queued;            /* SQEs prepared, not yet submitted */
    unsigned in_pool;           /* requests at the worker pool (loop thread only) */
    unsigned in_ring;           /* requests in the ring: they wait for a device */
    struct aio_req *done_head;  /* thread completions: atomic push, atomic take-all */
    /* registered buffers: the ring's sparse table; a free list of indexes */
    pthread_mutex_t fixed_lock; /* registration may be released from other threads */
    bool fixed_ok;
    int fixed_free[FIXED_BUFS];
    int nfixed_free;
    /* aio=native: a Linux AIO context (aio-linux.c), made by the first
     * request that needs it; if the kernel refused it, the pool serves */
    struct laio *laio;
    bool laio_failed;
};

/* ---- worker pools (shared by all loops) ----
 * Two pools: one for calls that may block on a device (up to
 * POOL_MAX_THREADS, so that many can wait at once) and one for copies that
 * only use a CPU (AIO_CPU_BOUND), with one thread per online CPU: more
 * copiers than CPUs only preempt each other and the loops that feed them
 * (1 MiB vhost-user-blk reads on 2 CPUs: 12.3 GiB/s with 2 copiers, 10.0 with
 * 4). */

struct pool {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct aio_req *head, **tail;
    int threads, idle, max;
};

static struct pool io_pool = {
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, &io_pool.head, 0, 0,
    POOL_MAX_THREADS,
};
static struct pool copy_pool = {
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, &copy_pool.head, 0, 0, 0,
};

static int64_t do_sync(struct aio_req *r, int rwflags)
{
    ssize_t n;
    switch (r->op) {
    case AIO_OP_READ:
        n = preadv2(r->fd, r->iov, r->iovcnt, r->offset, rwflags);
        break;
    case AIO_OP_WRITE:
        n = pwritev2(r->fd, r->iov, r->iovcnt, r->offset,
                     rwflags | (r->flags & AIO_DSYNC ? RWF_DSYNC : 0));
        break;
    case AIO_OP_FSYNC:
        n = fdatasync(r->fd);
        break;
    case AIO_OP_FALLOCATE:
        n = fallocate(r->fd, r->mode, r->offset, r->len);
        break;
    case AIO_OP_CALL:
        return r->fn(r);
    default:
        return -EINVAL;
    }
    return n < 0 ? -errno : n;
}

bool aio_req_push(struct aio_req **head, struct aio_req *r)
{
    struct aio_req *old = __atomic_load_n(head, __ATOMIC_RELAXED);
    do {
        r->next = old;
    } while (!__atomic_compare_exchange_n(head, &old, r, true,
                                          __ATOMIC_RELEASE, __ATOMIC_RELAXED));
    return old == NULL;
}

struct aio_req *aio_req_take_all(struct aio_req **head)
{
    struct aio_req *list = __atomic_exchange_n(head, NULL, __ATOMIC_ACQUIRE), *fifo = NULL;
    while (list) {                  /* pushed newest first: reverse */
        struct aio_req *next = list->next;
        list->next = fifo;
        fifo = list;
        list = next;
    }
    return fifo;
}

static void engine_post_done(struct aio_req *r)
{
    struct aio_engine *e = loop_aio(r->loop);
    if (!aio_req_push(&e->done_head, r))
        return;             /* the loop has not taken the list yet: no second wake-up */
    uint64_t one = 1;
    if (write(e->efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        log_error("aio wake-up failed: %s", strerror(errno));
}

static void *pool_worker(void *arg)
{
    struct pool *p = arg;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->head) {
            p->idle++;
            pthread_cond_wait(&p->cond, &p->lock);
            p->idle--;
        }
        struct aio_req *r = p->head;
        p->head = r->next;
        if (!p->head)
            p->tail = &p->head;
        pthread_mutex_unlock(&p->lock);
        r->res = do_sync(r, 0);
        engine_post_done(r);
        pthread_mutex_lock(&p->lock);
    }
    return NULL;
}

static void pool_submit(struct aio_req *r)
{
    struct pool *p = r->flags & AIO_CPU_BOUND ? &copy_pool : &io_pool;
    pthread_mutex_lock(&p->lock);
    if (!p->max) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        p->max = n < 1 ? 1 : n > POOL_MAX_THREADS ? POOL_MAX_THREADS : n;
    }
    r->next = NULL;
    *p->tail = r;
    p->tail = &r->next;
    bool wake = p->idle > 0;
    if (!wake && p->threads < p->max) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &attr, pool_worker, p) == 0)
            p->threads++;
        pthread_attr_destroy(&attr);
    }
    pthread_mutex_unlock(&p->lock);
    if (wake)
        pthread_cond_signal(&p->cond);
}

/* ---- completions ---- */

/* The ring's fd is readable: reap every completion (a done callback may
 * submit more; those are flushed at the end of the iteration). */
static void ring_event(void *opaque, uint32_t revents)
{
    struct aio_engine *e = opaque;
    struct io_uring_cqe *cqe;

    e->stats.ring_wakeups++;
    while (io_uring_peek_cqe(&e->ring, &cqe) == 0) {
        struct aio_req *r = io_uring_cqe_get_data(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&e->ring, cqe);
        e->in_ring--;
        e->stats.ring_completions++;
        r->done(r, res);
    }
}

static void engine_event(void *opaque, uint32_t revents)
{
    struct aio_engine *e = opaque;
    uint64_t v;
    /* One read empties a (non-semaphore) eventfd; a loop would pay a
     * second syscall every time just to learn EAGAIN.  A completion that
     * arrives after this read writes it again and wakes the loop again. */
    e->stats.efd_reads++;
    if (read(e->efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
        log_error("aio eventfd read: %s", strerror(errno));
    struct aio_req *r = aio_req_take_all(&e->done_head);
    while (r) {
        struct aio_req *next = r->next;
        e->in_pool--;
        r->done(r, r->res);
        r = next;
    }
}

static void engine_flush(void *opaque)
{
    struct aio_engine *e = opaque;
    if (e->queued) {
        e->queued = 0;
        e->stats.submit_calls++;
        int ret = io_uring_submit(&e->ring);
        if (ret < 0)
            log_error("io_uring_submit: %s", strerror(-ret));
    }
}

struct aio_engine *aio_engine_new(struct loop *l)
{
    struct aio_engine *e = xzalloc(sizeof(*e));
    e->loop = l;
    e->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->flush.fn = engine_flush;
    e->flush.opaque = e;
    int ret = io_uring_queue_init(RING_ENTRIES, &e->ring, 0);
    if (ret == 0) {
        e->ring_watch = loop_watch_fd(l, e->ring.ring_fd, LOOP_IN, ring_event, e);
        e->ring_ok = true;
    } else {
        log_debug("io_uring unavailable (%s); using the thread pool", strerror(-ret));
    }
    pthread_mutex_init(&e->fixed_lock, NULL);
    if (e->ring_ok && io_uring_register_buffers_sparse(&e->ring, FIXED_BUFS) == 0) {
        e->fixed_ok = true;
        for (int i = 0; i < FIXED_BUFS; i++)
            e->fixed_free[i] = FIXED_BUFS - 1 - i;
        e->nfixed_free = FIXED_BUFS;
    }
    e->watch = loop_watch_fd(l, e->efd, LOOP_IN, engine_event, e);
    return e;
}

void aio_engine_free(struct aio_engine *e)
{
    laio_free(e->laio);
    loop_watch_del(e->watch);
    loop_watch_del(e->ring_watch);
    if (e->ring_ok)
        io_uring_queue_exit(&e->ring);
    pthread_mutex_destroy(&e->fixed_lock);
    close(e->efd);
    free(e);
}

/* Register f with e's ring (loop thread); false: use the ordinary path. */
static bool fixed_register(struct aio_engine *e, struct aio_fixed *f)
{
    bool ok = false;

    pthread_mutex_lock(&e->fixed_lock);
    if (e->fixed_ok && e->nfixed_free > 0) {
        int idx = e->fixed_free[e->nfixed_free - 1];
        struct iovec iov = { f->base, f->len };
        __u64 tag = 0;
        int ret = io_uring_register_buffers_update_tag(&e->ring, idx, &iov, &tag, 1);
        if (ret == 1) {
            e->nfixed_free--;
            f->engine = e;
            f->index = idx;
            ok = true;
        } else if (ret == -ENOMEM || ret == -EPERM) {
            /* out of locked memory (RLIMIT_MEMLOCK): stop trying */
            log_debug("io_uring buffer registration: %s; not registering more",
                      strerror(-ret));
            e->fixed_ok = false;
        }
    }
    pthread_mutex_unlock(&e->fixed_lock);
    return ok;
}

void aio_fixed_release(struct aio_fixed *f)
{
    struct aio_engine *e = f->engine;

    if (!e)
        return;
    pthread_mutex_lock(&e->fixed_lock);
    struct iovec iov = { NULL, 0 };
    __u64 tag = 0;
    io_uring_register_buffers_update_tag(&e->ring, f->index, &iov, &tag, 1);
    e->fixed_free[e->nfixed_free++] = f->index;
    pthread_mutex_unlock(&e->fixed_lock);
    f->engine = NULL;
}

/* The registered buffer index for r's single iovec, or -1. */
static int fixed_index(struct aio_engine *e, struct aio_req *r)
{
    struct aio_fixed *f = r->fixed;

    if (!f || r->iovcnt != 1 || (f->engine && f->engine != e))
        return -1;
    const char *b = r->iov[0].iov_base, *fb = f->base;
    if (b < fb || b + r->iov[0].iov_len > fb + f->len)
        return -1;
    if (!f->engine && !fixed_register(e, f))
        return -1;
    return f->index;
}

static bool ring_submit(struct aio_engine *e, struct aio_req *r)
{
    int fidx;

    if (r->op == AIO_OP_CALL)
        return false;               /* work for a thread */
    struct io_uring_sqe *sqe = io_uring_get_sqe(&e->ring);
    if (!sqe) {
        engine_flush(e);
        sqe = io_uring_get_sqe(&e->ring);
        if (!sqe)
            return false;
    }
    switch (r->op) {
    case AIO_OP_READ:
        if ((fidx = fixed_index(e, r)) >= 0)
            io_uring_prep_read_fixed(sqe, r->fd, r->iov[0].iov_base, r->iov[0].iov_len,
                                     r->offset, fidx);
        else
            io_uring_prep_readv(sqe, r->fd, r->iov, r->iovcnt, r->offset);
        break;
    case AIO_OP_WRITE:
        if ((fidx = fixed_index(e, r)) >= 0)
            io_uring_prep_write_fixed(sqe, r->fd, r->iov[0].iov_base, r->iov[0].iov_len,
                                      r->offset, fidx);
        else
            io_uring_prep_writev(sqe, r->fd, r->iov, r->iovcnt, r->offset);
        if (r->flags & AIO_DSYNC)
            sqe->rw_flags = RWF_DSYNC;
        break;
    case AIO_OP_FSYNC:
        io_uring_prep_fsync(sqe, r->fd, IORING_FSYNC_DATASYNC);
        break;
    case AIO_OP_FALLOCATE:
        io_uring_prep_fallocate(sqe, r->fd, r->mode, r->offset, r->len);
        break;
    case AIO_OP_CALL:               /* refused above */
        break;
    }
    io_uring_sqe_set_data(sqe, r);
    e->queued++;
    e->in_ring++;
    loop_defer(e->loop, &e->flush);
    return true;
}

/* e's Linux AIO context, made now if this is its first request.  As QEMU
 * when it cannot set one up for a new AioContext, a refusal is reported once
 * and the pool serves aio=native from then on (open already checked that a
 * context can be made, with QEMU's error). */
static bool native_ready(struct aio_engine *e)
{
    int err;

    if (e->laio)
        return true;
    if (e->laio_failed)
        return false;
    e->laio = laio_new(e->loop, &e->stats, &err);
    if (!e->laio) {
        e->laio_failed = true;
        log_error("Unable to use native AIO, falling back to thread pool: "
                  "failed to create linux AIO context: %s", strerror(-err));
        return false;
    }
    return true;
}

void aio_submit(struct loop *l, enum aio_kind kind, struct aio_req *r)
{
    struct aio_engine *e = loop_aio(l);
    r->loop = l;
    if (r->flags & AIO_INLINE_SYNC) {
        r->done(r, do_sync(r, 0));
        return;
    }
    if ((r->op == AIO_OP_READ || r->op == AIO_OP_WRITE) &&
        !(r->flags & (AIO_NO_INLINE | AIO_DSYNC))) {
        /* Inline attempt: completes at once when no blocking is needed. */
        int64_t n = do_sync(r, RWF_NOWAIT);
        if (n >= 0 && (uint64_t)n == r->len) {
            r->done(r, n);
            return;
        }
        if (n == -EOPNOTSUPP)
            r->flags |= AIO_NOWAIT_UNSUPPORTED;
        /* Partial or would-block: redo the whole request asynchronously
         * (the bytes already done are simply transferred again). */
    }
    if (kind == AIO_NATIVE) {
        if ((r->op == AIO_OP_READ || r->op == AIO_OP_WRITE) && native_ready(e)) {
            laio_submit(e->laio, r);
            return;
        }
    } else if (kind != AIO_THREADS && e->ring_ok && ring_submit(e, r)) {
        return;
    }
    aio_pool_fallback(r);
}

void aio_pool_fallback(struct aio_req *r)
{
    loop_aio(r->loop)->in_pool++;
    pool_submit(r);
}

void aio_get_stats(struct loop *l, struct aio_stats *st)
{
    *st = loop_aio(l)->stats;
}

bool aio_engine_waits(struct aio_engine *e)
{
    return e->in_pool > 0 || e->in_ring > 0 || (e->laio && laio_busy(e->laio));
}

int aio_kind_parse(const char *s)
{
    if (!strcmp(s, "threads"))
        return AIO_THREADS;
    if (!strcmp(s, "io_uring"))
        return AIO_IO_URING;
    if (!strcmp(s, "native"))
        return AIO_NATIVE;
    return -1;
}
