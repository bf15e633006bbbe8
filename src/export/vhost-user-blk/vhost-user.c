/*
 * vhost-user back-end protocol (see vhost-user.h for the theory).
 *
 * Stages of one message: rx_some() fills the receive cursor (header, then
 * exactly hdr.size payload bytes, fds from SCM_RIGHTS); handle() checks
 * the version and looks the request up in a table giving its payload size
 * and fd count, so every handler sees a well-formed message; the handler
 * applies it; then a REPLY_ACK answer is sent if asked for, and every fd
 * the handler did not take is closed.
 *
 * Errors in a message's content are answered (REPLY_ACK) and the
 * connection goes on, as libvhost-user does; framing errors (bad version,
 * oversize payload, truncated fds), a failed reply, or a bad request that
 * needs a reply we cannot give, drop the connection.  Nothing here exits
 * or asserts on peer input.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include "export/vhost-user-blk/vhost-user.h"
#include "util/log.h"
#include "util/xalloc.h"

#define HDR_SIZE sizeof(struct vhost_user_hdr)
#define MSGS_PER_CALL 64
#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

enum { H_OK = 0, H_REPLIED = 1, H_BLOCKED = 2, H_FATAL = 3 };

static uint64_t protocol_features(void)
{
    return 1ull << VHOST_USER_PROTOCOL_F_MQ |
           1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK |
           1ull << VHOST_USER_PROTOCOL_F_SLAVE_REQ |
           1ull << VHOST_USER_PROTOCOL_F_CONFIG;
}

static uint64_t offered_features(struct vu_conn *c)
{
    return c->ops->features(c->opaque) | 1ull << VHOST_USER_F_PROTOCOL_FEATURES;
}

bool vu_conn_has(const struct vu_conn *c, unsigned feature)
{
    return c->acked_features & (1ull << feature);
}

/* ---- set-up / tear-down ------------------------------------------------------ */

int vu_conn_init(struct vu_conn *c, int fd, unsigned num_queues,
                 const struct vu_dev_ops *ops, void *opaque)
{
    memset(c, 0, sizeof(*c));
    c->fd = fd;
    c->ops = ops;
    c->opaque = opaque;
    c->num_queues = num_queues;
    c->nvqs = num_queues < VU_MAX_QUEUES ? num_queues : VU_MAX_QUEUES;
    c->blocked_vq = -1;
    c->backend_fd = -1;
    c->vqs = xcalloc(c->nvqs, sizeof(*c->vqs));
    for (unsigned i = 0; i < c->nvqs; i++) {
        struct vu_vq *vq = &c->vqs[i];
        vq->conn = c;
        vq->idx = i;
        vq->kick_fd = vq->call_fd = vq->err_fd = -1;
    }
    return 0;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void vq_stop(struct vu_conn *c, struct vu_vq *vq)
{
    if (vq->started && c->ops->queue_stop)
        c->ops->queue_stop(c->opaque, vq);
    vq->started = false;
}

static bool vq_attached(const struct vu_vq *vq)
{
    return vq->q.avail != NULL;
}

/* The ring's pointers now lie in m: hold m while they do. */
static void vq_set_ring_mem(struct vu_vq *vq, struct vq_mem *m)
{
    if (m)
        vq_mem_ref(m);
    vq_mem_unref(vq->ring_mem);
    vq->ring_mem = m;
}

/* Forget the ring entirely (after GET_VRING_BASE, reset, disconnect). */
static void vq_reset(struct vu_conn *c, struct vu_vq *vq)
{
    vq_stop(c, vq);
    virtq_detach(&vq->q);
    vq_set_ring_mem(vq, NULL);
    vq->q.inflight = 0;
    vq->gen++;                /* late completions must not touch the ring */
    vq->addr_set = false;
    vq->num = 0;
    vq->base = 0;
    close_fd(&vq->kick_fd);
}

static void rx_close_fds(struct vu_conn *c)
{
    for (int i = 0; i < c->rx_nfds; i++)
        close_fd(&c->rx_fds[i]);
    c->rx_nfds = 0;
}

void vu_conn_destroy(struct vu_conn *c)
{
    for (unsigned i = 0; c->vqs && i < c->nvqs; i++) {
        struct vu_vq *vq = &c->vqs[i];
        vq_reset(c, vq);
        close_fd(&vq->call_fd);
        close_fd(&vq->err_fd);
    }
    rx_close_fds(c);
    close_fd(&c->backend_fd);
    free(c->vqs);
    c->vqs = NULL;
    vq_mem_unref(c->mem);
    c->mem = NULL;
}

/* ---- replies ------------------------------------------------------------------- */

static int send_reply(struct vu_conn *c, uint32_t request, const void *payload, uint32_t size)
{
    struct vhost_user_msg m;
    ssize_t n;

    m.hdr.request = request;
    m.hdr.flags = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK;
    m.hdr.size = size;
    memcpy(&m.p, payload, size);
    do
        n = send(c->fd, &m, HDR_SIZE + size, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)(HDR_SIZE + size)) {
        c->last_error = "could not send reply";
        return -EPIPE;
    }
    return 0;
}

