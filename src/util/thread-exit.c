/*
 * One pthread key for every thread-exit hook: its destructor runs the
 * hooks the ending thread armed, newest first.
 */
#include "util/thread-exit.h"

#include <pthread.h>
#include <stdlib.h>

static pthread_key_t key;
static pthread_once_t key_once = PTHREAD_ONCE_INIT;
static __thread struct thread_exit_hook *hooks;

static void run_hooks(void *unused)
{
    (void)unused;
    while (hooks) {
        struct thread_exit_hook *h = hooks;
        hooks = h->next;
        /* A hook may arm again (its function fills a pool); glibc then
         * calls this destructor once more. */
        h->armed = false;
        h->next = NULL;
        h->fn();
    }
}

static void key_init(void)
{
    if (pthread_key_create(&key, run_hooks) != 0)
        abort();
}

void thread_exit_arm_slow(struct thread_exit_hook *h)
{
    pthread_once(&key_once, key_init);
    h->next = hooks;
    hooks = h;
    h->armed = true;
    /* Any non-NULL value makes the destructor run at exit. */
    pthread_setspecific(key, &hooks);
}
