/*
 * qcow2 metadata: table caches, refcounts, cluster allocation, deferred
 * frees, the metadata overlap check and corruption reports.
 *
 * Theory of operation.  L2 slices and refcount blocks are cached
 * write-back in fixed slot arrays (sizes from the options), found through a
 * small hash.  Loads and write-backs happen under s->lock (a coroutine);
 * the slot table and slice contents change under cache_lock as well, so
 * the fast path may read a ready slot under cache_lock alone.
 *
 * Ordering, as QEMU's cache dependencies give it:
 *   - a refcount increment reaches the disk (written and flushed) before
 *     any L2 slice or L1 entry that may reference the cluster is written:
 *     writing back an L2 slice first flushes the refcount cache;
 *   - a refcount decrement is only applied once the L2 change that dropped
 *     the reference is durable (deferred frees, see qcow2-int.h), so dirty
 *     refcount blocks never depend on dirty L2 slices;
 *   - new refcount blocks and tables are written and flushed before the
 *     table entry or header that points at them.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "block/qcow2-int.h"
#include "qmp/qmp.h"
#include "util/opts.h"
#include "util/xalloc.h"
#include "util/cleanup.h"
#include "util/log.h"

/* ---- caches ---- */

int qcache_init(struct qcache *c, const char *name, uint32_t entry_size, int n)
{
    memset(c, 0, sizeof(*c));
    c->name = name;
    c->entry_size = entry_size;
    c->n = n;
    c->nbuckets = 1;
    while (c->nbuckets < 2 * n)
        c->nbuckets <<= 1;
    c->e = xcalloc(n, sizeof(*c->e));
    c->hash = xmalloc(c->nbuckets * sizeof(int));
    void *mem = NULL;
    if (!c->e || !c->hash || posix_memalign(&mem, 4096, (size_t)n * entry_size))
        return -ENOMEM;
    c->mem = mem;
    for (int i = 0; i < c->nbuckets; i++)
        c->hash[i] = -1;
    for (int i = 0; i < n; i++)
        c->e[i].hnext = -1;
    co_queue_init(&c->waitq);
    return 0;
}

void qcache_free(struct qcache *c)
{
    free(c->e);
    free(c->hash);
    free(c->mem);
    if (c->e || c->hash)
        co_queue_destroy(&c->waitq);
    memset(c, 0, sizeof(*c));
}

uint8_t *qcache_data(struct qcache *c, int idx)
{
    return c->mem + (size_t)idx * c->entry_size;
}

static int bucket(const struct qcache *c, uint64_t offset)
{
    return (int)(((offset >> 9) * 0x9e3779b97f4a7c15ull) >> 40) & (c->nbuckets - 1);
}

static int hash_lookup(const struct qcache *c, uint64_t offset)
{
    for (int i = c->hash[bucket(c, offset)]; i >= 0; i = c->e[i].hnext)
        if (c->e[i].offset == offset)
            return i;
    return -1;
}

static void hash_remove(struct qcache *c, int idx)
{
    int *p = &c->hash[bucket(c, c->e[idx].offset)];
    while (*p >= 0 && *p != idx)
        p = &c->e[*p].hnext;
    if (*p == idx)
        *p = c->e[idx].hnext;
    c->e[idx].hnext = -1;
}

static void hash_insert(struct qcache *c, int idx)
{
    int b = bucket(c, c->e[idx].offset);
    c->e[idx].hnext = c->hash[b];
    c->hash[b] = idx;
}

int qcache_find(struct qcache *c, uint64_t offset)
{
    int i = hash_lookup(c, offset);
    return i >= 0 && !c->e[i].loading ? i : -1;
}

static int write_entry(struct qcow2_state *s, struct qcache *c, int idx)
{
    int ret;
    if (c == &s->l2c && s->rbc.ndirty && qcow2_need_accurate_refcounts(s)) {
        /* refcounts of what this slice may reference reach the disk first */
        ret = qcache_flush(s, &s->rbc);
        if (ret < 0)
            return ret;
        ret = bnode_co_flush(s->bs->file);
        if (ret < 0)
            return ret;
    }
    uint64_t off = c->e[idx].offset;
    /* as QEMU's qcow2_cache_entry_flush */
    bnode_debug_event(s->bs->file, c == &s->rbc ? BLKDBG_REFBLOCK_UPDATE_PART : BLKDBG_L2_UPDATE);
    ret = bnode_co_pwrite(s->bs->file, off, c->entry_size, qcache_data(c, idx),
                          BREQ_BEYOND_EOF | QCOW2_META_IO);
    if (ret < 0)
        return ret;
    pthread_mutex_lock(&s->cache_lock);
    if (c->e[idx].dirty) {
        c->e[idx].dirty = false;
        c->ndirty--;
    }
    pthread_mutex_unlock(&s->cache_lock);
    return 0;
}

int qcache_flush(struct qcow2_state *s, struct qcache *c)
{
    int result = 0;
    for (int i = 0; i < c->n; i++) {
        if (c->e[i].dirty && c->e[i].offset) {
            int ret = write_entry(s, c, i);
            if (ret < 0 && !result)
                result = ret;
        }
    }
    return result;
}

int qcache_get(struct qcow2_state *s, struct qcache *c, uint64_t offset, bool read_it, int *idx)
{
    pthread_mutex_lock(&s->cache_lock);
    int i = hash_lookup(c, offset);
    if (i >= 0) {
        c->e[i].pins++;
        c->e[i].lru = ++c->clock;
        pthread_mutex_unlock(&s->cache_lock);
        if (!read_it)
            memset(qcache_data(c, i), 0, c->entry_size);
        *idx = i;
        return 0;
    }
    /* victim: the least recently used unpinned slot, clean ones first */
    int victim = -1;
    for (int pass = 0; pass < 2 && victim < 0; pass++) {
        for (int k = 0; k < c->n; k++) {
            struct qcache_entry *e = &c->e[k];
            if (e->pins || (pass == 0 && e->dirty))
                continue;
            if (!e->offset) {
                victim = k;
                break;
            }
            if (victim < 0 || e->lru < c->e[victim].lru)
                victim = k;
        }
    }
    if (victim < 0) {
        pthread_mutex_unlock(&s->cache_lock);
        log_error("qcow2: %s cache has no free slot", c->name);
        return -EBUSY;
    }
    c->e[victim].pins++;               /* nobody else picks it meanwhile */
    pthread_mutex_unlock(&s->cache_lock);
    if (c->e[victim].dirty) {
        int ret = write_entry(s, c, victim);
        if (ret < 0) {
            pthread_mutex_lock(&s->cache_lock);
            c->e[victim].pins--;
            pthread_mutex_unlock(&s->cache_lock);
            return ret;
        }
    }
    pthread_mutex_lock(&s->cache_lock);
    if (c->e[victim].offset)
        hash_remove(c, victim);
    c->e[victim].offset = offset;
    c->e[victim].loading = true;
    c->e[victim].lru = ++c->clock;
    hash_insert(c, victim);
    pthread_mutex_unlock(&s->cache_lock);

    int ret = 0;
    if (read_it && c == &s->l2c)
        bnode_debug_event(s->bs->file, BLKDBG_L2_LOAD);     /* as qcow2_cache_do_get */
    if (read_it)
        ret = bnode_co_pread(s->bs->file, offset, c->entry_size, qcache_data(c, victim),
                             BREQ_BEYOND_EOF | QCOW2_META_IO);
    else
        memset(qcache_data(c, victim), 0, c->entry_size);
    pthread_mutex_lock(&s->cache_lock);
    c->e[victim].loading = false;
    if (ret < 0) {
        hash_remove(c, victim);
        c->e[victim].offset = 0;
        c->e[victim].pins--;
    }
    pthread_mutex_unlock(&s->cache_lock);
    if (ret < 0)
        return ret;
    *idx = victim;
    return 0;
}

