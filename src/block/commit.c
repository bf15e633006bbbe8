/*
 * block-commit: QEMU 7.2's commit block job (block/commit.c), for a top
 * below the active layer; the active layer's is a mirror job (mirror.c).
 *
 * Theory of operation.  The command checks its arguments in QEMU's order
 * with QEMU's words (the device first, with the DeviceNotFound class that
 * libvirt probes for), finds the top (top-node, top by file name, or the
 * device's node) and the base (base-node, base by file name, or the
 * bottom of the chain).  The job writes into the base every range a layer
 * from the top down to the base's overlay allocates, read through the top;
 * a base smaller than the top grows first.  When it ends well the node
 * above the top (its overlay) takes the base as its backing node and its
 * image header names it; the top and the nodes down to the base leave the
 * graph.  A read-only base is read-write for the job and read-only again
 * after.  Cancelled or failed, no link changes; what was written into the
 * base is data the layers above it hide.
 *
 * Guest writes reach the active layer, above the top, so nothing the job
 * reads changes under it and no guard is needed (a stream writes into the
 * node its users write; see stream.c).  A top that is the device's node
 * itself (active commit) is a mirror job, as in QEMU: peers write the node
 * it reads, and it ends with the base in the top's place (mirror.h).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "block/block-job.h"
#include "block/chain.h"
#include "block/mirror.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/coroutine.h"
#include "util/log.h"
#include "util/opts.h"
#include "util/xalloc.h"

#define COMMIT_CHUNK (512u * 1024)      /* QEMU's COMMIT_BUFFER_SIZE */

struct commit_job {
    struct block_job common;
    struct bnode *device;               /* the chain's top node */
    struct bnode *top, *base;
    int base_depth;                     /* below top: copy what depths 1 .. base - 1 hold */
    char *backing_file;                 /* the name the header gets (NULL: base's) */
    enum block_on_error on_error;
    struct bnode *filter;
    struct bnode_user *filter_user;
    struct bnode *reopened;             /* the base, read-only again after */
};

static int commit_co_run(struct job *job, error **errp)
{
    struct commit_job *s = (struct commit_job *)job;
    uint64_t len = s->top->size, delay = 0;

    job_progress_set_remaining(job, len);
    if (s->base->size < len) {
        int ret = bnode_truncate(s->base, len, errp);
        if (ret < 0)
            return ret;
    }
    CLEANUP_FREE void *buf = xmalloc_io(COMMIT_CHUNK);
    for (uint64_t off = 0, n = 0; off < len; off += n) {
        job_co_sleep(job, delay);
        if (job_is_cancelled(job))
            break;
        uint64_t pnum;
        unsigned flags;
        int depth;
        bool copy = false, in_source = true;
        int ret = bnode_block_status(s->top, off, MIN((uint64_t)COMMIT_CHUNK, len - off),
                                     &pnum, &flags, &depth);
        n = ret < 0 ? MIN((uint64_t)COMMIT_CHUNK, len - off) : pnum;
        if (ret >= 0 && depth >= 1 && depth < s->base_depth) {
            copy = true;
            ret = bnode_co_pread(s->top, off, n, buf, 0);
            if (ret >= 0) {
                ret = bnode_co_pwrite(s->base, off, n, buf, BREQ_BEYOND_EOF);
                in_source = ret >= 0;
            }
        }
        if (ret < 0) {
            enum block_error_action a = block_job_error_action(&s->common, s->on_error,
                                                               in_source, -ret);
            if (a == ERROR_ACTION_REPORT)
                return ret;
            n = 0;                      /* again, after a pause for stop */
            delay = 0;
            continue;
        }
        job_progress_update(job, n);
        delay = copy ? block_job_ratelimit(&s->common, n) : 0;
    }
    return 0;
}

static void commit_run(struct job *job)
{
    job_run_co(job, commit_co_run);
}

/* Success: the top's overlay goes onto the base. */
static int commit_prepare(struct job *job)
{
    struct commit_job *s = (struct commit_job *)job;
    struct bnode *overlay = chain_overlay(s->device, s->top);
    return overlay ? chain_set_backing(overlay, s->base, s->backing_file) : -ENOENT;
}

static void commit_release(struct commit_job *s)
{
    block_job_remove_nodes(&s->common);
    chain_filter_close(&s->filter, &s->filter_user);
    chain_restore_read_only(&s->reopened, "commit");
}

static void commit_clean(struct job *job)
{
    commit_release((struct commit_job *)job);
}

static void commit_free(struct job *job)
{
    struct commit_job *s = (struct commit_job *)job;
    commit_release(s);
    free(s->backing_file);
    s->backing_file = NULL;
}

static const struct job_driver commit_driver = {
    .instance_size = sizeof(struct commit_job),
    .type = JOB_TYPE_COMMIT,
    .run = commit_run,
    .prepare = commit_prepare,
    .clean = commit_clean,
    .free = commit_free,
    .user_resume = block_job_user_resume,
    .on_ready = block_job_on_ready,
    .on_pending = block_job_on_pending,
    .on_finalized = block_job_on_finalized,
};

