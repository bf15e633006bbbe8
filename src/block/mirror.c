/*
 * blockdev-mirror, drive-mirror and committing the active layer: QEMU
 * 7.2's mirror block job (block/mirror.c).
 *
 * Theory of operation.  The job keeps a target node equal to a source
 * node while peers write the source, then (block-job-complete) puts the
 * target in the source's place under its exports.  A dirty bitmap of the
 * job's says which granules differ: sync=full marks every range some layer
 * of the source's chain allocates, sync=top those the source itself does,
 * sync=none nothing; every write to the source marks what it wrote once it
 * has completed.  The job copies dirty areas (up to buf-size, 16 MiB by
 * default) one at a time: it claims the area in the guard on the source
 * (guard.h: peers' writes there wait, the copy waits for those under way),
 * clears the bits, reads the source and writes the target in pieces of up
 * to 1 MiB that run side by side (zeros as write-zeroes, unmapped unless
 * unmap=false), then releases the claim.  A write that lands after
 * the read marks the granules again, so they are copied again.
 *
 * When nothing is dirty the target is flushed and the job is ready
 * (BLOCK_JOB_READY); it goes on copying what peers write.  Completing (or
 * a cancel once ready, which leaves the source in place) holds the peers'
 * writes, waits for those under way, copies what they left dirty and
 * flushes: the two nodes are equal, and stay so while writes are held.
 * Finalizing then moves every export of the source (or of `replaces`) to
 * the target, redirects the held writes there and lets them go on once
 * every loop has passed a barrier (the switch of external-snapshot.c).
 *
 * copy-mode=write-blocking: once the bitmap is filled, a peer's write goes
 * to the source and the target together and completes when both have; the
 * granules it covers whole are then in sync.  A write that failed on
 * either side, a discard, or a write overlapping another active write
 * (their order may differ between the two nodes) marks its granules dirty
 * instead, and the background copy sets them right.
 *
 * The job's bitmap is an anonymous one on the source, recording as QEMU
 * 7.2's does (it marks writes as they are issued; the guard marks them
 * again once they have landed, which is what a copy racing a write needs).
 * The filter node ("mirror_top") is listed while the job runs; bexd does
 * not insert it above the source, but names it as the exports' node, as
 * QEMU's graph has it.
 *
 * drive-mirror makes or opens the target first and gives it its backing
 * node when the job ends well; an active commit is the same job with the
 * chain's base as target (type commit).  Not done: `replaces` naming a
 * node below a filter source (QEMU puts the target in that node's place
 * under the filter; refused).
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "block/block-job.h"
#include "block/chain.h"
#include "block/dirty-bitmap.h"
#include "block/guard.h"
#include "block/mirror.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/coroutine.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/opts.h"
#include "util/xalloc.h"

#define MIRROR_BUF_DEFAULT (16u << 20)  /* QEMU's DEFAULT_MIRROR_BUF_SIZE */
#define MIRROR_MAX_IO (1u << 20)        /* one copy at most (QEMU's MAX_IO_BYTES) */
#define MIRROR_IDLE_MS 100              /* QEMU's BLOCK_JOB_SLICE_TIME */

struct active_write;

/* What the target's backing node is when the job ends well (QEMU's
 * BlockMirrorBackingMode). */
enum mirror_backing {
    MIRROR_LEAVE_BACKING,               /* as it is (blockdev-mirror, commit) */
    MIRROR_SOURCE_BACKING,              /* what sync left below (drive-mirror) */
    MIRROR_OPEN_BACKING,                /* the one its header names (mode existing) */
};

struct mirror_job {
    struct block_job common;
    struct bnode *source, *target;
    struct bnode *base;                 /* sync=top: copy only what is above it */
    bool none_mode;
    bool zero_target;                   /* sync=full: the target reads as the source everywhere */
    bool commit;                        /* the active layer into its backing chain's base */
    struct bnode *reopened;             /* committing: the base, read-only again on abort */
    char *replaces;                     /* the node the target replaces (NULL: source) */
    uint32_t granularity;
    uint64_t piece;                     /* one copy at most, whole granules */
    uint64_t buf_size;                  /* what is copied at once: pieces side by side */
    bool unmap;
    enum mirror_backing backing_mode;
    bool write_blocking;
    enum block_on_error on_source_error, on_target_error;
    struct bnode *filter;
    struct bnode_user *filter_user;
    struct bnode_user *target_user;
    struct dirty_bitmap *bitmap;        /* on the source */
    struct guard *guard;
    bool active;                        /* write-blocking in force (atomic) */
    bool should_complete;
    bool writes_held;                   /* from the final sync to the switch */
    struct coroutine *drain_waiter;
    pthread_mutex_t active_lock;
    struct active_write *actives;       /* write-blocking writes under way */
};

