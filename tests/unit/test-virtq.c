/*
 * Unit tests of the split virtqueue and guest memory map (virtq.c):
 * crafted rings in a buffer standing in for guest memory, every hostile
 * case the export must survive (addresses outside memory, overflowing
 * lengths, loops, bad indices, bad indirect tables, iovec exhaustion),
 * and the used ring / EVENT_IDX notification logic.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "export/vhost-user-blk/virtq.h"

#define GPA_BASE 0x100000ull
#define MEMSZ (1u << 20)
#define QN 16

struct fixture {
    uint8_t *buf;
    struct vq_mem *m;
    struct virtq vq;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    struct iovec iov[64];
    struct virtq_elem e;
};

static uint64_t G(struct fixture *f, size_t off) { return GPA_BASE + off; }

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    f->buf = aligned_alloc(4096, MEMSZ);
    memset(f->buf, 0, MEMSZ);
    f->m = vq_mem_new();
    f->m->nregions = 1;
    f->m->r[0] = (struct vq_mem_region){ .gpa = GPA_BASE, .size = MEMSZ, .uva = 0x7000000,
                                         .host = f->buf };
    f->desc = (void *)f->buf;
    f->avail = (void *)(f->buf + 4096);
    f->used = (void *)(f->buf + 8192);
    virtq_attach(&f->vq, QN, f->desc, f->avail, f->used, 0, false);
    f->e.iov = f->iov;
    f->e.max_iov = 64;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    vq_mem_unref(f->m);
    free(f->buf);
    free(f);
    return 0;
}

static void offer(struct fixture *f, uint16_t head)
{
    f->avail->ring[f->avail->idx % QN] = head;
    f->avail->idx++;
}

static void set_desc(struct vring_desc *t, unsigned i, uint64_t addr, uint32_t len,
                     uint16_t flags, uint16_t next)
{
    t[i] = (struct vring_desc){ addr, len, flags, next };
}

/* A normal request: header (readable), data (writable), status (writable). */
static void std_chain(struct fixture *f)
{
    set_desc(f->desc, 0, G(f, 0x10000), 16, VRING_DESC_F_NEXT, 1);
    set_desc(f->desc, 1, G(f, 0x20000), 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
    set_desc(f->desc, 2, G(f, 0x30000), 1, VRING_DESC_F_WRITE, 0);
}

static void test_pop_direct(void **state)
{
    struct fixture *f = *state;
    std_chain(f);
    offer(f, 0);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), 1);
    assert_int_equal(f->e.head, 0);
    assert_int_equal(f->e.out_num, 1);
    assert_int_equal(f->e.in_num, 2);
    assert_ptr_equal(f->iov[0].iov_base, f->buf + 0x10000);   /* no copy: guest memory */
    assert_int_equal(f->iov[1].iov_len, 4096);
    assert_ptr_equal(f->iov[2].iov_base, f->buf + 0x30000);
    assert_int_equal(f->vq.inflight, 1);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), 0);      /* empty now */
}

static void test_pop_indirect(void **state)
{
    struct fixture *f = *state;
    struct vring_desc *it = (void *)(f->buf + 0x40000);
    std_chain(f);
    memcpy(it, f->desc, 3 * sizeof(*it));
    set_desc(f->desc, 5, G(f, 0x40000), 48, VRING_DESC_F_INDIRECT, 0);
    offer(f, 5);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), 1);
    assert_int_equal(f->e.head, 5);
    assert_int_equal(f->e.out_num, 1);
    assert_int_equal(f->e.in_num, 2);
}

/* An indirect table at an odd guest address: read bytewise, same result
 * (UBSan's alignment check fails this in the sanitizer build otherwise). */
