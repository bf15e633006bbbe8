/*
 * Dirty bitmaps of block nodes (see dirty-bitmap.h).
 *
 * Theory of operation.  Each node has a mutex, its list of bitmaps and an
 * atomic count of the bitmaps that record writes (enabled ones, successors
 * included).  The block layer calls bnode_set_dirty() for every write,
 * write-zeroes and discard that reaches a node whose count is not zero;
 * it takes the lock and sets the covering granules in each recording
 * bitmap.  Everything else runs in the main thread, under the same lock
 * whenever it changes the list, a bitmap's bits or whether it records, so
 * a writer in another loop always sees a consistent list.
 *
 * Byte ranges become granule ranges here: a range dirties every granule it
 * touches; a reset clears only the granules it covers whole, except at the
 * end of the bitmap, whose last granule may be short.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/pbitmap.h"
#include "util/sha256.h"
#include "util/xalloc.h"

void dirty_bitmaps_init(struct bnode *bs)
{
    pthread_mutexattr_t attr;

    /* recursive: a transaction holds every node's lock while its actions
     * run, and they take it again */
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&bs->dirty_lock, &attr);
    pthread_mutexattr_destroy(&attr);
    bs->dirty_bitmaps = NULL;
    bs->dirty_recording = 0;
}

void dirty_bitmaps_lock(struct bnode *bs)
{
    pthread_mutex_lock(&bs->dirty_lock);
}

void dirty_bitmaps_unlock(struct bnode *bs)
{
    pthread_mutex_unlock(&bs->dirty_lock);
}

struct bnode **dirty_bitmaps_freeze_all(size_t *n)
{
    size_t count = 0, i = 0;
    for (struct bnode *bs = bnode_first(); bs; bs = bs->next)
        count++;
    struct bnode **held = xcalloc(count ? count : 1, sizeof(*held));
    for (struct bnode *bs = bnode_first(); bs; bs = bs->next) {
        dirty_bitmaps_lock(bs);
        held[i++] = bs;
    }
    *n = count;
    return held;
}

void dirty_bitmaps_thaw_all(struct bnode **held, size_t n)
{
    for (size_t i = n; i-- > 0;)
        dirty_bitmaps_unlock(held[i]);
    free(held);
}

/* ---- granules ---- */

static uint64_t nbits_for(uint64_t size, unsigned shift)
{
    return (size >> shift) + ((size & ((1ull << shift) - 1)) != 0);
}

/* Granules touched by [offset, offset+bytes), clamped to the bitmap. */
static bool touched(const struct dirty_bitmap *bm, uint64_t offset, uint64_t bytes,
                    uint64_t *first, uint64_t *n)
{
    if (bytes == 0 || offset >= bm->size)
        return false;
    uint64_t end = bytes > bm->size - offset ? bm->size : offset + bytes;
    *first = offset >> bm->shift;
    *n = ((end - 1) >> bm->shift) - *first + 1;
    return true;
}

/* Granules covered whole by [offset, offset+bytes); the short last granule
 * counts as covered when the range reaches the end of the bitmap. */
static bool covered(const struct dirty_bitmap *bm, uint64_t offset, uint64_t bytes,
                    uint64_t *first, uint64_t *n)
{
    if (bytes == 0 || offset >= bm->size)
        return false;
    uint64_t g = bm->granularity;
    uint64_t end = bytes > bm->size - offset ? bm->size : offset + bytes;
    uint64_t a = (offset + g - 1) >> bm->shift;
    uint64_t z = end == bm->size ? nbits_for(bm->size, bm->shift) : end >> bm->shift;
    if (z <= a)
        return false;
    *first = a;
    *n = z - a;
    return true;
}

/* ---- the recording count ---- */

static void set_disabled_locked(struct dirty_bitmap *bm, bool disabled)
{
    if (bm->disabled == disabled)
        return;
    bm->disabled = disabled;
    __atomic_add_fetch(&bm->bs->dirty_recording, disabled ? -1 : 1, __ATOMIC_RELAXED);
}

/* ---- data path ---- */

