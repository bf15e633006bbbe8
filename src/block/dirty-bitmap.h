/*
 * Dirty bitmaps: which granules of a node were written since a point in
 * time (QEMU's BdrvDirtyBitmap).
 *
 * A node owns its bitmaps (bs->dirty_bitmaps, newest first as QEMU lists
 * them).  A bitmap covers the node's size in granules of `granularity`
 * bytes (a power of two >= 512); its bits live in a paged bitmap
 * (util/pbitmap.h).  Named bitmaps are what QMP and NBD see; anonymous ones
 * are internal (a backup job's successor, a merge's scratch).
 *
 * States, as QEMU has them: enabled bitmaps record writes; a busy bitmap is
 * in use (exported over NBD, held by a job) and QMP may not change it; a
 * readonly one belongs to a read-only image and may not change at all; an
 * inconsistent one was left in use by a crash and may only be removed.
 *
 * Threads: the list and every bitmap's bits are guarded by the node's
 * dirty_lock.  The data path (bnode_set_dirty) runs in any loop thread and
 * takes the lock only when the node has a recording bitmap; control
 * operations run in the main thread.  Functions named *_locked expect the
 * caller to hold dirty_lock (dirty_bitmaps_lock/unlock).
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <jansson.h>
#include "util/error.h"

struct bnode;
struct pbitmap;

struct dirty_bitmap {
    struct bnode *bs;
    char *name;                   /* NULL: anonymous */
    uint64_t size;                /* bytes covered (the node's size) */
    uint32_t granularity;         /* bytes per bit */
    unsigned shift;               /* log2(granularity) */
    struct pbitmap *bits;
    bool disabled;                /* does not record writes */
    bool busy;                    /* in use by an export or a job */
    bool readonly;                /* of a read-only image: never changes */
    bool persistent;              /* stored with the image */
    bool inconsistent;            /* stored in use by a crashed writer */
    struct dirty_bitmap *successor;   /* records for it while a job runs */
    uint64_t changes;             /* bumped whenever bits may have changed (a
                                   * driver storing them skips unchanged ones) */
    struct dirty_bitmap *next;
};

/* What dirty_bitmap_check() refuses, and QEMU's combinations of them. */
enum {
    DBM_CHECK_BUSY         = 1u << 0,
    DBM_CHECK_RO           = 1u << 1,
    DBM_CHECK_INCONSISTENT = 1u << 2,
    DBM_CHECK_DEFAULT      = DBM_CHECK_BUSY | DBM_CHECK_RO | DBM_CHECK_INCONSISTENT,
    DBM_CHECK_ALLOW_RO     = DBM_CHECK_BUSY | DBM_CHECK_INCONSISTENT,
};

#define DIRTY_BITMAP_NAME_MAX 1023

/* ---- node lifetime (block.c) ---- */
void dirty_bitmaps_init(struct bnode *bs);
void dirty_bitmaps_release_all(struct bnode *bs);   /* at close */
/* The node changed size: every bitmap follows (new bytes clean). */
void dirty_bitmaps_truncate(struct bnode *bs, uint64_t size);

/* ---- data path (any loop thread) ---- */
/* A write, write-zeroes or discard of [offset, offset+bytes) reached bs:
 * mark it in every recording bitmap.  Callers test bs->dirty_recording
 * first (an atomic count), so nodes without bitmaps pay one load. */
void bnode_set_dirty(struct bnode *bs, uint64_t offset, uint64_t bytes);

void dirty_bitmaps_lock(struct bnode *bs);      /* recursive */
void dirty_bitmaps_unlock(struct bnode *bs);
/* Main thread: hold the lock of every node, so that no write marks any
 * bitmap until thawed (a transaction's actions appear at one instant).
 * Nothing may wait for another thread's I/O meanwhile. */
struct bnode **dirty_bitmaps_freeze_all(size_t *n);
void dirty_bitmaps_thaw_all(struct bnode **held, size_t n);

/* ---- control (main thread) ---- */
struct dirty_bitmap *dirty_bitmap_find(struct bnode *bs, const char *name);
/* QEMU's lookup: "Node '%s' not found", "Dirty bitmap '%s' not found". */
struct dirty_bitmap *dirty_bitmap_lookup(const char *node, const char *name,
                                         struct bnode **pbs, error **errp);
