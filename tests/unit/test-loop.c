/* Unit tests of the event loop: timers, defers, cross-thread calls, watches. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <pthread.h>
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

int main(void)
{
    loop_main_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_timers_fire_in_deadline_order),
        cmocka_unit_test(test_defer_runs_once_before_sleep),
        cmocka_unit_test(test_defer_cancel),
        cmocka_unit_test(test_call_from_other_thread_wakes_loop),
        cmocka_unit_test(test_watch_delete_inside_callback),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
