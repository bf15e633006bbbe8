/*
 * Paged bitmaps (see pbitmap.h).
 *
 * Theory of operation.  pages[p] is NULL (all zeros), FULL (the shared
 * all-ones page) or an allocated page of PAGE_WORDS words; counts[p] is the
 * number of bits set in page p, so it is 0 exactly for NULL pages and
 * page_bits(p) exactly for FULL ones (the last page may be shorter; its
 * words past nbits stay zero in an allocated page).  nonzero and notfull
 * have one bit per page and are kept in step with counts by page_update(),
 * the only place a count changes.  A range operation walks the pages it
 * touches: a page covered whole becomes NULL or FULL without looking at its
 * words, a partly covered one is materialised and changed word by word.
 */
#include <endian.h>
#include <stdlib.h>
#include <string.h>
#include "util/pbitmap.h"

#define PAGE_WORDS (PBITMAP_PAGE_BITS / 64)
#define PAGE_BYTES (PBITMAP_PAGE_BITS / 8)

static const uint64_t full_page[PAGE_WORDS] = {
    [0 ... PAGE_WORDS - 1] = ~0ull,
};
#define FULL ((uint64_t *)full_page)

struct pbitmap {
    uint64_t nbits;
    uint64_t count;
    uint64_t npages;
    uint64_t **pages;
    uint32_t *counts;
    uint64_t *nonzero;           /* one bit per page: counts[p] > 0 */
    uint64_t *notfull;           /* one bit per page: counts[p] < page_bits(p) */
};

/* Words read by sum_next() and page_scan() in this thread (one add per
 * call, not per word). */
static _Thread_local uint64_t words_read;

uint64_t pbitmap_words_read(void)
{
    return words_read;
}

