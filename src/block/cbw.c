/*
 * Driver "copy-before-write" (see cbw.h).
 *
 * Theory of operation.  A write (or write-zeroes, discard) reaching the
 * filter (or, once inserted with cbw_insert, reaching its source from
 * anywhere) checks under the lock whether any cluster it covers still
 * needs a copy or is being read from the source by a snapshot reader.  If
 * not, it goes straight on to the source: the common case costs a lock and
 * a bitmap lookup.  Otherwise a coroutine in the request's loop takes over:
 * it claims the runs of needed clusters nobody is copying, starts a copier
 * coroutine for each (read the source, write the target), waits until every
 * cluster is copied and no snapshot reader is on the range, then passes the
 * write on.  Waiting is one queue woken whenever a copy or a read ends; a
 * waiter with cbw-timeout set also wakes at its deadline.
 *
 * A failed copy fails the write (on-cbw-error=break-guest-write) or breaks
 * the snapshot for good and lets writes through (break-snapshot); snapshot
 * reads then fail with EACCES, as in QEMU.
 *
 * Snapshot readers (snapshot-access) read a copied cluster from the target
 * and any other from the source, announcing the range so that writers
 * wait for them.  The state is reference-counted: the node holds one
 * reference, every coroutine one more, so closing the node while copies
 * are under way is safe; the last reference is dropped in the main loop.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "block/cbw.h"
#include "block/dirty-bitmap.h"
#include "util/cleanup.h"
#include "util/coroutine.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/opts.h"
#include "util/pbitmap.h"
#include "util/xalloc.h"

#define CBW_CLUSTER      65536u       /* QEMU's block-copy cluster for raw targets */
#define CBW_MAX_COPY     (16u * CBW_CLUSTER)   /* one copier's run (at least a cluster) */
#define CBW_SPARE_BUFS   64           /* copy buffers kept for the next copies: one per */
#define CBW_SPARE_BYTES  (8u << 20)   /* ... job worker (max-workers default), 8 MiB at most */

/* Copy buffers kept for the next copies, of any filter or job, for the
 * daemon's life: a fresh buffer costs a page fault per page on its first
 * use, more than the copy itself, and giving one back to the system (a
 * buffer of 128 KiB or more is its own mapping) costs a TLB shootdown of
 * every thread, which a loaded VM makes last milliseconds.  Freeing the
 * spares of a filter when it closed put ten of those into a backup job's
 * finalization, between its last copy and BLOCK_JOB_COMPLETED. */
static struct {
    pthread_mutex_t lock;
    void *buf[CBW_SPARE_BUFS];
    uint64_t size[CBW_SPARE_BUFS];
    uint64_t bytes;
    int n;
} spares = { .lock = PTHREAD_MUTEX_INITIALIZER };

enum on_cbw_error { BREAK_GUEST_WRITE, BREAK_SNAPSHOT };

/* A copy under way, or a snapshot read of the source, over clusters
 * [first, first+n).  Held by the list and by whoever waits on it. */
struct cbw_range {
    uint64_t first, n;
    bool read;
    bool finished;
    int ret;
    bool read_failed;             /* the copy could not read the source */
    int refs;                     /* under s->lock */
    struct cbw_range *next;
};

struct cbw {
    struct bnode *bs;             /* the filter node */
    struct bnode *source, *target;
    struct bnode_user *target_link;
    uint64_t size;                /* bytes */
    unsigned shift;               /* log2(cluster) */
    uint64_t nclusters;
    enum on_cbw_error on_error;
    uint64_t timeout_ms;          /* 0: none */
    pthread_mutex_t lock;
    struct pbitmap *need, *done, *access;
    struct cbw_range *ranges;
    struct co_queue changed;      /* a range finished (or a deadline passed) */
    int snapshot_error;
    bool active;                  /* the snapshot point is set */
    bool compress;                /* data goes to the target as compressed writes */
    int refs;                     /* atomic */
    /* inserted above the source */
    struct bnode_intercept ic;
    bool inserted;
    void (*ready)(void *opaque);
    void *ready_opaque;
    uint64_t max_run;             /* clusters per copier run */
    /* progress of a job */
    void (*progress)(void *opaque, uint64_t bytes);
    void *progress_opaque;
};

static const struct bdrv bdrv_cbw;

struct cbw *cbw_of(struct bnode *bs)
{
    return bs && bs->drv == &bdrv_cbw ? bs->opaque : NULL;
}

uint64_t cbw_cluster_size(struct cbw *s) { return 1ull << s->shift; }

/* ---- references ---- */