/* Give the pages of slots [first, first+n) back to the system (they read
 * as zeros afterwards; the slots are free, so nobody reads them). */
static void release_slots(struct qcache *c, int first, int n)
{
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)qcache_data(c, first);
    uintptr_t b = a + (uintptr_t)n * c->entry_size;
    a = (a + page - 1) & ~(uintptr_t)(page - 1);
    b &= ~(uintptr_t)(page - 1);
    if (a < b)
        madvise((void *)a, b - a, MADV_DONTNEED);
}

int qcache_clean_unused(struct qcow2_state *s, struct qcache *c)
{
    int cleaned = 0;
    pthread_mutex_lock(&s->cache_lock);
    for (int i = 0; i < c->n;) {
        int run = 0;
        for (; i < c->n; i++, run++) {
            struct qcache_entry *e = &c->e[i];
            if (!e->offset || e->pins || e->dirty || e->loading || e->lru > c->clean_clock)
                break;
            hash_remove(c, i);
            e->offset = 0;
            e->lru = 0;
        }
        if (run) {
            release_slots(c, i - run, run);
            cleaned += run;
        } else {
            i++;
        }
    }
    c->clean_clock = c->clock;
    pthread_mutex_unlock(&s->cache_lock);
    return cleaned;
}

void qcache_drop(struct qcow2_state *s, struct qcache *c, uint64_t offset, uint64_t len)
{
    pthread_mutex_lock(&s->cache_lock);
    for (int i = 0; i < c->n; i++) {
        struct qcache_entry *e = &c->e[i];
        if (!e->offset || e->offset < offset || e->offset >= offset + len || e->pins ||
            e->loading)
            continue;
        if (e->dirty) {
            e->dirty = false;
            c->ndirty--;
        }
        hash_remove(c, i);
        e->offset = 0;
        e->lru = 0;
    }
    pthread_mutex_unlock(&s->cache_lock);
}

void qcache_put(struct qcow2_state *s, struct qcache *c, int idx)
{
    pthread_mutex_lock(&s->cache_lock);
    c->e[idx].pins--;
    pthread_mutex_unlock(&s->cache_lock);
}

void qcache_mark_dirty(struct qcow2_state *s, struct qcache *c, int idx)
{
    pthread_mutex_lock(&s->cache_lock);
    if (!c->e[idx].dirty) {
        c->e[idx].dirty = true;
        c->ndirty++;
    }
    pthread_mutex_unlock(&s->cache_lock);
}

/* ---- metadata overlap set ---- */

static const char *const overlap_names[] = {
    "qcow2_header", "active L1 table", "active L2 table", "refcount table",
    "refcount block", "snapshot table", "inactive L1 table", "inactive L2 table",
    "bitmap directory",
};

/* Entries: (cluster index + 1) << 16 | kind bits; 0 = empty, ~0 = deleted. */
static uint64_t meta_hash(uint64_t ci, uint64_t cap)
{
    return (ci * 0x9e3779b97f4a7c15ull >> 20) & (cap - 1);
}

static void meta_insert(struct qcow2_state *s, uint64_t ci, unsigned kind);

static void meta_grow(struct qcow2_state *s)
{
    uint64_t old_cap = s->meta_cap;
    uint64_t *old = s->meta_set;
    s->meta_cap = old_cap ? old_cap * 2 : 256;
    s->meta_set = xcalloc(s->meta_cap, sizeof(uint64_t));
    if (!s->meta_set)
        abort();
    s->meta_count = 0;
    for (uint64_t i = 0; i < old_cap; i++)
        if (old[i] && old[i] != ~0ull)
            meta_insert(s, (old[i] >> 16) - 1, old[i] & 0xffff);
    free(old);
}

static void meta_insert(struct qcow2_state *s, uint64_t ci, unsigned kind)
{
    if ((s->meta_count + 1) * 2 > s->meta_cap)
        meta_grow(s);
    uint64_t key = (ci + 1) << 16;
    uint64_t h = meta_hash(ci, s->meta_cap), tomb = UINT64_MAX;
    for (;; h = (h + 1) & (s->meta_cap - 1)) {
        uint64_t v = s->meta_set[h];
        if (v == 0)
            break;
        if (v == ~0ull) {
            if (tomb == UINT64_MAX)
                tomb = h;
            continue;
        }
        if ((v & ~0xffffull) == key) {
            s->meta_set[h] = v | kind;
            return;
        }
    }
    s->meta_set[tomb != UINT64_MAX ? tomb : h] = key | kind;
    s->meta_count++;
}

static unsigned meta_lookup(const struct qcow2_state *s, uint64_t ci)
{
    if (!s->meta_cap)
        return 0;
    uint64_t key = (ci + 1) << 16;
    for (uint64_t h = meta_hash(ci, s->meta_cap);; h = (h + 1) & (s->meta_cap - 1)) {
        uint64_t v = s->meta_set[h];
        if (v == 0)
            return 0;
        if (v != ~0ull && (v & ~0xffffull) == key)
            return v & 0xffff;
    }
}

void qcow2_meta_add(struct qcow2_state *s, uint64_t offset, uint64_t len)
{
    qcow2_meta_add_kind(s, offset, len, QOL_ACTIVE_L2);
}

void qcow2_meta_add_kind(struct qcow2_state *s, uint64_t offset, uint64_t len, unsigned kind)
{
    pthread_mutex_lock(&s->cache_lock);
    for (uint64_t ci = offset >> s->cluster_bits; ci < qsize_to_clusters(s, offset + len); ci++)
        meta_insert(s, ci, kind);
    pthread_mutex_unlock(&s->cache_lock);
}

