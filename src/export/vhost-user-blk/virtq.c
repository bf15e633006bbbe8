/*
 * Guest memory and split virtqueues (see virtq.h for the theory).
 *
 * Ordering with the guest: the avail index is read with acquire semantics
 * before the ring entries it publishes; a used entry is written before the
 * used index is released; a full fence separates publishing our index from
 * reading the guest's event index (EVENT_IDX), as in the virtio spec.
 *
 * Hostile input: every guest-supplied index is reduced modulo the ring
 * size or checked against the table size, every buffer is translated
 * through vq_mem (which checks it lies in a region, without overflow), a
 * chain can visit at most as many descriptors as its table holds (so a
 * loop ends as -ELOOP), and an indirect table is accepted only as the
 * head, whole inside one region, a non-zero multiple of 16 bytes, at any
 * alignment (its descriptors are copied out bytewise).
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include "export/vhost-user-blk/virtq.h"
#include "util/xalloc.h"

static inline uint64_t MIN_U64(uint64_t a, uint64_t b) { return a < b ? a : b; }

/* ---- SIGBUS guard ----------------------------------------------------------
 * A fixed table the signal handler reads without locks: a slot is live
 * while its end is non-zero; it is filled (start, mem, then end) and
 * emptied (end first) under guard_lock, before the mapping is unmapped, so
 * the handler never sees a slot for memory that is gone. */

#define GUARD_SLOTS 4096

struct guard_slot {
    uintptr_t start, end;         /* end: atomic, 0 = free */
    struct vq_mem *mem;
};

static struct guard_slot guard_slots[GUARD_SLOTS];
static pthread_mutex_t guard_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction guard_prev;

static void guard_handler(int sig, siginfo_t *si, void *uc)
{
    uintptr_t a = (uintptr_t)si->si_addr;

    for (int i = 0; i < GUARD_SLOTS; i++) {
        struct guard_slot *g = &guard_slots[i];
        uintptr_t end = __atomic_load_n(&g->end, __ATOMIC_ACQUIRE);
        if (!end || a < g->start || a >= end)
            continue;
        /* Zero pages over the whole mapping: the access completes, the
         * device sees the flag and drops the front-end. */
        if (mmap((void *)g->start, end - g->start, PROT_READ | PROT_WRITE,
                 MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0) == MAP_FAILED)
            break;
        __atomic_store_n(&g->mem->faulted, 1, __ATOMIC_RELEASE);
        return;
    }
    /* Not guest memory: whoever handled SIGBUS before us decides. */
    if (guard_prev.sa_flags & SA_SIGINFO) {
        guard_prev.sa_sigaction(sig, si, uc);
    } else if (guard_prev.sa_handler != SIG_DFL && guard_prev.sa_handler != SIG_IGN) {
        guard_prev.sa_handler(sig);
    } else {
        signal(SIGBUS, SIG_DFL);      /* returning re-faults: default action */
    }
}

/* Under guard_lock: make guard_handler the SIGBUS handler, unless it is
 * already (someone may have installed another since: chain to it). */
static void guard_install(void)
{
    struct sigaction sa, cur;

    if (sigaction(SIGBUS, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) &&
        cur.sa_sigaction == guard_handler)
        return;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = guard_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &guard_prev);
}

static int guard_add(struct vq_mem *m, void *base, size_t size)
{
    int slot = -1;

    pthread_mutex_lock(&guard_lock);
    guard_install();
    for (int i = 0; i < GUARD_SLOTS && slot < 0; i++) {
        if (!__atomic_load_n(&guard_slots[i].end, __ATOMIC_RELAXED)) {
            guard_slots[i].start = (uintptr_t)base;
            guard_slots[i].mem = m;
            __atomic_store_n(&guard_slots[i].end, (uintptr_t)base + size, __ATOMIC_RELEASE);
            slot = i;
        }
    }
    pthread_mutex_unlock(&guard_lock);
    return slot;
}

static void guard_del(int slot)
{
    if (slot < 0)
        return;
    pthread_mutex_lock(&guard_lock);
    __atomic_store_n(&guard_slots[slot].end, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&guard_lock);
}

/* ---- memory map ---------------------------------------------------------- */

struct vq_mem *vq_mem_new(void)
{
    struct vq_mem *m = xzalloc(sizeof(*m));
    m->refcnt = 1;
    for (unsigned i = 0; i < VQ_MEM_MAX_REGIONS; i++)
        m->guard[i] = -1;
    return m;
}

/* Atomic: the loops serving a device's queues take and drop references
 * from their own threads (one per in-flight request). */
void vq_mem_ref(struct vq_mem *m)
{
    __atomic_add_fetch(&m->refcnt, 1, __ATOMIC_RELAXED);
}

void vq_mem_unref(struct vq_mem *m)
{
    if (!m || __atomic_sub_fetch(&m->refcnt, 1, __ATOMIC_ACQ_REL) > 0)
        return;
    for (unsigned i = 0; i < m->nregions; i++) {
        guard_del(m->guard[i]);
        if (m->r[i].map_base)
            munmap(m->r[i].map_base, m->r[i].map_size);
    }
    free(m);
}

