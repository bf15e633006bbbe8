/*
 * Copy-before-write: the fleecing filter of QEMU 7.2 (copy-before-write
 * driver), the snapshot view it offers to snapshot-access, and the copy
 * engine a backup job shares with it (QEMU's block-copy).
 *
 * A cbw keeps, per cluster of its source: whether it still has to be
 * copied to the target before the source may change ("need"), whether it
 * was copied ("done": the snapshot reads it from the target), and whether
 * the snapshot may be read there at all ("access").  A write reaching the
 * source first copies the clusters it covers that still need it; each
 * cluster is copied once, by whichever writer or job gets to it first.
 * Clusters the source reads as zeros (holes, zero clusters) are copied as
 * zero writes, so a sparse source gives a sparse target.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <jansson.h>
#include "util/error.h"

struct bnode;
struct cbw;
struct dirty_bitmap;

/* The state of a copy-before-write node (NULL if bs is not one). */
struct cbw *cbw_of(struct bnode *bs);

/* query-named-block-nodes "dirty-bitmaps": append QEMU's anonymous bitmaps
 * of the filter (filter_node) or of its source. */
void cbw_query_bitmaps(struct cbw *s, bool filter_node, json_t *list);

/* ---- the snapshot view (snapshot-access), in a coroutine ---- */
/* flags: the reader's BREQ_COPY_INLINE, passed to the reads it makes */
int  cbw_co_snapshot_read(struct cbw *s, uint64_t offset, uint64_t bytes, void *buf,
                          unsigned flags);
int  cbw_co_snapshot_discard(struct cbw *s, uint64_t offset, uint64_t bytes);
/* Status of the first extent of [offset, offset+bytes) in the snapshot. */
int  cbw_snapshot_block_status(struct cbw *s, uint64_t offset, uint64_t bytes,
                               uint64_t *pnum, unsigned *flags);

/* ---- for a backup job ---- */
uint64_t cbw_cluster_size(struct cbw *s);
/* Clusters [first, first+n) need no copy any more / need one. */
void cbw_set_need(struct cbw *s, uint64_t offset, uint64_t bytes, bool need);
void cbw_need_from_bitmap(struct cbw *s, struct dirty_bitmap *bm);
/* Bytes still to copy. */
uint64_t cbw_need_bytes(struct cbw *s);
/* In a coroutine: copy what still needs copying in [offset, offset+bytes),
 * waiting for copies already under way there.  0 or -errno (*error_is_read:
 * the source failed, else the target). */
int  cbw_co_copy(struct cbw *s, uint64_t offset, uint64_t bytes, bool *error_is_read);
/* A job's copies running side by side (QEMU's block-copy call with
 * x-perf max-workers and max-chunk): cbw_co_copy_async() starts copies of
 * what [offset, offset+bytes) still needs, at most max_workers of the call
 * at a time (it waits for one to end when at the cap), each at most
 * max_chunk bytes (0: no limit but the engine's own run), and returns
 * without waiting for them; clusters being copied by others (a guest
 * write's copy) are left to them.  An error of any copy of the call is
 * returned by the next cbw_co_copy_async() or cbw_co_call_drain(), after
 * the call's other copies ended.  In a coroutine; cbw_call_free() drains. */
struct cbw_call;
struct cbw_call *cbw_call_new(struct cbw *s, unsigned max_workers, uint64_t max_chunk);
int  cbw_co_copy_async(struct cbw *s, struct cbw_call *call, uint64_t offset, uint64_t bytes,
                       bool *error_is_read);
int  cbw_co_call_drain(struct cbw *s, struct cbw_call *call, bool *error_is_read);
void cbw_call_free(struct cbw *s, struct cbw_call *call);
/* The first byte offset >= offset that still needs a copy, or the size. */
uint64_t cbw_next_need(struct cbw *s, uint64_t offset);
/* Data reaches the target as compressed writes (BREQ_WRITE_COMPRESSED;
 * zeroes stay zero writes), as QEMU's block-copy with compress. */
void cbw_set_compress(struct cbw *s, bool compress);
/* Called (any thread) with the bytes of every finished copy. */
void cbw_set_progress(struct cbw *s, void (*fn)(void *opaque, uint64_t bytes), void *opaque);

/* Put the filter node fbs above its source: every write reaching the
 * source (from any user) goes through it.  Writes are held until those
 * already issued complete, then ready(opaque) runs in the main loop and
 * the snapshot point is set.  Remove it again with cbw_remove(). */
void cbw_insert(struct bnode *fbs, void (*ready)(void *opaque), void *opaque);
void cbw_remove(struct bnode *fbs);