void qcow2_meta_del(struct qcow2_state *s, uint64_t offset, uint64_t len)
{
    pthread_mutex_lock(&s->cache_lock);
    for (uint64_t ci = offset >> s->cluster_bits; ci < qsize_to_clusters(s, offset + len); ci++) {
        if (!s->meta_cap)
            break;
        uint64_t key = (ci + 1) << 16;
        for (uint64_t h = meta_hash(ci, s->meta_cap);; h = (h + 1) & (s->meta_cap - 1)) {
            uint64_t v = s->meta_set[h];
            if (v == 0)
                break;
            if (v != ~0ull && (v & ~0xffffull) == key) {
                s->meta_set[h] = ~0ull;
                break;
            }
        }
    }
    pthread_mutex_unlock(&s->cache_lock);
}

/* Under cache_lock. */
int qcow2_overlap_check_locked(struct qcow2_state *s, unsigned ign, uint64_t offset,
                               uint64_t len, unsigned *hit)
{
    unsigned mask = s->overlap & ~ign;
    if (!mask || !len)
        return 0;
    for (uint64_t ci = offset >> s->cluster_bits; ci < qsize_to_clusters(s, offset + len); ci++) {
        unsigned k = meta_lookup(s, ci) & mask;
        if (k) {
            *hit = k;
            return -EIO;
        }
    }
    return 0;
}

int qcow2_overlap_check(struct qcow2_state *s, unsigned ign, uint64_t offset, uint64_t len)
{
    unsigned hit = 0;
    pthread_mutex_lock(&s->cache_lock);
    int ret = qcow2_overlap_check_locked(s, ign, offset, len, &hit);
    pthread_mutex_unlock(&s->cache_lock);
    if (ret < 0)
        qcow2_report_overlap(s, hit, offset, len);
    return ret;
}

void qcow2_report_overlap(struct qcow2_state *s, unsigned hit, uint64_t offset, uint64_t len)
{
    int bit = __builtin_ctz(hit);
    qcow2_signal_corruption(s, true, offset, len,
                            "Preventing invalid write on metadata (overlaps with %s)",
                            overlap_names[bit]);
}

/* ---- corruption ---- */

void qcow2_signal_corruption(struct qcow2_state *s, bool fatal, int64_t offset, int64_t size,
                             const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);

    if (s->signaled_corruption && (!fatal || s->corrupt))
        return;
    if (fatal)
        fprintf(stderr, "qcow2: Marking image as corrupt: %s; further corruption events "
                "will be suppressed\n", msg);
    else
        fprintf(stderr, "qcow2: Image is corrupt: %s; further non-fatal corruption events "
                "will be suppressed\n", msg);
    json_t *data = json_pack("{s:s, s:s, s:s, s:b}", "device", "",
                             "node-name", s->bs->node_name, "msg", msg, "fatal", fatal);
    if (offset >= 0)
        json_object_set_new(data, "offset", json_integer(offset));
    if (size >= 0)
        json_object_set_new(data, "size", json_integer(size));
    qmp_event("BLOCK_IMAGE_CORRUPTED", data);
    s->signaled_corruption = true;
    if (fatal && !s->corrupt) {
        s->corrupt = true;
        s->incompat |= QCOW2_INCOMPAT_CORRUPT;
        if (co_in_coroutine() && !s->bs->read_only && s->version >= 3) {
            uint64_t v = htobe64(s->incompat);
            bnode_co_pwrite(s->bs->file, offsetof(struct qcow2_header, incompatible_features),
                            8, &v, 0);
            bnode_co_flush(s->bs->file);
        }
    }
}

/* ---- refcounts ---- */

/* The refcount block covering cluster ci, pinned in *idx; -1 if none
 * (all its refcounts are 0). */
static int refblock_for(struct qcow2_state *s, uint64_t ci, int *idx)
{
    uint64_t rt_i = ci >> s->rb_bits;
    *idx = -1;
    if (rt_i >= s->reftable_size)
        return 0;
    uint64_t off = s->reftable[rt_i] & QCOW2_REFT_OFFSET_MASK;
    if (!off)
        return 0;
    if (qoffset_into_cluster(s, off)) {
        qcow2_signal_corruption(s, true, off, s->cluster_size,
                                "Refblock offset %#" PRIx64 " unaligned (reftable index: %#"
                                PRIx64 ")", off, rt_i);
        return -EIO;
    }
    return qcache_get(s, &s->rbc, off, true, idx);
}

int qcow2_get_refcount(struct qcow2_state *s, uint64_t ci, uint64_t *ref)
{
    int idx;
    int ret = refblock_for(s, ci, &idx);
    if (ret < 0)
        return ret;
    if (idx < 0) {
        *ref = 0;
        return 0;
    }
    *ref = qcow2_refcount_get(qcache_data(&s->rbc, idx), s->refcount_order,
                              ci & (s->rb_entries - 1));
    qcache_put(s, &s->rbc, idx);
    return 0;
}

static bool refblock_unused(struct qcow2_state *s, uint64_t rt_i, uint64_t off, uint8_t *rb)
{
    /* a block that counts itself is unused if it counts nothing else */
    bool self = ((off >> s->cluster_bits) >> s->rb_bits) == rt_i;
    uint64_t bi = (off >> s->cluster_bits) & (s->rb_entries - 1), ref = 0;
    if (self) {
        ref = qcow2_refcount_get(rb, s->refcount_order, bi);
        qcow2_refcount_set(rb, s->refcount_order, bi, 0);
    }
    bool zero = true;
    for (uint64_t i = 0; zero && i < s->cluster_size; i += 8) {
        uint64_t v;
        memcpy(&v, rb + i, 8);
        zero = v == 0;
    }
    if (self)
        qcow2_refcount_set(rb, s->refcount_order, bi, ref);
    return zero;
}

/* QEMU's qcow2_shrink_reftable: refcount blocks that count nothing but
 * themselves leave the table (written whole), and their clusters are
 * freed in the block that counts them. */
