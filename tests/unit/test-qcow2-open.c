/*
 * The qcow2 open path on hostile input: a small valid image is built in
 * memory (a memfd, opened through /proc/self/fd), then thousands of
 * deterministic mutations of its metadata are opened, read in full and
 * asked for block status.  Each must either fail to open with an error
 * message or serve every request with data or -errno: no crash, no hang,
 * no sanitizer report.  qcow2_try_image() is the one-input entry point a
 * libFuzzer target calls with its bytes.
 *
 * What must come out is predicted by a model of the format written from
 * the qcow2 specification (docs/interop/qcow2.txt) and QEMU 7.2's open
 * checks, reading the mutated bytes at their spec offsets (not through
 * qcow2.c or its structures):
 *  - open: a header QEMU refuses (magic, version, cluster size, header
 *    length, unknown incompatible feature, refcount order, encryption, L1
 *    too small or too large, misaligned table offsets, no refcount table)
 *    must be refused; an image whose header cluster is unchanged must open
 *    (QEMU reads no other metadata's entries at a read-only open);
 *  - content: each guest cluster is followed through L1 and L2 as the spec
 *    says.  Unallocated clusters and v3 zero clusters read as zeros (no
 *    backing file), a standard cluster reads as the image's bytes at its
 *    offset; a cluster behind an entry with reserved bits, a misaligned or
 *    out-of-file offset, a compressed cluster, or a format feature the model
 *    does not follow (external data file, extended L2, a backing file) is
 *    unknown: it may read anything or fail.  Every successful read must
 *    match the model where it is known, a read may fail only once an
 *    unknown cluster has been met (QEMU stops using an image it found
 *    corrupt), and block status must say ZERO for zeros and DATA for data.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <endian.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "block/block.h"
#include "block/qcow2.h"
#include "util/coroutine.h"
#include "util/loop.h"

#define CS 4096u                      /* small clusters: more metadata per byte */
#define NCL 12

/* Header (0), L1 (1), reftable (2), refblock (3), L2 (4), data 5.. */
static size_t build_image(uint8_t *img)
{
    memset(img, 0, NCL * CS);
    struct qcow2_header h = {
        .magic = htobe32(QCOW2_MAGIC), .version = htobe32(3), .cluster_bits = htobe32(12),
        .size = htobe64(1 << 20), .l1_size = htobe32(2), .l1_table_offset = htobe64(CS),
        .refcount_table_offset = htobe64(2 * CS), .refcount_table_clusters = htobe32(1),
        .refcount_order = htobe32(4), .header_length = htobe32(112),
    };
    memcpy(img, &h, sizeof(h));
    uint64_t v = htobe64((4 * CS) | QCOW2_OFLAG_COPIED);
    memcpy(img + CS, &v, 8);
    v = htobe64(3 * CS);
    memcpy(img + 2 * CS, &v, 8);
    for (int c = 0; c < NCL; c++) {
        uint16_t r = htobe16(1);
        memcpy(img + 3 * CS + 2 * c, &r, 2);
    }
    for (int i = 0; i < NCL - 5; i++) {
        v = htobe64(((uint64_t)(5 + i) * CS) | QCOW2_OFLAG_COPIED);
        if (i == 3)
            v = htobe64(QCOW2_OFLAG_ZERO);
        memcpy(img + 4 * CS + 8 * (2 * i), &v, 8);
        memset(img + (5 + i) * CS, 0x40 + i, CS);
    }
    return NCL * CS;
}


/* ---- the model ---- */