void bnode_set_dirty(struct bnode *bs, uint64_t offset, uint64_t bytes)
{
    uint64_t first, n;

    pthread_mutex_lock(&bs->dirty_lock);
    for (struct dirty_bitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next)
        if (!bm->disabled && touched(bm, offset, bytes, &first, &n)) {
            pbitmap_set_range(bm->bits, first, n);
            bm->changes++;
        }
    pthread_mutex_unlock(&bs->dirty_lock);
}

/* ---- lifetime ---- */

uint32_t dirty_bitmap_default_granularity(struct bnode *bs)
{
    /* QEMU: the cluster size clamped to [4 KiB, 64 KiB]; 64 KiB without one */
    uint32_t cs = bs->drv->cluster_size ? bs->drv->cluster_size(bs) : 0;
    if (!cs)
        return 65536;
    return cs < 4096 ? 4096 : cs > 65536 ? 65536 : cs;
}

struct dirty_bitmap *dirty_bitmap_find(struct bnode *bs, const char *name)
{
    for (struct dirty_bitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next)
        if (bm->name && !strcmp(bm->name, name))
            return bm;
    return NULL;
}

struct dirty_bitmap *dirty_bitmap_lookup(const char *node, const char *name,
                                         struct bnode **pbs, error **errp)
{
    struct bnode *bs = bnode_find(node);
    if (!bs) {
        error_setg(errp, "Node '%s' not found", node);
        return NULL;
    }
    struct dirty_bitmap *bm = dirty_bitmap_find(bs, name);
    if (!bm) {
        error_setg(errp, "Dirty bitmap '%s' not found", name);
        return NULL;
    }
    if (pbs)
        *pbs = bs;
    return bm;
}

struct dirty_bitmap *dirty_bitmap_create(struct bnode *bs, uint32_t granularity,
                                         const char *name, error **errp)
{
    if (!granularity)
        granularity = dirty_bitmap_default_granularity(bs);
    if (name && dirty_bitmap_find(bs, name)) {
        error_setg(errp, "Bitmap already exists: %s", name);
        return NULL;
    }
    struct dirty_bitmap *bm = xzalloc(sizeof(*bm));
    bm->bs = bs;
    bm->size = bs->size;
    bm->granularity = granularity;
    bm->shift = (unsigned)__builtin_ctz(granularity);
    bm->name = xstrdup_opt(name);
    bm->bits = pbitmap_new(nbits_for(bm->size, bm->shift));
    bm->disabled = true;
    if (!bm->bits) {                /* a huge bitmap's page table: an error, not an abort */
        free(bm->name);
        free(bm);
        error_setg(errp, "Cannot allocate a dirty bitmap of %" PRIu64
                   " bytes at granularity %u", bs->size, granularity);
        return NULL;
    }
    dirty_bitmaps_lock(bs);
    bm->next = bs->dirty_bitmaps;
    bs->dirty_bitmaps = bm;
    set_disabled_locked(bm, false);
    dirty_bitmaps_unlock(bs);
    return bm;
}

void dirty_bitmap_release(struct dirty_bitmap *bm)
{
    struct bnode *bs = bm->bs;

    dirty_bitmaps_lock(bs);
    set_disabled_locked(bm, true);
    for (struct dirty_bitmap **pp = &bs->dirty_bitmaps; *pp; pp = &(*pp)->next) {
        if (*pp == bm) {
            *pp = bm->next;
            break;
        }
    }
    dirty_bitmaps_unlock(bs);
    pbitmap_free(bm->bits);
    free(bm->name);
    free(bm);
}

void dirty_bitmaps_release_all(struct bnode *bs)
{
    while (bs->dirty_bitmaps)
        dirty_bitmap_release(bs->dirty_bitmaps);
    pthread_mutex_destroy(&bs->dirty_lock);
}

void dirty_bitmaps_truncate(struct bnode *bs, uint64_t size)
{
    dirty_bitmaps_lock(bs);
    for (struct dirty_bitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        if (pbitmap_resize(bm->bits, nbits_for(size, bm->shift))) {
            bm->size = size;
            bm->changes++;
        } else {
            log_warn("dirty bitmap '%s' of node '%s' could not follow a resize",
                     bm->name ? bm->name : "", bs->node_name);
        }
    }
    dirty_bitmaps_unlock(bs);
}

