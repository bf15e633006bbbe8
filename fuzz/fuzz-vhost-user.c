/*
 * libFuzzer target: a vhost-user front-end and its guest.  The input is a
 * program of operations on one back-end connection (vhost-user.c) whose
 * device pops every chain the rings offer (virtq.c) and completes it:
 *   0: a message (header + payload from the input), with no fd
 *   1: the same with the guest memfd (SET_MEM_TABLE, KICK, CALL...)
 *   2: the same with a short memfd (smaller than regions may claim)
 *   3: write input bytes into guest memory (rings, descriptors, tables)
 *   4: kick: process every started ring
 * So remaps, short fds, stale rings and hostile rings all come from the
 * fuzzer, through the real message handlers and ring walker.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include "export/vhost-user-blk/vhost-user.h"

bool log_debug_enabled;
void log_msg(const char *level, const char *fmt, ...) { (void)level; (void)fmt; }

#define MEMSZ (256u << 10)

static int memfd, shortfd;
static uint8_t *guest;

static void process(struct vu_conn *c, struct vu_vq *vq)
{
    struct iovec iov[64];
    for (int n = 0; n < 512 && vq->started && c->mem; n++) {
        struct virtq_elem e = { .iov = iov, .max_iov = 64 };
        int r = virtq_pop(&vq->q, c->mem, &e);
        if (r == 0 || r == -EPROTO)
            return;
        /* a request: touch what the guest gave us, then complete it */
        for (unsigned i = 0; r > 0 && i < e.out_num + e.in_num; i++) {
            if (i >= e.out_num)
                memset(iov[i].iov_base, 0x5a, iov[i].iov_len < 64 ? iov[i].iov_len : 64);
            else
                (void)*(volatile uint8_t *)iov[i].iov_base;
        }
        virtq_push(&vq->q, e.head, 0);
        vq->q.inflight = 0;
    }
    (void)virtq_should_notify(&vq->q);
    (void)virtq_enable_kick(&vq->q);
}

static uint64_t dev_features(void *o) { return 1ull << VIRTIO_F_VERSION_1 | 1ull << VIRTIO_F_EVENT_IDX; }
static void dev_get_config(void *o, uint8_t *buf, uint32_t len) { memset(buf, 1, len); }
static int dev_set_config(void *o, const uint8_t *d, uint32_t off, uint32_t size, uint32_t fl)
{
    return off == 32 && size == 1 && !fl ? 0 : -EINVAL;
}
static int dev_queue_start(void *o, struct vu_vq *vq) { process(o, vq); return 0; }
static void dev_queue_stop(void *o, struct vu_vq *vq) { }

static const struct vu_dev_ops ops = {
    dev_features, dev_get_config, dev_set_config, dev_queue_start, dev_queue_stop,
};

static void send_msg(int fd, const uint8_t *p, size_t len, int pass)
{
    char ctl[CMSG_SPACE(sizeof(int))];
    struct iovec iov = { (void *)p, len };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (pass >= 0) {
        memset(ctl, 0, sizeof(ctl));
        mh.msg_control = ctl;
        mh.msg_controllen = sizeof(ctl);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &pass, sizeof(int));
    }
    (void)sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int sv[2];
    struct vu_conn c;
    char sink[4096];

    if (!guest) {
        memfd = memfd_create("guest", 0);
        shortfd = memfd_create("short", 0);
        if (ftruncate(memfd, MEMSZ) < 0 || ftruncate(shortfd, 4096) < 0)
            abort();
        guest = mmap(NULL, MEMSZ, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    }
    memset(guest, 0, MEMSZ);
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) < 0)
        abort();
    if (vu_conn_init(&c, sv[1], 2, &ops, &c) < 0)
        abort();
    size_t pos = 0;
    while (pos + 3 <= size) {
        uint8_t op = data[pos] % 5;
        size_t len = data[pos + 1] | (size_t)data[pos + 2] << 8;
        pos += 3;
        if (len > size - pos)
            len = size - pos;
        const uint8_t *p = data + pos;
        pos += len;
        if (op <= 2) {
            int fd = op == 1 ? memfd : op == 2 ? shortfd : -1;
            send_msg(sv[0], p, len, fd);
            int r = vu_conn_readable(&c);
            if (c.blocked_vq >= 0) {
                for (unsigned q = 0; q < c.nvqs; q++)
                    c.vqs[q].q.inflight = 0;
                r = vu_conn_unblock(&c);
            }
            while (recv(sv[0], sink, sizeof(sink), MSG_DONTWAIT) > 0)
                ;
            if (r < 0)
                break;            /* the back-end dropped the front-end */
        } else if (op == 3 && len >= 4) {
            size_t off = (p[0] | (size_t)p[1] << 8 | (size_t)p[2] << 16) % MEMSZ;
            size_t n = len - 3 < MEMSZ - off ? len - 3 : MEMSZ - off;
            memcpy(guest + off, p + 3, n);
        } else if (op == 4) {
            for (unsigned q = 0; q < c.nvqs; q++)
                if (c.vqs[q].started)
                    process(&c, &c.vqs[q]);
        }
    }
    vu_conn_destroy(&c);
    close(sv[0]);
    close(sv[1]);
    return 0;
}
