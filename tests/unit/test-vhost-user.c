/*
 * Unit tests of the vhost-user back-end protocol (vhost-user.c) through a
 * socketpair: negotiation, memory table with a real memfd, vring set-up
 * and GET_VRING_BASE (including waiting for in-flight requests), config
 * space, and malformed messages: unknown requests, wrong sizes, missing
 * or extra fds, oversize payloads, bad versions, messages split across
 * reads.  None of them may crash; each gets an error answer or a drop.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <cmocka.h>
#include "export/vhost-user-blk/vhost-user.h"

/* util/log stubs: the protocol logs peer errors */
bool log_debug_enabled;
void log_msg(const char *level, const char *fmt, ...) { (void)level; (void)fmt; }

#define MEMSZ (1u << 20)

struct fx {
    int sv[2];                  /* [0] front-end, [1] back-end */
    struct vu_conn c;
    int started, stopped;
    int memfd;
    uint8_t *mem;
    uint8_t cfg_wce;
};

static uint64_t dev_features(void *o) { (void)o; return 1ull << VIRTIO_F_VERSION_1 | 1ull << VIRTIO_F_EVENT_IDX; }
static void dev_get_config(void *o, uint8_t *buf, uint32_t len)
{
    struct fx *f = o;
    for (uint32_t i = 0; i < len; i++)
        buf[i] = i;
    buf[32] = f->cfg_wce;
}
static int dev_set_config(void *o, const uint8_t *d, uint32_t off, uint32_t size, uint32_t flags)
{
    struct fx *f = o;
    if (off != 32 || size != 1 || flags)
        return -EINVAL;
    f->cfg_wce = d[0];
    return 0;
}
/* As the device does on start: look at the ring at once. */
static int dev_queue_start(void *o, struct vu_vq *vq)
{
    struct fx *f = o;
    f->started++;
    (void)virtq_avail(&vq->q);
    return 0;
}
static void dev_queue_stop(void *o, struct vu_vq *vq) { struct fx *f = o; (void)vq; f->stopped++; }

static const struct vu_dev_ops ops = {
    dev_features, dev_get_config, dev_set_config, dev_queue_start, dev_queue_stop,
};

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, f->sv), 0);
    assert_int_equal(vu_conn_init(&f->c, f->sv[1], 4, &ops, f), 0);
    f->memfd = memfd_create("t", 0);
    assert_int_equal(ftruncate(f->memfd, MEMSZ), 0);
    f->mem = mmap(NULL, MEMSZ, PROT_READ | PROT_WRITE, MAP_SHARED, f->memfd, 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    vu_conn_destroy(&f->c);
    close(f->sv[0]);
    close(f->sv[1]);
    munmap(f->mem, MEMSZ);
    close(f->memfd);
    free(f);
    return 0;
}

static void send_raw(struct fx *f, const void *buf, size_t len, const int *fds, int nfds)
{
    char ctl[CMSG_SPACE(sizeof(int) * 16)];
    struct iovec iov = { (void *)buf, len };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (nfds) {
        memset(ctl, 0, sizeof(ctl));
        mh.msg_control = ctl;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
    }
    assert_int_equal(sendmsg(f->sv[0], &mh, 0), (ssize_t)len);
}

/* Send one message; run the back-end; return what it returned. */
static int msg(struct fx *f, uint32_t req, uint32_t flags, const void *p, uint32_t size,
               const int *fds, int nfds)
{
    struct vhost_user_msg m = { .hdr = { req, VHOST_USER_VERSION | flags, size } };
    if (size)
        memcpy(&m.p, p, size);
    send_raw(f, &m, sizeof(m.hdr) + size, fds, nfds);
    return vu_conn_readable(&f->c);
}

/* Read one reply (must be there); returns payload size. */
static int reply(struct fx *f, struct vhost_user_msg *m)
{
    ssize_t n = recv(f->sv[0], m, sizeof(*m), MSG_DONTWAIT);
    if (n < 0)
        return -1;
    assert_true(n >= (ssize_t)sizeof(m->hdr));
    assert_true(m->hdr.flags & VHOST_USER_REPLY_MASK);
    assert_int_equal(n, (ssize_t)(sizeof(m->hdr) + m->hdr.size));
    return m->hdr.size;
}