int qcow2_shrink_reftable(struct qcow2_state *s)
{
    uint64_t n = s->reftable_size;
    CLEANUP_FREE uint64_t *tmp = xcalloc(n ? n : 1, 8);
    CLEANUP_FREE bool *gone = xcalloc(n ? n : 1, sizeof(bool));
    int ret = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t off = s->reftable[i] & QCOW2_REFT_OFFSET_MASK;
        if (!off)
            continue;
        int idx;
        ret = qcache_get(s, &s->rbc, off, true, &idx);
        if (ret < 0)
            return ret;
        pthread_mutex_lock(&s->cache_lock);
        gone[i] = refblock_unused(s, i, off, qcache_data(&s->rbc, idx));
        pthread_mutex_unlock(&s->cache_lock);
        qcache_put(s, &s->rbc, idx);
        tmp[i] = gone[i] ? 0 : htobe64(s->reftable[i]);
    }
    ret = bnode_co_pwrite(s->bs->file, s->reftable_offset, n * 8, tmp, 0);
    if (ret == 0)
        ret = bnode_co_flush(s->bs->file);
    for (uint64_t i = 0; i < n; i++) {
        if (!gone[i])
            continue;
        uint64_t off = s->reftable[i] & QCOW2_REFT_OFFSET_MASK;
        uint64_t ci = off >> s->cluster_bits;
        uint64_t owner = ci >> s->rb_bits;
        if (ret == 0 && owner != i && owner < n && s->reftable[owner]) {
            int idx;
            ret = qcache_get(s, &s->rbc, s->reftable[owner] & QCOW2_REFT_OFFSET_MASK, true,
                             &idx);
            if (ret == 0) {
                pthread_mutex_lock(&s->cache_lock);
                qcow2_refcount_set(qcache_data(&s->rbc, idx), s->refcount_order,
                                   ci & (s->rb_entries - 1), 0);
                pthread_mutex_unlock(&s->cache_lock);
                qcache_mark_dirty(s, &s->rbc, idx);
                qcache_put(s, &s->rbc, idx);
            }
        }
        qcache_drop(s, &s->rbc, off, s->cluster_size);
        qcow2_meta_del(s, off, s->cluster_size);
        s->reftable[i] = 0;
        if (ret == 0 && s->bs->file->discard)
            bnode_co_pdiscard(s->bs->file, off, s->cluster_size);
    }
    return ret;
}

static int write_reftable_entry(struct qcow2_state *s, uint64_t rt_i)
{
    uint64_t v = htobe64(s->reftable[rt_i]);
    return bnode_co_pwrite(s->bs->file, s->reftable_offset + rt_i * 8, 8, &v, 0);
}

static int grow_reftable(struct qcow2_state *s, uint64_t need, uint64_t excl_start,
                         uint64_t excl_n);

/* A refcount block for reftable index rt_i, placed in the range it covers
 * (so it counts itself), avoiding the clusters being allocated. */
static int alloc_refblock(struct qcow2_state *s, uint64_t rt_i, uint64_t excl_start,
                          uint64_t excl_n)
{
    if (rt_i >= s->reftable_size) {
        int ret = grow_reftable(s, rt_i, excl_start, excl_n);
        if (ret < 0)
            return ret;
        if (s->reftable[rt_i])
            return 0;            /* the new area brought it */
    }
    /* Every cluster of the covered range has refcount 0 (its block is
     * missing), so none was handed out before: only the allocation in
     * progress is to avoid. */
    uint64_t first = rt_i << s->rb_bits;
    uint64_t b = first;
    while (b >= excl_start && b < excl_start + excl_n)
        b++;
    uint64_t off = b << s->cluster_bits;
    int idx;
    int ret = qcache_get(s, &s->rbc, off, false, &idx);
    if (ret < 0)
        return ret;
    pthread_mutex_lock(&s->cache_lock);
    qcow2_refcount_set(qcache_data(&s->rbc, idx), s->refcount_order, b - first, 1);
    pthread_mutex_unlock(&s->cache_lock);
    bnode_debug_event(s->bs->file, BLKDBG_REFBLOCK_ALLOC_WRITE);
    ret = bnode_co_pwrite(s->bs->file, off, s->cluster_size, qcache_data(&s->rbc, idx),
                          BREQ_BEYOND_EOF | QCOW2_META_IO);
    if (ret == 0)
        ret = bnode_co_flush(s->bs->file);
    if (ret == 0) {
        s->reftable[rt_i] = off;
        bnode_debug_event(s->bs->file, BLKDBG_REFBLOCK_ALLOC_HOOKUP);
        ret = write_reftable_entry(s, rt_i);
        if (ret < 0)
            s->reftable[rt_i] = 0;
    }
    if (ret < 0) {
        pthread_mutex_lock(&s->cache_lock);
        hash_remove(&s->rbc, idx);
        s->rbc.e[idx].offset = 0;
        s->rbc.e[idx].pins--;
        pthread_mutex_unlock(&s->cache_lock);
        return ret;
    }
    qcache_put(s, &s->rbc, idx);
    qcow2_meta_add_kind(s, off, s->cluster_size, QOL_REFCOUNT_BLOCK);
    if (b + 1 > s->alloc_end)
        s->alloc_end = b + 1;
    return 0;
}

/* Add addend to the refcounts of clusters [ci, ci+n); excl_* = an
 * allocation in progress that new refcount blocks must avoid. */
static int refcount_add_n(struct qcow2_state *s, uint64_t ci, uint64_t n, int64_t addend,
                          uint64_t excl_start, uint64_t excl_n, uint64_t *done)
{
    uint64_t prev_rt = UINT64_MAX;
    for (uint64_t k = 0; k < n; k++) {
        uint64_t c = ci + k;
        int idx;
        *done = k;
        if (c >> s->rb_bits != prev_rt) {
            /* QEMU's update_refcount: alloc_refcount_block for each block
             * it moves to, which loads the block if there is one */
            prev_rt = c >> s->rb_bits;
            bnode_debug_event(s->bs->file, BLKDBG_REFBLOCK_ALLOC);
            if (prev_rt < s->reftable_size && s->reftable[prev_rt])
                bnode_debug_event(s->bs->file, BLKDBG_REFBLOCK_LOAD);
        }
        int ret = refblock_for(s, c, &idx);
        if (ret < 0)
            return ret;
        if (idx < 0) {
            if (addend < 0) {
                qcow2_signal_corruption(s, true, c << s->cluster_bits, s->cluster_size,
                                        "Refcount block of cluster %#" PRIx64 " is missing",
                                        c);
                return -EIO;
            }
            ret = alloc_refblock(s, c >> s->rb_bits, excl_start, excl_n);
            if (ret < 0)
                return ret;
            ret = refblock_for(s, c, &idx);
            if (ret < 0)
                return ret;
            if (idx < 0)
                return -EIO;
        }
        uint8_t *blk = qcache_data(&s->rbc, idx);
        uint64_t i = c & (s->rb_entries - 1);
        uint64_t old = qcow2_refcount_get(blk, s->refcount_order, i), v;
        if (addend < 0 && old < (uint64_t)-addend) {
            qcache_put(s, &s->rbc, idx);
            qcow2_signal_corruption(s, true, c << s->cluster_bits, s->cluster_size,
                                    "Refcount of cluster %#" PRIx64 " would drop below 0", c);
            return -EIO;
        }
        v = old + addend;
        if (addend > 0 && (v > s->refcount_max || v < old)) {
            qcache_put(s, &s->rbc, idx);
            return -ERANGE;
        }
        pthread_mutex_lock(&s->cache_lock);
        qcow2_refcount_set(blk, s->refcount_order, i, v);
        pthread_mutex_unlock(&s->cache_lock);
        qcache_mark_dirty(s, &s->rbc, idx);
        qcache_put(s, &s->rbc, idx);
        if (v == 0 && c < s->free_cluster_index)
            s->free_cluster_index = c;
        if (v == 0 && s->free_byte_offset && (s->free_byte_offset >> s->cluster_bits) == c)
            s->free_byte_offset = 0;     /* freed: may come back as anything */
    }
    *done = n;
    return 0;
}

