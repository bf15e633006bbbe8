/*
 * Unit tests of the vhost-user back-end protocol (vhost-user.c) through a
 * socketpair: negotiation, memory table with a real memfd, vring set-up
 * and GET_VRING_BASE (including waiting for in-flight requests), config
 * space, and malformed messages: unknown requests, wrong sizes, missing
 * or extra fds, oversize payloads, bad versions, messages split across
 * reads.  None of them may crash; each gets an error answer or a drop.
 */
#include <dirent.h>
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

/* ---- a model of the back-end's protocol state ---------------------------------
 * Written from the vhost-user spec and vhost-user.h, not from vhost-user.c:
 * for each message it says whether the connection goes on or is dropped,
 * the exact reply (the request's own answer, or the REPLY_ACK status when
 * asked for and acked), and the state after it: acked features, owner, the
 * memory table (regions and which bytes of the memfd each maps), every
 * ring's size, base, addresses, fds, enabled/attached/started flags and
 * where its pointers point, the back-end channel, and the device's
 * start/stop calls.
 *   - a payload of the wrong size, or fds on a message that takes none: a
 *     request that answers itself (GET_*) cannot answer, the connection is
 *     dropped; any other is refused and the connection goes on;
 *   - GET_VRING_BASE of a ring that does not exist: dropped;
 *   - a ring starts once it has a size, addresses, a kick fd and a table that
 *     maps all three parts (desc 16n, avail 6+2n, used 6+8n, each plus the
 *     2-byte event index) suitably aligned, and only on SET_VRING_ADDR or
 *     SET_VRING_KICK; a new table that no longer maps it stops it. */
#define NQ 4
#define UVA0 0x7f0000000000ull
#define UVA1 0x7e0000000000ull

struct mregion { uint64_t gpa, size, uva, off; };

struct mvq {
    unsigned num;
    uint16_t base, last;
    bool addr_set, attached, started, enabled, event_idx;
    uint64_t d, a, u;
    bool kick, call, err;
};

struct mstate {
    uint64_t features, protocol;
    bool owner, has_mem, backend;
    unsigned nregions;
    struct mregion r[VHOST_USER_MAX_REGIONS];
    struct mvq vq[NQ];
    uint8_t wce;
    unsigned starts, stops;
};

static const uint64_t m_offered = 1ull << VIRTIO_F_VERSION_1 | 1ull << VIRTIO_F_EVENT_IDX |
                                  1ull << VHOST_USER_F_PROTOCOL_FEATURES;
static const uint64_t m_protocol = 1ull << VHOST_USER_PROTOCOL_F_MQ |
                                   1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK |
                                   1ull << VHOST_USER_PROTOCOL_F_SLAVE_REQ |
                                   1ull << VHOST_USER_PROTOCOL_F_CONFIG;

/* Region of the current table holding [a, a+len) by front-end address, or -1. */
static int m_uva_region(const struct mstate *s, uint64_t a, uint64_t len)
{
    for (unsigned i = 0; i < s->nregions; i++) {
        const struct mregion *r = &s->r[i];
        if (a >= r->uva && a - r->uva <= r->size && len <= r->size - (a - r->uva))
            return i;
    }
    return -1;
}

/* Does the current table map the ring?  0, -EFAULT (not mapped) or -EINVAL
 * (misaligned: our mapping starts page-aligned at the region's offset). */
static int m_ring_maps(const struct mstate *s, const struct mvq *q)
{
    const uint64_t addr[3] = { q->d, q->a, q->u };
    const uint64_t len[3] = { 16ull * q->num, 8 + 2ull * q->num, 8 + 8ull * q->num };
    const unsigned align[3] = { 16, 2, 4 };
    int reg[3];
    if (!s->has_mem)
        return -EFAULT;
    for (int k = 0; k < 3; k++)
        if ((reg[k] = m_uva_region(s, addr[k], len[k])) < 0)
            return -EFAULT;
    for (int k = 0; k < 3; k++) {
        const struct mregion *r = &s->r[reg[k]];
        if ((r->off + (addr[k] - r->uva)) % align[k])
            return -EINVAL;
    }
    return 0;
}

