/*
 * blockdev-backup and drive-backup: QEMU 7.2's backup block job
 * (block/backup.c), as QMP commands and as `transaction` actions;
 * drive-backup makes or opens its target image first.
 *
 * Theory of operation.  Preparing a backup checks the arguments in QEMU's
 * order with QEMU's words, then opens a copy-before-write node (cbw.c)
 * over the source with the target as its target (named filter-node-name,
 * or generated), freezes the sync bitmap (its successor records the
 * writes from now on) and, for sync=bitmap, makes the filter copy only the
 * bitmap's clusters.  Committing inserts the filter above the source:
 * writes are held until those already issued have completed, which is the
 * point in time the target receives (QEMU drains instead), and the job
 * starts.  Its work, a coroutine in the main loop, waits for that point,
 * then (except for sync=none, which only waits for its cancel while guest
 * writes copy old data) copies every cluster the filter still needs in
 * pieces, rate-limited by the speed, with pause points between pieces; a
 * piece's copies run on while the next piece starts, at most x-perf
 * max-workers of them (backup_copy).  Guest writes copy what they
 * overwrite first; each cluster is copied once.
 *
 * Both paths run with every bitmap frozen (dirty_bitmaps_freeze_all), as a
 * transaction's actions do, so bitmap actions of the same transaction and
 * the freeze are one instant for every writer.  The block layer marks a
 * write in the bitmaps before it looks at the hold, so a write missing
 * from the new bitmaps passed the hold: it is before the point in time
 * and in the frozen bitmap.
 *
 * At finalization the sync bitmap is settled as QEMU does (bitmap-mode:
 * on-success abdicates to the successor on success, always abdicates in
 * every case and adds back what was not copied, never reclaims), then the
 * filter leaves the source and the job's nodes are released.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <string.h>
#include "block/block.h"
#include "block/block-job.h"
#include "block/chain.h"
#include "block/cbw.h"
#include "block/dirty-bitmap.h"
#include "block/transaction.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/coroutine.h"
#include "util/opts.h"
#include "util/xalloc.h"

#define BACKUP_PIECE      (16u << 20)   /* address space started between pause points */
#define BACKUP_PIECE_SLOW (1u << 20)    /* ... under a speed limit */

enum sync_mode { SYNC_TOP, SYNC_FULL, SYNC_NONE, SYNC_INCREMENTAL, SYNC_BITMAP };
static const char *const sync_names[] = { "top", "full", "none", "incremental", "bitmap" };
enum bitmap_mode { BM_ON_SUCCESS, BM_NEVER, BM_ALWAYS };
static const char *const bitmap_mode_names[] = { "on-success", "never", "always" };

struct backup_job {
    struct block_job common;
    struct bnode *source, *target;
    struct bnode *filter;            /* our reference to the copy-before-write node */
    struct cbw *cbw;
    enum sync_mode sync;
    struct dirty_bitmap *sync_bitmap;   /* frozen, with a successor, until settled */
    enum bitmap_mode bitmap_mode;
    enum block_on_error on_source_error, on_target_error;
    uint64_t len;
    uint64_t max_chunk;              /* x-perf max-chunk, 0 = none */
    unsigned max_workers;            /* x-perf max-workers: copies side by side */
    bool inserted;                   /* the filter is above the source */
    bool frozen;                     /* ... and the point in time is set */
    struct coroutine *freeze_waiter;
};

static int parse_enum(const char *s, const char *const *names, int n)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(s, names[i]))
            return i;
    return 0;
}

/* ---- settling the bitmap, releasing the nodes ---- */