static uint64_t div_up(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

static uint64_t page_bits(const struct pbitmap *b, uint64_t p)
{
    uint64_t start = p << PBITMAP_PAGE_SHIFT;
    return b->nbits - start < PBITMAP_PAGE_BITS ? b->nbits - start : PBITMAP_PAGE_BITS;
}

static void sum_put(uint64_t *sum, uint64_t p, bool on)
{
    if (on)
        sum[p / 64] |= 1ull << (p % 64);
    else
        sum[p / 64] &= ~(1ull << (p % 64));
}

/* First page >= p (and < npages) whose bit is set in sum, or npages. */
static uint64_t sum_next(const struct pbitmap *b, const uint64_t *sum, uint64_t p)
{
    uint64_t nwords = div_up(b->npages, 64);
    uint64_t w = p / 64;

    if (p >= b->npages)
        return b->npages;
    uint64_t w0 = w;
    uint64_t word = sum[w] & (~0ull << (p % 64));
    while (!word) {
        if (++w >= nwords) {
            words_read += w - w0;
            return b->npages;
        }
        word = sum[w];
    }
    words_read += w - w0 + 1;
    p = w * 64 + (uint64_t)__builtin_ctzll(word);
    return p < b->npages ? p : b->npages;
}

static void page_update(struct pbitmap *b, uint64_t p, uint64_t newcount)
{
    b->count = b->count - b->counts[p] + newcount;
    b->counts[p] = (uint32_t)newcount;
    sum_put(b->nonzero, p, newcount > 0);
    sum_put(b->notfull, p, newcount < page_bits(b, p));
}

static void page_drop(struct pbitmap *b, uint64_t p)
{
    if (b->pages[p] && b->pages[p] != FULL)
        free(b->pages[p]);
    b->pages[p] = NULL;
}

/* An allocated copy of page p (NULL or FULL turned into words), or NULL
 * without memory.  The last page's words past nbits are kept zero. */
static uint64_t *page_materialise(struct pbitmap *b, uint64_t p)
{
    uint64_t *pg = b->pages[p];
    if (pg && pg != FULL)
        return pg;
    uint64_t *n = malloc(PAGE_BYTES);
    if (!n)
        return NULL;
    if (!pg) {
        memset(n, 0, PAGE_BYTES);
    } else {
        uint64_t bits = page_bits(b, p);
        memset(n, 0, PAGE_BYTES);
        memset(n, 0xff, bits / 64 * 8);
        if (bits % 64)
            n[bits / 64] = (1ull << (bits % 64)) - 1;
    }
    b->pages[p] = n;
    return n;
}

struct pbitmap *pbitmap_new(uint64_t nbits)
{
    struct pbitmap *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    b->nbits = nbits;
    b->npages = div_up(nbits, PBITMAP_PAGE_BITS);
    uint64_t sw = div_up(b->npages, 64) ? div_up(b->npages, 64) : 1;
    b->pages = calloc(b->npages ? b->npages : 1, sizeof(*b->pages));
    b->counts = calloc(b->npages ? b->npages : 1, sizeof(*b->counts));
    b->nonzero = calloc(sw, sizeof(uint64_t));
    b->notfull = calloc(sw, sizeof(uint64_t));
    if (!b->pages || !b->counts || !b->nonzero || !b->notfull) {
        pbitmap_free(b);
        return NULL;
    }
    for (uint64_t p = 0; p < b->npages; p++)
        sum_put(b->notfull, p, true);
    return b;
}

void pbitmap_free(struct pbitmap *b)
{
    if (!b)
        return;
    for (uint64_t p = 0; b->pages && p < b->npages; p++)
        page_drop(b, p);
    free(b->pages);
    free(b->counts);
    free(b->nonzero);
    free(b->notfull);
    free(b);
}

uint64_t pbitmap_size(const struct pbitmap *b) { return b->nbits; }
uint64_t pbitmap_count(const struct pbitmap *b) { return b->count; }

bool pbitmap_get(const struct pbitmap *b, uint64_t bit)
{
    if (bit >= b->nbits)
        return false;
    const uint64_t *pg = b->pages[bit >> PBITMAP_PAGE_SHIFT];
    uint64_t i = bit & (PBITMAP_PAGE_BITS - 1);
    return pg && (pg[i / 64] >> (i % 64) & 1);
}

/* Mask of bits [lo, hi) of a word, 0 <= lo < hi <= 64. */
static uint64_t word_mask(unsigned lo, unsigned hi)
{
    uint64_t m = hi == 64 ? ~0ull : (1ull << hi) - 1;
    return m & (~0ull << lo);
}

/* Set or clear bits [lo, hi) of page p (page-relative); false without memory. */
static bool page_change(struct pbitmap *b, uint64_t p, uint64_t lo, uint64_t hi, bool set)
{
    uint64_t bits = page_bits(b, p);

    if (lo == 0 && hi >= bits) {
        page_drop(b, p);
        if (set)
            b->pages[p] = FULL;
        page_update(b, p, set ? bits : 0);
        return true;
    }
    if ((set && b->pages[p] == FULL) || (!set && !b->pages[p]))
        return true;
    uint64_t *pg = page_materialise(b, p);
    if (!pg) {
        if (set) {             /* more dirty is safe */
            page_drop(b, p);
            b->pages[p] = FULL;
            page_update(b, p, bits);
        }
        return set;
    }
    int64_t delta = 0;
    for (uint64_t w = lo / 64; w * 64 < hi; w++) {
        unsigned a = w * 64 < lo ? (unsigned)(lo % 64) : 0;
        unsigned z = (w + 1) * 64 > hi ? (unsigned)(hi % 64) : 64;
        uint64_t m = word_mask(a, z);
        uint64_t old = pg[w];
        pg[w] = set ? old | m : old & ~m;
        delta += __builtin_popcountll(pg[w]) - __builtin_popcountll(old);
    }
    uint64_t nc = (uint64_t)((int64_t)b->counts[p] + delta);
    if (nc == 0) {
        page_drop(b, p);
    } else if (nc == bits) {
        page_drop(b, p);
        b->pages[p] = FULL;
    }
    page_update(b, p, nc);
    return true;
}

static bool range_change(struct pbitmap *b, uint64_t start, uint64_t n, bool set)
{
    bool ok = true;
    if (start >= b->nbits)
        return true;
    uint64_t end = n > b->nbits - start ? b->nbits : start + n;
    while (start < end) {
        uint64_t p = start >> PBITMAP_PAGE_SHIFT;
        uint64_t base = p << PBITMAP_PAGE_SHIFT;
        uint64_t hi = end - base < PBITMAP_PAGE_BITS ? end - base : PBITMAP_PAGE_BITS;
        ok &= page_change(b, p, start - base, hi, set);
        start = base + hi;
    }
    return ok;
}

/* Marking a write (dirty-bitmap.c, for every write of a node with a
 * recording bitmap) sets a few bits of one word, and most of the time they
 * are set already: that case reads one word and returns; bits new to a
 * page that stays partly set change the word and the counts, whose
 * summaries cannot change (an allocated page is neither empty nor full
 * before or after).  Anything else takes the general walk. */
void pbitmap_set_range(struct pbitmap *b, uint64_t start, uint64_t n)
{
    if (start < b->nbits && n && n <= 64 - start % 64 && n <= b->nbits - start) {
        uint64_t p = start >> PBITMAP_PAGE_SHIFT;
        uint64_t *pg = b->pages[p];
        if (pg == FULL)
            return;
        if (pg && b->counts[p]) {
            uint64_t i = start & (PBITMAP_PAGE_BITS - 1);
            uint64_t m = word_mask((unsigned)(i % 64), (unsigned)(i % 64 + n));
            uint64_t old = pg[i / 64];
            if ((old & m) == m)
                return;
            uint64_t add = m & ~old;      /* one bit, mostly: no popcount call */
            uint64_t nc = b->counts[p] +
                          (add & (add - 1) ? (uint64_t)__builtin_popcountll(add) : 1);
            if (nc < page_bits(b, p)) {
                pg[i / 64] = old | m;
                b->count += nc - b->counts[p];
                b->counts[p] = (uint32_t)nc;
                return;
            }
        }
    }
    range_change(b, start, n, true);
}

bool pbitmap_clear_range(struct pbitmap *b, uint64_t start, uint64_t n)
{
    return range_change(b, start, n, false);
}

void pbitmap_set_all(struct pbitmap *b)
{
    range_change(b, 0, b->nbits, true);
}

void pbitmap_clear_all(struct pbitmap *b)
{
    range_change(b, 0, b->nbits, false);
}

/* Within an allocated page: first bit in [lo, hi) equal to `want`, or hi. */
static uint64_t page_scan(const uint64_t *pg, uint64_t lo, uint64_t hi, bool want)
{
    uint64_t w = lo / 64;
    for (; w * 64 < hi; w++) {
        uint64_t word = want ? pg[w] : ~pg[w];
        if (w == lo / 64)
            word &= ~0ull << (lo % 64);
        if (word) {
            words_read += w - lo / 64 + 1;
            uint64_t bit = w * 64 + (uint64_t)__builtin_ctzll(word);
            return bit < hi ? bit : hi;
        }
    }
    words_read += w - lo / 64;
    return hi;
}

static uint64_t next_bit(const struct pbitmap *b, uint64_t start, uint64_t end, bool want)
{
    const uint64_t *sum = want ? b->nonzero : b->notfull;
    uint64_t limit = end;

    if (end > b->nbits)
        end = b->nbits;
    while (start < end) {
        uint64_t p = start >> PBITMAP_PAGE_SHIFT;
        uint64_t q = sum_next(b, sum, p);
        if (q != p) {                       /* skip whole pages */
            if (q >= b->npages)
                return limit;
            start = q << PBITMAP_PAGE_SHIFT;
            continue;
        }
        const uint64_t *pg = b->pages[p];
        if (pg == (want ? FULL : NULL))
            return start;
        uint64_t base = p << PBITMAP_PAGE_SHIFT;
        uint64_t hi = end - base < PBITMAP_PAGE_BITS ? end - base : PBITMAP_PAGE_BITS;
        uint64_t bit = page_scan(pg, start - base, hi, want);
        if (bit < hi)
            return base + bit;
        start = base + hi;
    }
    return limit;
}

uint64_t pbitmap_next_set(const struct pbitmap *b, uint64_t start, uint64_t end)
{
    uint64_t r = next_bit(b, start, end, true);
    return r < end ? r : end;
}

uint64_t pbitmap_next_clear(const struct pbitmap *b, uint64_t start, uint64_t end)
{
    uint64_t r = next_bit(b, start, end, false);
    return r < end ? r : end;
}

void pbitmap_merge(struct pbitmap *dst, const struct pbitmap *src)
{
    uint64_t npages = dst->npages < src->npages ? dst->npages : src->npages;

    for (uint64_t p = sum_next(src, src->nonzero, 0); p < npages;
         p = sum_next(src, src->nonzero, p + 1)) {
        const uint64_t *s = src->pages[p];
        if (dst->pages[p] == FULL)
            continue;
        if (s == FULL) {
            page_change(dst, p, 0, PBITMAP_PAGE_BITS, true);
            continue;
        }
        uint64_t *d = page_materialise(dst, p);
        if (!d) {
            page_change(dst, p, 0, PBITMAP_PAGE_BITS, true);
            continue;
        }
        uint64_t nc = 0;
        for (unsigned w = 0; w < PAGE_WORDS; w++) {
            d[w] |= s[w];
            nc += (uint64_t)__builtin_popcountll(d[w]);
        }
        if (nc == page_bits(dst, p)) {
            page_drop(dst, p);
            dst->pages[p] = FULL;
        }
        page_update(dst, p, nc);
    }
}

struct pbitmap *pbitmap_dup(const struct pbitmap *b)
{
    struct pbitmap *n = pbitmap_new(b->nbits);
    if (!n)
        return NULL;
    for (uint64_t p = 0; p < b->npages; p++) {
        const uint64_t *pg = b->pages[p];
        if (pg && pg != FULL) {
            n->pages[p] = malloc(PAGE_BYTES);
            if (!n->pages[p]) {
                pbitmap_free(n);
                return NULL;
            }
            memcpy(n->pages[p], pg, PAGE_BYTES);
        } else {
            n->pages[p] = (uint64_t *)pg;
        }
        page_update(n, p, b->counts[p]);
    }
    return n;
}

bool pbitmap_resize(struct pbitmap *b, uint64_t nbits)
{
    struct pbitmap *n = pbitmap_new(nbits);
    if (!n)
        return false;
    uint64_t keep = nbits < b->nbits ? nbits : b->nbits;
    uint64_t whole = keep >> PBITMAP_PAGE_SHIFT;   /* pages unchanged in size */

    for (uint64_t p = 0; p < whole; p++) {
        n->pages[p] = b->pages[p];
        b->pages[p] = NULL;
        page_update(n, p, b->counts[p]);
    }
    /* The page cut by the smaller size: copy its bits over one run at a time. */
    for (uint64_t i = pbitmap_next_set(b, whole << PBITMAP_PAGE_SHIFT, keep); i < keep;) {
        uint64_t z = pbitmap_next_clear(b, i, keep);
        pbitmap_set_range(n, i, z - i);
        i = pbitmap_next_set(b, z, keep);
    }
    for (uint64_t p = 0; p < b->npages; p++)
        page_drop(b, p);
    free(b->pages);
    free(b->counts);
    free(b->nonzero);
    free(b->notfull);
    *b = *n;
    free(n);
    return true;
}

size_t pbitmap_flat_bytes(const struct pbitmap *b)
{
    uint64_t words = div_up(b->nbits, 64);
    return (size_t)(words ? words : 1) * 8;
}

/* Byte i of a page in the flat layout. */
static uint8_t page_byte(const uint64_t *pg, uint64_t i)
{
    return (uint8_t)(pg[i / 8] >> (8 * (i % 8)));
}

void pbitmap_serialize(const struct pbitmap *b, uint64_t off, size_t len, uint8_t *out)
{
    uint64_t nbytes = div_up(b->nbits, 8);

    while (len > 0) {
        uint64_t p = off / PAGE_BYTES;
        uint64_t in = off % PAGE_BYTES;
        size_t n = PAGE_BYTES - in < len ? PAGE_BYTES - in : len;
        const uint64_t *pg = p < b->npages ? b->pages[p] : NULL;

        if (!pg) {
            memset(out, 0, n);
        } else if (pg == FULL) {
            memset(out, 0xff, n);
            if (off + n >= nbytes) {       /* the flat layout has zeros past nbits */
                uint64_t from = nbytes > off ? nbytes - off : 0;
                memset(out + from, 0, n - from);
                if (b->nbits % 8 && from > 0)
                    out[from - 1] = (uint8_t)((1u << (b->nbits % 8)) - 1);
            }
        } else if (__BYTE_ORDER == __LITTLE_ENDIAN) {
            memcpy(out, (const uint8_t *)pg + in, n);
        } else {
            for (size_t k = 0; k < n; k++)
                out[k] = page_byte(pg, in + k);
        }
        out += n;
        off += n;
        len -= n;
    }
}

void pbitmap_deserialize_or(struct pbitmap *b, uint64_t off, size_t len, const uint8_t *in)
{
    while (len > 0) {
        uint64_t p = off / PAGE_BYTES;
        uint64_t at = off % PAGE_BYTES;
        size_t n = PAGE_BYTES - at < len ? PAGE_BYTES - at : len;
        size_t k = 0;

        if (p >= b->npages)
            return;
        while (k < n && !in[k])
            k++;
        if (k < n && b->pages[p] != FULL) {
            uint64_t *pg = page_materialise(b, p);
            if (!pg) {
                page_change(b, p, 0, PBITMAP_PAGE_BITS, true);   /* more dirty is safe */
            } else {
                for (; k < n; k++)
                    pg[(at + k) / 8] |= (uint64_t)in[k] << (8 * ((at + k) % 8));
                uint64_t bits = page_bits(b, p), nc = 0;
                if (bits % 64)              /* nothing past nbits */
                    pg[bits / 64] &= (1ull << (bits % 64)) - 1;
                for (uint64_t w = div_up(bits, 64); w < PAGE_WORDS; w++)
                    pg[w] = 0;
                for (unsigned w = 0; w < PAGE_WORDS; w++)
                    nc += (uint64_t)__builtin_popcountll(pg[w]);
                if (nc == 0 || nc == bits) {
                    page_drop(b, p);
                    b->pages[p] = nc ? FULL : NULL;
                }
                page_update(b, p, nc);
            }
        }
        in += n;
        off += n;
        len -= n;
    }
}