/* ---- the command (QEMU's qmp_block_commit and commit_start) ---- */

static json_t *qmp_block_commit(json_t *a, error **errp)
{
    const char *device = opt_str(a, "device", "");
    struct bnode *top, *base;
    error *root_err = NULL;
    struct bnode *bs = chain_root_node(device, &root_err);

    if (!bs) {
        if (bnode_find(device))
            error_propagate(errp, root_err);
        else {
            error_free(root_err);
            error_set(errp, ERR_DEVICE_NOT_FOUND, "Device '%s' not found", device);
        }
        return NULL;
    }
    if (block_node_check_busy(bs, errp) < 0)
        return NULL;
    top = bs;
    if (opt_has(a, "top-node") && opt_has(a, "top")) {
        error_setg(errp, "'top-node' and 'top' are mutually exclusive");
        return NULL;
    } else if (opt_has(a, "top-node")) {
        const char *name = opt_str(a, "top-node", "");
        if (!(top = chain_lookup_node(name, errp)))
            return NULL;
        if (!chain_depth(bs, top)) {
            error_setg(errp, "'%s' is not in this backing file chain", name);
            return NULL;
        }
    } else if (opt_has(a, "top")) {
        const char *name = opt_str(a, "top", "");
        CLEANUP_FREE char *fname = bnode_filename(bs);
        if (strcmp(fname, name))
            top = chain_find_backing_image(bs, name);
        if (!top) {
            error_setg(errp, "Top image file %s not found", name);
            return NULL;
        }
    }
    if (opt_has(a, "base-node") && opt_has(a, "base")) {
        error_setg(errp, "'base-node' and 'base' are mutually exclusive");
        return NULL;
    } else if (opt_has(a, "base-node")) {
        const char *name = opt_str(a, "base-node", "");
        if (!(base = chain_lookup_node(name, errp)))
            return NULL;
        if (!chain_depth(top, base)) {
            error_setg(errp, "'%s' is not in this backing file chain", name);
            return NULL;
        }
    } else if (opt_has(a, "base")) {
        const char *name = opt_str(a, "base", "");
        if (!(base = chain_find_backing_image(top, name))) {
            error_setg(errp, "Can't find '%s' in the backing chain", name);
            return NULL;
        }
    } else {
        for (base = top; base->backing; base = base->backing)
            ;                           /* the bottom: top itself if it has none */
    }
    for (struct bnode *it = top; it && it != base->backing; it = it->backing)
        if (block_node_check_busy(it, errp) < 0)
            return NULL;
    if (top == base) {
        error_setg(errp, "cannot commit an image into itself");
        return NULL;
    }
    unsigned flags = block_job_flags(a);
    if (top == bs) {
        if (opt_has(a, "backing-file")) {
            error_setg(errp, "'backing-file' specified, but 'top' is the active layer");
            return NULL;
        }
        if (mirror_commit_active(opt_str(a, "job-id", ""), bs, base, flags,
                                 opt_int(a, "speed", 0),
                                 block_on_error_parse(opt_str(a, "on-error", NULL)),
                                 opt_str(a, "filter-node-name", NULL), errp) < 0)
            return NULL;
        return json_object();
    }
    struct bnode *overlay = chain_overlay(bs, top);
    if (block_node_check_busy(overlay, errp) < 0)
        return NULL;
    if (!overlay->drv->reopen_backing_link) {
        error_setg(errp, "Driver '%s' cannot change the backing file of '%s'",
                   overlay->drv->name, overlay->node_name);
        return NULL;
    }

    /* commit_start() */
    struct commit_job *s = block_job_create(opt_str(a, "job-id", ""), &commit_driver, NULL,
                                            opt_int(a, "speed", 0), flags, errp);
    if (!s)
        return NULL;
    s->device = bs;
    s->top = top;
    s->base = base;
    s->base_depth = chain_depth(top, base);
    s->backing_file = opt_has(a, "backing-file") ? xstrdup(opt_str(a, "backing-file", ""))
                                                 : NULL;
    s->on_error = block_on_error_parse(opt_str(a, "on-error", NULL));
    if (base->read_only) {
        if (bnode_reopen_set_read_only(base, false, errp) < 0)
            goto fail;
        s->reopened = base;
    }
    s->filter = chain_filter_open("commit_top", top, opt_str(a, "filter-node-name", NULL), true,
                                  &s->filter_user, errp);
    if (!s->filter)
        goto fail;
    block_job_add_node(&s->common, s->filter);
    block_job_add_node(&s->common, bs);
    for (struct bnode *it = top; it && it != base; it = it->backing)
        block_job_add_node(&s->common, it);
    block_job_add_node(&s->common, base);
    job_start(&s->common.job);
    return json_object();

fail:
    commit_release(s);
    job_early_fail(&s->common.job);
    return NULL;
}
QMP_COMMAND("block-commit", qmp_block_commit)