static void mark_dirty_aligned(struct mirror_job *s, uint64_t off, uint64_t len)
{
    uint64_t g = s->granularity;
    uint64_t lo = off / g * g, hi = (off + len + g - 1) / g * g;
    dirty_bitmap_set_range(s->bitmap, lo, hi - lo);
}

/* ---- peers' writes to the source ---- */

/* A write-blocking write: to the source (the peer's request) and the
 * target (tw), in the peer's loop. */
struct active_write {
    struct mirror_job *s;
    struct breq *req;
    uint64_t offset;
    struct breq tw;
    void (*done)(struct breq *req, int ret);
    void *opaque;
    int pending;                        /* atomic */
    int ret;
    bool overlapped;
    struct active_write *next, **pprev;
};

/* Set while an active write hands its result to the guard: its written()
 * must not mark what the active write settled itself. */
static __thread bool settling_active;

static void active_finish(struct active_write *aw)
{
    struct mirror_job *s = aw->s;
    struct breq *req = aw->req;
    pthread_mutex_lock(&s->active_lock);
    *aw->pprev = aw->next;
    if (aw->next)
        aw->next->pprev = aw->pprev;
    bool overlapped = aw->overlapped;
    pthread_mutex_unlock(&s->active_lock);
    if (aw->ret < 0 || overlapped || req->op == BREQ_DISCARD)
        mark_dirty_aligned(s, aw->offset, req->len);
    else
        dirty_bitmap_reset_range(s->bitmap, aw->offset, req->len);   /* whole granules */
    req->done = aw->done;
    req->opaque = aw->opaque;
    int ret = aw->ret;
    free(aw);
    settling_active = true;
    req->done(req, ret);
    settling_active = false;
}

static void active_one_done(struct active_write *aw, int ret)
{
    if (ret < 0)
        __atomic_store_n(&aw->ret, ret, __ATOMIC_RELAXED);
    if (__atomic_sub_fetch(&aw->pending, 1, __ATOMIC_ACQ_REL) == 0)
        active_finish(aw);
}

static void active_source_done(struct breq *req, int ret)
{
    active_one_done(req->opaque, ret);
}

static void active_target_done(struct breq *tw, int ret)
{
    active_one_done(tw->opaque, ret);
}

static void mirror_guard_submit(void *opaque, struct bnode *bs, struct breq *req,
                                uint64_t offset)
{
    struct mirror_job *s = opaque;
    if (!__atomic_load_n(&s->active, __ATOMIC_ACQUIRE) || req->op == BREQ_DISCARD) {
        bnode_submit_driver(bs, req, offset);
        return;
    }
    struct active_write *aw = xzalloc(sizeof(*aw));
    aw->s = s;
    aw->req = req;
    aw->offset = offset;
    aw->pending = 2;
    aw->done = req->done;
    aw->opaque = req->opaque;
    req->done = active_source_done;
    req->opaque = aw;
    aw->tw = (struct breq){ .op = req->op, .flags = req->flags & (BREQ_FUA | BREQ_MAY_UNMAP),
                            .offset = offset, .len = req->len, .iov = req->iov,
                            .iovcnt = req->iovcnt, .loop = req->loop,
                            .done = active_target_done, .opaque = aw };
    pthread_mutex_lock(&s->active_lock);
    for (struct active_write *o = s->actives; o; o = o->next)
        if (o->offset < offset + req->len && offset < o->offset + o->req->len)
            o->overlapped = aw->overlapped = true;
    aw->next = s->actives;
    aw->pprev = &s->actives;
    if (s->actives)
        s->actives->pprev = &aw->next;
    s->actives = aw;
    pthread_mutex_unlock(&s->active_lock);
    bnode_submit(s->target, &aw->tw);
    bnode_submit_driver(bs, req, offset);
}

/* Every write to the source marks what it wrote once it has landed. */
static void mirror_guard_written(void *opaque, struct breq *req, uint64_t offset, int ret)
{
    if (!settling_active)
        mark_dirty_aligned(opaque, offset, req->len);
}

static const struct guard_ops mirror_guard_ops = {
    .submit = mirror_guard_submit,
    .written = mirror_guard_written,
};

/* ---- the job ---- */

/* sync=full/top: mark what the layers above the base allocate (QEMU's
 * mirror_dirty_init).  sync=full makes the target read as the source
 * where nothing is allocated too: a target that may unmap is zeroed
 * first, any other is copied whole. */
