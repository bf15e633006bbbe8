/*
 * vhost-user back-end protocol, one front-end connection (device-neutral).
 *
 * The connection reads messages from a UNIX socket with a resumable cursor
 * (a message may arrive in pieces; SCM_RIGHTS fds come with its first
 * bytes), checks each payload's size and fds, and applies it to the
 * device state: features, memory table, vrings.  It knows nothing of the
 * event loop: the owner calls vu_conn_readable() when the socket is
 * readable, and gets told through vu_dev_ops when a ring starts (watch its
 * kick fd) or stops (stop watching).
 *
 * A ring's pointers always point into a table it holds a reference to
 * (ring_mem), so completing a request or checking whether to notify never
 * touches unmapped memory, whatever tables came since.  A new table
 * re-points every attached ring into it; a ring the new table does not
 * map stops, and is only started again (by SET_VRING_ADDR or
 * SET_VRING_KICK) once it maps anew into the table then current.
 *
 * GET_VRING_BASE must not be answered while requests of that ring are
 * still in flight (the front-end may reuse the ring and the memory right
 * after): the connection then becomes "blocked", the owner stops reading,
 * and calls vu_conn_unblock() when the ring drained.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include "export/vhost-user-blk/virtq.h"
#include "export/vhost-user-blk/vhost-user-proto.h"

#define VU_MAX_QUEUES 1024           /* QEMU's VIRTIO_QUEUE_MAX */

struct vu_conn;

struct vu_vq {
    struct virtq q;
    struct vu_conn *conn;
    unsigned idx;
    unsigned num;                    /* SET_VRING_NUM */
    uint16_t base;                   /* SET_VRING_BASE */
    struct vhost_user_vring_addr addr;
    bool addr_set;
    bool started;                    /* attached and kick fd known */
    struct vq_mem *ring_mem;         /* the table q points into, while attached */
    bool enabled;
    unsigned gen;                    /* bumped when the ring is forgotten */
    int kick_fd, call_fd, err_fd;
    void *priv;                      /* the owner's per-queue state */
};

struct vu_dev_ops {
    uint64_t (*features)(void *opaque);
    /* Fill len bytes of config space from offset 0. */
    void (*get_config)(void *opaque, uint8_t *buf, uint32_t len);
    int  (*set_config)(void *opaque, const uint8_t *data, uint32_t offset,
                       uint32_t size, uint32_t flags);
    /* Ring idx is attached to guest memory and has a kick fd. */
    int  (*queue_start)(void *opaque, struct vu_vq *vq);
    /* Stop watching; in-flight requests of the ring continue. */
    void (*queue_stop)(void *opaque, struct vu_vq *vq);
};

struct vu_conn {
    int fd;
    const struct vu_dev_ops *ops;
    void *opaque;
    uint64_t acked_features;
    uint64_t acked_protocol;
    bool owner;
    struct vq_mem *mem;              /* current table (NULL until set) */
    unsigned num_queues;             /* advertised */
    unsigned nvqs;                   /* allocated: min(num_queues, VU_MAX_QUEUES) */
    struct vu_vq *vqs;
    int blocked_vq;                  /* GET_VRING_BASE waiting for a drain, or -1 */
    /* receive cursor */
    struct vhost_user_msg rx;
    size_t rx_len;
    int rx_fds[VHOST_USER_MAX_FDS];
    int rx_nfds;
    const char *last_error;          /* why the last message failed (tests, logs) */
    int backend_fd;                  /* SET_SLAVE_REQ_FD: the back-end channel, or -1 */
};

int  vu_conn_init(struct vu_conn *c, int fd, unsigned num_queues,
                  const struct vu_dev_ops *ops, void *opaque);
/* Stop every ring, close every fd received, drop the memory reference.
 * Does not close c->fd. */
void vu_conn_destroy(struct vu_conn *c);
/* Read and handle what is available.  0: keep going (check c->blocked_vq),
 * -errno: drop the connection (EOF = -ECONNRESET). */
int  vu_conn_readable(struct vu_conn *c);
/* The ring GET_VRING_BASE waited for drained: send the reply. */
int  vu_conn_unblock(struct vu_conn *c);
bool vu_conn_has(const struct vu_conn *c, unsigned feature);
/* Tell the front-end that the device config changed (capacity), on the
 * back-end channel, as QEMU 8.1's vhost-user-blk server does.  0, or
 * -ENOTCONN when the front-end gave no channel, or -errno. */
int  vu_conn_notify_config_change(struct vu_conn *c);