/* ---- state ---- */

int dirty_bitmap_check(const struct dirty_bitmap *bm, unsigned flags, error **errp)
{
    if ((flags & DBM_CHECK_BUSY) && bm->busy) {
        error_setg(errp, "Bitmap '%s' is currently in use by another operation and cannot be used",
                   bm->name);
        return -1;
    }
    if ((flags & DBM_CHECK_RO) && bm->readonly) {
        error_setg(errp, "Bitmap '%s' is readonly and cannot be modified", bm->name);
        return -1;
    }
    if ((flags & DBM_CHECK_INCONSISTENT) && bm->inconsistent) {
        error_setg(errp, "Bitmap '%s' is inconsistent and cannot be used", bm->name);
        return -1;
    }
    return 0;
}

void dirty_bitmap_set_enabled(struct dirty_bitmap *bm, bool enabled)
{
    dirty_bitmaps_lock(bm->bs);
    set_disabled_locked(bm, !enabled);
    dirty_bitmaps_unlock(bm->bs);
}

void dirty_bitmap_set_busy(struct dirty_bitmap *bm, bool busy)
{
    bm->busy = busy;
}

bool dirty_bitmap_recording(const struct dirty_bitmap *bm)
{
    return !bm->disabled || (bm->successor && !bm->successor->disabled);
}

uint64_t dirty_bitmap_count(struct dirty_bitmap *bm)
{
    dirty_bitmaps_lock(bm->bs);
    uint64_t n = pbitmap_count(bm->bits);
    dirty_bitmaps_unlock(bm->bs);
    return n << bm->shift;
}

/* ---- changing bits from the monitor and jobs ---- */

int dirty_bitmap_clear(struct dirty_bitmap *bm, struct pbitmap **backup)
{
    if (backup) {
        struct pbitmap *fresh = pbitmap_new(pbitmap_size(bm->bits));
        if (!fresh)
            return -ENOMEM;
        dirty_bitmaps_lock(bm->bs);
        *backup = bm->bits;
        bm->bits = fresh;
        bm->changes++;
        dirty_bitmaps_unlock(bm->bs);
        return 0;
    }
    dirty_bitmaps_lock(bm->bs);
    pbitmap_clear_all(bm->bits);
    bm->changes++;
    dirty_bitmaps_unlock(bm->bs);
    return 0;
}

void dirty_bitmap_restore(struct dirty_bitmap *bm, struct pbitmap *backup)
{
    dirty_bitmaps_lock(bm->bs);
    struct pbitmap *old = bm->bits;
    bm->bits = backup;
    bm->changes++;
    dirty_bitmaps_unlock(bm->bs);
    pbitmap_free(old);
}

/* Lock the nodes of two bitmaps in a fixed order (by address). */
static void lock_pair(struct bnode *a, struct bnode *b)
{
    if (a == b) {
        dirty_bitmaps_lock(a);
    } else if (a < b) {
        dirty_bitmaps_lock(a);
        dirty_bitmaps_lock(b);
    } else {
        dirty_bitmaps_lock(b);
        dirty_bitmaps_lock(a);
    }
}

static void unlock_pair(struct bnode *a, struct bnode *b)
{
    dirty_bitmaps_unlock(a);
    if (a != b)
        dirty_bitmaps_unlock(b);
}

/* dst |= src with both locked. */
static void merge_locked(struct dirty_bitmap *dst, struct dirty_bitmap *src)
{
    if (dst == src)
        return;
    dst->changes++;
    if (dst->granularity == src->granularity) {
        pbitmap_merge(dst->bits, src->bits);
        return;
    }
    /* different granularities: carry the dirty areas over as byte ranges */
    uint64_t off = 0, len;
    while (dirty_bitmap_next_dirty_area_locked(src, &off, src->size, UINT64_MAX, &len)) {
        uint64_t first, n;
        if (touched(dst, off, len, &first, &n))
            pbitmap_set_range(dst->bits, first, n);
        off += len;
    }
}

void dirty_bitmap_merge_internal(struct dirty_bitmap *dst, struct dirty_bitmap *src)
{
    lock_pair(dst->bs, src->bs);
    merge_locked(dst, src);
    unlock_pair(dst->bs, src->bs);
}