/* Add addend to the refcounts of clusters [ci, ci+n); excl_* = an
 * allocation in progress that new refcount blocks must avoid.  On failure
 * the clusters already changed are changed back (QEMU's update_refcount
 * rolls back too), so a failed allocation leaks nothing. */
static int refcount_add(struct qcow2_state *s, uint64_t ci, uint64_t n, int64_t addend,
                        uint64_t excl_start, uint64_t excl_n)
{
    uint64_t done = 0;
    int ret = refcount_add_n(s, ci, n, addend, excl_start, excl_n, &done);
    if (ret < 0 && done) {
        uint64_t undone = 0;
        refcount_add_n(s, ci, done, -addend, 0, 0, &undone);
    }
    return ret;
}

int qcow2_update_refcount(struct qcow2_state *s, uint64_t offset, uint64_t length,
                          int64_t addend)
{
    if (!length)
        return 0;
    uint64_t first = offset >> s->cluster_bits;
    uint64_t last = (offset + length - 1) >> s->cluster_bits;
    return refcount_add(s, first, last - first + 1, addend, 0, 0);
}

/* Move the refcount table to a bigger one at the end of the image, with
 * the refcount blocks that the new area itself needs. */
static int grow_reftable(struct qcow2_state *s, uint64_t need, uint64_t excl_start,
                         uint64_t excl_n)
{
    uint64_t cs = s->cluster_size;
    uint64_t max_entries = QCOW2_MAX_REFTABLE_SIZE / 8;
    uint64_t new_size = MAX(need + 1, s->reftable_size + s->reftable_size / 2 + 1);
    uint64_t file_end = qsize_to_clusters(s, s->bs->file->size);
    uint64_t start = MAX(MAX(file_end, s->alloc_end), excl_start + excl_n);
    uint64_t tc, nb = 0;

    bnode_debug_event(s->bs->file, BLKDBG_REFTABLE_GROW);   /* as alloc_refcount_block */

    for (;;) {
        new_size = MIN(new_size, max_entries);
        tc = (new_size * 8 + cs - 1) / cs;
        uint64_t area_end = start + tc + nb;
        uint64_t last_rt = (area_end - 1) >> s->rb_bits;
        if (last_rt >= new_size || need >= new_size) {
            if (new_size == max_entries)
                return -EFBIG;
            new_size = MAX(last_rt, need) + 1;
            continue;
        }
        uint64_t missing = 0;
        for (uint64_t rt = start >> s->rb_bits; rt <= last_rt; rt++)
            if (rt >= s->reftable_size || !s->reftable[rt])
                missing++;
        if (missing == nb)
            break;
        nb = missing;
    }
    uint64_t area_end = start + tc + nb;
    CLEANUP_FREE uint64_t *table = xcalloc(tc * cs / 8, 8);
    CLEANUP_FREE uint8_t *blocks = xcalloc(nb ? nb : 1, cs);
    memcpy(table, s->reftable, s->reftable_size * 8);
    uint64_t j = 0;
    for (uint64_t rt = start >> s->rb_bits; rt <= (area_end - 1) >> s->rb_bits; rt++) {
        if (rt < s->reftable_size && s->reftable[rt])
            continue;
        table[rt] = (start + tc + j) << s->cluster_bits;
        uint8_t *blk = blocks + j * cs;
        uint64_t lo = MAX(start, rt << s->rb_bits), hi = MIN(area_end, (rt + 1) << s->rb_bits);
        for (uint64_t c = lo; c < hi; c++)
            qcow2_refcount_set(blk, s->refcount_order, c & (s->rb_entries - 1), 1);
        j++;
    }
    /* area clusters covered by existing blocks: count them there first
     * (and uncount them if the new table does not make it, as QEMU's
     * qcow2_refcount_area frees them: no leak) */
    uint64_t counted = start;
    int ret = 0;
    for (; counted < area_end; counted++) {
        uint64_t rt = counted >> s->rb_bits;
        if (rt < s->reftable_size && s->reftable[rt]) {
            ret = refcount_add(s, counted, 1, 1, start, area_end - start);
            if (ret < 0)
                break;
        }
    }
    if (ret == 0) {
        bnode_debug_event(s->bs->file, BLKDBG_REFBLOCK_ALLOC_WRITE_BLOCKS);
        ret = qcache_flush(s, &s->rbc);
    }
    if (ret == 0 && nb)
        ret = bnode_co_pwrite(s->bs->file, (start + tc) << s->cluster_bits, nb * cs, blocks,
                              BREQ_BEYOND_EOF);
    for (uint64_t i = 0; ret == 0 && i < tc * cs / 8; i++)
        table[i] = htobe64(table[i]);
    if (ret == 0)
        bnode_debug_event(s->bs->file, BLKDBG_REFBLOCK_ALLOC_WRITE_TABLE);
    if (ret == 0)
        ret = bnode_co_pwrite(s->bs->file, start << s->cluster_bits, tc * cs, table,
                              BREQ_BEYOND_EOF);
    if (ret == 0)
        ret = bnode_co_flush(s->bs->file);
    struct __attribute__((packed)) { uint64_t off; uint32_t clusters; } hdr = {
        htobe64(start << s->cluster_bits), htobe32((uint32_t)tc) };
    if (ret == 0) {
        bnode_debug_event(s->bs->file, BLKDBG_REFBLOCK_ALLOC_SWITCH_TABLE);
        ret = bnode_co_pwrite(s->bs->file, offsetof(struct qcow2_header, refcount_table_offset),
                              sizeof(hdr), &hdr, 0);
    }
    if (ret == 0)
        ret = bnode_co_flush(s->bs->file);
    if (ret < 0) {
        for (uint64_t c = start; c < counted; c++) {
            uint64_t rt = c >> s->rb_bits;
            if (rt < s->reftable_size && s->reftable[rt])
                refcount_add(s, c, 1, -1, 0, 0);
        }
        return ret;
    }
    for (uint64_t i = 0; i < tc * cs / 8; i++)
        table[i] = be64toh(table[i]);
    uint64_t old_off = s->reftable_offset, old_clusters = s->reftable_clusters;
    uint64_t *old = s->reftable;
    s->reftable = table;
    table = NULL;
    s->reftable_size = tc * cs / 8;
    s->reftable_offset = start << s->cluster_bits;
    s->reftable_clusters = (uint32_t)tc;
    free(old);
    qcow2_meta_del(s, old_off, old_clusters * cs);
    qcow2_meta_add_kind(s, s->reftable_offset, tc * cs, QOL_REFCOUNT_TABLE);
    if (nb)
        qcow2_meta_add_kind(s, (start + tc) << s->cluster_bits, nb * cs, QOL_REFCOUNT_BLOCK);
    if (area_end > s->alloc_end)
        s->alloc_end = area_end;
    return refcount_add(s, old_off >> s->cluster_bits, old_clusters, -1, 0, 0);
}

