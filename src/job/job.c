/*
 * Background jobs (see job.h): QEMU 7.2's state machine, verbs, pause
 * points, transactions and finalization, in the main thread.
 *
 * Theory of operation: the two tables below are QEMU's (JobSTT and
 * JobVerbTable): every status change goes through job_set_status(), which
 * refuses a move the transition table does not have (a bug, logged) and
 * emits JOB_STATUS_CHANGE; every verb goes through job_apply_verb().  The
 * work of a job is not a coroutine here but whatever driver->run() starts;
 * where QEMU's coroutine would yield (a pause point, a sleep) the work hands
 * a continuation to the core, which calls it when the job is entered again
 * (resume, cancel, timer).  When the work is over (job_work_done) the rest
 * of QEMU's job_exit() runs from the main loop, as QEMU runs it from a
 * bottom half: the result decides between the transaction's success path
 * (waiting, pending, finalize, concluded) and its abort path (aborting,
 * concluded).  QEMU waits synchronously for the other jobs of an aborting
 * transaction; here the abort resumes each time one of them stops working.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "job/job.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/coroutine.h"
#include "util/id.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/xalloc.h"

/* Status transitions QEMU allows: stt[from][to]. */
static const bool stt[JOB_STATUS__MAX][JOB_STATUS__MAX] = {
    /*                           U  C  R  P  Y  S  W  D  X  E  N */
    [JOB_STATUS_UNDEFINED]   = { 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
    [JOB_STATUS_CREATED]     = { 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1 },
    [JOB_STATUS_RUNNING]     = { 0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0 },
    [JOB_STATUS_PAUSED]      = { 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0 },
    [JOB_STATUS_READY]       = { 0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0 },
    [JOB_STATUS_STANDBY]     = { 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0 },
    [JOB_STATUS_WAITING]     = { 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0 },
    [JOB_STATUS_PENDING]     = { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0 },
    [JOB_STATUS_ABORTING]    = { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0 },
    [JOB_STATUS_CONCLUDED]   = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 },
    [JOB_STATUS_NULL]        = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
};

