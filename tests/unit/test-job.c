/* Unit tests of the job core: QEMU's statuses through pause points, ready
 * and standby, completion, manual finalize and dismiss, cancellation in
 * each phase, transactions, sleeping. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <errno.h>
#include <string.h>
#include "job/job.h"
#include "util/loop.h"

struct tjob {
    struct job common;
    int steps;              /* work left before ready (or done) */
    bool wants_ready;       /* becomes ready and waits for job-complete */
    bool completed;         /* job_complete() called */
    int fail;               /* the work's result */
    int commits, aborts, cleans, pendings, readies, finalized, finalized_cancelled;
    bool sleep_long;
};

static void stop_main(void *opaque)
{
    loop_stop(loop_main());
}

/* Run what the main loop has queued so far (job exits, thread results). */
static void run_pending(void)
{
    loop_call(loop_main(), stop_main, NULL);
    loop_run(loop_main());
}

static void work_step(struct job *job)
{
    struct tjob *t = (struct tjob *)job;
    if (job_is_cancelled(job) || (t->wants_ready && t->completed) ||
        (!t->wants_ready && t->steps == 0)) {
        job_work_done(job, t->fail, NULL);
        return;
    }
    if (t->steps > 0) {
        t->steps--;
        job_progress_update(job, 1);
        if (t->steps == 0 && t->wants_ready)
            job_transition_to_ready(job);
    }
    if (t->sleep_long)
        job_sleep(job, 60000, work_step);
    else
        job_yield(job, work_step);
}

static void t_run(struct job *job)
{
    job_progress_set_remaining(job, ((struct tjob *)job)->steps);
    work_step(job);
}

static void t_complete(struct job *job, error **errp)
{
    ((struct tjob *)job)->completed = true;
    job_enter(job);
}

static void t_commit(struct job *job) { ((struct tjob *)job)->commits++; }
static void t_abort(struct job *job) { ((struct tjob *)job)->aborts++; }
static void t_clean(struct job *job) { ((struct tjob *)job)->cleans++; }
static void t_pending(struct job *job) { ((struct tjob *)job)->pendings++; }
static void t_ready(struct job *job) { ((struct tjob *)job)->readies++; }
static void t_finalized(struct job *job, bool cancelled)
{
    struct tjob *t = (struct tjob *)job;
    t->finalized++;
    t->finalized_cancelled += cancelled;
}

static const struct job_driver tdrv = {
    .instance_size = sizeof(struct tjob),
    .type = JOB_TYPE_BACKUP,
    .run = t_run,
    .complete = t_complete,
    .commit = t_commit,
    .abort = t_abort,
    .clean = t_clean,
    .on_pending = t_pending,
    .on_ready = t_ready,
    .on_finalized = t_finalized,
};

static struct tjob *new_job(const char *id, unsigned flags, struct job_txn *txn)
{
    error *err = NULL;
    struct tjob *t = job_create(id, &tdrv, txn, flags, NULL, NULL, &err);
    assert_non_null(t);
    assert_int_equal(t->common.status, JOB_STATUS_CREATED);
    job_ref(&t->common);        /* keep it readable after it is gone */
    return t;
}

static void expect_verb_error(struct job *job, void (*verb)(struct job *, error **),
                              const char *msg)
{
    error *err = NULL;
    verb(job, &err);
    assert_non_null(err);
    assert_string_equal(err->msg, msg);
    error_free(err);
}

static void test_ids(void **state)
{
    error *err = NULL;
    assert_null(job_create("1x", &tdrv, NULL, 0, NULL, NULL, &err));
    assert_string_equal(err->msg, "Invalid job ID '1x'");
    error_free(err), err = NULL;
    assert_null(job_create(NULL, &tdrv, NULL, 0, NULL, NULL, &err));
    assert_string_equal(err->msg, "An explicit job ID is required");
    error_free(err), err = NULL;
    struct tjob *t = new_job("a", JOB_MANUAL_DISMISS, NULL);
    assert_null(job_create("a", &tdrv, NULL, 0, NULL, NULL, &err));
    assert_string_equal(err->msg, "Job ID 'a' already in use");
    error_free(err), err = NULL;
    /* cancelled before it started: straight to null, no finalize events */
    job_user_cancel(&t->common, true, &err);
    assert_null(err);
    assert_int_equal(t->common.status, JOB_STATUS_NULL);
    assert_null(job_get("a"));
    assert_int_equal(t->aborts, 1);
    assert_int_equal(t->finalized, 0);
    job_unref(&t->common);
}

