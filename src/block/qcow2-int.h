/*
 * qcow2 driver internals, shared by qcow2.c (open, options, queries),
 * qcow2-meta.c (metadata caches, refcounts, allocation, corruption) and
 * qcow2-io.c (requests, block status).
 *
 * Locks.  Two, always taken in this order:
 *   lock        co_mutex, held by coroutines across I/O while they read or
 *               change metadata (QEMU's s->lock): cache misses, allocation,
 *               refcounts, L1/L2 updates, flushing metadata.
 *   cache_lock  a short pthread mutex over the in-memory state that the
 *               lock-free fast path reads: the L1 table, the cache slot
 *               table and L2 slice contents, in-flight counters, the list
 *               of guest ranges being changed.  Never held across I/O.
 * A fast-path request translates under cache_lock only; everything that
 * changes a mapping does so under both.
 *
 * In-flight data I/O and freed clusters.  A host cluster whose mapping is
 * removed (discard, zero with unmap, a rewritten compressed cluster) may
 * still be read or written by a request that translated before.  Data I/O
 * counts itself in one of two slots (inflight[cur_slot]) between its
 * translation and its completion; freed clusters wait in `pending` until a
 * metadata flush made the mapping change durable, then in `draining` until
 * the slot that was current before a flip has emptied, and only then lose
 * their reference (and may be reused).  So a cluster is never reused while
 * I/O that found it is in flight, and never freed on disk while an L2
 * entry on disk still points at it.
 */
#pragma once
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include "block/block.h"
#include "block/qcow2.h"
#include "util/coroutine.h"

/* Metadata reads and writes (cache entries, new L2 tables) run with the image lock held, so
 * every request of the image waits for them: on a RAM-backed file they are
 * done in the caller's loop (BREQ_COPY_INLINE) rather than handed to the
 * worker pool.  A write-back that waited for the pool while holding the lock
 * queued the next copies of a backup job behind it, and the queue then
 * handed the lock from coroutine to coroutine through the loop for the
 * rest of the job (twice the CPU of the same copies one after another). */
#define QCOW2_META_IO BREQ_COPY_INLINE

/* One cached table slice (an L2 slice or a refcount block). */
struct qcache_entry {
    uint64_t offset;         /* host offset; 0 = free slot */
    int pins;                /* coroutines using it */
    bool dirty;
    bool loading;            /* being read: not usable yet */
    uint64_t lru;
    int hnext;               /* hash chain, -1 = end */
};

struct qcache {
    const char *name;
    uint32_t entry_size;
    int n;
    struct qcache_entry *e;
    uint8_t *mem;
    int *hash;               /* nbuckets heads */
    int nbuckets;
    uint64_t clock;
    uint64_t clean_clock;    /* clock at the last cache-clean-interval tick */
    int ndirty;
    struct co_queue waitq;   /* coroutines waiting for a slot or a load */
};

/* A guest cluster range being changed by a coroutine (write, zero, discard). */
struct qrange {
    uint64_t start, end;     /* guest clusters [start, end) */
    struct co_queue waiters;
    struct qrange *next;
};

struct qfree {
    uint64_t offset;         /* host cluster */
    uint64_t nb;             /* clusters */
    int discard_type;        /* QFREE_* */
    bool external;           /* a range of the data file: only discarded */
    struct qfree *next;
};
/* Why a cluster is freed, as QEMU's discard types: whether the file is
 * told (discarded) follows the pass-discard-* options; ALWAYS = truncate. */
enum { QFREE_NEVER, QFREE_ALWAYS, QFREE_REQUEST, QFREE_SNAPSHOT, QFREE_OTHER, QFREE__MAX };

enum qcow2_overlap_bits {
    QOL_MAIN_HEADER = 1 << 0,
    QOL_ACTIVE_L1 = 1 << 1,
    QOL_ACTIVE_L2 = 1 << 2,
    QOL_REFCOUNT_TABLE = 1 << 3,
    QOL_REFCOUNT_BLOCK = 1 << 4,
    QOL_SNAPSHOT_TABLE = 1 << 5,
    QOL_INACTIVE_L1 = 1 << 6,
    QOL_INACTIVE_L2 = 1 << 7,
    QOL_BITMAP_DIRECTORY = 1 << 8,
};

struct qsnapshot {
    struct bsnapshot info;           /* what QMP lists */
    uint64_t l1_table_offset;
    uint32_t l1_size;
    uint64_t disk_size;              /* the image's size when it was taken */
    uint8_t *extra_unknown;          /* extra data past the known fields, kept */
    uint32_t extra_unknown_size;
};

struct qcow2_state {
    struct bnode *bs;
    struct bnode *data;              /* where guest data lives: file or data-file */
    struct bnode_user *data_link;    /* external data file link */
    struct bnode_user *backing_link;
    bool data_file_raw;
    char *data_file_name;            /* from the header extension */

