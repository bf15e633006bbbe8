/*
 * The file I/O engine (util/aio.c): ring completions are reaped from the
 * ring's own fd (no eventfd read), a loop turn's submissions go in one
 * io_uring_submit, and thread completions still arrive through the
 * eventfd.  Requests use AIO_NO_INLINE, so the ring takes them whatever the
 * file system (no O_DIRECT needed).  aio=native: a turn's requests in one
 * io_submit, completions in the loop thread, errors as -errno, fdatasync in
 * the pool, more requests than the context's slots.  While the ring holds
 * I/O the loop does not poll; an io_uring completion that interrupts a
 * sleep (EINTR) leaves it one wait.  Requests handed over from other
 * threads (aio_req_push) come back whole and in the order pushed, and only
 * the push onto an empty list asks for a wake-up.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <liburing.h>
#include <pthread.h>
#include <semaphore.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include "util/aio.h"
#include "util/cleanup.h"
#include "util/loop.h"

#define NREQ 8

struct many;
#define BS 4096

struct aio_test {
    struct loop *l;
    int fd;
    enum aio_kind kind;
    struct aio_req req[NREQ];
    struct iovec iov[NREQ];
    char *buf;
    int done, bad, chain;
};

static int make_file(char *path)
{
    const char *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(path, 256, "%s/test-aio.XXXXXX", dir);
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    char blk[BS];
    for (int i = 0; i < NREQ; i++) {
        memset(blk, 'a' + i, sizeof(blk));
        assert_int_equal(pwrite(fd, blk, BS, (off_t)i * BS), BS);
    }
    return fd;
}

static bool ring_available(void)
{
    struct io_uring r;
    if (io_uring_queue_init(4, &r, 0) < 0)
        return false;
    io_uring_queue_exit(&r);
    return true;
}

/* The running test (a request's index is its place in cur->req). */
static struct aio_test *cur;
static struct many *cur_many;

static void count_done(struct aio_req *r, int64_t res)
{
    struct aio_test *t = cur;
    int i = (int)(r - t->req);
    if (!loop_in_thread(t->l) || res != BS || t->buf[(size_t)i * BS] != 'a' + i ||
        t->buf[(size_t)i * BS + BS - 1] != 'a' + i)
        t->bad++;
    if (++t->done == NREQ)
        loop_stop(t->l);
}

static void prep(struct aio_test *t, int i, void (*done)(struct aio_req *, int64_t))
{
    t->iov[i] = (struct iovec){ t->buf + (size_t)i * BS, BS };
    t->req[i] = (struct aio_req){ .op = AIO_OP_READ, .fd = t->fd, .iov = &t->iov[i], .iovcnt = 1,
                                  .offset = (uint64_t)i * BS, .len = BS,
                                  .flags = AIO_NO_INLINE, .done = done };
}

/* In the loop: every request in one turn. */
static void submit_all(void *opaque)
{
    struct aio_test *t = opaque;
    for (int i = 0; i < NREQ; i++) {
        prep(t, i, count_done);
        aio_submit(t->l, t->kind, &t->req[i]);
    }
}

static void run(struct aio_test *t, const char *name, enum aio_kind kind, loop_fn *start)
{
    char path[256];
    t->l = loop_new(name);
    t->fd = make_file(path);
    t->kind = kind;
    assert_int_equal(posix_memalign((void **)&t->buf, BS, (size_t)NREQ * BS), 0);
    memset(t->buf, 0, (size_t)NREQ * BS);
    cur = t;
    loop_call(t->l, start, t);
    loop_run(t->l);
    close(t->fd);
    unlink(path);
    free(t->buf);
}

