/*
 * Coroutines: stackful, cooperative, one loop thread each.
 *
 * A coroutine runs fn(opaque) on its own stack.  co_enter() runs it from
 * the caller until it yields or returns; co_yield() goes back to whoever
 * entered it.  Coroutines may enter other coroutines (the callee returns to
 * its caller when it yields).  A coroutine belongs to the loop thread that
 * created it and is only ever entered there; a wake-up from any thread is
 * co_wake(), which enters it from its loop soon (never inside the call), so
 * a waker may hold locks the woken coroutine will take.
 *
 * Finished coroutines go back to a per-thread pool with their stacks, so
 * the data path creates coroutines without mmap or malloc once warm.
 *
 * Synchronisation, safe across threads:
 *   co_queue  a FIFO of waiting coroutines: wait (releasing a caller's
 *             mutex, as a condition variable does), wake one, wake all;
 *   co_mutex  a fair mutex held across yields: unlock hands it to the
 *             longest waiter.
 */
#pragma once
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>

struct coroutine;
struct loop;

typedef void co_fn(void *opaque);

/* Stack size of every coroutine (reserved address space; only the pages
 * touched use memory).  A guard page below it turns overflows into SIGSEGV. */
#define CO_STACK_SIZE (1u << 20)

/* A coroutine that will run fn(opaque) when entered, bound to the calling
 * thread's loop (loop_current(); NULL in a thread without a loop, where
 * only co_enter is usable).  Aborts on out of memory. */
struct coroutine *co_create(co_fn *fn, void *opaque);
/* Run co until it yields or finishes (then it is recycled).  Calling
 * thread = co's thread; co must not be running or already entered. */
void co_enter(struct coroutine *co);
/* In a coroutine: return to whoever entered it. */
void co_yield(void);
/* The running coroutine, or NULL outside any. */
struct coroutine *co_self(void);
static inline bool co_in_coroutine(void) { return co_self() != NULL; }
struct loop *co_loop(const struct coroutine *co);
/* Any thread: enter co later, from its loop (the same thread: before the
 * loop next sleeps).  co must be yielded waiting for exactly this. */
void co_wake(struct coroutine *co);

/* The running coroutine, of the main loop, may wait there for I/O that
 * the main loop itself completes: it holds no lock that another task of
 * the main loop could need.  Control work run as such a coroutine
 * (qmp_call_co) says so; synchronous helpers (qcow2_run_sync) then do
 * their work in it instead of blocking the main thread on a thread of
 * their own, which would wait for ever for a lock a coroutine of the main
 * loop holds across its I/O (a job's read, an export without iothread). */
void co_set_waits_in_main(bool on);
bool co_waits_in_main(void);

/* Free this thread's pool of finished coroutines (tests, thread exit). */
void co_pool_drain(void);
/* Coroutines currently alive (created and not finished), all threads. */
unsigned co_alive_count(void);

/* ---- wait queues ---- */
struct co_waiter;
struct co_queue {
    pthread_mutex_t lock;
    struct co_waiter *head, *tail;
};
#define CO_QUEUE_INITIALIZER { PTHREAD_MUTEX_INITIALIZER, NULL, NULL }
void co_queue_init(struct co_queue *q);
void co_queue_destroy(struct co_queue *q);
/* In a coroutine: wait until woken.  If m is not NULL the caller holds it:
 * it is released once the coroutine is queued (no wake-up is lost) and
 * taken again before returning. */
void co_queue_wait(struct co_queue *q, pthread_mutex_t *m);
/* Wake the longest waiter; false if none was waiting. */
bool co_queue_wake_one(struct co_queue *q);
void co_queue_wake_all(struct co_queue *q);
bool co_queue_empty(struct co_queue *q);

/* ---- fair mutex ---- */
struct co_mutex {
    pthread_mutex_t lock;          /* protects the fields below */
    bool locked;
    struct coroutine *holder;
    struct co_waiter *head, *tail;
};
void co_mutex_init(struct co_mutex *m);
void co_mutex_destroy(struct co_mutex *m);
void co_mutex_lock(struct co_mutex *m);      /* in a coroutine */
void co_mutex_unlock(struct co_mutex *m);    /* by the holder */
bool co_mutex_held_by_self(struct co_mutex *m);
/* Does a coroutine of loop l hold m, or wait for it (and so get it next)?
 * A thread that stops l and then waits for m would wait for ever. */
bool co_mutex_involves_loop(struct co_mutex *m, struct loop *l);
