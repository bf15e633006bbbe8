/*
 * Transport-neutral virtio-blk request handling: a request arrives as
 * iovecs (device-readable, then device-writable) that point into guest
 * memory; the handler parses the header, validates it as QEMU 7.2's
 * virtio-blk-handler does, turns it into one block-layer request whose
 * iovecs are the guest buffers themselves (no copies), and writes the
 * status byte when it completes.  vhost-user today; VDUSE/ublk could reuse
 * it unchanged.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include "block/block.h"
#include "export/vhost-user-blk/vhost-user-proto.h"

#define VBLK_MAX_DISCARD_SECTORS     32768
#define VBLK_MAX_WRITE_ZEROES_SECTORS 32768
#define VBLK_SEG_MAX                 (128 - 2)
#define VBLK_SERIAL                  "vhost_user_blk"

struct vblk_dev {
    struct bnode *bs;
    struct loop *loop;           /* where requests are submitted */
    uint32_t blk_size;           /* logical block size */
    uint16_t num_queues;
    bool writable;
    bool write_cache;            /* false: writes are made durable (FUA) */
    /* test hook: replaces bnode_submit when set */
    void (*submit)(struct vblk_dev *d, struct breq *req);
};

struct vblk_req {
    struct breq breq;
    struct vblk_dev *dev;
    volatile uint8_t *status;    /* the status byte, in guest memory */
    uint32_t in_len;             /* bytes the device wrote to the guest */
    uint8_t result;              /* the status written (VIRTIO_BLK_S_*) */
    bool alone;                  /* nothing else in flight or waiting in the rings */
    struct loop *loop;           /* completes in this loop (NULL: the device's) */
    /* Called once per request, possibly from inside vblk_handle(). */
    void (*complete)(struct vblk_req *r);
    void *opaque;
};

/* Feature bits the device offers (virtio-blk ones plus VERSION_1,
 * INDIRECT_DESC and EVENT_IDX), as QEMU's vhost-user-blk export. */
uint64_t vblk_features(const struct vblk_dev *d);
/* Fill the config space (capacity from the node's current size). */
void vblk_config(const struct vblk_dev *d, struct virtio_blk_config *cfg);
/*
 * Handle one request.  iov[0..out_num) are device-readable, the next
 * in_num device-writable; the array is modified in place and must stay
 * valid until r->complete runs.  Returns 0, or -EINVAL when the request
 * has no header or no room for a status byte: then nothing was written
 * and r->complete is not called (the transport completes it, length 0).
 */
int vblk_handle(struct vblk_dev *d, struct vblk_req *r, struct iovec *iov,
                unsigned out_num, unsigned in_num);
