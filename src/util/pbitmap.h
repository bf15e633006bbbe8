/*
 * Paged bitmaps: the bits behind dirty bitmaps, sized for whole disks.
 *
 * A bitmap of nbits bits is cut into pages of PBITMAP_PAGE_BITS bits (4 KiB
 * of words).  A page that is all zeros is not allocated, a page that is all
 * ones points at one shared read-only page, so memory follows the number of
 * partly dirty pages, not the disk size: a clean 1 TiB disk at 64 KiB
 * granularity costs a few hundred bytes, a fully dirty one the same.  Each
 * page keeps its count of set bits, and two summary bitmaps over the pages
 * (which are not all zeros, which are not all ones) let the next set or
 * clear bit be found by skipping whole pages a word at a time.
 *
 * The bit order is QEMU's (and the qcow2 bitmap extension's): bit i of the
 * bitmap is bit (i % 64) of little-endian 64-bit word i / 64, i.e. bit
 * (i % 8) of byte i / 8.  pbitmap_serialize() produces that flat layout.
 *
 * Not thread-safe: callers serialise (dirty-bitmap.c holds the node's lock).
 * No function fails: when a page cannot be allocated while setting bits,
 * the whole page is set (for dirty tracking, more dirty is safe); when one
 * cannot be allocated while clearing part of a full page, that page stays
 * full and pbitmap_clear_range returns false.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PBITMAP_PAGE_SHIFT 15                      /* 32768 bits = 4 KiB */
#define PBITMAP_PAGE_BITS  (1ull << PBITMAP_PAGE_SHIFT)

struct pbitmap;

/* NULL if the page table itself cannot be allocated. */
struct pbitmap *pbitmap_new(uint64_t nbits);
void pbitmap_free(struct pbitmap *b);
uint64_t pbitmap_size(const struct pbitmap *b);    /* nbits */
uint64_t pbitmap_count(const struct pbitmap *b);   /* bits set */
bool pbitmap_get(const struct pbitmap *b, uint64_t bit);

/* Ranges are clamped to [0, nbits). */
void pbitmap_set_range(struct pbitmap *b, uint64_t start, uint64_t n);
bool pbitmap_clear_range(struct pbitmap *b, uint64_t start, uint64_t n);
void pbitmap_set_all(struct pbitmap *b);
void pbitmap_clear_all(struct pbitmap *b);

/* First set (clear) bit in [start, end), or end if none. */
uint64_t pbitmap_next_set(const struct pbitmap *b, uint64_t start, uint64_t end);
uint64_t pbitmap_next_clear(const struct pbitmap *b, uint64_t start, uint64_t end);
/* How many 64-bit words (of pages and of the page summaries) the searches
 * above have read in this thread so far: the work a walk costs, counted
 * instead of timed (test-pbitmap bounds it by what the walk covers). */
uint64_t pbitmap_words_read(void);

/* dst |= src, both of the same size. */
void pbitmap_merge(struct pbitmap *dst, const struct pbitmap *src);
/* A copy, or NULL without memory. */
struct pbitmap *pbitmap_dup(const struct pbitmap *b);
/* Change the size; bits past the old end start clear.  false without memory
 * (the bitmap is unchanged then). */
bool pbitmap_resize(struct pbitmap *b, uint64_t nbits);

/* Number of bytes of the flat layout: whole 64-bit words, at least one, as
 * QEMU hashes them (x-debug-block-dirty-bitmap-sha256). */
size_t pbitmap_flat_bytes(const struct pbitmap *b);
/* Copy len bytes of the flat layout starting at byte off (off and len
 * multiples of 8 except at the end); bytes past nbits read as zero. */
void pbitmap_serialize(const struct pbitmap *b, uint64_t off, size_t len, uint8_t *out);
/* The reverse: OR len bytes of flat layout at byte off into the bitmap
 * (bits past nbits are ignored). */
void pbitmap_deserialize_or(struct pbitmap *b, uint64_t off, size_t len, const uint8_t *in);
