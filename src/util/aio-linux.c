/*
 * aio=native: Linux AIO (io_setup/io_submit), through the raw system calls.
 *
 * Theory of operation: a loop that serves an aio=native request gets one
 * context (io_setup, LAIO_EVENTS requests; the first takes the one the
 * open's check made) and an eventfd the kernel signals for every
 * completion (IOCB_FLAG_RESFD).  A request takes one of
 * the context's iocb slots and waits in a queue; at the end of the loop
 * turn (loop_defer, the point where the io_uring engine submits) the
 * queue goes to the kernel in one io_submit.  The loop watches the eventfd
 * edge-triggered: every completion's signal wakes it, so the eventfd is
 * never read (its counter only grows; 2^64 completions would saturate it,
 * and a saturated eventfd still wakes); the completions are reaped from the
 * context's ring in user memory (the kernel maps it at the context's
 * address; head and tail say what is there).  A wake-up so costs no system
 * call but the loop's epoll_wait: no io_getevents and no eventfd read
 * (4k reads at qd1 over NBD: 6.55-6.75 -> 5.11-5.75 system calls per
 * read).  A ring whose header is not the one known here is reaped with
 * io_getevents.
 * Only preadv/pwritev go to the context: fdatasync and fallocate go to the
 * worker pool as in QEMU (many file systems refuse IOCB_CMD_FDSYNC, and
 * Linux AIO has no fallocate).
 * Back-pressure: more requests than slots wait in a list and take the slots
 * completions free.  io_submit may take part of a batch (the rest is tried
 * again at once), fail the first iocb (that request completes with the
 * error and the rest go on) or answer -EAGAIN (the kernel is short of
 * memory: the queue waits for a completion, or goes to the worker pool if
 * nothing is in flight, so a request never waits for nothing).
 * Short transfers are passed on as they are (file.c zero-fills short reads
 * at the end of a file, as QEMU does).
 */
#include <errno.h>
#include <linux/aio_abi.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include "util/aio-int.h"
#include "util/loop.h"
#include "util/log.h"
#include "util/xalloc.h"

#define LAIO_EVENTS 1024        /* QEMU 7.2's MAX_EVENTS */
#define LAIO_REAP 64            /* io_getevents batch (unknown ring layout) */

/* The ring the kernel maps at the context's address (fs/aio.c). */
struct laio_ring {
    unsigned id, nr, head, tail;
    unsigned magic, compat_features, incompat_features, header_length;
    struct io_event events[];
};
#define LAIO_RING_MAGIC 0xa10a10a1

struct laio {
    struct loop *loop;
    struct aio_stats *stats;    /* the engine's */
    aio_context_t ctx;
    int efd;
    struct loop_watch *watch;
    struct loop_defer flush;
    struct iocb *iocbs;         /* LAIO_EVENTS slots */
    int *free_slots, nfree;
    struct iocb **queue;        /* prepared, not yet submitted, in order */
    unsigned nqueue;
    unsigned in_kernel;         /* submitted, not yet reaped */
    struct aio_req *wait_head, **wait_tail;  /* no slot yet */
};

static long sys_io_setup(unsigned nr, aio_context_t *ctx)
{
    return syscall(SYS_io_setup, nr, ctx);
}

static long sys_io_destroy(aio_context_t ctx)
{
    return syscall(SYS_io_destroy, ctx);
}

static long sys_io_submit(aio_context_t ctx, long n, struct iocb **iocbs)
{
    return syscall(SYS_io_submit, ctx, n, iocbs);
}

static long sys_io_getevents(aio_context_t ctx, long min, long max, struct io_event *ev,
                             struct timespec *ts)
{
    return syscall(SYS_io_getevents, ctx, min, max, ev, ts);
}

/* A context made by aio_native_probe() at open, kept for the first loop
 * that needs one (0: none).  Destroying it there cost 32-40 ms per
 * blockdev-add (io_destroy waits for an RCU grace period); QEMU too keeps
 * the context it makes at open, in its AioContext. */
