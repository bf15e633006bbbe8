/*
 * Unit tests of the transport-neutral virtio-blk handler (virtio-blk.c):
 * each request type becomes the right block request, with iovecs that are
 * the guest's own buffers; and every bad request gets QEMU 7.2's status
 * (IOERR for bad ranges, misalignment, writes to a read-only export;
 * UNSUPP for unknown types and flags), or -EINVAL when there is no header
 * or status byte to answer through.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "export/vhost-user-blk/virtio-blk.h"
#include "export/vhost-user-blk/virtq.h"

void bnode_submit(struct bnode *bs, struct breq *req) { (void)bs; (void)req; fail(); }

static struct bnode node = { .size = 1 << 20 };
static struct breq *last;
static int completed;
static int submit_ret;
static bool submit_sync = true;

static void fake_submit(struct vblk_dev *d, struct breq *req)
{
    (void)d;
    last = req;
    if (submit_sync)
        req->done(req, submit_ret);
}

static void on_complete(struct vblk_req *r) { (void)r; completed++; }

struct t {
    struct vblk_dev d;
    struct vblk_req r;
    struct virtio_blk_outhdr hdr;
    uint8_t data[8192];
    uint8_t status;
    struct iovec iov[8];
};

static struct t *T;

static int setup(void **state)
{
    T = calloc(1, sizeof(*T));
    T->d = (struct vblk_dev){ .bs = &node, .blk_size = 512, .num_queues = 1, .writable = true,
                              .write_cache = true, .submit = fake_submit };
    T->r.complete = on_complete;
    T->status = 0xee;
    last = NULL;
    completed = 0;
    submit_ret = 0;
    submit_sync = true;
    *state = T;
    return 0;
}

static int teardown(void **state)
{
    free(*state);
    return 0;
}

/* hdr | data (len, readable for writes) | status */
static int run(uint32_t type, uint64_t sector, uint32_t len, bool data_in)
{
    T->hdr = (struct virtio_blk_outhdr){ type, 0, sector };
    unsigned out = 0, in = 0;
    T->iov[0] = (struct iovec){ &T->hdr, sizeof(T->hdr) };
    out = 1;
    if (len && !data_in)
        T->iov[out++] = (struct iovec){ T->data, len };
    if (len && data_in)
        T->iov[out + in++] = (struct iovec){ T->data, len };
    T->iov[out + in++] = (struct iovec){ &T->status, 1 };
    return vblk_handle(&T->d, &T->r, T->iov, out, in);
}

static void test_read(void **state)
{
    (void)state;
    assert_int_equal(run(VIRTIO_BLK_T_IN, 8, 4096, true), 0);
    assert_non_null(last);
    assert_int_equal(last->op, BREQ_READ);
    assert_int_equal(last->offset, 4096);
    assert_int_equal(last->len, 4096);
    assert_int_equal(last->iovcnt, 1);
    assert_ptr_equal(last->iov[0].iov_base, T->data);      /* zero copy */
    assert_int_equal(T->status, VIRTIO_BLK_S_OK);
    assert_int_equal(T->r.in_len, 4097);
    assert_int_equal(completed, 1);
}

static void test_read_error(void **state)
{
    (void)state;
    submit_ret = -EIO;
    assert_int_equal(run(VIRTIO_BLK_T_IN, 0, 512, true), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_IOERR);
}

static void test_async_completion(void **state)
{
    (void)state;
    submit_sync = false;
    assert_int_equal(run(VIRTIO_BLK_T_OUT, 0, 512, false), 0);
    assert_int_equal(completed, 0);
    assert_int_equal(T->status, 0xee);
    last->done(last, 0);
    assert_int_equal(completed, 1);
    assert_int_equal(T->status, VIRTIO_BLK_S_OK);
}

static void test_write_flags(void **state)
{
    (void)state;
    assert_int_equal(run(VIRTIO_BLK_T_OUT, 2, 1024, false), 0);
    assert_int_equal(last->op, BREQ_WRITE);
    assert_int_equal(last->flags & BREQ_FUA, 0);
    T->d.write_cache = false;                      /* writethrough: durable writes */
    assert_int_equal(run(VIRTIO_BLK_T_OUT, 2, 1024, false), 0);
    assert_true(last->flags & BREQ_FUA);
    assert_int_equal(T->r.in_len, 1);
}

static void test_readonly(void **state)
{
    (void)state;
    T->d.writable = false;
    assert_int_equal(run(VIRTIO_BLK_T_OUT, 0, 512, false), 0);
    assert_null(last);
    assert_int_equal(T->status, VIRTIO_BLK_S_IOERR);
    assert_true(vblk_features(&T->d) & (1ull << VIRTIO_BLK_F_RO));
    T->d.writable = true;
    assert_false(vblk_features(&T->d) & (1ull << VIRTIO_BLK_F_RO));
}

static void test_ranges(void **state)
{
    (void)state;
    uint64_t sectors = node.size / 512;
    assert_int_equal(run(VIRTIO_BLK_T_IN, sectors, 512, true), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_IOERR);           /* past the end */
    assert_int_equal(run(VIRTIO_BLK_T_IN, sectors - 1, 1024, true), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_IOERR);           /* crosses the end */
    assert_int_equal(run(VIRTIO_BLK_T_IN, UINT64_MAX / 256, 512, true), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_IOERR);           /* overflow */
    assert_int_equal(run(VIRTIO_BLK_T_IN, 0, 100, true), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_IOERR);           /* not sectors */
    assert_null(last);
    T->d.blk_size = 4096;
    assert_int_equal(run(VIRTIO_BLK_T_IN, 1, 4096, true), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_IOERR);           /* misaligned */
    assert_int_equal(run(VIRTIO_BLK_T_IN, 8, 4096, true), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_OK);
}