static int mirror_dirty_init(struct mirror_job *s)
{
    uint64_t len = s->source->size;
    int below = s->base ? chain_depth(s->source, s->base) : 0;
    if (s->zero_target && !s->target->discard) {
        dirty_bitmap_set_range(s->bitmap, 0, len);
        return 0;
    }
    if (s->zero_target) {
        uint64_t step = (uint64_t)INT32_MAX / s->granularity * s->granularity;
        for (uint64_t off = 0; off < len; off += step) {
            int ret = bnode_co_pwrite_zeroes(s->target, off, MIN(step, len - off),
                                             BREQ_MAY_UNMAP);
            if (ret < 0)
                return ret;
            if (job_is_cancelled(&s->common.job))
                return 0;
        }
    }
    for (uint64_t off = 0, pnum = 0; off < len; off += pnum) {
        unsigned flags;
        int depth;
        int ret = bnode_block_status(s->source, off, len - off, &pnum, &flags, &depth);
        if (ret < 0)
            return ret;
        if (depth >= 1 && (!below || depth < below))
            dirty_bitmap_set_range(s->bitmap, off, pnum);
        if (job_is_cancelled(&s->common.job))
            return 0;
    }
    return 0;
}

/* Copy [off, off + n) from the source into the target; the bits are
 * clear.  Returns 0, or -errno with *in_source telling which side failed. */
static int mirror_copy(struct mirror_job *s, uint64_t off, uint64_t n, void *buf,
                       bool *in_source)
{
    for (uint64_t p = off, end = off + n, pnum; p < end; p += pnum) {
        unsigned flags = BS_DATA;
        int depth;
        int ret = bnode_block_status(s->source, p, end - p, &pnum, &flags, &depth);
        if (ret < 0) {
            pnum = end - p;
            flags = BS_DATA;
        }
        *in_source = true;
        if (flags & BS_DATA) {
            ret = bnode_co_pread(s->source, p, pnum, buf, 0);
            if (ret < 0)
                return ret;
            *in_source = false;
            ret = bnode_co_pwrite(s->target, p, pnum, buf, 0);
        } else {
            *in_source = false;
            ret = bnode_co_pwrite_zeroes(s->target, p, pnum, s->unmap ? BREQ_MAY_UNMAP : 0);
        }
        if (ret < 0)
            return ret;
    }
    return 0;
}

/* The pieces of one area, copied side by side. */
struct mirror_pieces {
    int left;
    struct coroutine *waiter;
    int ret;                            /* the first error */
    bool in_source;                     /* ... and its side */
};

struct mirror_piece {
    struct mirror_job *s;
    struct mirror_pieces *set;
    uint64_t off, n;
    void *buf;
};

static void mirror_piece_co(void *opaque)
{
    struct mirror_piece *p = opaque;
    struct mirror_pieces *set = p->set;
    bool in_source = true;
    int ret = mirror_copy(p->s, p->off, p->n, p->buf, &in_source);

    if (ret < 0 && set->ret == 0) {
        set->ret = ret;
        set->in_source = in_source;
    }
    free(p);
    if (--set->left == 0 && set->waiter)
        co_wake(set->waiter);
}

/* Copy [off, off + n) in pieces of s->piece that run side by side (QEMU's
 * mirror has up to buf-size of them in flight): a target that answers
 * after a network round trip is kept busy. */
static int mirror_copy_area(struct mirror_job *s, uint64_t off, uint64_t n, void *buf,
                            bool *in_source)
{
    struct mirror_pieces set = { .left = 1 };

    for (uint64_t p = 0; p < n; p += s->piece) {
        struct mirror_piece *mp = xmalloc(sizeof(*mp));
        *mp = (struct mirror_piece){ .s = s, .set = &set, .off = off + p,
                                     .n = MIN(s->piece, n - p), .buf = (char *)buf + p };
        set.left++;
        co_enter(co_create(mirror_piece_co, mp));
    }
    if (--set.left > 0) {
        set.waiter = co_self();
        co_yield();
    }
    *in_source = set.in_source;
    return set.ret;
}

/* One dirty area from *cursor on (wrapping): copied, or marked dirty again
 * after an error the policy lets pass (stop pauses here unless writes are
 * held: the caller lets them go first).  Returns the bytes copied, 0 if
 * nothing was dirty or the error passed, or -errno to end the job. */
