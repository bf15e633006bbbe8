/*
 * Block jobs (see block-job.h): the common part of QEMU 7.2's blockjob.c
 * and blockdev.c's block-job-* commands.
 *
 * Theory of operation: a block job is a job whose driver uses the hooks
 * below; everything about its status and verbs is the job framework's.
 * This file adds what QEMU's BlockJob adds: BlockJobInfo, the
 * BLOCK_JOB_PENDING / COMPLETED / CANCELLED / READY / ERROR events (the
 * framework calls the hooks where QEMU's notifiers fire), the speed with
 * its rate limit, the io-status and the op blockers of the job's nodes.
 * The commands find a job with "Block job '%s' not found" (DeviceNotActive)
 * and then call the framework's verb, which gives QEMU's state errors.
 */
#include <errno.h>
#include <string.h>
#include <time.h>
#include "block/block.h"
#include "block/block-job.h"
#include "util/xalloc.h"
#include "qmp/qmp.h"
#include "util/opts.h"

#define SLICE_NS 100000000ull          /* QEMU's BLOCK_JOB_SLICE_TIME */

static const char *const iostatus_names[] = { "ok", "failed", "nospace" };
static const char *const action_names[] = { "ignore", "report", "stop" };

enum block_on_error block_on_error_parse(const char *s)
{
    static const char *const names[] = { "report", "ignore", "enospc", "stop", "auto" };
    for (unsigned i = 0; s && i < sizeof(names) / sizeof(names[0]); i++)
        if (!strcmp(s, names[i]))
            return (enum block_on_error)i;
    return ON_ERROR_REPORT;
}

struct block_job *block_job_of(struct job *job)
{
    return job && job->driver->on_finalized == block_job_on_finalized ? (struct block_job *)job
                                                                      : NULL;
}

static const char *block_job_blocker(struct block_job *bj)
{
    static char reasons[JOB_TYPE__MAX][64];
    enum job_type t = bj->job.driver->type;
    if (!reasons[t][0])
        snprintf(reasons[t], sizeof(reasons[t]), "block device is in use by block job: %s",
                 job_type_name(t));
    return reasons[t];
}

void block_job_add_node(struct block_job *bj, struct bnode *bs)
{
    if (bj->nnodes == bj->nodes_cap) {
        bj->nodes_cap = bj->nodes_cap ? 2 * bj->nodes_cap : 4;
        bj->nodes = xrealloc(bj->nodes, bj->nodes_cap * sizeof(*bj->nodes));
    }
    bnode_ref(bs);
    bs->blocker = block_job_blocker(bj);
    bj->nodes[bj->nnodes++] = bs;
}

void block_job_remove_nodes(struct block_job *bj)
{
    while (bj->nnodes > 0) {
        struct bnode *bs = bj->nodes[--bj->nnodes];
        bs->blocker = NULL;
        bnode_unref(bs);
    }
    free(bj->nodes);
    bj->nodes = NULL;
    bj->nodes_cap = 0;
}

unsigned block_job_flags(json_t *args)
{
    unsigned flags = JOB_DEFAULT;
    if (!opt_bool(args, "auto-finalize", true))
        flags |= JOB_MANUAL_FINALIZE;
    if (!opt_bool(args, "auto-dismiss", true))
        flags |= JOB_MANUAL_DISMISS;
    return flags;
}

int block_node_check_busy(struct bnode *bs, error **errp)
{
    if (!bs->blocker)
        return 0;
    error_setg(errp, "Node '%s' is busy: %s", bs->node_name, bs->blocker);
    return -1;
}

/* ---- speed ---- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t block_job_slice_quota(struct block_job *bj)
{
    if (!bj->speed)
        return 0;
    uint64_t q = (uint64_t)((double)bj->speed * SLICE_NS / 1e9);
    return q ? q : 1;
}

/* QEMU's ratelimit_calculate_delay(), in milliseconds (rounded up). */
uint64_t block_job_ratelimit(struct block_job *bj, uint64_t n)
{
    uint64_t quota = block_job_slice_quota(bj);
    if (!quota)
        return 0;
    uint64_t now = now_ns();
    if (bj->slice_end_ns < now) {
        bj->slice_start_ns = now;
        bj->slice_end_ns = now + SLICE_NS;
        bj->dispatched = 0;
    }
    bj->dispatched += n;
    if (bj->dispatched < quota)
        return 0;
    double slices = (double)bj->dispatched / (double)quota;
    double end = (double)bj->slice_start_ns + slices * (double)SLICE_NS;
    bj->slice_end_ns = end > 1.8e19 ? UINT64_MAX : (uint64_t)end;
    return bj->slice_end_ns > now ? (bj->slice_end_ns - now + 999999) / 1000000 : 0;
}