static void backup_settle_bitmap(struct backup_job *s, int ret)
{
    struct dirty_bitmap *bm = s->sync_bitmap;
    if (!bm)
        return;
    s->sync_bitmap = NULL;
    bool sync = (ret == 0 || s->bitmap_mode == BM_ALWAYS) && s->bitmap_mode != BM_NEVER;
    bm = sync ? dirty_bitmap_abdicate(bm) : dirty_bitmap_reclaim(bm);
    if (ret < 0 && s->bitmap_mode == BM_ALWAYS && bm && s->cbw) {
        /* what was not copied stays dirty */
        uint64_t c = cbw_cluster_size(s->cbw);
        for (uint64_t off = cbw_next_need(s->cbw, 0); off < s->len;
             off = cbw_next_need(s->cbw, off + c)) {
            off -= off % c;
            dirty_bitmap_set_range(bm, off, MIN(c, s->len - off));
        }
    }
}

static void backup_release(struct backup_job *s)
{
    backup_settle_bitmap(s, -1);
    if (s->filter) {
        if (s->cbw)
            cbw_set_progress(s->cbw, NULL, NULL);
        cbw_remove(s->filter);
        bnode_unref(s->filter);
        s->filter = NULL;
        s->cbw = NULL;
    }
    block_job_remove_nodes(&s->common);
}

/* ---- the work ---- */

static void backup_progress(void *opaque, uint64_t bytes)
{
    struct job *job = opaque;
    __atomic_add_fetch(&job->progress_current, bytes, __ATOMIC_RELAXED);
}

static void backup_frozen(void *opaque)
{
    struct backup_job *s = opaque;
    s->frozen = true;
    if (s->freeze_waiter) {
        struct coroutine *co = s->freeze_waiter;
        s->freeze_waiter = NULL;
        co_enter(co);
    }
    job_unref(&s->common.job);       /* taken by backup_commit */
}

/* sync=top: clusters the source's own layer does not allocate (its backing
 * chain's, or nobody's) need no copy, as QEMU's bdrv_is_allocated() says. */
static int backup_skip_unallocated(struct backup_job *s)
{
    uint64_t c = cbw_cluster_size(s->cbw);
    for (uint64_t off = 0; off < s->len;) {
        uint64_t pnum;
        unsigned flags;
        int depth;
        if (job_is_cancelled(&s->common.job))
            return 0;
        int ret = bnode_block_status(s->source, off, s->len - off, &pnum, &flags, &depth);
        if (ret < 0)
            return ret;
        if (depth != 1) {
            uint64_t a = (off + c - 1) / c * c;
            uint64_t z = off + pnum == s->len ? s->len : (off + pnum) / c * c;
            if (z > a)
                cbw_set_need(s->cbw, a, z - a, false);
        }
        off += pnum;
    }
    return 0;
}

/* The error action for a failed copy: < 0 to end the job with it, else go
 * on (after a pause for "stop"). */
static int backup_copy_failed(struct backup_job *s, int ret, bool is_read)
{
    struct job *job = &s->common.job;
    enum block_error_action a = block_job_error_action(
        &s->common, is_read ? s->on_source_error : s->on_target_error, is_read, -ret);
    if (a == ERROR_ACTION_REPORT)
        return ret;
    if (a == ERROR_ACTION_STOP)
        job_co_pause_point(job);     /* then try again */
    else
        job_co_sleep(job, 0);
    return 0;
}

/* Copy what the filter still needs: pieces of address space, each started
 * as copies that run side by side, at most max-workers of them (QEMU's
 * block-copy call); the next piece starts while they run.  The copies are
 * waited for before a pause, a rate-limit sleep, the end and an error
 * action, so that a paused or finished job has nothing in flight.  Once
 * the end is reached, what is still needed (a copy that failed and was
 * ignored, or clusters a guest write was copying) is copied piece by piece,
 * waiting for copies under way there. */
