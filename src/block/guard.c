/*
 * The guard on a node's writes (guard.h).
 *
 * Theory of operation.  Writes under way are in a list, queued writes in
 * another, under one lock.  A write that overlaps the claimed range is
 * queued; otherwise it goes into the list, its completion is wrapped, and
 * it goes on to the node's driver (or the job's submit).  Its completion
 * takes it off the list, wakes the claiming coroutine if nothing it waits
 * for is left, and hands the result to the job (written), then to the
 * submitter.  Releasing a claim sends the queued writes back through the
 * guard, each in its own loop, in order.
 *
 * The guard outlives its job while writes it saw are under way: each of
 * them, each queued write and the job hold a reference.  Removing it from
 * the node waits for every loop to pass a barrier first, so no thread is
 * still inside its submit.
 */
#include <pthread.h>
#include <stdlib.h>
#include "block/guard.h"
#include "util/coroutine.h"
#include "util/loop.h"
#include "util/xalloc.h"

/* A peer's write under way, or waiting for a copy. */
struct guarded {
    struct guard *g;
    struct breq *req;
    uint64_t offset;                    /* in the guarded node */
    void (*done)(struct breq *req, int ret);
    void *opaque;
    struct guarded *next, **pprev;
};

struct guard {
    struct bnode_intercept ic;
    struct bnode *bs;
    const struct guard_ops *ops;
    void *opaque;
    int refs;                           /* atomic */
    pthread_mutex_t lock;
    struct guarded *writes;             /* under way */
    struct guarded *queued, **queued_tail;
    uint64_t copy_lo, copy_hi;          /* the claimed range; empty: none */
    struct coroutine *copier;           /* waiting for writes under way */
};

static bool overlaps(uint64_t lo, uint64_t hi, uint64_t a, uint64_t b)
{
    return lo < b && a < hi;
}

static void guard_unref(struct guard *g)
{
    if (__atomic_sub_fetch(&g->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        pthread_mutex_destroy(&g->lock);
        free(g);
    }
}

static void wake_copier(void *opaque)
{
    co_enter(opaque);
}

/* Whether a write under way overlaps the claim (lock held). */
static bool claim_must_wait(struct guard *g)
{
    for (struct guarded *w = g->writes; w; w = w->next)
        if (overlaps(w->offset, w->offset + w->req->len, g->copy_lo, g->copy_hi))
            return true;
    return false;
}

static void guarded_done(struct breq *req, int ret)
{
    struct guarded *w = req->opaque;
    struct guard *g = w->g;
    struct coroutine *wake = NULL;
    req->done = w->done;
    req->opaque = w->opaque;
    if (g->ops && g->ops->written)
        g->ops->written(g->opaque, req, w->offset, ret);
    pthread_mutex_lock(&g->lock);
    *w->pprev = w->next;
    if (w->next)
        w->next->pprev = w->pprev;
    if (g->copier && !claim_must_wait(g)) {
        wake = g->copier;
        g->copier = NULL;
    }
    pthread_mutex_unlock(&g->lock);
    if (wake)
        loop_call(loop_main(), wake_copier, wake);
    free(w);
    guard_unref(g);
    req->done(req, ret);
}

/* A peer's write: under way now, or queued behind the claim. */
static void guard_write(struct guard *g, struct guarded *w)
{
    struct breq *req = w->req;
    pthread_mutex_lock(&g->lock);
    if (overlaps(w->offset, w->offset + req->len, g->copy_lo, g->copy_hi)) {
        w->next = NULL;
        *g->queued_tail = w;
        g->queued_tail = &w->next;
        pthread_mutex_unlock(&g->lock);
        return;
    }
    w->done = req->done;
    w->opaque = req->opaque;
    req->done = guarded_done;
    req->opaque = w;
    w->next = g->writes;
    w->pprev = &g->writes;
    if (g->writes)
        g->writes->pprev = &w->next;
    g->writes = w;
    pthread_mutex_unlock(&g->lock);
    if (g->ops && g->ops->submit)
        g->ops->submit(g->opaque, g->bs, req, w->offset);
    else
        bnode_submit_driver(g->bs, req, w->offset);
}

static void guard_submit(struct bnode_intercept *ic, struct bnode *bs, struct breq *req,
                         uint64_t offset)
{
    struct guard *g = container_of(ic, struct guard, ic);
    struct guarded *w = xzalloc(sizeof(*w));
    w->g = g;
    w->req = req;
    w->offset = offset;
    __atomic_add_fetch(&g->refs, 1, __ATOMIC_RELAXED);
    guard_write(g, w);
}

static void requeue(void *opaque)
{
    struct guarded *w = opaque;
    guard_write(w->g, w);
}

void co_guard_claim(struct guard *g, uint64_t lo, uint64_t hi)
{
    pthread_mutex_lock(&g->lock);
    g->copy_lo = lo;
    g->copy_hi = hi;
    while (claim_must_wait(g)) {
        g->copier = co_self();
        pthread_mutex_unlock(&g->lock);
        co_yield();
        pthread_mutex_lock(&g->lock);
    }
    pthread_mutex_unlock(&g->lock);
}

void guard_release(struct guard *g)
{
    pthread_mutex_lock(&g->lock);
    g->copy_lo = g->copy_hi = 0;
    struct guarded *w = g->queued;
    g->queued = NULL;
    g->queued_tail = &g->queued;
    pthread_mutex_unlock(&g->lock);
    while (w) {
        struct guarded *next = w->next;
        loop_call(w->req->loop, requeue, w);
        w = next;
    }
}

struct guard *guard_install(struct bnode *bs, const struct guard_ops *ops, void *opaque)
{
    struct guard *g = xzalloc(sizeof(*g));
    g->ic.submit = guard_submit;
    g->bs = bs;
    g->ops = ops;
    g->opaque = opaque;
    g->refs = 1;
    pthread_mutex_init(&g->lock, NULL);
    g->queued_tail = &g->queued;
    __atomic_store_n(&bs->intercept, &g->ic, __ATOMIC_RELEASE);
    return g;
}

static void guard_drop(void *opaque)
{
    guard_unref(opaque);
}

void guard_remove(struct guard *g)
{
    if (__atomic_load_n(&g->bs->intercept, __ATOMIC_ACQUIRE) == &g->ic)
        __atomic_store_n(&g->bs->intercept, NULL, __ATOMIC_RELEASE);
    loop_barrier_any_thread(guard_drop, g);
}

static void barrier_passed(void *opaque)
{
    co_enter(opaque);
}

void co_guard_remove(struct guard *g)
{
    __atomic_store_n(&g->bs->intercept, NULL, __ATOMIC_RELEASE);
    loop_barrier(barrier_passed, co_self());
    co_yield();
    co_guard_claim(g, 0, UINT64_MAX);   /* every write it saw, done */
    guard_unref(g);
}
