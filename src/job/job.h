/*
 * Background jobs: QEMU 7.2's job model (qapi/job.json), the base of
 * blockdev-create and of the block jobs (backup...).
 *
 * A job has a status (enum job_status) that moves only along QEMU's
 * transition table, emitting JOB_STATUS_CHANGE for every move of a job
 * with an id.  The QMP verbs (job-pause, job-cancel, ...) are accepted only
 * in the statuses QEMU's verb table allows, with QEMU's error otherwise.
 *
 * Life of a job:
 *
 *   job_create()  -> created      (the job exists, its work has not begun)
 *   job_start()   -> running      driver->run() is called
 *   ... work, pause points (paused), job_transition_to_ready() (ready,
 *       standby while paused), until the work calls job_work_done() ...
 *   success       -> waiting      (until every job of its transaction is done)
 *                 -> pending      (auto-finalize: on at once; else job-finalize)
 *   failure/cancel-> aborting
 *   finalize: driver->prepare, then ->commit or ->abort, then ->clean
 *                 -> concluded    (auto-dismiss: on at once; else job-dismiss)
 *                 -> null         (the job is gone)
 *
 * Everything here runs in the main thread.  The work itself is pluggable:
 * driver->run() starts it and the work ends, exactly once, with
 * job_work_done().  The work may be a chain of callbacks (asynchronous block
 * requests), a blocking function run with job_run_in_thread(), or a
 * coroutine (job_run_co, with job_co_pause_point...).  Work written as callbacks offers
 * pause points with job_pause_point(job, continuation): the job pauses
 * there when asked to and the continuation runs on resume; job_sleep()
 * and job_yield() wait for a timer or a job_enter() kick the same way.
 *
 * Block jobs (query-block-jobs, BLOCK_JOB_* events) are built on this: the
 * driver's on_ready/on_pending/on_finalized hooks are where QEMU emits
 * BLOCK_JOB_READY, BLOCK_JOB_PENDING and BLOCK_JOB_COMPLETED/CANCELLED, and
 * the struct job fields below give the rest of BlockJobInfo.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <jansson.h>
#include "util/error.h"

/* QAPI JobStatus, in QEMU's order (the tables are indexed by it). */
enum job_status {
    JOB_STATUS_UNDEFINED,
    JOB_STATUS_CREATED,
    JOB_STATUS_RUNNING,
    JOB_STATUS_PAUSED,
    JOB_STATUS_READY,
    JOB_STATUS_STANDBY,
    JOB_STATUS_WAITING,
    JOB_STATUS_PENDING,
    JOB_STATUS_ABORTING,
    JOB_STATUS_CONCLUDED,
    JOB_STATUS_NULL,
    JOB_STATUS__MAX,
};

/* QAPI JobVerb (QEMU 7.2 has no "change" verb yet). */
enum job_verb {
    JOB_VERB_CANCEL,
    JOB_VERB_PAUSE,
    JOB_VERB_RESUME,
    JOB_VERB_SET_SPEED,
    JOB_VERB_COMPLETE,
    JOB_VERB_FINALIZE,
    JOB_VERB_DISMISS,
    JOB_VERB__MAX,
};

/* QAPI JobType */
enum job_type {
    JOB_TYPE_COMMIT,
    JOB_TYPE_STREAM,
    JOB_TYPE_MIRROR,
    JOB_TYPE_BACKUP,
    JOB_TYPE_CREATE,
    JOB_TYPE_AMEND,
    JOB_TYPE_SNAPSHOT_LOAD,
    JOB_TYPE_SNAPSHOT_SAVE,
    JOB_TYPE_SNAPSHOT_DELETE,
    JOB_TYPE__MAX,
};

/* job_create() flags, as QEMU's */
enum {
    JOB_DEFAULT         = 0,
    JOB_INTERNAL        = 1u << 0,   /* no id, no events, not listed */
    JOB_MANUAL_FINALIZE = 1u << 1,   /* stay pending until job-finalize */
    JOB_MANUAL_DISMISS  = 1u << 2,   /* stay concluded until job-dismiss */
};

struct job;
struct job_txn;
struct loop_timer;
typedef void job_fn(struct job *job);

struct job_driver {
    size_t instance_size;            /* >= sizeof(struct job); struct job first */
    enum job_type type;
    /* Start the work (status running).  The work ends with job_work_done(). */
    void (*run)(struct job *job);
    /* Cancellation was asked for.  Returns whether it is a forced one (a
     * soft cancel of a ready mirror completes without pivot).  NULL: forced. */
    bool (*cancel)(struct job *job, bool force);
    /* A pause point is about to pause / has resumed the work. */
    void (*pause)(struct job *job);
    void (*resume)(struct job *job);
    /* job-resume (or a cancel) lifted the user's pause. */
    void (*user_resume)(struct job *job);
    /* job-complete of a ready job; NULL: the job cannot be completed. */
    void (*complete)(struct job *job, error **errp);
    /* Finalization: prepare may still fail the job (-errno); then commit
     * (success) or abort (failure), then clean, in every case. */
    int  (*prepare)(struct job *job);
    void (*commit)(struct job *job);
    void (*abort)(struct job *job);
    void (*clean)(struct job *job);
    /* Free driver state; the job itself is freed by the core. */
    void (*free)(struct job *job);
    /* Hooks for block jobs' events (NULL: none).  on_pending only when the
     * job needs job-finalize; on_finalized only for jobs that started. */
    void (*on_ready)(struct job *job);
    void (*on_pending)(struct job *job);
    void (*on_finalized)(struct job *job, bool cancelled);
};