static bool no_reply(struct fx *f)
{
    char c;
    return recv(f->sv[0], &c, 1, MSG_DONTWAIT) < 0 && errno == EAGAIN;
}

static void negotiate(struct fx *f)
{
    uint64_t v = 1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK | 1ull << VHOST_USER_PROTOCOL_F_MQ |
                 1ull << VHOST_USER_PROTOCOL_F_CONFIG;
    assert_int_equal(msg(f, VHOST_USER_SET_PROTOCOL_FEATURES, 0, &v, 8, NULL, 0), 0);
    v = 1ull << VIRTIO_F_VERSION_1 | 1ull << VIRTIO_F_EVENT_IDX | 1ull << VHOST_USER_F_PROTOCOL_FEATURES;
    assert_int_equal(msg(f, VHOST_USER_SET_FEATURES, 0, &v, 8, NULL, 0), 0);
}

static uint64_t ack(struct fx *f)
{
    struct vhost_user_msg m;
    assert_int_equal(reply(f, &m), 8);
    return m.p.u64;
}

static void test_features(void **state)
{
    struct fx *f = *state;
    struct vhost_user_msg m;
    assert_int_equal(msg(f, VHOST_USER_GET_FEATURES, 0, NULL, 0, NULL, 0), 0);
    assert_int_equal(reply(f, &m), 8);
    assert_true(m.p.u64 & (1ull << VHOST_USER_F_PROTOCOL_FEATURES));
    assert_true(m.p.u64 & (1ull << VIRTIO_F_VERSION_1));
    assert_int_equal(msg(f, VHOST_USER_GET_PROTOCOL_FEATURES, 0, NULL, 0, NULL, 0), 0);
    assert_int_equal(reply(f, &m), 8);
    assert_int_equal(m.p.u64, 1ull << VHOST_USER_PROTOCOL_F_MQ |
                     1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK | 1ull << VHOST_USER_PROTOCOL_F_CONFIG |
                     1ull << VHOST_USER_PROTOCOL_F_SLAVE_REQ);
    assert_int_equal(msg(f, VHOST_USER_GET_QUEUE_NUM, 0, NULL, 0, NULL, 0), 0);
    assert_int_equal(reply(f, &m), 8);
    assert_int_equal(m.p.u64, 4);
    negotiate(f);
    /* acking a feature never offered fails, and says so */
    uint64_t v = 1ull << 40;
    assert_int_equal(msg(f, VHOST_USER_SET_FEATURES, VHOST_USER_NEED_REPLY, &v, 8, NULL, 0), 0);
    assert_int_equal(ack(f), 1);
    assert_int_equal(msg(f, VHOST_USER_SET_OWNER, VHOST_USER_NEED_REPLY, NULL, 0, NULL, 0), 0);
    assert_int_equal(ack(f), 0);
}

static void set_mem(struct fx *f)
{
    struct vhost_user_mem_table t = { .nregions = 1 };
    t.regions[0] = (struct vhost_user_mem_region){ 0x1000000, MEMSZ, (uintptr_t)f->mem, 0 };
    assert_int_equal(msg(f, VHOST_USER_SET_MEM_TABLE, VHOST_USER_NEED_REPLY, &t, 40, &f->memfd, 1), 0);
    assert_int_equal(ack(f), 0);
}