static int block_job_set_speed(struct block_job *bj, int64_t speed, error **errp)
{
    if (job_apply_verb(&bj->job, JOB_VERB_SET_SPEED, errp) < 0)
        return -1;
    if (speed < 0) {
        error_setg(errp, "Parameter 'speed' expects a non-negative value");
        return -1;
    }
    int64_t old = bj->speed;
    if (old == speed)
        return 0;
    bj->speed = speed;
    bj->slice_end_ns = 0;             /* a new slice with the new quota */
    if (bj->set_speed)
        bj->set_speed(bj, speed);
    if (speed && speed <= old)
        return 0;
    /* faster (or unlimited): wake a job waiting out its rate limit */
    job_enter(&bj->job);
    return 0;
}

void *block_job_create(const char *id, const struct job_driver *drv, struct job_txn *txn,
                       int64_t speed, unsigned flags, error **errp)
{
    struct block_job *bj = job_create(id, drv, txn, flags, NULL, NULL, errp);
    if (!bj)
        return NULL;
    if (block_job_set_speed(bj, speed, errp) < 0) {
        job_early_fail(&bj->job);
        return NULL;
    }
    return bj;
}

/* ---- errors ---- */

enum block_error_action block_job_error_action(struct block_job *bj, enum block_on_error on_err,
                                               bool is_read, int error)
{
    enum block_error_action action;
    switch (on_err) {
    case ON_ERROR_ENOSPC:
    case ON_ERROR_AUTO:
        action = error == ENOSPC ? ERROR_ACTION_STOP : ERROR_ACTION_REPORT;
        break;
    case ON_ERROR_STOP:
        action = ERROR_ACTION_STOP;
        break;
    case ON_ERROR_IGNORE:
        action = ERROR_ACTION_IGNORE;
        break;
    default:
        action = ERROR_ACTION_REPORT;
        break;
    }
    if (bj->job.id)
        qmp_event("BLOCK_JOB_ERROR", json_pack("{s:s, s:s, s:s}", "device", bj->job.id,
                                               "operation", is_read ? "read" : "write",
                                               "action", action_names[action]));
    if (action == ERROR_ACTION_STOP) {
        if (!bj->job.user_paused) {
            /* a pause the user sees, and lifts with block-job-resume */
            bj->job.pause_count++;
            bj->job.user_paused = true;
        }
        if (bj->iostatus == IOSTATUS_OK)
            bj->iostatus = error == ENOSPC ? IOSTATUS_NOSPACE : IOSTATUS_FAILED;
    }
    return action;
}

/* ---- events ---- */

static json_t *progress_event(struct block_job *bj)
{
    return json_pack("{s:s, s:s, s:I, s:I, s:I}", "type", job_type_name(bj->job.driver->type),
                     "device", bj->job.id,
                     "len", (json_int_t)__atomic_load_n(&bj->job.progress_total, __ATOMIC_RELAXED),
                     "offset", (json_int_t)__atomic_load_n(&bj->job.progress_current,
                                                           __ATOMIC_RELAXED),
                     "speed", (json_int_t)bj->speed);
}

void block_job_on_ready(struct job *job)
{
    if (job->id)
        qmp_event("BLOCK_JOB_READY", progress_event((struct block_job *)job));
}

void block_job_on_pending(struct job *job)
{
    if (job->id)
        qmp_event("BLOCK_JOB_PENDING", json_pack("{s:s, s:s}", "type",
                                                 job_type_name(job->driver->type),
                                                 "id", job->id));
}

