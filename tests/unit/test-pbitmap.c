/* Unit tests of the paged bitmap (util/pbitmap.c) against a plain array of
 * bits, of SHA-256 against FIPS 180-4's examples, and of node dirty bitmaps
 * (block/dirty-bitmap.c): granules, areas, merges, successors, and the
 * cost of walking a 1 TiB bitmap, counted in words read. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "util/pbitmap.h"
#include "util/sha256.h"

/* ---- a model: one byte per bit ---- */

struct model {
    uint64_t n;
    uint8_t *bit;
};

static uint64_t rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void check_same(const struct pbitmap *b, const struct model *m)
{
    uint64_t count = 0;
    for (uint64_t i = 0; i < m->n; i++) {
        count += m->bit[i];
        if (pbitmap_get(b, i) != m->bit[i])
            fail_msg("bit %llu: %d, model %d", (unsigned long long)i, pbitmap_get(b, i), m->bit[i]);
    }
    assert_int_equal(pbitmap_count(b), count);
    /* serialized layout: bit i is bit i%8 of byte i/8, zeros after n */
    size_t nb = pbitmap_flat_bytes(b);
    assert_int_equal(nb, m->n ? (m->n + 63) / 64 * 8 : 8);
    uint8_t *flat = malloc(nb);
    pbitmap_serialize(b, 0, nb, flat);
    for (uint64_t i = 0; i < nb * 8; i++) {
        int v = flat[i / 8] >> (i % 8) & 1;
        assert_int_equal(v, i < m->n ? m->bit[i] : 0);
    }
    free(flat);
}

static uint64_t model_next(const struct model *m, uint64_t s, uint64_t e, int want)
{
    for (uint64_t i = s; i < e && i < m->n; i++)
        if (m->bit[i] == want)
            return i;
    return e;
}

static void random_ops(uint64_t nbits, int rounds, uint64_t seed)
{
    struct pbitmap *b = pbitmap_new(nbits);
    struct model m = { nbits, calloc(nbits ? nbits : 1, 1) };
    uint64_t s = seed;

    assert_non_null(b);
    for (int r = 0; r < rounds; r++) {
        uint64_t op = rnd(&s) % 8;
        uint64_t a = nbits ? rnd(&s) % (nbits + 10) : 0;
        /* mostly small ranges, sometimes page-sized or whole */
        uint64_t len = rnd(&s) % 4 == 0 ? rnd(&s) % (3 * PBITMAP_PAGE_BITS) : rnd(&s) % 200;
        uint64_t lim = a >= nbits ? 0 : (len > nbits - a ? nbits - a : len);
        switch (op) {
        case 0: case 1: case 2:
            pbitmap_set_range(b, a, len);
            memset(m.bit + (a < nbits ? a : 0), 1, lim);
            break;
        case 3: case 4:
            assert_true(pbitmap_clear_range(b, a, len));
            memset(m.bit + (a < nbits ? a : 0), 0, lim);
            break;
        case 5: {
            uint64_t e = a + len;
            assert_int_equal(pbitmap_next_set(b, a, e), model_next(&m, a, e, 1));
            assert_int_equal(pbitmap_next_clear(b, a, e), model_next(&m, a, e, 0));
            break;
        }
        case 6:
            if (rnd(&s) % 16 == 0) {
                pbitmap_set_all(b);
                memset(m.bit, 1, nbits);
            }
            break;
        case 7:
            if (rnd(&s) % 32 == 0) {
                pbitmap_clear_all(b);
                memset(m.bit, 0, nbits);
            }
            break;
        }
        if (r % 97 == 0)
            check_same(b, &m);
    }
    check_same(b, &m);
    /* next_set/next_clear agree with the model from every start */
    for (uint64_t i = 0; i < nbits; i += 1 + rnd(&s) % 700) {
        assert_int_equal(pbitmap_next_set(b, i, nbits), model_next(&m, i, nbits, 1));
        assert_int_equal(pbitmap_next_clear(b, i, nbits), model_next(&m, i, nbits, 0));
    }
    pbitmap_free(b);
    free(m.bit);
}

static void test_random_small(void **state)
{
    random_ops(1, 200, 1);
    random_ops(63, 500, 2);
    random_ops(64, 500, 3);
    random_ops(1000, 2000, 4);
}

