/*
 * QMP `transaction`: several block actions applied all or nothing.
 *
 * Each action kind registers its operations next to its code with
 * TRANSACTION_ACTION().  The command prepares the actions in order; when
 * one fails, the prepared ones are aborted in reverse order and the
 * command fails with that action's error; when all are prepared, all are
 * committed.  Every action is cleaned up at the end either way.
 */
#pragma once
#include <stdbool.h>
#include <jansson.h>
#include "util/error.h"

struct txn_action;
struct job_txn;

struct txn_ops {
    const char *type;             /* TransactionActionKind */
    bool grouped;                 /* accepts completion-mode=grouped */
    /* data: the action's checked "data" object.  0 or -1 with errp set;
     * what it did is undone by abort, or made final by commit. */
    int  (*prepare)(struct txn_action *a, json_t *data, error **errp);
    void (*commit)(struct txn_action *a);       /* NULL: nothing to do */
    void (*abort)(struct txn_action *a);        /* NULL: nothing to undo */
    void (*clean)(struct txn_action *a);        /* NULL: nothing to free */
    /* The action changes an image in place, as of one point in time
     * (QEMU drains the node): a transaction holding it runs as
     * txn_call_drained runs a command. */
    bool drained;
    struct txn_ops *next;
};

/* Per-action state, owned by the command for its duration. */
struct txn_action {
    const struct txn_ops *ops;
    struct job_txn *job_txn;      /* completion-mode=grouped: the jobs' shared
                                   * transaction (job.h); NULL otherwise */
    bool grouped;
    void *opaque;                 /* the kind's own state */
};

void transaction_register(struct txn_ops *ops);

#define TRANSACTION_ACTION(ops)                                              \
    __attribute__((constructor)) static void txn_register_##ops(void)     \
    { transaction_register(&ops); }

/* Run fn(args) as a QMP command's handler once every peer's write is held
 * and those in flight have completed (block_writes_hold), in a coroutine
 * of the main loop (fn may wait for I/O), then let the writes go on.  The
 * command's reply is held until then and carries fn's result.  Returns
 * what the handler returns meanwhile. */
json_t *txn_call_drained(json_t *(*fn)(json_t *args, error **errp), json_t *args);
