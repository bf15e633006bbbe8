/*
 * Coroutines (see coroutine.h).
 *
 * Theory of operation.  Each coroutine has an mmap'ed stack with a
 * PROT_NONE guard page at its low end.  On x86_64 a context is just a saved
 * stack pointer: co_switch() pushes the callee-saved registers, stores rsp,
 * loads the other rsp, pops and returns there; a fresh stack is laid out so
 * that this "return" lands in a trampoline that calls co_main().  Other
 * architectures use ucontext (slower: it saves the signal mask).
 *
 * Each thread has a current coroutine (NULL = the thread's own stack).
 * co_enter() remembers the current one as the callee's caller and switches;
 * co_yield() switches back to the caller.  A coroutine that returns from
 * its function marks itself finished and switches back for the last time;
 * co_enter() then puts it in the thread's pool (up to POOL_MAX) or frees it.
 *
 * Wake-ups never enter the coroutine inside the call: the same thread
 * queues it on a per-thread ready list drained by a loop_defer, another
 * thread posts it with loop_call() to the coroutine's loop.
 *
 * AddressSanitizer must know which stack is live: every switch is wrapped
 * in __sanitizer_start_switch_fiber / __sanitizer_finish_switch_fiber.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "util/coroutine.h"
#include "util/loop.h"
#include "util/log.h"
#include "util/thread-exit.h"
#include "util/xalloc.h"

#if defined(__SANITIZE_ADDRESS__)
#define CO_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CO_ASAN 1
#endif
#endif

#ifdef CO_ASAN
void __sanitizer_start_switch_fiber(void **fake_stack_save, const void *bottom, size_t size);
void __sanitizer_finish_switch_fiber(void *fake_stack_save, const void **bottom_old,
                                     size_t *size_old);
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

/* Finished coroutines kept per thread for reuse.  A backup job runs up to
 * 64 copies (x-perf max-workers), each a coroutine with a qcow2 request
 * coroutine under it: with 64 kept, every wave of copies mapped, faulted in
 * and unmapped ~64 stacks again (a push backup of 10% of 1 GiB: 0.17-0.26 s
 * of CPU at 64 workers, 0.09-0.13 s with 256 kept, as at 16 workers).  A
 * kept stack holds only the pages it touched. */
#define POOL_MAX 256

struct coroutine {
#if defined(__x86_64__)
    void *sp;                      /* saved stack pointer while switched out */
#else
    ucontext_t uc;
#endif
    co_fn *fn;
    void *opaque;
    struct loop *loop;
    struct coroutine *caller;      /* who entered it (NULL = thread stack) */
    struct coroutine *next;        /* pool / ready list */
    void *map;                     /* mmap'ed region (guard page + stack) */
    size_t map_size;
    bool running, finished;
    bool waits_in_main;            /* co_set_waits_in_main */
#ifdef CO_ASAN
    void *fake_stack;
    const void *caller_bottom;
    size_t caller_size;
#endif
};

/* The thread's own stack, as a context to switch back to. */
struct thread_ctx {
    struct coroutine main;         /* .sp / .uc only */
    struct coroutine *current;
    struct coroutine *pool;
    unsigned pool_len;
    struct coroutine *ready_head, *ready_tail;
    struct loop_defer ready_defer;
    struct loop *ready_loop;
};

static __thread struct thread_ctx tc;
static unsigned alive;              /* atomic */

/* ---- context switch ---- */

#if defined(__x86_64__)
void co_switch(void **save_sp, void *load_sp);
void co_trampoline(void);
__asm__(
    ".text\n"
    ".globl co_switch\n"
    ".type co_switch,@function\n"
    "co_switch:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    ".size co_switch,.-co_switch\n"
    ".globl co_trampoline\n"
    ".type co_trampoline,@function\n"
    "co_trampoline:\n"
    "    movq %r12, %rdi\n"
    "    call co_main\n"
    "    ud2\n"
    ".size co_trampoline,.-co_trampoline\n"
    ".section .note.GNU-stack,\"\",@progbits\n"
    ".text\n");