static int reply_u64(struct vu_conn *c, uint64_t v)
{
    return send_reply(c, c->rx.hdr.request, &v, sizeof(v)) < 0 ? H_FATAL : H_REPLIED;
}

/* ---- rings -------------------------------------------------------------------- */

/* The vring index of a message, or NULL (message error). */
static struct vu_vq *msg_vq(struct vu_conn *c, uint32_t idx)
{
    if (idx >= c->nvqs) {
        c->last_error = "vring index out of range";
        return NULL;
    }
    return &c->vqs[idx];
}

/* Translate the ring addresses into the current memory table. */
static int vq_map(struct vu_conn *c, struct vu_vq *vq, void **d, void **a, void **u)
{
    unsigned n = vq->num;
    *d = vq_mem_uva(c->mem, vq->addr.desc_user_addr, vring_desc_size(n));
    *a = vq_mem_uva(c->mem, vq->addr.avail_user_addr, vring_avail_size(n) + 2);
    *u = vq_mem_uva(c->mem, vq->addr.used_user_addr, vring_used_size(n) + 2);
    if (!*d || !*a || !*u) {
        c->last_error = "vring address outside guest memory";
        return -EFAULT;
    }
    if ((uintptr_t)*d % 16 || (uintptr_t)*a % 2 || (uintptr_t)*u % 4) {
        c->last_error = "misaligned vring";
        return -EINVAL;
    }
    return 0;
}

/* Start the ring if everything it needs is known.  A ring attached before
 * (stopped by a new table or kick fd) keeps its indices and in-flight
 * count; its pointers are always taken afresh from the current table. */
static int vq_try_start(struct vu_conn *c, struct vu_vq *vq)
{
    void *d, *a, *u;
    bool fresh = !vq_attached(vq);
    int r;

    if (vq->started || !c->mem || !vq->num || !vq->addr_set || vq->kick_fd < 0)
        return 0;
    r = vq_map(c, vq, &d, &a, &u);
    if (r < 0)
        return r;
    if (fresh) {
        virtq_attach(&vq->q, vq->num, d, a, u, vq->base,
                     vu_conn_has(c, VIRTIO_F_EVENT_IDX));
    } else {
        vq->q.desc = d;
        vq->q.avail = a;
        vq->q.used = u;
    }
    vq_set_ring_mem(vq, c->mem);
    vq->started = true;
    if (c->ops->queue_start && (r = c->ops->queue_start(c->opaque, vq)) < 0) {
        vq->started = false;
        if (fresh) {
            virtq_detach(&vq->q);
            vq_set_ring_mem(vq, NULL);
        }
        c->last_error = "cannot start vring";
        return r;
    }
    return 0;
}

/* An attached ring after a new memory table or ring address: point it
 * into the current table.  If the table does not map it, the ring stops
 * and keeps its old pointers (and the reference that keeps them mapped)
 * for the completions of requests still in flight. */
static int vq_remap(struct vu_conn *c, struct vu_vq *vq)
{
    void *d, *a, *u;
    int r;

    if (!vq_attached(vq))
        return 0;
    r = vq_map(c, vq, &d, &a, &u);
    if (r < 0) {
        if (vq->started)
            log_warn("vhost-user: vring %u not in the new memory table; stopped", vq->idx);
        vq_stop(c, vq);
        return r;
    }
    vq->q.desc = d;
    vq->q.avail = a;
    vq->q.used = u;
    vq_set_ring_mem(vq, c->mem);
    return 0;
}

/* ---- handlers ------------------------------------------------------------------ */

static int h_get_features(struct vu_conn *c)
{
    return reply_u64(c, offered_features(c));
}