    /* header */
    uint32_t version;
    uint32_t cluster_bits;
    uint64_t cluster_size;
    uint64_t size;
    uint64_t incompat, compat, autoclear;
    uint32_t refcount_order;
    uint32_t header_length;
    uint8_t compression_type;
    bool extl2;
    uint32_t l2_bits;                /* log2(entries per L2 table) */
    uint64_t l2_entries;
    uint32_t l2_entry_bytes;         /* 8, or 16 with extended L2 */
    uint64_t subcluster_size;
    uint32_t subcluster_bits;
    uint64_t csize_shift, csize_mask, coffset_mask;
    bool lazy_refcounts;
    bool corrupt;                    /* found inconsistent: read-only from now on */
    bool signaled_corruption;
    bool metadata_preallocation;     /* block status asks the file about holes */

    char *backing_file;              /* as in the header */
    char *backing_fmt;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset, snapshots_size;
    struct qsnapshot *snapshots;
    uint64_t bitmap_dir_offset, bitmap_dir_size;
    uint32_t nb_bitmaps;
    struct qbm *bitmaps;             /* the bitmap directory (qcow2-bitmap.c) */
    uint64_t bm_gen, bm_gen_done;    /* sets of bitmaps wanted: taken, written */
    bool bm_catch_up;                /* a write of the directory is scheduled */
    uint64_t unknown_ext_end;        /* end of the header extensions */

    /* L1 (host order) */
    uint64_t *l1;
    uint32_t l1_size;
    uint64_t l1_offset;

    /* refcount table (host order) */
    uint64_t *reftable;
    uint64_t reftable_size;          /* entries */
    uint64_t reftable_offset;
    uint32_t reftable_clusters;
    uint64_t rb_entries;             /* refcounts per block */
    uint32_t rb_bits;                /* log2(rb_entries) */
    uint64_t refcount_max;
    uint64_t free_cluster_index;     /* search hint */
    uint64_t alloc_end;              /* clusters handed out end below this */
    bool last_alloc_fresh;           /* the last allocation was past alloc_end: never
                                      * written, reads as zeros */
    uint64_t free_byte_offset;       /* compressed clusters: where the next one may
                                      * start, inside a cluster they share; 0 = none */
    uint64_t grown_to;               /* an O_DIRECT file grown ahead of the clusters
                                      * handed out to this length (qcow2-io.c), 0 = not;
                                      * bs->file->size stays what was written */

    /* options */
    unsigned overlap;                /* QOL_* checked before writes */
    bool discard_passthrough[QFREE__MAX];
    uint64_t l2_cache_size, refcount_cache_size, l2_slice_size;
    uint64_t cache_clean_interval;   /* seconds, 0 = never */
    struct loop_timer *clean_timer;  /* main loop */

    /* caches */
    struct qcache l2c, rbc;
    uint64_t l2_slice_entries;

    /* concurrency */
    struct co_mutex lock;
    pthread_mutex_t cache_lock;
    unsigned inflight[2];            /* atomic */
    int cur_slot;
    struct qrange *ranges;
    struct qfree *pending, *draining;
    int draining_slot;

    /* metadata overlap check: host clusters holding metadata */
    uint64_t *meta_set;              /* open addressing hash of cluster indexes (+1) */
    uint64_t meta_cap, meta_count;
};

/* Subcluster types, as QEMU names them. */
enum qtype {
    QT_UNALLOC,           /* no host cluster: backing or zeros */
    QT_UNALLOC_ALLOC,     /* extl2: host cluster, subcluster not allocated */
    QT_ZERO,              /* reads as zeros, no host cluster */
    QT_ZERO_ALLOC,        /* reads as zeros, host cluster kept */
    QT_NORMAL,
    QT_COMPRESSED,
    QT_INVALID,
};

static inline uint64_t qoffset_into_cluster(const struct qcow2_state *s, uint64_t o)
{
    return o & (s->cluster_size - 1);
}
static inline uint64_t qstart_of_cluster(const struct qcow2_state *s, uint64_t o)
{
    return o & ~(s->cluster_size - 1);
}
static inline uint64_t qsize_to_clusters(const struct qcow2_state *s, uint64_t n)
{
    return (n + s->cluster_size - 1) >> s->cluster_bits;
}