static int64_t mirror_iteration(struct mirror_job *s, uint64_t *cursor, void *buf)
{
    uint64_t len = s->source->size, off = *cursor, n = 0;
    /* under a speed limit, one piece at a time: the limit's slices stay fine */
    uint64_t most = s->common.speed ? s->piece : s->buf_size;
    struct bnode *fbs = s->bitmap->bs;
    dirty_bitmaps_lock(fbs);
    bool found = dirty_bitmap_next_dirty_area_locked(s->bitmap, &off, len, most, &n);
    if (!found && *cursor) {
        off = 0;
        found = dirty_bitmap_next_dirty_area_locked(s->bitmap, &off, len, most, &n);
    }
    dirty_bitmaps_unlock(fbs);
    if (!found)
        return 0;
    co_guard_claim(s->guard, off, off + n);
    dirty_bitmap_reset_range(s->bitmap, off, n);
    bool in_source = true;
    int ret = mirror_copy_area(s, off, n, buf, &in_source);
    if (ret < 0)
        mark_dirty_aligned(s, off, n);
    guard_release(s->guard);
    *cursor = off + n < len ? off + n : 0;
    if (ret < 0) {
        enum block_error_action a = block_job_error_action(
            &s->common, in_source ? s->on_source_error : s->on_target_error, in_source, -ret);
        if (a == ERROR_ACTION_REPORT)
            return ret;
        if (a == ERROR_ACTION_STOP && !s->writes_held)
            job_co_pause_point(&s->common.job);
        return 0;
    }
    job_progress_update(&s->common.job, n);
    return (int64_t)n;
}

static void mirror_drained(void *opaque)
{
    struct mirror_job *s = opaque;
    struct coroutine *co = s->drain_waiter;
    s->drain_waiter = NULL;
    if (co)
        co_enter(co);
}

/* Hold the peers' writes and wait for those under way. */
static void co_hold_writes(struct mirror_job *s)
{
    s->drain_waiter = co_self();
    block_writes_hold(mirror_drained, s);
    co_yield();
    s->writes_held = true;
}

static void release_writes(struct mirror_job *s)
{
    if (s->writes_held) {
        s->writes_held = false;
        block_writes_release();
    }
}

static int mirror_co_work(struct job *job, error **errp)
{
    struct mirror_job *s = (struct mirror_job *)job;
    uint64_t len = s->source->size, cursor = 0;

    if (s->commit && s->target->size < len) {
        int ret = bnode_truncate(s->target, len, errp);
        if (ret < 0)
            return ret;
    } else if (!s->commit && len != s->target->size) {
        error_setg(errp, "Source and target image have different sizes");
        return -EINVAL;
    }
    if (len == 0) {
        job_transition_to_ready(job);
        while (!job_cancel_requested(job) && !s->should_complete)
            job_co_yield(job);
        return 0;
    }
    if (!s->none_mode) {
        int ret = mirror_dirty_init(s);
        if (ret < 0 || job_is_cancelled(job))
            return ret < 0 ? ret : 0;
    }
    if (s->write_blocking)
        __atomic_store_n(&s->active, true, __ATOMIC_RELEASE);
    CLEANUP_FREE void *buf = xmalloc_io(s->buf_size);
    for (;;) {
        job_co_pause_point(job);
        if (job_is_cancelled(job))
            return 0;
        uint64_t cnt = dirty_bitmap_count(s->bitmap);
        job_progress_set_remaining(job, cnt);
        if (cnt) {
            int64_t n = mirror_iteration(s, &cursor, buf);
            if (n < 0)
                return (int)n;
            uint64_t delay = block_job_ratelimit(&s->common, (uint64_t)n);
            if (delay)
                job_co_sleep(job, delay);
            continue;
        }
        if (!job_is_ready(job)) {
            int ret = bnode_co_flush(s->target);
            if (ret < 0) {
                enum block_error_action a = block_job_error_action(&s->common,
                                                                   s->on_target_error, false,
                                                                   -ret);
                if (a == ERROR_ACTION_REPORT)
                    return ret;
                continue;
            }
            job_transition_to_ready(job);
        }
        if (s->should_complete || job_cancel_requested(job)) {
            /* the last writes, then nothing more until the switch */
            co_hold_writes(s);
            int ret = 0;
            int64_t n;
            while ((n = mirror_iteration(s, &cursor, buf)) > 0)
                ;
            if (n < 0)
                ret = (int)n;
            else if (dirty_bitmap_count(s->bitmap) == 0)
                ret = bnode_co_flush(s->target);
            else
                ret = 1;                /* an error let pass: go round */
            if (ret == 0)
                return 0;
            release_writes(s);
            if (ret < 0)
                return ret;
            continue;
        }
        job_co_sleep(job, MIRROR_IDLE_MS);
    }
}

/* The work, then the guard goes: the job's state is not used by a peer's
 * write any more. */