static int h_set_features(struct vu_conn *c)
{
    uint64_t f = c->rx.p.u64;

    if (f & ~offered_features(c)) {
        c->last_error = "unsupported features acked";
        return -EINVAL;
    }
    c->acked_features = f;
    if (!(f & (1ull << VHOST_USER_F_PROTOCOL_FEATURES)))
        for (unsigned i = 0; i < c->nvqs; i++)
            c->vqs[i].enabled = true;
    for (unsigned i = 0; i < c->nvqs; i++)
        c->vqs[i].q.event_idx = vu_conn_has(c, VIRTIO_F_EVENT_IDX);
    return H_OK;
}

static int h_set_owner(struct vu_conn *c)
{
    c->owner = true;
    return H_OK;
}

static int h_reset_owner(struct vu_conn *c)
{
    for (unsigned i = 0; i < c->nvqs; i++)
        vq_reset(c, &c->vqs[i]);
    c->acked_features = 0;
    c->owner = false;
    return H_OK;
}

static int map_region(struct vq_mem_region *r, const struct vhost_user_mem_region *w, int fd)
{
    uint64_t total;

    struct stat st;

    if (w->memory_size == 0 || __builtin_add_overflow(w->memory_size, w->mmap_offset, &total) ||
        total > SIZE_MAX || w->guest_phys_addr + w->memory_size < w->guest_phys_addr ||
        w->userspace_addr + w->memory_size < w->userspace_addr)
        return -EINVAL;
    /* A region past the end of its file would raise SIGBUS on first touch. */
    if (fstat(fd, &st) < 0)
        return -errno;
    if (S_ISREG(st.st_mode) && total > (uint64_t)st.st_size)
        return -ENXIO;
    void *p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    r->gpa = w->guest_phys_addr;
    r->size = w->memory_size;
    r->uva = w->userspace_addr;
    r->map_base = p;
    r->map_size = total;
    r->host = (uint8_t *)p + w->mmap_offset;
    return 0;
}

static int h_set_mem_table(struct vu_conn *c)
{
    const struct vhost_user_mem_table *t = &c->rx.p.mem;
    struct vq_mem *m;
    int r;

    if (t->nregions < 1 || t->nregions > VHOST_USER_MAX_REGIONS ||
        c->rx.hdr.size != 8 + t->nregions * sizeof(struct vhost_user_mem_region) ||
        c->rx_nfds != (int)t->nregions) {
        c->last_error = "bad memory table (region count, size or fds)";
        return -EINVAL;
    }
    m = vq_mem_new();
    if (!m)
        return -ENOMEM;
    for (unsigned i = 0; i < t->nregions; i++) {
        r = map_region(&m->r[i], &t->regions[i], c->rx_fds[i]);
        if (r < 0) {
            c->last_error = r == -ENXIO ? "memory region larger than its file"
                                        : "cannot map memory region";
            vq_mem_unref(m);
            return r;
        }
        m->nregions = i + 1;
    }
    rx_close_fds(c);          /* the mappings keep the memory */
    vq_mem_guard(m);
    vq_mem_unref(c->mem);     /* in-flight requests and rings keep their own */
    c->mem = m;
    for (unsigned i = 0; i < c->nvqs; i++)
        vq_remap(c, &c->vqs[i]);
    return H_OK;
}

static int h_set_vring_num(struct vu_conn *c)
{
    struct vu_vq *vq = msg_vq(c, c->rx.p.state.index);
    uint32_t n = c->rx.p.state.num;

    if (!vq)
        return -EINVAL;
    if (n == 0 || n > VIRTQ_MAX_SIZE || (n & (n - 1)) || vq_attached(vq)) {
        c->last_error = "bad vring size";
        return -EINVAL;
    }
    vq->num = n;
    return H_OK;
}

static int h_set_vring_addr(struct vu_conn *c)
{
    struct vu_vq *vq = msg_vq(c, c->rx.p.addr.index);

    if (!vq)
        return -EINVAL;
    vq->addr = c->rx.p.addr;
    vq->addr_set = true;
    if (vq_remap(c, vq) < 0)
        return -EFAULT;
    return vq_try_start(c, vq);
}

static int h_set_vring_base(struct vu_conn *c)
{
    struct vu_vq *vq = msg_vq(c, c->rx.p.state.index);

    if (!vq)
        return -EINVAL;
    if (c->rx.p.state.num > 0xffff || vq_attached(vq)) {
        c->last_error = "bad vring base";
        return -EINVAL;
    }
    vq->base = c->rx.p.state.num;
    return H_OK;
}