static void setup_ring(struct fx *f, unsigned idx, int *kick)
{
    struct vhost_user_vring_state s = { idx, 16 };
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_NUM, VHOST_USER_NEED_REPLY, &s, 8, NULL, 0), 0);
    assert_int_equal(ack(f), 0);
    s.num = 7;
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_BASE, VHOST_USER_NEED_REPLY, &s, 8, NULL, 0), 0);
    assert_int_equal(ack(f), 0);
    uintptr_t b = (uintptr_t)f->mem + idx * 8192;
    struct vhost_user_vring_addr a = { idx, 0, b, b + 4096, b + 2048, 0 };
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_ADDR, VHOST_USER_NEED_REPLY, &a, sizeof(a), NULL, 0), 0);
    assert_int_equal(ack(f), 0);
    *kick = eventfd(0, 0);
    uint64_t v = idx;
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_KICK, VHOST_USER_NEED_REPLY, &v, 8, kick, 1), 0);
    assert_int_equal(ack(f), 0);
}

static void test_rings(void **state)
{
    struct fx *f = *state;
    struct vhost_user_msg m;
    int kick;
    negotiate(f);
    set_mem(f);
    setup_ring(f, 1, &kick);
    assert_int_equal(f->started, 1);
    struct vu_vq *vq = &f->c.vqs[1];
    assert_true(vq->started);
    assert_ptr_equal(vq->q.desc, f->c.mem->r[0].host + 8192);   /* our own mapping */
    assert_int_equal(vq->q.last_avail_idx, 7);
    assert_true(vq->q.event_idx);
    /* a request in flight: GET_VRING_BASE waits for it */
    vq->q.inflight = 1;
    struct vhost_user_vring_state s = { 1, 0 };
    assert_int_equal(msg(f, VHOST_USER_GET_VRING_BASE, 0, &s, 8, NULL, 0), 0);
    assert_int_equal(f->c.blocked_vq, 1);
    assert_int_equal(f->stopped, 1);
    assert_true(no_reply(f));
    vq->q.inflight = 0;
    assert_int_equal(vu_conn_unblock(&f->c), 0);
    assert_int_equal(reply(f, &m), 8);
    assert_int_equal(m.p.state.index, 1);
    assert_int_equal(m.p.state.num, 7);
    assert_false(vq->started);
    close(kick);
}

static void test_remap_on_new_table(void **state)
{
    struct fx *f = *state;
    int kick;
    negotiate(f);
    set_mem(f);
    setup_ring(f, 0, &kick);
    struct vq_mem *old = f->c.mem;
    vq_mem_ref(old);                 /* an in-flight request's reference */
    set_mem(f);                      /* same memory, new mapping */
    assert_ptr_not_equal(f->c.mem, old);
    assert_true(f->c.vqs[0].started);
    assert_ptr_not_equal(f->c.vqs[0].q.desc, (void *)old->r[0].host);
    assert_int_equal(old->refcnt, 1);  /* still mapped for the request */
    vq_mem_unref(old);
    close(kick);
}

/* A second memfd for tables that do not map the rings. */
static int other_memfd(size_t size, uint8_t **map)
{
    int fd = memfd_create("t2", 0);
    assert_int_equal(ftruncate(fd, size), 0);
    *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return fd;
}

/* Regression (issue 13, 1): a table that no longer maps a started ring
 * stops it; the ring's old pointers stay mapped for completions and the
 * notify check; a new kick fd must not restart it against memory that is
 * gone, and it starts again (same indices) once mapped anew. */
static void test_remap_ring_not_in_new_table(void **state)
{
    struct fx *f = *state;
    int kick, kick2 = eventfd(0, 0);
    uint8_t *map2;
    int fd2 = other_memfd(65536, &map2);
    negotiate(f);
    set_mem(f);
    setup_ring(f, 0, &kick);
    struct vu_vq *vq = &f->c.vqs[0];
    vq->q.inflight = 1;                            /* a request in flight across the remap */
    struct vhost_user_mem_table t = { .nregions = 1 };
    t.regions[0] = (struct vhost_user_mem_region){ 0x9000000, 65536, (uintptr_t)map2, 0 };
    assert_int_equal(msg(f, VHOST_USER_SET_MEM_TABLE, VHOST_USER_NEED_REPLY, &t, 40, &fd2, 1), 0);
    assert_int_equal(ack(f), 0);
    assert_false(vq->started);
    assert_int_equal(f->stopped, 1);
    /* what a completion does after the remap: memory it reads is mapped */
    virtq_push(&vq->q, 3, 0);
    (void)virtq_should_notify(&vq->q);
    /* a new kick fd: the ring is not in the current table, it stays stopped */
    uint64_t v = 0;
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_KICK, VHOST_USER_NEED_REPLY, &v, 8, &kick2, 1), 0);
    assert_int_equal(ack(f), 1);
    assert_false(vq->started);
    assert_int_equal(f->started, 1);
    /* mapped anew: started again where it was */
    set_mem(f);
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_KICK, VHOST_USER_NEED_REPLY, &v, 8, &kick2, 1), 0);
    assert_int_equal(ack(f), 0);
    assert_true(vq->started);
    assert_int_equal(vq->q.last_avail_idx, 7);
    assert_ptr_equal(vq->ring_mem, f->c.mem);
    assert_ptr_equal(vq->q.desc, f->c.mem->r[0].host);
    munmap(map2, 65536);
    close(fd2);
    close(kick);
    close(kick2);
}