static int backup_copy(struct backup_job *s, struct cbw_call *call)
{
    struct job *job = &s->common.job;
    bool leftovers = false;
    uint64_t off = 0;

    for (;;) {
        bool is_read = false;
        int ret;
        if (job_is_cancelled(job))
            return 0;
        off = cbw_next_need(s->cbw, off);
        if (off >= s->len) {
            ret = cbw_co_call_drain(s->cbw, call, &is_read);
            if (ret < 0) {
                if ((ret = backup_copy_failed(s, ret, is_read)) < 0)
                    return ret;
                off = 0;
                continue;
            }
            if (!cbw_need_bytes(s->cbw))
                return 0;
            off = 0;
            leftovers = true;
            job_co_sleep(job, 0);
            continue;
        }
        uint64_t delay = block_job_ratelimit(&s->common, 0);
        if (delay) {                 /* still over the limit (woken early: a pause...) */
            if ((ret = cbw_co_call_drain(s->cbw, call, &is_read)) == 0) {
                job_co_sleep(job, delay);
                continue;
            }
        } else {
            uint64_t piece = s->common.speed ? BACKUP_PIECE_SLOW : BACKUP_PIECE;
            piece = MIN(piece, s->len - off);
            if (leftovers)
                ret = cbw_co_copy(s->cbw, off, piece, &is_read);
            else
                ret = cbw_co_copy_async(s->cbw, call, off, piece, &is_read);
            if (ret == 0) {
                off += piece;
                delay = block_job_ratelimit(&s->common, piece);
                if (delay || job->pause_count > 0)
                    ret = cbw_co_call_drain(s->cbw, call, &is_read);
                if (ret == 0) {
                    if (delay)
                        job_co_sleep(job, delay);
                    else
                        job_co_pause_point(job);
                    continue;
                }
            }
        }
        /* a copy failed (every copy of the call has ended) */
        if ((ret = backup_copy_failed(s, ret, is_read)) < 0)
            return ret;
        off = 0;                     /* what failed is still needed: found again */
    }
}

static int backup_co_run(struct job *job, error **errp)
{
    struct backup_job *s = (struct backup_job *)job;

    while (!s->frozen) {
        s->freeze_waiter = co_self();
        co_yield();
    }
    if (s->sync == SYNC_TOP) {
        int ret = backup_skip_unallocated(s);
        if (ret < 0)
            return ret;
    }
    job_progress_set_remaining(job, cbw_need_bytes(s->cbw));

    if (s->sync == SYNC_NONE) {
        /* guest writes copy what they overwrite; nothing else to do */
        while (!job_is_cancelled(job))
            job_co_yield(job);
        return 0;
    }

    struct cbw_call *call = cbw_call_new(s->cbw, s->max_workers, s->max_chunk);
    int ret = backup_copy(s, call);
    cbw_call_free(s->cbw, call);     /* waits for the copies still running */
    return ret;
}

static void backup_run(struct job *job)
{
    job_run_co(job, backup_co_run);
}

/* ---- finalization ---- */

static void backup_commit_job(struct job *job)
{
    backup_settle_bitmap((struct backup_job *)job, 0);
}

static void backup_abort_job(struct job *job)
{
    backup_settle_bitmap((struct backup_job *)job, -1);
}

static void backup_clean(struct job *job)
{
    backup_release((struct backup_job *)job);
}

static void backup_free(struct job *job)
{
    backup_release((struct backup_job *)job);
}

static const struct job_driver backup_driver = {
    .instance_size = sizeof(struct backup_job),
    .type = JOB_TYPE_BACKUP,
    .run = backup_run,
    .commit = backup_commit_job,
    .abort = backup_abort_job,
    .clean = backup_clean,
    .free = backup_free,
    .user_resume = block_job_user_resume,
    .on_ready = block_job_on_ready,
    .on_pending = block_job_on_pending,
    .on_finalized = block_job_on_finalized,
};

/* ---- preparing (QEMU's do_backup_common and backup_job_create) ---- */

static struct bnode *lookup_bs(const char *name, error **errp)
{
    struct bnode *bs = bnode_find(name);
    if (!bs)
        error_setg(errp, "Cannot find device='%s' nor node-name='%s'", name, name);
    return bs;
}