static void test_pause_resume_complete(void **state)
{
    struct tjob *t = new_job("p", JOB_MANUAL_DISMISS, NULL);
    struct job *job = &t->common;
    error *err = NULL;
    t->steps = 2;
    t->wants_ready = true;
    job_start(job);
    assert_int_equal(job->status, JOB_STATUS_RUNNING);
    assert_int_equal(job->progress_current, 1);
    assert_int_equal(job->progress_total, 2);
    /* pausing wakes the waiting work, which pauses at once (QEMU's job_pause) */
    job_user_pause(job, &err);
    assert_null(err);
    expect_verb_error(job, job_user_pause, "Job is already paused");
    assert_int_equal(job->status, JOB_STATUS_PAUSED);
    assert_true(job->paused);
    assert_int_equal(job->progress_current, 1);
    job_user_resume(job, &err);
    assert_null(err);
    /* resumed: the work went on to its last step and is ready */
    assert_int_equal(job->status, JOB_STATUS_READY);
    assert_int_equal(t->readies, 1);
    expect_verb_error(job, job_finalize, "Job 'p' in state 'ready' cannot accept command verb 'finalize'");
    job_user_pause(job, &err);
    assert_int_equal(job->status, JOB_STATUS_STANDBY);
    expect_verb_error(job, job_complete, "Job 'p' in state 'standby' cannot accept command verb 'complete'");
    job_user_resume(job, &err);
    assert_null(err);
    assert_int_equal(job->status, JOB_STATUS_READY);
    job_complete(job, &err);
    assert_null(err);
    /* the rest of the completion runs from the loop */
    assert_int_equal(job->status, JOB_STATUS_READY);
    run_pending();
    assert_int_equal(job->status, JOB_STATUS_CONCLUDED);
    assert_int_equal(t->commits, 1);
    assert_int_equal(t->aborts, 0);
    assert_int_equal(t->cleans, 1);
    assert_int_equal(t->pendings, 0);           /* auto-finalize: no pending event */
    assert_int_equal(t->finalized, 1);
    assert_int_equal(t->finalized_cancelled, 0);
    assert_null(job->err);
    job_dismiss(job, &err);
    assert_null(err);
    assert_int_equal(job->status, JOB_STATUS_NULL);
    job_unref(job);
}

static void test_manual_finalize(void **state)
{
    struct tjob *t = new_job("f", JOB_MANUAL_FINALIZE, NULL);
    struct job *job = &t->common;
    error *err = NULL;
    t->steps = 1;
    job_start(job);
    job_enter(job);
    run_pending();
    assert_int_equal(job->status, JOB_STATUS_PENDING);
    assert_int_equal(t->pendings, 1);
    assert_int_equal(t->commits, 0);
    expect_verb_error(job, job_dismiss, "Job 'f' in state 'pending' cannot accept command verb 'dismiss'");
    expect_verb_error(job, job_user_pause, "Job 'f' in state 'pending' cannot accept command verb 'pause'");
    job_finalize(job, &err);
    assert_null(err);
    /* auto-dismiss: gone at once */
    assert_int_equal(job->status, JOB_STATUS_NULL);
    assert_null(job_get("f"));
    assert_int_equal(t->commits, 1);
    job_unref(job);
}

static void test_cancel_pending(void **state)
{
    struct tjob *t = new_job("c", JOB_MANUAL_FINALIZE | JOB_MANUAL_DISMISS, NULL);
    struct job *job = &t->common;
    error *err = NULL;
    t->steps = 1;
    job_start(job);
    job_enter(job);
    run_pending();
    assert_int_equal(job->status, JOB_STATUS_PENDING);
    job_user_cancel(job, true, &err);
    assert_null(err);
    assert_int_equal(job->status, JOB_STATUS_CONCLUDED);
    assert_int_equal(job->ret, -ECANCELED);
    assert_string_equal(job->err->msg, "Operation canceled");
    assert_int_equal(t->aborts, 1);
    assert_int_equal(t->finalized_cancelled, 1);
    job_dismiss(job, &err);
    job_unref(job);
}

static void test_cancel_paused(void **state)
{
    struct tjob *t = new_job("x", JOB_MANUAL_DISMISS, NULL);
    struct job *job = &t->common;
    error *err = NULL;
    t->steps = 5;
    job_start(job);
    job_user_pause(job, &err);
    assert_int_equal(job->status, JOB_STATUS_PAUSED);
    job_user_cancel(job, true, &err);
    assert_null(err);
    assert_false(job->user_paused);
    run_pending();
    assert_int_equal(job->status, JOB_STATUS_CONCLUDED);
    assert_string_equal(job->err->msg, "Operation canceled");
    assert_int_equal(job->progress_current, 1);
    assert_int_equal(t->aborts, 1);
    assert_int_equal(t->commits, 0);
    job_user_cancel(job, true, &err);
    assert_string_equal(err->msg, "Job 'x' in state 'concluded' cannot accept command verb 'cancel'");
    error_free(err), err = NULL;
    job_dismiss(job, &err);
    job_unref(job);
}

