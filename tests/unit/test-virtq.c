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

/* An empty writable buffer before a readable one: still the wrong order
 * (the model in test_random_rings found it accepted). */
static void test_read_after_empty_write(void **state)
{
    struct fixture *f = *state;
    set_desc(f->desc, 0, G(f, 0x30000), 0, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1);
    set_desc(f->desc, 1, G(f, 0x10000), 16, VRING_DESC_F_NEXT, 2);
    set_desc(f->desc, 2, G(f, 0x30000), 1, VRING_DESC_F_WRITE, 0);
    offer(f, 0);
    assert_int_equal(virtq_pop(&f->vq, f->m, &f->e), -EINVAL);
    assert_int_equal(f->e.head, 0);
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

/* ---- a model of the split ring ------------------------------------------------
 * Written from the virtio spec and virtq.h's contract, not from virtq.c: it
 * sees guest memory as 256-byte cells, each owned by one region or by none,
 * and walks a buffer cell by cell (virtq.c looks regions up by range).  For a
 * ring it says what each pop must give: the head and its iovecs (which bytes
 * of which region, split where regions meet), or which fault refuses the
 * chain, the first in chain order:
 *   - next index outside the table: EINVAL; more descriptors than the table
 *     holds: ELOOP; an indirect flag inside a chain: EINVAL; a device-readable
 *     buffer after a device-writable one: EINVAL;
 *   - a byte outside every region: EFAULT; more iovecs than the caller gave
 *     room for: E2BIG (whichever the walk meets first);
 *   - an indirect head: with NEXT, empty, not whole entries or more than
 *     VIRTQ_MAX_SIZE of them: EINVAL; not inside one region: EFAULT;
 *   - no head to complete (avail index more than the ring ahead, head number
 *     past the ring): EPROTO, and nothing is consumed.
 * Zero-length buffers add no iovec.  The used ring gets exactly what was
 * pushed, in order; EVENT_IDX asks for an interrupt when the used index moves
 * past used_event (the first completion always notifies). */
#define CELL 256u
#define NCELLS (MEMSZ / CELL)
#define MAXP 6

struct mlayout {
    unsigned np;                    /* pieces of the host buffer */
    size_t hoff[MAXP], size[MAXP];  /* host offset and size of each */
    uint64_t gpa[MAXP];             /* where the guest sees it */
    bool mapped[MAXP];              /* in the memory table (else a hole) */
    int cell[NCELLS];               /* guest cell -> piece, -1 = hole */
};

struct mseg { size_t off, len; };    /* bytes of f->buf */

static unsigned m_splits;            /* buffers split where regions meet */

struct mpop {
    int ret;
    uint16_t head;
    unsigned nout, nin;
    struct mseg seg[64];
};

/* Which piece holds guest byte a, or -1. */
static int m_piece(const struct mlayout *L, uint64_t a)
{
    if (a < GPA_BASE || a - GPA_BASE >= MEMSZ)
        return -1;
    return L->cell[(a - GPA_BASE) / CELL];
}

/* [a, a+len) as segments appended to p (writable or not); the first byte
 * outside every piece is EFAULT, a segment with no room left E2BIG. */
static int m_translate(const struct mlayout *L, uint64_t a, uint64_t len, bool w,
                       unsigned max_iov, struct mpop *p)
{
    int cur = -1;                   /* piece of the open segment */
    while (len > 0) {
        int pc = m_piece(L, a);
        if (pc < 0)
            return -EFAULT;
        uint64_t in_cell = CELL - (a - GPA_BASE) % CELL;
        uint64_t take = len < in_cell ? len : in_cell;
        if (pc != cur) {
            m_splits += cur >= 0;
            if (p->nout + p->nin == max_iov)
                return -E2BIG;
            p->seg[p->nout + p->nin] = (struct mseg){ L->hoff[pc] + (a - L->gpa[pc]), 0 };
            if (w)
                p->nin++;
            else
                p->nout++;
            cur = pc;
        }
        p->seg[p->nout + p->nin - 1].len += take;
        a += take;
        len -= take;
    }
    return 0;
}

static void m_read(const struct fixture *f, const struct mlayout *L, uint64_t a,
                   void *out, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        int pc = m_piece(L, a + i);
        ((uint8_t *)out)[i] = f->buf[L->hoff[pc] + (a + i - L->gpa[pc])];
    }
}