/* Statuses in which QEMU accepts each verb: verbs[verb][status]. */
static const bool verbs[JOB_VERB__MAX][JOB_STATUS__MAX] = {
    /*                           U  C  R  P  Y  S  W  D  X  E  N */
    [JOB_VERB_CANCEL]        = { 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0 },
    [JOB_VERB_PAUSE]         = { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
    [JOB_VERB_RESUME]        = { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
    [JOB_VERB_SET_SPEED]     = { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
    [JOB_VERB_COMPLETE]      = { 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0 },
    [JOB_VERB_FINALIZE]      = { 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0 },
    [JOB_VERB_DISMISS]       = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0 },
};

static const char *const status_names[JOB_STATUS__MAX] = {
    "undefined", "created", "running", "paused", "ready", "standby",
    "waiting", "pending", "aborting", "concluded", "null",
};
static const char *const verb_names[JOB_VERB__MAX] = {
    "cancel", "pause", "resume", "set-speed", "complete", "finalize", "dismiss",
};
static const char *const type_names[JOB_TYPE__MAX] = {
    "commit", "stream", "mirror", "backup", "create", "amend",
    "snapshot-load", "snapshot-save", "snapshot-delete",
};

struct job_txn {
    struct job *jobs;           /* linked by txn_next */
    bool aborting;
    int refcnt;
};

/* What the work of a job is waiting for, if it is not busy. */
enum job_wait { WAIT_NONE, WAIT_PAUSE, WAIT_SLEEP };

static struct job *jobs;
static void (*all_idle_cb)(void *);
static void *all_idle_opaque;

const char *job_status_name(enum job_status s) { return s < JOB_STATUS__MAX ? status_names[s] : "?"; }
const char *job_verb_name(enum job_verb v) { return v < JOB_VERB__MAX ? verb_names[v] : "?"; }
const char *job_type_name(enum job_type t) { return t < JOB_TYPE__MAX ? type_names[t] : "?"; }

/* ---- status ---- */

static void job_set_status(struct job *job, enum job_status to)
{
    enum job_status from = job->status;
    if (!stt[from][to])
        log_error("job %s: status %s -> %s is not allowed", job->id ? job->id : "(internal)",
                  status_names[from], status_names[to]);
    job->status = to;
    if (job->id && from != to)
        qmp_event("JOB_STATUS_CHANGE", json_pack("{s:s, s:s}", "id", job->id,
                                                 "status", status_names[to]));
}

int job_apply_verb(struct job *job, enum job_verb verb, error **errp)
{
    if (verbs[verb][job->status])
        return 0;
    error_setg(errp, "Job '%s' in state '%s' cannot accept command verb '%s'",
               job->id, status_names[job->status], verb_names[verb]);
    return -EPERM;
}

bool job_is_cancelled(const struct job *job) { return job->force_cancel; }
bool job_cancel_requested(const struct job *job) { return job->cancelled; }
bool job_should_pause(const struct job *job) { return job->pause_count > 0; }

bool job_is_ready(const struct job *job)
{
    return job->status == JOB_STATUS_READY || job->status == JOB_STATUS_STANDBY;
}

bool job_is_completed(const struct job *job)
{
    switch (job->status) {
    case JOB_STATUS_WAITING:
    case JOB_STATUS_PENDING:
    case JOB_STATUS_ABORTING:
    case JOB_STATUS_CONCLUDED:
    case JOB_STATUS_NULL:
        return true;
    default:
        return false;
    }
}

void job_progress_update(struct job *job, uint64_t done) { job->progress_current += done; }
void job_progress_set_remaining(struct job *job, uint64_t remaining)
{
    job->progress_total = job->progress_current + remaining;
}
void job_progress_increase_remaining(struct job *job, uint64_t delta) { job->progress_total += delta; }

/* ---- registry, references, transactions ---- */

struct job *job_get(const char *id)
{
    for (struct job *j = jobs; j; j = j->next)
        if (j->id && !strcmp(j->id, id))
            return j;
    return NULL;
}

struct job *job_next(struct job *job)
{
    return job ? job->next : jobs;
}

static void job_list_remove(struct job *job)
{
    for (struct job **p = &jobs; *p; p = &(*p)->next)
        if (*p == job) {
            *p = job->next;
            job->next = NULL;
            return;
        }
}

void job_ref(struct job *job)
{
    job->refcnt++;
}

void job_unref(struct job *job)
{
    if (--job->refcnt > 0)
        return;
    job_list_remove(job);
    if (job->driver->free)
        job->driver->free(job);
    loop_timer_free(job->sleep_timer);
    error_free(job->err);
    free(job->id);
    free(job);
}

struct job_txn *job_txn_new(void)
{
    struct job_txn *txn = xzalloc(sizeof(*txn));
    txn->refcnt = 1;
    return txn;
}

static void job_txn_ref(struct job_txn *txn)
{
    txn->refcnt++;
}

void job_txn_unref(struct job_txn *txn)
{
    if (txn && --txn->refcnt == 0)
        free(txn);
}

void job_txn_add_job(struct job_txn *txn, struct job *job)
{
    if (!txn)
        return;
    job->txn = txn;
    job->txn_next = txn->jobs;
    txn->jobs = job;
    job_txn_ref(txn);
}

static void job_txn_del_job(struct job *job)
{
    struct job_txn *txn = job->txn;
    if (!txn)
        return;
    for (struct job **p = &txn->jobs; *p; p = &(*p)->txn_next)
        if (*p == job) {
            *p = job->txn_next;
            break;
        }
    job->txn = NULL;
    job->txn_next = NULL;
    job_txn_unref(txn);
}

/* fn on every job of job's transaction, stopping at the first non-zero. */
static int job_txn_apply(struct job *job, int (*fn)(struct job *))
{
    struct job_txn *txn = job->txn;
    int rc = 0;
    if (!txn)
        return fn(job);
    job_txn_ref(txn);
    for (struct job *j = txn->jobs, *next; j; j = next) {
        next = j->txn_next;
        rc = fn(j);
        if (rc)
            break;
    }
    job_txn_unref(txn);
    return rc;
}

/* ---- creation ---- */

static void job_timer_cb(void *opaque)
{
    struct job *job = opaque;
    job->timer_armed = false;
    job_enter(job);
}

void *job_create(const char *id, const struct job_driver *drv, struct job_txn *txn,
                 unsigned flags, void (*cb)(void *opaque, int ret), void *opaque,
                 error **errp)
{
    if (id) {
        if (flags & JOB_INTERNAL) {
            error_setg(errp, "Cannot specify job ID for internal job");
            return NULL;
        }
        if (!id_wellformed(id)) {
            error_setg(errp, "Invalid job ID '%s'", id);
            return NULL;
        }
        if (job_get(id)) {
            error_setg(errp, "Job ID '%s' already in use", id);
            return NULL;
        }
    } else if (!(flags & JOB_INTERNAL)) {
        error_setg(errp, "An explicit job ID is required");
        return NULL;
    }
    struct job *job = xzalloc(drv->instance_size);
    job->driver = drv;
    job->id = xstrdup_opt(id);
    job->refcnt = 1;
    job->paused = true;
    job->pause_count = 1;
    job->auto_finalize = !(flags & JOB_MANUAL_FINALIZE);
    job->auto_dismiss = !(flags & JOB_MANUAL_DISMISS);
    job->cb = cb;
    job->opaque = opaque;
    job->sleep_timer = loop_timer_new(loop_main(), job_timer_cb, job);
    job_set_status(job, JOB_STATUS_CREATED);
    job->next = jobs;
    jobs = job;
    /* A job alone is a transaction of one, as in QEMU. */
    if (!txn) {
        txn = job_txn_new();
        job_txn_add_job(txn, job);
        job_txn_unref(txn);
    } else {
        job_txn_add_job(txn, job);
    }
    return job;
}

/* ---- the work: start, pause points, sleeping, waking ---- */

static void job_run(struct job *job)
{
    job->driver->run(job);
}

void job_start(struct job *job)
{
    job->started = true;
    job->pause_count--;
    job->busy = true;
    job->paused = false;
    job_set_status(job, JOB_STATUS_RUNNING);
    /* Every job passes a pause point before its work proper (QEMU's job_co_entry). */
    job_ref(job);
    if (!job_pause_point(job, job_run))
        job_run(job);
    job_unref(job);
}

bool job_pause_point(struct job *job, job_fn *cont)
{
    if (!job_should_pause(job) || job_is_cancelled(job))
        return false;
    if (job->driver->pause)
        job->driver->pause(job);
    if (job_should_pause(job) && !job_is_cancelled(job)) {
        job->status_before_pause = job->status;
        job_set_status(job, job->status == JOB_STATUS_READY ? JOB_STATUS_STANDBY
                                                            : JOB_STATUS_PAUSED);
        job->paused = true;
        job->busy = false;
        job->cont = cont;
        job->wait = WAIT_PAUSE;
        return true;
    }
    if (job->driver->resume)
        job->driver->resume(job);
    return false;
}

static void job_wait(struct job *job, job_fn *cont, bool timer, uint64_t ms)
{
        job->cont = cont;
    job->busy = false;
    job->wait = WAIT_SLEEP;
    if (timer) {
        job->timer_armed = true;
        loop_timer_arm(job->sleep_timer, ms);
    }
}

void job_sleep(struct job *job, uint64_t ms, job_fn *cont)
{
    /* A cancelled job does not sleep; one asked to pause goes straight to
     * its pause point (both still continue from the loop, not from here). */
    if (job_is_cancelled(job) || job_should_pause(job))
        ms = 0;
    job_wait(job, cont, true, ms);
}

void job_yield(struct job *job, job_fn *cont)
{
    bool now = job_is_cancelled(job) || job_should_pause(job);
    job_wait(job, cont, now, 0);
}

/* QEMU's job_enter_cond(): wake work that waits, unless it is busy or done. */
static void job_enter_cond(struct job *job, bool only_without_timer)
{
    if (!job->started || job->work_done || job->busy || job->wait == WAIT_NONE)
        return;
    if (only_without_timer && job->timer_armed)
        return;
    int w = job->wait;
    job_fn *cont = job->cont;
    job->wait = WAIT_NONE;
    job->cont = NULL;
    job->timer_armed = false;
    loop_timer_cancel(job->sleep_timer);
    job->busy = true;
    job_ref(job);
    if (w == WAIT_PAUSE) {
        job->paused = false;
        job_set_status(job, job->status_before_pause);
        if (job->driver->resume)
            job->driver->resume(job);
        cont(job);
    } else if (!job_pause_point(job, cont)) {
        cont(job);
    }
    job_unref(job);
}

void job_enter(struct job *job)
{
    job_enter_cond(job, false);
}

/* ---- work in a coroutine ---- */

static void job_co_entry(void *opaque)
{
    struct job *job = opaque;
    error *err = NULL;
    int ret = job->co_fn(job, &err);
    job->co = NULL;
    job_work_done(job, ret < 0 ? ret : 0, err);
}

void job_run_co(struct job *job, int (*fn)(struct job *job, error **errp))
{
    job->co_fn = fn;
    job->co = co_create(job_co_entry, job);
    co_enter(job->co);
}

/* The continuation of a coroutine's wait: go back into it. */
static void job_co_reenter(struct job *job)
{
    co_enter(job->co);
}

void job_co_pause_point(struct job *job)
{
    if (job_pause_point(job, job_co_reenter))
        co_yield();
}

void job_co_sleep(struct job *job, uint64_t ms)
{
    job_sleep(job, ms, job_co_reenter);
    co_yield();
}

void job_co_yield(struct job *job)
{
    job_yield(job, job_co_reenter);
    co_yield();
}

void job_transition_to_ready(struct job *job)
{
    job_set_status(job, JOB_STATUS_READY);
    if (job->driver->on_ready)
        job->driver->on_ready(job);
}

/* ---- completion (QEMU's job_exit and what follows) ---- */

static void job_completed(struct job *job);
static void jobs_check_idle(void);

static void job_exit(void *opaque)
{
    struct job *job = opaque;
    job->exited = true;
    job->busy = false;
    job_completed(job);
    job_unref(job);              /* the reference job_work_done() took */
    jobs_check_idle();
}

void job_work_done(struct job *job, int ret, error *err)
{
    if (job->work_done) {
        log_error("job %s: work finished twice", job->id ? job->id : "(internal)");
        error_free(err);
        return;
    }
    job->work_done = true;
    job->ret = ret;
    if (err) {
        error_free(job->err);
        job->err = err;
    }
    job_ref(job);
    loop_call(loop_main(), job_exit, job);
}

static void job_update_rc(struct job *job)
{
    if (!job->ret && job_is_cancelled(job))
        job->ret = -ECANCELED;
    if (job->ret) {
        if (!job->err)
            error_setg(&job->err, "%s", strerror(-job->ret));
        job_set_status(job, JOB_STATUS_ABORTING);
    }
}

static void job_do_dismiss(struct job *job)
{
    job->busy = false;
    job->paused = false;
    job->work_done = true;
    job_txn_del_job(job);
    job_set_status(job, JOB_STATUS_NULL);
    job_list_remove(job);
    job_unref(job);
}

static void job_conclude(struct job *job)
{
    job_set_status(job, JOB_STATUS_CONCLUDED);
    if (job->auto_dismiss || !job->started)
        job_do_dismiss(job);
}

static int job_finalize_single(struct job *job)
{
    job_update_rc(job);
    if (!job->ret) {
        if (job->driver->commit)
            job->driver->commit(job);
    } else if (job->driver->abort) {
        job->driver->abort(job);
    }
    if (job->driver->clean)
        job->driver->clean(job);
    if (job->cb)
        job->cb(job->opaque, job->ret);
    if (job->started && job->driver->on_finalized)
        job->driver->on_finalized(job, job_is_cancelled(job));
    job_txn_del_job(job);
    job_conclude(job);
    return 0;
}

static void job_cancel_async(struct job *job, bool force);

/* Finalize the aborting transaction's jobs once none is still working. */
static void job_txn_abort_continue(struct job_txn *txn)
{
    for (struct job *j = txn->jobs; j; j = j->txn_next)
        if (!job_is_completed(j))
            return;         /* its job_exit() brings us back here */
    job_txn_ref(txn);
    while (txn->jobs) {
        struct job *j = txn->jobs;
        job_ref(j);
        job_finalize_single(j);
        job_unref(j);
    }
    job_txn_unref(txn);
}

static void job_completed_txn_abort(struct job *job)
{
    struct job_txn *txn = job->txn;
    if (!txn)
        return;
    if (!txn->aborting) {
        txn->aborting = true;
        /* The others are cancelled by this one's failure, forcibly. */
        for (struct job *j = txn->jobs; j; j = j->txn_next)
            if (j != job) {
                job_cancel_async(j, true);
                job_enter(j);
            }
    }
    job_txn_abort_continue(txn);
}

static int job_prepare(struct job *job)
{
    if (job->ret == 0 && job->driver->prepare) {
        job->ret = job->driver->prepare(job);
        job_update_rc(job);
    }
    return job->ret;
}

static void job_do_finalize(struct job *job)
{
    job_ref(job);
    if (job_txn_apply(job, job_prepare))
        job_completed_txn_abort(job);
    else
        job_txn_apply(job, job_finalize_single);
    job_unref(job);
}

static int job_transition_to_pending(struct job *job)
{
    job_set_status(job, JOB_STATUS_PENDING);
    if (!job->auto_finalize && job->driver->on_pending)
        job->driver->on_pending(job);
    return 0;
}

static int job_needs_finalize(struct job *job)
{
    return !job->auto_finalize;
}

static void job_completed_txn_success(struct job *job)
{
    job_set_status(job, JOB_STATUS_WAITING);
    for (struct job *j = job->txn ? job->txn->jobs : NULL; j; j = j->txn_next)
        if (!job_is_completed(j))
            return;
    job_txn_apply(job, job_transition_to_pending);
    if (job_txn_apply(job, job_needs_finalize) == 0)
        job_do_finalize(job);
}

static void job_completed(struct job *job)
{
    job_ref(job);
    job_update_rc(job);
    if (job->ret)
        job_completed_txn_abort(job);
    else
        job_completed_txn_success(job);
    job_unref(job);
}

/* ---- verbs ---- */

static void job_pause(struct job *job)
{
    job->pause_count++;
    /* Work waiting (asleep, yielded) goes to its pause point now, as in
     * QEMU: a rate-limited job shows "paused" at once. */
    if (!job->paused)
        job_enter(job);
}

static void job_resume(struct job *job)
{
    if (job->pause_count <= 0)
        return;
    if (--job->pause_count)
        return;
    /* Kick only work that is not sleeping on a timer. */
    job_enter_cond(job, true);
}

void job_user_pause(struct job *job, error **errp)
{
    if (job_apply_verb(job, JOB_VERB_PAUSE, errp))
        return;
    if (job->user_paused) {
        error_setg(errp, "Job is already paused");
        return;
    }
    job->user_paused = true;
    job_pause(job);
}

void job_user_resume(struct job *job, error **errp)
{
    if (!job->user_paused || job->pause_count <= 0) {
        error_setg(errp, "Can't resume a job that was not paused");
        return;
    }
    if (job_apply_verb(job, JOB_VERB_RESUME, errp))
        return;
    if (job->driver->user_resume)
        job->driver->user_resume(job);
    job->user_paused = false;
    job_resume(job);
}

static void job_cancel_async(struct job *job, bool force)
{
    force = job->driver->cancel ? job->driver->cancel(job, force) : true;
    if (job->user_paused) {
        /* The caller enters the job. */
        if (job->driver->user_resume)
            job->driver->user_resume(job);
        job->user_paused = false;
        if (job->pause_count > 0)
            job->pause_count--;
    }
    /* A soft cancel of a job whose work is over changes nothing. */
    if (force || !job->work_done) {
        job->cancelled = true;
        job->force_cancel |= force;
    }
}

static void job_cancel(struct job *job, bool force)
{
    if (job->status == JOB_STATUS_CONCLUDED) {
        job_do_dismiss(job);
        return;
    }
    job_ref(job);
    job_cancel_async(job, force);
    if (!job->started) {
        job_completed(job);
    } else if (job->work_done) {
        /* Waiting or pending: abort now.  (Work that just ended and whose
         * exit is still queued sees the cancel in job_exit.) */
        if (job->exited && job_is_cancelled(job))
            job_completed_txn_abort(job);
    } else {
        job_enter(job);
    }
    job_unref(job);
}

void job_early_fail(struct job *job)
{
    job_do_dismiss(job);
}

void job_user_cancel(struct job *job, bool force, error **errp)
{
    if (job_apply_verb(job, JOB_VERB_CANCEL, errp))
        return;
    job_cancel(job, force);
}

void job_complete(struct job *job, error **errp)
{
    if (job_apply_verb(job, JOB_VERB_COMPLETE, errp))
        return;
    if (job_cancel_requested(job) || !job->driver->complete) {
        error_setg(errp, "The active block job '%s' cannot be completed", job->id);
        return;
    }
    job->driver->complete(job, errp);
}

void job_finalize(struct job *job, error **errp)
{
    if (job_apply_verb(job, JOB_VERB_FINALIZE, errp))
        return;
    job_do_finalize(job);
}

void job_dismiss(struct job *job, error **errp)
{
    if (job_apply_verb(job, JOB_VERB_DISMISS, errp))
        return;
    job_do_dismiss(job);
}

json_t *job_info(struct job *job)
{
    json_t *info = json_pack("{s:s, s:s, s:s, s:I, s:I}", "id", job->id,
                             "type", type_names[job->driver->type],
                             "status", status_names[job->status],
                             "current-progress", (json_int_t)job->progress_current,
                             "total-progress", (json_int_t)job->progress_total);
    if (job->err)
        json_object_set_new(info, "error", json_string(job->err->msg));
    return info;
}

/* ---- work in a thread ---- */

struct job_thread {
    struct job *job;
    int (*fn)(void *opaque, error **errp);
    void *opaque;
    void (*done)(struct job *job, int ret, error *err);
    int ret;
    error *err;
};

static void job_thread_done(void *opaque)
{
    struct job_thread *t = opaque;
    struct job *job = t->job;
    t->done(job, t->ret, t->err);
    free(t);
    job_unref(job);
}

static void *job_thread_main(void *opaque)
{
    struct job_thread *t = opaque;
    t->ret = t->fn(t->opaque, &t->err);
    if (t->ret > 0)
        t->ret = 0;
    loop_call(loop_main(), job_thread_done, t);
    return NULL;
}

void job_run_in_thread(struct job *job, int (*fn)(void *opaque, error **errp), void *opaque,
                       void (*done)(struct job *job, int ret, error *err))
{
    struct job_thread *t = xzalloc(sizeof(*t));
    *t = (struct job_thread){ .job = job, .fn = fn, .opaque = opaque,
                             .done = done ? done : job_work_done };
    job_ref(job);
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int err = pthread_create(&th, &attr, job_thread_main, t);
    pthread_attr_destroy(&attr);
    if (err) {
        free(t);
        job_unref(job);
        error *e = NULL;
        error_setg_errno(&e, err, "Could not start a thread for the job");
        (done ? done : job_work_done)(job, -err, e);
    }
}

/* ---- shutdown ---- */

static void jobs_check_idle(void)
{
    if (!all_idle_cb)
        return;
    for (struct job *j = jobs; j; j = j->next)
        if (j->started && !j->exited)
            return;
    void (*cb)(void *) = all_idle_cb;
    all_idle_cb = NULL;
    cb(all_idle_opaque);
}

void jobs_cancel_all(void (*done)(void *opaque), void *opaque)
{
    all_idle_cb = done;
    all_idle_opaque = opaque;
    /* Cancelling may free jobs: walk a snapshot of the ids, once. */
    int n = 0;
    for (struct job *j = jobs; j; j = j->next)
        n += j->id != NULL;
    char **ids = xcalloc(n + 1, sizeof(*ids));
    int i = 0;
    for (struct job *j = jobs; j; j = j->next)
        if (j->id)
            ids[i++] = xstrdup(j->id);
    for (i = 0; i < n; i++) {
        struct job *j = job_get(ids[i]);
        if (j && j->status != JOB_STATUS_NULL && j->status != JOB_STATUS_ABORTING)
            job_cancel(j, true);
        free(ids[i]);
    }
    free(ids);
    jobs_check_idle();
}

void jobs_free_all(void)
{
    while (jobs) {
        struct job *j = jobs;
        job_list_remove(j);
        job_txn_del_job(j);
        j->refcnt = 1;
        job_unref(j);
    }
}