int64_t qcow2_alloc_clusters(struct qcow2_state *s, uint64_t n)
{
    /* As QEMU: the hint moves past every used cluster it meets, so a
     * fragmented front of the image is scanned once, not at each call.
     * Refcounts are read a whole block at a time. */
    uint64_t limit = 1ull << (56 - s->cluster_bits);
    uint64_t start = s->free_cluster_index, ci = start;

    bnode_debug_event(s->bs->file, BLKDBG_CLUSTER_ALLOC);
    while (ci - start < n) {
        if (ci + n > limit)
            return -EFBIG;
        int idx;
        int ret = refblock_for(s, ci, &idx);
        if (ret < 0)
            return ret;
        if (idx < 0) {
            /* no block: every refcount it would hold is 0 */
            ci = MIN(start + n, ((ci >> s->rb_bits) + 1) << s->rb_bits);
            continue;
        }
        const uint8_t *blk = qcache_data(&s->rbc, idx);
        uint64_t block_end = ((ci >> s->rb_bits) + 1) << s->rb_bits;
        while (ci < block_end && ci - start < n) {
            if (qcow2_refcount_get(blk, s->refcount_order, ci & (s->rb_entries - 1))) {
                start = ci + 1;
                if (s->free_cluster_index < start)
                    s->free_cluster_index = start;
            }
            ci++;
        }
        qcache_put(s, &s->rbc, idx);
    }
    s->last_alloc_fresh = start >= s->alloc_end;
    int ret = refcount_add(s, start, n, 1, start, n);
    if (ret < 0)
        return ret;
    if (s->free_cluster_index >= start)
        s->free_cluster_index = start + n;
    if (start + n > s->alloc_end)
        s->alloc_end = start + n;
    return (int64_t)(start << s->cluster_bits);
}

int64_t qcow2_alloc_bytes(struct qcow2_state *s, uint64_t size)
{
    uint64_t off = s->free_byte_offset;
    int ret;

    bnode_debug_event(s->bs->file, BLKDBG_CLUSTER_ALLOC_BYTES);
    if (off) {
        uint64_t ref = 0;
        ret = qcow2_get_refcount(s, off >> s->cluster_bits, &ref);
        if (ret < 0)
            return ret;
        if (ref == 0 || ref >= s->refcount_max)
            off = 0;                    /* start a new cluster */
    }
    uint64_t room = off ? s->cluster_size - qoffset_into_cluster(s, off) : 0;
    if (off && room >= size) {
        ret = qcow2_update_refcount(s, off, size, 1);
    } else {
        /* a new cluster (referenced once already); the bytes continue
         * into it if it follows the current one, else start there */
        int64_t c = qcow2_alloc_clusters(s, 1);
        if (c < 0)
            return c;
        if (c == 0) {
            qcow2_signal_corruption(s, true, -1, -1, "Preventing invalid allocation of "
                                    "compressed cluster at offset 0");
            return -EIO;
        }
        if (off && (uint64_t)c == qstart_of_cluster(s, off) + s->cluster_size) {
            ret = qcow2_update_refcount(s, off, 1, 1);
            if (ret < 0)
                qcow2_update_refcount(s, (uint64_t)c, s->cluster_size, -1);
        } else
            off = (uint64_t)c, ret = 0;
    }
    if (ret < 0)
        return ret;
    s->free_byte_offset = off + size;
    if (!qoffset_into_cluster(s, s->free_byte_offset))
        s->free_byte_offset = 0;
    return (int64_t)off;
}

/* ---- deferred frees ---- */

void qcow2_free_deferred(struct qcow2_state *s, uint64_t offset, uint64_t nb, int type)
{
    struct qfree *f = xmalloc(sizeof(*f));
    *f = (struct qfree){ .offset = offset, .nb = nb, .discard_type = type, .next = s->pending };
    s->pending = f;
}

void qcow2_free_deferred_external(struct qcow2_state *s, uint64_t offset, int type)
{
    if (!s->discard_passthrough[type])
        return;                  /* nothing is counted in a data file */
    struct qfree *f = xmalloc(sizeof(*f));
    *f = (struct qfree){ .offset = offset, .nb = 1, .discard_type = type, .external = true,
                         .next = s->pending };
    s->pending = f;
}

static int release(struct qcow2_state *s, struct qfree *list)
{
    int result = 0;
    while (list) {
        struct qfree *f = list;
        list = f->next;
        if (f->external) {
            if (s->data->discard)
                bnode_co_pdiscard(s->data, f->offset, f->nb << s->cluster_bits);
            free(f);
            continue;
        }
        bnode_debug_event(s->bs->file, BLKDBG_CLUSTER_FREE);     /* qcow2_free_clusters */
        int ret = qcow2_update_refcount(s, f->offset, f->nb << s->cluster_bits, -1);
        if (ret == 0 && s->discard_passthrough[f->discard_type]) {
            uint64_t ref = 1;
            qcow2_get_refcount(s, f->offset >> s->cluster_bits, &ref);
            if (ref == 0 && s->bs->file->discard)
                bnode_co_pdiscard(s->bs->file, f->offset, f->nb << s->cluster_bits);
        }
        if (ret < 0 && !result)
            result = ret;
        free(f);
    }
    return result;
}

int qcow2_process_frees(struct qcow2_state *s, bool flushed)
{
    int ret = 0;
    for (int round = 0; round < 2; round++) {
        if (s->draining &&
            __atomic_load_n(&s->inflight[s->draining_slot], __ATOMIC_ACQUIRE) == 0) {
            struct qfree *d = s->draining;
            s->draining = NULL;
            int r = release(s, d);
            if (r < 0 && !ret)
                ret = r;
        }
        if (!flushed || !s->pending || s->draining)
            break;
        pthread_mutex_lock(&s->cache_lock);
        int old = s->cur_slot;
        if (__atomic_load_n(&s->inflight[1 - old], __ATOMIC_ACQUIRE) == 0) {
            s->cur_slot = 1 - old;
            s->draining_slot = old;
            s->draining = s->pending;
            s->pending = NULL;
        }
        pthread_mutex_unlock(&s->cache_lock);
        flushed = false;
    }
    return ret;
}

