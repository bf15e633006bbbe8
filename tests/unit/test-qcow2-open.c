/*
 * The qcow2 open path on hostile input: a small valid image is built in
 * memory (a memfd, opened through /proc/self/fd), then thousands of
 * deterministic mutations of its metadata are opened, read in full and
 * asked for block status.  Each must either fail to open with an error
 * message or serve every request with data or -errno: no crash, no hang,
 * no sanitizer report.  qcow2_try_image() is the one-input entry point a
 * libFuzzer target calls with its bytes.
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
        if (bnode_co_pread(r->bs, off, n, buf, 0) == 0)
            r->reads_ok++;
        else
            r->reads_failed++;
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
        error_free(err);
        close(fd);
        return 0;
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
        off += pnum;
    }
    blockdev_del("fz", NULL);
    close(fd);
    return 1;
}

static void test_valid_image_reads_back(void **state)
{
    static uint8_t img[NCL * CS];
    size_t n = build_image(img);
    assert_int_equal(qcow2_try_image(img, n), 1);
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
        opened += qcow2_try_image(img, n);
    }
    print_message("%d of %d mutated images opened\n", opened, runs);
    assert_true(opened > 0);
    assert_true(opened < runs);
}

int main(void)
{
    loop_main_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_image_reads_back),
        cmocka_unit_test(test_mutated_metadata),
    };
    int r = cmocka_run_group_tests(tests, NULL, NULL);
    co_pool_drain();
    return r;
}