static int m_chain(const struct fixture *f, const struct mlayout *L, const struct vring_desc *tbl,
                   uint64_t tbl_gpa, unsigned n, unsigned first, unsigned max_iov, struct mpop *p)
{
    bool writable_seen = false;
    unsigned i = first;
    for (unsigned visited = 0;; visited++) {
        struct vring_desc d;
        if (i >= n)
            return -EINVAL;
        if (visited == n)
            return -ELOOP;
        if (tbl)
            d = tbl[i];
        else
            m_read(f, L, tbl_gpa + 16ull * i, &d, sizeof(d));
        if (d.flags & VRING_DESC_F_INDIRECT)
            return -EINVAL;
        bool w = d.flags & VRING_DESC_F_WRITE;
        if (!w && writable_seen)
            return -EINVAL;
        writable_seen |= w;
        int r = m_translate(L, d.addr, d.len, w, max_iov, p);
        if (r < 0)
            return r;
        if (!(d.flags & VRING_DESC_F_NEXT))
            return 0;
        i = d.next;
    }
}

/* What the next pop must give; *last is the model's last_avail_idx. */
static void m_pop(const struct fixture *f, const struct mlayout *L, const struct vring_desc *desc,
                  const struct vring_avail *avail, unsigned num, uint16_t *last,
                  unsigned max_iov, struct mpop *p)
{
    uint16_t pending = (uint16_t)(avail->idx - *last);
    memset(p, 0, sizeof(*p));
    if (pending > num) {
        p->ret = -EPROTO;
        return;
    }
    if (pending == 0)
        return;
    uint16_t head = avail->ring[*last % num];
    if (head >= num) {
        p->ret = -EPROTO;
        return;
    }
    (*last)++;
    p->head = head;
    struct vring_desc d = desc[head];
    int r;
    if (!(d.flags & VRING_DESC_F_INDIRECT)) {
        r = m_chain(f, L, desc, 0, num, head, max_iov, p);
    } else if ((d.flags & VRING_DESC_F_NEXT) || d.len == 0 || d.len % 16 ||
               d.len / 16 > VIRTQ_MAX_SIZE) {
        r = -EINVAL;
    } else {
        int pc = m_piece(L, d.addr);
        r = 0;
        for (uint64_t k = 0; k < d.len && r == 0; k++)
            if (m_piece(L, d.addr + k) != pc || pc < 0)
                r = -EFAULT;
        if (r == 0)
            r = m_chain(f, L, NULL, d.addr, d.len / 16, 0, max_iov, p);
    }
    p->ret = r < 0 ? r : 1;
}

/* Does the guest want an interrupt after the used index went old -> new? */
static bool m_notify(bool event_idx, uint16_t avail_flags, uint16_t used_event,
                     bool *valid, uint16_t *old, uint16_t new_idx)
{
    if (!event_idx)
        return !(avail_flags & VRING_AVAIL_F_NO_INTERRUPT);
    bool first = !*valid;
    uint16_t from = *old;
    *valid = true;
    *old = new_idx;
    if (first)
        return true;
    /* the entry numbered used_event was written in this step */
    return (uint16_t)(used_event - from) < (uint16_t)(new_idx - from);
}