/* ---- qcow2-meta.c ---- */
int  qcache_init(struct qcache *c, const char *name, uint32_t entry_size, int n);
void qcache_free(struct qcache *c);
uint8_t *qcache_data(struct qcache *c, int idx);
/* Under cache_lock: the slot holding offset, ready, or -1. */
int  qcache_find(struct qcache *c, uint64_t offset);
/* Coroutine, with s->lock: load (or find) the slice at offset and pin it. */
int  qcache_get(struct qcow2_state *s, struct qcache *c, uint64_t offset, bool read_it, int *idx);
void qcache_put(struct qcow2_state *s, struct qcache *c, int idx);
void qcache_mark_dirty(struct qcow2_state *s, struct qcache *c, int idx);
/* Under cache_lock: a fast-path reader used slot idx. */
static inline void qcache_touch(struct qcache *c, int idx) { c->e[idx].lru = ++c->clock; }
/* Drop the clean, unpinned entries not used since the last call, and give
 * their memory back (cache-clean-interval); returns how many. */
int  qcache_clean_unused(struct qcow2_state *s, struct qcache *c);
/* Forget the unpinned entries of a freed table at [offset, offset+len),
 * dirty or not (the cluster may come back as another table). */
void qcache_drop(struct qcow2_state *s, struct qcache *c, uint64_t offset, uint64_t len);
/* Write every dirty entry of c (refcounts first if c is the L2 cache). */
int  qcache_flush(struct qcow2_state *s, struct qcache *c);

/* Refcounts (coroutine, s->lock held) */
int  qcow2_get_refcount(struct qcow2_state *s, uint64_t cluster_index, uint64_t *ref);
int  qcow2_update_refcount(struct qcow2_state *s, uint64_t offset, uint64_t length,
                           int64_t addend);
/* Allocate n contiguous clusters (refcount 1); returns the host offset or -errno. */
int64_t qcow2_alloc_clusters(struct qcow2_state *s, uint64_t n);
/* Allocate size bytes (<= a cluster) for a compressed cluster, packed
 * after the previous one (QEMU's qcow2_alloc_bytes): every host cluster
 * the bytes touch gains a reference.  Returns the host offset or -errno. */
int64_t qcow2_alloc_bytes(struct qcow2_state *s, uint64_t size);
/* Queue clusters whose mapping was just removed (see the file comment). */
void qcow2_free_deferred(struct qcow2_state *s, uint64_t offset, uint64_t nb, int type);
/* A data file cluster whose mapping was removed: discarded later (no
 * refcount), if the pass-discard option of type says so. */
void qcow2_free_deferred_external(struct qcow2_state *s, uint64_t offset, int type);
/* After a metadata flush: move pending frees on; release the drained ones. */
int  qcow2_process_frees(struct qcow2_state *s, bool flushed);
int  qcow2_flush_metadata(struct qcow2_state *s);
/* Drop refcount blocks that count nothing but themselves (after a shrink). */
int  qcow2_shrink_reftable(struct qcow2_state *s);
/* Lazy refcounts (QEMU's): before the first allocating write the dirty bit
 * goes on disk, and refcount blocks no longer have to reach the disk before
 * the L2 slices that need them (a crash leaves refcounts to repair at the
 * next read-write open); a clean close writes everything and clears it. */
static inline bool qcow2_need_accurate_refcounts(const struct qcow2_state *s)
{
    return !(s->incompat & QCOW2_INCOMPAT_DIRTY);
}
int  qcow2_mark_dirty(struct qcow2_state *s);
int  qcow2_mark_clean(struct qcow2_state *s);
/* Recount every reference and write new refcount structures (the image had
 * the dirty bit); clears the dirty bit.  Coroutine, before any request. */
int  qcow2_rebuild_refcounts(struct qcow2_state *s);
/* Write one L1 entry to disk (its 512-byte sector) and memory. */
int  qcow2_write_l1_entry(struct qcow2_state *s, uint32_t idx, uint64_t entry);
/* Rewrite the header cluster: the header, the extensions (the bitmaps one
 * and the backing format as edited, first; the others as they were), the
 * backing file name after them; then flush.  Coroutine, s->lock held. */
struct qcow2_header_edit {
    bool bitmaps;                    /* set the bitmaps extension (none if 0) */
    uint64_t autoclear;              /* ... and the autoclear features */
    uint32_t nb_bitmaps;
    uint64_t dir_offset, dir_size;
    bool backing;                    /* set the backing file (none if NULL) */
    const char *backing_file, *backing_fmt;
};
int  qcow2_co_rewrite_header(struct qcow2_state *s, const struct qcow2_header_edit *e);
/* QEMU's bdrv_change_backing_file() of a qcow2 node: the header names
 * file (NULL: none) with format fmt (NULL: none).  Main thread. */
int  qcow2_change_backing_file(struct bnode *bs, const char *file, const char *fmt);
/* Guest data or metadata about to be written at [offset, offset+len) of the
 * image file: refuse (and mark corrupt) if it overlaps metadata. */