/* Regression (issue 13, 2): a region larger than the file behind its fd
 * is refused; a file truncated after mapping reads as zeros (no SIGBUS)
 * and the table says it faulted. */
static void test_region_past_file_end(void **state)
{
    struct fx *f = *state;
    int kick;
    uint8_t *map2;
    int fd2 = other_memfd(65536, &map2);
    negotiate(f);
    struct vhost_user_mem_table t = { .nregions = 1 };
    t.regions[0] = (struct vhost_user_mem_region){ 0x9000000, 1u << 20, (uintptr_t)map2, 0 };
    assert_int_equal(msg(f, VHOST_USER_SET_MEM_TABLE, VHOST_USER_NEED_REPLY, &t, 40, &fd2, 1), 0);
    assert_int_equal(ack(f), 1);
    assert_null(f->c.mem);
    t.regions[0].memory_size = 32768;          /* the offset pushes it past the end */
    t.regions[0].mmap_offset = 65536;
    assert_int_equal(msg(f, VHOST_USER_SET_MEM_TABLE, VHOST_USER_NEED_REPLY, &t, 40, &fd2, 1), 0);
    assert_int_equal(ack(f), 1);
    assert_null(f->c.mem);
    set_mem(f);
    setup_ring(f, 0, &kick);
    assert_false(vq_mem_faulted(f->c.mem));
    munmap(f->mem, MEMSZ);                     /* the test's own view would fault too */
    assert_int_equal(ftruncate(f->memfd, 0), 0);
    (void)virtq_avail(&f->c.vqs[0].q);           /* reads zeros, no SIGBUS */
    assert_true(vq_mem_faulted(f->c.mem));
    assert_int_equal(ftruncate(f->memfd, MEMSZ), 0);
    f->mem = mmap(NULL, MEMSZ, PROT_READ | PROT_WRITE, MAP_SHARED, f->memfd, 0);
    munmap(map2, 65536);
    close(fd2);
    close(kick);
}

static void test_config(void **state)
{
    struct fx *f = *state;
    struct vhost_user_msg m;
    struct vhost_user_config c = { .offset = 0, .size = 60 };
    negotiate(f);
    assert_int_equal(msg(f, VHOST_USER_GET_CONFIG, 0, &c, 12 + 60, NULL, 0), 0);
    assert_int_equal(reply(f, &m), 72);
    assert_int_equal(m.p.config.region[5], 5);
    c.offset = 32;
    c.size = 1;
    c.region[0] = 1;
    assert_int_equal(msg(f, VHOST_USER_SET_CONFIG, VHOST_USER_NEED_REPLY, &c, 13, NULL, 0), 0);
    assert_int_equal(ack(f), 0);
    assert_int_equal(f->cfg_wce, 1);
    c.offset = 0;                    /* only wce is writable */
    assert_int_equal(msg(f, VHOST_USER_SET_CONFIG, VHOST_USER_NEED_REPLY, &c, 13, NULL, 0), 0);
    assert_int_equal(ack(f), 1);
    /* size field disagreeing with the message size: an empty (failed) reply */
    c.size = 200;
    assert_int_equal(msg(f, VHOST_USER_GET_CONFIG, 0, &c, 12 + 60, NULL, 0), 0);
    assert_int_equal(reply(f, &m), 0);
    c.size = 1000;
    assert_int_equal(msg(f, VHOST_USER_GET_CONFIG, 0, &c, 12, NULL, 0), 0);
    assert_int_equal(reply(f, &m), 0);
}

