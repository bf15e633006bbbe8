/*
 * The file I/O engine (util/aio.c): ring completions are reaped from the
 * ring's own fd (no eventfd read), a loop turn's submissions go in one
 * io_uring_submit, and thread completions still arrive through the
 * eventfd.  Requests use AIO_NO_INLINE, so the ring takes them whatever the
 * file system (no O_DIRECT needed).
 */
#include <fcntl.h>
#include <stdio.h>
#include <liburing.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include "util/aio.h"
#include "util/loop.h"

#define NREQ 8
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ring_reaped_without_eventfd),
        cmocka_unit_test(test_ring_chained),
        cmocka_unit_test(test_threads_complete_by_eventfd),
    };
    loop_main_init();
    return cmocka_run_group_tests(tests, NULL, NULL);
}
