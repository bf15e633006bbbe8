/* Unit tests of the coroutine core (enter/yield, pool, queues, the fair
 * mutex, wake-ups across loop threads) and of the block layer's coroutine
 * wrappers on real nodes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <pthread.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include "block/block.h"
#include "util/coroutine.h"
#include "util/loop.h"
#include "util/thread-exit.h"

static int trace[64];
static int ntrace;

static void mark(int v) { trace[ntrace++] = v; }

static void stop_main(void *opaque) { loop_stop(loop_main()); }

/* ---- enter / yield ---- */

static void two_steps(void *opaque)
{
    mark(1);
    co_yield();
    mark(3);
}

static void test_enter_yield_finish(void **state)
{
    ntrace = 0;
    unsigned before = co_alive_count();
    struct coroutine *co = co_create(two_steps, NULL);
    assert_int_equal(co_alive_count(), before + 1);
    co_enter(co);
    mark(2);
    assert_null(co_self());
    co_enter(co);
    mark(4);
    assert_int_equal(ntrace, 4);
    for (int i = 0; i < 4; i++)
        assert_int_equal(trace[i], i + 1);
    assert_int_equal(co_alive_count(), before);
}

static void inner(void *opaque)
{
    struct coroutine *outer = opaque;
    assert_ptr_not_equal(co_self(), outer);
    mark(2);
    co_yield();                 /* back to outer, not to the thread */
    mark(5);
}

static void outer_fn(void *opaque)
{
    struct coroutine **in = opaque;
    mark(1);
    *in = co_create(inner, co_self());
    co_enter(*in);
    mark(3);
    co_yield();
    mark(6);
}

static void test_nested_enter_returns_to_caller(void **state)
{
    ntrace = 0;
    struct coroutine *in = NULL;
    struct coroutine *out = co_create(outer_fn, &in);
    co_enter(out);
    mark(4);
    co_enter(in);               /* inner resumes from the thread this time */
    co_enter(out);
    assert_int_equal(ntrace, 6);
    for (int i = 0; i < 6; i++)
        assert_int_equal(trace[i], i + 1);
}

/* Deep frames: the stack is large enough for real work, and recycled
 * coroutines start each time on a fresh frame. */
static int recurse(int n);
static int (*volatile recurse_ptr)(int) = recurse;   /* no tail call, no loop */

static int recurse(int n)
{
    volatile char pad[512];
    pad[0] = (char)n;
    return n == 0 ? pad[0] : recurse_ptr(n - 1) + 1 + pad[0] * 0;
}

static void deep(void *opaque)
{
    *(int *)opaque = recurse(500);  /* ~300 KiB of stack */
}

static void test_pool_reuses_coroutines(void **state)
{
    co_pool_drain();
    int r = 0;
    struct coroutine *first = co_create(deep, &r);
    co_enter(first);
    assert_int_equal(r, 500);
    for (int i = 0; i < 1000; i++) {
        struct coroutine *co = co_create(deep, &r);
        assert_ptr_equal(co, first);       /* the pooled one, no new stack */
        r = 0;
        co_enter(co);
        assert_int_equal(r, 500);
    }
    co_pool_drain();
}

static void overflow(void *opaque)
{
    recurse(1 << 20);                       /* far past CO_STACK_SIZE */
}

static void test_guard_page_catches_overflow(void **state)
{
#ifdef __SANITIZE_ADDRESS__
    skip();                                 /* ASan reports the overflow itself */
#endif
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        signal(SIGSEGV, SIG_DFL);           /* cmocka catches it otherwise */
        co_enter(co_create(overflow, NULL));
        _exit(0);
    }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status));
    assert_int_equal(WTERMSIG(status), SIGSEGV);
}

/* ---- queues and mutex in one loop ---- */

static struct co_queue q;
static int woken;

static void waiter(void *opaque)
{
    co_queue_wait(&q, NULL);
    mark((int)(intptr_t)opaque);
    woken++;
}

static void test_queue_wake_one_and_all(void **state)
{
    ntrace = 0;
    woken = 0;
    co_queue_init(&q);
    for (int i = 1; i <= 3; i++)
        co_enter(co_create(waiter, (void *)(intptr_t)i));
    assert_false(co_queue_empty(&q));
    assert_true(co_queue_wake_one(&q));
    assert_int_equal(woken, 0);             /* deferred: never inside the call */
    struct loop_defer s = { .fn = stop_main };
    loop_defer(loop_main(), &s);
    loop_run(loop_main());
    assert_int_equal(woken, 1);
    assert_int_equal(trace[0], 1);
    co_queue_wake_all(&q);
    loop_defer(loop_main(), &s);
    loop_run(loop_main());
    assert_int_equal(woken, 3);
    assert_int_equal(trace[1], 2);
    assert_int_equal(trace[2], 3);
    assert_true(co_queue_empty(&q));
    assert_false(co_queue_wake_one(&q));
    co_queue_destroy(&q);
}