struct job {
    char *id;                        /* NULL for internal jobs */
    const struct job_driver *driver;
    enum job_status status;
    int refcnt;
    bool auto_finalize, auto_dismiss;
    /* Pausing: pause_count > 0 asks the work to pause at its next pause
     * point; paused says it is there (BlockJobInfo "paused" is user_paused). */
    int pause_count;
    bool user_paused;
    bool paused;
    bool busy;                       /* the work is running, not waiting */
    bool started;                    /* job_start() was called */
    bool work_done;                  /* job_work_done() was called */
    bool cancelled;                  /* cancellation requested */
    bool force_cancel;
    int ret;                         /* the work's result, 0 or -errno */
    error *err;                      /* why it failed (query-jobs "error") */
    uint64_t progress_current, progress_total;
    struct job_txn *txn;
    void (*cb)(void *opaque, int ret);   /* called at finalization */
    void *opaque;
    /* private to job.c */
    struct coroutine *co;            /* job_run_co(): the work's coroutine */
    int (*co_fn)(struct job *job, error **errp);
    job_fn *cont;                    /* where waiting work continues */
    int wait;                        /* what the work waits for, if not busy */
    enum job_status status_before_pause;
    struct loop_timer *sleep_timer;
    bool timer_armed;
    bool exited;                     /* the completion path has begun */
    struct job *next;                /* every job, newest first */
    struct job *txn_next;
};

const char *job_status_name(enum job_status s);
const char *job_verb_name(enum job_verb v);
const char *job_type_name(enum job_type t);

/* ---- creating and running (for job implementations) ---- */

/* A new job in status created, or NULL with QEMU's errors ("Invalid job
 * ID '%s'", "Job ID '%s' already in use", "An explicit job ID is
 * required").  txn NULL: a transaction of its own.  cb (may be NULL) runs
 * at finalization with the job's result. */
void *job_create(const char *id, const struct job_driver *drv, struct job_txn *txn,
                 unsigned flags, void (*cb)(void *opaque, int ret), void *opaque,
                 error **errp);
void job_start(struct job *job);
/* A job still created (never started) that cannot go on: it goes to null
 * and is freed at once, as QEMU's job_early_fail(). */
void job_early_fail(struct job *job);

/* The work is over: ret 0 or -errno; err (stolen, may be NULL) says why
 * it failed.  Completion (waiting/pending/finalize...) follows in the main
 * loop, never inside this call. */
void job_work_done(struct job *job, int ret, error *err);

/* Run fn(opaque, errp) in a thread of its own, then done(job, ret, err)
 * in the main loop (NULL: job_work_done).  For work made of blocking
 * system calls. */
void job_run_in_thread(struct job *job, int (*fn)(void *opaque, error **errp), void *opaque,
                       void (*done)(struct job *job, int ret, error *err));

/* Pause point for work written as callbacks.  If the job must pause now,
 * it moves to paused (standby if ready), returns true, and cont(job) runs
 * once it is resumed (or cancelled); the caller returns at once.  Otherwise
 * returns false and the caller goes on. */
bool job_pause_point(struct job *job, job_fn *cont);
/* Wait ms milliseconds (or until job_enter()/a cancel), pass a pause point,
 * then run cont(job); never calls cont before returning.  A cancelled job
 * does not sleep. */
void job_sleep(struct job *job, uint64_t ms, job_fn *cont);
/* Wait for job_enter() (or a cancel), then pass a pause point, then cont. */
void job_yield(struct job *job, job_fn *cont);
/* Wake work waiting in job_sleep()/job_yield() now. */
void job_enter(struct job *job);

/* Work as a coroutine (util/coroutine.h): fn runs in a coroutine of the
 * main loop and its return ends the work (job_work_done(job, ret, err)).
 * Inside it, the job_co_* calls are the pause point, sleep and yield above,
 * waiting by yielding the coroutine. */
void job_run_co(struct job *job, int (*fn)(struct job *job, error **errp));
void job_co_pause_point(struct job *job);
void job_co_sleep(struct job *job, uint64_t ms);
void job_co_yield(struct job *job);

void job_transition_to_ready(struct job *job);
bool job_is_cancelled(const struct job *job);        /* forced cancel asked */
bool job_cancel_requested(const struct job *job);    /* any cancel asked */
bool job_is_ready(const struct job *job);            /* ready or standby */
bool job_is_completed(const struct job *job);        /* the work is over */
bool job_should_pause(const struct job *job);

void job_progress_update(struct job *job, uint64_t done);
void job_progress_set_remaining(struct job *job, uint64_t remaining);
void job_progress_increase_remaining(struct job *job, uint64_t delta);

void job_ref(struct job *job);
void job_unref(struct job *job);

/* Transactions: jobs that succeed or fail together (QEMU's JobTxn). */
struct job_txn *job_txn_new(void);
void job_txn_unref(struct job_txn *txn);
void job_txn_add_job(struct job_txn *txn, struct job *job);

/* ---- verbs (QMP job-* and block-job-*) ---- */

struct job *job_get(const char *id);
struct job *job_next(struct job *job);      /* NULL: the first (newest) job */
/* 0, or -EPERM with "Job '%s' in state '%s' cannot accept command verb '%s'". */
int  job_apply_verb(struct job *job, enum job_verb verb, error **errp);
void job_user_pause(struct job *job, error **errp);
void job_user_resume(struct job *job, error **errp);
void job_user_cancel(struct job *job, bool force, error **errp);
void job_complete(struct job *job, error **errp);
void job_finalize(struct job *job, error **errp);
void job_dismiss(struct job *job, error **errp);   /* the job may be freed */

/* query-jobs JobInfo of one job (new reference). */
json_t *job_info(struct job *job);

/* Shutdown: cancel every job (forced) and call done(opaque) once none is
 * still working; jobs_free_all() then drops what is left. */
void jobs_cancel_all(void (*done)(void *opaque), void *opaque);
void jobs_free_all(void);