/* The back-end channel: a config change is announced there, once the
 * front-end acked the feature and gave the socket. */
static void test_backend_channel(void **state)
{
    struct fx *f = *state;
    int ch[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, ch), 0);
    negotiate(f);
    assert_int_equal(vu_conn_notify_config_change(&f->c), -ENOTCONN);
    uint64_t v = 1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK | 1ull << VHOST_USER_PROTOCOL_F_SLAVE_REQ;
    assert_int_equal(msg(f, VHOST_USER_SET_PROTOCOL_FEATURES, 0, &v, 8, NULL, 0), 0);
    /* no fd, or two: refused */
    assert_int_equal(msg(f, VHOST_USER_SET_SLAVE_REQ_FD, VHOST_USER_NEED_REPLY, NULL, 0, NULL, 0), 0);
    assert_int_equal(ack(f), 1);
    int two[2] = { ch[1], ch[1] };
    assert_int_equal(msg(f, VHOST_USER_SET_SLAVE_REQ_FD, VHOST_USER_NEED_REPLY, NULL, 0, two, 2), 0);
    assert_int_equal(ack(f), 1);
    assert_int_equal(vu_conn_notify_config_change(&f->c), -ENOTCONN);
    assert_int_equal(msg(f, VHOST_USER_SET_SLAVE_REQ_FD, VHOST_USER_NEED_REPLY, NULL, 0, &ch[1], 1), 0);
    assert_int_equal(ack(f), 0);
    close(ch[1]);
    assert_int_equal(vu_conn_notify_config_change(&f->c), 0);
    struct vhost_user_hdr h;
    assert_int_equal(recv(ch[0], &h, sizeof(h) + 1, MSG_DONTWAIT), (ssize_t)sizeof(h));
    assert_int_equal(h.request, VHOST_USER_SLAVE_CONFIG_CHANGE_MSG);
    assert_int_equal(h.flags, VHOST_USER_VERSION);
    assert_int_equal(h.size, 0);
    /* the front-end went away: an error, not a signal */
    close(ch[0]);
    assert_true(vu_conn_notify_config_change(&f->c) < 0);
}