static void test_ring_reaped_without_eventfd(void **state)
{
    struct aio_test t = { 0 };
    struct aio_stats st;

    if (!ring_available())
        skip();
    run(&t, "ring", AIO_IO_URING, submit_all);
    assert_int_equal(t.done, NREQ);
    assert_int_equal(t.bad, 0);
    aio_get_stats(t.l, &st);
    assert_int_equal(st.submit_calls, 1);           /* the turn's 8 requests, one call */
    assert_int_equal(st.ring_completions, NREQ);
    assert_true(st.ring_wakeups >= 1 && st.ring_wakeups <= NREQ);
    assert_int_equal(st.efd_reads, 0);              /* no eventfd in the ring's path */
    loop_free(t.l);
}

/* Each completion submits the next request from its callback: one submit
 * call per loop turn, each reaped from the ring. */
static void chain_done(struct aio_req *r, int64_t res)
{
    struct aio_test *t = cur;
    int i = (int)(r - t->req);
    if (!loop_in_thread(t->l) || res != BS || t->buf[(size_t)i * BS] != 'a' + i)
        t->bad++;
    t->done++;
    if (i + 1 == NREQ) {
        loop_stop(t->l);
        return;
    }
    prep(t, i + 1, chain_done);
    aio_submit(t->l, t->kind, &t->req[i + 1]);
}

static void submit_first(void *opaque)
{
    struct aio_test *t = opaque;
    prep(t, 0, chain_done);
    aio_submit(t->l, t->kind, &t->req[0]);
}

static void test_ring_chained(void **state)
{
    struct aio_test t = { 0 };
    struct aio_stats st;

    if (!ring_available())
        skip();
    run(&t, "chain", AIO_IO_URING, submit_first);
    assert_int_equal(t.done, NREQ);
    assert_int_equal(t.bad, 0);
    aio_get_stats(t.l, &st);
    assert_int_equal(st.submit_calls, NREQ);
    assert_int_equal(st.ring_completions, NREQ);
    assert_int_equal(st.ring_wakeups, NREQ);
    assert_int_equal(st.efd_reads, 0);
    loop_free(t.l);
}

/* The thread pool still completes through the eventfd, and never the ring. */
static void test_threads_complete_by_eventfd(void **state)
{
    struct aio_test t = { 0 };
    struct aio_stats st;

    run(&t, "threads", AIO_THREADS, submit_all);
    assert_int_equal(t.done, NREQ);
    assert_int_equal(t.bad, 0);
    aio_get_stats(t.l, &st);
    assert_int_equal(st.submit_calls, 0);
    assert_int_equal(st.ring_completions, 0);
    assert_true(st.efd_reads >= 1 && st.efd_reads <= NREQ);
    loop_free(t.l);
}

/* ---- polling and io_uring completions ---- */

/* A "device" that answers each read after delay_us: a pipe an io_uring
 * ring reads from (io_uring waits for the data inside the ring), written
 * by a thread once the loop has submitted the read.  The ring is the
 * loop's engine (aio_submit), or one of the test's own that the loop
 * watches as a FUSE-over-io_uring queue watches its ring. */
struct devwait {
    struct loop *l;
    int pfd[2];
    sem_t go;
    unsigned delay_us;
    int rounds, left;
    bool own_ring;
    struct io_uring ring;
    struct loop_watch *watch;
    struct aio_req req;
    struct iovec iov;
    char byte;
    int bad;
    struct loop_poll_stats early;   /* after the 4th round: start-up is over */
};

static void *device_thread(void *opaque)
{
    struct devwait *d = opaque;
    for (int i = 0; i < d->rounds; i++) {
        sem_wait(&d->go);
        usleep(d->delay_us);            /* the device's time, not a synchronisation */
        if (write(d->pfd[1], "x", 1) != 1)
            d->bad++;
    }
    return NULL;
}

static void devwait_done(struct aio_req *r, int64_t res);