static int mirror_co_run(struct job *job, error **errp)
{
    struct mirror_job *s = (struct mirror_job *)job;
    int ret = mirror_co_work(job, errp);
    __atomic_store_n(&s->active, false, __ATOMIC_RELEASE);
    co_guard_remove(s->guard);
    s->guard = NULL;
    return ret;
}

static void mirror_run(struct job *job)
{
    job_run_co(job, mirror_co_run);
}

static bool mirror_cancel(struct job *job, bool force)
{
    job_enter(job);
    return force || !job_is_ready(job);
}

static void mirror_complete(struct job *job, error **errp)
{
    struct mirror_job *s = (struct mirror_job *)job;
    if (s->replaces && !bnode_find(s->replaces)) {
        error_setg(errp, "Node name '%s' not found", s->replaces);
        return;
    }
    s->should_complete = true;
    job_enter(job);
}

static void release_held_writes(void *opaque)
{
    block_writes_release();
}

/* Every export of the replaced node moves to the target (QEMU's
 * bdrv_replace_node under the drain the job's end began). */
static int mirror_switch(struct mirror_job *s)
{
    struct bnode *old = s->replaces ? bnode_find(s->replaces) : s->source;
    struct bnode *target = s->target;
    error *err = NULL;
    if (!old)
        return -ENOENT;
    if (old->read_only != target->read_only &&
        bnode_reopen_set_read_only(target, old->read_only, &err) < 0) {
        log_error("mirror: %s", err->msg);
        error_free(err);
        return -EPERM;
    }
    size_t n = 0;
    for (struct bnode_user *u = old->users; u; u = u->next) {
        if (!u->parent && !u->replaced) {
            log_error("mirror: node '%s' is in use by %s, which cannot move to node '%s'",
                      old->node_name, u->name, target->node_name);
            return -EPERM;
        }
        n += !u->parent;
    }
    CLEANUP_FREE struct bnode_user **moved = xcalloc(n ? n : 1, sizeof(*moved));
    n = 0;
    for (struct bnode_user *u = old->users; u; u = u->next)
        if (!u->parent)
            moved[n++] = u;
    if (bnode_users_move(moved, n, target, &err) < 0) {
        log_error("mirror: cannot move the exports of node '%s' to node '%s': %s",
                  old->node_name, target->node_name, err->msg);
        error_free(err);
        return -EPERM;
    }
    bnode_users_replaced(moved, n, old->size);
    block_writes_redirect(old, target);
    return 0;
}

static void mirror_release(struct mirror_job *s)
{
    __atomic_store_n(&s->active, false, __ATOMIC_RELEASE);
    if (s->guard) {
        guard_remove(s->guard);
        s->guard = NULL;
    }
    if (s->writes_held) {
        /* no loop may still submit to the old node from before the switch */
        s->writes_held = false;
        loop_barrier(release_held_writes, NULL);
    }
    if (s->target_user) {
        bnode_detach(s->target_user);
        s->target_user = NULL;
    }
    block_job_remove_nodes(&s->common);
    if (s->bitmap) {
        dirty_bitmap_release(s->bitmap);
        s->bitmap = NULL;
    }
    chain_filter_close(&s->filter, &s->filter_user);
    chain_restore_read_only(&s->reopened, "commit");
}

/* drive-mirror's target gets its backing node (QEMU's mirror_exit_common). */
static int mirror_set_target_backing(struct mirror_job *s)
{
    error *err = NULL;
    int ret = 0;
    if (s->backing_mode == MIRROR_SOURCE_BACKING && s->target->drv->reopen_backing_link)
        ret = chain_link_backing(s->target, s->none_mode ? s->source : s->base);
    else if (s->backing_mode == MIRROR_OPEN_BACKING && !strcmp(s->target->drv->name, "qcow2"))
        ret = qcow2_open_backing_file(s->target, &err);
    if (err) {
        log_error("mirror: %s", err->msg);
        error_free(err);
    }
    return ret;
}

static int mirror_prepare(struct job *job)
{
    struct mirror_job *s = (struct mirror_job *)job;
    s->reopened = NULL;                 /* QEMU makes the base read-only again on abort only */
    if (mirror_set_target_backing(s) < 0)
        return -EPERM;
    if (!s->should_complete)
        return 0;                       /* a cancel once ready: the source stays */
    struct bnode *target = s->target;
    bnode_ref(target);                  /* drive-mirror's: only the job holds it */
    bnode_detach(s->target_user);       /* its write permission would conflict */
    s->target_user = NULL;
    int ret = mirror_switch(s);
    bnode_unref(target);
    return ret;
}

