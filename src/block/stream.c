/*
 * block-stream: QEMU 7.2's stream block job (block/stream.c).
 *
 * Theory of operation.  The command checks its arguments in QEMU's order
 * with QEMU's words and finds what stays below: the base (by file name,
 * base; by node, base-node; the node below bottom; or nothing), then the
 * job copies into the top node, piece by piece, every range the top does
 * not allocate and a node between it and the base does.  When it ends
 * well, the base becomes the top's backing node and the top's image header
 * names it (or no backing file); the nodes between drop out of the graph.
 * A cancelled or failed job changes no link; what it copied stays, as the
 * same data.
 *
 * QEMU copies through a copy-on-read filter it inserts above the top, whose
 * serialising requests keep a guest write and a copy of the same range
 * apart.  bexd's copy-on-read node (chain.c) does not take the top's place;
 * a guard on the top's writes (guard.h) keeps them apart: a copy claims its
 * range, then looks again at what the top allocates and copies only the
 * rest, as a copy-on-read does.  Zeros are written as zeroes (QEMU's
 * copy-on-read does the same), and the copies mark no dirty bitmap (the
 * data does not change).  Guest reads are not copied on the way.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "block/block-job.h"
#include "block/chain.h"
#include "block/guard.h"
#include "block/qcow2-int.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/opts.h"
#include "util/xalloc.h"

#define STREAM_CHUNK (512u * 1024)      /* QEMU's STREAM_CHUNK */

/* ---- the job ---- */

struct stream_job {
    struct block_job common;
    struct bnode *top;
    struct bnode *base;                 /* stays below the top (NULL: nothing) */
    int copy_below;                     /* copy what depths 2 .. copy_below - 1 hold */
    char *backing_file;                 /* the name the header gets (NULL: base's) */
    enum block_on_error on_error;
    struct guard *guard;
    struct bnode *filter;               /* our reference */
    struct bnode_user *filter_user;     /* the job's use of it (QEMU's BlockBackend) */
    struct bnode *reopened;             /* the top, read-only again after */
};

static bool depth_copied(struct stream_job *s, int depth)
{
    return depth >= 2 && (!s->copy_below || depth < s->copy_below);
}

/* Copy what the layers between top and base hold in [off, off + n) and the
 * top does not, as a copy-on-read does. */
static int stream_copy(struct stream_job *s, uint64_t off, uint64_t n, void *buf)
{
    int ret = 0;
    co_guard_claim(s->guard, off, off + n);
    for (uint64_t p = off, end = off + n; p < end && ret == 0;) {
        uint64_t pnum;
        unsigned flags;
        int depth;
        ret = bnode_block_status(s->top, p, end - p, &pnum, &flags, &depth);
        if (ret < 0)
            break;
        if (depth_copied(s, depth)) {
            ret = bnode_co_pread(s->top, p, pnum, buf, 0);
            if (ret == 0) {
                const unsigned char *b = buf;
                bool zero = !b[0] && !memcmp(b, b + 1, pnum - 1);
                ret = zero ? bnode_co_pwrite_zeroes(s->top, p, pnum, BREQ_WRITE_UNCHANGED)
                           : bnode_co_pwrite(s->top, p, pnum, buf, BREQ_WRITE_UNCHANGED);
            }
        }
        p += pnum;
    }
    guard_release(s->guard);
    return ret;
}

