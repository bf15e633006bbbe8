/*
 * Work a thread leaves behind when it ends.
 *
 * Per-thread pools (coroutines, qcow2 requests) keep their heads in
 * thread-local storage; a thread that ends (an iothread whose object is
 * deleted, a pool worker) would lose what they hold.  A pool declares one
 * thread-local hook and arms it when it first keeps something; the hook's
 * function then runs in that thread as it exits.
 */
#ifndef BEXD_UTIL_THREAD_EXIT_H
#define BEXD_UTIL_THREAD_EXIT_H

#include <stdbool.h>

struct thread_exit_hook {
    void (*fn)(void);
    struct thread_exit_hook *next;
    bool armed;
};

/* Declare as `static __thread struct thread_exit_hook h =
 * THREAD_EXIT_HOOK(fn);` */
#define THREAD_EXIT_HOOK(f) { .fn = (f), .next = 0, .armed = false }

/* Run h->fn when the calling thread exits; h is that thread's own (a
 * __thread variable).  Cheap when already armed. */
void thread_exit_arm_slow(struct thread_exit_hook *h);

static inline void thread_exit_arm(struct thread_exit_hook *h)
{
    if (!h->armed)
        thread_exit_arm_slow(h);
}

#endif