#endif

void co_main(struct coroutine *co);

static void switch_to(struct coroutine *from, struct coroutine *to)
{
#if defined(__x86_64__)
    co_switch(&from->sp, to->sp);
#else
    swapcontext(&from->uc, &to->uc);
#endif
}

#if !defined(__x86_64__)
static void uc_entry(unsigned hi, unsigned lo)
{
    co_main((struct coroutine *)(((uintptr_t)hi << 32) | lo));
}
#endif

static inline void *stack_bottom(struct coroutine *co) { return (char *)co->map + sysconf(_SC_PAGESIZE); }

/* Lay out a fresh stack whose first switch runs co_main(co). */
static void prepare(struct coroutine *co)
{
#if defined(__x86_64__)
    uintptr_t top = ((uintptr_t)co->map + co->map_size) & ~(uintptr_t)15;
    void **sp = (void **)(top - 72);          /* sp % 16 == 8: after 6 pops + ret, rsp is aligned */
    memset(sp, 0, 72);
    sp[3] = co;                                /* popped into r12 */
    sp[6] = (void *)co_trampoline;             /* "returned" to */
    co->sp = sp;
#else
    getcontext(&co->uc);
    co->uc.uc_stack.ss_sp = stack_bottom(co);
    co->uc.uc_stack.ss_size = CO_STACK_SIZE;
    co->uc.uc_link = NULL;
    uintptr_t p = (uintptr_t)co;
    makecontext(&co->uc, (void (*)(void))uc_entry, 2, (unsigned)(p >> 32), (unsigned)p);
#endif
}

#ifdef CO_ASAN
static inline void asan_finish(struct coroutine *self, const void **bottom, size_t *size)
{
    __sanitizer_finish_switch_fiber(self->fake_stack, bottom, size);
}
#endif

/* ---- life cycle ---- */

void co_main(struct coroutine *co)
{
#ifdef CO_ASAN
    asan_finish(co, &co->caller_bottom, &co->caller_size);
#endif
    for (;;) {
        co->fn(co->opaque);
        co->finished = true;
        struct coroutine *to = co->caller ? co->caller : &tc.main;
        tc.current = co->caller;
        co->running = false;
#ifdef CO_ASAN
        /* Back to the caller, whose stack bounds were recorded on entry;
         * NULL: this fiber's fake stack can go. */
        __sanitizer_start_switch_fiber(NULL, co->caller_bottom, co->caller_size);
#endif
        switch_to(co, to);
        /* Recycled from the pool: entered again with a new function. */
#ifdef CO_ASAN
        asan_finish(co, &co->caller_bottom, &co->caller_size);
#endif
    }
}