static int stream_co_run(struct job *job, error **errp)
{
    struct stream_job *s = (struct stream_job *)job;
    uint64_t len = s->top->size;
    int error = 0;

    if (!s->top->backing || s->copy_below == 2)
        return 0;                       /* nothing to stream */
    job_progress_set_remaining(job, len);
    CLEANUP_FREE void *buf = xmalloc_io(STREAM_CHUNK);
    for (uint64_t off = 0, n = 0; off < len; off += n) {
        uint64_t delay = block_job_ratelimit(&s->common, 0);
        job_co_sleep(job, delay);
        if (job_is_cancelled(job))
            break;
        uint64_t pnum;
        unsigned flags;
        int depth;
        bool copy = false;
        int ret = bnode_block_status(s->top, off, MIN((uint64_t)STREAM_CHUNK, len - off),
                                     &pnum, &flags, &depth);
        n = ret < 0 ? MIN((uint64_t)STREAM_CHUNK, len - off) : pnum;
        if (ret >= 0 && depth != 1) {
            copy = depth_copied(s, depth);
            if (copy)
                ret = stream_copy(s, off, n, buf);
        }
        if (ret < 0) {
            enum block_error_action a = block_job_error_action(&s->common, s->on_error, true,
                                                               -ret);
            if (a == ERROR_ACTION_STOP) {
                n = 0;
                job_co_pause_point(job);
                continue;
            }
            if (!error)
                error = ret;
            if (a == ERROR_ACTION_REPORT)
                break;
        }
        job_progress_update(job, n);
        if (copy)
            block_job_ratelimit(&s->common, n);
    }
    return error;
}

static void stream_run(struct job *job)
{
    job_run_co(job, stream_co_run);
}

/* Success: the base goes under the top, and the header says so. */
static int stream_prepare(struct job *job)
{
    struct stream_job *s = (struct stream_job *)job;
    if (!s->top->backing)
        return 0;
    return chain_set_backing(s->top, s->base, s->backing_file);
}

static void stream_release(struct stream_job *s)
{
    if (s->guard) {
        guard_remove(s->guard);
        s->guard = NULL;
    }
    block_job_remove_nodes(&s->common);
    chain_filter_close(&s->filter, &s->filter_user);
    chain_restore_read_only(&s->reopened, "stream");
}

static void stream_clean(struct job *job)
{
    stream_release((struct stream_job *)job);
}

static void stream_free(struct job *job)
{
    struct stream_job *s = (struct stream_job *)job;
    stream_release(s);
    free(s->backing_file);
    s->backing_file = NULL;
}

static const struct job_driver stream_driver = {
    .instance_size = sizeof(struct stream_job),
    .type = JOB_TYPE_STREAM,
    .run = stream_run,
    .prepare = stream_prepare,
    .clean = stream_clean,
    .free = stream_free,
    .user_resume = block_job_user_resume,
    .on_ready = block_job_on_ready,
    .on_pending = block_job_on_pending,
    .on_finalized = block_job_on_finalized,
};

/* ---- the command (QEMU's qmp_block_stream and stream_start) ---- */

