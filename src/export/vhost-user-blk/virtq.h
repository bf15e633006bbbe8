/*
 * Guest memory map and split virtqueues, transport-neutral.
 *
 * A vq_mem is the front-end's memory table: regions of guest-physical
 * memory, each mapped into this process.  It is reference-counted so that
 * every in-flight request pins the mapping its iovecs point into: a new
 * SET_MEM_TABLE or a disconnect drops the table's own reference, and the
 * regions are unmapped only when the last request using them completes.
 *
 * The front-end owns the files behind the mappings and may truncate them
 * later: a touch past the new end raises SIGBUS.  Every mapped table is
 * registered with a guard (vq_mem_guard) whose SIGBUS handler, for an
 * address inside a guarded mapping, replaces that mapping with zero pages
 * and marks the table faulted, so the access completes (reading zeros)
 * and the device drops that front-end; any other SIGBUS goes to the
 * handler that was there before.
 *
 * A virtq is one split ring in guest memory.  virtq_pop() walks one
 * descriptor chain (direct or indirect) into iovecs that point straight
 * into guest memory; every address and length is checked against the
 * memory map, chains are bounded (loops cannot run forever) and each
 * descriptor is copied once before use, so a guest changing the ring
 * under us cannot make us read or write outside its regions.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include "export/vhost-user-blk/vhost-user-proto.h"

#define VQ_MEM_MAX_REGIONS VHOST_USER_MAX_REGIONS

struct vq_mem_region {
    uint64_t gpa;          /* guest-physical start */
    uint64_t size;
    uint64_t uva;          /* front-end's own virtual address of gpa */
    uint8_t *host;         /* our pointer to gpa */
    void *map_base;        /* what to munmap (NULL: not ours to unmap) */
    size_t map_size;
};

struct vq_mem {
    int refcnt;
    int faulted;           /* atomic: a SIGBUS hit one of its mappings */
    int guard[VQ_MEM_MAX_REGIONS];   /* guard slots, -1 = none */
    unsigned nregions;
    struct vq_mem_region r[VQ_MEM_MAX_REGIONS];
};

struct vq_mem *vq_mem_new(void);
void vq_mem_ref(struct vq_mem *m);
void vq_mem_unref(struct vq_mem *m);      /* unmaps on the last reference */
/* Put the mapped regions (map_base set) under the SIGBUS guard. */
void vq_mem_guard(struct vq_mem *m);
/* Did the front-end truncate memory under a mapping of this table? */
bool vq_mem_faulted(const struct vq_mem *m);
/* [gpa, gpa+len) inside one region -> host pointer, else NULL. */
void *vq_mem_gpa(const struct vq_mem *m, uint64_t gpa, uint64_t len);
/* Same for a front-end virtual address (vring addresses). */
void *vq_mem_uva(const struct vq_mem *m, uint64_t uva, uint64_t len);
/* [gpa, gpa+len) -> iovecs, split where regions meet.  Returns the number
 * of iovecs used, -EFAULT if any byte is unmapped, -E2BIG if max is hit. */
int vq_mem_gpa_iov(const struct vq_mem *m, uint64_t gpa, uint64_t len,
                   struct iovec *iov, int max);

struct virtq {
    unsigned num;                 /* ring size (power of two); 0 = unset */
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t last_avail_idx;      /* next avail entry to pop */
    uint16_t used_idx;            /* our copy of used->idx */
    uint16_t signalled_used;
    bool signalled_used_valid;
    bool event_idx;
    unsigned inflight;            /* popped, not yet pushed */
};

/* One popped request: iov[0..out_num) are device-readable, then in_num
 * device-writable ones.  The caller provides iov storage (max_iov). */
struct virtq_elem {
    uint16_t head;
    unsigned out_num, in_num;
    struct iovec *iov;
    unsigned max_iov;
};

/* Attach the ring (pointers already checked to lie in guest memory). */
void virtq_attach(struct virtq *vq, unsigned num, void *desc, void *avail,
                  void *used, uint16_t last_avail_idx, bool event_idx);
void virtq_detach(struct virtq *vq);
/* Number of entries the guest has made available, or -EPROTO if the
 * avail index is more than num ahead (a broken ring). */
int virtq_avail(struct virtq *vq);
/*
 * Pop the next chain.  Returns 1 with *e filled, 0 if the ring is empty,
 * -EPROTO if the ring itself is broken (no head to complete), or
 * -EINVAL/-EFAULT/-E2BIG/-ELOOP if the head was consumed but its chain is
 * malformed: e->head is then valid, and the caller must still push it.
 */
int virtq_pop(struct virtq *vq, const struct vq_mem *m, struct virtq_elem *e);
/* Put a completed head on the used ring (len: bytes written to the guest). */
void virtq_push(struct virtq *vq, uint16_t head, uint32_t len);
/* After pushes: does the guest want an interrupt now? (EVENT_IDX aware) */
bool virtq_should_notify(struct virtq *vq);
/* EVENT_IDX: ask for a kick when the next entry arrives; returns true if
 * entries arrived meanwhile (pop again). */
bool virtq_enable_kick(struct virtq *vq);

/* iovec helpers */
size_t iov_total(const struct iovec *iov, unsigned n);
size_t iov_copy_out(const struct iovec *iov, unsigned n, size_t off, void *buf, size_t len);
size_t iov_copy_in(const struct iovec *iov, unsigned n, size_t off, const void *buf, size_t len);
/* Drop bytes from the front of the iovec array (modified in place). */
void iov_drop_front(struct iovec **iov, unsigned *n, size_t bytes);
/* Drop bytes from the back. */
void iov_drop_back(struct iovec *iov, unsigned *n, size_t bytes);