static void m_stop(struct mstate *s, struct mvq *q)
{
    s->stops += q->started;
    q->started = false;
}

static void m_reset_vq(struct mstate *s, struct mvq *q)
{
    m_stop(s, q);
    q->attached = false;
    q->num = 0;
    q->base = 0;
    q->addr_set = false;
    q->kick = false;
}

static int m_try_start(struct mstate *s, struct mvq *q)
{
    if (q->started || !s->has_mem || !q->num || !q->addr_set || !q->kick)
        return 0;
    int r = m_ring_maps(s, q);
    if (r < 0)
        return r;
    if (!q->attached) {
        q->attached = true;
        q->last = q->base;
        q->event_idx = s->features >> VIRTIO_F_EVENT_IDX & 1;
    }
    q->started = true;
    s->starts++;
    return 0;
}

/* The connection was dropped: what the device sees, then a fresh one. */
static void m_drop(struct mstate *s)
{
    unsigned starts = s->starts, stops = s->stops;
    uint8_t wce = s->wce;                     /* the device's, not the connection's */
    for (unsigned i = 0; i < NQ; i++)
        stops += s->vq[i].started;
    memset(s, 0, sizeof(*s));
    s->starts = starts;
    s->stops = stops;
    s->wce = wce;
}

enum { FD_NONE, FD_MEM, FD_EVENT };

struct mreply { size_t len; uint8_t b[sizeof(struct vhost_user_msg)]; };

static void m_answer(struct mreply *out, uint32_t req, const void *p, uint32_t size)
{
    struct vhost_user_hdr h = { req, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, size };
    memcpy(out->b, &h, sizeof(h));
    memcpy(out->b + sizeof(h), p, size);
    out->len = sizeof(h) + size;
}

/* One message: false if the connection must be dropped; *out the reply. */
static bool m_handle(struct mstate *s, const struct vhost_user_msg *m, int nfds, int fdkind,
                     struct mreply *out)
{
    const uint32_t req = m->hdr.request, size = m->hdr.size;
    union vhost_user_payload pl;
    const union vhost_user_payload *p = &pl;
    /* payload size (exact, or at least with +), fds taken, answers itself */
    static const struct { uint32_t size; bool min, fds, answers; } rule[] = {
        [VHOST_USER_GET_FEATURES] = { 0, true, false, true },
        [VHOST_USER_SET_FEATURES] = { 8 },
        [VHOST_USER_SET_OWNER] = { 0, true },
        [VHOST_USER_RESET_OWNER] = { 0, true },
        [VHOST_USER_SET_MEM_TABLE] = { 8, true, true },
        [VHOST_USER_SET_VRING_NUM] = { 8 },
        [VHOST_USER_SET_VRING_ADDR] = { 40 },
        [VHOST_USER_SET_VRING_BASE] = { 8 },
        [VHOST_USER_GET_VRING_BASE] = { 8, false, false, true },
        [VHOST_USER_SET_VRING_KICK] = { 8, false, true },
        [VHOST_USER_SET_VRING_CALL] = { 8, false, true },
        [VHOST_USER_SET_VRING_ERR] = { 8, false, true },
        [VHOST_USER_GET_PROTOCOL_FEATURES] = { 0, true, false, true },
        [VHOST_USER_SET_PROTOCOL_FEATURES] = { 8 },
        [VHOST_USER_GET_QUEUE_NUM] = { 0, true, false, true },
        [VHOST_USER_SET_VRING_ENABLE] = { 8 },
        [VHOST_USER_SET_SLAVE_REQ_FD] = { 0, false, true },
        [VHOST_USER_GET_CONFIG] = { 12, true, false, true },
        [VHOST_USER_SET_CONFIG] = { 12, true },
        [VHOST_USER_RESET_DEVICE] = { 0, true },
    };
    static const bool known[] = {
        [1] = 1, [2] = 1, [3] = 1, [4] = 1, [5] = 1, [8] = 1, [9] = 1, [10] = 1, [11] = 1,
        [12] = 1, [13] = 1, [14] = 1, [15] = 1, [16] = 1, [17] = 1, [18] = 1, [21] = 1,
        [24] = 1, [25] = 1, [34] = 1,
    };
    bool ok = true;
    memcpy(&pl, (const uint8_t *)m + sizeof(m->hdr), sizeof(pl));
    uint64_t v = p->u64;