static void test_pop_indirect_misaligned(void **state)
{
    struct fixture *f = *state;
    for (unsigned off = 1; off < 16; off += 3) {
        std_chain(f);
        memcpy(f->buf + 0x40000 + off, f->desc, 3 * sizeof(struct vring_desc));
        set_desc(f->desc, 5, G(f, 0x40000 + off), 48, VRING_DESC_F_INDIRECT, 0);
        offer(f, 5);
        assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), 1);
        assert_int_equal(f->e.head, 5);
        assert_int_equal(f->e.out_num, 1);
        assert_int_equal(f->e.in_num, 2);
        virtq_push(&f->vq, f->e.head, 0);
    }
}

static void test_desc_outside_memory(void **state)
{
    struct fixture *f = *state;
    std_chain(f);
    f->desc[1].addr = GPA_BASE + MEMSZ - 100;     /* runs past the end */
    offer(f, 0);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EFAULT);
    assert_int_equal(f->e.head, 0);               /* consumed: must be completed */
    assert_int_equal(f->vq.inflight, 1);
    f->desc[1].addr = 0x1000;                     /* below the region */
    offer(f, 0);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EFAULT);
    f->desc[1].addr = UINT64_MAX - 10;            /* addr + len overflows */
    offer(f, 0);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EFAULT);
    f->desc[1].addr = G(f, 0);
    f->desc[1].len = UINT32_MAX;                  /* longer than memory */
    offer(f, 0);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EFAULT);
}

static void test_loop(void **state)
{
    struct fixture *f = *state;
    std_chain(f);
    f->desc[2].flags |= VRING_DESC_F_NEXT;
    f->desc[2].next = 1;                          /* 1 -> 2 -> 1 ... */
    offer(f, 0);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -ELOOP);
    assert_int_equal(f->e.head, 0);
}

static void test_self_loop_all_writable(void **state)
{
    struct fixture *f = *state;
    /* a chain through every entry and back: longer than the queue */
    for (unsigned i = 0; i < QN; i++)
        set_desc(f->desc, i, G(f, 0x20000), 0, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, (i + 1) % QN);
    offer(f, 3);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -ELOOP);
}

static void test_next_out_of_range(void **state)
{
    struct fixture *f = *state;
    std_chain(f);
    f->desc[1].next = QN + 3;
    offer(f, 0);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EINVAL);
}

static void test_head_out_of_range(void **state)
{
    struct fixture *f = *state;
    offer(f, QN);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EPROTO);
}

static void test_avail_idx_jump(void **state)
{
    struct fixture *f = *state;
    f->avail->idx = QN + 1;                       /* more than the ring holds */
    assert_int_equal(virtq_avail(&f->vq), -EPROTO);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EPROTO);
    f->avail->idx = QN;                           /* exactly full is fine */
    assert_int_equal(virtq_avail(&f->vq), QN);
}

static void test_read_after_write(void **state)
{
    struct fixture *f = *state;
    std_chain(f);
    f->desc[2].flags = 0;                         /* readable after writable */
    offer(f, 0);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EINVAL);
}

static void test_indirect_bad(void **state)
{
    struct fixture *f = *state;
    struct vring_desc *it = (void *)(f->buf + 0x40000);
    std_chain(f);
    memcpy(it, f->desc, 3 * sizeof(*it));

    set_desc(f->desc, 5, G(f, 0x40000), 47, VRING_DESC_F_INDIRECT, 0);   /* not whole entries */
    offer(f, 5);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EINVAL);

    set_desc(f->desc, 5, G(f, 0x40000), 0, VRING_DESC_F_INDIRECT, 0);    /* empty */
    offer(f, 5);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EINVAL);

    set_desc(f->desc, 5, G(f, MEMSZ - 16), 48, VRING_DESC_F_INDIRECT, 0); /* outside */
    offer(f, 5);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EFAULT);

    set_desc(f->desc, 5, G(f, 0x40000), 48, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 6);
    offer(f, 5);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EINVAL);

    it[1].flags |= VRING_DESC_F_INDIRECT;                                  /* nested */
    set_desc(f->desc, 5, G(f, 0x40000), 48, VRING_DESC_F_INDIRECT, 0);
    offer(f, 5);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EINVAL);

    it[1].flags &= ~VRING_DESC_F_INDIRECT;
    it[2].flags |= VRING_DESC_F_NEXT;                                      /* loop */
    it[2].next = 0;
    offer(f, 5);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -ELOOP);

    /* indirect in the middle of a direct chain */
    set_desc(f->desc, 7, G(f, 0x10000), 16, VRING_DESC_F_NEXT, 8);
    set_desc(f->desc, 8, G(f, 0x40000), 48, VRING_DESC_F_INDIRECT, 0);
    offer(f, 7);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EINVAL);
}