static void test_bad_messages(void **state)
{
    struct fx *f = *state;
    uint64_t v = 0;
    int efd = eventfd(0, 0);
    negotiate(f);
    /* unknown request */
    assert_int_equal(msg(f, 200, VHOST_USER_NEED_REPLY, &v, 8, NULL, 0), 0);
    assert_int_equal(ack(f), 1);
    /* VHOST_USER_NONE */
    assert_int_equal(msg(f, VHOST_USER_NONE, VHOST_USER_NEED_REPLY, NULL, 0, NULL, 0), 0);
    assert_int_equal(ack(f), 1);
    /* wrong payload size */
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_NUM, VHOST_USER_NEED_REPLY, &v, 4, NULL, 0), 0);
    assert_int_equal(ack(f), 1);
    /* kick without its fd */
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_KICK, VHOST_USER_NEED_REPLY, &v, 8, NULL, 0), 0);
    assert_int_equal(ack(f), 1);
    /* fds on a message that takes none: refused, fds closed (not leaked) */
    struct vhost_user_vring_state s = { 0, 16 };
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_NUM, VHOST_USER_NEED_REPLY, &s, 8, &efd, 1), 0);
    assert_int_equal(ack(f), 1);
    assert_int_equal(f->c.rx_nfds, 0);
    /* vring index out of range, bad ring sizes */
    s.index = 4;
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_NUM, VHOST_USER_NEED_REPLY, &s, 8, NULL, 0), 0);
    assert_int_equal(ack(f), 1);
    s.index = 0;
    s.num = 100;
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_NUM, VHOST_USER_NEED_REPLY, &s, 8, NULL, 0), 0);
    assert_int_equal(ack(f), 1);
    s.num = 65536;
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_NUM, VHOST_USER_NEED_REPLY, &s, 8, NULL, 0), 0);
    assert_int_equal(ack(f), 1);
    /* memory table: fd count mismatch, zero regions, absurd size */
    struct vhost_user_mem_table t = { .nregions = 1 };
    t.regions[0] = (struct vhost_user_mem_region){ 0, MEMSZ, (uintptr_t)f->mem, 0 };
    assert_int_equal(msg(f, VHOST_USER_SET_MEM_TABLE, VHOST_USER_NEED_REPLY, &t, 40, NULL, 0), 0);
    assert_int_equal(ack(f), 1);
    t.nregions = 0;
    assert_int_equal(msg(f, VHOST_USER_SET_MEM_TABLE, VHOST_USER_NEED_REPLY, &t, 8, NULL, 0), 0);
    assert_int_equal(ack(f), 1);
    t.nregions = 1;
    t.regions[0].memory_size = UINT64_MAX - 5;
    t.regions[0].mmap_offset = 100;
    assert_int_equal(msg(f, VHOST_USER_SET_MEM_TABLE, VHOST_USER_NEED_REPLY, &t, 40, &f->memfd, 1), 0);
    assert_int_equal(ack(f), 1);
    assert_null(f->c.mem);
    /* a vring address outside guest memory: the ring does not start */
    set_mem(f);
    struct vhost_user_vring_state s16 = { 0, 16 };
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_NUM, 0, &s16, 8, NULL, 0), 0);
    struct vhost_user_vring_addr a = { 0, 0, 12345, 12345, 12345, 0 };
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_ADDR, 0, &a, sizeof(a), NULL, 0), 0);
    v = 0;
    assert_int_equal(msg(f, VHOST_USER_SET_VRING_KICK, VHOST_USER_NEED_REPLY, &v, 8, &efd, 1), 0);
    assert_int_equal(ack(f), 1);
    assert_false(f->c.vqs[0].started);
    /* still talking */
    assert_int_equal(msg(f, VHOST_USER_GET_QUEUE_NUM, 0, NULL, 0, NULL, 0), 0);
    assert_int_equal(ack(f), 4);
    close(efd);
}

static void test_fatal_framing(void **state)
{
    struct fx *f = *state;
    struct vhost_user_hdr h = { VHOST_USER_SET_FEATURES, VHOST_USER_VERSION, 100000 };
    send_raw(f, &h, sizeof(h), NULL, 0);
    assert_int_equal(vu_conn_readable(&f->c), -EMSGSIZE);
}

static void test_bad_version(void **state)
{
    struct fx *f = *state;
    struct vhost_user_hdr h = { VHOST_USER_GET_FEATURES, 2, 0 };
    send_raw(f, &h, sizeof(h), NULL, 0);
    assert_int_equal(vu_conn_readable(&f->c), -EPROTO);
}

static void test_get_vring_base_bad_index(void **state)
{
    struct fx *f = *state;
    struct vhost_user_vring_state s = { 99, 0 };
    assert_true(msg(f, VHOST_USER_GET_VRING_BASE, 0, &s, 8, NULL, 0) < 0);
}

static void test_too_many_fds(void **state)
{
    struct fx *f = *state;
    int fds[10];
    uint64_t v = 0;
    for (int i = 0; i < 10; i++)
        fds[i] = eventfd(0, 0);
    struct vhost_user_msg m = { .hdr = { VHOST_USER_SET_VRING_CALL, VHOST_USER_VERSION, 8 } };
    memcpy(&m.p, &v, 8);
    send_raw(f, &m, 20, fds, 10);
    assert_true(vu_conn_readable(&f->c) < 0);
    for (int i = 0; i < 10; i++)
        close(fds[i]);
}

