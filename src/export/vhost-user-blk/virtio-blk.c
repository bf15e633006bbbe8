/*
 * virtio-blk request handler (see virtio-blk.h).
 *
 * Stages: split the header off the readable iovecs and the status byte off
 * the writable ones; check the request (type, range, alignment, writable);
 * fill the breq and submit it; on completion write the status and hand the
 * request back to the transport.  Checks and statuses follow QEMU 7.2:
 * bad ranges and writes to a read-only export are IOERR, unknown types and
 * unknown discard/write-zeroes flags are UNSUPP.
 */
#include <errno.h>
#include <string.h>
#include "export/vhost-user-blk/virtio-blk.h"
#include "export/vhost-user-blk/virtq.h"

#define SECTOR 512u
#define MAX_REQUEST_SECTORS (0x7fffffffu >> VIRTIO_BLK_SECTOR_BITS)

static inline size_t MIN_SZ(size_t a, size_t b) { return a < b ? a : b; }
/* breq is the first member of vblk_req */
static inline struct vblk_req *container_of_vblk(struct breq *b) { return (struct vblk_req *)b; }

uint64_t vblk_features(const struct vblk_dev *d)
{
    uint64_t f = 1ull << VIRTIO_BLK_F_SIZE_MAX |
                 1ull << VIRTIO_BLK_F_SEG_MAX |
                 1ull << VIRTIO_BLK_F_TOPOLOGY |
                 1ull << VIRTIO_BLK_F_BLK_SIZE |
                 1ull << VIRTIO_BLK_F_FLUSH |
                 1ull << VIRTIO_BLK_F_DISCARD |
                 1ull << VIRTIO_BLK_F_WRITE_ZEROES |
                 1ull << VIRTIO_BLK_F_CONFIG_WCE |
                 1ull << VIRTIO_BLK_F_MQ |
                 1ull << VIRTIO_F_VERSION_1 |
                 1ull << VIRTIO_F_INDIRECT_DESC |
                 1ull << VIRTIO_F_EVENT_IDX;
    if (!d->writable)
        f |= 1ull << VIRTIO_BLK_F_RO;
    return f;
}

void vblk_config(const struct vblk_dev *d, struct virtio_blk_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->capacity = d->bs ? d->bs->size >> VIRTIO_BLK_SECTOR_BITS : 0;
    cfg->blk_size = d->blk_size;
    cfg->size_max = 0;
    cfg->seg_max = VBLK_SEG_MAX;
    cfg->min_io_size = 1;
    cfg->opt_io_size = 1;
    cfg->num_queues = d->num_queues;
    cfg->max_discard_sectors = VBLK_MAX_DISCARD_SECTORS;
    cfg->max_discard_seg = 1;
    cfg->discard_sector_alignment = d->blk_size >> VIRTIO_BLK_SECTOR_BITS;
    cfg->max_write_zeroes_sectors = VBLK_MAX_WRITE_ZEROES_SECTORS;
    cfg->max_write_zeroes_seg = 1;
    /* wce stays 0 as in QEMU 7.2: the guest sees a write-through cache
     * until it writes the wce field itself (SET_CONFIG). */
    cfg->wce = 0;
}

static bool range_ok(const struct vblk_dev *d, uint64_t sector, uint64_t bytes)
{
    uint64_t total = d->bs->size >> VIRTIO_BLK_SECTOR_BITS;
    uint64_t n;

    if (bytes % SECTOR)
        return false;
    n = bytes / SECTOR;
    if (n > MAX_REQUEST_SECTORS)
        return false;
    if (sector > UINT64_MAX / SECTOR || (sector * SECTOR) % d->blk_size)
        return false;
    return sector <= total && n <= total - sector;
}

static void finish(struct vblk_req *r, uint8_t status)
{
    r->result = status;
    *r->status = status;
    r->complete(r);
}

static void breq_done(struct breq *b, int ret)
{
    struct vblk_req *r = container_of_vblk(b);
    if (ret == -ENOTSUP && b->op == BREQ_DISCARD)
        ret = 0;       /* discard is a hint: a node that cannot, ignores it */
    finish(r, ret < 0 ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK);
}

static void submit(struct vblk_dev *d, struct vblk_req *r, enum breq_op op,
                   unsigned flags, uint64_t offset, uint64_t len,
                   struct iovec *iov, unsigned iovcnt)
{
    struct breq *b = &r->breq;
    b->op = op;
    b->flags = flags | BREQ_PEER;
    b->offset = offset;
    b->len = len;
    b->iov = iov;
    b->iovcnt = iovcnt;
    b->loop = r->loop ? r->loop : d->loop;
    b->done = breq_done;
    b->opaque = r;
    if (d->submit)
        d->submit(d, b);
    else
        bnode_submit(d->bs, b);
}

