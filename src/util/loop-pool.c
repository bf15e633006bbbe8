/* Worker loops shared by the exports' connections (see loop-pool.h). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include "util/log.h"
#include "util/loop.h"
#include "util/loop-pool.h"

static struct loop *loops[LOOP_POOL_MAX];
static int users[LOOP_POOL_MAX];
static int nloops;

static void *worker_main(void *opaque)
{
    loop_run(opaque);
    return NULL;
}

static void pool_init(void)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    loops[0] = loop_main();
    nloops = 1;
    for (long i = 1; i < cpus && nloops < LOOP_POOL_MAX; i++) {
        char name[32];
        pthread_t t;
        snprintf(name, sizeof(name), "worker%ld", i);
        struct loop *l = loop_new(name);
        if (pthread_create(&t, NULL, worker_main, l) != 0) {
            log_warn("cannot start worker loop: serving from fewer threads");
            loop_free(l);
            break;
        }
        pthread_detach(t);
        loops[nloops++] = l;
    }
}

struct loop *loop_pool_pick(int *slot)
{
    if (!nloops)
        pool_init();
    int best = 0;
    for (int i = 1; i < nloops; i++)
        if (users[i] < users[best])
            best = i;
    users[best]++;
    *slot = best;
    return loops[best];
}

void loop_pool_release(int slot)
{
    if (slot >= 0 && slot < nloops && users[slot] > 0)
        users[slot]--;
}