static void test_random_pages(void **state)
{
    random_ops(PBITMAP_PAGE_BITS, 2000, 5);
    random_ops(3 * PBITMAP_PAGE_BITS + 77, 3000, 6);
    random_ops(5 * PBITMAP_PAGE_BITS - 1, 3000, 7);
}

static void test_empty(void **state)
{
    struct pbitmap *b = pbitmap_new(0);
    uint8_t flat[8];
    assert_non_null(b);
    assert_int_equal(pbitmap_count(b), 0);
    assert_int_equal(pbitmap_flat_bytes(b), 8);   /* QEMU hashes one word */
    pbitmap_set_range(b, 0, 100);
    assert_int_equal(pbitmap_count(b), 0);
    pbitmap_serialize(b, 0, 8, flat);
    for (int i = 0; i < 8; i++)
        assert_int_equal(flat[i], 0);
    assert_int_equal(pbitmap_next_set(b, 0, 10), 10);
    pbitmap_free(b);
}

/* Marks as a write path makes them (pbitmap_set_range's one-word fast
 * path): one to a few bits inside one word, in random order, many of them
 * already set, until every page is full.  The model, the count, both
 * searches (which read the page summaries) and the layout must agree
 * throughout; a page filled bit by bit must end as the shared full page
 * (the search skips it whole: no word of it is read). */
static void test_word_marks(void **state)
{
    uint64_t nbits = 2 * PBITMAP_PAGE_BITS + 77, s = 11;
    struct pbitmap *b = pbitmap_new(nbits);
    struct model m = { nbits, calloc(nbits, 1) };
    uint64_t left = nbits, round = 0;

    while (left) {
        uint64_t a = rnd(&s) % nbits;
        uint64_t room = 64 - a % 64;            /* inside a's word */
        uint64_t n = 1 + rnd(&s) % (rnd(&s) % 8 == 0 ? room : 3);
        if (n > room)
            n = room;
        if (n > nbits - a)
            n = nbits - a;
        pbitmap_set_range(b, a, n);
        for (uint64_t i = a; i < a + n; i++) {
            left -= !m.bit[i];
            m.bit[i] = 1;
        }
        assert_int_equal(pbitmap_count(b), nbits - left);
        if (++round % 4099 == 0) {
            check_same(b, &m);
            uint64_t x = rnd(&s) % nbits;
            assert_int_equal(pbitmap_next_clear(b, x, nbits), model_next(&m, x, nbits, 0));
            assert_int_equal(pbitmap_next_set(b, x, nbits), model_next(&m, x, nbits, 1));
        }
    }
    check_same(b, &m);
    uint64_t before = pbitmap_words_read();
    assert_int_equal(pbitmap_next_clear(b, 0, nbits), nbits);
    assert_true(pbitmap_words_read() - before <= 2);    /* summary words only */
    /* setting bits of a full page changes nothing */
    pbitmap_set_range(b, PBITMAP_PAGE_BITS + 3, 5);
    assert_int_equal(pbitmap_count(b), nbits);
    /* one clear bit, set again through the fast path, fills the page again */
    assert_true(pbitmap_clear_range(b, 70, 1));
    assert_int_equal(pbitmap_next_clear(b, 0, nbits), 70);
    assert_true(pbitmap_clear_range(b, 129, 2));
    pbitmap_set_range(b, 70, 1);
    assert_int_equal(pbitmap_count(b), nbits - 2);
    assert_int_equal(pbitmap_next_clear(b, 0, nbits), 129);
    pbitmap_set_range(b, 129, 2);
    assert_int_equal(pbitmap_count(b), nbits);
    before = pbitmap_words_read();
    assert_int_equal(pbitmap_next_clear(b, 0, nbits), nbits);
    assert_true(pbitmap_words_read() - before <= 2);
    pbitmap_free(b);
    free(m.bit);
}