static void do_rw(struct vblk_dev *d, struct vblk_req *r, bool write,
                  uint64_t sector, struct iovec *iov, unsigned n)
{
    uint64_t len = iov_total(iov, n);

    if (write && !d->writable) {
        finish(r, VIRTIO_BLK_S_IOERR);
        return;
    }
    if (!range_ok(d, sector, len)) {
        finish(r, VIRTIO_BLK_S_IOERR);
        return;
    }
    if (len == 0) {
        finish(r, VIRTIO_BLK_S_OK);
        return;
    }
    /* The payload is in shared memory, so the loop has nothing to overlap a
     * write with, and writers of one file take turns on its inode lock:
     * a write's copy is cheapest right here (1 MiB: 0.6x the CPU of the
     * worker pool).  Reads scale over threads, so they may go there, unless
     * the request is alone: then a hand-off only adds latency (1 MiB reads
     * at queue depth 1: +13%). */
    submit(d, r, write ? BREQ_WRITE : BREQ_READ,
           (write || r->alone ? BREQ_COPY_INLINE : 0) | (write && !d->write_cache ? BREQ_FUA : 0),
           sector * SECTOR, len, iov, n);
}

/* DISCARD / WRITE_ZEROES: exactly one 16-byte segment descriptor. */
static void do_discard_wz(struct vblk_dev *d, struct vblk_req *r, uint32_t type,
                          struct iovec *iov, unsigned n)
{
    struct virtio_blk_discard_write_zeroes seg;
    bool wz = type == VIRTIO_BLK_T_WRITE_ZEROES;
    uint32_t max = wz ? VBLK_MAX_WRITE_ZEROES_SECTORS : VBLK_MAX_DISCARD_SECTORS;

    if (!d->writable) {
        finish(r, VIRTIO_BLK_S_IOERR);
        return;
    }
    if (iov_total(iov, n) > sizeof(seg)) {
        finish(r, VIRTIO_BLK_S_UNSUPP);
        return;
    }
    if (iov_copy_out(iov, n, 0, &seg, sizeof(seg)) != sizeof(seg) ||
        seg.num_sectors > max || !range_ok(d, seg.sector, (uint64_t)seg.num_sectors * SECTOR)) {
        finish(r, VIRTIO_BLK_S_IOERR);
        return;
    }
    if (seg.flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP ||
        (!wz && (seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))) {
        finish(r, VIRTIO_BLK_S_UNSUPP);
        return;
    }
    if (seg.num_sectors == 0) {
        finish(r, VIRTIO_BLK_S_OK);
        return;
    }
    unsigned flags = 0;
    if (wz && (seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
        flags |= BREQ_MAY_UNMAP;
    if (wz && !d->write_cache)
        flags |= BREQ_FUA;
    submit(d, r, wz ? BREQ_WRITE_ZEROES : BREQ_DISCARD, flags,
           seg.sector * SECTOR, (uint64_t)seg.num_sectors * SECTOR, NULL, 0);
}

int vblk_handle(struct vblk_dev *d, struct vblk_req *r, struct iovec *iov,
                unsigned out_num, unsigned in_num)
{
    struct virtio_blk_outhdr hdr;
    struct iovec *out = iov, *in = iov + out_num;

    if (out_num < 1 || in_num < 1)
        return -EINVAL;
    if (iov_copy_out(out, out_num, 0, &hdr, sizeof(hdr)) != sizeof(hdr))
        return -EINVAL;
    iov_drop_front(&out, &out_num, sizeof(hdr));
    if (in[in_num - 1].iov_len < 1)
        return -EINVAL;

    r->dev = d;
    r->in_len = iov_total(in, in_num);
    r->status = (uint8_t *)in[in_num - 1].iov_base + in[in_num - 1].iov_len - 1;
    iov_drop_back(in, &in_num, 1);

    uint32_t type = hdr.type & ~VIRTIO_BLK_T_BARRIER;
    switch (type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT: {
        bool write = type == VIRTIO_BLK_T_OUT;
        do_rw(d, r, write, hdr.sector, write ? out : in, write ? out_num : in_num);
        break;
    }
    case VIRTIO_BLK_T_FLUSH:
        submit(d, r, BREQ_FLUSH, 0, 0, 0, NULL, 0);
        break;
    case VIRTIO_BLK_T_GET_ID: {
        size_t n = MIN_SZ(sizeof(VBLK_SERIAL), MIN_SZ(iov_total(in, in_num), VIRTIO_BLK_ID_BYTES));
        iov_copy_in(in, in_num, 0, VBLK_SERIAL, n);
        finish(r, VIRTIO_BLK_S_OK);
        break;
    }
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        do_discard_wz(d, r, type, out, out_num);
        break;
    default:
        finish(r, VIRTIO_BLK_S_UNSUPP);
        break;
    }
    return 0;
}
