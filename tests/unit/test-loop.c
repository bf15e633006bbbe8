/* Unit tests of the event loop: timers, defers, cross-thread calls, watches. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>
#include "util/loop.h"

static int order[8];
static int norder;

static void record(void *opaque)
{
    order[norder++] = (int)(intptr_t)opaque;
}

static void stop_main(void *opaque)
{
    loop_stop(loop_main());
}

static void test_timers_fire_in_deadline_order(void **state)
{
    norder = 0;
    struct loop_timer *a = loop_timer_new(loop_main(), record, (void *)1);
    struct loop_timer *b = loop_timer_new(loop_main(), record, (void *)2);
    struct loop_timer *c = loop_timer_new(loop_main(), record, (void *)3);
    struct loop_timer *end = loop_timer_new(loop_main(), stop_main, NULL);
    loop_timer_arm(c, 30);
    loop_timer_arm(a, 10);
    loop_timer_arm(b, 20);
    loop_timer_arm(end, 40);
    struct loop_timer *cancelled = loop_timer_new(loop_main(), record, (void *)9);
    loop_timer_arm(cancelled, 5);
    loop_timer_cancel(cancelled);
    loop_run(loop_main());
    assert_int_equal(norder, 3);
    assert_int_equal(order[0], 1);
    assert_int_equal(order[1], 2);
    assert_int_equal(order[2], 3);
    loop_timer_free(a);
    loop_timer_free(b);
    loop_timer_free(c);
    loop_timer_free(end);
    loop_timer_free(cancelled);
}

static void test_defer_runs_once_before_sleep(void **state)
{
    norder = 0;
    struct loop_defer d = { .fn = record, .opaque = (void *)7 };
    loop_defer(loop_main(), &d);
    loop_defer(loop_main(), &d);          /* already pending: not queued twice */
    struct loop_defer s = { .fn = stop_main };
    loop_defer(loop_main(), &s);
    loop_run(loop_main());
    assert_int_equal(norder, 1);
    assert_int_equal(order[0], 7);
}

static void test_defer_cancel(void **state)
{
    /* a cancelled defer never runs, wherever it sat in the queue, and the
     * queue stays usable (its tail too) */
    norder = 0;
    struct loop_defer a = { .fn = record, .opaque = (void *)1 };
    struct loop_defer b = { .fn = record, .opaque = (void *)2 };
    struct loop_defer c = { .fn = record, .opaque = (void *)3 };
    struct loop_defer s = { .fn = stop_main };
    loop_defer(loop_main(), &a);
    loop_defer(loop_main(), &b);
    loop_defer(loop_main(), &c);
    loop_defer_cancel(loop_main(), &b);     /* middle */
    loop_defer_cancel(loop_main(), &c);     /* tail */
    loop_defer_cancel(loop_main(), &c);     /* not pending: nothing */
    assert_false(b.pending);
    assert_false(c.pending);
    loop_defer(loop_main(), &c);            /* queued again, after a */
    loop_defer(loop_main(), &s);
    loop_run(loop_main());
    assert_int_equal(norder, 2);
    assert_int_equal(order[0], 1);
    assert_int_equal(order[1], 3);
    norder = 0;
    loop_defer(loop_main(), &a);
    loop_defer_cancel(loop_main(), &a);     /* the only one: head and tail */
    loop_defer(loop_main(), &s);
    loop_run(loop_main());
    assert_int_equal(norder, 0);
}

static void *caller_thread(void *arg)
{
    loop_call(loop_main(), record, (void *)5);
    loop_call(loop_main(), stop_main, NULL);
    return NULL;
}

static void test_call_from_other_thread_wakes_loop(void **state)
{
    norder = 0;
    pthread_t t;
    pthread_create(&t, NULL, caller_thread, NULL);
    loop_run(loop_main());               /* would block forever without the wake-up */
    pthread_join(t, NULL);
    assert_int_equal(norder, 1);
    assert_int_equal(order[0], 5);
}

struct pair {
    int fds[2];
    struct loop_watch *w[2];
    int calls;
};

static void on_readable(void *opaque, uint32_t ev)
{
    struct pair *p = opaque;
    p->calls++;
    /* delete both watches from inside the first callback: the second
     * event of the same batch must be skipped, not dispatched to freed memory */
    loop_watch_del(p->w[0]);
    loop_watch_del(p->w[1]);
    loop_stop(loop_main());
}

static void test_watch_delete_inside_callback(void **state)
{
    struct pair p = { 0 };
    int a[2], b[2];
    assert_int_equal(pipe(a), 0);
    assert_int_equal(pipe(b), 0);
    assert_int_equal(write(a[1], "x", 1), 1);
    assert_int_equal(write(b[1], "x", 1), 1);
    p.w[0] = loop_watch_fd(loop_main(), a[0], LOOP_IN, on_readable, &p);
    p.w[1] = loop_watch_fd(loop_main(), b[0], LOOP_IN, on_readable, &p);
    loop_run(loop_main());
    assert_int_equal(p.calls, 1);
    close(a[0]); close(a[1]); close(b[0]); close(b[1]);
}