static void test_unknown_and_id(void **state)
{
    (void)state;
    assert_int_equal(run(0x77, 0, 0, true), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_UNSUPP);
    assert_int_equal(run(VIRTIO_BLK_T_GET_ID, 0, 20, true), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_OK);
    assert_string_equal((char *)T->data, "vhost_user_blk");
    assert_int_equal(run(VIRTIO_BLK_T_FLUSH, 0, 0, true), 0);
    assert_int_equal(last->op, BREQ_FLUSH);
    assert_int_equal(run(VIRTIO_BLK_T_IN | VIRTIO_BLK_T_BARRIER, 0, 512, true), 0);
    assert_int_equal(last->op, BREQ_READ);
}

static void seg(uint64_t sector, uint32_t n, uint32_t flags)
{
    struct virtio_blk_discard_write_zeroes s = { sector, n, flags };
    memcpy(T->data, &s, sizeof(s));
}

static void test_discard_write_zeroes(void **state)
{
    (void)state;
    seg(8, 16, 0);
    assert_int_equal(run(VIRTIO_BLK_T_DISCARD, 0, 16, false), 0);
    assert_int_equal(last->op, BREQ_DISCARD);
    assert_int_equal(last->offset, 4096);
    assert_int_equal(last->len, 8192);
    seg(8, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_int_equal(run(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false), 0);
    assert_int_equal(last->op, BREQ_WRITE_ZEROES);
    assert_true(last->flags & BREQ_MAY_UNMAP);
    last = NULL;
    assert_int_equal(run(VIRTIO_BLK_T_DISCARD, 0, 16, false), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_UNSUPP);           /* UNMAP on discard */
    seg(8, 16, 4);
    assert_int_equal(run(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_UNSUPP);           /* unknown flag */
    seg(8, 16, 0);
    assert_int_equal(run(VIRTIO_BLK_T_DISCARD, 0, 32, false), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_UNSUPP);           /* two segments */
    assert_int_equal(run(VIRTIO_BLK_T_DISCARD, 0, 8, false), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_IOERR);            /* short segment */
    seg(0, VBLK_MAX_DISCARD_SECTORS + 1, 0);
    assert_int_equal(run(VIRTIO_BLK_T_DISCARD, 0, 16, false), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_IOERR);            /* too long */
    seg(node.size / 512 - 1, 2, 0);
    assert_int_equal(run(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_IOERR);            /* past the end */
    assert_null(last);
    T->d.writable = false;
    seg(0, 1, 0);
    assert_int_equal(run(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_IOERR);            /* read-only */
}

static void test_no_headers(void **state)
{
    (void)state;
    T->iov[0] = (struct iovec){ &T->hdr, 8 };                    /* short out header */
    T->iov[1] = (struct iovec){ &T->status, 1 };
    assert_int_equal(vblk_handle(&T->d, &T->r, T->iov, 1, 1), -EINVAL);
    T->iov[0].iov_len = 16;
    assert_int_equal(vblk_handle(&T->d, &T->r, T->iov, 1, 0), -EINVAL);   /* no status */
    assert_int_equal(vblk_handle(&T->d, &T->r, T->iov + 1, 0, 1), -EINVAL); /* no header */
    /* header split over two iovecs is fine */
    T->hdr = (struct virtio_blk_outhdr){ VIRTIO_BLK_T_FLUSH, 0, 0 };
    T->iov[0] = (struct iovec){ &T->hdr, 5 };
    T->iov[1] = (struct iovec){ (char *)&T->hdr + 5, 11 };
    T->iov[2] = (struct iovec){ &T->status, 1 };
    assert_int_equal(vblk_handle(&T->d, &T->r, T->iov, 2, 1), 0);
    assert_int_equal(T->status, VIRTIO_BLK_S_OK);
    assert_int_equal(completed, 1);
}

static void test_config(void **state)
{
    (void)state;
    struct virtio_blk_config c;
    T->d.blk_size = 4096;
    T->d.num_queues = 3;
    vblk_config(&T->d, &c);
    assert_int_equal(c.capacity, node.size / 512);
    assert_int_equal(c.blk_size, 4096);
    assert_int_equal(c.num_queues, 3);
    assert_int_equal(c.seg_max, 126);
    assert_int_equal(c.discard_sector_alignment, 8);
    assert_int_equal(c.max_discard_sectors, 32768);
    assert_int_equal(c.max_write_zeroes_seg, 1);
    assert_int_equal(c.wce, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_read, setup, teardown),
        cmocka_unit_test_setup_teardown(test_read_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_async_completion, setup, teardown),
        cmocka_unit_test_setup_teardown(test_write_flags, setup, teardown),
        cmocka_unit_test_setup_teardown(test_readonly, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ranges, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_and_id, setup, teardown),
        cmocka_unit_test_setup_teardown(test_discard_write_zeroes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_headers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_config, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
