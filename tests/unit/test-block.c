/* Unit tests of the block layer with the real file, raw and null-co drivers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/vfs.h>
#include <linux/magic.h>
#include "block/block.h"
#include "util/aio.h"
#include "util/loop.h"

static char path[64];

static int setup(void **state)
{
    strcpy(path, "/tmp/bexd-unit-XXXXXX");
    int fd = mkstemp(path);
    if (fd < 0 || ftruncate(fd, 4 << 20) < 0)
        return -1;
    /* data in [1 MiB, 1 MiB + 64 KiB), holes elsewhere */
    char buf[65536];
    memset(buf, 0xab, sizeof(buf));
    if (pwrite(fd, buf, sizeof(buf), 1 << 20) != sizeof(buf))
        return -1;
    close(fd);
    return 0;
}

static int teardown(void **state)
{
    unlink(path);
    return 0;
}

static struct bnode *add(const char *json)
{
    error *err = NULL;
    json_t *opts = json_loads(json, 0, NULL);
    assert_non_null(opts);
    struct bnode *bs = blockdev_add(opts, &err);
    if (!bs)
        fail_msg("blockdev_add: %s", err->msg);
    json_decref(opts);
    return bs;
}

static struct bnode *add_file(const char *name, bool ro)
{
    char json[256];
    snprintf(json, sizeof(json),
             "{\"driver\":\"file\",\"node-name\":\"%s\",\"filename\":\"%s\",\"read-only\":%s}",
             name, path, ro ? "true" : "false");
    return add(json);
}

static int last_ret;

static void done(struct breq *r, int ret)
{
    last_ret = ret;
    loop_stop(loop_main());
}

static int run(struct bnode *bs, enum breq_op op, uint64_t off, uint64_t len,
               void *buf, unsigned flags)
{
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    struct breq r = { .op = op, .flags = flags, .offset = off, .len = len,
                      .iov = &iov, .iovcnt = buf ? 1 : 0, .loop = loop_main(), .done = done };
    last_ret = 1;
    bnode_submit(bs, &r);
    if (last_ret == 1)
        loop_run(loop_main());
    return last_ret;
}

static void test_read_write_roundtrip(void **state)
{
    struct bnode *bs = add_file("f0", false);
    char w[4096], rd[4096];
    memset(w, 0x5a, sizeof(w));
    /* inside the data extent, so the holes stay where the other tests expect them */
    assert_int_equal(run(bs, BREQ_WRITE, (1 << 20) + 8192, sizeof(w), w, BREQ_FUA), 0);
    assert_int_equal(run(bs, BREQ_READ, (1 << 20) + 8192, sizeof(rd), rd, 0), 0);
    assert_memory_equal(w, rd, sizeof(w));
    assert_int_equal(run(bs, BREQ_FLUSH, 0, 0, NULL, 0), 0);
    assert_int_equal(blockdev_del("f0", NULL), 0);
}

static void test_out_of_range_and_read_only(void **state)
{
    struct bnode *bs = add_file("ro", true);
    char buf[512];
    assert_int_equal(run(bs, BREQ_READ, (4 << 20) - 256, 512, buf, 0), -EINVAL);
    assert_int_equal(run(bs, BREQ_WRITE, 0, 512, buf, 0), -EPERM);
    error *err = NULL;
    assert_int_equal(bnode_ref_user(bs, true, &err), -1);
    assert_string_equal(err->msg, "Block node is read-only");
    error_free(err);
    assert_int_equal(blockdev_del("ro", NULL), 0);
}

/* Only drivers that store compressed clusters take a compressed write:
 * file and raw refuse it, and write nothing. */
static void test_compressed_write_refused(void **state)
{
    struct bnode *bs = add_file("cw", false);
    struct bnode *r = add("{\"driver\":\"raw\",\"node-name\":\"cr\",\"file\":\"cw\"}");
    char w[65536], rd[65536];
    memset(w, 0x77, sizeof(w));
    assert_int_equal(run(bs, BREQ_WRITE, 1 << 20, sizeof(w), w, BREQ_WRITE_COMPRESSED),
                     -ENOTSUP);
    assert_int_equal(run(r, BREQ_WRITE, 1 << 20, sizeof(w), w, BREQ_WRITE_COMPRESSED),
                     -ENOTSUP);
    assert_int_equal(run(bs, BREQ_READ, 1 << 20, sizeof(rd), rd, 0), 0);
    for (size_t i = 0; i < sizeof(rd); i++)
        assert_int_not_equal((unsigned char)rd[i], 0x77);
    assert_int_equal(blockdev_del("cr", NULL), 0);
    assert_int_equal(blockdev_del("cw", NULL), 0);
}