static struct co_mutex mtx;

static void locker(void *opaque)
{
    co_mutex_lock(&mtx);
    assert_true(co_mutex_held_by_self(&mtx));
    mark((int)(intptr_t)opaque);
    co_yield();                 /* hold it across a yield */
    co_mutex_unlock(&mtx);
}

static void test_mutex_is_fifo(void **state)
{
    ntrace = 0;
    co_mutex_init(&mtx);
    struct coroutine *co[4];
    for (int i = 0; i < 4; i++) {
        co[i] = co_create(locker, (void *)(intptr_t)i);
        co_enter(co[i]);        /* 0 takes it; 1, 2, 3 queue in this order */
    }
    assert_int_equal(ntrace, 1);
    co_enter(co[0]);            /* 0 unlocks: 1 becomes the holder, woken later */
    struct loop_defer s = { .fn = stop_main };
    loop_defer(loop_main(), &s);
    loop_run(loop_main());
    assert_int_equal(ntrace, 2);
    for (int i = 1; i < 4; i++) {
        co_enter(co[i]);
        loop_defer(loop_main(), &s);
        loop_run(loop_main());
    }
    assert_int_equal(ntrace, 4);
    for (int i = 0; i < 4; i++)
        assert_int_equal(trace[i], i);
    co_mutex_destroy(&mtx);
}

/* ---- across loop threads ---- */

#define ROUNDS 2000
static long counter;
static int finished;
static pthread_mutex_t fin_lock = PTHREAD_MUTEX_INITIALIZER;
static struct loop *other;

static void contender(void *opaque)
{
    for (int i = 0; i < ROUNDS; i++) {
        co_mutex_lock(&mtx);
        long v = counter;
        if (i % 7 == 0)
            co_wake(co_self()), co_yield();   /* yield while holding it */
        counter = v + 1;
        co_mutex_unlock(&mtx);
    }
    pthread_mutex_lock(&fin_lock);
    if (++finished == 4)
        loop_call(loop_main(), stop_main, NULL);
    pthread_mutex_unlock(&fin_lock);
}

static void start_two(void *opaque)
{
    co_enter(co_create(contender, NULL));
    co_enter(co_create(contender, NULL));
}

static void *other_thread(void *arg)
{
    loop_run(other);
    return NULL;            /* its coroutine pool is freed at thread exit */
}

static void stop_other(void *opaque) { loop_stop(other); }

static void test_mutex_across_threads(void **state)
{
    counter = 0;
    finished = 0;
    co_mutex_init(&mtx);
    other = loop_new("other");
    pthread_t t;
    pthread_create(&t, NULL, other_thread, NULL);
    loop_call(other, start_two, NULL);
    start_two(NULL);
    loop_run(loop_main());
    assert_int_equal(counter, 4 * ROUNDS);
    loop_call(other, stop_other, NULL);
    pthread_join(t, NULL);
    loop_free(other);
    co_mutex_destroy(&mtx);
}

/* ---- work left at thread exit ---- */

static int exit_runs;
static int rearms;

static void count_exit(void) { exit_runs += 1; }
static void rearm_once(void);

static __thread struct thread_exit_hook count_hook = THREAD_EXIT_HOOK(count_exit);
static __thread struct thread_exit_hook rearm_hook = THREAD_EXIT_HOOK(rearm_once);

/* A hook whose function arms it again (a pool refilled while it drains)
 * runs again: glibc calls the key's destructor once more. */
static void rearm_once(void)
{
    exit_runs += 10;
    if (rearms++ == 0)
        thread_exit_arm(&rearm_hook);
}

static void nothing(void *opaque) { (void)opaque; }

static void *arm_and_exit(void *opaque)
{
    thread_exit_arm(&count_hook);
    thread_exit_arm(&count_hook);           /* armed once, runs once */
    if (opaque)
        thread_exit_arm(&rearm_hook);
    /* Coroutines finished here are pooled in this thread; its exit hook
     * frees them (LeakSanitizer reports them otherwise). */
    struct coroutine *co[4];
    for (int i = 0; i < 4; i++)
        co[i] = co_create(nothing, NULL);
    for (int i = 0; i < 4; i++)
        co_enter(co[i]);
    return NULL;
}