int dirty_bitmap_merge(struct dirty_bitmap *dst, struct dirty_bitmap *src,
                       struct pbitmap **backup, error **errp)
{
    if (dirty_bitmap_check(dst, DBM_CHECK_DEFAULT, errp) < 0 ||
        dirty_bitmap_check(src, DBM_CHECK_ALLOW_RO, errp) < 0)
        return -1;
    if (src->size != dst->size) {
        error_setg(errp, "Bitmaps are of different sizes (destination size is %" PRIu64
                   ", source size is %" PRIu64 ") and can't be merged", dst->size, src->size);
        return -1;
    }
    if (backup) {
        struct pbitmap *copy = pbitmap_dup(dst->bits);
        if (!copy) {
            error_setg(errp, "Cannot allocate a copy of bitmap '%s'", dst->name);
            return -1;
        }
        *backup = copy;
    }
    dirty_bitmap_merge_internal(dst, src);
    return 0;
}

void dirty_bitmap_set_range(struct dirty_bitmap *bm, uint64_t offset, uint64_t bytes)
{
    uint64_t first, n;
    dirty_bitmaps_lock(bm->bs);
    if (touched(bm, offset, bytes, &first, &n))
        pbitmap_set_range(bm->bits, first, n);
    bm->changes++;
    dirty_bitmaps_unlock(bm->bs);
}

void dirty_bitmap_reset_range(struct dirty_bitmap *bm, uint64_t offset, uint64_t bytes)
{
    uint64_t first, n;
    dirty_bitmaps_lock(bm->bs);
    if (covered(bm, offset, bytes, &first, &n))
        pbitmap_clear_range(bm->bits, first, n);
    bm->changes++;
    dirty_bitmaps_unlock(bm->bs);
}

void dirty_bitmap_set_all(struct dirty_bitmap *bm)
{
    dirty_bitmaps_lock(bm->bs);
    pbitmap_set_all(bm->bits);
    bm->changes++;
    dirty_bitmaps_unlock(bm->bs);
}

void dirty_bitmap_sha256(struct dirty_bitmap *bm, char hex[65])
{
    struct sha256 ctx;
    uint8_t buf[4096], digest[32];

    sha256_init(&ctx);
    dirty_bitmaps_lock(bm->bs);
    size_t total = pbitmap_flat_bytes(bm->bits);
    for (size_t off = 0; off < total; off += sizeof(buf)) {
        size_t n = MIN(sizeof(buf), total - off);
        pbitmap_serialize(bm->bits, off, n, buf);
        sha256_update(&ctx, buf, n);
    }
    dirty_bitmaps_unlock(bm->bs);
    sha256_final(&ctx, digest);
    sha256_hex(digest, hex);
}

/* ---- successors (jobs) ---- */

int dirty_bitmap_create_successor(struct dirty_bitmap *bm, error **errp)
{
    if (bm->busy) {
        error_setg(errp, "Cannot create a successor for a bitmap that is in-use by an operation");
        return -1;
    }
    if (bm->successor) {
        error_setg(errp, "Cannot create a successor for a bitmap that already has one");
        return -1;
    }
    struct dirty_bitmap *child = dirty_bitmap_create(bm->bs, bm->granularity, NULL, errp);
    if (!child)
        return -1;
    dirty_bitmaps_lock(bm->bs);
    set_disabled_locked(child, bm->disabled);   /* records if bm did */
    set_disabled_locked(bm, true);
    bm->successor = child;
    bm->busy = true;
    dirty_bitmaps_unlock(bm->bs);
    return 0;
}

struct dirty_bitmap *dirty_bitmap_abdicate(struct dirty_bitmap *bm)
{
    struct dirty_bitmap *succ = bm->successor;
    if (!succ)
        return NULL;
    dirty_bitmaps_lock(bm->bs);
    succ->name = bm->name;
    bm->name = NULL;
    succ->persistent = bm->persistent;
    bm->persistent = false;
    bm->successor = NULL;
    bm->busy = false;
    dirty_bitmaps_unlock(bm->bs);
    dirty_bitmap_release(bm);
    return succ;
}