static void test_block_status_sees_holes(void **state)
{
    struct bnode *bs = add_file("bs", true);
    uint64_t pnum;
    unsigned flags;
    int depth;
    assert_int_equal(bnode_block_status(bs, 0, 4 << 20, &pnum, &flags, &depth), 0);
    assert_int_equal(pnum, 1 << 20);
    assert_true(flags & BS_ZERO);
    assert_false(flags & BS_DATA);
    assert_int_equal(bnode_block_status(bs, 1 << 20, 4 << 20, &pnum, &flags, &depth), 0);
    assert_true(flags & BS_DATA);
    assert_true(pnum >= 65536);
    assert_int_equal(depth, 1);
    assert_int_equal(blockdev_del("bs", NULL), 0);
}

static uint64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000ull + ts.tv_nsec / 1000;
}

/* Time of n block-status calls of 4 KiB at offset 0 of a dense tmpfs file
 * of the given size. */
static uint64_t status_cost_us(const char *file, size_t size, int n)
{
    char json[256];
    int fd = open(file, O_RDWR | O_CREAT | O_TRUNC, 0600);
    char *buf = malloc(1 << 20);
    memset(buf, 0x5a, 1 << 20);
    for (size_t off = 0; off < size; off += 1 << 20)
        assert_int_equal(pwrite(fd, buf, 1 << 20, off), 1 << 20);
    close(fd);
    free(buf);
    snprintf(json, sizeof(json), "{\"driver\":\"file\",\"node-name\":\"dense\","
             "\"filename\":\"%s\",\"read-only\":true}", file);
    struct bnode *bs = add(json);
    uint64_t pnum, t0 = mono_us();
    unsigned flags;
    int depth;
    for (int i = 0; i < n; i++) {
        assert_int_equal(bnode_block_status(bs, 0, 4096, &pnum, &flags, &depth), 0);
        assert_int_equal(pnum, 4096);
        assert_true(flags & BS_DATA);
    }
    uint64_t t = mono_us() - t0;
    assert_int_equal(blockdev_del("dense", NULL), 0);
    unlink(file);
    return t;
}

/* Regression (issue 13, 6): the status of a few bytes of a dense tmpfs
 * image walked SEEK_HOLE to the next hole, so its cost grew with the
 * image (16 ms at 2 GiB).  Now it is bounded by the request: a 64 MiB
 * image costs about what a 1 MiB one does (it cost 64 times more). */
static void test_block_status_cost_bounded_by_request(void **state)
{
    if (access("/dev/shm", W_OK) != 0)
        skip();
    uint64_t small = status_cost_us("/dev/shm/bexd-unit-dense1", 1 << 20, 2000);
    uint64_t big = status_cost_us("/dev/shm/bexd-unit-dense64", 64 << 20, 2000);
    if (big > 8 * small + 50000)
        fail_msg("64 MiB: %llu us, 1 MiB: %llu us", (unsigned long long)big,
                 (unsigned long long)small);
}

/* Status of a file's stretch at offset: its length and whether it is data. */
static uint64_t stretch(struct bnode *bs, uint64_t off, uint64_t len, bool *data)
{
    uint64_t pnum;
    unsigned flags;
    int depth;
    assert_int_equal(bnode_block_status(bs, off, len, &pnum, &flags, &depth), 0);
    *data = flags & BS_DATA;
    return pnum;
}

/* A tmpfs page fallocated and never written is in the page cache and reads
 * as zeros; SEEK_HOLE counts it as a hole and so does QEMU's block status
 * (QEMU leaves such pages where it zeroes the rest of a new qcow2 cluster).
 * The status bexd keeps of a walk must follow the node's own writes and
 * discards. */