static void test_thread_exit_hooks(void **state)
{
    pthread_t t;
    exit_runs = 0;
    rearms = 0;
    assert_int_equal(pthread_create(&t, NULL, arm_and_exit, NULL), 0);
    pthread_join(t, NULL);
    assert_int_equal(exit_runs, 1);
    /* the main thread's hooks are its own: not run by another's exit */
    assert_false(count_hook.armed);

    exit_runs = 0;
    static int rearm = 1;
    assert_int_equal(pthread_create(&t, NULL, arm_and_exit, &rearm), 0);
    pthread_join(t, NULL);
    assert_int_equal(exit_runs, 1 + 10 + 10);
    assert_int_equal(rearms, 2);
    assert_int_equal(co_alive_count(), 0);
}

/* ---- block layer wrappers ---- */

static char path[64];

static struct bnode *add(const char *json)
{
    error *err = NULL;
    json_t *opts = json_loads(json, 0, NULL);
    struct bnode *bs = blockdev_add(opts, &err);
    if (!bs)
        fail_msg("blockdev_add: %s", err->msg);
    json_decref(opts);
    return bs;
}

struct io_case {
    struct bnode *file, *null;
    int rets[8];
};

static void io_body(void *opaque)
{
    struct io_case *c = opaque;
    char buf[8192], back[8192];
    memset(buf, 0x5a, sizeof(buf));
    c->rets[0] = bnode_co_pwrite(c->file, 4096, sizeof(buf), buf, 0);
    memset(back, 0, sizeof(back));
    c->rets[1] = bnode_co_pread(c->file, 4096, sizeof(back), back, 0);
    c->rets[2] = memcmp(buf, back, sizeof(buf));
    c->rets[3] = bnode_co_flush(c->file);
    /* null-co completes inside bnode_submit: no yield, same result */
    memset(back, 1, sizeof(back));
    c->rets[4] = bnode_co_pread(c->null, 0, sizeof(back), back, 0);
    c->rets[5] = back[0] | back[sizeof(back) - 1];
    /* out of range without BEYOND_EOF: refused; with it the file grows */
    c->rets[6] = bnode_co_pwrite(c->file, c->file->size, 512, buf, 0);
    c->rets[7] = bnode_co_pwrite(c->file, c->file->size + 4096, 512, buf, BREQ_BEYOND_EOF);
    loop_stop(loop_main());
}

static void test_block_wrappers(void **state)
{
    strcpy(path, "/tmp/bexd-co-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, 1 << 20), 0);
    close(fd);
    char json[256];
    snprintf(json, sizeof(json), "{\"driver\":\"file\",\"node-name\":\"f\",\"filename\":\"%s\"}",
             path);
    struct io_case c = { .file = add(json),
                         .null = add("{\"driver\":\"null-co\",\"node-name\":\"n\","
                                     "\"read-zeroes\":true}") };
    assert_int_equal(bnode_ref_user(c.file, true, NULL), 0);
    co_enter(co_create(io_body, &c));
    loop_run(loop_main());
    assert_int_equal(c.rets[0], 0);
    assert_int_equal(c.rets[1], 0);
    assert_int_equal(c.rets[2], 0);
    assert_int_equal(c.rets[3], 0);
    assert_int_equal(c.rets[4], 0);
    assert_int_equal(c.rets[5], 0);
    assert_int_equal(c.rets[6], -EINVAL);
    assert_int_equal(c.rets[7], 0);
    assert_int_equal(c.file->size, (1 << 20) + 4096 + 512);
    bnode_unref_user(c.file, true);
    assert_int_equal(blockdev_del("f", NULL), 0);
    assert_int_equal(blockdev_del("n", NULL), 0);
    unlink(path);
}

int main(void)
{
    loop_main_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_enter_yield_finish),
        cmocka_unit_test(test_nested_enter_returns_to_caller),
        cmocka_unit_test(test_pool_reuses_coroutines),
        cmocka_unit_test(test_guard_page_catches_overflow),
        cmocka_unit_test(test_queue_wake_one_and_all),
        cmocka_unit_test(test_mutex_is_fifo),
        cmocka_unit_test(test_mutex_across_threads),
        cmocka_unit_test(test_thread_exit_hooks),
        cmocka_unit_test(test_block_wrappers),
    };
    int r = cmocka_run_group_tests(tests, NULL, NULL);
    co_pool_drain();
    return r;
}