static void devwait_submit(void *opaque)
{
    struct devwait *d = opaque;
    if (d->own_ring) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&d->ring);
        io_uring_prep_read(sqe, d->pfd[0], &d->byte, 1, 0);
        if (io_uring_submit(&d->ring) != 1)
            d->bad++;
    } else {
        d->iov = (struct iovec){ &d->byte, 1 };
        d->req = (struct aio_req){ .op = AIO_OP_READ, .fd = d->pfd[0], .iov = &d->iov,
                                   .iovcnt = 1, .len = 1, .flags = AIO_NO_INLINE,
                                   .done = devwait_done };
        aio_submit(d->l, AIO_IO_URING, &d->req);
    }
    sem_post(&d->go);
}

static void devwait_done(struct aio_req *r, int64_t res)
{
    struct devwait *d = container_of(r, struct devwait, req);
    if (res != 1)
        d->bad++;
    if (d->rounds - d->left == 3)
        loop_get_poll_stats(d->l, &d->early);
    if (--d->left == 0)
        loop_stop(d->l);
    else
        devwait_submit(d);
}

static void own_ring_event(void *opaque, uint32_t revents)
{
    struct devwait *d = opaque;
    struct io_uring_cqe *cqe;
    while (io_uring_peek_cqe(&d->ring, &cqe) == 0) {
        int res = cqe->res;
        io_uring_cqe_seen(&d->ring, cqe);
        devwait_done(&d->req, res);
    }
}

static void run_devwait(struct loop_poll_stats *st, struct loop_poll_stats *early,
                        bool own_ring, uint64_t poll_max, unsigned delay_us)
{
    struct devwait d = { .delay_us = delay_us, .rounds = 16, .left = 16, .own_ring = own_ring };
    pthread_t th;
    assert_int_equal(pipe(d.pfd), 0);
    assert_int_equal(sem_init(&d.go, 0, 0), 0);
    d.l = loop_new("devwait");
    loop_set_poll_ns(d.l, poll_max);
    if (own_ring) {
        assert_int_equal(io_uring_queue_init(4, &d.ring, 0), 0);
        d.watch = loop_watch_fd(d.l, d.ring.ring_fd, LOOP_IN, own_ring_event, &d);
    }
    assert_int_equal(pthread_create(&th, NULL, device_thread, &d), 0);
    loop_call(d.l, devwait_submit, &d);
    loop_run(d.l);
    pthread_join(th, NULL);
    assert_int_equal(d.bad, 0);
    loop_get_poll_stats(d.l, st);
    *early = d.early;
    if (own_ring) {
        loop_watch_del(d.watch);
        io_uring_queue_exit(&d.ring);
    }
    loop_free(d.l);
    close(d.pfd[0]);
    close(d.pfd[1]);
    sem_destroy(&d.go);
}

/* While the engine's ring holds the loop's I/O the loop sleeps, even with
 * poll-max-ns (50 ms) far above the device's time (200 us): polling for
 * the device cost this machine's disk CPU and qd1 throughput. */
static void test_ring_io_not_polled(void **state)
{
    struct loop_poll_stats st, early;
    if (!ring_available())
        skip();
    run_devwait(&st, &early, false, 50000000, 200);
    assert_int_equal(st.polled - early.polled, 0);       /* 12 rounds, no polling */
}

/* A ring of its own (a FUSE-over-io_uring queue's) brings work with the
 * loop's clients' window on: each completion interrupts the sleep with
 * EINTR (io_uring's task work) and the ring's fd is readable right after.
 * Counting that as a second wait, of no time, grew the window to 4 us
 * after every 2 ms sleep and the loop polled in vain before the next one;
 * one resumed wait of 2 ms keeps it at 0.  (The start-up's loop_call can
 * wake the loop for a wait of no time: rounds after the 4th count.) */
static void test_eintr_is_one_wait(void **state)
{
    struct loop_poll_stats st, early;
    if (!ring_available())
        skip();
    run_devwait(&st, &early, true, LOOP_POLL_NS_DEFAULT, 2000);
    assert_int_equal(st.polled - early.polled, 0);
    assert_int_equal(st.window_ns, 0);
}

/* ---- aio=native (Linux AIO) ---- */