struct coroutine *co_create(co_fn *fn, void *opaque)
{
    struct coroutine *co = tc.pool;
    if (co) {
        tc.pool = co->next;
        tc.pool_len--;
    } else {
        co = xzalloc(sizeof(*co));
        size_t page = sysconf(_SC_PAGESIZE);
        co->map_size = CO_STACK_SIZE + page;
        co->map = mmap(NULL, co->map_size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
        if (co->map == MAP_FAILED) {
            log_error("cannot map a coroutine stack: %s", strerror(errno));
            abort();
        }
        if (mprotect(co->map, page, PROT_NONE) < 0)
            abort();
        prepare(co);
    }
    co->fn = fn;
    co->opaque = opaque;
    co->loop = loop_current();
    co->caller = NULL;
    co->next = NULL;
    co->finished = false;
    co->waits_in_main = false;
    co->running = false;
    __atomic_add_fetch(&alive, 1, __ATOMIC_RELAXED);
    return co;
}

static void co_free(struct coroutine *co)
{
    munmap(co->map, co->map_size);
    free(co);
}

/* A thread's pool is freed when the thread ends (an iothread whose object
 * is deleted, any worker): its head lives in thread-local storage, so the
 * pooled coroutines (and what their last arguments point to) would
 * otherwise be lost with it.  The hook is armed when the thread first
 * pools a coroutine. */
static __thread struct thread_exit_hook pool_exit = THREAD_EXIT_HOOK(co_pool_drain);

static void recycle(struct coroutine *co)
{
    __atomic_sub_fetch(&alive, 1, __ATOMIC_RELAXED);
    if (tc.pool_len >= POOL_MAX) {
        co_free(co);
        return;
    }
    thread_exit_arm(&pool_exit);
    co->next = tc.pool;
    tc.pool = co;
    tc.pool_len++;
}

void co_pool_drain(void)
{
    while (tc.pool) {
        struct coroutine *co = tc.pool;
        tc.pool = co->next;
        co_free(co);
    }
    tc.pool_len = 0;
}

unsigned co_alive_count(void) { return __atomic_load_n(&alive, __ATOMIC_RELAXED); }

struct coroutine *co_self(void) { return tc.current; }
struct loop *co_loop(const struct coroutine *co) { return co->loop; }

void co_enter(struct coroutine *co)
{
    struct coroutine *from = tc.current ? tc.current : &tc.main;
    if (co->running || co->finished) {
        log_error("coroutine %p entered while %s", (void *)co, co->running ? "running" : "finished");
        abort();
    }
    co->caller = tc.current;
    co->running = true;
    tc.current = co;
#ifdef CO_ASAN
    __sanitizer_start_switch_fiber(&from->fake_stack, stack_bottom(co), CO_STACK_SIZE);
#endif
    switch_to(from, co);
#ifdef CO_ASAN
    __sanitizer_finish_switch_fiber(from->fake_stack, NULL, NULL);
#endif
    /* Back here: co yielded or finished; tc.current is our context again. */
    if (co->finished)
        recycle(co);
}

void co_yield(void)
{
    struct coroutine *co = tc.current;
    if (!co) {
        log_error("co_yield outside a coroutine");
        abort();
    }
    struct coroutine *to = co->caller ? co->caller : &tc.main;
    tc.current = co->caller;
    co->running = false;
#ifdef CO_ASAN
    __sanitizer_start_switch_fiber(&co->fake_stack, co->caller_bottom, co->caller_size);
#endif
    switch_to(co, to);
#ifdef CO_ASAN
    asan_finish(co, &co->caller_bottom, &co->caller_size);
#endif
}

/* ---- wake-ups ---- */

static void run_ready(void *opaque)
{
    while (tc.ready_head) {
        struct coroutine *co = tc.ready_head;
        tc.ready_head = co->next;
        if (!tc.ready_head)
            tc.ready_tail = NULL;
        co->next = NULL;
        co_enter(co);
    }
}

static void enter_posted(void *opaque)
{
    co_enter(opaque);
}

void co_wake(struct coroutine *co)
{
    struct loop *here = loop_current();
    if (co->loop && co->loop != here) {
        loop_call(co->loop, enter_posted, co);
        return;
    }
    if (!here) {                 /* a thread without a loop: nothing defers */
        co_enter(co);
        return;
    }
    co->next = NULL;
    if (tc.ready_tail)
        tc.ready_tail->next = co;
    else
        tc.ready_head = co;
    tc.ready_tail = co;
    if (tc.ready_loop != here) {
        tc.ready_loop = here;
        tc.ready_defer = (struct loop_defer){ .fn = run_ready };
    }
    loop_defer(here, &tc.ready_defer);
}

/* ---- wait queues ---- */

struct co_waiter {
    struct coroutine *co;
    struct co_waiter *next;
};

static void waiter_push(struct co_waiter **head, struct co_waiter **tail, struct co_waiter *w)
{
    w->next = NULL;
    if (*tail)
        (*tail)->next = w;
    else
        *head = w;
    *tail = w;
}

static struct co_waiter *waiter_pop(struct co_waiter **head, struct co_waiter **tail)
{
    struct co_waiter *w = *head;
    if (w) {
        *head = w->next;
        if (!*head)
            *tail = NULL;
    }
    return w;
}

void co_queue_init(struct co_queue *q)
{
    pthread_mutex_init(&q->lock, NULL);
    q->head = q->tail = NULL;
}

void co_queue_destroy(struct co_queue *q)
{
    pthread_mutex_destroy(&q->lock);
}

void co_queue_wait(struct co_queue *q, pthread_mutex_t *m)
{
    struct co_waiter w = { .co = co_self() };
    pthread_mutex_lock(&q->lock);
    waiter_push(&q->head, &q->tail, &w);
    pthread_mutex_unlock(&q->lock);
    if (m)
        pthread_mutex_unlock(m);
    co_yield();
    if (m)
        pthread_mutex_lock(m);
}

bool co_queue_wake_one(struct co_queue *q)
{
    pthread_mutex_lock(&q->lock);
    struct co_waiter *w = waiter_pop(&q->head, &q->tail);
    struct coroutine *co = w ? w->co : NULL;   /* w lives on co's stack: read it now */
    pthread_mutex_unlock(&q->lock);
    if (co)
        co_wake(co);
    return co != NULL;
}

void co_queue_wake_all(struct co_queue *q)
{
    pthread_mutex_lock(&q->lock);
    struct co_waiter *w = q->head;
    q->head = q->tail = NULL;
    pthread_mutex_unlock(&q->lock);
    while (w) {
        struct co_waiter *next = w->next;   /* w lives on its coroutine's stack */
        co_wake(w->co);
        w = next;
    }
}

bool co_queue_empty(struct co_queue *q)
{
    pthread_mutex_lock(&q->lock);
    bool empty = q->head == NULL;
    pthread_mutex_unlock(&q->lock);
    return empty;
}

/* ---- fair mutex ---- */

void co_mutex_init(struct co_mutex *m)
{
    pthread_mutex_init(&m->lock, NULL);
    m->locked = false;
    m->holder = NULL;
    m->head = m->tail = NULL;
}

void co_mutex_destroy(struct co_mutex *m)
{
    pthread_mutex_destroy(&m->lock);
}

void co_mutex_lock(struct co_mutex *m)
{
    struct coroutine *self = co_self();
    pthread_mutex_lock(&m->lock);
    if (!m->locked) {
        m->locked = true;
        m->holder = self;
        pthread_mutex_unlock(&m->lock);
        return;
    }
    struct co_waiter w = { .co = self };
    waiter_push(&m->head, &m->tail, &w);
    pthread_mutex_unlock(&m->lock);
    co_yield();                  /* woken by unlock, which made us the holder */
}

bool co_mutex_involves_loop(struct co_mutex *m, struct loop *l)
{
    pthread_mutex_lock(&m->lock);
    bool found = m->locked && m->holder && m->holder->loop == l;
    for (struct co_waiter *w = m->head; w && !found; w = w->next)
        found = w->co->loop == l;
    pthread_mutex_unlock(&m->lock);
    return found;
}

void co_mutex_unlock(struct co_mutex *m)
{
    pthread_mutex_lock(&m->lock);
    struct co_waiter *w = waiter_pop(&m->head, &m->tail);
    struct coroutine *next = w ? w->co : NULL;
    if (next)
        m->holder = next;        /* handed over: nobody can overtake the waiter */
    else {
        m->locked = false;
        m->holder = NULL;
    }
    pthread_mutex_unlock(&m->lock);
    if (next)
        co_wake(next);
}

bool co_mutex_held_by_self(struct co_mutex *m)
{
    pthread_mutex_lock(&m->lock);
    bool held = m->locked && m->holder == co_self();
    pthread_mutex_unlock(&m->lock);
    return held;
}

void co_set_waits_in_main(bool on)
{
    struct coroutine *co = co_self();
    if (co)
        co->waits_in_main = on;
}

bool co_waits_in_main(void)
{
    struct coroutine *co = co_self();
    return co && co->waits_in_main && co->loop && co->loop == loop_main();
}