/* Open the copy-before-write node over bs, writing to target. */
static struct bnode *open_filter(struct bnode *bs, struct bnode *target, const char *name,
                                 error **errp)
{
    json_t *opts = json_pack("{s:s, s:s, s:s}", "driver", "copy-before-write",
                             "file", bs->node_name, "target", target->node_name);
    if (name)
        json_object_set_new(opts, "node-name", json_string(name));
    struct bnode *f = bnode_open_ref(opts, false, errp);
    json_decref(opts);
    if (!f)
        error_prepend(errp, "Could not create node: ");
    return f;
}

/* QEMU's do_backup_common(): the checks of BackupCommon, then the job. */
static struct backup_job *backup_prepare_nodes(json_t *a, struct bnode *bs,
                                               struct bnode *target, struct job_txn *txn,
                                               error **errp)
{
    enum sync_mode sync = parse_enum(opt_str(a, "sync", "full"), sync_names, 5);
    bool has_bitmap = opt_has(a, "bitmap"), has_mode = opt_has(a, "bitmap-mode");
    enum bitmap_mode mode = parse_enum(opt_str(a, "bitmap-mode", "on-success"),
                                       bitmap_mode_names, 3);
    struct dirty_bitmap *bm = NULL;

    if ((sync == SYNC_BITMAP || sync == SYNC_INCREMENTAL) && !has_bitmap) {
        error_setg(errp, "must provide a valid bitmap name for '%s' sync mode",
                   sync_names[sync]);
        return NULL;
    }
    if (sync == SYNC_INCREMENTAL) {
        if (has_mode && mode != BM_ON_SUCCESS) {
            error_setg(errp, "Bitmap sync mode must be 'on-success' when using sync mode "
                       "'incremental'");
            return NULL;
        }
        has_mode = true;
        sync = SYNC_BITMAP;
        mode = BM_ON_SUCCESS;
    }
    if (has_bitmap) {
        const char *name = opt_str(a, "bitmap", "");
        bm = dirty_bitmap_find(bs, name);
        if (!bm) {
            error_setg(errp, "Bitmap '%s' could not be found", name);
            return NULL;
        }
        if (!has_mode) {
            error_setg(errp, "Bitmap sync mode must be given when providing a bitmap");
            return NULL;
        }
        if (dirty_bitmap_check(bm, DBM_CHECK_ALLOW_RO, errp) < 0)
            return NULL;
        if (sync == SYNC_NONE) {
            error_setg(errp, "sync mode 'none' does not produce meaningful bitmap outputs");
            return NULL;
        }
        if (mode == BM_NEVER && sync != SYNC_BITMAP) {
            error_setg(errp, "Bitmap sync mode 'never' has no meaningful effect when combined "
                       "with sync mode '%s'", sync_names[sync]);
            return NULL;
        }
    }
    if (!has_bitmap && has_mode) {
        error_setg(errp, "Cannot specify bitmap sync mode without a bitmap");
        return NULL;
    }

    /* backup_job_create() */
    if (bs == target) {
        error_setg(errp, "Source and target cannot be the same");
        return NULL;
    }
    bool compress = opt_bool(a, "compress", false);
    if (compress && !target->drv->compressed_writes) {
        /* QEMU names the target's device: a node has none */
        error_setg(errp, "Compression is not supported for this drive ");
        return NULL;
    }
    if (block_node_check_busy(bs, errp) < 0 || block_node_check_busy(target, errp) < 0)
        return NULL;
    json_t *perf = json_object_get(a, "x-perf");
    long long workers = opt_int(perf, "max-workers", 64);
    long long max_chunk = opt_int(perf, "max-chunk", 0);
    if (workers < 1 || workers > INT_MAX) {
        error_setg(errp, "max-workers must be between 1 and %d", INT_MAX);
        return NULL;
    }
    if (max_chunk < 0) {
        error_setg(errp, "max-chunk must be zero (which means no limit) or positive");
        return NULL;
    }
    if (bm && mode != BM_NEVER && dirty_bitmap_check(bm, DBM_CHECK_DEFAULT, errp) < 0)
        return NULL;
    if (bm && dirty_bitmap_create_successor(bm, errp) < 0)
        return NULL;

    struct bnode *filter = NULL;
    struct backup_job *s = NULL;
    if (bs->size != target->size) {
        error_setg(errp, "Source and target image have different sizes");
        goto fail;
    }
    filter = open_filter(bs, target, opt_str(a, "filter-node-name", NULL), errp);
    if (!filter)
        goto fail;
    /* the job's length is fixed: nobody resizes the source meanwhile (QEMU's
     * copy-before-write unshares resize on it) */
    if (bnode_user_set_perm(filter->file_link, 0, PERM_ALL & ~PERM_RESIZE, errp) < 0)
        goto fail;
    struct cbw *cbw = cbw_of(filter);
    if (max_chunk && (uint64_t)max_chunk < cbw_cluster_size(cbw)) {
        error_setg(errp, "Required max-chunk (%lld) is less than backup cluster size (%" PRIu64
                   ")", max_chunk, cbw_cluster_size(cbw));
        goto fail;
    }
    unsigned flags = block_job_flags(a);
    s = block_job_create(opt_str(a, "job-id", ""), &backup_driver, txn, opt_int(a, "speed", 0),
                         flags, errp);
    if (!s)
        goto fail;
    s->source = bs;
    s->target = target;
    s->filter = filter;
    s->cbw = cbw;
    s->sync = sync;
    s->sync_bitmap = bm;
    s->bitmap_mode = mode;
    s->on_source_error = block_on_error_parse(opt_str(a, "on-source-error", NULL));
    s->on_target_error = block_on_error_parse(opt_str(a, "on-target-error", NULL));
    s->len = bs->size;
    s->max_chunk = (uint64_t)max_chunk;
    s->max_workers = (unsigned)workers;
    block_job_add_node(&s->common, filter);
    block_job_add_node(&s->common, target);
    if (sync == SYNC_BITMAP)
        cbw_need_from_bitmap(cbw, bm);
    cbw_set_compress(cbw, compress);
    cbw_set_progress(cbw, backup_progress, &s->common.job);
    job_progress_set_remaining(&s->common.job, cbw_need_bytes(cbw));
    return s;

fail:
    if (filter)
        bnode_unref(filter);
    if (bm)
        dirty_bitmap_reclaim(bm);
    return NULL;
}