void block_job_on_finalized(struct job *job, bool cancelled)
{
    if (!job->id)
        return;
    json_t *data = progress_event((struct block_job *)job);
    if (!cancelled && job->ret < 0)
        json_object_set_new(data, "error", json_string(job->err ? job->err->msg
                                                                : strerror(-job->ret)));
    qmp_event(cancelled ? "BLOCK_JOB_CANCELLED" : "BLOCK_JOB_COMPLETED", data);
}

void block_job_user_resume(struct job *job)
{
    ((struct block_job *)job)->iostatus = IOSTATUS_OK;
}

/* ---- QMP ---- */

static json_t *block_job_info(struct block_job *bj)
{
    struct job *job = &bj->job;
    json_t *info = json_pack(
        "{s:s, s:s, s:I, s:I, s:b, s:b, s:I, s:s, s:b, s:s, s:b, s:b}",
        "type", job_type_name(job->driver->type), "device", job->id,
        "len", (json_int_t)__atomic_load_n(&job->progress_total, __ATOMIC_RELAXED),
        "offset", (json_int_t)__atomic_load_n(&job->progress_current, __ATOMIC_RELAXED),
        "busy", job->busy, "paused", job->pause_count > 0,
        "speed", (json_int_t)bj->speed, "io-status", iostatus_names[bj->iostatus],
        "ready", job_is_ready(job), "status", job_status_name(job->status),
        "auto-finalize", job->auto_finalize, "auto-dismiss", job->auto_dismiss);
    if (job->ret)
        json_object_set_new(info, "error", json_string(job->err ? job->err->msg
                                                                : strerror(-job->ret)));
    return info;
}

static json_t *qmp_query_block_jobs(json_t *args, error **errp)
{
    json_t *list = json_array();
    for (struct job *job = job_next(NULL); job; job = job_next(job)) {
        struct block_job *bj = block_job_of(job);
        if (bj && job->id)
            json_array_append_new(list, block_job_info(bj));
    }
    return list;
}
QMP_COMMAND("query-block-jobs", qmp_query_block_jobs)

static struct block_job *find_block_job(const char *id, error **errp)
{
    struct block_job *bj = block_job_of(job_get(id));
    if (!bj)
        error_set(errp, ERR_DEVICE_NOT_ACTIVE, "Block job '%s' not found", id);
    return bj;
}

static json_t *qmp_block_job_set_speed(json_t *args, error **errp)
{
    struct block_job *bj = find_block_job(opt_str(args, "device", ""), errp);
    if (bj)
        block_job_set_speed(bj, opt_int(args, "speed", 0), errp);
    return NULL;
}
QMP_COMMAND("block-job-set-speed", qmp_block_job_set_speed)

static json_t *qmp_block_job_cancel(json_t *args, error **errp)
{
    const char *id = opt_str(args, "device", "");
    struct block_job *bj = find_block_job(id, errp);
    if (!bj)
        return NULL;
    bool force = opt_bool(args, "force", false);
    if (bj->job.user_paused && !force) {
        error_setg(errp, "The block job for device '%s' is currently paused", id);
        return NULL;
    }
    job_user_cancel(&bj->job, force, errp);
    return NULL;
}
QMP_COMMAND("block-job-cancel", qmp_block_job_cancel)

#define BLOCK_JOB_VERB(cmd, fn, key, call)                        \
    static json_t *fn(json_t *args, error **errp)                 \
    {                                                             \
        struct block_job *bj = find_block_job(opt_str(args, key, ""), errp); \
        if (bj) {                                                 \
            struct job *job = &bj->job;                           \
            call;                                                 \
        }                                                         \
        return NULL;                                              \
    }                                                             \
    QMP_COMMAND(cmd, fn)

BLOCK_JOB_VERB("block-job-pause", qmp_block_job_pause, "device", job_user_pause(job, errp))
BLOCK_JOB_VERB("block-job-resume", qmp_block_job_resume, "device", job_user_resume(job, errp))
BLOCK_JOB_VERB("block-job-complete", qmp_block_job_complete, "device", job_complete(job, errp))
BLOCK_JOB_VERB("block-job-finalize", qmp_block_job_finalize, "id", job_finalize(job, errp))
BLOCK_JOB_VERB("block-job-dismiss", qmp_block_job_dismiss, "id", job_dismiss(job, errp))