    out->len = 0;
    if (req >= sizeof(known) || !known[req]) {
        ok = false;
        goto ack;
    }
    if (rule[req].min ? size < rule[req].size : size != rule[req].size) {
        if (rule[req].answers)
            return false;
        ok = false;
        goto ack;
    }
    if (nfds && !rule[req].fds) {
        if (rule[req].answers)
            return false;
        ok = false;
        goto ack;
    }
    switch (req) {
    case VHOST_USER_GET_FEATURES:
        m_answer(out, req, &m_offered, 8);
        return true;
    case VHOST_USER_GET_PROTOCOL_FEATURES:
        m_answer(out, req, &m_protocol, 8);
        return true;
    case VHOST_USER_GET_QUEUE_NUM: {
        uint64_t n = NQ;
        m_answer(out, req, &n, 8);
        return true;
    }
    case VHOST_USER_SET_FEATURES:
        if ((ok = !(v & ~m_offered))) {
            s->features = v;
            for (unsigned i = 0; i < NQ; i++) {
                s->vq[i].enabled |= !(v >> VHOST_USER_F_PROTOCOL_FEATURES & 1);
                s->vq[i].event_idx = v >> VIRTIO_F_EVENT_IDX & 1;
            }
        }
        break;
    case VHOST_USER_SET_PROTOCOL_FEATURES:
        if ((ok = !(v & ~m_protocol)))
            s->protocol = v;
        break;
    case VHOST_USER_SET_OWNER:
        s->owner = true;
        break;
    case VHOST_USER_RESET_OWNER:
    case VHOST_USER_RESET_DEVICE:
        for (unsigned i = 0; i < NQ; i++)
            m_reset_vq(s, &s->vq[i]);
        s->features = 0;
        s->owner = false;
        break;
    case VHOST_USER_SET_MEM_TABLE: {
        uint32_t n = p->mem.nregions;
        ok = n >= 1 && n <= VHOST_USER_MAX_REGIONS && size == 8 + 32 * n &&
             nfds == (int)n && fdkind == FD_MEM;
        for (uint32_t i = 0; ok && i < n; i++) {
            const struct vhost_user_mem_region *w = &p->mem.regions[i];
            ok = w->memory_size > 0 && w->mmap_offset <= MEMSZ &&
                 w->memory_size <= MEMSZ - w->mmap_offset &&        /* inside the file */
                 w->guest_phys_addr <= UINT64_MAX - w->memory_size &&
                 w->userspace_addr <= UINT64_MAX - w->memory_size;
        }
        if (!ok)
            break;
        s->has_mem = true;
        s->nregions = n;
        for (uint32_t i = 0; i < n; i++)
            s->r[i] = (struct mregion){ p->mem.regions[i].guest_phys_addr,
                                        p->mem.regions[i].memory_size,
                                        p->mem.regions[i].userspace_addr,
                                        p->mem.regions[i].mmap_offset };
        for (unsigned i = 0; i < NQ; i++)
            if (s->vq[i].attached && m_ring_maps(s, &s->vq[i]) < 0)
                m_stop(s, &s->vq[i]);
        break;
    }
    case VHOST_USER_SET_VRING_NUM:
    case VHOST_USER_SET_VRING_BASE:
    case VHOST_USER_SET_VRING_ENABLE: {
        uint32_t idx = p->state.index, num = p->state.num;
        if (!(ok = idx < NQ))
            break;
        struct mvq *q = &s->vq[idx];
        if (req == VHOST_USER_SET_VRING_NUM) {
            if ((ok = num && num <= VIRTQ_MAX_SIZE && !(num & (num - 1)) && !q->attached))
                q->num = num;
        } else if (req == VHOST_USER_SET_VRING_BASE) {
            if ((ok = num <= 0xffff && !q->attached))
                q->base = num;
        } else {
            q->enabled = num != 0;
        }
        break;
    }
    case VHOST_USER_SET_VRING_ADDR: {
        if (!(ok = p->addr.index < NQ))
            break;
        struct mvq *q = &s->vq[p->addr.index];
        q->d = p->addr.desc_user_addr;
        q->a = p->addr.avail_user_addr;
        q->u = p->addr.used_user_addr;
        q->addr_set = true;
        if (q->attached && m_ring_maps(s, q) < 0) {
            m_stop(s, q);
            ok = false;
            break;
        }
        ok = m_try_start(s, q) == 0;
        break;
    }
    case VHOST_USER_GET_VRING_BASE: {
        uint32_t idx = p->state.index;
        if (idx >= NQ)
            return false;
        struct mvq *q = &s->vq[idx];
        struct vhost_user_vring_state st = { idx, q->attached ? q->last : q->base };
        m_stop(s, q);
        m_reset_vq(s, q);
        m_answer(out, req, &st, sizeof(st));
        return true;
    }
    case VHOST_USER_SET_VRING_KICK:
    case VHOST_USER_SET_VRING_CALL:
    case VHOST_USER_SET_VRING_ERR: {
        unsigned idx = v & VHOST_USER_VRING_IDX_MASK;
        bool nofd = v & VHOST_USER_VRING_NOFD;
        if (!(ok = idx < NQ && nfds == (nofd ? 0 : 1)))
            break;
        struct mvq *q = &s->vq[idx];
        if (req == VHOST_USER_SET_VRING_CALL) {
            q->call = !nofd;
        } else if (req == VHOST_USER_SET_VRING_ERR) {
            q->err = !nofd;
        } else if (!(ok = !nofd)) {
            break;                            /* polling: not supported */
        } else {
            m_stop(s, q);
            q->kick = true;
            ok = m_try_start(s, q) == 0;
        }
        break;
    }
    case VHOST_USER_SET_SLAVE_REQ_FD:
        if ((ok = nfds == 1))
            s->backend = true;
        break;
    case VHOST_USER_GET_CONFIG:
    case VHOST_USER_SET_CONFIG: {
        const struct vhost_user_config *c = &p->config;
        bool good = c->size <= 256 && size == 12 + c->size && c->offset <= 256 &&
                    c->size <= 256 - c->offset;
        if (req == VHOST_USER_GET_CONFIG) {
            struct vhost_user_config a = *c;
            for (uint32_t i = 0; good && i < c->size; i++)
                a.region[i] = c->offset + i == 32 ? s->wce : (uint8_t)(c->offset + i);
            m_answer(out, req, &a, good ? 12 + c->size : 0);
            return true;
        }
        if ((ok = good && c->offset == 32 && c->size == 1 && c->flags == 0))
            s->wce = c->region[0];
        break;
    }
    }
ack:
    if ((m->hdr.flags & VHOST_USER_NEED_REPLY) &&
        (s->protocol >> VHOST_USER_PROTOCOL_F_REPLY_ACK & 1)) {
        uint64_t status = !ok;
        m_answer(out, req, &status, 8);
    }
    return true;
}

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    int n = -1;                       /* not d's own fd */
    assert_non_null(d);
    while (readdir(d))
        n++;
    closedir(d);
    return n - 2;                     /* . and .. */
}