static void test_full_pages_serialize(void **state)
{
    /* a whole-page set becomes the shared full page; the flat layout must
     * still end with zeros past nbits */
    uint64_t n = 2 * PBITMAP_PAGE_BITS + 13;
    struct pbitmap *b = pbitmap_new(n);
    pbitmap_set_all(b);
    assert_int_equal(pbitmap_count(b), n);
    size_t nb = pbitmap_flat_bytes(b);
    uint8_t *flat = malloc(nb);
    pbitmap_serialize(b, 0, nb, flat);
    for (uint64_t i = 0; i < nb * 8; i++)
        assert_int_equal(flat[i / 8] >> (i % 8) & 1, i < n);
    /* round trip through deserialize */
    struct pbitmap *c = pbitmap_new(n);
    pbitmap_deserialize_or(c, 0, nb, flat);
    assert_int_equal(pbitmap_count(c), n);
    assert_int_equal(pbitmap_next_clear(c, 0, n), n);
    /* clear one bit of a full page: it is materialised again */
    assert_true(pbitmap_clear_range(c, PBITMAP_PAGE_BITS + 5, 1));
    assert_int_equal(pbitmap_count(c), n - 1);
    assert_int_equal(pbitmap_next_clear(c, 0, n), PBITMAP_PAGE_BITS + 5);
    assert_int_equal(pbitmap_next_set(c, PBITMAP_PAGE_BITS + 5, n), PBITMAP_PAGE_BITS + 6);
    free(flat);
    pbitmap_free(b);
    pbitmap_free(c);
}

static void test_merge_dup_resize(void **state)
{
    uint64_t n = 3 * PBITMAP_PAGE_BITS + 100, s = 42;
    struct pbitmap *a = pbitmap_new(n), *b = pbitmap_new(n);
    uint8_t *ma = calloc(n, 1), *mb = calloc(n, 1);

    for (int i = 0; i < 300; i++) {
        uint64_t x = rnd(&s) % n, l = rnd(&s) % 5000;
        uint64_t lim = l > n - x ? n - x : l;
        if (i % 2) {
            pbitmap_set_range(a, x, l);
            memset(ma + x, 1, lim);
        } else {
            pbitmap_set_range(b, x, l);
            memset(mb + x, 1, lim);
        }
    }
    pbitmap_set_range(b, PBITMAP_PAGE_BITS, PBITMAP_PAGE_BITS);   /* a full page */
    memset(mb + PBITMAP_PAGE_BITS, 1, PBITMAP_PAGE_BITS);
    struct pbitmap *d = pbitmap_dup(a);
    pbitmap_merge(a, b);
    for (uint64_t i = 0; i < n; i++) {
        assert_int_equal(pbitmap_get(a, i), ma[i] | mb[i]);
        assert_int_equal(pbitmap_get(d, i), ma[i]);
    }
    /* shrink into the middle of a page, then grow: the tail comes back clear */
    uint64_t cut = PBITMAP_PAGE_BITS + 1234;
    assert_true(pbitmap_resize(a, cut));
    assert_int_equal(pbitmap_size(a), cut);
    assert_true(pbitmap_resize(a, n + 5));
    uint64_t count = 0;
    for (uint64_t i = 0; i < n + 5; i++) {
        int want = i < cut ? (ma[i] | mb[i]) : 0;
        assert_int_equal(pbitmap_get(a, i), want);
        count += want;
    }
    assert_int_equal(pbitmap_count(a), count);
    pbitmap_free(a);
    pbitmap_free(b);
    pbitmap_free(d);
    free(ma);
    free(mb);
}

static void test_memory_bounded(void **state)
{
    /* 2^31 bits (1 TiB at 512 bytes): clean and all-dirty cost no pages */
    struct pbitmap *b = pbitmap_new(1ull << 31);
    assert_non_null(b);
    pbitmap_set_all(b);
    assert_int_equal(pbitmap_count(b), 1ull << 31);
    assert_int_equal(pbitmap_next_clear(b, 0, 1ull << 31), 1ull << 31);
    pbitmap_clear_range(b, 12345678, 1);
    assert_int_equal(pbitmap_next_clear(b, 0, 1ull << 31), 12345678);
    pbitmap_free(b);
}

/* ---- SHA-256 ---- */

static void hash_hex(const void *d, size_t n, char out[65])
{
    struct sha256 s;
    uint8_t dg[32];
    sha256_init(&s);
    /* feed in odd pieces to exercise buffering */
    for (size_t i = 0; i < n; i += 7)
        sha256_update(&s, (const uint8_t *)d + i, n - i < 7 ? n - i : 7);
    sha256_final(&s, dg);
    sha256_hex(dg, out);
}