struct dirty_bitmap *dirty_bitmap_reclaim(struct dirty_bitmap *bm)
{
    struct dirty_bitmap *succ = bm->successor;
    if (!succ)
        return NULL;
    dirty_bitmaps_lock(bm->bs);
    merge_locked(bm, succ);
    set_disabled_locked(bm, succ->disabled);
    bm->busy = false;
    bm->successor = NULL;
    dirty_bitmaps_unlock(bm->bs);
    dirty_bitmap_release(succ);
    return bm;
}

/* ---- persistence ---- */

int dirty_bitmap_can_persist(struct bnode *bs, const char *name, uint32_t granularity,
                             error **errp)
{
    if (!bs->drv->bitmap_can_store) {
        error_setg(errp, "Can't store persistent bitmaps to %s: Operation not supported",
                   bs->node_name);
        return -1;
    }
    return bs->drv->bitmap_can_store(bs, name, granularity, errp);
}

int dirty_bitmap_persist(struct dirty_bitmap *bm, error **errp)
{
    struct bnode *bs = bm->bs;
    bm->persistent = true;
    if (bs->drv->bitmaps_update && bs->drv->bitmaps_update(bs, errp) < 0) {
        bm->persistent = false;
        return -1;
    }
    return 0;
}

int dirty_bitmap_unpersist(struct dirty_bitmap *bm, error **errp)
{
    struct bnode *bs = bm->bs;
    if (!bm->persistent)
        return 0;
    bm->persistent = false;
    if (bs->drv->bitmaps_update && bs->drv->bitmaps_update(bs, errp) < 0) {
        bm->persistent = true;
        return -1;
    }
    return 0;
}

/* ---- queries ---- */

json_t *dirty_bitmaps_query(struct bnode *bs)
{
    if (!bs->dirty_bitmaps)
        return NULL;
    json_t *list = json_array();
    for (struct dirty_bitmap *bm = bs->dirty_bitmaps; bm; bm = bm->next) {
        json_t *info = json_object();
        if (bm->name)
            json_object_set_new(info, "name", json_string(bm->name));
        json_object_set_new(info, "recording", json_boolean(dirty_bitmap_recording(bm)));
        json_object_set_new(info, "persistent", json_boolean(bm->persistent));
        json_object_set_new(info, "busy", json_boolean(bm->busy));
        json_object_set_new(info, "granularity", json_integer(bm->granularity));
        json_object_set_new(info, "count", json_integer((json_int_t)dirty_bitmap_count(bm)));
        if (bm->inconsistent)
            json_object_set_new(info, "inconsistent", json_true());
        json_array_append_new(list, info);
    }
    return list;
}

/* ---- reading ---- */

bool dirty_bitmap_get_locked(struct dirty_bitmap *bm, uint64_t offset)
{
    return offset < bm->size && pbitmap_get(bm->bits, offset >> bm->shift);
}

bool dirty_bitmap_next_dirty_area_locked(struct dirty_bitmap *bm, uint64_t *offset,
                                         uint64_t end, uint64_t max_bytes, uint64_t *bytes)
{
    uint64_t start = *offset;

    end = MIN(end, bm->size);
    if (start >= end || max_bytes == 0)
        return false;
    uint64_t endbit = nbits_for(end, bm->shift);
    uint64_t b = pbitmap_next_set(bm->bits, start >> bm->shift, endbit);
    if (b >= endbit)
        return false;
    uint64_t s = MAX(start, b << bm->shift);
    if (s >= end)
        return false;
    uint64_t z = pbitmap_next_clear(bm->bits, b, endbit);
    uint64_t e = z >= endbit ? end : MIN(end, z << bm->shift);
    *offset = s;
    *bytes = MIN(e - s, max_bytes);
    return true;
}

uint64_t dirty_bitmap_next_zero_locked(struct dirty_bitmap *bm, uint64_t offset, uint64_t end)
{
    end = MIN(end, bm->size);
    if (offset >= end)
        return end;
    uint64_t endbit = nbits_for(end, bm->shift);
    uint64_t z = pbitmap_next_clear(bm->bits, offset >> bm->shift, endbit);
    if (z >= endbit)
        return end;
    return MAX(offset, z << bm->shift);
}