/* granularity 0: the node's default.  name NULL: anonymous. */
struct dirty_bitmap *dirty_bitmap_create(struct bnode *bs, uint32_t granularity,
                                         const char *name, error **errp);
void dirty_bitmap_release(struct dirty_bitmap *bm);
uint32_t dirty_bitmap_default_granularity(struct bnode *bs);
int  dirty_bitmap_check(const struct dirty_bitmap *bm, unsigned flags, error **errp);

void dirty_bitmap_set_enabled(struct dirty_bitmap *bm, bool enabled);
void dirty_bitmap_set_busy(struct dirty_bitmap *bm, bool busy);
bool dirty_bitmap_recording(const struct dirty_bitmap *bm);
/* Bytes in dirty granules, whole granules (QEMU's "count"). */
uint64_t dirty_bitmap_count(struct dirty_bitmap *bm);

/* Clear every bit; with backup, hand the old bits to the caller (who
 * restores or frees them), as a transaction needs. */
int  dirty_bitmap_clear(struct dirty_bitmap *bm, struct pbitmap **backup);
void dirty_bitmap_restore(struct dirty_bitmap *bm, struct pbitmap *backup);
/* dst |= src after QEMU's checks (dst DEFAULT, src ALLOW_RO, same size);
 * granularities may differ.  backup as for clear. */
int  dirty_bitmap_merge(struct dirty_bitmap *dst, struct dirty_bitmap *src,
                        struct pbitmap **backup, error **errp);
/* The same without checks (jobs, internal scratch bitmaps). */
void dirty_bitmap_merge_internal(struct dirty_bitmap *dst, struct dirty_bitmap *src);
/* Set or clear bytes [offset, offset+bytes) (jobs, loading). */
void dirty_bitmap_set_range(struct dirty_bitmap *bm, uint64_t offset, uint64_t bytes);
void dirty_bitmap_reset_range(struct dirty_bitmap *bm, uint64_t offset, uint64_t bytes);
void dirty_bitmap_set_all(struct dirty_bitmap *bm);

/* SHA-256 of the bits in QEMU's layout, as 64 hex digits. */
void dirty_bitmap_sha256(struct dirty_bitmap *bm, char hex[65]);

/* Jobs: a successor records writes while bm is frozen (busy); then either
 * abdicate (the successor takes bm's place and name: bm's bits are dropped)
 * or reclaim (the successor's bits merge back into bm). */
int  dirty_bitmap_create_successor(struct dirty_bitmap *bm, error **errp);
struct dirty_bitmap *dirty_bitmap_abdicate(struct dirty_bitmap *bm);
struct dirty_bitmap *dirty_bitmap_reclaim(struct dirty_bitmap *bm);

/* Persistence (the driver's bitmaps_* hooks): may bs store a new
 * persistent bitmap (QEMU's error if not)?  Make bm persistent and store
 * it now (in use); forget its stored copy (block-dirty-bitmap-remove). */
int  dirty_bitmap_can_persist(struct bnode *bs, const char *name, uint32_t granularity,
                              error **errp);
int  dirty_bitmap_persist(struct dirty_bitmap *bm, error **errp);
int  dirty_bitmap_unpersist(struct dirty_bitmap *bm, error **errp);

/* query-named-block-nodes "dirty-bitmaps": NULL when the node has none. */
json_t *dirty_bitmaps_query(struct bnode *bs);

/* ---- reading (any thread, with dirty_bitmaps_lock held) ---- */
/* The first dirty area in [*offset, end): true with *offset and *bytes set
 * (bytes <= max_bytes), or false if all of it is clean.  Areas are whole
 * granules clipped to [*offset, end) and to the bitmap's size. */
bool dirty_bitmap_next_dirty_area_locked(struct dirty_bitmap *bm, uint64_t *offset,
                                         uint64_t end, uint64_t max_bytes, uint64_t *bytes);
/* The first clean byte offset in [offset, end), or end. */
uint64_t dirty_bitmap_next_zero_locked(struct dirty_bitmap *bm, uint64_t offset, uint64_t end);
bool dirty_bitmap_get_locked(struct dirty_bitmap *bm, uint64_t offset);

