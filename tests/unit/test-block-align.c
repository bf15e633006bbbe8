/*
 * Unit tests of unaligned requests on an O_DIRECT node (block/align.c):
 * bounce reads, read-modify-write, memory-only misalignment, serialisation
 * of concurrent RMW cycles (in one loop and across two), write-zeroes and
 * discard with unaligned edges.  The image lives in /tmp (O_DIRECT needs a
 * file system that has it: tmpfs does not); every change is mirrored in a
 * model and the whole file is compared with it, read without O_DIRECT.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "block/block.h"
#include "util/loop.h"

#define A     512u
#define SIZE  (1u << 20)
#define MAXQ  32

static char path[64];
static unsigned char model[SIZE];
static struct bnode *bs;            /* file, cache.direct=on; NULL: no O_DIRECT here */

/* ---- set-up ---- */

static void fill_random(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = seed >> 16;
    }
}

static int group_setup(void **state)
{
    strcpy(path, "/tmp/bexd-align-XXXXXX");
    int fd = mkstemp(path);
    if (fd < 0)
        return -1;
    fill_random(model, SIZE, 1);
    if (pwrite(fd, model, SIZE, 0) != SIZE)
        return -1;
    close(fd);
    fd = open(path, O_RDONLY | O_DIRECT);
    if (fd < 0 && errno == EINVAL)
        return 0;                   /* no O_DIRECT on /tmp: every test skips */
    if (fd < 0)
        return -1;
    close(fd);

    char json[512];
    snprintf(json, sizeof(json),
             "{\"driver\":\"file\",\"node-name\":\"d\",\"filename\":\"%s\","
             "\"discard\":\"unmap\",\"cache\":{\"direct\":true}}", path);
    json_t *opts = json_loads(json, 0, NULL);
    error *err = NULL;
    bs = blockdev_add(opts, &err);
    json_decref(opts);
    if (!bs) {
        fprintf(stderr, "blockdev_add: %s\n", err->msg);
        error_free(err);
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    if (bs)
        blockdev_del("d", NULL);
    unlink(path);
    return 0;
}

static int test_setup(void **state)
{
    if (!bs)
        skip();
    return 0;
}

/* ---- requests ---- */

/* Completions are counted in the main thread (a second loop forwards). */
static int pending;
static struct breq reqs[MAXQ];
static struct iovec iovs[MAXQ][2];
static int rets[MAXQ];
static int nreq;

static void done(struct breq *r, int ret)
{
    rets[r - reqs] = ret;
    if (--pending == 0)
        loop_stop(loop_main());
}

static struct breq *prepare(enum breq_op op, uint64_t off, uint64_t len, void *buf,
                            unsigned flags)
{
    int i = nreq++;
    assert_true(i < MAXQ);
    iovs[i][0] = (struct iovec){ buf, len };
    reqs[i] = (struct breq){ .op = op, .flags = flags, .offset = off, .len = len,
                             .iov = iovs[i], .iovcnt = buf ? 1 : 0,
                             .loop = loop_main(), .done = done };
    rets[i] = 1;
    return &reqs[i];
}

static void submit(struct breq *r)
{
    pending++;
    bnode_submit(bs, r);
}

/* Run the loop until every submitted request completed; all must succeed. */
static void wait_all(void)
{
    if (pending)
        loop_run(loop_main());
    for (int i = 0; i < nreq; i++)
        assert_int_equal(rets[i], 0);
    nreq = 0;
}

static void run(enum breq_op op, uint64_t off, uint64_t len, void *buf, unsigned flags)
{
    submit(prepare(op, off, len, buf, flags));
    wait_all();
}

/* The file as the kernel has it (through the page cache) equals the model. */
static void check_file(void)
{
    static unsigned char got[SIZE];
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    assert_int_equal(pread(fd, got, SIZE, 0), SIZE);
    close(fd);
    for (size_t i = 0; i < SIZE; i++)
        if (got[i] != model[i])
            fail_msg("byte %zu: file 0x%02x, expected 0x%02x", i, got[i], model[i]);
}

/* A buffer at a chosen misalignment from a page boundary. */
static unsigned char *buffer(size_t len, size_t misalign)
{
    unsigned char *p = NULL;
    assert_int_equal(posix_memalign((void **)&p, 4096, len + misalign), 0);
    return p + misalign;
}

static void buffer_free(unsigned char *p, size_t misalign)
{
    free(p - misalign);
}

static void write_model(uint64_t off, uint64_t len, unsigned seed, size_t misalign)
{
    unsigned char *w = buffer(len, misalign);
    fill_random(w, len, seed);
    run(BREQ_WRITE, off, len, w, 0);
    memcpy(model + off, w, len);
    buffer_free(w, misalign);
}

static void read_check(uint64_t off, uint64_t len, size_t misalign)
{
    unsigned char *r = buffer(len, misalign);
    memset(r, 0xee, len);
    run(BREQ_READ, off, len, r, 0);
    assert_memory_equal(r, model + off, len);
    buffer_free(r, misalign);
}

/* Ranges: head only, tail only, both, sub-block, spanning many blocks,
 * last bytes of the image. */
static const struct { uint64_t off, len; } ranges[] = {
    { 100, 1024 - 100 }, { 4096, 100 }, { 8192 + 7, 3 * A }, { 20000 + 10, 20 },
    { 65536 - 300, 70000 }, { SIZE - 3, 3 }, { 0, 1 },
};

/* ---- tests ---- */

static void test_unaligned_reads(void **state)
{
    for (size_t i = 0; i < sizeof(ranges) / sizeof(ranges[0]); i++) {
        read_check(ranges[i].off, ranges[i].len, 0);
        read_check(ranges[i].off, ranges[i].len, 3);
    }
}

static void test_unaligned_writes(void **state)
{
    for (size_t i = 0; i < sizeof(ranges) / sizeof(ranges[0]); i++) {
        write_model(ranges[i].off, ranges[i].len, 100 + i, i % 2);
        check_file();
        read_check(ranges[i].off > 10 ? ranges[i].off - 10 : 0, ranges[i].len + 10, 1);
    }
}

static void test_memory_only_misalignment(void **state)
{
    /* aligned offset and length, buffers off by a byte */
    write_model(3 * 4096, 8192, 7, 1);
    read_check(3 * 4096, 8192, 5);
    /* aligned total, unaligned iovec lengths */
    unsigned char *b = buffer(4096, 0);
    fill_random(b, 4096, 8);
    struct breq *r = prepare(BREQ_WRITE, 40960, 4096, b, BREQ_FUA);
    iovs[r - reqs][0].iov_len = 100;
    iovs[r - reqs][1] = (struct iovec){ b + 100, 4096 - 100 };
    r->iovcnt = 2;
    submit(r);
    wait_all();
    memcpy(model + 40960, b, 4096);
    buffer_free(b, 0);
    check_file();
}

/* Two RMW cycles on one block, both in flight at once: both must land. */
static void test_concurrent_rmw_same_block(void **state)
{
    unsigned char *w[16];
    for (int i = 0; i < 16; i++) {
        /* 16 writes of 20 bytes, two blocks, distinct bytes */
        w[i] = buffer(20, 1);
        fill_random(w[i], 20, 200 + i);
        submit(prepare(BREQ_WRITE, 200000 + 7 + i * 50, 20, w[i], 0));
    }
    wait_all();
    for (int i = 0; i < 16; i++) {
        memcpy(model + 200000 + 7 + i * 50, w[i], 20);
        buffer_free(w[i], 1);
    }
    check_file();
}

/* An aligned write and an RMW on a shared block, either one first: the
 * later one sees the earlier one's data, nothing is written back stale. */
static void test_rmw_and_plain_write(void **state)
{
    unsigned char *plain = buffer(A, 0), *small = buffer(100, 0);
    uint64_t blk = 300 * A;

    fill_random(plain, A, 11);
    fill_random(small, 100, 12);
    submit(prepare(BREQ_WRITE, blk, A, plain, 0));
    submit(prepare(BREQ_WRITE, blk + 100, 100, small, 0));
    wait_all();
    memcpy(model + blk, plain, A);
    memcpy(model + blk + 100, small, 100);
    check_file();

    fill_random(plain, A, 13);
    fill_random(small, 100, 14);
    submit(prepare(BREQ_WRITE, blk + 300, 100, small, 0));
    submit(prepare(BREQ_WRITE, blk, A, plain, 0));
    wait_all();
    memcpy(model + blk, plain, A);
    check_file();
    buffer_free(plain, 0);
    buffer_free(small, 0);
}

static void test_write_zeroes_unaligned_edges(void **state)
{
    static const struct { uint64_t off, len; unsigned flags; } z[] = {
        { 400000 + 100, 5000, 0 },               /* head, middle, tail */
        { 420000 + 10, 20, BREQ_FUA },           /* inside one block */
        { 430080, 3 * A + 7, BREQ_MAY_UNMAP },   /* aligned head, tail */
        { 440000 + 1, 511 + A, 0 },              /* head, aligned end */
    };
    for (size_t i = 0; i < sizeof(z) / sizeof(z[0]); i++) {
        run(BREQ_WRITE_ZEROES, z[i].off, z[i].len, NULL, z[i].flags);
        memset(model + z[i].off, 0, z[i].len);
        check_file();
    }
}

static void test_discard_shrinks(void **state)
{
    /* only the aligned middle may go; the edges keep their data */
    uint64_t off = 500 * A + 100, len = 8 * A;
    run(BREQ_DISCARD, off, len, NULL, 0);
    unsigned char *r = buffer(len, 0);
    run(BREQ_READ, off, len, r, 0);
    assert_memory_equal(r, model + off, A - 100);
    assert_memory_equal(r + len - 100, model + off + len - 100, 100);
    memcpy(model + off, r, len);   /* the middle is zeros or old data */
    buffer_free(r, 0);
    check_file();
    /* nothing aligned inside: a successful no-op */
    run(BREQ_DISCARD, 600 * A + 1, A, NULL, 0);
    check_file();
}

/* ---- two loops on one node ---- */

struct side {
    struct loop *loop;
    int first;                       /* index of its first request */
    int count;
};

static void forwarded_done(void *opaque)
{
    struct breq *r = opaque;
    done(r, rets[r - reqs]);
}

static void done_elsewhere(struct breq *r, int ret)
{
    rets[r - reqs] = ret;             /* read by the main thread after its hop */
    loop_call(loop_main(), forwarded_done, r);
}

static void submit_side(void *opaque)
{
    struct side *s = opaque;
    for (int i = s->first; i < s->first + s->count; i++)
        bnode_submit(bs, &reqs[i]);
}

static void *side_thread(void *opaque)
{
    loop_run(opaque);
    return NULL;
}

static void test_rmw_across_loops(void **state)
{
    struct side side = { .loop = loop_new("side"), .first = 8, .count = 8 };
    pthread_t th;
    unsigned char *w[16];

    for (int i = 0; i < 16; i++) {
        w[i] = buffer(30, 0);
        fill_random(w[i], 30, 300 + i);
        struct breq *r = prepare(BREQ_WRITE, 700000 + 5 + i * 61, 30, w[i], 0);
        if (i >= 8) {
            r->loop = side.loop;
            r->done = done_elsewhere;
        }
    }
    pending = 16;
    assert_int_equal(pthread_create(&th, NULL, side_thread, side.loop), 0);
    loop_call(side.loop, submit_side, &side);
    for (int i = 0; i < 8; i++)
        bnode_submit(bs, &reqs[i]);
    loop_run(loop_main());
    loop_stop(side.loop);
    pthread_join(th, NULL);
    loop_free(side.loop);
    for (int i = 0; i < 16; i++)
        assert_int_equal(rets[i], 0);
    nreq = 0;
    for (int i = 0; i < 16; i++) {
        memcpy(model + 700000 + 5 + i * 61, w[i], 30);
        buffer_free(w[i], 0);
    }
    check_file();
}

/* Nodes without O_DIRECT keep alignment 1 and no alignment state. */
static void test_buffered_node_untouched(void **state)
{
    char json[512];
    snprintf(json, sizeof(json),
             "{\"driver\":\"file\",\"node-name\":\"b\",\"filename\":\"%s\",\"read-only\":true}",
             path);
    json_t *opts = json_loads(json, 0, NULL);
    struct bnode *b = blockdev_add(opts, NULL);
    json_decref(opts);
    assert_non_null(b);
    assert_int_equal(b->request_alignment, 1);
    assert_null(b->align);
    assert_int_equal(bs->request_alignment, A);
    assert_non_null(bs->align);
    assert_int_equal(blockdev_del("b", NULL), 0);
}

int main(void)
{
    loop_main_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_unaligned_reads, test_setup),
        cmocka_unit_test_setup(test_unaligned_writes, test_setup),
        cmocka_unit_test_setup(test_memory_only_misalignment, test_setup),
        cmocka_unit_test_setup(test_concurrent_rmw_same_block, test_setup),
        cmocka_unit_test_setup(test_rmw_and_plain_write, test_setup),
        cmocka_unit_test_setup(test_write_zeroes_unaligned_edges, test_setup),
        cmocka_unit_test_setup(test_discard_shrinks, test_setup),
        cmocka_unit_test_setup(test_rmw_across_loops, test_setup),
        cmocka_unit_test_setup(test_buffered_node_untouched, test_setup),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