static void test_block_status_sees_fallocated_pages(void **state)
{
    const char *file = "/dev/shm/bexd-unit-falloc";
    if (access("/dev/shm", W_OK) != 0)
        skip();
    int fd = open(file, O_RDWR | O_CREAT | O_TRUNC, 0600);
    char *buf = malloc(1 << 20);
    memset(buf, 0x5a, 1 << 20);
    for (int i = 0; i < 4; i++)            /* no page missing anywhere */
        if (i != 1)
            assert_int_equal(pwrite(fd, buf, 1 << 20, (off_t)i << 20), 1 << 20);
    assert_int_equal(fallocate(fd, 0, 1 << 20, 1 << 20), 0);
    close(fd);
    char json[256];
    snprintf(json, sizeof(json), "{\"driver\":\"file\",\"node-name\":\"fa\","
             "\"filename\":\"%s\",\"discard\":\"unmap\"}", file);
    struct bnode *bs = add(json);
    bool data;
    for (int pass = 0; pass < 2; pass++) {      /* walked, then known */
        assert_int_equal(stretch(bs, 0, 4 << 20, &data), 1 << 20);
        assert_true(data);
        assert_int_equal(stretch(bs, 1 << 20, 3 << 20, &data), 1 << 20);
        assert_false(data);
        assert_int_equal(stretch(bs, 2 << 20, 2 << 20, &data), 2 << 20);
        assert_true(data);
    }
    /* a write fills the first fallocated page: the data stretch grows */
    assert_int_equal(run(bs, BREQ_WRITE, 1 << 20, 4096, buf, 0), 0);
    assert_int_equal(stretch(bs, 0, 4 << 20, &data), (1 << 20) + 4096);
    assert_true(data);
    /* a discard makes a hole inside a known stretch */
    assert_int_equal(run(bs, BREQ_DISCARD, 3 << 20, 65536, NULL, 0), 0);
    assert_int_equal(stretch(bs, 2 << 20, 2 << 20, &data), 1 << 20);
    assert_true(data);
    assert_int_equal(stretch(bs, 3 << 20, 1 << 20, &data), 65536);
    assert_false(data);
    assert_int_equal(blockdev_del("fa", NULL), 0);
    unlink(file);
    free(buf);
}

static void test_write_zeroes_and_raw_window(void **state)
{
    struct bnode *f = add_file("wz", false);
    char buf[65536];
    assert_int_equal(run(f, BREQ_WRITE_ZEROES, 1 << 20, 65536, NULL, 0), 0);
    assert_int_equal(run(f, BREQ_READ, 1 << 20, 65536, buf, 0), 0);
    for (size_t i = 0; i < sizeof(buf); i++)
        assert_int_equal(buf[i], 0);
    /* raw over the file, a 1 MiB window at offset 1 MiB */
    struct bnode *r = add("{\"driver\":\"raw\",\"node-name\":\"win\",\"file\":\"wz\","
                          "\"offset\":1048576,\"size\":1048576}");
    assert_int_equal(r->size, 1 << 20);
    char w[512];
    memset(w, 0x33, sizeof(w));
    assert_int_equal(run(r, BREQ_WRITE, 0, 512, w, 0), 0);
    assert_int_equal(run(f, BREQ_READ, 1 << 20, 512, buf, 0), 0);
    assert_memory_equal(buf, w, 512);
    error *err = NULL;
    assert_int_equal(blockdev_del("wz", &err), -1);
    assert_string_equal(err->msg, "Block device wz is in use");
    error_free(err);
    assert_int_equal(blockdev_del("win", NULL), 0);
    assert_int_equal(blockdev_del("wz", NULL), 0);
}

static void test_two_writers_conflict(void **state)
{
    struct bnode *a = add_file("wa", false);
    struct bnode *b = add_file("wb", false);
    error *err = NULL;
    assert_int_equal(bnode_ref_user(a, true, NULL), 0);
    assert_int_equal(bnode_ref_user(b, true, &err), -1);
    assert_string_equal(err->msg, "Failed to get \"write\" lock");
    error_free(err);
    bnode_unref_user(a, true);
    assert_int_equal(bnode_ref_user(b, true, NULL), 0);   /* free again */
    bnode_unref_user(b, true);
    assert_int_equal(blockdev_del("wa", NULL), 0);
    assert_int_equal(blockdev_del("wb", NULL), 0);
}

static void test_node_names(void **state)
{
    error *err = NULL;
    json_t *o = json_pack("{s:s, s:s}", "driver", "null-co", "node-name", "1bad");
    assert_null(blockdev_add(o, &err));
    assert_string_equal(err->msg, "Invalid node-name: '1bad'");
    error_free(err);
    err = NULL;
    json_object_del(o, "node-name");
    assert_null(blockdev_add(o, &err));
    assert_string_equal(err->msg, "'node-name' must be specified for the root node");
    error_free(err);
    json_decref(o);
    struct bnode *n = add("{\"driver\":\"null-co\",\"node-name\":\"n0\",\"read-zeroes\":true}");
    assert_int_equal(n->size, 1 << 30);
    char buf[16];
    memset(buf, 1, sizeof(buf));
    assert_int_equal(run(n, BREQ_READ, 0, sizeof(buf), buf, 0), 0);
    assert_int_equal(buf[7], 0);
    err = NULL;
    o = json_pack("{s:s, s:s}", "driver", "null-co", "node-name", "n0");
    assert_null(blockdev_add(o, &err));
    assert_string_equal(err->msg, "Duplicate nodes with node-name='n0'");
    error_free(err);
    json_decref(o);
    assert_int_equal(blockdev_del("n0", NULL), 0);
}