static int send_vring_base(struct vu_conn *c, struct vu_vq *vq)
{
    struct vhost_user_vring_state s = { .index = vq->idx };

    s.num = vq->q.avail ? vq->q.last_avail_idx : vq->base;
    vq_reset(c, vq);
    return send_reply(c, VHOST_USER_GET_VRING_BASE, &s, sizeof(s));
}

static int h_get_vring_base(struct vu_conn *c)
{
    struct vu_vq *vq = msg_vq(c, c->rx.p.state.index);

    if (!vq)
        return H_FATAL;       /* needs a reply we cannot give */
    vq_stop(c, vq);
    close_fd(&vq->kick_fd);
    if (vq->q.avail && vq->q.inflight > 0) {
        c->blocked_vq = vq->idx;
        return H_BLOCKED;
    }
    return send_vring_base(c, vq) < 0 ? H_FATAL : H_REPLIED;
}

int vu_conn_unblock(struct vu_conn *c)
{
    if (c->blocked_vq < 0)
        return 0;
    struct vu_vq *vq = &c->vqs[c->blocked_vq];
    c->blocked_vq = -1;
    return send_vring_base(c, vq);
}

/* Kick, call and err: u64 = index | NOFD flag, one fd unless NOFD. */
static struct vu_vq *vring_fd_msg(struct vu_conn *c, int *fd)
{
    uint64_t v = c->rx.p.u64;
    struct vu_vq *vq = msg_vq(c, v & VHOST_USER_VRING_IDX_MASK);
    bool nofd = v & VHOST_USER_VRING_NOFD;

    *fd = -1;
    if (!vq)
        return NULL;
    if (c->rx_nfds != (nofd ? 0 : 1)) {
        c->last_error = "vring fd message with a wrong number of fds";
        return NULL;
    }
    if (!nofd) {
        *fd = c->rx_fds[0];
        c->rx_fds[0] = -1;
        c->rx_nfds = 0;
    }
    return vq;
}

static int h_set_vring_kick(struct vu_conn *c)
{
    int fd;
    struct vu_vq *vq = vring_fd_msg(c, &fd);

    if (!vq)
        return -EINVAL;
    if (fd < 0) {
        c->last_error = "polling mode (no kick fd) is not supported";
        return -ENOTSUP;
    }
    vq_stop(c, vq);
    close_fd(&vq->kick_fd);
    vq->kick_fd = fd;
    return vq_try_start(c, vq);   /* an attached ring is re-mapped, never reused as is */
}

static int h_set_vring_call(struct vu_conn *c)
{
    int fd;
    struct vu_vq *vq = vring_fd_msg(c, &fd);

    if (!vq)
        return -EINVAL;
    close_fd(&vq->call_fd);
    vq->call_fd = fd;
    return H_OK;
}

static int h_set_vring_err(struct vu_conn *c)
{
    int fd;
    struct vu_vq *vq = vring_fd_msg(c, &fd);

    if (!vq)
        return -EINVAL;
    close_fd(&vq->err_fd);
    vq->err_fd = fd;
    return H_OK;
}

static int h_get_protocol_features(struct vu_conn *c)
{
    return reply_u64(c, protocol_features());
}

static int h_set_protocol_features(struct vu_conn *c)
{
    if (c->rx.p.u64 & ~protocol_features()) {
        c->last_error = "unsupported protocol features acked";
        return -EINVAL;
    }
    c->acked_protocol = c->rx.p.u64;
    return H_OK;
}

/* The back-end channel: one socket fd, no payload. */
static int h_set_slave_req_fd(struct vu_conn *c)
{
    if (c->rx_nfds != 1) {
        c->last_error = "back-end channel message without exactly one fd";
        return -EINVAL;
    }
    close_fd(&c->backend_fd);
    c->backend_fd = c->rx_fds[0];
    c->rx_fds[0] = -1;
    c->rx_nfds = 0;
    return H_OK;
}

