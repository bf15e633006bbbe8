/*
 * Coroutine wrappers of the block layer (see block.h).
 *
 * Theory of operation: the request lives on the coroutine's stack.  The
 * completion records the result; if the coroutine has already yielded
 * waiting for it, the completion enters it again (directly when it runs
 * outside any coroutine, which is the loop dispatching an I/O completion;
 * through co_wake otherwise).  A request that completes inside
 * bnode_submit() is seen as done before the coroutine would yield, so it
 * does not yield at all.
 */
#include <errno.h>
#include <pthread.h>
#include "block/block.h"
#include "util/coroutine.h"
#include "util/loop.h"

struct co_req {
    struct breq req;
    struct coroutine *co;
    int ret;
    bool done, waiting;
};

static void co_req_done(struct breq *r, int ret)
{
    struct co_req *c = r->opaque;
    c->ret = ret;
    c->done = true;
    if (!c->waiting)
        return;
    if (co_in_coroutine())
        co_wake(c->co);
    else
        co_enter(c->co);
}

static int co_submit(struct bnode *bs, enum breq_op op, uint64_t offset, uint64_t bytes,
                     struct iovec *iov, int iovcnt, unsigned flags)
{
    struct co_req c = {
        .req = { .op = op, .flags = flags, .offset = offset, .len = bytes,
                 .iov = iov, .iovcnt = iovcnt, .loop = loop_current(),
                 .done = co_req_done, .opaque = &c },
        .co = co_self(),
    };
    bnode_submit(bs, &c.req);
    if (!c.done) {
        c.waiting = true;
        co_yield();
    }
    return c.ret;
}

int bnode_co_preadv(struct bnode *bs, uint64_t offset, uint64_t bytes,
                    struct iovec *iov, int iovcnt, unsigned flags)
{
    return co_submit(bs, BREQ_READ, offset, bytes, iov, iovcnt, flags);
}

int bnode_co_pwritev(struct bnode *bs, uint64_t offset, uint64_t bytes,
                     struct iovec *iov, int iovcnt, unsigned flags)
{
    return co_submit(bs, BREQ_WRITE, offset, bytes, iov, iovcnt, flags);
}

int bnode_co_pread(struct bnode *bs, uint64_t offset, uint64_t bytes, void *buf,
                   unsigned flags)
{
    struct iovec iov = { .iov_base = buf, .iov_len = bytes };
    return co_submit(bs, BREQ_READ, offset, bytes, &iov, 1, flags);
}

int bnode_co_pwrite(struct bnode *bs, uint64_t offset, uint64_t bytes, const void *buf,
                    unsigned flags)
{
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = bytes };
    return co_submit(bs, BREQ_WRITE, offset, bytes, &iov, 1, flags);
}

int bnode_co_pwrite_zeroes(struct bnode *bs, uint64_t offset, uint64_t bytes, unsigned flags)
{
    return co_submit(bs, BREQ_WRITE_ZEROES, offset, bytes, NULL, 0, flags);
}

int bnode_co_pdiscard(struct bnode *bs, uint64_t offset, uint64_t bytes)
{
    return co_submit(bs, BREQ_DISCARD, offset, bytes, NULL, 0, 0);
}

int bnode_co_flush(struct bnode *bs)
{
    return co_submit(bs, BREQ_FLUSH, 0, 0, NULL, 0, 0);
}

/* ---- a coroutine run to its end from the main thread ---- */

struct co_sync {
    int (*fn)(void *opaque);
    void *opaque;
    struct loop *loop;
    int ret;
};

static void co_sync_body(void *opaque)
{
    struct co_sync *cs = opaque;
    cs->ret = cs->fn(cs->opaque);
    loop_stop(cs->loop);
}

static void co_sync_start(void *opaque)
{
    co_enter(co_create(co_sync_body, opaque));
}

static void *co_sync_thread(void *opaque)
{
    struct co_sync *cs = opaque;
    loop_call(cs->loop, co_sync_start, cs);
    loop_run(cs->loop);
    co_pool_drain();
    return NULL;
}

int bnode_co_run_sync(int (*fn)(void *opaque), void *opaque)
{
    struct co_sync cs = { .fn = fn, .opaque = opaque, .loop = loop_new("co-sync") };
    pthread_t t;
    if (pthread_create(&t, NULL, co_sync_thread, &cs) != 0) {
        loop_free(cs.loop);
        return -EAGAIN;
    }
    pthread_join(t, NULL);
    loop_free(cs.loop);
    return cs.ret;
}