static void mirror_clean(struct job *job)
{
    mirror_release((struct mirror_job *)job);
}

static void mirror_free(struct job *job)
{
    struct mirror_job *s = (struct mirror_job *)job;
    mirror_release(s);
    pthread_mutex_destroy(&s->active_lock);
    free(s->replaces);
    s->replaces = NULL;
}

#define MIRROR_DRIVER_HOOKS                       \
    .instance_size = sizeof(struct mirror_job),     \
    .run = mirror_run,                              \
    .cancel = mirror_cancel,                        \
    .complete = mirror_complete,                    \
    .prepare = mirror_prepare,                      \
    .clean = mirror_clean,                          \
    .free = mirror_free,                            \
    .user_resume = block_job_user_resume,           \
    .on_ready = block_job_on_ready,                 \
    .on_pending = block_job_on_pending,             \
    .on_finalized = block_job_on_finalized

static const struct job_driver mirror_driver = { .type = JOB_TYPE_MIRROR, MIRROR_DRIVER_HOOKS };
static const struct job_driver commit_active_driver = {
    .type = JOB_TYPE_COMMIT, MIRROR_DRIVER_HOOKS
};

/* ---- the command (QEMU's qmp_blockdev_mirror, blockdev_mirror_common,
 * mirror_start and mirror_start_job) ---- */

static bool is_backing_node(struct bnode *bs, error **errp)
{
    struct bnode *over = bnode_backing_parent(bs);
    if (over)
        error_setg(errp, "Node '%s' is busy: node is used as backing hd of '%s'",
                   bs->node_name, over->node_name);
    return over;
}

/* QEMU's check_to_replace_node() and bdrv_recurse_can_replace(): the
 * source itself, or a node below it through filters. */
static struct bnode *to_replace_node(struct bnode *bs, const char *name, error **errp)
{
    struct bnode *r = bnode_find(name);
    if (!r) {
        error_setg(errp, "Failed to find node with node-name='%s'", name);
        return NULL;
    }
    if (block_node_check_busy(r, errp) < 0 || is_backing_node(r, errp))
        return NULL;
    struct bnode *it = bs;
    while (it && it != r && it->drv->is_filter && strcmp(it->drv->name, "snapshot-access"))
        it = it->file;
    if (it != r) {
        error_setg(errp, "Cannot replace '%s' by a node mirrored from '%s', because it "
                   "cannot be guaranteed that doing so would not lead to an abrupt change "
                   "of visible data", name, bs->node_name);
        return NULL;
    }
    return r;
}

/* What a mirror job starts with (QEMU's mirror_start_job arguments). */
struct mirror_start {
    const char *job_id;
    struct bnode *bs, *target;
    const char *replaces;
    struct bnode *base;                 /* copy only what is above it */
    bool none_mode, zero_target, write_blocking, unmap;
    enum mirror_backing backing_mode;
    uint32_t granularity;               /* 0: the target's default */
    uint64_t buf_size;
    enum block_on_error on_source_error, on_target_error;
    const char *filter_node_name;
    int64_t speed;
    unsigned flags;
    const struct job_driver *drv;
};

static struct mirror_job *mirror_start_job(const struct mirror_start *a, error **errp)
{
    struct bnode *bs = a->bs, *target = a->target;
    if (bs == target) {
        error_setg(errp, "Can't mirror node into itself");
        return NULL;
    }
    /* a peer's writes must reach the source through the guard; a root node
     * has no parent node to write it otherwise */
    if (bs->intercept) {
        error_setg(errp, "Node '%s' is busy: its writes are watched by another job",
                   bs->node_name);
        return NULL;
    }
    struct bnode_user *filter_user;
    struct bnode *filter = chain_filter_open("mirror_top", bs, a->filter_node_name, false,
                                             &filter_user, errp);
    if (!filter)
        return NULL;
    struct mirror_job *s = block_job_create(a->job_id, a->drv, NULL, a->speed, a->flags,
                                            errp);
    if (!s) {
        chain_filter_close(&filter, &filter_user);
        return NULL;
    }
    pthread_mutex_init(&s->active_lock, NULL);
    s->filter = filter;
    s->filter_user = filter_user;
    s->source = bs;
    s->target = target;
    s->commit = a->drv->type == JOB_TYPE_COMMIT;
    /* committing: the chain above the target reads it as it changes */
    s->target_user = bnode_attach(target, PERM_WRITE | (s->commit ? PERM_RESIZE : 0),
                                  s->commit ? PERM_ALL : PERM_WRITE_UNCHANGED,
                                  "an unnamed block device", "root", errp);
    if (!s->target_user)
        goto fail;
    s->replaces = a->replaces ? xstrdup(a->replaces) : NULL;
    s->none_mode = a->none_mode;
    s->zero_target = a->zero_target;
    s->base = a->base;
    s->granularity = a->granularity ? a->granularity : dirty_bitmap_default_granularity(target);
    uint64_t piece = a->buf_size < MIRROR_MAX_IO ? a->buf_size : MIRROR_MAX_IO;
    s->piece = (piece + s->granularity - 1) / s->granularity * s->granularity;
    s->buf_size = MAX(s->piece, a->buf_size / s->piece * s->piece);
    s->unmap = a->unmap;
    s->backing_mode = a->backing_mode;
    s->write_blocking = a->write_blocking;
    s->on_source_error = a->on_source_error;
    s->on_target_error = a->on_target_error;
    s->bitmap = dirty_bitmap_create(bs, s->granularity, NULL, errp);
    if (!s->bitmap)
        goto fail;
    block_job_add_node(&s->common, filter);
    block_job_add_node(&s->common, bs);
    block_job_add_node(&s->common, target);
    if (s->commit)
        for (struct bnode *it = bs->backing; it && it != target; it = it->backing)
            block_job_add_node(&s->common, it);
    s->guard = guard_install(bs, &mirror_guard_ops, s);
    return s;

fail:
    mirror_release(s);
    job_early_fail(&s->common.job);
    return NULL;
}