static void cbw_free_main(void *opaque)
{
    struct cbw *s = opaque;
    pbitmap_free(s->need);
    pbitmap_free(s->done);
    pbitmap_free(s->access);
    co_queue_destroy(&s->changed);
    pthread_mutex_destroy(&s->lock);
    bnode_unref(s->source);
    bnode_unref(s->target);
    free(s);
}

static void cbw_ref(struct cbw *s)
{
    __atomic_add_fetch(&s->refs, 1, __ATOMIC_RELAXED);
}

static void cbw_unref(struct cbw *s)
{
    if (__atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    struct loop *l = loop_current();
    if (!l || l == loop_main())
        cbw_free_main(s);         /* the main thread (its loop may be over: shutdown) */
    else
        loop_call(loop_main(), cbw_free_main, s);   /* nodes go in the main thread */
}

/* ---- clusters ---- */

static void clusters_of(struct cbw *s, uint64_t offset, uint64_t bytes,
                        uint64_t *first, uint64_t *end)
{
    *first = offset >> s->shift;
    *end = bytes ? ((offset + bytes - 1) >> s->shift) + 1 : *first;
    if (*end > s->nclusters)
        *end = s->nclusters;
}

/* A range in the list overlapping [first, end), of the given kind. */
static struct cbw_range *range_overlap(struct cbw *s, uint64_t first, uint64_t end, bool read)
{
    for (struct cbw_range *r = s->ranges; r; r = r->next)
        if (r->read == read && r->first < end && first < r->first + r->n)
            return r;
    return NULL;
}

static struct cbw_range *range_add(struct cbw *s, uint64_t first, uint64_t n, bool read)
{
    struct cbw_range *r = xzalloc(sizeof(*r));
    r->first = first;
    r->n = n;
    r->read = read;
    r->refs = 2;                  /* the list, and its owner */
    r->next = s->ranges;
    s->ranges = r;
    return r;
}

static void range_put(struct cbw_range *r)
{
    if (--r->refs == 0)
        free(r);
}

/* With the lock: take r off the list, wake everyone waiting. */
static void range_finish(struct cbw *s, struct cbw_range *r, int ret)
{
    for (struct cbw_range **p = &s->ranges; *p; p = &(*p)->next)
        if (*p == r) {
            *p = r->next;
            break;
        }
    r->finished = true;
    r->ret = ret;
    range_put(r);
    co_queue_wake_all(&s->changed);
}

/* ---- copying ---- */

struct copier {
    struct cbw *s;
    struct cbw_range *r;
    unsigned flags;               /* BREQ_COPY_INLINE: as its starter's requests */
};

/* The extent at off (cluster-aligned, before end) that copies the same
 * way, as QEMU's block_copy_block_status: whole clusters the source reads
 * as zeros (a hole, a zero cluster) are written as zeroes; anything else,
 * and an extent shorter than a cluster or a status error, is data. */
static uint64_t copy_extent(struct cbw *s, uint64_t off, uint64_t end, bool *zero)
{
    uint64_t c = cbw_cluster_size(s), pnum;
    unsigned flags;
    int depth;
    *zero = false;
    if (bnode_block_status(s->source, off, end - off, &pnum, &flags, &depth) < 0 ||
        (pnum < c && off + pnum < s->size))
        return MIN(c, end - off);
    *zero = flags & BS_ZERO;
    if (off + pnum < s->size)
        pnum -= pnum % c;
    return MIN(pnum, end - off);
}

/* A buffer of at least len bytes (*size: how many): the smallest spare
 * that fits, else a new one. */
static void *buf_get(uint64_t len, uint64_t *size)
{
    void *b = NULL;
    int best = -1;
    pthread_mutex_lock(&spares.lock);
    for (int i = 0; i < spares.n; i++)
        if (spares.size[i] >= len && (best < 0 || spares.size[i] < spares.size[best]))
            best = i;
    if (best >= 0) {
        b = spares.buf[best];
        *size = spares.size[best];
        spares.bytes -= *size;
        spares.n--;
        spares.buf[best] = spares.buf[spares.n];
        spares.size[best] = spares.size[spares.n];
    }
    pthread_mutex_unlock(&spares.lock);
    if (!b) {
        b = xmalloc_io(len);
        *size = len;
    }
    return b;
}

/* Keep b for another copy (within CBW_SPARE_BUFS and CBW_SPARE_BYTES), in
 * place of a smaller spare if need be. */
static void buf_put(void *b, uint64_t size)
{
    pthread_mutex_lock(&spares.lock);
    if (spares.n < CBW_SPARE_BUFS && spares.bytes + size <= CBW_SPARE_BYTES) {
        spares.buf[spares.n] = b;
        spares.size[spares.n++] = size;
        spares.bytes += size;
        b = NULL;
    } else if (spares.n) {
        int small = 0;
        for (int i = 1; i < spares.n; i++)
            if (spares.size[i] < spares.size[small])
                small = i;
        if (spares.size[small] < size &&
            spares.bytes - spares.size[small] + size <= CBW_SPARE_BYTES) {
            void *old = spares.buf[small];
            spares.bytes += size - spares.size[small];
            spares.buf[small] = b;
            spares.size[small] = size;
            b = old;
        }
    }
    pthread_mutex_unlock(&spares.lock);
    free(b);
}

/* Copy [off, end) of the source to the target; *read_failed: the error
 * came from the source.  Every write passes a hold: a held guest write may
 * be waiting for this copy. */
static int copy_data(struct cbw *s, uint64_t off, uint64_t end, unsigned flags,
                     bool *read_failed)
{
    void *buf = NULL;
    uint64_t bufsize = 0;
    int ret = 0;
    *read_failed = false;
    while (ret == 0 && off < end) {
        bool zero;
        uint64_t n = copy_extent(s, off, end, &zero);
        if (zero) {
            /* never compressed, and no unmap: QEMU's write flags */
            ret = bnode_co_pwrite_zeroes(s->target, off, n, 0);
        } else {
            if (!buf)
                buf = buf_get(end - off, &bufsize);
            ret = bnode_co_pread(s->source, off, n, buf, flags);
            *read_failed = ret < 0;
            if (ret == 0)
                ret = bnode_co_pwrite(s->target, off, n, buf, flags |
                                      (s->compress ? BREQ_WRITE_COMPRESSED : 0));
        }
        off += n;
    }
    if (buf)
        buf_put(buf, bufsize);
    return ret;
}

/* A coroutine: copy the clusters of one claimed range. */
static void copier_co(void *opaque)
{
    struct copier *c = opaque;
    struct cbw *s = c->s;
    struct cbw_range *r = c->r;
    uint64_t off = r->first << s->shift;
    uint64_t len = MIN(r->n << s->shift, s->size - off);
    bool read_failed;
    int ret = copy_data(s, off, off + len, c->flags, &read_failed);

    pthread_mutex_lock(&s->lock);
    if (ret == 0) {
        pbitmap_clear_range(s->need, r->first, r->n);
        pbitmap_set_range(s->done, r->first, r->n);
    }
    r->read_failed = read_failed;
    range_finish(s, r, ret);
    range_put(r);
    pthread_mutex_unlock(&s->lock);
    if (ret == 0 && s->progress)
        s->progress(s->progress_opaque, len);
    free(c);
    cbw_unref(s);
}

/* With the lock: claim the first run (at most max_run clusters) of needed
 * clusters in [first, end) that nobody is copying; *cp is its copier, to
 * start once the lock is released.  false if every needed cluster there is
 * being copied already (or none is needed). */
static bool claim(struct cbw *s, uint64_t first, uint64_t end, uint64_t max_run,
                  unsigned flags, struct copier **cp)
{
    uint64_t c = pbitmap_next_set(s->need, first, end);
    while (c < end) {
        struct cbw_range *busy = range_overlap(s, c, c + 1, false);
        if (!busy)
            break;
        c = pbitmap_next_set(s->need, busy->first + busy->n, end);
    }
    if (c >= end)
        return false;
    uint64_t z = pbitmap_next_clear(s->need, c, MIN(end, c + max_run));
    for (struct cbw_range *o = s->ranges; o; o = o->next)   /* stop before the next copy */
        if (!o->read && o->first > c && o->first < z)
            z = o->first;
    struct cbw_range *r = range_add(s, c, z - c, false);   /* the owner's ref: the copier's */
    *cp = xmalloc(sizeof(**cp));
    (*cp)->s = s;
    (*cp)->r = r;
    (*cp)->flags = flags & BREQ_COPY_INLINE;
    cbw_ref(s);
    return true;
}

static void wake_on_deadline(void *opaque)
{
    struct cbw *s = opaque;
    co_queue_wake_all(&s->changed);
}

/* With the lock, in a coroutine: copy what [first, end) still needs and
 * wait for copies already under way there.  0, or the first copy error
 * (*read_failed: of the source), or -ETIMEDOUT past deadline_ms (0: none). */
static int copy_range_locked(struct cbw *s, uint64_t first, uint64_t end, uint64_t deadline_ms,
                             unsigned flags, bool *read_failed)
{
    struct loop_timer *t = NULL;
    int ret = 0;
    /* the copies this call started: a failed one ends the call with its
     * error even if it finished before we came to wait for it (else its
     * clusters, still needed, would be claimed again and again) */
    struct cbw_range **mine = NULL;
    size_t nmine = 0, cap = 0;

    if (read_failed)
        *read_failed = false;
    for (;;) {
        struct copier *cp;
        for (size_t i = 0; i < nmine; i++)
            if (mine[i]->finished && mine[i]->ret < 0) {
                ret = mine[i]->ret;
                if (read_failed)
                    *read_failed = mine[i]->read_failed;
                goto out;
            }
        if (s->snapshot_error)
            break;                /* broken snapshot: nothing to protect */
        if (claim(s, first, end, s->max_run, flags, &cp)) {
            if (nmine == cap) {
                cap = cap ? 2 * cap : 8;
                mine = xrealloc(mine, cap * sizeof(*mine));
            }
            cp->r->refs++;
            mine[nmine++] = cp->r;
            /* the copier takes the lock when it ends: start it without it */
            pthread_mutex_unlock(&s->lock);
            co_enter(co_create(copier_co, cp));
            pthread_mutex_lock(&s->lock);
            continue;             /* waited for below, like anyone's copy */
        }
        if (pbitmap_next_set(s->need, first, end) >= end)
            break;                /* all copied */
        /* the remaining clusters are being copied: wait for one to end */
        struct cbw_range *busy = range_overlap(s, first, end, false);
        if (!busy)
            continue;             /* one of ours just failed: seen above */
        busy->refs++;
        if (deadline_ms && !t) {
            t = loop_timer_new(loop_current(), wake_on_deadline, s);
            loop_timer_arm(t, deadline_ms > now_ms() ? deadline_ms - now_ms() : 0);
        }
        while (!busy->finished && !(deadline_ms && now_ms() >= deadline_ms))
            co_queue_wait(&s->changed, &s->lock);
        int r = busy->finished ? busy->ret : -ETIMEDOUT;
        if (read_failed)
            *read_failed = busy->finished && busy->read_failed;
        range_put(busy);
        if (r < 0) {
            ret = r;
            break;
        }
    }
out:
    /* an error ends the call early: our other copies still run, and the
     * caller (a job about to fail and go) must not outlive them */
    for (size_t i = 0; i < nmine; i++) {
        while (!mine[i]->finished)
            co_queue_wait(&s->changed, &s->lock);
        range_put(mine[i]);
    }
    free(mine);
    if (t)
        loop_timer_free(t);
    return ret;
}

/* ---- writes ---- */

struct cbw_write {
    struct cbw *s;
    struct breq *req;
    uint64_t offset;
    bool intercepted;
};

static void forward(struct cbw *s, struct breq *req, uint64_t offset, bool intercepted)
{
    if (intercepted)
        bnode_submit_driver(s->source, req, offset);
    else
        bnode_submit_child(s->source, req, offset);
}

static void write_co(void *opaque)
{
    struct cbw_write *w = opaque;
    struct cbw *s = w->s;
    uint64_t first, end;
    int ret;

    clusters_of(s, w->offset, w->req->len, &first, &end);
    pthread_mutex_lock(&s->lock);
    ret = copy_range_locked(s, first, end, s->timeout_ms ? now_ms() + s->timeout_ms : 0,
                            w->req->flags, NULL);
    if (ret < 0 && s->on_error == BREAK_SNAPSHOT) {
        if (!s->snapshot_error)
            s->snapshot_error = ret;
        co_queue_wake_all(&s->changed);
        ret = 0;
    }
    if (ret == 0)                 /* never change what a snapshot reader is reading */
        while (range_overlap(s, first, end, true))
            co_queue_wait(&s->changed, &s->lock);
    pthread_mutex_unlock(&s->lock);
    if (ret < 0)
        breq_complete(w->req, ret);
    else
        forward(s, w->req, w->offset, w->intercepted);
    cbw_unref(s);
    free(w);
}

static void cbw_write(struct cbw *s, struct breq *req, uint64_t offset, bool intercepted)
{
    uint64_t first, end;
    bool fast;

    clusters_of(s, offset, req->len, &first, &end);
    pthread_mutex_lock(&s->lock);
    fast = s->snapshot_error || !s->active ||
           (pbitmap_next_set(s->need, first, end) >= end &&
            !range_overlap(s, first, end, true));
    pthread_mutex_unlock(&s->lock);
    if (fast) {
        forward(s, req, offset, intercepted);
        return;
    }
    struct cbw_write *w = xmalloc(sizeof(*w));
    *w = (struct cbw_write){ .s = s, .req = req, .offset = offset, .intercepted = intercepted };
    cbw_ref(s);
    co_enter(co_create(write_co, w));
}

static void cbw_submit(struct bnode *bs, struct breq *req, uint64_t offset)
{
    struct cbw *s = bs->opaque;
    if (req->op == BREQ_WRITE || req->op == BREQ_WRITE_ZEROES || req->op == BREQ_DISCARD)
        cbw_write(s, req, offset, false);
    else
        bnode_submit_child(bs->file, req, offset);
}

static void intercept_submit(struct bnode_intercept *ic, struct bnode *bs, struct breq *req,
                             uint64_t offset)
{
    cbw_write(container_of(ic, struct cbw, ic), req, offset, true);
}

/* ---- the snapshot view ---- */

int cbw_co_snapshot_read(struct cbw *s, uint64_t offset, uint64_t bytes, void *buf,
                         unsigned flags)
{
    char *p = buf;

    while (bytes) {
        uint64_t first, end, run_end;
        struct bnode *from;
        struct cbw_range *reading = NULL;

        clusters_of(s, offset, bytes, &first, &end);
        pthread_mutex_lock(&s->lock);
        while (!s->active && !s->snapshot_error)
            co_queue_wait(&s->changed, &s->lock);
        if (s->snapshot_error || pbitmap_next_clear(s->access, first, end) < end) {
            pthread_mutex_unlock(&s->lock);
            return -EACCES;
        }
        if (pbitmap_get(s->done, first)) {
            run_end = pbitmap_next_clear(s->done, first, end);
            from = s->target;
        } else {
            run_end = pbitmap_next_set(s->done, first, end);
            from = s->source;
            reading = range_add(s, first, run_end - first, true);
        }
        pthread_mutex_unlock(&s->lock);
        uint64_t n = MIN(bytes, (run_end << s->shift) - offset);
        int ret = bnode_co_pread(from, offset, n, p, flags);
        if (reading) {
            pthread_mutex_lock(&s->lock);
            range_finish(s, reading, 0);
            range_put(reading);
            pthread_mutex_unlock(&s->lock);
        }
        if (ret < 0)
            return ret;
        offset += n;
        p += n;
        bytes -= n;
    }
    return 0;
}

int cbw_snapshot_block_status(struct cbw *s, uint64_t offset, uint64_t bytes,
                              uint64_t *pnum, unsigned *flags)
{
    uint64_t first, end, run_end;
    bool done;
    int depth;

    clusters_of(s, offset, bytes, &first, &end);
    pthread_mutex_lock(&s->lock);
    if (s->snapshot_error || !pbitmap_get(s->access, first)) {
        pthread_mutex_unlock(&s->lock);
        return -EACCES;
    }
    done = pbitmap_get(s->done, first);
    run_end = done ? pbitmap_next_clear(s->done, first, end) : pbitmap_next_set(s->done, first, end);
    run_end = MIN(run_end, pbitmap_next_clear(s->access, first, end));
    pthread_mutex_unlock(&s->lock);
    bytes = MIN(bytes, (run_end << s->shift) - offset);
    if (done) {                   /* copied: the target holds it (data, or zeroes) */
        int ret = bnode_block_status(s->target, offset, bytes, pnum, flags, &depth);
        if (ret == 0)
            *flags |= BS_ALLOCATED;   /* never "see the layer below" */
        return ret;
    }
    return bnode_block_status(s->source, offset, bytes, pnum, flags, &depth);
}

int cbw_co_snapshot_discard(struct cbw *s, uint64_t offset, uint64_t bytes)
{
    uint64_t c = cbw_cluster_size(s);
    uint64_t a = (offset + c - 1) / c * c;
    uint64_t z = MIN(offset + bytes, s->size);
    z = z == s->size ? z : z / c * c;
    if (z <= a)
        return 0;
    pthread_mutex_lock(&s->lock);
    uint64_t first, end;
    clusters_of(s, a, z - a, &first, &end);
    pbitmap_clear_range(s->access, first, end - first);
    pbitmap_clear_range(s->need, first, end - first);    /* nobody will read it */
    pthread_mutex_unlock(&s->lock);
    return bnode_co_pdiscard(s->target, a, z - a);
}

/* ---- the copy engine, for backup jobs ---- */

/* A job's copies run in its loop (the main loop), which only waits for
 * them: copies of RAM-backed images are done there (BREQ_COPY_INLINE)
 * rather than handed to the worker pool and back, two thread switches per
 * read and per write that a loaded machine makes slow. */
#define JOB_COPY_FLAGS BREQ_COPY_INLINE

void cbw_set_need(struct cbw *s, uint64_t offset, uint64_t bytes, bool need)
{
    uint64_t first, end;
    clusters_of(s, offset, bytes, &first, &end);
    pthread_mutex_lock(&s->lock);
    if (need)
        pbitmap_set_range(s->need, first, end - first);
    else
        pbitmap_clear_range(s->need, first, end - first);
    pbitmap_clear_all(s->access);
    pbitmap_merge(s->access, s->need);
    pthread_mutex_unlock(&s->lock);
}

void cbw_need_from_bitmap(struct cbw *s, struct dirty_bitmap *bm)
{
    pthread_mutex_lock(&s->lock);
    pbitmap_clear_all(s->need);
    dirty_bitmaps_lock(bm->bs);
    uint64_t off = 0, len;
    while (dirty_bitmap_next_dirty_area_locked(bm, &off, bm->size, UINT64_MAX, &len)) {
        uint64_t first, end;
        clusters_of(s, off, len, &first, &end);
        pbitmap_set_range(s->need, first, end - first);
        off += len;
    }
    dirty_bitmaps_unlock(bm->bs);
    pbitmap_clear_all(s->access);
    pbitmap_merge(s->access, s->need);
    pthread_mutex_unlock(&s->lock);
}

/* QEMU keeps this state in anonymous, disabled dirty bitmaps of the
 * cluster's granularity, which query-named-block-nodes lists: block-copy's
 * copy bitmap on the source; the filter's done and access bitmaps on the
 * filter node itself (newest first: access, done). */
static void bitmap_entry(json_t *list, struct cbw *s, struct pbitmap *b)
{
    json_array_append_new(list, json_pack("{s:b, s:b, s:b, s:I, s:I}",
                                          "recording", 0, "persistent", 0, "busy", 0,
                                          "granularity", (json_int_t)cbw_cluster_size(s),
                                          "count", (json_int_t)(pbitmap_count(b) << s->shift)));
}

void cbw_query_bitmaps(struct cbw *s, bool filter_node, json_t *list)
{
    pthread_mutex_lock(&s->lock);
    if (filter_node) {
        bitmap_entry(list, s, s->access);
        bitmap_entry(list, s, s->done);
    } else {
        bitmap_entry(list, s, s->need);
    }
    pthread_mutex_unlock(&s->lock);
}

uint64_t cbw_need_bytes(struct cbw *s)
{
    pthread_mutex_lock(&s->lock);
    uint64_t n = pbitmap_count(s->need);
    bool last = n && pbitmap_get(s->need, s->nclusters - 1);
    pthread_mutex_unlock(&s->lock);
    uint64_t bytes = n << s->shift;
    if (last && s->size % cbw_cluster_size(s))   /* the short last cluster */
        bytes -= cbw_cluster_size(s) - s->size % cbw_cluster_size(s);
    return bytes;
}

uint64_t cbw_next_need(struct cbw *s, uint64_t offset)
{
    pthread_mutex_lock(&s->lock);
    uint64_t c = pbitmap_next_set(s->need, offset >> s->shift, s->nclusters);
    pthread_mutex_unlock(&s->lock);
    return c >= s->nclusters ? s->size : MAX(offset, c << s->shift);
}

int cbw_co_copy(struct cbw *s, uint64_t offset, uint64_t bytes, bool *error_is_read)
{
    uint64_t first, end;
    clusters_of(s, offset, bytes, &first, &end);
    bool read_failed = false;
    pthread_mutex_lock(&s->lock);
    int ret = copy_range_locked(s, first, end, 0, JOB_COPY_FLAGS, &read_failed);
    pthread_mutex_unlock(&s->lock);
    if (error_is_read)
        *error_is_read = read_failed;
    return ret;
}

/* ---- a backup job's copies, at most max_workers at a time ---- */

struct cbw_call {
    struct cbw_range **r;         /* started, not yet reaped (each holds a ref) */
    size_t n, cap;
    size_t max_workers;
    uint64_t max_run;             /* clusters per copy (max-chunk) */
    int ret;                      /* the first error of a reaped copy */
    bool read_failed;
};

struct cbw_call *cbw_call_new(struct cbw *s, unsigned max_workers, uint64_t max_chunk)
{
    struct cbw_call *call = xzalloc(sizeof(*call));
    call->max_run = s->max_run;
    if (max_chunk)
        call->max_run = MAX(1, MIN(call->max_run, max_chunk >> s->shift));
    /* No more buffers in flight than the spares keep: past that, every copy
     * maps a fresh buffer and unmaps one (page faults, TLB shootdowns).  A
     * target that completes at once never gets there; an NBD target did:
     * 64 copies of 1 MiB in flight backed up 512 MiB in 1.5 s, 8 in 0.17 s. */
    uint64_t fit = CBW_SPARE_BYTES / (call->max_run << s->shift);
    call->max_workers = MAX(1u, MIN((uint64_t)max_workers, fit));
    return call;
}

/* With the lock: drop the call's finished copies, keeping the first error. */
static void call_reap(struct cbw_call *call)
{
    size_t k = 0;
    for (size_t i = 0; i < call->n; i++) {
        struct cbw_range *r = call->r[i];
        if (!r->finished) {
            call->r[k++] = r;
            continue;
        }
        if (r->ret < 0 && call->ret == 0) {
            call->ret = r->ret;
            call->read_failed = r->read_failed;
        }
        range_put(r);
    }
    call->n = k;
}

/* With the lock: wait for every copy of the call; its first error (and
 * then the call starts afresh). */
static int call_drain_locked(struct cbw *s, struct cbw_call *call, bool *read_failed)
{
    for (;;) {
        call_reap(call);
        if (!call->n)
            break;
        co_queue_wait(&s->changed, &s->lock);
    }
    int ret = call->ret;
    if (read_failed)
        *read_failed = ret < 0 && call->read_failed;
    call->ret = 0;
    call->read_failed = false;
    return ret;
}

int cbw_co_call_drain(struct cbw *s, struct cbw_call *call, bool *error_is_read)
{
    pthread_mutex_lock(&s->lock);
    int ret = call_drain_locked(s, call, error_is_read);
    pthread_mutex_unlock(&s->lock);
    return ret;
}

int cbw_co_copy_async(struct cbw *s, struct cbw_call *call, uint64_t offset, uint64_t bytes,
                      bool *error_is_read)
{
    uint64_t first, end;
    int ret = 0;

    clusters_of(s, offset, bytes, &first, &end);
    if (error_is_read)
        *error_is_read = false;
    pthread_mutex_lock(&s->lock);
    while (first < end && !s->snapshot_error) {
        struct copier *cp;
        call_reap(call);
        if (call->ret < 0)
            break;                /* a copy failed: stop, report it below */
        if (call->n >= call->max_workers) {
            co_queue_wait(&s->changed, &s->lock);
            continue;
        }
        /* clusters someone else copies are theirs: not waited for here */
        if (!claim(s, first, end, call->max_run, JOB_COPY_FLAGS, &cp))
            break;
        first = cp->r->first + cp->r->n;
        if (call->n == call->cap) {
            call->cap = call->cap ? 2 * call->cap : 16;
            call->r = xrealloc(call->r, call->cap * sizeof(*call->r));
        }
        cp->r->refs++;
        call->r[call->n++] = cp->r;
        pthread_mutex_unlock(&s->lock);
        co_enter(co_create(copier_co, cp));
        pthread_mutex_lock(&s->lock);
    }
    if (call->ret < 0)            /* nothing of the call outlives its error */
        ret = call_drain_locked(s, call, error_is_read);
    pthread_mutex_unlock(&s->lock);
    return ret;
}

void cbw_call_free(struct cbw *s, struct cbw_call *call)
{
    if (!call)
        return;
    cbw_co_call_drain(s, call, NULL);
    free(call->r);
    free(call);
}

void cbw_set_compress(struct cbw *s, bool compress)
{
    s->compress = compress;
}

void cbw_set_progress(struct cbw *s, void (*fn)(void *opaque, uint64_t bytes), void *opaque)
{
    s->progress_opaque = opaque;
    s->progress = fn;
}

/* ---- inserting above the source ---- */

static void inserted_ready(void *opaque)
{
    struct cbw *s = opaque;
    pthread_mutex_lock(&s->lock);
    s->active = true;             /* the snapshot point */
    co_queue_wake_all(&s->changed);
    pthread_mutex_unlock(&s->lock);
    __atomic_store_n(&s->source->intercept, &s->ic, __ATOMIC_RELEASE);
    block_writes_release();
    if (s->ready)
        s->ready(s->ready_opaque);
    cbw_unref(s);
}

void cbw_insert(struct bnode *fbs, void (*ready)(void *opaque), void *opaque)
{
    struct cbw *s = cbw_of(fbs);
    s->active = false;
    s->inserted = true;
    s->ready = ready;
    s->ready_opaque = opaque;
    cbw_ref(s);
    block_writes_hold(inserted_ready, s);
}

void cbw_remove(struct bnode *fbs)
{
    struct cbw *s = cbw_of(fbs);
    if (!s || !s->inserted)
        return;
    if (__atomic_load_n(&s->source->intercept, __ATOMIC_ACQUIRE) == &s->ic)
        __atomic_store_n(&s->source->intercept, NULL, __ATOMIC_RELEASE);
    s->inserted = false;
}

/* ---- the driver ---- */

static int cbw_open(struct bnode *bs, json_t *opts, error **errp)
{
    json_t *bitmap = json_object_get(opts, "bitmap");
    struct dirty_bitmap *bm = NULL;

    if (bitmap) {
        bm = dirty_bitmap_lookup(opt_str(bitmap, "node", ""), opt_str(bitmap, "name", ""),
                                 NULL, errp);
        if (!bm)
            return -1;
    }
    struct bnode *target = bnode_open_child(json_object_get(opts, "target"), bs, false, errp);
    if (!target)
        return -1;
    struct cbw *s = xzalloc(sizeof(*s));
    s->bs = bs;
    s->source = bs->file;
    s->target = target;           /* our reference, until the state goes */
    bnode_ref(s->source);
    s->target_link = bnode_attach_child(bs, target, "target", errp);
    if (!s->target_link ||
        bnode_user_set_perm(s->target_link, PERM_WRITE, PERM_ALL & ~PERM_RESIZE, errp) < 0) {
        if (s->target_link)
            bnode_detach(s->target_link);
        bnode_unref(s->source);
        bnode_unref(target);
        free(s);
        return -1;
    }
    s->size = bs->file->size;
    /* QEMU's block-copy cluster: 64 KiB, or the target's cluster if larger
     * (a copy never writes part of a target cluster: no copy-on-write
     * there, and compressed writes need whole clusters) */
    uint64_t cluster = CBW_CLUSTER;
    uint32_t tcs = target->drv->cluster_size ? target->drv->cluster_size(target) : 0;
    if (tcs > cluster && !(tcs & (tcs - 1)))
        cluster = tcs;
    s->shift = (unsigned)__builtin_ctzll(cluster);
    s->nclusters = (s->size + cluster - 1) / cluster;
    s->max_run = MAX(1, CBW_MAX_COPY >> s->shift);
    const char *e = opt_str(opts, "on-cbw-error", "break-guest-write");
    s->on_error = !strcmp(e, "break-snapshot") ? BREAK_SNAPSHOT : BREAK_GUEST_WRITE;
    s->timeout_ms = (uint64_t)opt_int(opts, "cbw-timeout", 0) * 1000;
    pthread_mutex_init(&s->lock, NULL);
    co_queue_init(&s->changed);
    s->need = pbitmap_new(s->nclusters);
    s->done = pbitmap_new(s->nclusters);
    s->access = pbitmap_new(s->nclusters);
    if (!s->need || !s->done || !s->access)
        abort();                  /* a few bits per 64 KiB: only a broken system fails here */
    pbitmap_set_all(s->need);
    s->active = true;
    s->refs = 1;
    s->ic.submit = intercept_submit;
    bs->opaque = s;
    bs->size = s->size;
    if (bm)
        cbw_need_from_bitmap(s, bm);
    else
        pbitmap_set_all(s->access);
    return 0;
}

static void cbw_close(struct bnode *bs)
{
    struct cbw *s = bs->opaque;
    if (!s)
        return;
    cbw_remove(bs);
    bnode_detach(s->target_link);
    bs->opaque = NULL;
    cbw_unref(s);
}

/* QEMU's cbw_child_perm: once the filter has users, nobody else may write
 * its source behind its back.  A filter inserted above its source (a backup
 * job's) sees every write of the source's users, so they keep writing. */
static void cbw_child_perm(struct bnode *bs, uint64_t *perm, uint64_t *shared)
{
    struct cbw *s = bs->opaque;
    if (s && s->inserted)         /* a backup job's: its size is fixed */
        *shared &= ~PERM_RESIZE;
    if (bs->users && !(s && s->inserted)) {
        /* QEMU: the users' permissions, consistent reads added for writes
         * (which the filter copies out first) */
        uint64_t users = 0;
        for (struct bnode_user *u = bs->users; u; u = u->next)
            users |= u->perm;
        if (!(users & (PERM_WRITE | PERM_CONSISTENT_READ)))
            *perm &= ~PERM_CONSISTENT_READ;
        *shared &= ~(PERM_WRITE | PERM_RESIZE);
    }
}

static const struct bdrv bdrv_cbw = {
    .filename_rule = FNAME_FILE_CHILD,
    .name = "copy-before-write",
    .is_filter = true,
    .open = cbw_open,
    .close = cbw_close,
    .submit = cbw_submit,
    .block_status = bnode_filter_block_status,
    .child_perm = cbw_child_perm,
};
BDRV_REGISTER(bdrv_cbw)