static void test_too_many_iovs(void **state)
{
    struct fixture *f = *state;
    std_chain(f);
    f->e.max_iov = 2;
    offer(f, 0);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -E2BIG);
}

static void test_region_split(void **state)
{
    struct fixture *f = *state;
    /* split the memory into two adjacent regions at 0x20800 */
    f->m->r[1] = f->m->r[0];
    f->m->r[0].size = 0x20800;
    f->m->r[1].gpa = GPA_BASE + 0x20800;
    f->m->r[1].size = MEMSZ - 0x20800;
    f->m->r[1].host = f->buf + 0x20800;
    f->m->r[1].uva = 0x7000000 + 0x20800;
    f->m->nregions = 2;
    std_chain(f);
    offer(f, 0);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), 1);
    assert_int_equal(f->e.in_num, 3);               /* data split in two */
    assert_int_equal(f->iov[1].iov_len, 0x800);
    assert_ptr_equal(f->iov[2].iov_base, f->buf + 0x20800);
    assert_int_equal(f->iov[2].iov_len, 4096 - 0x800);
    /* a single-range lookup across the boundary fails */
    assert_null(vq_mem_gpa(f->m, GPA_BASE + 0x20000, 4096));
    assert_non_null(vq_mem_uva(f->m, 0x7000000, 16));
    assert_null(vq_mem_uva(f->m, 0x7000000 - 1, 16));
}

static void test_push_and_notify(void **state)
{
    struct fixture *f = *state;
    std_chain(f);
    offer(f, 0);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), 1);
    virtq_push(&f->vq, 0, 4097);
    assert_int_equal(f->used->idx, 1);
    assert_int_equal(f->used->ring[0].id, 0);
    assert_int_equal(f->used->ring[0].len, 4097);
    assert_int_equal(f->vq.inflight, 0);
    assert_true(virtq_should_notify(&f->vq));
    f->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
    assert_false(virtq_should_notify(&f->vq));
}

static void test_event_idx(void **state)
{
    struct fixture *f = *state;
    uint16_t *used_event = &f->avail->ring[QN];
    uint16_t *avail_event = (uint16_t *)&f->used->ring[QN];

    virtq_attach(&f->vq, QN, f->desc, f->avail, f->used, 0, true);
    std_chain(f);
    for (int i = 0; i < 3; i++)
        offer(f, 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), 1);
    assert_false(virtq_enable_kick(&f->vq));
    assert_int_equal(*avail_event, 3);
    virtq_push(&f->vq, 0, 1);
    assert_true(virtq_should_notify(&f->vq));       /* first one always */
    *used_event = 5;                                /* guest: wake me after the 6th */
    virtq_push(&f->vq, 0, 1);
    assert_false(virtq_should_notify(&f->vq));
    f->vq.used_idx = 5;                             /* jump: 2 -> 6 crosses used_event */
    virtq_push(&f->vq, 0, 1);
    assert_true(virtq_should_notify(&f->vq));
    offer(f, 0);
    assert_true(virtq_enable_kick(&f->vq));         /* entries arrived: pop again */
}