/* ---- flush ---- */

int qcow2_flush_metadata(struct qcow2_state *s)
{
    int ret = 0;
    bool l2_dirty = s->l2c.ndirty > 0;
    if (s->rbc.ndirty) {
        ret = qcache_flush(s, &s->rbc);
        if (ret == 0 && l2_dirty && qcow2_need_accurate_refcounts(s))
            ret = bnode_co_flush(s->bs->file);
    }
    if (ret == 0 && l2_dirty)
        ret = qcache_flush(s, &s->l2c);
    if (ret == 0 && !s->bs->file->cache_no_flush)
        ret = bnode_co_flush(s->bs->file);
    if (ret == 0 && s->data != s->bs->file)
        ret = bnode_co_flush(s->data);
    if (ret == 0)
        ret = qcow2_process_frees(s, true);
    return ret;
}

/* ---- the dirty bit (lazy refcounts) ---- */

static int write_incompat(struct qcow2_state *s, uint64_t incompat)
{
    uint64_t v = htobe64(incompat);
    int ret = bnode_co_pwrite(s->bs->file, offsetof(struct qcow2_header, incompatible_features),
                              8, &v, 0);
    if (ret == 0)
        ret = bnode_co_flush(s->bs->file);
    return ret;
}

int qcow2_mark_dirty(struct qcow2_state *s)
{
    if (!s->lazy_refcounts || s->version < 3 || (s->incompat & QCOW2_INCOMPAT_DIRTY))
        return 0;
    /* what is on disk so far is consistent: make it durable first */
    int ret = bnode_co_flush(s->bs->file);
    if (ret == 0)
        ret = write_incompat(s, s->incompat | QCOW2_INCOMPAT_DIRTY);
    if (ret < 0)
        return ret;
    s->incompat |= QCOW2_INCOMPAT_DIRTY;
    return 0;
}

int qcow2_mark_clean(struct qcow2_state *s)
{
    if (!(s->incompat & QCOW2_INCOMPAT_DIRTY))
        return 0;
    /* every refcount is written and durable: the image is consistent */
    int ret = qcache_flush(s, &s->rbc);
    if (ret == 0)
        ret = qcache_flush(s, &s->l2c);
    if (ret == 0)
        ret = bnode_co_flush(s->bs->file);
    if (ret == 0)
        ret = write_incompat(s, s->incompat & ~QCOW2_INCOMPAT_DIRTY);
    if (ret == 0)
        s->incompat &= ~QCOW2_INCOMPAT_DIRTY;
    return ret;
}

/* ---- L1 ---- */

int qcow2_write_l1_entry(struct qcow2_state *s, uint32_t idx, uint64_t entry)
{
    uint32_t base = idx & ~63u;
    uint32_t n = MIN(64u, s->l1_size - base);
    uint64_t buf[64];
    pthread_mutex_lock(&s->cache_lock);
    for (uint32_t i = 0; i < n; i++)
        buf[i] = htobe64(base + i == idx ? entry : s->l1[base + i]);
    pthread_mutex_unlock(&s->cache_lock);
    int ret = qcow2_overlap_check(s, QOL_ACTIVE_L1, s->l1_offset + base * 8ull, n * 8);
    if (ret < 0)
        return ret;
    bnode_debug_event(s->bs->file, BLKDBG_L1_UPDATE);
    ret = bnode_co_pwrite(s->bs->file, s->l1_offset + base * 8ull, n * 8, buf, 0);
    if (ret < 0)
        return ret;
    pthread_mutex_lock(&s->cache_lock);
    s->l1[idx] = entry;
    pthread_mutex_unlock(&s->cache_lock);
    return 0;
}

/* ---- refcount rebuild (the dirty bit: lazy refcounts after a crash) ---- */

struct counts {
    uint32_t *rc;
    uint64_t n;                 /* clusters counted */
    uint64_t bad;               /* references past any sane end */
};

static void count_range(struct qcow2_state *s, struct counts *c, uint64_t off, uint64_t len)
{
    if (!len)
        return;
    uint64_t first = off >> s->cluster_bits, last = (off + len - 1) >> s->cluster_bits;
    for (uint64_t ci = first; ci <= last; ci++) {
        if (ci >= c->n) {
            c->bad++;
            continue;
        }
        if (c->rc[ci] != UINT32_MAX)
            c->rc[ci]++;
    }
}

/* Count an L2 table and what it references. */
static int count_l2(struct qcow2_state *s, struct counts *c, uint64_t l2_off, uint8_t *buf)
{
    count_range(s, c, l2_off, s->cluster_size);
    int ret = bnode_co_pread(s->bs->file, l2_off, s->cluster_size, buf, BREQ_BEYOND_EOF);
    if (ret < 0)
        return ret;
    for (uint64_t i = 0; i < s->l2_entries; i++) {
        uint64_t e;
        memcpy(&e, buf + i * s->l2_entry_bytes, 8);
        e = be64toh(e);
        if (e & QCOW2_OFLAG_COMPRESSED) {
            uint64_t coff = e & s->coffset_mask;
            uint64_t nsec = ((e >> s->csize_shift) & s->csize_mask) + 1;
            count_range(s, c, coff & ~511ull, nsec * 512);
        } else if ((e & QCOW2_L2E_OFFSET_MASK) && s->data == s->bs->file) {
            count_range(s, c, e & QCOW2_L2E_OFFSET_MASK, s->cluster_size);
        }
    }
    return 0;
}

static int count_l1(struct qcow2_state *s, struct counts *c, const uint64_t *l1, uint32_t n,
                    uint8_t *buf)
{
    for (uint32_t i = 0; i < n; i++) {
        uint64_t o = l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (o && !qoffset_into_cluster(s, o)) {
            int ret = count_l2(s, c, o, buf);
            if (ret < 0)
                return ret;
        }
    }
    return 0;
}

static int count_bitmaps(struct qcow2_state *s, struct counts *c)
{
    if (!s->bitmap_dir_size || s->bitmap_dir_size > (64u << 20))
        return 0;
    count_range(s, c, s->bitmap_dir_offset, s->bitmap_dir_size);
    CLEANUP_FREE uint8_t *dir = xmalloc(s->bitmap_dir_size);
    int ret = bnode_co_pread(s->bs->file, s->bitmap_dir_offset, s->bitmap_dir_size, dir,
                             BREQ_BEYOND_EOF);
    if (ret < 0)
        return ret;
    for (uint64_t p = 0; p + 24 <= s->bitmap_dir_size;) {
        uint64_t toff;
        uint32_t tsize, extra;
        uint16_t name;
        memcpy(&toff, dir + p, 8);
        memcpy(&tsize, dir + p + 8, 4);
        memcpy(&name, dir + p + 18, 2);
        memcpy(&extra, dir + p + 20, 4);
        toff = be64toh(toff);
        tsize = be32toh(tsize);
        count_range(s, c, toff, (uint64_t)tsize * 8);
        if (tsize && tsize <= (1u << 24) && !qoffset_into_cluster(s, toff)) {
            CLEANUP_FREE uint64_t *t = xcalloc(tsize, 8);
            ret = bnode_co_pread(s->bs->file, toff, (uint64_t)tsize * 8, t, BREQ_BEYOND_EOF);
            if (ret < 0)
                return ret;
            for (uint32_t i = 0; i < tsize; i++) {
                uint64_t o = be64toh(t[i]) & QCOW2_L1E_OFFSET_MASK;
                if (o)
                    count_range(s, c, o, s->cluster_size);
            }
        }
        p += (24 + (uint64_t)be16toh(name) + be32toh(extra) + 7) & ~7ull;
    }
    return 0;
}

