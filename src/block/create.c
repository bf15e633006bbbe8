/*
 * blockdev-create and x-blockdev-amend: a driver's work on an image run as
 * a job of type "create" or "amend", as qemu-storage-daemon 7.2 runs them;
 * and image_create(), the image a command makes on its own
 * (blockdev-snapshot-sync, drive-mirror).
 *
 * Theory of operation: the command checks that the driver can create
 * images, makes a job (manual dismiss, like QEMU's) and starts it; the
 * job's work is the driver's create(), which ends with
 * blockdev_create_done().  Progress is 0 of 1 while the driver works and
 * 1 of 1 afterwards, whatever the outcome.  Events: created and running
 * before the reply; then waiting, pending, concluded on success or
 * aborting, concluded on failure (the message is query-jobs' "error");
 * job-dismiss takes the job to null.
 */
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "job/job.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/opts.h"

struct create_job {
    struct job common;
    const struct blockdev_create_driver *drv;
    json_t *opts;
};

static struct blockdev_create_driver *create_drivers;

void blockdev_create_register(struct blockdev_create_driver *d)
{
    d->next = create_drivers;
    create_drivers = d;
}

static const struct blockdev_create_driver *create_driver_find(const char *name)
{
    for (const struct blockdev_create_driver *d = create_drivers; d; d = d->next)
        if (!strcmp(d->name, name))
            return d;
    return NULL;
}

void blockdev_create_done(struct job *job, int ret, error *err)
{
    job_progress_update(job, 1);
    job_work_done(job, ret, err);
}

static void create_run(struct job *job)
{
    struct create_job *s = (struct create_job *)job;
    job_progress_set_remaining(job, 1);
    s->drv->create(job, s->opts);
}

static void create_free(struct job *job)
{
    json_decref(((struct create_job *)job)->opts);
}

static const struct job_driver create_job_driver = {
    .instance_size = sizeof(struct create_job),
    .type = JOB_TYPE_CREATE,
    .run = create_run,
    .free = create_free,
};

static json_t *qmp_blockdev_create(json_t *args, error **errp)
{
    json_t *opts = json_object_get(args, "options");
    const char *driver = opt_str(opts, "driver", "");
    const struct blockdev_create_driver *drv = create_driver_find(driver);

    if (!drv && !bdrv_find(driver)) {
        error_setg(errp, "Block driver '%s' not found or not supported", driver);
        return NULL;
    }
    if (!drv) {
        error_setg(errp, "Driver does not support blockdev-create");
        return NULL;
    }
    struct create_job *s = job_create(opt_str(args, "job-id", ""), &create_job_driver, NULL,
                                      JOB_DEFAULT | JOB_MANUAL_DISMISS, NULL, NULL, errp);
    if (!s)
        return NULL;
    s->drv = drv;
    s->opts = json_incref(opts);
    job_start(&s->common);
    return json_object();
}
QMP_COMMAND("blockdev-create", qmp_blockdev_create)

/* ---- image_create (QEMU's bdrv_img_create) ---- */

int image_create(const char *path, const char *format, uint64_t size, const char *backing,
                 const char *backing_fmt, error **errp)
{
    if (strcmp(format, "qcow2") && strcmp(format, "raw")) {
        error_setg(errp, "Unknown file format '%s'", format);
        return -1;
    }
    if (backing && !strcmp(format, "raw")) {
        error_setg(errp, "Backing file not supported for file format 'raw'");
        return -1;
    }
    if (backing && !strcmp(path, backing)) {
        error_setg(errp, "Error: Trying to create an image with the same filename as the "
                   "backing file");
        return -1;
    }
    bool raw = !strcmp(format, "raw");
    if (file_create_now(path, raw ? size : 0, errp) < 0)
        return -1;
    if (raw)
        return 0;
    CLEANUP_JSON json_t *opts = json_pack("{s:s, s:{s:s, s:s}, s:I}", "driver", "qcow2",
                                          "file", "driver", "file", "filename", path, "size",
                                          (json_int_t)size);
    if (backing) {
        json_object_set_new(opts, "backing-file", json_string(backing));
        json_object_set_new(opts, "backing-fmt", json_string(backing_fmt));
    }
    return qcow2_create_sync(opts, errp) < 0 ? -1 : 0;
}

/* ---- x-blockdev-amend (QEMU 7.2's block/amend.c) ---- */

struct amend_job {
    struct job common;
    struct bnode *bs;                   /* our reference */
    json_t *opts;
    bool force;
};

static void amend_run(struct job *job)
{
    struct amend_job *s = (struct amend_job *)job;
    error *err = NULL;
    job_progress_set_remaining(job, 1);
    int ret = s->bs->drv->amend(s->bs, s->opts, s->force, &err);
    job_progress_update(job, 1);
    job_work_done(job, ret < 0 ? ret : 0, err);
}

static void amend_free(struct job *job)
{
    struct amend_job *s = (struct amend_job *)job;
    json_decref(s->opts);
    bnode_unref(s->bs);
}

static const struct job_driver amend_job_driver = {
    .instance_size = sizeof(struct amend_job),
    .type = JOB_TYPE_AMEND,
    .run = amend_run,
    .free = amend_free,
};

static json_t *qmp_x_blockdev_amend(json_t *args, error **errp)
{
    const char *name = opt_str(args, "node-name", "");
    json_t *opts = json_object_get(args, "options");
    struct bnode *bs = bnode_find(name);
    if (!bs) {
        error_setg(errp, "Cannot find device='' nor node-name='%s'", name);
        return NULL;
    }
    if (strcmp(bs->drv->name, opt_str(opts, "driver", ""))) {
        error_setg(errp, "x-blockdev-amend doesn't support changing the block driver");
        return NULL;
    }
    if (!bs->drv->amend) {
        error_setg(errp, "Driver does not support x-blockdev-amend");
        return NULL;
    }
    struct amend_job *s = job_create(opt_str(args, "job-id", ""), &amend_job_driver, NULL,
                                     JOB_DEFAULT | JOB_MANUAL_DISMISS, NULL, NULL, errp);
    if (!s)
        return NULL;
    bnode_ref(bs);
    s->bs = bs;
    s->opts = json_incref(opts);
    s->force = opt_bool(args, "force", false);
    job_start(&s->common);
    return json_object();
}
QMP_COMMAND("x-blockdev-amend", qmp_x_blockdev_amend)