int  qcow2_overlap_check(struct qcow2_state *s, unsigned ign, uint64_t offset, uint64_t len);
void qcow2_meta_add(struct qcow2_state *s, uint64_t offset, uint64_t len);
void qcow2_meta_add_kind(struct qcow2_state *s, uint64_t offset, uint64_t len, unsigned kind);
/* Under cache_lock: -EIO and *hit (QOL_*) if [offset, offset+len) overlaps. */
int  qcow2_overlap_check_locked(struct qcow2_state *s, unsigned ign, uint64_t offset,
                                uint64_t len, unsigned *hit);
void qcow2_report_overlap(struct qcow2_state *s, unsigned hit, uint64_t offset, uint64_t len);
void qcow2_meta_del(struct qcow2_state *s, uint64_t offset, uint64_t len);
/* Report an inconsistency: BLOCK_IMAGE_CORRUPTED; fatal = mark the image
 * corrupt and stop writing. */
void qcow2_signal_corruption(struct qcow2_state *s, bool fatal, int64_t offset, int64_t size,
                             const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* ---- qcow2-bitmap.c: persistent dirty bitmaps (the bdrv hooks) ---- */
int  qcow2_bitmaps_load(struct bnode *bs, error **errp);
void qcow2_bitmaps_store(struct bnode *bs);
int  qcow2_bitmap_can_store(struct bnode *bs, const char *name, uint32_t granularity,
                            error **errp);
int  qcow2_bitmaps_update(struct bnode *bs, error **errp);
/* A FLUSH: write the bits that changed since the last write (coroutine,
 * s->lock held; the bitmaps stay in use). */
int  qcow2_bitmaps_flush(struct qcow2_state *s);
void qcow2_bitmaps_free(struct qcow2_state *s);
/* format-specific "bitmaps" (QEMU's Qcow2BitmapInfo list), NULL if none */
json_t *qcow2_bitmaps_info(struct qcow2_state *s);
int  qcow2_bitmaps_truncate_check(struct bnode *bs, error **errp);
/* blockdev-reopen: store and make readonly / mark in use and writable */
void qcow2_bitmaps_reopen_ro(struct bnode *bs);
void qcow2_bitmaps_reopen_rw(struct bnode *bs);

/* ---- qcow2-snapshot.c: internal snapshots ---- */
/* Read the snapshot table the header names (open, coroutine). */
int  qcow2_read_snapshots(struct qcow2_state *s, error **errp);
void qcow2_snapshots_free(struct qcow2_state *s);
/* The driver's snapshot_* hooks (block.h); create and delete in a coroutine. */
int  qcow2_snapshot_list(struct bnode *bs, struct bsnapshot **list);
int  qcow2_snapshot_create(struct bnode *bs, struct bsnapshot *sn);
int  qcow2_snapshot_delete(struct bnode *bs, const char *id, const char *name,
                           struct bsnapshot *gone, error **errp);

/* ---- qcow2-io.c ---- */
void qcow2_submit(struct bnode *bs, struct breq *req, uint64_t offset);
int  qcow2_block_status(struct bnode *bs, uint64_t offset, uint64_t bytes,
                        uint64_t *pnum, unsigned *flags);
/* Classify entry (and bitmap) for subcluster sc. */
enum qtype qcow2_subcluster_type(const struct qcow2_state *s, uint64_t l2e, uint64_t bitmap,
                                 unsigned sc);
int  qcow2_decompress(const struct qcow2_state *s, void *dst, size_t dst_len,
                      const void *src, size_t src_len);
/* Run fn(opaque) in a new coroutine and wait for it in the main loop
 * (open, close, truncate: control paths). */
/* block_resize to a smaller size (coroutine); *file_end: where the last
 * referenced cluster ends. */
int  qcow2_trim_stale_tail(struct qcow2_state *s);
int  qcow2_co_shrink(struct bnode *bs, struct qcow2_state *s, uint64_t size, uint64_t *file_end,
                     const char **what);
/* Zeroes over [old, size) after a grow (coroutine). */
int  qcow2_co_zero_grown(struct bnode *bs, struct qcow2_state *s, uint64_t old, uint64_t size);
/* Cut an image file grown ahead back to what was written (close, shrink). */
void qcow2_trim_grown(struct qcow2_state *s);
/* Run fn (which takes s->lock) to its end, from the control path: in the
 * caller's coroutine when it may wait in the main loop (co_waits_in_main),
 * else in a coroutine of a helper thread while the caller waits; -EBUSY,
 * rather than waiting for ever, when the caller stops the main loop and a
 * coroutine of the main loop holds or awaits s->lock. */
int  qcow2_run_sync(struct qcow2_state *s, int (*fn)(struct qcow2_state *, void *), void *opaque);
/* Whether qcow2_run_sync would refuse with -EBUSY now. */
bool qcow2_run_sync_busy(struct qcow2_state *s);