static aio_context_t spare_ctx;

int aio_native_probe(void)
{
    aio_context_t ctx = 0, none = 0;

    if (__atomic_load_n(&spare_ctx, __ATOMIC_ACQUIRE))
        return 0;
    if (sys_io_setup(LAIO_EVENTS, &ctx) < 0)
        return -errno;
    if (!__atomic_compare_exchange_n(&spare_ctx, &none, ctx, false, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
        sys_io_destroy(ctx);        /* another open kept one first */
    return 0;
}

/* Put r into a slot and the submission queue. */
static void prep(struct laio *s, struct aio_req *r)
{
    struct iocb *cb = &s->iocbs[s->free_slots[--s->nfree]];

    memset(cb, 0, sizeof(*cb));
    cb->aio_data = (uintptr_t)r;
    cb->aio_fildes = r->fd;
    cb->aio_offset = r->offset;
    if (r->iovcnt == 1) {       /* the kernel need not copy an iovec array */
        cb->aio_lio_opcode = r->op == AIO_OP_READ ? IOCB_CMD_PREAD : IOCB_CMD_PWRITE;
        cb->aio_buf = (uintptr_t)r->iov[0].iov_base;
        cb->aio_nbytes = r->iov[0].iov_len;
    } else {
        cb->aio_lio_opcode = r->op == AIO_OP_READ ? IOCB_CMD_PREADV : IOCB_CMD_PWRITEV;
        cb->aio_buf = (uintptr_t)r->iov;
        cb->aio_nbytes = r->iovcnt;
    }
    if (r->flags & AIO_DSYNC)
        cb->aio_rw_flags = RWF_DSYNC;
    cb->aio_flags = IOCB_FLAG_RESFD;
    cb->aio_resfd = s->efd;
    s->queue[s->nqueue++] = cb;
    loop_defer(s->loop, &s->flush);
}

static void release_slot(struct laio *s, struct iocb *cb)
{
    s->free_slots[s->nfree++] = (int)(cb - s->iocbs);
}

/* Slots freed: give them to waiting requests. */
static void admit_waiting(struct laio *s)
{
    while (s->wait_head && s->nfree > 0) {
        struct aio_req *r = s->wait_head;
        s->wait_head = r->next;
        if (!s->wait_head)
            s->wait_tail = &s->wait_head;
        prep(s, r);
    }
}

/* Drop the first n queue entries (submitted or failed). */
static void queue_shift(struct laio *s, unsigned n)
{
    s->nqueue -= n;
    memmove(s->queue, s->queue + n, s->nqueue * sizeof(*s->queue));
}

/* End of the loop turn: the turn's requests in one io_submit. */
static void laio_flush(void *opaque)
{
    struct laio *s = opaque;

    while (s->nqueue) {
        s->stats->native_submit_calls++;
        long ret = sys_io_submit(s->ctx, s->nqueue, s->queue);
        if (ret > 0) {
            s->in_kernel += ret;
            queue_shift(s, (unsigned)ret);
            continue;                   /* the rest, if the kernel took part */
        }
        int err = ret < 0 ? errno : EAGAIN;
        if (err == EAGAIN && s->in_kernel)
            return;                     /* again when a completion comes */
        if (err == EAGAIN) {
            /* Nothing in flight to wait for: the pool does the queue. */
            while (s->nqueue) {
                struct iocb *cb = s->queue[0];
                queue_shift(s, 1);
                release_slot(s, cb);
                aio_pool_fallback((struct aio_req *)(uintptr_t)cb->aio_data);
            }
            admit_waiting(s);
            continue;
        }
        /* The first iocb is refused (a bad fd, say): it fails, the rest go. */
        struct iocb *cb = s->queue[0];
        struct aio_req *r = (struct aio_req *)(uintptr_t)cb->aio_data;
        queue_shift(s, 1);
        release_slot(s, cb);
        admit_waiting(s);
        r->done(r, -err);
    }
}

/* Completions to reap, from the ring in user memory or by io_getevents. */
static void laio_event(void *opaque, uint32_t revents)
{
    struct laio *s = opaque;
    struct laio_ring *ring = (struct laio_ring *)(uintptr_t)s->ctx;

    s->stats->native_wakeups++;
    for (;;) {
        struct io_event ev[LAIO_REAP];
        int n = 0;
        if (ring->magic == LAIO_RING_MAGIC && ring->incompat_features == 0) {
            unsigned head = ring->head;
            unsigned tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
            while (head != tail && n < LAIO_REAP) {
                ev[n++] = ring->events[head];
                head = (head + 1) % ring->nr;
            }
            __atomic_store_n(&ring->head, head, __ATOMIC_RELEASE);
        } else {
            struct timespec zero = { 0, 0 };
            long got = sys_io_getevents(s->ctx, 0, LAIO_REAP, ev, &zero);
            if (got < 0 && errno != EINTR)
                log_error("io_getevents: %s", strerror(errno));
            n = got > 0 ? (int)got : 0;
        }
        if (!n)
            break;
        /* Free the slots first: a done callback may submit again. */
        for (int i = 0; i < n; i++)
            release_slot(s, (struct iocb *)(uintptr_t)ev[i].obj);
        s->in_kernel -= n;
        s->stats->native_completions += n;
        admit_waiting(s);
        for (int i = 0; i < n; i++) {
            struct aio_req *r = (struct aio_req *)(uintptr_t)ev[i].data;
            r->done(r, (int64_t)ev[i].res);
        }
    }
    if (s->nqueue)
        loop_defer(s->loop, &s->flush);     /* what waited for -EAGAIN to pass */
}

struct laio *laio_new(struct loop *l, struct aio_stats *stats, int *err)
{
    struct laio *s = xzalloc(sizeof(*s));

    s->loop = l;
    s->stats = stats;
    s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->efd < 0) {
        *err = -errno;
        free(s);
        return NULL;
    }
    s->ctx = __atomic_exchange_n(&spare_ctx, 0, __ATOMIC_ACQ_REL);
    if (!s->ctx && sys_io_setup(LAIO_EVENTS, &s->ctx) < 0) {
        *err = -errno;
        close(s->efd);
        free(s);
        return NULL;
    }
    s->iocbs = xzalloc(LAIO_EVENTS * sizeof(*s->iocbs));
    s->free_slots = xzalloc(LAIO_EVENTS * sizeof(*s->free_slots));
    s->queue = xzalloc(LAIO_EVENTS * sizeof(*s->queue));
    for (int i = 0; i < LAIO_EVENTS; i++)
        s->free_slots[i] = LAIO_EVENTS - 1 - i;
    s->nfree = LAIO_EVENTS;
    s->wait_tail = &s->wait_head;
    s->flush.fn = laio_flush;
    s->flush.opaque = s;
    s->watch = loop_watch_fd(l, s->efd, LOOP_IN | EPOLLET, laio_event, s);
    return s;
}

void laio_free(struct laio *s)
{
    if (!s)
        return;
    loop_defer_cancel(s->loop, &s->flush);
    loop_watch_del(s->watch);
    sys_io_destroy(s->ctx);     /* waits for what is still in the kernel */
    close(s->efd);
    free(s->iocbs);
    free(s->free_slots);
    free(s->queue);
    free(s);
}

void laio_submit(struct laio *s, struct aio_req *r)
{
    if (s->nfree == 0 || s->wait_head) {
        r->next = NULL;
        *s->wait_tail = r;
        s->wait_tail = &r->next;
        return;
    }
    prep(s, r);
}

unsigned laio_busy(const struct laio *s)
{
    return s->nqueue + s->in_kernel + (s->wait_head != NULL);
}