/* QEMU's blockdev_mirror_common(): the checks both commands share, then
 * the job.  target is referenced by the job once it starts. */
static int mirror_common(json_t *a, struct bnode *bs, struct bnode *target,
                         enum mirror_backing backing_mode, bool zero_target, error **errp)
{
    int64_t granularity = opt_int(a, "granularity", 0);
    if (granularity != 0 && (granularity < 512 || granularity > 64 * 1048576)) {
        error_setg(errp, "Parameter 'granularity' expects a value in range [512B, 64MB]");
        return -1;
    }
    if (granularity & (granularity - 1)) {
        error_setg(errp, "Parameter 'granularity' expects a power of 2");
        return -1;
    }
    if (block_node_check_busy(bs, errp) < 0)
        return -1;
    if (block_node_check_busy(target, errp) < 0 || is_backing_node(target, errp))
        return -1;
    const char *sync = opt_str(a, "sync", "full");
    if (!strcmp(sync, "top") && !bs->backing)
        sync = "full";
    const char *replaces = opt_str(a, "replaces", NULL);
    if (replaces) {
        struct bnode *r = to_replace_node(bs, replaces, errp);
        if (!r)
            return -1;
        if (r->size != bs->size) {
            error_setg(errp, "cannot replace image with a mirror image of different size");
            return -1;
        }
    }
    if (!strcmp(sync, "incremental") || !strcmp(sync, "bitmap")) {
        error_setg(errp, "Sync mode '%s' not supported", sync);
        return -1;
    }
    int64_t buf_size = opt_int(a, "buf-size", 0);
    if (buf_size < 0) {
        error_setg(errp, "Invalid parameter 'buf-size'");
        return -1;
    }
    if (replaces && strcmp(replaces, bs->node_name)) {
        error_setg(errp, "bexd replaces only the source node itself ('%s'), not '%s' below it",
                   bs->node_name, replaces);
        return -1;
    }
    unsigned flags = block_job_flags(a);
    struct mirror_start st = {
        .job_id = opt_str(a, "job-id", ""), .bs = bs, .target = target, .replaces = replaces,
        .base = !strcmp(sync, "top") ? bs->backing : NULL,
        .none_mode = !strcmp(sync, "none"), .zero_target = zero_target,
        .write_blocking = !strcmp(opt_str(a, "copy-mode", "background"), "write-blocking"),
        .unmap = opt_bool(a, "unmap", true), .backing_mode = backing_mode,
        .granularity = (uint32_t)granularity,
        .buf_size = buf_size ? (uint64_t)buf_size : MIRROR_BUF_DEFAULT,
        .on_source_error = block_on_error_parse(opt_str(a, "on-source-error", NULL)),
        .on_target_error = block_on_error_parse(opt_str(a, "on-target-error", NULL)),
        .filter_node_name = opt_str(a, "filter-node-name", NULL),
        .speed = opt_int(a, "speed", 0), .flags = flags, .drv = &mirror_driver,
    };
    struct mirror_job *s = mirror_start_job(&st, errp);
    if (!s)
        return -1;
    job_start(&s->common.job);
    return 0;
}

