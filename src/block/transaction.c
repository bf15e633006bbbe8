/*
 * QMP `transaction` (see transaction.h) and its dirty bitmap actions, which
 * behave as QEMU 7.2's: add (undone by releasing the new bitmap), remove
 * (the bitmap turns busy at prepare, so later actions cannot use it, and
 * goes at commit), clear and merge (the old bits are kept until commit and
 * put back on abort), enable and disable (the old state put back), and
 * abort (always fails).
 *
 * Actions run in the main thread without waiting, so no QMP command comes
 * between them, and with every node's bitmap lock held (QEMU drains the
 * nodes instead): a write in another thread marks bitmaps either before
 * the transaction or after it, never in the middle, so an undo that puts
 * old bits back loses no write.
 *
 * A transaction with an action that changes an image as of one point in
 * time (an internal snapshot) waits first until the peers' writes are
 * held and drained, and runs in a coroutine of the main loop, since that
 * action waits for the image's I/O (txn_call_drained).  Another monitor's
 * command may then run while it waits; the client that sent the
 * transaction waits for its reply.
 */
#include <string.h>
#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "block/dirty-bitmap-qmp.h"
#include "block/transaction.h"
#include "job/job.h"
#include "util/coroutine.h"
#include "qmp/qmp.h"
#include "util/opts.h"
#include "util/pbitmap.h"
#include "util/xalloc.h"

static struct txn_ops *kinds;

void transaction_register(struct txn_ops *ops)
{
    ops->next = kinds;
    kinds = ops;
}

static const struct txn_ops *kind_find(const char *type)
{
    for (const struct txn_ops *k = kinds; k; k = k->next)
        if (!strcmp(k->type, type))
            return k;
    return NULL;
}

/* ---- the command ---- */

static json_t *txn_run(json_t *args, error **errp)
{
    json_t *actions = json_object_get(args, "actions");
    const char *mode = opt_str(json_object_get(args, "properties"), "completion-mode",
                               "individual");
    bool grouped = !strcmp(mode, "grouped");
    size_t n = json_array_size(actions), done = 0;
    struct txn_action *st = xcalloc(n ? n : 1, sizeof(*st));
    size_t nheld;
    struct bnode **held = dirty_bitmaps_freeze_all(&nheld);
    struct job_txn *jtxn = grouped ? job_txn_new() : NULL;   /* jobs fail together */
    int ret = 0;

    for (size_t i = 0; i < n; i++) {
        json_t *act = json_array_get(actions, i);
        const char *type = opt_str(act, "type", "");
        const struct txn_ops *ops = kind_find(type);
        if (!ops) {                   /* the schema only lets registered kinds through */
            error_setg(errp, "Transaction action '%s' is not supported", type);
            ret = -1;
            break;
        }
        if (grouped && !ops->grouped) {
            error_setg(errp, "Action '%s' does not support Transaction property "
                       "completion-mode = %s", type, mode);
            ret = -1;
            break;
        }
        st[i].ops = ops;
        st[i].grouped = grouped;
        st[i].job_txn = jtxn;
        done = i + 1;
        if (ops->prepare(&st[i], json_object_get(act, "data"), errp) < 0) {
            ret = -1;
            break;
        }
    }
    if (ret < 0) {
        for (size_t i = done; i-- > 0;)
            if (st[i].ops->abort)
                st[i].ops->abort(&st[i]);
    } else {
        for (size_t i = 0; i < n; i++)
            if (st[i].ops->commit)
                st[i].ops->commit(&st[i]);
    }
    dirty_bitmaps_thaw_all(held, nheld);
    for (size_t i = 0; i < done; i++)
        if (st[i].ops->clean)
            st[i].ops->clean(&st[i]);
    free(st);
    job_txn_unref(jtxn);          /* its jobs hold it now */
    return ret < 0 ? NULL : json_object();
}

static json_t *qmp_transaction(json_t *args, error **errp)
{
    json_t *actions = json_object_get(args, "actions");
    for (size_t i = 0; i < json_array_size(actions); i++) {
        const struct txn_ops *ops = kind_find(opt_str(json_array_get(actions, i), "type", ""));
        if (ops && ops->drained)
            return txn_call_drained(txn_run, args);
    }
    return txn_run(args, errp);
}
QMP_COMMAND("transaction", qmp_transaction)

/* ---- commands that run with the peers' writes stopped ---- */

struct drained_call {
    json_t *(*fn)(json_t *args, error **errp);
    json_t *args;
    struct qmp_reply *reply;
};

static void drained_body(void *opaque)
{
    struct drained_call *c = opaque;
    error *err = NULL;
    struct qmp_reply *outer = qmp_reply_enter(c->reply);   /* blockdev-snapshot holds it */
    json_t *ret = c->fn(c->args, &err);
    qmp_reply_enter(outer);
    qmp_reply_set(c->reply, ret, err);
    block_writes_release();
    qmp_reply_release(c->reply);
    json_decref(c->args);
    free(c);
}

static void drained_start(void *opaque)
{
    co_enter(co_create(drained_body, opaque));
}

json_t *txn_call_drained(json_t *(*fn)(json_t *args, error **errp), json_t *args)
{
    struct drained_call *c = xzalloc(sizeof(*c));
    c->fn = fn;
    c->args = json_incref(args);
    c->reply = qmp_reply_hold();
    block_writes_hold(drained_start, c);
    return json_object();             /* replaced by what fn returns */
}

/* ---- abort ---- */

static int abort_prepare(struct txn_action *a, json_t *data, error **errp)
{
    error_setg(errp, "Transaction aborted using Abort action");
    return -1;
}

