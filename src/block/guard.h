/*
 * A guard on a node's writes, for jobs that copy while peers write: a copy
 * claims a range; a peer's write overlapping it waits in a queue until the
 * copy is done, and the copy first waits for the overlapping writes
 * already under way.  So no copy puts old data over a newer write, in the
 * node (block-stream) or in a target (blockdev-mirror).
 *
 * The guard is the node's bnode_intercept: it sees every write to the node
 * that does not carry BREQ_WRITE_UNCHANGED.  A job may watch them (ops):
 * submit takes the write instead of the node's driver (the write completes
 * through guard_write_submit_done then); written runs as a write completes,
 * before its submitter hears of it, in the write's loop.
 */
#pragma once
#include "block/block.h"

struct guard;

struct guard_ops {
    /* NULL: the write goes to the node's driver */
    void (*submit)(void *opaque, struct bnode *bs, struct breq *req, uint64_t offset);
    /* NULL: nothing to do */
    void (*written)(void *opaque, struct breq *req, uint64_t offset, int ret);
};

/* A guard on bs, in force at once. */
struct guard *guard_install(struct bnode *bs, const struct guard_ops *ops, void *opaque);
/* Off the node; freed once no loop can be inside its submit and no write
 * it saw is under way.  Main thread. */
void guard_remove(struct guard *g);
/* The same from a coroutine of the main loop, returning once no loop is
 * inside its submit and every write it saw has completed: the ops are
 * never called again.  No claim may be held. */
void co_guard_remove(struct guard *g);

/* In a coroutine of the main loop: claim [lo, hi) once the writes under
 * way there are done; guard_release lets the writes held meanwhile go on. */
void co_guard_claim(struct guard *g, uint64_t lo, uint64_t hi);
void guard_release(struct guard *g);