int vu_conn_notify_config_change(struct vu_conn *c)
{
    struct vhost_user_hdr h = { .request = VHOST_USER_SLAVE_CONFIG_CHANGE_MSG,
                                .flags = VHOST_USER_VERSION, .size = 0 };
    ssize_t n;

    if (c->backend_fd < 0 || !(c->acked_protocol & (1ull << VHOST_USER_PROTOCOL_F_SLAVE_REQ)))
        return -ENOTCONN;
    /* No reply asked for: the front-end reads the config when it likes. */
    do
        n = send(c->backend_fd, &h, sizeof(h), MSG_NOSIGNAL | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    return n == (ssize_t)sizeof(h) ? 0 : -EIO;
}

static int h_get_queue_num(struct vu_conn *c)
{
    return reply_u64(c, c->num_queues);
}

static int h_set_vring_enable(struct vu_conn *c)
{
    struct vu_vq *vq = msg_vq(c, c->rx.p.state.index);

    if (!vq)
        return -EINVAL;
    vq->enabled = c->rx.p.state.num != 0;
    return H_OK;
}

static bool config_msg_ok(struct vu_conn *c)
{
    const struct vhost_user_config *cfg = &c->rx.p.config;

    if (c->rx.hdr.size < VHOST_USER_CONFIG_HDR_SIZE || cfg->size > VHOST_USER_MAX_CONFIG ||
        c->rx.hdr.size != VHOST_USER_CONFIG_HDR_SIZE + cfg->size ||
        cfg->offset > VHOST_USER_MAX_CONFIG || cfg->size > VHOST_USER_MAX_CONFIG - cfg->offset) {
        c->last_error = "bad config message size";
        return false;
    }
    return true;
}

static int h_get_config(struct vu_conn *c)
{
    struct vhost_user_config *cfg = &c->rx.p.config;
    uint8_t space[VHOST_USER_MAX_CONFIG] = { 0 };
    uint32_t size = 0;

    if (config_msg_ok(c)) {
        c->ops->get_config(c->opaque, space, sizeof(space));
        memcpy(cfg->region, space + cfg->offset, cfg->size);
        size = VHOST_USER_CONFIG_HDR_SIZE + cfg->size;
    }
    /* size 0 tells the front-end the request failed */
    return send_reply(c, VHOST_USER_GET_CONFIG, cfg, size) < 0 ? H_FATAL : H_REPLIED;
}

static int h_set_config(struct vu_conn *c)
{
    const struct vhost_user_config *cfg = &c->rx.p.config;

    if (!config_msg_ok(c))
        return -EINVAL;
    if (!c->ops->set_config ||
        c->ops->set_config(c->opaque, cfg->region, cfg->offset, cfg->size, cfg->flags) < 0) {
        c->last_error = "config write refused";
        return -EINVAL;
    }
    return H_OK;
}

/* ---- dispatch --------------------------------------------------------------------- */

struct handler {
    int (*fn)(struct vu_conn *c);
    uint32_t size;      /* exact payload size, or minimum if var */
    bool var;
    bool takes_fds;     /* fds allowed (checked by the handler) */
    bool has_reply;     /* sends its own reply: a failure we cannot answer is fatal */
};

static const struct handler handlers[] = {
    [VHOST_USER_GET_FEATURES] = { h_get_features, 0, true, false, true },
    [VHOST_USER_SET_FEATURES] = { h_set_features, 8 },
    [VHOST_USER_SET_OWNER] = { h_set_owner, 0, true },
    [VHOST_USER_RESET_OWNER] = { h_reset_owner, 0, true },
    [VHOST_USER_SET_MEM_TABLE] = { h_set_mem_table, 8, true, true },
    [VHOST_USER_SET_VRING_NUM] = { h_set_vring_num, 8 },
    [VHOST_USER_SET_VRING_ADDR] = { h_set_vring_addr, sizeof(struct vhost_user_vring_addr) },
    [VHOST_USER_SET_VRING_BASE] = { h_set_vring_base, 8 },
    [VHOST_USER_GET_VRING_BASE] = { h_get_vring_base, 8, false, false, true },
    [VHOST_USER_SET_VRING_KICK] = { h_set_vring_kick, 8, false, true },
    [VHOST_USER_SET_VRING_CALL] = { h_set_vring_call, 8, false, true },
    [VHOST_USER_SET_VRING_ERR] = { h_set_vring_err, 8, false, true },
    [VHOST_USER_GET_PROTOCOL_FEATURES] = { h_get_protocol_features, 0, true, false, true },
    [VHOST_USER_SET_PROTOCOL_FEATURES] = { h_set_protocol_features, 8 },
    [VHOST_USER_GET_QUEUE_NUM] = { h_get_queue_num, 0, true, false, true },
    [VHOST_USER_SET_VRING_ENABLE] = { h_set_vring_enable, 8 },
    [VHOST_USER_GET_CONFIG] = { h_get_config, VHOST_USER_CONFIG_HDR_SIZE, true, false, true },
    [VHOST_USER_SET_CONFIG] = { h_set_config, VHOST_USER_CONFIG_HDR_SIZE, true },
    [VHOST_USER_RESET_DEVICE] = { h_reset_owner, 0, true },
    [VHOST_USER_SET_SLAVE_REQ_FD] = { h_set_slave_req_fd, 0, false, true },
};

static int handle(struct vu_conn *c)
{
    uint32_t req = c->rx.hdr.request;
    const struct handler *h = req < ARRAY_LEN(handlers) ? &handlers[req] : NULL;
    int r;

    c->last_error = NULL;
    if (!h || !h->fn) {
        c->last_error = "unknown request";
        log_warn("vhost-user: unknown request %u", req);
        r = -ENOSYS;
    } else if (h->var ? c->rx.hdr.size < h->size : c->rx.hdr.size != h->size) {
        c->last_error = "wrong payload size";
        r = h->has_reply ? H_FATAL : -EINVAL;
    } else if (!h->takes_fds && c->rx_nfds > 0) {
        c->last_error = "unexpected fds";
        r = h->has_reply ? H_FATAL : -EINVAL;
    } else {
        r = h->fn(c);
    }
    if (r == H_FATAL)
        return -EPROTO;
    if (r < 0 && c->last_error)
        log_warn("vhost-user: request %u failed: %s", req, c->last_error);
    if (r != H_REPLIED && r != H_BLOCKED && (c->rx.hdr.flags & VHOST_USER_NEED_REPLY) &&
        (c->acked_protocol & (1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK))) {
        uint64_t status = r < 0 ? 1 : 0;
        if (send_reply(c, req, &status, sizeof(status)) < 0)
            return -EPIPE;
    }
    return 0;
}

/* ---- receive cursor ---------------------------------------------------------------- */

static void rx_reset(struct vu_conn *c)
{
    rx_close_fds(c);
    c->rx_len = 0;
}

static int rx_take_fds(struct vu_conn *c, struct msghdr *mh)
{
    int bad = 0;

    if (mh->msg_flags & MSG_CTRUNC)
        bad = -EPROTO;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(mh); cm; cm = CMSG_NXTHDR(mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        int n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *fds = (int *)CMSG_DATA(cm);
        for (int i = 0; i < n; i++) {
            if (c->rx_nfds < VHOST_USER_MAX_FDS) {
                c->rx_fds[c->rx_nfds++] = fds[i];
            } else {
                close(fds[i]);
                bad = -EPROTO;
            }
        }
    }
    if (bad)
        c->last_error = "too many fds";
    return bad;
}

/* 1: a whole message is in c->rx, 0: need more bytes, -errno: drop. */
static int rx_some(struct vu_conn *c)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * VHOST_USER_MAX_FDS)];
        struct cmsghdr align;
    } ctl;

    for (;;) {
        size_t want;
        if (c->rx_len < HDR_SIZE) {
            want = HDR_SIZE - c->rx_len;
        } else {
            if (c->rx.hdr.size > sizeof(c->rx.p)) {
                c->last_error = "payload too large";
                return -EMSGSIZE;
            }
            if ((c->rx.hdr.flags & VHOST_USER_VERSION_MASK) != VHOST_USER_VERSION) {
                c->last_error = "bad protocol version";
                return -EPROTO;
            }
            want = HDR_SIZE + c->rx.hdr.size - c->rx_len;
            if (want == 0)
                return 1;
        }
        struct iovec iov = { (char *)&c->rx + c->rx_len, want };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
                             .msg_control = ctl.buf, .msg_controllen = sizeof(ctl.buf) };
        ssize_t n = recvmsg(c->fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -errno;
        }
        if (n == 0)
            return -ECONNRESET;
        int r = rx_take_fds(c, &mh);
        if (r < 0)
            return r;
        c->rx_len += n;
    }
}

int vu_conn_readable(struct vu_conn *c)
{
    for (int i = 0; i < MSGS_PER_CALL && c->blocked_vq < 0; i++) {
        int r = rx_some(c);
        if (r <= 0)
            return r;
        r = handle(c);
        rx_reset(c);
        if (r < 0)
            return r;
    }
    return 0;
}