/* A FUA write is one write with RWF_DSYNC: one request to the engine, no
 * fdatasync after it (QEMU 7.2 writes, then flushes).  The control: a
 * FLUSH is an fdatasync, which io_uring counts as a ring completion and
 * aio=native sends to the pool (an eventfd read).  Needs a file system with
 * O_DIRECT that is not RAM-backed (/var/tmp); RAM-backed files are written
 * inline, with no engine at all. */
static void fua_one_request(const char *aio)
{
    char dpath[] = "/var/tmp/bexd-unit-fua-XXXXXX";
    int fd = mkstemp(dpath);
    struct statfs fs;
    if (fd < 0)
        skip();
    if (fstatfs(fd, &fs) < 0 || fs.f_type == TMPFS_MAGIC || ftruncate(fd, 1 << 20) < 0) {
        close(fd);
        unlink(dpath);
        skip();
    }
    close(fd);
    char json[256];
    snprintf(json, sizeof(json),
             "{\"driver\":\"file\",\"node-name\":\"fua-%s\",\"filename\":\"%s\","
             "\"aio\":\"%s\",\"cache\":{\"direct\":true}}", aio, dpath, aio);
    error *err = NULL;
    json_t *opts = json_loads(json, 0, NULL);
    struct bnode *bs = blockdev_add(opts, &err);
    json_decref(opts);
    if (!bs) {                  /* no O_DIRECT, io_uring or Linux AIO here */
        error_free(err);
        unlink(dpath);
        skip();
    }
    bool native = !strcmp(aio, "native");
    char *buf = NULL;
    assert_int_equal(posix_memalign((void **)&buf, 4096, 4096), 0);
    memset(buf, 0x3c, 4096);
    struct aio_stats a, b, c;
    aio_get_stats(loop_main(), &a);
    assert_int_equal(run(bs, BREQ_WRITE, 8192, 4096, buf, BREQ_FUA), 0);
    aio_get_stats(loop_main(), &b);
    assert_int_equal(run(bs, BREQ_FLUSH, 0, 0, NULL, 0), 0);
    aio_get_stats(loop_main(), &c);
    if (native) {
        assert_int_equal(b.native_completions - a.native_completions, 1);
        assert_int_equal(b.efd_reads - a.efd_reads, 0);           /* no fdatasync in the pool */
        assert_true(c.efd_reads - b.efd_reads >= 1);              /* the control: FLUSH is */
    } else {
        assert_int_equal(b.ring_completions - a.ring_completions, 1);  /* the write alone */
        assert_int_equal(b.efd_reads - a.efd_reads, 0);
        assert_int_equal(c.ring_completions - b.ring_completions, 1);  /* FLUSH: an fsync */
    }
    char back[4096];
    fd = open(dpath, O_RDONLY);
    assert_int_equal(pread(fd, back, sizeof(back), 8192), 4096);
    close(fd);
    assert_memory_equal(back, buf, 4096);
    free(buf);
    snprintf(json, sizeof(json), "fua-%s", aio);
    assert_int_equal(blockdev_del(json, NULL), 0);
    unlink(dpath);
}

static void test_fua_write_one_request_io_uring(void **state)
{
    fua_one_request("io_uring");
}

static void test_fua_write_one_request_native(void **state)
{
    fua_one_request("native");
}

int main(void)
{
    loop_main_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_read_write_roundtrip),
        cmocka_unit_test(test_out_of_range_and_read_only),
        cmocka_unit_test(test_compressed_write_refused),
        cmocka_unit_test(test_block_status_sees_holes),
        cmocka_unit_test(test_block_status_cost_bounded_by_request),
        cmocka_unit_test(test_block_status_sees_fallocated_pages),
        cmocka_unit_test(test_write_zeroes_and_raw_window),
        cmocka_unit_test(test_two_writers_conflict),
        cmocka_unit_test(test_node_names),
        cmocka_unit_test(test_fua_write_one_request_io_uring),
        cmocka_unit_test(test_fua_write_one_request_native),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