static struct backup_job *backup_prepare(json_t *a, struct job_txn *txn, error **errp)
{
    struct bnode *bs = lookup_bs(opt_str(a, "device", ""), errp);
    if (!bs)
        return NULL;
    struct bnode *target = lookup_bs(opt_str(a, "target", ""), errp);
    if (!target)
        return NULL;
    return backup_prepare_nodes(a, bs, target, txn, errp);
}

/* drive-backup (QEMU's drive_backup_prepare): the target image is made
 * (mode absolute-paths: the source's format unless `format` says, backed
 * by the source's backing file for sync=top, by the source for none) or
 * found (existing), then opened with discard and detect-zeroes at unmap,
 * held by the job alone. */
static struct backup_job *drive_backup_prepare(json_t *a, struct job_txn *txn, error **errp)
{
    struct bnode *bs = lookup_bs(opt_str(a, "device", ""), errp);
    if (!bs || block_node_check_busy(bs, errp) < 0)
        return NULL;
    bool existing = !strcmp(opt_str(a, "mode", "absolute-paths"), "existing");
    const char *path = opt_str(a, "target", "");
    const char *format = opt_str(a, "format", existing ? NULL : bs->drv->name);
    const char *sync = opt_str(a, "sync", "full");
    struct bnode *source = NULL;
    CLEANUP_JSON json_t *args = json_deep_copy(a);
    if (!strcmp(sync, "top")) {
        source = bs->backing;
        if (!source)
            json_object_set_new(args, "sync", json_string("full"));
    }
    bool none = !strcmp(sync, "none");
    if (none)
        source = bs;
    if (!existing) {
        CLEANUP_FREE char *bname = source ? bnode_filename(source) : NULL;
        if (image_create(path, format, bs->size, bname, source ? source->drv->name : NULL,
                         errp) < 0)
            return NULL;
    }
    if (!format)
        format = bnode_probe_format(path);
    CLEANUP_JSON json_t *o = json_pack(
        "{s:s, s:{s:s, s:s}, s:b, s:s, s:s, s:{s:b, s:b}}", "driver", format, "file",
        "driver", "file", "filename", path, "read-only", false, "discard", "unmap",
        "detect-zeroes", "unmap", "cache", "direct", bs->cache_direct, "no-flush",
        bs->cache_no_flush);
    if (none && !strcmp(format, "qcow2"))
        json_object_set_new(o, "backing", json_null());
    struct bnode *target = bnode_open_ref(o, false, errp);
    if (!target)
        return NULL;
    struct backup_job *s = NULL;
    if (none && chain_link_backing(target, bs) < 0)
        error_setg(errp, "Could not set the backing file of the backup target");
    else
        s = backup_prepare_nodes(args, bs, target, txn, errp);
    bnode_unref(target);                /* the job holds it now */
    return s;
}