void vq_mem_guard(struct vq_mem *m)
{
    for (unsigned i = 0; i < m->nregions; i++)
        if (m->r[i].map_base && m->guard[i] < 0)
            m->guard[i] = guard_add(m, m->r[i].map_base, m->r[i].map_size);
}

bool vq_mem_faulted(const struct vq_mem *m)
{
    return m && __atomic_load_n(&m->faulted, __ATOMIC_ACQUIRE);
}

/* Does [addr, addr+len) lie in [start, start+size)?  Overflow-safe. */
static bool range_in(uint64_t addr, uint64_t len, uint64_t start, uint64_t size)
{
    return addr >= start && addr - start < size && len <= size - (addr - start);
}

void *vq_mem_gpa(const struct vq_mem *m, uint64_t gpa, uint64_t len)
{
    for (unsigned i = 0; i < m->nregions; i++) {
        const struct vq_mem_region *r = &m->r[i];
        if (range_in(gpa, len, r->gpa, r->size))
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

void *vq_mem_uva(const struct vq_mem *m, uint64_t uva, uint64_t len)
{
    for (unsigned i = 0; i < m->nregions; i++) {
        const struct vq_mem_region *r = &m->r[i];
        if (range_in(uva, len, r->uva, r->size))
            return r->host + (uva - r->uva);
    }
    return NULL;
}

static const struct vq_mem_region *region_of(const struct vq_mem *m, uint64_t gpa)
{
    for (unsigned i = 0; i < m->nregions; i++)
        if (range_in(gpa, 1, m->r[i].gpa, m->r[i].size))
            return &m->r[i];
    return NULL;
}

int vq_mem_gpa_iov(const struct vq_mem *m, uint64_t gpa, uint64_t len,
                   struct iovec *iov, int max)
{
    int n = 0;

    while (len > 0) {
        const struct vq_mem_region *r = region_of(m, gpa);
        if (!r)
            return -EFAULT;
        if (n == max)
            return -E2BIG;
        uint64_t off = gpa - r->gpa;
        uint64_t chunk = MIN_U64(len, r->size - off);
        iov[n].iov_base = r->host + off;
        iov[n].iov_len = chunk;
        n++;
        gpa += chunk;
        len -= chunk;
    }
    return n;
}

/* ---- rings ----------------------------------------------------------------- */

void virtq_attach(struct virtq *vq, unsigned num, void *desc, void *avail,
                  void *used, uint16_t last_avail_idx, bool event_idx)
{
    vq->num = num;
    vq->desc = desc;
    vq->avail = avail;
    vq->used = used;
    vq->last_avail_idx = last_avail_idx;
    vq->used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
    vq->signalled_used_valid = false;
    vq->event_idx = event_idx;
}

void virtq_detach(struct virtq *vq)
{
    vq->desc = NULL;
    vq->avail = NULL;
    vq->used = NULL;
}

static uint16_t *used_event_p(struct virtq *vq) { return &vq->avail->ring[vq->num]; }
static uint16_t *avail_event_p(struct virtq *vq) { return (uint16_t *)&vq->used->ring[vq->num]; }

int virtq_avail(struct virtq *vq)
{
    uint16_t idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
    uint16_t n = idx - vq->last_avail_idx;
    if (n > vq->num)
        return -EPROTO;
    return n;
}

/* Copy one descriptor out of guest memory (read once: no TOCTOU).  The
 * table is bytes: an indirect table may sit at any guest address (QEMU
 * accepts that too), so no aligned access may be assumed. */
static void desc_read(const uint8_t *table, unsigned i, struct vring_desc *d)
{
    __builtin_memcpy(d, table + (size_t)i * sizeof(*d), sizeof(*d));
    __asm__ volatile("" ::: "memory");    /* d is the copy; never re-read the guest's */
}

/* Append the buffer of d to e. */
static int elem_add(struct virtq_elem *e, const struct vq_mem *m, const struct vring_desc *d)
{
    unsigned used = e->out_num + e->in_num;
    int n;

    if (d->len == 0)
        return 0;
    n = vq_mem_gpa_iov(m, d->addr, d->len, e->iov + used, e->max_iov - used);
    if (n < 0)
        return n;
    if (d->flags & VRING_DESC_F_WRITE)
        e->in_num += n;
    else
        e->out_num += n;
    return 0;
}

/* Walk a chain in table (size max) from index first. */
static int walk_chain(struct virtq_elem *e, const struct vq_mem *m,
                      const uint8_t *table, unsigned max,
                      unsigned first)
{
    struct vring_desc d;
    unsigned i = first, steps = 0;
    bool writable = false;
    int r;

    for (;;) {
        if (i >= max)
            return -EINVAL;
        if (++steps > max)
            return -ELOOP;
        desc_read(table, i, &d);
        if (d.flags & VRING_DESC_F_INDIRECT)
            return -EINVAL;   /* nested, or not at the head */
        /* Device-readable buffers all come first (virtio 2.7.4.2): one
         * after a writable one is refused even if that one was empty. */
        if (!(d.flags & VRING_DESC_F_WRITE) && writable)
            return -EINVAL;
        writable |= (d.flags & VRING_DESC_F_WRITE) != 0;
        r = elem_add(e, m, &d);
        if (r < 0)
            return r;
        if (!(d.flags & VRING_DESC_F_NEXT))
            return 0;
        i = d.next;
    }
}

int virtq_pop(struct virtq *vq, const struct vq_mem *m, struct virtq_elem *e)
{
    struct vring_desc d;
    int avail = virtq_avail(vq);
    unsigned head;

    if (avail < 0)
        return avail;
    if (avail == 0)
        return 0;
    head = __atomic_load_n(&vq->avail->ring[vq->last_avail_idx & (vq->num - 1)],
                           __ATOMIC_RELAXED);
    if (head >= vq->num)
        return -EPROTO;
    vq->last_avail_idx++;
    vq->inflight++;
    e->head = head;
    e->out_num = e->in_num = 0;

    desc_read((const uint8_t *)vq->desc, head, &d);
    if (!(d.flags & VRING_DESC_F_INDIRECT)) {
        int r = walk_chain(e, m, (const uint8_t *)vq->desc, vq->num, head);
        return r < 0 ? r : 1;
    }

    /* Indirect table: only as the whole chain, one region, whole entries. */
    if ((d.flags & VRING_DESC_F_NEXT) || d.len == 0 ||
        d.len % sizeof(struct vring_desc) != 0 ||
        d.len / sizeof(struct vring_desc) > VIRTQ_MAX_SIZE)
        return -EINVAL;
    const uint8_t *table = vq_mem_gpa(m, d.addr, d.len);
    if (!table)
        return -EFAULT;
    int r = walk_chain(e, m, table, d.len / sizeof(struct vring_desc), 0);
    return r < 0 ? r : 1;
}

void virtq_push(struct virtq *vq, uint16_t head, uint32_t len)
{
    volatile struct vring_used_elem *u = &vq->used->ring[vq->used_idx & (vq->num - 1)];
    u->id = head;
    u->len = len;
    vq->used_idx++;
    __atomic_store_n(&vq->used->idx, vq->used_idx, __ATOMIC_RELEASE);
    if (vq->inflight > 0)
        vq->inflight--;
}

/* Virtio spec: notify if event_idx lies in (old, new]. */
static bool need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

bool virtq_should_notify(struct virtq *vq)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!vq->event_idx) {
        uint16_t flags = __atomic_load_n(&vq->avail->flags, __ATOMIC_RELAXED);
        return !(flags & VRING_AVAIL_F_NO_INTERRUPT);
    }
    uint16_t old = vq->signalled_used;
    bool valid = vq->signalled_used_valid;
    vq->signalled_used = vq->used_idx;
    vq->signalled_used_valid = true;
    if (!valid)
        return true;
    uint16_t event = __atomic_load_n(used_event_p(vq), __ATOMIC_RELAXED);
    return need_event(event, vq->used_idx, old);
}