static struct txn_ops abort_ops = { .type = "abort", .prepare = abort_prepare };
TRANSACTION_ACTION(abort_ops)

/* ---- dirty bitmaps ---- */

struct bitmap_txn {
    struct dirty_bitmap *bm;
    struct pbitmap *backup;       /* clear, merge: the bits before */
    bool was_enabled;             /* enable, disable */
};

static struct bitmap_txn *bitmap_state(struct txn_action *a)
{
    if (!a->opaque)
        a->opaque = xzalloc(sizeof(struct bitmap_txn));
    return a->opaque;
}

static void bitmap_clean(struct txn_action *a)
{
    struct bitmap_txn *s = a->opaque;
    if (s)
        pbitmap_free(s->backup);
    free(s);
}

/* add */
static int add_prepare(struct txn_action *a, json_t *data, error **errp)
{
    struct bitmap_txn *s = bitmap_state(a);
    s->bm = dirty_bitmap_op_add(data, errp);
    return s->bm ? 0 : -1;
}

static void add_abort(struct txn_action *a)
{
    struct bitmap_txn *s = a->opaque;
    if (s->bm) {
        dirty_bitmap_unpersist(s->bm, NULL);
        dirty_bitmap_release(s->bm);
    }
}

static struct txn_ops add_ops = {
    .type = "block-dirty-bitmap-add", .prepare = add_prepare, .abort = add_abort,
    .clean = bitmap_clean,
};
TRANSACTION_ACTION(add_ops)

/* remove */
static int remove_prepare(struct txn_action *a, json_t *data, error **errp)
{
    struct bitmap_txn *s = bitmap_state(a);
    struct dirty_bitmap *bm = dirty_bitmap_op_remove_check(data, errp);
    if (!bm)
        return -1;
    dirty_bitmap_set_busy(bm, true);
    s->bm = bm;
    return 0;
}

static void remove_commit(struct txn_action *a)
{
    struct bitmap_txn *s = a->opaque;
    dirty_bitmap_set_busy(s->bm, false);
    if (s->bm->persistent)
        dirty_bitmap_unpersist(s->bm, NULL);
    dirty_bitmap_release(s->bm);
}

static void remove_abort(struct txn_action *a)
{
    struct bitmap_txn *s = a->opaque;
    if (s->bm)
        dirty_bitmap_set_busy(s->bm, false);
}

static struct txn_ops remove_ops = {
    .type = "block-dirty-bitmap-remove", .prepare = remove_prepare,
    .commit = remove_commit, .abort = remove_abort, .clean = bitmap_clean,
};
TRANSACTION_ACTION(remove_ops)

/* clear */
static int clear_prepare(struct txn_action *a, json_t *data, error **errp)
{
    struct bitmap_txn *s = bitmap_state(a);
    struct dirty_bitmap *bm = dirty_bitmap_op_lookup(data, DBM_CHECK_DEFAULT, errp);
    if (!bm)
        return -1;
    if (dirty_bitmap_clear(bm, &s->backup) < 0) {
        error_setg(errp, "Cannot allocate a new bitmap for '%s'", bm->name);
        return -1;
    }
    s->bm = bm;
    return 0;
}

/* clear and merge: put the old bits back */
static void restore_abort(struct txn_action *a)
{
    struct bitmap_txn *s = a->opaque;
    if (s->bm && s->backup) {
        dirty_bitmap_restore(s->bm, s->backup);
        s->backup = NULL;
    }
}

static struct txn_ops clear_ops = {
    .type = "block-dirty-bitmap-clear", .prepare = clear_prepare, .abort = restore_abort,
    .clean = bitmap_clean,
};
TRANSACTION_ACTION(clear_ops)

/* enable, disable */
static int toggle_prepare(struct txn_action *a, json_t *data, bool enable, error **errp)
{
    struct bitmap_txn *s = bitmap_state(a);
    struct dirty_bitmap *bm = dirty_bitmap_op_lookup(data, DBM_CHECK_ALLOW_RO, errp);
    if (!bm)
        return -1;
    s->bm = bm;
    s->was_enabled = !bm->disabled;
    dirty_bitmap_set_enabled(bm, enable);
    return 0;
}

static int enable_prepare(struct txn_action *a, json_t *data, error **errp)
{
    return toggle_prepare(a, data, true, errp);
}

static int disable_prepare(struct txn_action *a, json_t *data, error **errp)
{
    return toggle_prepare(a, data, false, errp);
}

static void toggle_abort(struct txn_action *a)
{
    struct bitmap_txn *s = a->opaque;
    if (s->bm)
        dirty_bitmap_set_enabled(s->bm, s->was_enabled);
}

static struct txn_ops enable_ops = {
    .type = "block-dirty-bitmap-enable", .prepare = enable_prepare, .abort = toggle_abort,
    .clean = bitmap_clean,
};
TRANSACTION_ACTION(enable_ops)

static struct txn_ops disable_ops = {
    .type = "block-dirty-bitmap-disable", .prepare = disable_prepare, .abort = toggle_abort,
    .clean = bitmap_clean,
};
TRANSACTION_ACTION(disable_ops)

/* merge */
static int merge_prepare(struct txn_action *a, json_t *data, error **errp)
{
    struct bitmap_txn *s = bitmap_state(a);
    s->bm = dirty_bitmap_op_merge(data, &s->backup, errp);
    return s->bm ? 0 : -1;
}

static struct txn_ops merge_ops = {
    .type = "block-dirty-bitmap-merge", .prepare = merge_prepare, .abort = restore_abort,
    .clean = bitmap_clean,
};
TRANSACTION_ACTION(merge_ops)