static uint64_t rnd(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

/* Pieces of the host buffer at random cell boundaries, placed in guest
 * memory in a random order, some left out (holes). */
static void random_layout(struct fixture *f, struct mlayout *L, uint64_t *x)
{
    size_t cut[MAXP + 1];
    unsigned np = 1 + rnd(x) % MAXP, order[MAXP];
    cut[0] = 0;
    cut[np] = MEMSZ;
    for (unsigned i = 1; i < np; i++) {
        size_t c;
        bool dup;
        do {
            c = (1 + rnd(x) % (NCELLS - 1)) * CELL;
            dup = false;
            for (unsigned j = 1; j < i; j++)
                dup |= cut[j] == c;
        } while (dup);
        unsigned j = i;                       /* insertion: keep cut[] sorted */
        while (j > 1 && cut[j - 1] > c) {
            cut[j] = cut[j - 1];
            j--;
        }
        cut[j] = c;
    }
    L->np = np;
    for (unsigned i = 0; i < np; i++) {
        L->hoff[i] = cut[i];
        L->size[i] = cut[i + 1] - cut[i];
        L->mapped[i] = np == 1 || rnd(x) % 5;
        order[i] = i;
    }
    for (unsigned i = np - 1; i > 0; i--) {   /* shuffle the guest order */
        unsigned j = rnd(x) % (i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    uint64_t g = GPA_BASE;
    for (unsigned k = 0; k < np; k++) {
        unsigned i = order[k];
        L->gpa[i] = g;
        for (size_t c = 0; c < L->size[i] / CELL; c++)
            L->cell[(g - GPA_BASE) / CELL + c] = L->mapped[i] ? (int)i : -1;
        g += L->size[i];
    }
    /* the table lists the mapped pieces in host order, or reversed */
    bool rev = rnd(x) & 1;
    f->m->nregions = 0;
    for (unsigned k = 0; k < np; k++) {
        unsigned i = rev ? np - 1 - k : k;
        if (L->mapped[i])
            f->m->r[f->m->nregions++] = (struct vq_mem_region){
                .gpa = L->gpa[i], .size = L->size[i], .uva = 0x7000000 + L->gpa[i],
                .host = f->buf + L->hoff[i] };
    }
}

/* Write bytes at a guest address through the layout (mapped cells only). */
static void m_write(struct fixture *f, const struct mlayout *L, uint64_t a,
                    const void *src, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        int pc = m_piece(L, a + i);
        if (pc >= 0)
            f->buf[L->hoff[pc] + (a + i - L->gpa[pc])] = ((const uint8_t *)src)[i];
    }
}

static uint64_t itbl_gpa;           /* where this round's indirect tables are */

static struct vring_desc random_desc(uint64_t *x, unsigned i, unsigned num, unsigned split,
                                     bool orderly)
{
    uint64_t r = rnd(x);
    struct vring_desc d;
    switch (r % 16) {
    case 0:  d.addr = rnd(x); break;                                   /* anywhere */
    case 1:  d.addr = GPA_BASE + MEMSZ - rnd(x) % 8192; break;         /* the end */
    default: d.addr = GPA_BASE + rnd(x) % MEMSZ; break;
    }
    switch ((r >> 4) % 16) {
    case 0:  d.len = 0; break;
    case 1:  d.len = (uint32_t)rnd(x); break;
    case 2: case 3: d.len = rnd(x) % 65536; break;
    default: d.len = rnd(x) % 8192; break;
    }
    if (orderly) {
        /* chains i -> i+1, readable below split, writable from it on */
        d.flags = (i >= split ? VRING_DESC_F_WRITE : 0) | ((r >> 8) % 3 ? VRING_DESC_F_NEXT : 0);
        d.next = i + 1 < num ? i + 1 : rnd(x) % (num + 2);
        if ((r >> 12) % 16 == 0)                       /* one field spoilt */
            d.flags ^= 1u << (rnd(x) % 3);
        if ((r >> 16) % 16 == 0)
            d.next = rnd(x) % (num + 2);
    } else {
        d.flags = (r >> 8) & 7;
        d.next = (r >> 24) % (num + 2);
    }
    if ((d.flags & VRING_DESC_F_INDIRECT) && (r >> 32) % 4) {          /* a plausible table */
        d.addr = itbl_gpa + (rnd(x) % 16) * 128 + ((r >> 40) % 8 == 0 ? rnd(x) % 16 : 0);
        d.len = (r >> 44) % 16 == 0 ? 16 * (VIRTQ_MAX_SIZE + 1) : 16 * (1 + rnd(x) % 16);
    }
    return d;
}

/* Random rings over random memory layouts: every pop gives exactly what the
 * model says (return value, head, iovecs byte for byte), the indices and the
 * in-flight count follow, the used ring holds exactly what was pushed, and
 * interrupts are asked for exactly when the guest wants them. */
static void test_random_rings(void **state)
{
    struct fixture *f = *state;
    uint64_t x = 0x9e3779b97f4a7c15ull;
    static struct mlayout L;
    uint8_t *ringbuf = aligned_alloc(4096, 8192);
    unsigned seen_ok = 0, seen_ok_indirect = 0, seen_split = 0, seen[5] = { 0 };
    const int codes[5] = { -EINVAL, -EFAULT, -ELOOP, -E2BIG, -EPROTO };
    unsigned notified = 0, quiet = 0;

    for (size_t i = 0; i < MEMSZ; i++)
        f->buf[i] = (uint8_t)rnd(&x);
    for (int round = 0; round < 3000; round++) {
        unsigned num = 1u << (rnd(&x) % 7);            /* 1 .. 64 */
        struct vring_desc *desc = (void *)ringbuf;
        struct vring_avail *avail = (void *)(ringbuf + 1024);
        struct vring_used *used = (void *)(ringbuf + 2048);
        uint16_t *used_event = &avail->ring[num], *avail_event = (uint16_t *)&used->ring[num];
        bool event_idx = rnd(&x) & 1, orderly = rnd(&x) % 3;
        uint16_t last = rnd(&x) % 4 ? (uint16_t)rnd(&x) : (uint16_t)(0xffff - rnd(&x) % 4);
        uint16_t used_start = (uint16_t)rnd(&x);

        random_layout(f, &L, &x);
        /* the indirect tables: somewhere, or across where two pieces meet */
        itbl_gpa = GPA_BASE + 0x40000;
        for (unsigned i = 0; i < L.np; i++)
            if (L.gpa[i] > GPA_BASE + 0x1000 && rnd(&x) % 2)
                itbl_gpa = L.gpa[i] - 1024;
        memset(ringbuf, 0, 8192);
        unsigned split = rnd(&x) % (num + 1);
        for (unsigned i = 0; i < num; i++)
            desc[i] = random_desc(&x, i, num, split, orderly);
        struct vring_desc itbl[128];
        unsigned isplit = rnd(&x) % 8;
        for (unsigned i = 0; i < 128; i++) {
            itbl[i] = random_desc(&x, i % 8, 8, isplit, orderly);
            if (itbl[i].flags & VRING_DESC_F_INDIRECT && rnd(&x) % 4)
                itbl[i].flags &= ~VRING_DESC_F_INDIRECT;
        }
        m_write(f, &L, itbl_gpa, itbl, sizeof(itbl));
        avail->flags = rnd(&x) & 1 ? VRING_AVAIL_F_NO_INTERRUPT : 0;
        used->idx = used_start;
        virtq_attach(&f->vq, num, desc, avail, used, last, event_idx);
        f->vq.inflight = 0;
        avail->idx = last;
        unsigned n = rnd(&x) % 8 == 0 ? num + 1 + rnd(&x) % 3 : rnd(&x) % (num + 1);
        for (unsigned i = 0; i < n; i++) {
            avail->ring[(uint16_t)(last + i) % num] = rnd(&x) % 16 ? rnd(&x) % num : num;
            avail->idx++;
        }
        f->e.max_iov = rnd(&x) % 4 ? 64 : 1 + rnd(&x) % 4;

        uint16_t m_last = last, m_used = used_start, m_old = 0;
        bool m_valid = false;
        unsigned m_inflight = 0, npushed = 0;
        struct { uint16_t id; uint32_t len; } pushed[80], held[80];
        unsigned nheld = 0;

        for (unsigned k = 0; k < num + 3; k++) {
            struct mpop p;
            m_pop(f, &L, desc, avail, num, &m_last, f->e.max_iov, &p);
            int r = virtq_pop(&f->vq, f->m, &f->e);
            if (r != p.ret) {
                print_message("round %d: pop %d, model %d; head %u of %u\n", round, r, p.ret,
                              f->e.head, num);
                for (unsigned i = 0; i < num; i++)
                    print_message("  desc %u: addr %#llx len %u flags %u next %u\n", i,
                                  (unsigned long long)desc[i].addr, desc[i].len,
                                  desc[i].flags, desc[i].next);
            }
            assert_int_equal(r, p.ret);
            assert_int_equal(f->vq.last_avail_idx, m_last);
            if (r == 0 || r == -EPROTO) {
                if (r == -EPROTO)
                    seen[4]++;
                break;
            }
            m_inflight++;
            assert_int_equal(f->vq.inflight, m_inflight);
            assert_int_equal(f->e.head, p.head);
            uint32_t wlen = 0;
            if (r == 1) {
                assert_int_equal(f->e.out_num, p.nout);
                assert_int_equal(f->e.in_num, p.nin);
                size_t total = 0;
                for (unsigned j = 0; j < p.nout + p.nin; j++) {
                    assert_ptr_equal(f->iov[j].iov_base, f->buf + p.seg[j].off);
                    assert_int_equal(f->iov[j].iov_len, p.seg[j].len);
                    total += p.seg[j].len;
                    if (j >= p.nout)
                        wlen += p.seg[j].len;
                }
                /* the bytes behind the iovecs, from a random offset */
                if (total > 0) {
                    uint8_t got[4096], want[4096];
                    size_t off = rnd(&x) % total, len = total - off < 4096 ? total - off : 4096, w = 0;
                    assert_int_equal(iov_copy_out(f->iov, p.nout + p.nin, off, got, len), len);
                    for (unsigned j = 0; j < p.nout + p.nin && w < len; j++) {
                        if (off >= p.seg[j].len) {
                            off -= p.seg[j].len;
                            continue;
                        }
                        size_t c = p.seg[j].len - off < len - w ? p.seg[j].len - off : len - w;
                        memcpy(want + w, f->buf + p.seg[j].off + off, c);
                        w += c;
                        off = 0;
                    }
                    assert_memory_equal(got, want, len);
                }
                seen_ok++;
                seen_ok_indirect += (desc[p.head].flags & VRING_DESC_F_INDIRECT) != 0;
                if (p.nout + p.nin > 1)
                    seen_split++;
            } else {
                for (unsigned c = 0; c < 4; c++)
                    seen[c] += r == codes[c];
            }
            /* complete it now or later, in another order */
            held[nheld].id = p.head;
            held[nheld++].len = wlen;
            while (nheld > 0 && rnd(&x) % 2) {
                unsigned j = rnd(&x) % nheld;
                pushed[npushed] = held[j];
                held[j] = held[--nheld];
                *used_event = m_used + rnd(&x) % 5 - 2;
                virtq_push(&f->vq, pushed[npushed].id, pushed[npushed].len);
                npushed++;
                m_used++;
                m_inflight--;
                bool want = m_notify(event_idx, avail->flags, *used_event, &m_valid, &m_old, m_used);
                assert_int_equal(virtq_should_notify(&f->vq), want);
                want ? notified++ : quiet++;
            }
        }
        while (nheld > 0) {
            pushed[npushed] = held[--nheld];
            virtq_push(&f->vq, pushed[npushed].id, pushed[npushed].len);
            npushed++;
            m_used++;
            m_inflight--;
        }
        assert_int_equal(f->vq.inflight, m_inflight);
        assert_int_equal(used->idx, m_used);
        for (unsigned j = npushed > num ? npushed - num : 0; j < npushed; j++) {
            struct vring_used_elem *u = &used->ring[(uint16_t)(used_start + j) % num];
            assert_int_equal(u->id, pushed[j].id);
            assert_int_equal(u->len, pushed[j].len);
        }
        if (event_idx) {
            bool more = virtq_enable_kick(&f->vq);
            assert_int_equal(*avail_event, m_last);
            assert_int_equal(more, avail->idx != m_last);
        }
    }
    free(ringbuf);
    f->m->nregions = 0;
    /* the rounds reached every outcome, often */
    print_message("ok %u (indirect %u, several iovecs %u, split buffers %u), EINVAL %u, "
                  "EFAULT %u, ELOOP %u, E2BIG %u, EPROTO %u; notified %u, quiet %u\n",
                  seen_ok, seen_ok_indirect, seen_split, m_splits, seen[0], seen[1], seen[2],
                  seen[3], seen[4], notified, quiet);
    assert_true(seen_ok > 2000 && seen_ok_indirect > 100 && seen_split > 500 && m_splits > 100);
    for (unsigned c = 0; c < 5; c++)
        assert_true(seen[c] > 100);
    assert_true(notified > 1000 && quiet > 1000);
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
        cmocka_unit_test_setup_teardown(test_read_after_empty_write, setup, teardown),
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