static void test_iov_helpers(void **state)
{
    char a[4] = "abcd", b[4] = "efgh", out[8];
    struct iovec v[2] = { { a, 4 }, { b, 4 } }, *p = v;
    unsigned n = 2;
    (void)state;
    assert_int_equal(iov_total(v, 2), 8);
    assert_int_equal(iov_copy_out(v, 2, 2, out, 5), 5);
    assert_memory_equal(out, "cdefg", 5);
    assert_int_equal(iov_copy_out(v, 2, 6, out, 5), 2);
    iov_drop_front(&p, &n, 5);
    assert_int_equal(n, 1);
    assert_ptr_equal(p->iov_base, b + 1);
    n = 2;
    p = v;
    v[1].iov_len = 4;
    iov_drop_back(v, &n, 4);
    assert_int_equal(n, 1);
    iov_drop_back(v, &n, 1);
    assert_int_equal(v[0].iov_len, 3);
}

static uint64_t rnd(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

/* Random descriptor tables and avail rings: every iovec handed out lies
 * inside guest memory, and pop never loops or crashes. */
static void test_random_rings(void **state)
{
    struct fixture *f = *state;
    uint64_t x = 0x9e3779b97f4a7c15ull;
#define RND() rnd(&x)
    for (int round = 0; round < 2000; round++) {
        virtq_attach(&f->vq, QN, f->desc, f->avail, f->used, 0, round & 1);
        f->avail->idx = 0;
        for (unsigned i = 0; i < QN; i++) {
            uint64_t r = RND();
            uint64_t addr = (r & 7) == 0 ? RND() : GPA_BASE + (RND() % (MEMSZ + 4096)) - 2048;
            uint32_t len = (r >> 8) & 1 ? RND() % 65536 : RND();
            uint16_t flags = (r >> 16) & 7;
            if (flags & VRING_DESC_F_INDIRECT && (r >> 20) & 1) {   /* a plausible table */
                addr = GPA_BASE + 0x40000 + (RND() % 64) * 16;
                len = 16 * (1 + RND() % 8);
            }
            set_desc(f->desc, i, addr, len, flags, (r >> 24) % (QN + 2));
        }
        struct vring_desc *it = (void *)(f->buf + 0x40000);
        for (unsigned i = 0; i < 128; i++) {
            uint64_t a = GPA_BASE + RND() % MEMSZ;
            uint32_t l = RND() % 8192;
            uint16_t fl = RND() & 7;
            set_desc(it, i, a, l, fl, RND() % 10);
        }
        unsigned n = RND() % (QN + 2);
        for (unsigned i = 0; i < n; i++)
            offer(f, RND() % (QN + 1));
        for (unsigned k = 0; k < QN + 2; k++) {
            int r = virtq_pop(&f->vq, f->m, &f->e);
            if (r == 0 || r == -EPROTO)
                break;
            if (r < 0)
                continue;
            for (unsigned j = 0; j < f->e.out_num + f->e.in_num; j++) {
                uint8_t *b = f->iov[j].iov_base;
                assert_true(b >= f->buf && b + f->iov[j].iov_len <= f->buf + MEMSZ);
            }
        }
    }
#undef RND
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_pop_direct, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pop_indirect, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pop_indirect_misaligned, setup, teardown),
        cmocka_unit_test_setup_teardown(test_desc_outside_memory, setup, teardown),
        cmocka_unit_test_setup_teardown(test_loop, setup, teardown),
        cmocka_unit_test_setup_teardown(test_self_loop_all_writable, setup, teardown),
        cmocka_unit_test_setup_teardown(test_next_out_of_range, setup, teardown),
        cmocka_unit_test_setup_teardown(test_head_out_of_range, setup, teardown),
        cmocka_unit_test_setup_teardown(test_avail_idx_jump, setup, teardown),
        cmocka_unit_test_setup_teardown(test_read_after_write, setup, teardown),
        cmocka_unit_test_setup_teardown(test_indirect_bad, setup, teardown),
        cmocka_unit_test_setup_teardown(test_too_many_iovs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_region_split, setup, teardown),
        cmocka_unit_test_setup_teardown(test_push_and_notify, setup, teardown),
        cmocka_unit_test_setup_teardown(test_event_idx, setup, teardown),
        cmocka_unit_test(test_iov_helpers),
        cmocka_unit_test_setup_teardown(test_random_rings, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