static bool native_available(void)
{
    return aio_native_probe() == 0;
}

static void test_native_batched(void **state)
{
    struct aio_test t = { 0 };
    struct aio_stats st;

    if (!native_available())
        skip();
    run(&t, "native", AIO_NATIVE, submit_all);
    assert_int_equal(t.done, NREQ);
    assert_int_equal(t.bad, 0);
    aio_get_stats(t.l, &st);
    assert_int_equal(st.native_submit_calls, 1);    /* the turn's 8 requests, one io_submit */
    assert_int_equal(st.native_completions, NREQ);
    assert_true(st.native_wakeups >= 1 && st.native_wakeups <= NREQ);
    assert_int_equal(st.submit_calls, 0);           /* not the io_uring ring */
    assert_int_equal(st.ring_completions, 0);
    assert_int_equal(st.efd_reads, 0);              /* nor the pool */
    loop_free(t.l);
}

static void test_native_chained(void **state)
{
    struct aio_test t = { 0 };
    struct aio_stats st;

    if (!native_available())
        skip();
    run(&t, "native-chain", AIO_NATIVE, submit_first);
    assert_int_equal(t.done, NREQ);
    assert_int_equal(t.bad, 0);
    aio_get_stats(t.l, &st);
    assert_int_equal(st.native_submit_calls, NREQ);
    assert_int_equal(st.native_completions, NREQ);
    assert_int_equal(st.native_wakeups, NREQ);
    assert_int_equal(st.submit_calls + st.efd_reads, 0);
    loop_free(t.l);
}

/* One request whose result is checked by the test body. */
struct one {
    struct loop *l;
    struct aio_req req;
    struct iovec iov;
    int64_t res;
    bool done, in_thread;
};

static void one_done(struct aio_req *r, int64_t res)
{
    struct one *o = (struct one *)((char *)r - offsetof(struct one, req));
    o->res = res;
    o->done = true;
    o->in_thread = loop_in_thread(o->l);
    loop_stop(o->l);
}

static void one_submit(void *opaque)
{
    struct one *o = opaque;
    aio_submit(o->l, AIO_NATIVE, &o->req);
}

static void run_one(struct one *o, const char *name)
{
    o->l = loop_new(name);
    o->req.done = one_done;
    loop_call(o->l, one_submit, o);
    loop_run(o->l);
    assert_true(o->done);
    assert_true(o->in_thread);
}

/* io_submit refuses the iocb (bad fd): the request fails with -EBADF. */
static void test_native_bad_fd(void **state)
{
    struct one o = { 0 };
    char buf[BS];
    struct aio_stats st;

    if (!native_available())
        skip();
    o.iov = (struct iovec){ buf, BS };
    o.req = (struct aio_req){ .op = AIO_OP_READ, .fd = 1000000, .iov = &o.iov, .iovcnt = 1,
                              .len = BS, .flags = AIO_NO_INLINE };
    run_one(&o, "native-badfd");
    assert_int_equal(o.res, -EBADF);
    aio_get_stats(o.l, &st);
    assert_int_equal(st.native_submit_calls, 1);
    assert_int_equal(st.efd_reads, 0);
    loop_free(o.l);
}

/* The kernel takes the iocb and completes it with an error: a misaligned
 * O_DIRECT buffer on a file system with O_DIRECT (/var/tmp, ext4 here). */