static void test_sha256(void **state)
{
    char h[65];
    hash_hex("", 0, h);
    assert_string_equal(h, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    hash_hex("abc", 3, h);
    assert_string_equal(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *m = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    hash_hex(m, strlen(m), h);
    assert_string_equal(h, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    uint8_t zeros[128] = { 0 };
    hash_hex(zeros, sizeof(zeros), h);   /* QEMU's hash of a clean 64 MiB bitmap */
    assert_string_equal(h, "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca");
}

/* ---- node dirty bitmaps ---- */

static struct bnode *null_node(const char *name, uint64_t size)
{
    char json[256];
    error *err = NULL;
    snprintf(json, sizeof(json),
             "{\"driver\":\"null-co\",\"node-name\":\"%s\",\"size\":%llu}", name,
             (unsigned long long)size);
    json_t *o = json_loads(json, 0, NULL);
    struct bnode *bs = blockdev_add(o, &err);
    json_decref(o);
    if (!bs)
        fail_msg("blockdev_add: %s", err->msg);
    return bs;
}

static void del_node(const char *name)
{
    assert_int_equal(blockdev_del(name, NULL), 0);
}

static void test_granules(void **state)
{
    struct bnode *bs = null_node("g0", 999936);   /* a multiple of 512 (null-co rounds up to it); last granule short */
    error *err = NULL;
    struct dirty_bitmap *bm = dirty_bitmap_create(bs, 65536, "b", &err);
    uint64_t off, len;

    assert_non_null(bm);
    assert_int_equal(bs->dirty_recording, 1);
    bnode_set_dirty(bs, 100000, 5000);        /* granule 1 */
    bnode_set_dirty(bs, 999935, 1);           /* the short last granule, 15 */
    assert_int_equal(dirty_bitmap_count(bm), 2 * 65536);
    dirty_bitmaps_lock(bs);
    off = 0;
    assert_true(dirty_bitmap_next_dirty_area_locked(bm, &off, 999936, UINT64_MAX, &len));
    assert_int_equal(off, 65536);
    assert_int_equal(len, 65536);
    off = 70000;                              /* inside a dirty granule */
    assert_true(dirty_bitmap_next_dirty_area_locked(bm, &off, 999936, 1000, &len));
    assert_int_equal(off, 70000);
    assert_int_equal(len, 1000);
    off = 131072;
    assert_true(dirty_bitmap_next_dirty_area_locked(bm, &off, 999936, UINT64_MAX, &len));
    assert_int_equal(off, 15 * 65536);
    assert_int_equal(len, 999936 - 15 * 65536);   /* clipped to the size */
    assert_int_equal(dirty_bitmap_next_zero_locked(bm, 65536, 999936), 131072);
    assert_int_equal(dirty_bitmap_next_zero_locked(bm, 70000, 100000), 100000);
    dirty_bitmaps_unlock(bs);

    /* a disabled bitmap does not record; re-enabled, it does */
    dirty_bitmap_set_enabled(bm, false);
    assert_int_equal(bs->dirty_recording, 0);
    bnode_set_dirty(bs, 0, 1);
    assert_int_equal(dirty_bitmap_count(bm), 2 * 65536);
    dirty_bitmap_set_enabled(bm, true);
    bnode_set_dirty(bs, 0, 1);
    assert_int_equal(dirty_bitmap_count(bm), 3 * 65536);

    /* reset clears whole granules only, the short last one included */
    dirty_bitmap_reset_range(bm, 1, 65536 * 2);   /* covers granule 1 only */
    assert_int_equal(dirty_bitmap_count(bm), 2 * 65536);
    dirty_bitmap_reset_range(bm, 15 * 65536, 999936 - 15 * 65536);
    assert_int_equal(dirty_bitmap_count(bm), 65536);
    del_node("g0");
}

static void test_merge_granularity(void **state)
{
    struct bnode *bs = null_node("m0", 1 << 20);
    error *err = NULL;
    struct dirty_bitmap *fine = dirty_bitmap_create(bs, 512, "fine", &err);
    struct dirty_bitmap *coarse = dirty_bitmap_create(bs, 65536, "coarse", &err);
    struct pbitmap *backup = NULL;

    dirty_bitmap_set_enabled(coarse, false);
    bnode_set_dirty(bs, 70000, 10);
    assert_int_equal(dirty_bitmap_count(fine), 512);
    assert_int_equal(dirty_bitmap_merge(coarse, fine, &backup, &err), 0);
    assert_int_equal(dirty_bitmap_count(coarse), 65536);
    dirty_bitmaps_lock(bs);
    assert_true(dirty_bitmap_get_locked(coarse, 65536));
    dirty_bitmaps_unlock(bs);
    dirty_bitmap_restore(coarse, backup);          /* undo */
    assert_int_equal(dirty_bitmap_count(coarse), 0);

    /* busy targets and sources are refused with QEMU's message */
    dirty_bitmap_set_busy(fine, true);
    assert_int_equal(dirty_bitmap_merge(coarse, fine, NULL, &err), -1);
    assert_string_equal(err->msg, "Bitmap 'fine' is currently in use by another operation "
                                  "and cannot be used");
    error_free(err);
    err = NULL;
    dirty_bitmap_set_busy(fine, false);

    /* sizes must match */
    struct bnode *other = null_node("m1", 1 << 21);
    struct dirty_bitmap *big = dirty_bitmap_create(other, 65536, "big", &err);
    assert_int_equal(dirty_bitmap_merge(coarse, big, NULL, &err), -1);
    assert_string_equal(err->msg, "Bitmaps are of different sizes (destination size is 1048576, "
                                  "source size is 2097152) and can't be merged");
    error_free(err);
    del_node("m1");
    del_node("m0");
}

static void test_successor(void **state)
{
    struct bnode *bs = null_node("s0", 1 << 20);
    error *err = NULL;
    struct dirty_bitmap *bm = dirty_bitmap_create(bs, 65536, "b", &err);

    bnode_set_dirty(bs, 0, 1);
    assert_int_equal(dirty_bitmap_create_successor(bm, &err), 0);
    assert_true(bm->busy);
    assert_true(dirty_bitmap_recording(bm));
    bnode_set_dirty(bs, 65536, 1);                 /* goes to the successor */
    assert_int_equal(dirty_bitmap_count(bm), 65536);
    /* reclaim: the successor's writes come back */
    assert_ptr_equal(dirty_bitmap_reclaim(bm), bm);
    assert_false(bm->busy);
    assert_int_equal(dirty_bitmap_count(bm), 2 * 65536);
    assert_int_equal(bs->dirty_recording, 1);
    /* abdicate: only writes after the freeze remain, under the old name */
    assert_int_equal(dirty_bitmap_create_successor(bm, &err), 0);
    bnode_set_dirty(bs, 3 * 65536, 1);
    struct dirty_bitmap *n = dirty_bitmap_abdicate(bm);
    assert_ptr_equal(dirty_bitmap_find(bs, "b"), n);
    assert_int_equal(dirty_bitmap_count(n), 65536);
    assert_int_equal(bs->dirty_recording, 1);
    del_node("s0");
}

/* The walk over a 1 TiB node at 64 KiB granularity: 2^24 bits, 512 pages
 * of PBITMAP_PAGE_BITS.  Its cost is counted in words read
 * (pbitmap_words_read), not timed, and bounded by what the code must read:
 *
 *  - each area is one pbitmap_next_set and one pbitmap_next_clear, and the
 *    walk ends with one more next_set: C = 2 * areas + 1 searches;
 *  - every search starts where the previous one stopped (the next area
 *    starts at the clear bit found, the clear bit is searched from the set
 *    bit found), so page words are read in one forward sweep: each word of
 *    a partly dirty page once, plus the word each search stopped in, read
 *    again by the next: at most P * PAGE_WORDS + C, P the partly dirty
 *    pages;
 *  - clean and full pages are skipped through the summaries: a search
 *    scans at most one page more than the pages it crosses, each scan
 *    after at most one skip, so the summary lookups are at most 2P + 4C
 *    (each reads one word), and the words a lookup skips are skipped once
 *    per summary in the sweep: 2 * S, S = summary words (npages / 64).
 *
 * Bound: P * (PAGE_WORDS + 2) + 5C + 2S.  A walk that rescanned a page from
 * its start for each area, or went bit by bit, or visited clean pages,
 * reads more than the bound: a rescan of the page for each area read 164
 * million words (bound 362599, 302420 read), a walk that stepped through
 * clean pages one at a time read 10403 in the sparse case (bound 9987,
 * 9852 read); one pass over every page would be 262144. */
#define TB_SHIFT 40
#define TB_GRAN_SHIFT 16
#define TB_BITS (1ull << (TB_SHIFT - TB_GRAN_SHIFT))
#define TB_PAGES (TB_BITS / PBITMAP_PAGE_BITS)
#define TB_PAGE_WORDS (PBITMAP_PAGE_BITS / 64)

static uint64_t tb_model[TB_BITS / 64];     /* the dirty granules, a flat array */

static void tb_model_set(uint64_t off, uint64_t len)
{
    uint64_t end = off + len > (1ull << TB_SHIFT) ? 1ull << TB_SHIFT : off + len;
    for (uint64_t b = off >> TB_GRAN_SHIFT; b <= (end - 1) >> TB_GRAN_SHIFT; b++)
        tb_model[b / 64] |= 1ull << (b % 64);
}

static void tb_walk(uint64_t seed, int small, int huge)
{
    struct bnode *bs = null_node("t0", 1ull << TB_SHIFT);
    error *err = NULL;
    struct dirty_bitmap *bm = dirty_bitmap_create(bs, 1u << TB_GRAN_SHIFT, "b", &err);
    uint64_t s = seed, areas = 0, bytes = 0;

    assert_non_null(bm);
    memset(tb_model, 0, sizeof(tb_model));
    for (int i = 0; i < small + huge; i++) {
        /* small: up to 1 MiB; huge: up to 64 GiB, i.e. up to 32 whole pages */
        uint64_t off = rnd(&s) % (1ull << TB_SHIFT);
        uint64_t len = 1 + rnd(&s) % (i < small ? 1ull << 20 : 1ull << 36);
        bnode_set_dirty(bs, off, len);
        tb_model_set(off, len);
    }
    /* the model's runs, its dirty bytes and its partly dirty pages */
    uint64_t runs = 0, dirty = 0, partial = 0;
    for (uint64_t p = 0; p < TB_PAGES; p++) {
        uint64_t n = 0;
        for (uint64_t w = 0; w < TB_PAGE_WORDS; w++)
            n += (uint64_t)__builtin_popcountll(tb_model[p * TB_PAGE_WORDS + w]);
        partial += n > 0 && n < PBITMAP_PAGE_BITS;
        dirty += n << TB_GRAN_SHIFT;
    }
    for (uint64_t b = 0; b < TB_BITS; b++) {
        int on = tb_model[b / 64] >> (b % 64) & 1;
        int before = b && (tb_model[(b - 1) / 64] >> ((b - 1) % 64) & 1);
        runs += on && !before;
    }

    dirty_bitmaps_lock(bs);
    uint64_t w0 = pbitmap_words_read(), off = 0, len;
    while (dirty_bitmap_next_dirty_area_locked(bm, &off, 1ull << TB_SHIFT, UINT64_MAX, &len)) {
        areas++;
        bytes += len;
        off += len;
    }
    uint64_t words = pbitmap_words_read() - w0;
    dirty_bitmaps_unlock(bs);

    uint64_t calls = 2 * areas + 1, sum_words = (TB_PAGES + 63) / 64;
    uint64_t bound = partial * (TB_PAGE_WORDS + 2) + 5 * calls + 2 * sum_words;
    print_message("%llu areas, %llu partly dirty pages: %llu words read, bound %llu\n",
                  (unsigned long long)areas, (unsigned long long)partial,
                  (unsigned long long)words, (unsigned long long)bound);
    assert_int_equal(areas, runs);
    assert_int_equal(bytes, dirty);
    assert_int_equal(bytes, dirty_bitmap_count(bm));
    assert_true(words > 0);
    assert_true(words <= bound);
    del_node("t0");
}

static void test_terabyte_walk(void **state)
{
    tb_walk(7, 10000, 0);       /* dense: every page partly dirty */
    tb_walk(11, 20, 0);         /* sparse: clean pages skipped */
    tb_walk(13, 50, 4);         /* whole dirty pages skipped by next_clear */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_small),
        cmocka_unit_test(test_random_pages),
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_word_marks),
        cmocka_unit_test(test_full_pages_serialize),
        cmocka_unit_test(test_merge_dup_resize),
        cmocka_unit_test(test_memory_bounded),
        cmocka_unit_test(test_sha256),
        cmocka_unit_test(test_granules),
        cmocka_unit_test(test_merge_granularity),
        cmocka_unit_test(test_successor),
        cmocka_unit_test(test_terabyte_walk),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