static void test_split_message_and_eof(void **state)
{
    struct fx *f = *state;
    struct vhost_user_msg m = { .hdr = { VHOST_USER_GET_QUEUE_NUM, VHOST_USER_VERSION, 0 } };
    send_raw(f, &m, 5, NULL, 0);              /* a partial header */
    assert_int_equal(vu_conn_readable(&f->c), 0);
    assert_true(no_reply(f));
    send_raw(f, (char *)&m + 5, 7, NULL, 0);
    assert_int_equal(vu_conn_readable(&f->c), 0);
    assert_int_equal(ack(f), 4);
    shutdown(f->sv[0], SHUT_WR);
    assert_int_equal(vu_conn_readable(&f->c), -ECONNRESET);
}

static int count_fds(void)
{
    int n = 0;
    for (int fd = 0; fd < 1024; fd++)
        if (fcntl(fd, F_GETFD) >= 0)
            n++;
    return n;
}

/* Random well-framed messages of every request number with random payloads
 * (and sometimes an fd): never a crash, a leak of fds, or a hang.  The
 * connection is re-created whenever the back-end drops it. */
static void test_random_messages(void **state)
{
    struct fx *f = *state;
    uint64_t x = 0x243f6a8885a308d3ull;
    int efd = eventfd(0, 0);
    int fds_before = count_fds();

    for (int i = 0; i < 3000; i++) {
        struct vhost_user_msg m;
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        uint32_t req = x % 40, size = (x >> 8) % (sizeof(m.p) + 1);
        uint8_t *p = (uint8_t *)&m.p;
        for (uint32_t k = 0; k < size; k++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            p[k] = (x & 3) ? (uint8_t)(x >> 16) : 0;
        }
        if (req == VHOST_USER_SET_MEM_TABLE && size >= 8)
            m.p.mem.nregions = 1;
        int nfds = (x >> 40) % 4 == 0 ? 1 : 0;
        int fd = (req == VHOST_USER_SET_MEM_TABLE) ? f->memfd : efd;
        m.hdr = (struct vhost_user_hdr){ req, VHOST_USER_VERSION | ((x >> 50) & 1 ? VHOST_USER_NEED_REPLY : 0), size };
        send_raw(f, &m, sizeof(m.hdr) + size, &fd, nfds);
        int r = vu_conn_readable(&f->c);
        if (f->c.blocked_vq >= 0) {
            for (unsigned q = 0; q < f->c.nvqs; q++)
                f->c.vqs[q].q.inflight = 0;
            vu_conn_unblock(&f->c);
        }
        char buf[4096];
        while (recv(f->sv[0], buf, sizeof(buf), MSG_DONTWAIT) > 0)
            ;
        if (r < 0) {
            vu_conn_destroy(&f->c);
            close(f->sv[0]);
            close(f->sv[1]);
            assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, f->sv), 0);
            assert_int_equal(vu_conn_init(&f->c, f->sv[1], 4, &ops, f), 0);
        }
    }
    vu_conn_destroy(&f->c);           /* every fd received is closed by now */
    assert_int_equal(count_fds(), fds_before);
    assert_int_equal(vu_conn_init(&f->c, f->sv[1], 4, &ops, f), 0);
    close(efd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_features, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rings, setup, teardown),
        cmocka_unit_test_setup_teardown(test_remap_on_new_table, setup, teardown),
        cmocka_unit_test_setup_teardown(test_remap_ring_not_in_new_table, setup, teardown),
        cmocka_unit_test_setup_teardown(test_region_past_file_end, setup, teardown),
        cmocka_unit_test_setup_teardown(test_config, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backend_channel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_messages, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fatal_framing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_version, setup, teardown),
        cmocka_unit_test_setup_teardown(test_get_vring_base_bad_index, setup, teardown),
        cmocka_unit_test_setup_teardown(test_too_many_fds, setup, teardown),
        cmocka_unit_test_setup_teardown(test_split_message_and_eof, setup, teardown),
        cmocka_unit_test_setup_teardown(test_random_messages, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