/* The connection's state is the model's, and so is the fd count. */
static void m_check(struct fx *f, const struct mstate *s, int fds_base, uint64_t *x)
{
    struct vu_conn *c = &f->c;
    int fds = fds_base + s->backend;
    assert_int_equal(c->acked_features, s->features);
    assert_int_equal(c->acked_protocol, s->protocol);
    assert_int_equal(c->owner, s->owner);
    assert_int_equal(c->mem != NULL, s->has_mem);
    if (s->has_mem) {
        assert_int_equal(c->mem->nregions, s->nregions);
        for (unsigned i = 0; i < s->nregions; i++) {
            const struct vq_mem_region *r = &c->mem->r[i];
            assert_int_equal(r->gpa, s->r[i].gpa);
            assert_int_equal(r->size, s->r[i].size);
            assert_int_equal(r->uva, s->r[i].uva);
            /* it maps the memfd from the region's offset on */
            uint64_t k = *x % s->r[i].size;
            f->mem[s->r[i].off + k] = (uint8_t)(*x >> 32);
            assert_int_equal(r->host[k], (uint8_t)(*x >> 32));
            *x = *x * 6364136223846793005ull + 1442695040888963407ull;
        }
    }
    for (unsigned i = 0; i < NQ; i++) {
        const struct vu_vq *vq = &c->vqs[i];
        const struct mvq *q = &s->vq[i];
        assert_int_equal(vq->num, q->num);
        assert_int_equal(vq->base, q->base);
        assert_int_equal(vq->addr_set, q->addr_set);
        assert_int_equal(vq->q.avail != NULL, q->attached);
        assert_int_equal(vq->started, q->started);
        assert_int_equal(vq->enabled, q->enabled);
        assert_int_equal(vq->kick_fd >= 0, q->kick);
        assert_int_equal(vq->call_fd >= 0, q->call);
        assert_int_equal(vq->err_fd >= 0, q->err);
        fds += q->kick + q->call + q->err;
        if (q->addr_set) {
            assert_int_equal(vq->addr.desc_user_addr, q->d);
            assert_int_equal(vq->addr.avail_user_addr, q->a);
            assert_int_equal(vq->addr.used_user_addr, q->u);
        }
        if (q->attached) {
            assert_int_equal(vq->q.num, q->num);
            assert_int_equal(vq->q.last_avail_idx, q->last);
            assert_int_equal(vq->q.event_idx, q->event_idx);
        }
        if (q->started) {              /* the ring in our mapping of the current table */
            int j = m_uva_region(s, q->d, 16ull * q->num);
            assert_ptr_equal(vq->q.desc, c->mem->r[j].host + (q->d - s->r[j].uva));
            j = m_uva_region(s, q->a, 8 + 2ull * q->num);
            assert_ptr_equal(vq->q.avail, c->mem->r[j].host + (q->a - s->r[j].uva));
            j = m_uva_region(s, q->u, 8 + 8ull * q->num);
            assert_ptr_equal(vq->q.used, c->mem->r[j].host + (q->u - s->r[j].uva));
            assert_ptr_equal(vq->ring_mem, c->mem);
        }
    }
    assert_int_equal(c->backend_fd >= 0, s->backend);
    assert_int_equal(f->started, s->starts);
    assert_int_equal(f->stopped, s->stops);
    assert_int_equal(count_fds(), fds);
}