static void test_native_misaligned_direct(void **state)
{
    struct one o = { 0 };
    struct aio_stats st;
    char path[] = "/var/tmp/test-aio-direct.XXXXXX";
    char *buf = NULL;

    if (!native_available())
        skip();
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    char data[2 * BS];
    memset(data, 'q', sizeof(data));    /* data, not a hole: holes are zero-filled unchecked */
    assert_int_equal(pwrite(fd, data, sizeof(data), 0), sizeof(data));
    assert_int_equal(fdatasync(fd), 0);
    int dfd = open(path, O_RDWR | O_DIRECT);
    close(fd);
    unlink(path);
    if (dfd < 0)
        skip();                 /* no O_DIRECT on this file system */
    assert_int_equal(posix_memalign((void **)&buf, BS, 2 * BS), 0);
    o.iov = (struct iovec){ buf + 1, BS };          /* misaligned */
    o.req = (struct aio_req){ .op = AIO_OP_READ, .fd = dfd, .iov = &o.iov, .iovcnt = 1,
                              .len = BS, .flags = AIO_NO_INLINE };
    run_one(&o, "native-misaligned");
    assert_int_equal(o.res, -EINVAL);
    aio_get_stats(o.l, &st);
    assert_int_equal(st.native_submit_calls, 1);
    loop_free(o.l);

    /* and the same buffer aligned reads the data */
    memset(buf, 'x', BS);
    struct one ok = { 0 };
    ok.iov = (struct iovec){ buf, BS };
    ok.req = (struct aio_req){ .op = AIO_OP_READ, .fd = dfd, .iov = &ok.iov, .iovcnt = 1,
                               .offset = BS, .len = BS, .flags = AIO_NO_INLINE };
    run_one(&ok, "native-aligned");
    assert_int_equal(ok.res, BS);
    assert_int_equal(buf[0], 'q');
    assert_int_equal(buf[BS - 1], 'q');
    aio_get_stats(ok.l, &st);
    assert_int_equal(st.native_completions, 1);
    loop_free(ok.l);
    free(buf);
    close(dfd);
}

/* fdatasync is not Linux AIO's: the pool does it (eventfd completion). */
static void test_native_fsync_in_pool(void **state)
{
    struct one o = { 0 };
    struct aio_stats st;
    char path[256];

    if (!native_available())
        skip();
    int fd = make_file(path);
    o.req = (struct aio_req){ .op = AIO_OP_FSYNC, .fd = fd, .flags = AIO_NO_INLINE };
    run_one(&o, "native-fsync");
    assert_int_equal(o.res, 0);
    aio_get_stats(o.l, &st);
    assert_int_equal(st.native_submit_calls, 0);
    assert_int_equal(st.native_completions, 0);
    assert_true(st.efd_reads >= 1);
    loop_free(o.l);
    close(fd);
    unlink(path);
}

/* More requests in one turn than the context has slots (1024): the rest
 * wait for slots and every one completes with its data; writes vectored. */
#define MANY 1500

struct many {
    struct loop *l;
    int fd, done, bad;
    struct aio_req req[MANY];
    struct iovec iov[MANY][2];
    char (*buf)[BS];
};

static void many_done(struct aio_req *r, int64_t res)
{
    struct many *m = cur_many;
    int i = (int)(r - m->req);
    if (!loop_in_thread(m->l) || res != BS || m->buf[i][0] != 'a' + i % NREQ ||
        m->buf[i][BS - 1] != 'a' + i % NREQ)
        m->bad++;
    if (++m->done == MANY)
        loop_stop(m->l);
}

static void many_submit(void *opaque)
{
    struct many *m = opaque;
    for (int i = 0; i < MANY; i++) {
        /* two halves: a vectored read (IOCB_CMD_PREADV) */
        m->iov[i][0] = (struct iovec){ m->buf[i], BS / 2 };
        m->iov[i][1] = (struct iovec){ m->buf[i] + BS / 2, BS / 2 };
        m->req[i] = (struct aio_req){ .op = AIO_OP_READ, .fd = m->fd, .iov = m->iov[i],
                                      .iovcnt = 2, .offset = (uint64_t)(i % NREQ) * BS,
                                      .len = BS, .flags = AIO_NO_INLINE, .done = many_done };
        aio_submit(m->l, AIO_NATIVE, &m->req[i]);
    }
}