/* QEMU's adjust_polling_time, with poll-grow / poll-shrink */
static void test_poll_adjust_rules(void **state)
{
    const uint64_t max = 32768;
    /* covered by the window: no change */
    assert_int_equal(loop_poll_adjust(8000, 8000, max, 0, 0), 8000);
    assert_int_equal(loop_poll_adjust(0, 0, max, 0, 0), 0);
    /* short sleeps grow it: from 4 us, doubling by default, capped */
    assert_int_equal(loop_poll_adjust(0, 1000, max, 0, 0), 4000);
    assert_int_equal(loop_poll_adjust(4000, 5000, max, 0, 0), 8000);
    assert_int_equal(loop_poll_adjust(16384, 20000, max, 0, 0), max);
    assert_int_equal(loop_poll_adjust(20000, 30000, max, 0, 0), max);
    /* poll-grow multiplies instead */
    assert_int_equal(loop_poll_adjust(4000, 5000, max, 3, 0), 12000);
    assert_int_equal(loop_poll_adjust(12000, 20000, max, 3, 0), max);
    /* a sleep of exactly the maximum: neither grows nor shrinks */
    assert_int_equal(loop_poll_adjust(8000, max, max, 0, 0), 8000);
    /* a long sleep: polling stops, or poll-shrink divides */
    assert_int_equal(loop_poll_adjust(max, max + 1, max, 0, 0), 0);
    assert_int_equal(loop_poll_adjust(max, 1000000, max, 0, 4), max / 4);
    assert_int_equal(loop_poll_adjust(8192, 1000000, max, 2, 2), 4096);
    /* no overflow with a huge grow factor */
    assert_int_equal(loop_poll_adjust(4000, 5000, UINT64_MAX, UINT64_MAX, 0), UINT64_MAX);
}

struct skip_test {
    struct loop *l;
    int fds[2];
    int calls;
    struct loop_poll_stats st[4];
};

/* The pipe is written again at once, so every wait is far shorter than the
 * (1 s) maximum: deterministic whatever the machine's load. */
static void skip_readable(void *opaque, uint32_t ev)
{
    struct skip_test *t = opaque;
    char c;
    assert_int_equal(read(t->fds[0], &c, 1), 1);
    loop_get_poll_stats(t->l, &t->st[t->calls]);
    t->calls++;
    if (t->calls == 3) {
        loop_stop(t->l);
        return;
    }
    assert_int_equal(write(t->fds[1], "x", 1), 1);
    if (t->calls == 2)
        loop_poll_skip(t->l);
}

/* Run a loop with poll-max-ns = max_ns over a pipe that skip_readable
 * keeps readable; t->st holds the poll statistics of its three sleeps. */
static void run_skip_loop(struct skip_test *t, const char *name, uint64_t max_ns)
{
    t->l = loop_new(name);
    assert_int_equal(pipe(t->fds), 0);
    loop_set_poll_ns(t->l, max_ns);
    assert_int_equal(write(t->fds[1], "x", 1), 1);
    struct loop_watch *w = loop_watch_fd(t->l, t->fds[0], LOOP_IN, skip_readable, t);
    loop_run(t->l);
    assert_int_equal(t->calls, 3);
    loop_watch_del(w);
    close(t->fds[0]);
    close(t->fds[1]);
    loop_free(t->l);
}

static void test_poll_skip(void **state)
{
    struct skip_test t = { 0 };
    run_skip_loop(&t, "skip", 1000000000);
    /* 1st sleep: no window yet, so no polling; it was short: 4 us */
    assert_int_equal(t.st[0].polled, 0);
    assert_int_equal(t.st[0].window_ns, 4000);
    /* 2nd: polled (and found the pipe at once: the window stays) */
    assert_int_equal(t.st[1].polled, 1);
    assert_int_equal(t.st[1].skipped, 0);
    assert_int_equal(t.st[1].window_ns, 4000);
    /* 3rd: skipped as asked, neither polled nor adapted */
    assert_int_equal(t.st[2].polled, 1);
    assert_int_equal(t.st[2].skipped, 1);
    assert_int_equal(t.st[2].window_ns, 4000);
}

/* poll-max-ns=0: never polls, and a skip then counts nothing */
static void test_poll_disabled(void **state)
{
    struct skip_test t = { 0 };
    run_skip_loop(&t, "nopoll", 0);
    assert_int_equal(t.st[2].polled, 0);
    assert_int_equal(t.st[2].skipped, 0);
    assert_int_equal(t.st[2].window_ns, 0);
}

int main(void)
{
    loop_main_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_timers_fire_in_deadline_order),
        cmocka_unit_test(test_defer_runs_once_before_sleep),
        cmocka_unit_test(test_defer_cancel),
        cmocka_unit_test(test_call_from_other_thread_wakes_loop),
        cmocka_unit_test(test_watch_delete_inside_callback),
        cmocka_unit_test(test_poll_adjust_rules),
        cmocka_unit_test(test_poll_skip),
        cmocka_unit_test(test_poll_disabled),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