static void test_failure_aborts_transaction(void **state)
{
    struct job_txn *txn = job_txn_new();
    struct tjob *a = new_job("a", JOB_MANUAL_DISMISS, txn);
    struct tjob *b = new_job("b", JOB_MANUAL_DISMISS, txn);
    job_txn_unref(txn);
    error *err = NULL;
    a->steps = 1;
    b->steps = 3;
    b->fail = -EIO;
    job_start(&a->common);
    job_start(&b->common);
    job_enter(&a->common);
    run_pending();
    /* a is done but waits for b */
    assert_int_equal(a->common.status, JOB_STATUS_WAITING);
    for (int i = 0; i < 3; i++)
        job_enter(&b->common);
    run_pending();
    assert_int_equal(b->common.status, JOB_STATUS_CONCLUDED);
    assert_string_equal(b->common.err->msg, strerror(EIO));
    assert_int_equal(a->common.status, JOB_STATUS_CONCLUDED);
    assert_int_equal(a->common.ret, -ECANCELED);
    assert_int_equal(a->aborts, 1);
    assert_int_equal(b->aborts, 1);
    assert_int_equal(a->commits + b->commits, 0);
    job_dismiss(&a->common, &err);
    job_dismiss(&b->common, &err);
    assert_null(err);
    job_unref(&a->common);
    job_unref(&b->common);
}

static void test_sleep_cut_by_pause_and_cancel(void **state)
{
    struct tjob *t = new_job("s", JOB_MANUAL_DISMISS, NULL);
    struct job *job = &t->common;
    error *err = NULL;
    t->steps = 5;
    t->sleep_long = true;
    job_start(job);
    assert_int_equal(job->progress_current, 1);
    /* a pause wakes the sleeper, which pauses; the resume goes on from
     * there (QEMU: the sleep is cut), and it sleeps again */
    job_user_pause(job, &err);
    assert_int_equal(job->status, JOB_STATUS_PAUSED);
    assert_int_equal(job->progress_current, 1);
    job_user_resume(job, &err);
    assert_null(err);
    assert_int_equal(job->progress_current, 2);
    assert_int_equal(job->status, JOB_STATUS_RUNNING);
    job_user_cancel(job, true, &err);
    assert_null(err);
    run_pending();
    assert_int_equal(job->status, JOB_STATUS_CONCLUDED);
    assert_int_equal(job->progress_current, 2);
    job_dismiss(job, &err);
    job_unref(job);
}

/* The same work as a coroutine: pause points and yields inside it. */
static int co_work(struct job *job, error **errp)
{
    struct tjob *t = (struct tjob *)job;
    while (t->steps > 0 && !job_is_cancelled(job)) {
        t->steps--;
        job_progress_update(job, 1);
        job_co_yield(job);
        job_co_pause_point(job);
    }
    if (t->fail)
        error_setg(errp, "the work failed");
    return t->fail;
}

static void co_run(struct job *job)
{
    job_progress_set_remaining(job, ((struct tjob *)job)->steps);
    job_run_co(job, co_work);
}

static const struct job_driver co_drv = {
    .instance_size = sizeof(struct tjob),
    .type = JOB_TYPE_BACKUP,
    .run = co_run,
    .commit = t_commit,
    .abort = t_abort,
};

static void test_coroutine_work(void **state)
{
    error *err = NULL;
    struct tjob *t = job_create("co", &co_drv, NULL, JOB_MANUAL_DISMISS, NULL, NULL, &err);
    struct job *job = &t->common;
    t->steps = 3;
    t->fail = -ENOSPC;
    job_start(job);
    assert_int_equal(job->progress_current, 1);
    job_user_pause(job, &err);
    job_enter(job);                     /* out of the yield, into the pause point */
    assert_int_equal(job->status, JOB_STATUS_PAUSED);
    job_user_resume(job, &err);
    assert_null(err);
    assert_int_equal(job->status, JOB_STATUS_RUNNING);
    assert_int_equal(job->progress_current, 2);
    job_enter(job);
    job_enter(job);
    run_pending();
    assert_int_equal(job->status, JOB_STATUS_CONCLUDED);
    assert_int_equal(job->progress_current, 3);
    assert_string_equal(job->err->msg, "the work failed");
    assert_int_equal(t->aborts, 1);
    job_dismiss(job, &err);
    assert_null(err);
}

int main(void)
{
    loop_main_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ids),
        cmocka_unit_test(test_pause_resume_complete),
        cmocka_unit_test(test_manual_finalize),
        cmocka_unit_test(test_cancel_pending),
        cmocka_unit_test(test_cancel_paused),
        cmocka_unit_test(test_failure_aborts_transaction),
        cmocka_unit_test(test_sleep_cut_by_pause_and_cancel),
        cmocka_unit_test(test_coroutine_work),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
