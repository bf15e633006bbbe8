/*
 * Block jobs: jobs (job/job.h) that work on block nodes, with QEMU 7.2's
 * block-job-* commands, query-block-jobs and BLOCK_JOB_* events.
 *
 * A block job type embeds struct block_job first and points its
 * job_driver's on_pending, on_finalized and user_resume hooks at the
 * block_job_* ones below (block_job_of() recognises a block job by them).
 * What the common part adds to a job: the speed and its rate limit (QEMU's
 * 100 ms slices), the io-status, the error policy (on-source-error,
 * on-target-error: BLOCK_JOB_ERROR, stop = a user pause), and the nodes
 * the job blocks ("Node 'x' is busy: block device is in use by block job:
 * backup").
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <jansson.h>
#include "job/job.h"

struct bnode;

/* QAPI BlockdevOnError */
enum block_on_error { ON_ERROR_REPORT, ON_ERROR_IGNORE, ON_ERROR_ENOSPC, ON_ERROR_STOP,
                      ON_ERROR_AUTO };
/* QAPI BlockErrorAction */
enum block_error_action { ERROR_ACTION_IGNORE, ERROR_ACTION_REPORT, ERROR_ACTION_STOP };
/* QAPI BlockDeviceIoStatus */
enum block_iostatus { IOSTATUS_OK, IOSTATUS_FAILED, IOSTATUS_NOSPACE };

struct block_job {
    struct job job;                  /* first */
    int64_t speed;                   /* bytes per second, 0 = unlimited */
    enum block_iostatus iostatus;
    /* the driver's reaction to a new speed (NULL: none) */
    void (*set_speed)(struct block_job *bj, int64_t speed);
    /* rate limit (QEMU's ratelimit.h), main thread */
    uint64_t slice_start_ns, slice_end_ns, dispatched;
    /* nodes this job blocks */
    struct bnode **nodes;
    int nnodes, nodes_cap;
};

enum block_on_error block_on_error_parse(const char *s);   /* NULL: report */

/* job_create() for a block job, then the speed: QEMU's order and errors
 * ("Parameter 'speed' expects a non-negative value" fails the new job
 * with JOB_STATUS_CHANGE created, null). */
void *block_job_create(const char *id, const struct job_driver *drv, struct job_txn *txn,
                       int64_t speed, unsigned flags, error **errp);
/* JOB_MANUAL_FINALIZE and JOB_MANUAL_DISMISS as a command's
 * auto-finalize and auto-dismiss (default true) ask. */
unsigned block_job_flags(json_t *args);
/* The block job of a job, or NULL. */
struct block_job *block_job_of(struct job *job);

/* Block ops on bs while the job lives (dropped by block_job_remove_nodes). */
void block_job_add_node(struct block_job *bj, struct bnode *bs);
void block_job_remove_nodes(struct block_job *bj);
/* QEMU's op blocker check: 0, or -1 with "Node '%s' is busy: %s". */
int  block_node_check_busy(struct bnode *bs, error **errp);

/* Rate limit: account n bytes about to be copied; returns the ms to wait
 * before the next piece (0: go on). */
uint64_t block_job_ratelimit(struct block_job *bj, uint64_t n);
/* The largest piece worth copying at once under the speed (0: no limit). */
uint64_t block_job_slice_quota(struct block_job *bj);

/* An I/O error (positive errno) hit the job: QEMU's
 * block_job_error_action(): the policy decides, BLOCK_JOB_ERROR is sent,
 * and for stop the job is paused as if by the user (io-status set). */
enum block_error_action block_job_error_action(struct block_job *bj, enum block_on_error on_err,
                                               bool is_read, int error);

/* job_driver hooks every block job uses */
void block_job_on_ready(struct job *job);
void block_job_on_pending(struct job *job);
void block_job_on_finalized(struct job *job, bool cancelled);
void block_job_user_resume(struct job *job);