static void test_native_more_than_slots(void **state)
{
    struct aio_stats st;
    char path[256];

    if (!native_available())
        skip();
    struct many *m = calloc(1, sizeof(*m));
    m->buf = calloc(MANY, BS);
    m->l = loop_new("native-many");
    m->fd = make_file(path);
    cur_many = m;
    loop_call(m->l, many_submit, m);
    loop_run(m->l);
    assert_int_equal(m->done, MANY);
    assert_int_equal(m->bad, 0);
    aio_get_stats(m->l, &st);
    assert_int_equal(st.native_completions, MANY);
    assert_true(st.native_submit_calls >= 2);       /* the waiting ones later */
    assert_int_equal(st.efd_reads, 0);
    loop_free(m->l);
    close(m->fd);
    unlink(path);
    free(m->buf);
    free(m);
}

#define PUSHERS 4
#define PUSHES 20000

struct pusher {
    struct aio_req **head;
    struct aio_req *reqs;
    int wakes;
};

static void *push_all(void *arg)
{
    struct pusher *p = arg;
    for (int i = 0; i < PUSHES; i++) {
        p->reqs[i].offset = i;
        p->wakes += aio_req_push(p->head, &p->reqs[i]);
    }
    return NULL;
}

static void test_handoff_list(void **state)
{
    struct aio_req *head = NULL, one[3] = { { .offset = 0 }, { .offset = 1 }, { .offset = 2 } };

    assert_null(aio_req_take_all(&head));
    assert_true(aio_req_push(&head, &one[0]));      /* empty: the pusher wakes the loop */
    assert_false(aio_req_push(&head, &one[1]));
    assert_false(aio_req_push(&head, &one[2]));
    struct aio_req *r = aio_req_take_all(&head);
    for (int i = 0; i < 3; i++, r = r->next)
        assert_int_equal(r->offset, i);             /* oldest first */
    assert_null(r);
    assert_null(head);

    /* threads pushing while the consumer takes: nothing lost, each
     * thread's requests in its own order */
    struct pusher p[PUSHERS];
    pthread_t t[PUSHERS];
    for (int i = 0; i < PUSHERS; i++) {
        p[i] = (struct pusher){ .head = &head, .reqs = calloc(PUSHES, sizeof(struct aio_req)) };
        assert_int_equal(pthread_create(&t[i], NULL, push_all, &p[i]), 0);
    }
    int64_t next[PUSHERS] = { 0 }, seen = 0, takes = 0;
    while (seen < PUSHERS * PUSHES) {
        struct aio_req *r = aio_req_take_all(&head);
        takes += r != NULL;
        for (; r; r = r->next, seen++) {
            int who = -1;
            for (int i = 0; i < PUSHERS; i++)
                if (r >= p[i].reqs && r < p[i].reqs + PUSHES)
                    who = i;
            assert_true(who >= 0);
            assert_int_equal(r->offset, next[who]);
            next[who]++;
        }
    }
    int wakes = 0;
    for (int i = 0; i < PUSHERS; i++) {
        pthread_join(t[i], NULL);
        wakes += p[i].wakes;
        free(p[i].reqs);
    }
    assert_int_equal(wakes, takes);     /* one wake-up per non-empty list taken */
    assert_null(head);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ring_reaped_without_eventfd),
        cmocka_unit_test(test_ring_chained),
        cmocka_unit_test(test_threads_complete_by_eventfd),
        cmocka_unit_test(test_ring_io_not_polled),
        cmocka_unit_test(test_eintr_is_one_wait),
        cmocka_unit_test(test_native_batched),
        cmocka_unit_test(test_native_chained),
        cmocka_unit_test(test_native_bad_fd),
        cmocka_unit_test(test_native_misaligned_direct),
        cmocka_unit_test(test_native_fsync_in_pool),
        cmocka_unit_test(test_native_more_than_slots),
        cmocka_unit_test(test_handoff_list),
    };
    loop_main_init();
    return cmocka_run_group_tests(tests, NULL, NULL);
}