bool virtq_enable_kick(struct virtq *vq)
{
    if (vq->event_idx)
        __atomic_store_n(avail_event_p(vq), vq->last_avail_idx, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return virtq_avail(vq) != 0;
}

/* ---- iovecs ------------------------------------------------------------------ */

size_t iov_total(const struct iovec *iov, unsigned n)
{
    size_t t = 0;
    for (unsigned i = 0; i < n; i++)
        t += iov[i].iov_len;
    return t;
}

static size_t iov_copy(const struct iovec *iov, unsigned n, size_t off,
                       void *buf, size_t len, bool out)
{
    size_t done = 0;
    for (unsigned i = 0; i < n && done < len; i++) {
        if (off >= iov[i].iov_len) {
            off -= iov[i].iov_len;
            continue;
        }
        size_t c = MIN_U64(iov[i].iov_len - off, len - done);
        if (out)
            memcpy((char *)buf + done, (char *)iov[i].iov_base + off, c);
        else
            memcpy((char *)iov[i].iov_base + off, (char *)buf + done, c);
        done += c;
        off = 0;
    }
    return done;
}

size_t iov_copy_out(const struct iovec *iov, unsigned n, size_t off, void *buf, size_t len)
{
    return iov_copy(iov, n, off, buf, len, true);
}

size_t iov_copy_in(const struct iovec *iov, unsigned n, size_t off, const void *buf, size_t len)
{
    return iov_copy(iov, n, off, (void *)buf, len, false);
}

void iov_drop_front(struct iovec **iov, unsigned *n, size_t bytes)
{
    while (*n > 0 && bytes > 0) {
        if (bytes < (*iov)->iov_len) {
            (*iov)->iov_base = (char *)(*iov)->iov_base + bytes;
            (*iov)->iov_len -= bytes;
            return;
        }
        bytes -= (*iov)->iov_len;
        (*iov)++;
        (*n)--;
    }
}

void iov_drop_back(struct iovec *iov, unsigned *n, size_t bytes)
{
    while (*n > 0 && bytes > 0) {
        struct iovec *last = &iov[*n - 1];
        if (bytes < last->iov_len) {
            last->iov_len -= bytes;
            return;
        }
        bytes -= last->iov_len;
        (*n)--;
    }
}