static uint32_t be32at(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static uint64_t be64at(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }

#define MODEL_MAX_GUEST (8u << 20)     /* what qcow2_try_image reads */
enum { M_ZEROS, M_DATA, M_UNKNOWN };
enum { MUST_REFUSE, MUST_OPEN, MAY_EITHER };

struct model {
    int open;                          /* MUST_REFUSE, MUST_OPEN, MAY_EITHER */
    const char *why;                   /* the rule behind MUST_REFUSE / MUST_OPEN */
    uint64_t size;                     /* header size */
    unsigned cluster_bits;
    uint64_t nclusters;                /* guest clusters modelled */
    uint8_t kind[MODEL_MAX_GUEST / 512];
    uint64_t host[MODEL_MAX_GUEST / 512];
    int opened, zeros, data, unknown;  /* what the checks met (totals) */
};

static struct model *expect;           /* set by the test, NULL for fuzzing */
static char wrong_msg[512];            /* the first contradiction of the model */

static void wrong(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void wrong(const char *fmt, ...)
{
    va_list ap;
    if (wrong_msg[0])
        return;
    va_start(ap, fmt);
    vsnprintf(wrong_msg, sizeof(wrong_msg), fmt, ap);
    va_end(ap);
}
static const uint8_t *expect_img;

/* The verdict on a header, by the specification's fields and QEMU 7.2's
 * qcow2_do_open checks. */
static void model_open(struct model *m, const uint8_t *img, size_t n, const uint8_t *base)
{
    uint32_t version = be32at(img + 4), cb = be32at(img + 20);
    m->open = MAY_EITHER;
    m->why = NULL;
#define REFUSE(w) do { m->open = MUST_REFUSE; m->why = w; return; } while (0)
    if (be32at(img) != 0x514649fbu)
        REFUSE("magic");
    if (version != 2 && version != 3)
        REFUSE("version");
    if (cb < 9 || cb > 21)
        REFUSE("cluster_bits");
    uint64_t cs = 1ull << cb;
    if (version == 3) {
        uint32_t hl = be32at(img + 100);
        if (hl < 104)
            REFUSE("header_length < 104");
        if (hl > cs)
            REFUSE("header_length > cluster size");
        if (be64at(img + 72) & ~0x1full)
            REFUSE("unknown incompatible feature");
        if (be32at(img + 96) > 6)
            REFUSE("refcount_order > 6");
    }
    if (be32at(img + 32) != 0)
        REFUSE("encrypted, no key given");
    uint64_t size = be64at(img + 24), l1_size = be32at(img + 36);
    int extl2 = version == 3 && (be64at(img + 72) & (1u << 4));
    uint64_t cover = (cs / (extl2 ? 16 : 8)) << cb;      /* bytes one L2 table maps */
    if (l1_size * 8 > (32u << 20))
        REFUSE("L1 table too large");
    if (size > (UINT64_MAX >> 1) || l1_size < size / cover + (size % cover != 0))
        REFUSE("L1 table too small for the size");
    if (l1_size && be64at(img + 40) % cs)
        REFUSE("misaligned L1 table offset");
    if (be64at(img + 48) % cs)
        REFUSE("misaligned refcount table offset");
    if (be32at(img + 56) == 0)
        REFUSE("no refcount table");
    if (be64at(img + 64) % cs)          /* even with no snapshots */
        REFUSE("misaligned snapshot table offset");
    uint32_t ext_at = version == 3 ? be32at(img + 100) : 72;
    if (ext_at + 8 <= cs && ext_at + 8 <= n && be32at(img + ext_at) == 0 &&
        be32at(img + ext_at + 4) > cs - ext_at - 8)
        REFUSE("the end-of-extensions marker's length runs past the cluster");
#undef REFUSE
    if (!memcmp(img, base, CS)) {
        m->open = MUST_OPEN;
        m->why = "header cluster unchanged";
    }
}

/* What each guest cluster reads as, by the specification. */
static void model_content(struct model *m, const uint8_t *img, size_t n)
{
    uint32_t version = be32at(img + 4);
    unsigned cb = be32at(img + 20);
    uint64_t incompat = version == 3 ? be64at(img + 72) : 0;
    uint64_t cs = 1ull << cb, l2_entries = cs / 8;
    uint64_t l1_off = be64at(img + 40), l1_size = be32at(img + 36);
    int all_unknown = (incompat & ((1u << 2) | (1u << 4))) != 0;   /* data file, extended L2 */
    int backing = be64at(img + 8) != 0;

    m->size = be64at(img + 24);
    m->cluster_bits = cb;
    uint64_t guest = m->size < MODEL_MAX_GUEST ? m->size : MODEL_MAX_GUEST;
    m->nclusters = (guest + cs - 1) >> cb;
    for (uint64_t i = 0; i < m->nclusters; i++) {
        uint8_t k = M_UNKNOWN;
        uint64_t h = 0, l1i = i / l2_entries;
        if (all_unknown || l1i >= l1_size || l1_off + 8 * (l1i + 1) > n)
            goto out;
        uint64_t l1e = be64at(img + l1_off + 8 * l1i);
        if (l1e & 0x7f000000000001ffull)                  /* reserved */
            goto out;
        uint64_t l2_off = l1e & 0x00fffffffffffe00ull;
        if (!l2_off) {
            k = backing ? M_UNKNOWN : M_ZEROS;
            goto out;
        }
        if (l2_off % cs || l2_off + cs > n)
            goto out;
        uint64_t l2e = be64at(img + l2_off + 8 * (i % l2_entries));
        if (l2e & (1ull << 62))                           /* compressed */
            goto out;
        if (l2e & 0x3f000000000001feull)                  /* reserved */
            goto out;
        uint64_t off = l2e & 0x00fffffffffffe00ull;
        if (l2e & 1) {                                    /* zero cluster (v3) */
            /* QEMU checks a preallocated zero cluster's offset as a data
             * cluster's (EIO when misaligned), the spec does not */
            k = version == 3 && off % cs == 0 ? M_ZEROS : M_UNKNOWN;
            goto out;
        }
        if (!off) {
            k = backing ? M_UNKNOWN : M_ZEROS;
            goto out;
        }
        if (off % cs || off + cs > n)
            goto out;
        k = M_DATA;
        h = off;
out:
        m->kind[i] = k;
        m->host[i] = h;
    }
}

/* Compare a successful read of [off, off + len) with the model.  Returns
 * false if it contradicts a known cluster. */
static bool model_check_read(struct model *m, uint64_t off, uint64_t len, const uint8_t *buf)
{
    uint64_t cs = 1ull << m->cluster_bits;
    for (uint64_t i = off >> m->cluster_bits; i < m->nclusters && i << m->cluster_bits < off + len; i++) {
        uint64_t a = i << m->cluster_bits > off ? i << m->cluster_bits : off;
        uint64_t e = (i + 1) << m->cluster_bits < off + len ? (i + 1) << m->cluster_bits : off + len;
        for (uint64_t x = a; x < e; x++) {
            uint8_t want;
            if (m->kind[i] == M_ZEROS)
                want = 0;
            else if (m->kind[i] == M_DATA)
                want = expect_img[m->host[i] + (x & (cs - 1))];
            else
                break;
            if (buf[x - off] != want) {
                wrong("guest byte %llu (cluster %llu, %s) read %#x, the model says %#x",
                      (unsigned long long)x, (unsigned long long)i,
                      m->kind[i] == M_ZEROS ? "zeros" : "data", buf[x - off], want);
                return false;
            }
        }
    }
    return true;
}

/* Whether any cluster before guest offset end is unknown. */
static bool model_unknown_before(const struct model *m, uint64_t end)
{
    for (uint64_t i = 0; i < m->nclusters && i << m->cluster_bits < end; i++)
        if (m->kind[i] == M_UNKNOWN)
            return true;
    return false;
}

struct reader {
    struct bnode *bs;
    int reads_ok, reads_failed;
};

static void read_all(void *opaque)
{
    struct reader *r = opaque;
    static uint8_t buf[64 * 1024];
    for (uint64_t off = 0; off < r->bs->size && off < (8u << 20); off += sizeof(buf)) {
        uint64_t n = r->bs->size - off < sizeof(buf) ? r->bs->size - off : sizeof(buf);
        if (bnode_co_pread(r->bs, off, n, buf, 0) == 0) {
            r->reads_ok++;
            if (expect)
                model_check_read(expect, off, n, buf);
        } else {
            r->reads_failed++;
            if (expect && !model_unknown_before(expect, off + n))
                wrong("a read of %llu+%llu failed with no unknown cluster up to it",
                      (unsigned long long)off, (unsigned long long)n);
        }
    }
    loop_stop(loop_main());
}

/* Open the bytes as a qcow2 image (read-only), read it and ask for its
 * block status.  Returns 1 if it opened, 0 if it was refused. */
int qcow2_try_image(const uint8_t *data, size_t size)
{
    int fd = memfd_create("qcow2-input", MFD_CLOEXEC);
    if (fd < 0 || write(fd, data, size) != (ssize_t)size)
        abort();
    char json[256];
    snprintf(json, sizeof(json),
             "{\"driver\":\"qcow2\",\"node-name\":\"fz\",\"read-only\":true,"
             "\"file\":{\"driver\":\"file\",\"filename\":\"/proc/self/fd/%d\"}}", fd);
    json_t *opts = json_loads(json, 0, NULL);
    error *err = NULL;
    struct bnode *bs = blockdev_add(opts, &err);
    json_decref(opts);
    if (!bs) {
        if (!err || !err->msg || !*err->msg)
            abort();                   /* a refusal always says why */
        if (expect && expect->open == MUST_OPEN)
            wrong("refused (%s), the model says it must open (%s)", err->msg, expect->why);
        error_free(err);
        close(fd);
        return 0;
    }
    if (expect && expect->open == MUST_REFUSE)
        wrong("opened, the model says it must be refused (%s)", expect->why);
    if (expect) {
        /* QEMU's length: the header size in whole 512-byte sectors, which
         * bdrv_getlength may round up */
        uint64_t down = expect->size / 512 * 512;
        if (bs->size != down && bs->size != down + 512 * (expect->size % 512 != 0))
            wrong("size %llu, the header says %llu", (unsigned long long)bs->size,
                     (unsigned long long)expect->size);
    }
    struct reader r = { .bs = bs };
    co_enter(co_create(read_all, &r));
    if (r.reads_ok + r.reads_failed == 0 && bs->size)
        loop_run(loop_main());
    for (uint64_t off = 0; off < bs->size && off < (8u << 20);) {
        uint64_t pnum;
        unsigned flags;
        int depth;
        if (bnode_block_status(bs, off, bs->size - off, &pnum, &flags, &depth) < 0 || !pnum)
            break;
        if (expect) {
            /* every known cluster in the extent: ZERO for zeros, DATA for data */
            for (uint64_t i = off >> expect->cluster_bits;
                 i < expect->nclusters && i << expect->cluster_bits < off + pnum; i++) {
                if ((expect->kind[i] == M_ZEROS && !(flags & BS_ZERO)) ||
                    (expect->kind[i] == M_DATA && !(flags & BS_DATA)))
                    wrong("block status %#x at %llu+%llu over cluster %llu, the model says %s",
                             flags, (unsigned long long)off, (unsigned long long)pnum,
                             (unsigned long long)i,
                             expect->kind[i] == M_ZEROS ? "zeros" : "data");
            }
        }
        off += pnum;
    }
    if (expect) {
        expect->opened++;
        for (uint64_t i = 0; i < expect->nclusters; i++) {
            expect->zeros += expect->kind[i] == M_ZEROS;
            expect->data += expect->kind[i] == M_DATA;
            expect->unknown += expect->kind[i] == M_UNKNOWN;
        }
    }
    blockdev_del("fz", NULL);
    close(fd);
    return 1;
}

static struct model the_model;

/* Set the model up for img (mutated from base) and try it. */
static int try_with_model(const char *label, const uint8_t *img, size_t n, const uint8_t *base)
{
    struct model *m = &the_model;
    model_open(m, img, n, base);
    m->nclusters = 0;
    if (m->open != MUST_REFUSE)
        model_content(m, img, n);
    expect = m;
    expect_img = img;
    wrong_msg[0] = 0;
    int r = qcow2_try_image(img, n);
    expect = NULL;
    if (wrong_msg[0])
        fail_msg("%s: %s", label, wrong_msg);
    return r;
}

static void test_valid_image_reads_back(void **state)
{
    static uint8_t img[NCL * CS];
    size_t n = build_image(img);
    memset(&the_model, 0, sizeof(the_model));
    assert_int_equal(try_with_model("the valid image", img, n, img), 1);
    /* the model follows the valid image: 7 data clusters, one zero
     * cluster among them, the rest of the 1 MiB unallocated */
    assert_int_equal(the_model.unknown, 0);
    assert_int_equal(the_model.data, 6);
    assert_int_equal(the_model.zeros, 256 - 6);
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void test_mutated_metadata(void **state)
{
    static uint8_t base[NCL * CS], img[NCL * CS];
    size_t n = build_image(base);
    int opened = 0, runs = getenv("QCOW2_MUTATIONS") ? atoi(getenv("QCOW2_MUTATIONS")) : 1500;
    int must_refuse = 0, must_open = 0;
    memset(&the_model, 0, sizeof(the_model));
    for (int i = 0; i < runs; i++) {
        memcpy(img, base, n);
        int flips = 1 + next() % 4;
        for (int k = 0; k < flips; k++) {
            /* mostly the header and the tables; sometimes anywhere */
            size_t at = next() % 4 == 0 ? next() % n : next() % (5 * CS);
            if (next() % 2)
                img[at] ^= 1u << (next() % 8);
            else
                img[at] = (uint8_t)next();
        }
        if (next() % 8 == 0) {          /* a big value in a header field */
            static const size_t fields[] = { 8, 16, 20, 24, 36, 40, 48, 56, 60, 64, 72, 96, 100 };
            uint32_t v = (uint32_t)next();
            memcpy(img + fields[next() % 13], &v, 4);
        }
        char label[64];
        snprintf(label, sizeof(label), "mutation %d", i);
        int got = try_with_model(label, img, n, base);
        must_refuse += the_model.open == MUST_REFUSE;
        must_open += the_model.open == MUST_OPEN;
        opened += got;
    }
    print_message("%d of %d mutated images opened; the model said %d must open, %d must be "
                  "refused; opened images' clusters: %d zeros, %d data, %d unknown\n",
                  opened, runs, must_open, must_refuse, the_model.zeros, the_model.data,
                  the_model.unknown);
    assert_true(opened > 0);
    assert_true(opened < runs);
    /* the model decided often: the checks above ran, not only the fallback */
    assert_true(must_open > runs / 10);
    assert_true(must_refuse > runs / 20);
    assert_true(the_model.data > runs && the_model.zeros > runs);
}

/* Every single bit flip of the header fields, of the L1 table's entries and
 * of the L2 table's used entries (and one unused): 1536 images, each
 * decided by the model. */
static void test_single_bit_flips(void **state)
{
    static uint8_t base[NCL * CS], img[NCL * CS];
    size_t n = build_image(base);
    static const struct { size_t at, len; const char *what; } areas[] = {
        { 0, 112, "header" }, { CS, 16, "L1" }, { 4 * CS, 64, "L2" },
    };
    int opened = 0, tried = 0, must_refuse = 0, must_open = 0;
    memset(&the_model, 0, sizeof(the_model));
    for (size_t a = 0; a < sizeof(areas) / sizeof(areas[0]); a++) {
        for (size_t bit = 0; bit < areas[a].len * 8; bit++) {
            char label[64];
            memcpy(img, base, n);
            img[areas[a].at + bit / 8] ^= 1u << (bit % 8);
            snprintf(label, sizeof(label), "%s byte %zu bit %zu", areas[a].what, bit / 8, bit % 8);
            opened += try_with_model(label, img, n, base);
            must_refuse += the_model.open == MUST_REFUSE;
            must_open += the_model.open == MUST_OPEN;
            tried++;
        }
    }
    print_message("%d of %d one-bit flips opened; the model said %d must open, %d must be "
                  "refused; opened images' clusters: %d zeros, %d data, %d unknown\n",
                  opened, tried, must_open, must_refuse, the_model.zeros, the_model.data,
                  the_model.unknown);
    assert_int_equal(tried, 1536);
    /* the L1 and L2 flips leave the header alone: all 640 must open */
    assert_true(must_open >= 640);
    assert_true(must_refuse > 0);
    assert_true(the_model.unknown > 0 && the_model.data > 0);
}

int main(void)
{
    loop_main_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_image_reads_back),
        cmocka_unit_test(test_mutated_metadata),
        cmocka_unit_test(test_single_bit_flips),
    };
    int r = cmocka_run_group_tests(tests, NULL, NULL);
    co_pool_drain();
    return r;
}