/* The point in time is now: hold writes until the issued ones are done,
 * insert the filter, start the job. */
static void backup_commit(struct backup_job *s)
{
    s->inserted = true;
    job_ref(&s->common.job);         /* until backup_frozen */
    cbw_insert(s->filter, backup_frozen, s);
    job_start(&s->common.job);
}

/* A prepared job that must not run (a later action failed). */
static void backup_abort(struct backup_job *s)
{
    job_user_cancel(&s->common.job, true, NULL);
}

/* The command: the action alone, with every bitmap frozen meanwhile. */
static json_t *run_one(json_t *args,
                       struct backup_job *(*prepare)(json_t *, struct job_txn *, error **),
                       error **errp)
{
    size_t nheld;
    struct bnode **held = dirty_bitmaps_freeze_all(&nheld);
    struct backup_job *s = prepare(args, NULL, errp);
    if (s)
        backup_commit(s);
    dirty_bitmaps_thaw_all(held, nheld);
    return NULL;
}

static json_t *qmp_blockdev_backup(json_t *args, error **errp)
{
    return run_one(args, backup_prepare, errp);
}
QMP_COMMAND("blockdev-backup", qmp_blockdev_backup)

static json_t *qmp_drive_backup(json_t *args, error **errp)
{
    return run_one(args, drive_backup_prepare, errp);
}
QMP_COMMAND("drive-backup", qmp_drive_backup)

/* ---- the transaction action ---- */

static int txn_backup_prepare(struct txn_action *a, json_t *data, error **errp)
{
    struct backup_job *s = backup_prepare(data, a->job_txn, errp);
    a->opaque = s;
    return s ? 0 : -1;
}

static int txn_drive_backup_prepare(struct txn_action *a, json_t *data, error **errp)
{
    struct backup_job *s = drive_backup_prepare(data, a->job_txn, errp);
    a->opaque = s;
    return s ? 0 : -1;
}

static void txn_backup_commit(struct txn_action *a)
{
    backup_commit(a->opaque);
}

static void txn_backup_abort(struct txn_action *a)
{
    if (a->opaque)
        backup_abort(a->opaque);
}

static struct txn_ops backup_ops = {
    .type = "blockdev-backup", .grouped = true,
    .prepare = txn_backup_prepare, .commit = txn_backup_commit, .abort = txn_backup_abort,
};
TRANSACTION_ACTION(backup_ops)

static struct txn_ops drive_backup_ops = {
    .type = "drive-backup", .grouped = true,
    .prepare = txn_drive_backup_prepare, .commit = txn_backup_commit,
    .abort = txn_backup_abort,
};
TRANSACTION_ACTION(drive_backup_ops)