static json_t *qmp_blockdev_mirror(json_t *a, error **errp)
{
    struct bnode *bs = chain_root_node(opt_str(a, "device", ""), errp);
    if (!bs)
        return NULL;
    const char *tname = opt_str(a, "target", "");
    struct bnode *target = bnode_find(tname);
    if (!target) {
        error_setg(errp, "Cannot find device='%s' nor node-name='%s'", tname, tname);
        return NULL;
    }
    bool full = !strcmp(opt_str(a, "sync", ""), "full");
    return mirror_common(a, bs, target, MIRROR_LEAVE_BACKING, full, errp) < 0 ? NULL
                                                                             : json_object();
}
QMP_COMMAND("blockdev-mirror", qmp_blockdev_mirror)

/* drive-mirror (QEMU's qmp_drive_mirror): the target is an image file the
 * command makes (mode absolute-paths: qcow2 or raw, backed by what sync
 * leaves below unless sync=full) or finds (mode existing), opened without
 * its backing file; when the job ends well the target's backing node is
 * the source's backing node (top), the source (none), or the one its
 * header names (existing). */
static json_t *qmp_drive_mirror(json_t *a, error **errp)
{
    struct bnode *bs = chain_root_node(opt_str(a, "device", ""), errp);
    if (!bs || block_node_check_busy(bs, errp) < 0)
        return NULL;
    bool existing = !strcmp(opt_str(a, "mode", "absolute-paths"), "existing");
    const char *path = opt_str(a, "target", "");
    const char *format = opt_str(a, "format", existing ? NULL : bs->drv->name);
    const char *sync = opt_str(a, "sync", "full");
    struct bnode *backing = bs->backing;
    if (!backing && !strcmp(sync, "top"))
        sync = "full";
    if (!strcmp(sync, "none"))
        backing = bs;
    if (opt_has(a, "replaces") && !opt_has(a, "node-name")) {
        error_setg(errp, "a node-name must be provided when replacing a named node of the "
                   "graph");
        return NULL;
    }
    if (!existing) {
        CLEANUP_FREE char *bname = backing ? bnode_filename(backing) : NULL;
        bool with_backing = strcmp(sync, "full") && backing;
        if (image_create(path, format, bs->size, with_backing ? bname : NULL,
                         with_backing ? backing->drv->name : NULL, errp) < 0)
            return NULL;
    }
    if (!format)
        format = bnode_probe_format(path);
    CLEANUP_JSON json_t *o = json_pack(
        "{s:s, s:{s:s, s:s}, s:b, s:{s:b, s:b}}", "driver", format, "file", "driver", "file",
        "filename", path, "read-only", false, "cache", "direct", bs->cache_direct,
        "no-flush", bs->cache_no_flush);
    if (opt_has(a, "node-name"))
        json_object_set_new(o, "node-name", json_string(opt_str(a, "node-name", "")));
    if (!strcmp(format, "qcow2"))
        json_object_set_new(o, "backing", json_null());
    struct bnode *target = bnode_open_ref(o, false, errp);     /* named or not */
    if (!target)
        return NULL;
    /* a new image reads as zeros; an existing one is written whole */
    bool zero_target = !strcmp(sync, "full") && existing;
    int ret = mirror_common(a, bs, target,
                            existing ? MIRROR_OPEN_BACKING : MIRROR_SOURCE_BACKING,
                            zero_target, errp);
    bnode_unref(target);                /* the job holds it now: the monitor does not */
    return ret < 0 ? NULL : json_object();
}
QMP_COMMAND("drive-mirror", qmp_drive_mirror)

/* ---- committing the active layer (QEMU's commit_active_start) ---- */

int mirror_commit_active(const char *job_id, struct bnode *bs, struct bnode *base,
                         unsigned flags, int64_t speed, enum block_on_error on_error,
                         const char *filter_node_name, error **errp)
{
    bool reopened = false;
    if (base->read_only) {
        if (bnode_reopen_set_read_only(base, false, errp) < 0)
            return -1;
        reopened = true;
    }
    struct mirror_start st = {
        .job_id = job_id, .bs = bs, .target = base, .base = base, .unmap = true,
        .buf_size = MIRROR_BUF_DEFAULT, .on_source_error = on_error,
        .on_target_error = on_error, .filter_node_name = filter_node_name,
        .speed = speed, .flags = flags, .drv = &commit_active_driver,
    };
    struct mirror_job *s = mirror_start_job(&st, errp);
    if (!s) {
        if (reopened)
            bnode_reopen_set_read_only(base, true, NULL);
        return -1;
    }
    s->reopened = reopened ? base : NULL;
    job_start(&s->common.job);
    return 0;
}