static json_t *qmp_block_stream(json_t *a, error **errp)
{
    const char *device = opt_str(a, "device", "");
    struct bnode *bs = bnode_find(device), *base = NULL, *bottom = NULL;
    bool has_base = opt_has(a, "base"), has_base_node = opt_has(a, "base-node");
    bool has_bottom = opt_has(a, "bottom");

    if (!bs) {
        error_setg(errp, "Cannot find device='%s' nor node-name='%s'", device, device);
        return NULL;
    }
    if (has_base && has_base_node) {
        error_setg(errp, "'base' and 'base-node' cannot be specified at the same time");
        return NULL;
    }
    if (has_base && has_bottom) {
        error_setg(errp, "'base' and 'bottom' cannot be specified at the same time");
        return NULL;
    }
    if (has_bottom && has_base_node) {
        error_setg(errp, "'bottom' and 'base-node' cannot be specified at the same time");
        return NULL;
    }
    if (has_base) {
        base = chain_find_backing_image(bs, opt_str(a, "base", ""));
        if (!base) {
            error_setg(errp, "Can't find '%s' in the backing chain", opt_str(a, "base", ""));
            return NULL;
        }
    }
    if (has_base_node) {
        const char *name = opt_str(a, "base-node", "");
        if (!(base = chain_lookup_node(name, errp)))
            return NULL;
        if (bs == base || chain_depth(bs, base) == 0) {
            error_setg(errp, "Node '%s' is not a backing image of '%s'", name, device);
            return NULL;
        }
    }
    if (has_bottom) {
        const char *name = opt_str(a, "bottom", "");
        if (!(bottom = chain_lookup_node(name, errp)))
            return NULL;
        if (chain_depth(bs, bottom) == 0) {
            error_setg(errp, "Node '%s' is not in a chain starting from '%s'", name, device);
            return NULL;
        }
    }
    struct bnode *end = bottom ? bottom->backing : base;
    for (struct bnode *it = bs; it && it != end; it = it->backing)
        if (block_node_check_busy(it, errp) < 0)
            return NULL;
    if (!base && !bottom && opt_has(a, "backing-file")) {
        error_setg(errp, "backing file specified, but streaming the entire chain");
        return NULL;
    }
    if (bottom)
        base = bottom->backing;
    if (bs->backing && !bs->drv->reopen_backing_link) {
        error_setg(errp, "Driver '%s' cannot change the backing file of '%s'", bs->drv->name,
                   bs->node_name);
        return NULL;
    }

    /* stream_start() */
    bool reopened = false;
    if (bs->read_only) {
        if (bnode_reopen_set_read_only(bs, false, errp) < 0)
            return NULL;
        reopened = true;
    }
    struct bnode_user *filter_user;
    struct bnode *filter = chain_filter_open("copy-on-read", bs,
                                             opt_str(a, "filter-node-name", NULL), true,
                                             &filter_user, errp);
    if (!filter) {
        if (reopened)
            bnode_reopen_set_read_only(bs, true, NULL);
        return NULL;
    }
    unsigned flags = block_job_flags(a);
    struct stream_job *s = block_job_create(opt_str(a, "job-id", ""), &stream_driver, NULL,
                                            opt_int(a, "speed", 0), flags, errp);
    if (!s) {
        chain_filter_close(&filter, &filter_user);
        if (reopened)
            bnode_reopen_set_read_only(bs, true, NULL);
        return NULL;
    }
    s->filter = filter;
    s->filter_user = filter_user;
    block_job_add_node(&s->common, filter);
    s->top = bs;
    s->base = base;
    s->copy_below = base ? chain_depth(bs, base) : 0;
    s->backing_file = opt_has(a, "backing-file") ? xstrdup(opt_str(a, "backing-file", ""))
                                                 : NULL;
    s->on_error = block_on_error_parse(opt_str(a, "on-error", NULL));
    s->reopened = reopened ? bs : NULL;
    for (struct bnode *it = bs; it && it != base; it = it->backing)
        block_job_add_node(&s->common, it);
    s->guard = guard_install(bs, NULL, NULL);
    job_start(&s->common.job);
    return json_object();
}
QMP_COMMAND("block-stream", qmp_block_stream)

/* ---- change-backing-file (QEMU's qmp_change_backing_file) ---- */

static json_t *qmp_change_backing_file(json_t *a, error **errp)
{
    const char *device = opt_str(a, "device", "");
    const char *image = opt_str(a, "image-node-name", "");
    const char *file = opt_str(a, "backing-file", "");
    struct bnode *bs = chain_root_node(device, errp);
    if (!bs)
        return NULL;
    struct bnode *img = chain_lookup_node(image, errp);
    if (!img)
        return NULL;
    if (!img->backing) {
        error_setg(errp, "not allowing backing file change on an image without a backing "
                   "file");
        return NULL;
    }
    if (block_node_check_busy(bs, errp) < 0)
        return NULL;
    if (chain_depth(bs, img) == 0) {
        error_setg(errp, "'%s' and image file are not in the same chain", device);
        return NULL;
    }
    bool ro = img->read_only;
    if (ro && bnode_reopen_set_read_only(img, false, errp) < 0)
        return NULL;
    /* QEMU names the image's own format as the backing file's */
    int ret = qcow2_change_backing_file(img, file, img->drv->name);
    if (ret < 0)
        error_setg_errno(errp, -ret, "Could not change backing file to '%s'", file);
    if (ro)
        bnode_reopen_set_read_only(img, true, ret < 0 ? NULL : errp);
    return ret < 0 ? NULL : json_object();
}
QMP_COMMAND("change-backing-file", qmp_change_backing_file)