/*
 * Rebuild every refcount from what references clusters (QEMU's repair of
 * a dirty image): count the header, L1/L2 tables and data, snapshots and
 * their tables, bitmaps; then write a new refcount table and new blocks
 * after everything in use, flush, and point the header at them.  The old
 * refcount structures become free space.
 */
int qcow2_rebuild_refcounts(struct qcow2_state *s)
{
    uint64_t cs = s->cluster_size;
    uint64_t file_cl = qsize_to_clusters(s, s->bs->file->size);
    struct counts c = { .n = file_cl + 1 };
    c.rc = xcalloc(c.n, sizeof(uint32_t));
    CLEANUP_FREE uint8_t *buf = xmalloc(cs);
    int ret;

    count_range(s, &c, 0, cs);
    count_range(s, &c, s->l1_offset, s->l1_size * 8ull);
    ret = count_l1(s, &c, s->l1, s->l1_size, buf);
    if (ret == 0 && s->nb_snapshots)
        count_range(s, &c, s->snapshots_offset, s->snapshots_size);
    for (uint32_t i = 0; ret == 0 && i < s->nb_snapshots; i++) {
        struct qsnapshot *sn = &s->snapshots[i];
        count_range(s, &c, sn->l1_table_offset, sn->l1_size * 8ull);
        CLEANUP_FREE uint64_t *l1 = xcalloc(sn->l1_size ? sn->l1_size : 1, 8);
        ret = bnode_co_pread(s->bs->file, sn->l1_table_offset, sn->l1_size * 8ull, l1,
                             BREQ_BEYOND_EOF);
        for (uint32_t k = 0; ret == 0 && k < sn->l1_size; k++)
            l1[k] = be64toh(l1[k]);
        if (ret == 0)
            ret = count_l1(s, &c, l1, sn->l1_size, buf);
    }
    if (ret == 0)
        ret = count_bitmaps(s, &c);
    if (ret < 0 || c.bad) {
        free(c.rc);
        return ret < 0 ? ret : -EIO;
    }
    /* the last cluster in use */
    uint64_t used = c.n;
    while (used && !c.rc[used - 1])
        used--;

    /* new table and blocks right after it; the area counts itself */
    uint64_t start = used, tc = 1, nb = 0;
    for (;;) {
        uint64_t end = start + tc + nb;
        uint64_t need_nb = (end + s->rb_entries - 1) >> s->rb_bits;
        uint64_t need_tc = (need_nb * 8 + cs - 1) / cs;
        if (need_nb == nb && need_tc <= tc)
            break;
        nb = need_nb;
        tc = MAX(tc, need_tc);
    }
    if (tc * cs > QCOW2_MAX_REFTABLE_SIZE) {
        free(c.rc);
        return -EFBIG;
    }
    uint64_t end = start + tc + nb;
    uint8_t *blocks = xcalloc(nb, cs);
    uint64_t *table = xcalloc(tc * cs / 8, 8);
    for (uint64_t ci = 0; ci < end; ci++) {
        uint64_t v = ci < used ? c.rc[ci] : 1;
        if (v > s->refcount_max)
            v = s->refcount_max;
        if (v)
            qcow2_refcount_set(blocks + (ci >> s->rb_bits) * cs, s->refcount_order,
                               ci & (s->rb_entries - 1), v);
    }
    free(c.rc);
    for (uint64_t j = 0; j < nb; j++)
        table[j] = htobe64((start + tc + j) << s->cluster_bits);
    ret = bnode_co_pwrite(s->bs->file, (start + tc) << s->cluster_bits, nb * cs, blocks,
                          BREQ_BEYOND_EOF);
    if (ret == 0)
        ret = bnode_co_pwrite(s->bs->file, start << s->cluster_bits, tc * cs, table,
                              BREQ_BEYOND_EOF);
    if (ret == 0)
        ret = bnode_co_flush(s->bs->file);
    struct __attribute__((packed)) { uint64_t off; uint32_t clusters; } hdr = {
        htobe64(start << s->cluster_bits), htobe32((uint32_t)tc) };
    if (ret == 0)
        ret = bnode_co_pwrite(s->bs->file, offsetof(struct qcow2_header, refcount_table_offset),
                              sizeof(hdr), &hdr, 0);
    if (ret == 0)
        ret = bnode_co_flush(s->bs->file);
    free(blocks);
    if (ret < 0) {
        free(table);
        return ret;
    }
    /* the new structures replace the old ones in memory too */
    for (uint64_t i = 0; i < tc * cs / 8; i++)
        table[i] = be64toh(table[i]);
    for (uint64_t i = 0; i < s->reftable_size; i++)
        if (s->reftable[i] & QCOW2_REFT_OFFSET_MASK)
            qcow2_meta_del(s, s->reftable[i] & QCOW2_REFT_OFFSET_MASK, cs);
    qcow2_meta_del(s, s->reftable_offset, (uint64_t)s->reftable_clusters * cs);
    free(s->reftable);
    s->reftable = table;
    s->reftable_size = tc * cs / 8;
    s->reftable_offset = start << s->cluster_bits;
    s->reftable_clusters = (uint32_t)tc;
    qcow2_meta_add_kind(s, s->reftable_offset, tc * cs, QOL_REFCOUNT_TABLE);
    qcow2_meta_add_kind(s, (start + tc) << s->cluster_bits, nb * cs, QOL_REFCOUNT_BLOCK);
    s->alloc_end = MAX(s->alloc_end, end);
    s->free_cluster_index = 0;
    /* consistent again: clear the dirty bit */
    s->incompat &= ~QCOW2_INCOMPAT_DIRTY;
    uint64_t v = htobe64(s->incompat);
    ret = bnode_co_pwrite(s->bs->file, offsetof(struct qcow2_header, incompatible_features), 8,
                          &v, 0);
    if (ret == 0)
        ret = bnode_co_flush(s->bs->file);
    return ret;
}