static uint64_t rnd(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static uint64_t pick(uint64_t *x, const uint64_t *v, unsigned n) { return v[rnd(x) % n]; }

/* A ring address: in the table's usual front-end range, elsewhere, or off. */
static uint64_t ring_uva(uint64_t *x)
{
    static const uint64_t base[] = { UVA0, UVA0, UVA0, UVA1, UVA0 + MEMSZ / 2 - 2048 };
    uint64_t a = pick(x, base, 5) + (rnd(x) % 128) * 8192;
    switch (rnd(x) % 16) {
    case 0: return rnd(x);
    case 1: return a + 2;
    case 2: return UVA0 + MEMSZ - 8;
    default: return a;
    }
}

/* Random, mostly plausible messages (right sizes, small indices, ring
 * sizes and addresses near what a front-end sends, memory tables from the
 * memfd, fds where they belong or not): every answer, drop and state
 * after each message is the model's, and no fd leaks. */
static void test_random_messages(void **state)
{
    struct fx *f = *state;
    uint64_t x = 0x243f6a8885a308d3ull, y = 1;
    int efd = eventfd(0, 0);
    int fds_base = count_fds();
    struct mstate s;
    unsigned drops = 0, acks[2] = { 0, 0 }, answers = 0, starts_seen;
    /* the rings' set-up often, resets seldom (they undo it) */
    static const uint32_t reqs[] = {
        VHOST_USER_GET_FEATURES, VHOST_USER_SET_FEATURES, VHOST_USER_SET_OWNER,
        VHOST_USER_SET_MEM_TABLE, VHOST_USER_SET_MEM_TABLE, VHOST_USER_SET_MEM_TABLE,
        VHOST_USER_SET_VRING_NUM, VHOST_USER_SET_VRING_NUM, VHOST_USER_SET_VRING_NUM,
        VHOST_USER_SET_VRING_ADDR, VHOST_USER_SET_VRING_ADDR, VHOST_USER_SET_VRING_ADDR,
        VHOST_USER_SET_VRING_KICK, VHOST_USER_SET_VRING_KICK, VHOST_USER_SET_VRING_KICK,
        VHOST_USER_SET_VRING_BASE, VHOST_USER_GET_VRING_BASE, VHOST_USER_SET_VRING_CALL,
        VHOST_USER_SET_VRING_ERR, VHOST_USER_GET_PROTOCOL_FEATURES,
        VHOST_USER_SET_PROTOCOL_FEATURES, VHOST_USER_SET_PROTOCOL_FEATURES,
        VHOST_USER_GET_QUEUE_NUM, VHOST_USER_SET_VRING_ENABLE, VHOST_USER_SET_SLAVE_REQ_FD,
        VHOST_USER_GET_CONFIG, VHOST_USER_SET_CONFIG,
    };
    static const uint32_t rare[] = {
        VHOST_USER_RESET_OWNER, VHOST_USER_RESET_DEVICE, VHOST_USER_NONE,
        VHOST_USER_SET_LOG_BASE, VHOST_USER_IOTLB_MSG, VHOST_USER_GET_MAX_MEM_SLOTS, 200,
    };
    static const uint64_t nums[] = { 16, 16, 64, 1, 2, 256, VIRTQ_MAX_SIZE, 0, 100, 65536 };
    /* memory regions: (gpa, size, uva, offset) */
    static const struct vhost_user_mem_region regs[] = {
        { 0x1000000, MEMSZ, UVA0, 0 },                       /* the whole memfd */
        { 0x1000000, MEMSZ, UVA0, 0 },
        { 0x1000000, MEMSZ / 2, UVA0, 0 },                   /* its halves */
        { 0x2000000, MEMSZ / 2, UVA0 + MEMSZ / 2, MEMSZ / 2 },
        { 0x3000000, MEMSZ, UVA1, 0 },                       /* elsewhere for the front-end */
        { 0x1000000, MEMSZ - 8, UVA0, 8 },                   /* rings misaligned in our map */
        { 0x1000000, MEMSZ, UVA0, 4096 },                    /* past the end of the file */
        { 0x1000000, 0, UVA0, 0 },                           /* empty */
        { 0x1000000, UINT64_MAX - 5, UVA0, 100 },            /* overflowing */
        { UINT64_MAX - 4096, 8192, UVA0, 0 },
    };

    memset(&s, 0, sizeof(s));
    for (int i = 0; i < 8000; i++) {
        struct vhost_user_msg m;
        uint32_t req = rnd(&x) % 32 ? reqs[rnd(&x) % (sizeof(reqs) / sizeof(reqs[0]))]
                                    : rare[rnd(&x) % (sizeof(rare) / sizeof(rare[0]))];
        uint32_t size = 8, ring = rnd(&x) % 8 ? rnd(&x) % 2 : rnd(&x) % 5;
        int nfds = 0, fdkind = FD_EVENT;
        memset(&m, 0, sizeof(m));
        switch (req) {
        case VHOST_USER_SET_FEATURES:
            m.p.u64 = rnd(&x) & m_offered;
            if (rnd(&x) % 8 == 0)
                m.p.u64 |= 1ull << (rnd(&x) % 64);
            break;
        case VHOST_USER_SET_PROTOCOL_FEATURES:
            m.p.u64 = rnd(&x) % 4 ? (rnd(&x) & m_protocol) | 1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK
                                  : rnd(&x) & m_protocol;
            if (rnd(&x) % 8 == 0)
                m.p.u64 |= 1ull << (rnd(&x) % 64);
            break;
        case VHOST_USER_SET_MEM_TABLE: {
            uint32_t n = rnd(&x) % 8 ? 1 + rnd(&x) % 2 : rnd(&x) % 10;
            m.p.mem.nregions = n;
            for (uint32_t k = 0; k < n && k < VHOST_USER_MAX_REGIONS; k++)
                m.p.mem.regions[k] = regs[rnd(&x) % (sizeof(regs) / sizeof(regs[0]))];
            size = 8 + 32 * (n < VHOST_USER_MAX_REGIONS ? n : VHOST_USER_MAX_REGIONS);
            nfds = n <= VHOST_USER_MAX_FDS ? n : 1;
            fdkind = FD_MEM;
            if (rnd(&x) % 10 == 0)
                fdkind = FD_EVENT;
            if (rnd(&x) % 10 == 0)
                nfds = rnd(&x) % 3;
            break;
        }
        case VHOST_USER_SET_VRING_NUM:
            m.p.state = (struct vhost_user_vring_state){ ring, pick(&x, nums, 10) };
            break;
        case VHOST_USER_SET_VRING_BASE:
            m.p.state = (struct vhost_user_vring_state){
                ring, rnd(&x) % 8 ? rnd(&x) % 100 : (uint32_t)rnd(&x) };
            break;
        case VHOST_USER_GET_VRING_BASE:
            m.p.state = (struct vhost_user_vring_state){ rnd(&x) % 16 ? ring % 4 : 4, 0 };
            break;
        case VHOST_USER_SET_VRING_ENABLE:
            m.p.state = (struct vhost_user_vring_state){ ring, rnd(&x) % 2 };
            break;
        case VHOST_USER_SET_VRING_ADDR: {
            uint64_t d = ring_uva(&x);
            m.p.addr = (struct vhost_user_vring_addr){ ring, 0, d, d + 2048, d + 4096, 0 };
            if (rnd(&x) % 8 == 0)
                m.p.addr.used_user_addr = ring_uva(&x);
            size = sizeof(m.p.addr);
            break;
        }
        case VHOST_USER_SET_VRING_KICK:
        case VHOST_USER_SET_VRING_CALL:
        case VHOST_USER_SET_VRING_ERR:
            m.p.u64 = ring | (rnd(&x) % 8 == 0 ? VHOST_USER_VRING_NOFD : 0);
            nfds = rnd(&x) % 6 ? !(m.p.u64 & VHOST_USER_VRING_NOFD) : rnd(&x) % 3;
            break;
        case VHOST_USER_SET_SLAVE_REQ_FD:
            size = 0;
            nfds = rnd(&x) % 4 ? 1 : rnd(&x) % 3;
            break;
        case VHOST_USER_GET_CONFIG:
        case VHOST_USER_SET_CONFIG:
            if (req == VHOST_USER_SET_CONFIG && rnd(&x) % 2)
                m.p.config = (struct vhost_user_config){ 32, 1, 0, { (uint8_t)rnd(&x) } };
            else
                m.p.config = (struct vhost_user_config){ rnd(&x) % 8 ? rnd(&x) % 64 : rnd(&x) % 300,
                                                         rnd(&x) % 8 ? rnd(&x) % 64 : rnd(&x) % 300,
                                                         rnd(&x) % 8 == 0 };
            size = 12 + (m.p.config.size <= 256 ? m.p.config.size : 0);
            if (rnd(&x) % 8 == 0)
                size = 12 + rnd(&x) % 64;
            break;
        default:
            size = rnd(&x) % 4 ? 0 : rnd(&x) % 16;
            for (uint32_t k = 0; k < size; k++)
                ((uint8_t *)&m.p)[k] = (uint8_t)rnd(&x);
            break;
        }
        if (rnd(&x) % 16 == 0)                       /* the wrong size */
            size = rnd(&x) % 48;
        if (rnd(&x) % 16 == 0 && !nfds)              /* an fd where none belongs */
            nfds = 1;
        m.hdr = (struct vhost_user_hdr){ req, VHOST_USER_VERSION |
                                         (rnd(&x) % 2 ? VHOST_USER_NEED_REPLY : 0), size };
        int fds[VHOST_USER_MAX_FDS];
        for (int k = 0; k < nfds; k++)
            fds[k] = fdkind == FD_MEM ? f->memfd : efd;

        struct mreply want;
        bool keep = m_handle(&s, &m, nfds, nfds ? fdkind : FD_NONE, &want);
        send_raw(f, &m, sizeof(m.hdr) + size, fds, nfds);
        int r = vu_conn_readable(&f->c);
        assert_int_equal(f->c.blocked_vq, -1);       /* nothing in flight: never waits */
        uint8_t got[sizeof(struct vhost_user_msg) + 1];
        ssize_t n = recv(f->sv[0], got, sizeof(got), MSG_DONTWAIT);
        if (!keep) {
            assert_true(r < 0);
            drops++;
            vu_conn_destroy(&f->c);
            m_drop(&s);
            close(f->sv[0]);
            close(f->sv[1]);
            assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, f->sv), 0);
            assert_int_equal(vu_conn_init(&f->c, f->sv[1], NQ, &ops, f), 0);
        } else {
            assert_int_equal(r, 0);
            if (want.len == 0) {
                assert_true(n < 0 && errno == EAGAIN);
            } else {
                assert_int_equal(n, (ssize_t)want.len);
                assert_memory_equal(got, want.b, want.len);
                if (want.len == sizeof(m.hdr) + 8 && !(req == VHOST_USER_GET_FEATURES ||
                    req == VHOST_USER_GET_PROTOCOL_FEATURES || req == VHOST_USER_GET_QUEUE_NUM ||
                    req == VHOST_USER_GET_VRING_BASE))
                    acks[want.b[sizeof(m.hdr)]]++;
                else
                    answers++;
            }
        }
        m_check(f, &s, fds_base, &y);
    }
    starts_seen = s.starts;
    print_message("drops %u, acks ok %u / refused %u, answers %u, ring starts %u, stops %u\n",
                  drops, acks[0], acks[1], answers, starts_seen, s.stops);
    assert_true(drops > 40 && acks[0] > 600 && acks[1] > 600 && answers > 600);
    assert_true(starts_seen > 60 && s.stops > 60);
    vu_conn_destroy(&f->c);           /* every fd received is closed by now */
    assert_int_equal(count_fds(), fds_base);
    assert_int_equal(vu_conn_init(&f->c, f->sv[1], NQ, &ops, f), 0);
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
