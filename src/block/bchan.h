/*
 * Completion channels: requests that finish in a thread of their own (a
 * librbd callback, an NBD client's reader) are handed back to the loop
 * that submitted them.  Each submitting loop has one channel per driver
 * state; a finished request goes on the channel's lock-free list, and the
 * push that finds the list empty asks the loop (loop_call) to drain it, so
 * a burst of completions costs one wake-up and completions run in the
 * submitting thread, oldest first.
 */
#pragma once
#include <pthread.h>
#include "block/block.h"

struct bchan;

struct bchan_set {
    pthread_mutex_t lock;
    struct bchan *chans;
    /* In the submitting loop: finish r (its result in r->aio.res). */
    void (*finish)(struct breq *r);
};

void bchan_set_init(struct bchan_set *set, void (*finish)(struct breq *r));
/* Frees the channels; no completion may be pending. */
void bchan_set_destroy(struct bchan_set *set);
/* The channel of loop l (made on first use).  Any thread. */
struct bchan *bchan_get(struct bchan_set *set, struct loop *l);
/* Any thread: r is done with result res; set->finish(r) runs in c's loop. */
void bchan_push(struct bchan *c, struct breq *r, int64_t res);
