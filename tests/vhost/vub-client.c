/*
 * vub-client: a minimal vhost-user-blk front-end for tests and benchmarks.
 *
 * It plays QEMU's part without a guest: creates "guest memory" in a memfd,
 * hands it over with SET_MEM_TABLE, lays out split rings in it, and drives
 * virtio-blk requests directly.  Used by the functional tests (data checks,
 * hostile rings, bad messages, reconnects, against bexd and qsd alike) and
 * by bench/vhost-bench.sh (device-side IOPS and server CPU per request).
 *
 *   vub-client SOCK info
 *   vub-client SOCK write OFF LEN SEED      pattern write; prints status
 *   vub-client SOCK read OFF LEN            data to stdout (binary)
 *   vub-client SOCK req TYPE [SECTOR [LEN]] one request of any type: prints status
 *   vub-client SOCK inflight OFF LEN        a READ known to be in flight, then its status
 *   vub-client SOCK hostile KIND            a crafted bad ring (see below; VUB_QUEUE=n
 *                                           breaks queue n instead of 0)
 *   vub-client SOCK badmsg KIND             a malformed vhost-user message
 *   vub-client SOCK bench RW BS DEPTH SECS [QUEUES] [SERVER_PID]
 *   vub-client SOCK verify SECS            write patterns, read each back, for SECS
 *   vub-client SOCK mqverify BS DEPTH ROUNDS [HOLD_FD]
 *                                           every queue writes DEPTH patterned blocks at
 *                                           once, then reads back another queue's; with
 *                                           HOLD_FD, writes "ready" and the kick fds'
 *                                           eventfd-ids there after the first round
 *                                           and waits for a byte on stdin
 * Options before SOCK: -q N (queues to set up, default 1), -n N (ring size,
 * default 256, at most 4096), -i (use indirect descriptors: one ring entry
 * per request, so bench may keep a whole ring of them in flight), -d (bench:
 * after SECS, wait for the requests still in flight before leaving, as a
 * front-end stopping its device does; they are not counted).
 * Output: one JSON object per line.  Exit 0 unless the front-end itself
 * failed (the server's answers are in the output).
 */
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include "export/vhost-user-blk/vhost-user-proto.h"

#define MEM_SIZE (64u << 20)
#define RING_AREA (8u << 20)         /* rings live below this */
#define TIMEOUT_MS 5000

static int sock = -1;
static uint8_t *mem;
static int memfd;
static unsigned nq = 1, qsize = 256;
static bool use_indirect, drain_at_end;
static uint64_t features;
static struct virtio_blk_config cfg;

struct q {
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    int kick, call;
    uint16_t avail_idx, used_seen;
    uint16_t free_head;
} qs[64];

static void die(const char *m)
{
    printf("{\"error\": \"%s\", \"errno\": \"%s\"}\n", m, strerror(errno));
    exit(2);
}

/* ---- messages ------------------------------------------------------------------- */

static int send_msg(uint32_t req, uint32_t flags, const void *p, uint32_t size,
                    const int *fds, int nfds)
{
    struct vhost_user_msg m = { .hdr = { req, VHOST_USER_VERSION | flags, size } };
    char ctl[CMSG_SPACE(sizeof(int) * 8)];
    struct iovec iov = { &m, sizeof(m.hdr) + size };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };

    if (size > sizeof(m.p))
        iov.iov_len = sizeof(m);      /* claims more than it sends (badmsg) */
    else if (size)
        memcpy(&m.p, p, size);
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
    return sendmsg(sock, &mh, MSG_NOSIGNAL) < 0 ? -errno : 0;
}

/* Receive one reply; returns payload size or -errno (-ECONNRESET on EOF). */
static int recv_reply(struct vhost_user_msg *m)
{
    struct pollfd p = { sock, POLLIN, 0 };
    if (poll(&p, 1, TIMEOUT_MS) <= 0)
        return -ETIMEDOUT;
    ssize_t n = recv(sock, &m->hdr, sizeof(m->hdr), MSG_WAITALL);
    if (n == 0)
        return -ECONNRESET;
    if (n != sizeof(m->hdr))
        return n < 0 ? -errno : -EPROTO;
    if (m->hdr.size > sizeof(m->p))
        return -EMSGSIZE;
    if (m->hdr.size && recv(sock, &m->p, m->hdr.size, MSG_WAITALL) != (ssize_t)m->hdr.size)
        return -EPROTO;
    return m->hdr.size;
}

static uint64_t get_u64(uint32_t req)
{
    struct vhost_user_msg m;
    if (send_msg(req, 0, NULL, 0, NULL, 0) < 0 || recv_reply(&m) != 8)
        die("get_u64");
    return m.p.u64;
}

/* With REPLY_ACK: send and wait for the ack; returns the ack value. */
static int64_t send_ack(uint32_t req, const void *p, uint32_t size, const int *fds, int nfds)
{
    struct vhost_user_msg m;
    int r = send_msg(req, VHOST_USER_NEED_REPLY, p, size, fds, nfds);
    if (r < 0)
        return r;
    r = recv_reply(&m);
    if (r < 0)
        return r;
    return r == 8 ? (int64_t)m.p.u64 : -EPROTO;
}

static void set_u64(uint32_t req, uint64_t v)
{
    if (send_ack(req, &v, 8, NULL, 0) != 0)
        die("set_u64");
}

static void connect_sock(const char *path)
{
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
    sock = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(sock, (struct sockaddr *)&a, sizeof(a)) < 0)
        die("connect");
}

static void handshake(void)
{
    uint64_t want = 1ull << VIRTIO_F_VERSION_1 | 1ull << VIRTIO_F_EVENT_IDX |
                    1ull << VIRTIO_F_INDIRECT_DESC | 1ull << VHOST_USER_F_PROTOCOL_FEATURES |
                    1ull << VIRTIO_BLK_F_FLUSH | 1ull << VIRTIO_BLK_F_BLK_SIZE |
                    1ull << VIRTIO_BLK_F_MQ | 1ull << VIRTIO_BLK_F_RO |
                    1ull << VIRTIO_BLK_F_DISCARD | 1ull << VIRTIO_BLK_F_WRITE_ZEROES |
                    1ull << VIRTIO_BLK_F_SEG_MAX | 1ull << VIRTIO_BLK_F_CONFIG_WCE;
    uint64_t pf;
    struct vhost_user_msg m;

    features = get_u64(VHOST_USER_GET_FEATURES);
    pf = get_u64(VHOST_USER_GET_PROTOCOL_FEATURES);
    pf &= 1ull << VHOST_USER_PROTOCOL_F_MQ | 1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK |
          1ull << VHOST_USER_PROTOCOL_F_CONFIG;
    if (send_msg(VHOST_USER_SET_PROTOCOL_FEATURES, 0, &pf, 8, NULL, 0) < 0)
        die("set protocol features");
    if (!(pf & (1ull << VHOST_USER_PROTOCOL_F_REPLY_ACK)))
        die("server lacks REPLY_ACK");
    uint64_t maxq = get_u64(VHOST_USER_GET_QUEUE_NUM);
    if (nq > maxq) {
        printf("{\"error\": \"too many queues\", \"max\": %llu}\n", (unsigned long long)maxq);
        exit(3);
    }
    if (send_ack(VHOST_USER_SET_OWNER, NULL, 0, NULL, 0) != 0)
        die("set owner");
    struct vhost_user_config c = { .offset = 0, .size = sizeof(cfg) };
    if (send_msg(VHOST_USER_GET_CONFIG, 0, &c, 12 + sizeof(cfg), NULL, 0) < 0 ||
        recv_reply(&m) != (int)(12 + sizeof(cfg)))
        die("get config");
    memcpy(&cfg, m.p.config.region, sizeof(cfg));
    features &= want;
    set_u64(VHOST_USER_SET_FEATURES, features);
}

static void send_mem_table(const char *what)
{
    struct vhost_user_mem_table t = { .nregions = 1 };
    t.regions[0] = (struct vhost_user_mem_region){ 0, MEM_SIZE, (uintptr_t)mem, 0 };
    if (send_ack(VHOST_USER_SET_MEM_TABLE, &t, 8 + sizeof(t.regions[0]), &memfd, 1) != 0)
        die(what);
}

static void setup_mem(void)
{
    memfd = memfd_create("vub-guest", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, MEM_SIZE) < 0)
        die("memfd");
    mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (mem == MAP_FAILED)
        die("mmap");
    send_mem_table("set mem table");
}

static uint64_t gpa(const void *p) { return (const uint8_t *)p - mem; }

/* Ring i's size, where it starts (its avail index) and its addresses;
 * its call and kick fds follow (the kick starts it). */
static void program_ring(unsigned i, uint16_t base)
{
    struct q *q = &qs[i];
    struct vhost_user_vring_state s = { i, qsize };
    if (send_ack(VHOST_USER_SET_VRING_NUM, &s, 8, NULL, 0) != 0)
        die("vring num");
    s.num = base;
    if (send_ack(VHOST_USER_SET_VRING_BASE, &s, 8, NULL, 0) != 0)
        die("vring base");
    struct vhost_user_vring_addr a = { i, 0, (uintptr_t)q->desc, (uintptr_t)q->used,
                                       (uintptr_t)q->avail, 0 };
    if (send_ack(VHOST_USER_SET_VRING_ADDR, &a, sizeof(a), NULL, 0) != 0)
        die("vring addr");
}

static void setup_queue(unsigned i)
{
    struct q *q = &qs[i];
    uint8_t *base = mem + (uint64_t)i * (RING_AREA / 64);
    q->desc = (void *)base;
    q->avail = (void *)(base + 16 * qsize);
    q->used = (void *)(base + ((16 * qsize + 6 + 2 * qsize + 4095) & ~4095u));
    q->kick = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    q->call = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    program_ring(i, 0);
    uint64_t v = i;
    if (send_ack(VHOST_USER_SET_VRING_CALL, &v, 8, &q->call, 1) != 0)
        die("vring call");
    if (send_ack(VHOST_USER_SET_VRING_KICK, &v, 8, &q->kick, 1) != 0)
        die("vring kick");
    struct vhost_user_vring_state s = { i, 1 };
    if (send_ack(VHOST_USER_SET_VRING_ENABLE, &s, 8, NULL, 0) != 0)
        die("vring enable");
}

static void start(const char *path)
{
    connect_sock(path);
    handshake();
    setup_mem();
    for (unsigned i = 0; i < nq; i++)
        setup_queue(i);
}

/* ---- requests ------------------------------------------------------------------------ */

/* Buffers: each slot has a header, a status byte and room for data. */
#define DATA_AREA (RING_AREA)
#define SLOT_HDR(i) (mem + DATA_AREA + (i) * 64)
#define DATA(i, bs) (mem + DATA_AREA + (1u << 20) + (uint64_t)(i) * (bs))

static void publish(struct q *q, uint16_t head)
{
    q->avail->ring[q->avail_idx % qsize] = head;
    q->avail_idx++;
    __atomic_store_n(&q->avail->idx, q->avail_idx, __ATOMIC_RELEASE);
}

static void kick(struct q *q)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    eventfd_write(q->kick, 1);
}

/* Build a request in ring slot r (3 descriptors from 3*r, or 1 indirect at
 * r) using buffer slot b; returns the head. */
static uint16_t build(struct q *q, unsigned r, unsigned b, uint32_t type, uint64_t sector,
                      uint8_t *data, uint32_t len)
{
    struct virtio_blk_outhdr *h = (void *)SLOT_HDR(b);
    uint8_t *status = SLOT_HDR(b) + 32;
    struct vring_desc *t = q->desc;
    unsigned d = (r * 3) % qsize, n = 0, i = r;
    struct vring_desc chain[3];

    h->type = type;
    h->ioprio = 0;
    h->sector = sector;
    *status = 0xff;
    chain[n++] = (struct vring_desc){ gpa(h), sizeof(*h), VRING_DESC_F_NEXT, 0 };
    if (len)
        chain[n++] = (struct vring_desc){ gpa(data), len,
            VRING_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID ?
                                 VRING_DESC_F_WRITE : 0), 0 };
    chain[n++] = (struct vring_desc){ gpa(status), 1, VRING_DESC_F_WRITE, 0 };
    if (use_indirect) {
        struct vring_desc *it = (void *)(SLOT_HDR(b) + 0x40000);  /* indirect tables */
        for (unsigned k = 0; k < n; k++) {
            it[k] = chain[k];
            it[k].next = k + 1;
        }
        t[i % qsize] = (struct vring_desc){ gpa(it), n * 16, VRING_DESC_F_INDIRECT, 0 };
        return i % qsize;
    }
    for (unsigned k = 0; k < n; k++) {
        t[(d + k) % qsize] = chain[k];
        t[(d + k) % qsize].next = (d + k + 1) % qsize;
    }
    return d;
}

/* Wait for used entries; returns count harvested into heads[], or -1 if
 * the server went away / timed out. */
static int harvest(struct q *q, uint32_t *ids, int max, int timeout_ms)
{
    for (;;) {
        uint16_t uidx = __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE);
        int n = 0;
        while (q->used_seen != uidx && n < max) {
            ids[n++] = q->used->ring[q->used_seen % qsize].id;
            q->used_seen++;
        }
        if (n)
            return n;
        /* EVENT_IDX: ask for an interrupt at the next used entry */
        *(volatile uint16_t *)&q->avail->ring[qsize] = q->used_seen;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE) != q->used_seen)
            continue;
        struct pollfd p[2] = { { q->call, POLLIN, 0 }, { sock, POLLIN, 0 } };
        int r = poll(p, 2, timeout_ms);
        if (r <= 0)
            return -1;
        if (p[0].revents) {
            eventfd_t v;
            eventfd_read(q->call, &v);
        } else if (p[1].revents) {
            char c;
            if (recv(sock, &c, 1, MSG_PEEK | MSG_DONTWAIT) <= 0) {
                /* disconnected: whatever it completed before is still there */
                if (__atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE) != q->used_seen)
                    continue;
                return -1;
            }
        }
    }
}

/* One request, synchronously; returns the status byte or -1. */
static int one_req(uint32_t type, uint64_t sector, uint8_t *data, uint32_t len)
{
    struct q *q = &qs[0];
    uint32_t id;
    publish(q, build(q, 0, 0, type, sector, data, len));
    kick(q);
    if (harvest(q, &id, 1, TIMEOUT_MS) != 1)
        return -1;
    return *(SLOT_HDR(0) + 32);
}

static void fill(uint8_t *p, uint64_t len, uint64_t seed)
{
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    for (uint64_t i = 0; i < len; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        p[i] = x;
    }
}

static int cmd_info(void)
{
    printf("{\"features\": %llu, \"capacity\": %llu, \"blk_size\": %u, \"seg_max\": %u, "
           "\"num_queues\": %u, \"wce\": %u, \"ro\": %d, \"max_discard_sectors\": %u, "
           "\"max_write_zeroes_sectors\": %u, \"discard_sector_alignment\": %u, "
           "\"min_io_size\": %u, \"opt_io_size\": %u}\n",
           (unsigned long long)features, (unsigned long long)cfg.capacity, cfg.blk_size,
           cfg.seg_max, cfg.num_queues, cfg.wce, !!(features & (1ull << VIRTIO_BLK_F_RO)),
           cfg.max_discard_sectors, cfg.max_write_zeroes_sectors,
           cfg.discard_sector_alignment, cfg.min_io_size, cfg.opt_io_size);
    return 0;
}

static int cmd_rw(bool write, uint64_t off, uint32_t len, uint64_t seed)
{
    uint8_t *buf = DATA(0, 0);
    if (len > (32u << 20))
        die("len too large");
    if (write)
        fill(buf, len, seed);
    int st = one_req(write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, off / 512, buf, len);
    if (!write && st == 0) {
        fwrite(buf, 1, len, stdout);
        return 0;
    }
    fprintf(write ? stdout : stderr, "{\"status\": %d}\n", st);
    return 0;
}

static int cmd_req(uint32_t type, uint64_t sector, uint32_t len)
{
    uint8_t *buf = DATA(0, 0);
    memset(buf, 0, len);
    if (type == VIRTIO_BLK_T_DISCARD || type == VIRTIO_BLK_T_WRITE_ZEROES) {
        /* len = number of sectors, flags from the environment */
        struct virtio_blk_discard_write_zeroes *s = (void *)buf;
        const char *fl = getenv("VUB_FLAGS");
        s->sector = sector;
        s->num_sectors = len;
        s->flags = fl ? strtoul(fl, NULL, 0) : 0;
        sector = 0;
        len = sizeof(*s);
    }
    int st = one_req(type, sector, buf, len);
    printf("{\"status\": %d", st);
    if (type == VIRTIO_BLK_T_GET_ID && st == 0)
        printf(", \"id\": \"%.20s\"", (char *)buf);
    printf("}\n");
    return 0;
}

/* A READ left in flight: submitted with a GET_ID behind it, it is known to
 * be in the server's hands once the GET_ID (which no block layer delays)
 * has completed.  Prints {"submitted": true}, then the READ's status
 * (-1: the server dropped us without completing it). */
static int cmd_inflight(uint64_t off, uint32_t len)
{
    struct q *q = &qs[0];
    uint16_t rd = build(q, 0, 0, VIRTIO_BLK_T_IN, off / 512, DATA(0, 0), len);
    uint16_t id = build(q, 1, 1, VIRTIO_BLK_T_GET_ID, 0, DATA(1, len), 20);
    bool read_done = false, id_done = false;
    uint32_t heads[2];

    publish(q, rd);
    publish(q, id);
    kick(q);
    while (!id_done) {
        int n = harvest(q, heads, 2, TIMEOUT_MS);
        if (n < 0) {
            printf("{\"submitted\": false}\n");
            return 0;
        }
        for (int i = 0; i < n; i++) {
            read_done |= heads[i] == rd;
            id_done |= heads[i] == id;
        }
    }
    printf("{\"submitted\": true}\n");
    while (!read_done) {
        int n = harvest(q, heads, 2, 30000);
        if (n < 0) {
            printf("{\"status\": -1}\n");
            return 0;
        }
        for (int i = 0; i < n; i++)
            read_done |= heads[i] == rd;
    }
    printf("{\"status\": %d}\n", *(SLOT_HDR(0) + 32));
    return 0;
}

/* ---- hostile rings ------------------------------------------------------------------------ */

/* After a hostile request: did the server complete the head, and is it still
 * talking to us?  Prints {"completed": bool, "status": n, "connected": bool}. */
static int report_hostile(struct q *q, uint8_t *status)
{
    uint32_t id;
    int n = harvest(q, &id, 1, 2000);
    char c;
    struct pollfd p = { sock, POLLIN, 0 };
    bool connected = true;
    if (poll(&p, 1, n == 1 ? 200 : 0) > 0 && recv(sock, &c, 1, MSG_PEEK | MSG_DONTWAIT) <= 0)
        connected = false;
    printf("{\"completed\": %s, \"status\": %d, \"connected\": %s}\n", n == 1 ? "true" : "false",
           status ? *status : -1, connected ? "true" : "false");
    return 0;
}

static int cmd_hostile(const char *kind)
{
    const char *qn = getenv("VUB_QUEUE");   /* the queue to break, default 0 */
    struct q *q = &qs[qn && (unsigned)atoi(qn) < nq ? atoi(qn) : 0];
    struct vring_desc *t = q->desc;
    uint8_t *h = SLOT_HDR(0), *status = h + 32;
    struct virtio_blk_outhdr *oh = (void *)h;
    uint8_t *data = DATA(0, 0);

    oh->type = VIRTIO_BLK_T_IN;
    oh->sector = 0;
    *status = 0xff;
    t[0] = (struct vring_desc){ gpa(h), 16, VRING_DESC_F_NEXT, 1 };
    t[1] = (struct vring_desc){ gpa(data), 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2 };
    t[2] = (struct vring_desc){ gpa(status), 1, VRING_DESC_F_WRITE, 0 };
    uint16_t head = 0;

    if (!strcmp(kind, "desc-oob")) {
        t[1].addr = MEM_SIZE - 100;      /* crosses the end of guest memory */
    } else if (!strcmp(kind, "desc-far")) {
        t[1].addr = 1ull << 62;
    } else if (!strcmp(kind, "loop")) {
        t[2].flags |= VRING_DESC_F_NEXT;
        t[2].next = 1;
    } else if (!strcmp(kind, "next-oob")) {
        t[1].next = qsize + 5;
    } else if (!strcmp(kind, "long-chain")) {
        for (unsigned i = 0; i < qsize; i++)
            t[i] = (struct vring_desc){ gpa(data), 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                                        (i + 1) % qsize };
        t[0] = (struct vring_desc){ gpa(h), 16, VRING_DESC_F_NEXT, 1 };
    } else if (!strcmp(kind, "short-header")) {
        t[0].len = 8;
    } else if (!strcmp(kind, "no-status")) {
        t[1].flags &= ~VRING_DESC_F_NEXT;     /* no in-header at all: data is last */
        t[1].flags &= ~VRING_DESC_F_WRITE;
    } else if (!strcmp(kind, "unknown-type")) {
        oh->type = 0x1234;
    } else if (!strcmp(kind, "read-after-write")) {
        t[1].flags &= ~VRING_DESC_F_WRITE;
        t[0].flags |= VRING_DESC_F_WRITE;
    } else if (!strcmp(kind, "head-oob")) {
        head = qsize + 1;
    } else if (!strcmp(kind, "avail-jump")) {
        q->avail_idx += qsize + 10;
    } else if (!strcmp(kind, "indirect-bad-len")) {
        struct vring_desc *it = (void *)(h + 0x40000);
        memcpy(it, t, 48);
        t[0] = (struct vring_desc){ gpa(it), 47, VRING_DESC_F_INDIRECT, 0 };
    } else if (!strcmp(kind, "indirect-oob")) {
        t[0] = (struct vring_desc){ MEM_SIZE - 16, 48, VRING_DESC_F_INDIRECT, 0 };
    } else if (!strcmp(kind, "indirect-nested")) {
        struct vring_desc *it = (void *)(h + 0x40000);
        it[0] = (struct vring_desc){ gpa(it), 16, VRING_DESC_F_INDIRECT, 0 };
        t[0] = (struct vring_desc){ gpa(it), 16, VRING_DESC_F_INDIRECT, 0 };
    } else if (!strcmp(kind, "indirect-loop")) {
        struct vring_desc *it = (void *)(h + 0x40000);
        memcpy(it, t, 48);
        it[2].flags |= VRING_DESC_F_NEXT;
        it[2].next = 0;
        t[0] = (struct vring_desc){ gpa(it), 48, VRING_DESC_F_INDIRECT, 0 };
    } else if (!strcmp(kind, "out-of-range")) {
        oh->sector = cfg.capacity;           /* one past the end */
    } else if (!strcmp(kind, "misaligned")) {
        oh->sector = 1;                      /* not lbs-aligned when lbs > 512 */
    } else {
        die("unknown hostile kind");
    }
    publish(q, head);
    kick(q);
    return report_hostile(q, status);
}

/* ---- malformed messages ---------------------------------------------------------------------- */

static int cmd_badmsg(const char *kind)
{
    struct vhost_user_msg m;
    int64_t r = 0;
    uint64_t v = 0;

    if (!strcmp(kind, "unknown")) {
        r = send_ack(200, &v, 8, NULL, 0);
    } else if (!strcmp(kind, "wrong-size")) {
        r = send_ack(VHOST_USER_SET_VRING_NUM, &v, 4, NULL, 0);
    } else if (!strcmp(kind, "missing-fd")) {
        r = send_ack(VHOST_USER_SET_VRING_KICK, &v, 8, NULL, 0);
    } else if (!strcmp(kind, "mem-no-fds")) {
        struct vhost_user_mem_table t = { .nregions = 1 };
        t.regions[0] = (struct vhost_user_mem_region){ 0, MEM_SIZE, 0, 0 };
        r = send_ack(VHOST_USER_SET_MEM_TABLE, &t, 40, NULL, 0);
    } else if (!strcmp(kind, "mem-too-big")) {
        struct vhost_user_mem_table t = { .nregions = 1 };
        t.regions[0] = (struct vhost_user_mem_region){ 0, 1ull << 50, 0, 0 };
        r = send_ack(VHOST_USER_SET_MEM_TABLE, &t, 40, &memfd, 1);
    } else if (!strcmp(kind, "vring-index")) {
        struct vhost_user_vring_state s = { 5000, 128 };
        r = send_ack(VHOST_USER_SET_VRING_NUM, &s, 8, NULL, 0);
    } else if (!strcmp(kind, "vring-num")) {
        struct vhost_user_vring_state s = { 0, 100 };
        r = send_ack(VHOST_USER_SET_VRING_NUM, &s, 8, NULL, 0);
    } else if (!strcmp(kind, "vring-addr-oob")) {
        struct vhost_user_vring_addr a = { 0, 0, 12345, 12345, 12345, 0 };
        r = send_ack(VHOST_USER_SET_VRING_ADDR, &a, sizeof(a), NULL, 0);
    } else if (!strcmp(kind, "oversize")) {
        r = send_msg(VHOST_USER_SET_FEATURES, 0, NULL, 100000, NULL, 0);
        if (r == 0)
            r = recv_reply(&m);
    } else if (!strcmp(kind, "bad-version")) {
        struct vhost_user_hdr hh = { VHOST_USER_GET_FEATURES, 0x2, 0 };
        r = send(sock, &hh, sizeof(hh), MSG_NOSIGNAL);
        r = r < 0 ? -errno : recv_reply(&m);
    } else if (!strcmp(kind, "config-big")) {
        struct vhost_user_config c = { .offset = 0, .size = 1000 };
        r = send_msg(VHOST_USER_GET_CONFIG, 0, &c, 12, NULL, 0);
        r = r < 0 ? r : recv_reply(&m);
    } else {
        die("unknown badmsg kind");
    }
    /* Is the connection still usable?  A GET_FEATURES round trip says. */
    bool alive = send_msg(VHOST_USER_GET_FEATURES, 0, NULL, 0, NULL, 0) == 0 &&
                 recv_reply(&m) == 8;
    printf("{\"result\": %lld, \"connected\": %s}\n", (long long)r, alive ? "true" : "false");
    return 0;
}

/* ---- verified I/O ------------------------------------------------------------------------------ */

/* 64 KiB writes of a pattern each, cycling over the first 4 MiB, every one
 * read back and compared, until secs have passed.  Exit 2 (die) at the
 * first failed request or wrong byte; the last pattern of each block is
 * printed ("seeds", fill()'s) so the caller can check the image afterwards. */
static double now_s(void);

static int cmd_verify(double secs)
{
    enum { BS = 65536, NBLK = 64 };
    uint8_t *wbuf = DATA(0, BS), *rbuf = DATA(1, BS);
    uint64_t seeds[NBLK] = { 0 }, k = 0;
    double t0 = now_s();

    if (cfg.capacity * 512 < (uint64_t)BS * NBLK)
        die("verify: the disk is smaller than 4 MiB");
    printf("{\"started\": true}\n");
    for (; now_s() - t0 < secs; k++) {
        unsigned blk = k % NBLK;
        fill(wbuf, BS, k + 1);
        if (one_req(VIRTIO_BLK_T_OUT, blk * (BS / 512), wbuf, BS) != 0)
            die("verify: write failed");
        seeds[blk] = k + 1;
        memset(rbuf, 0, BS);
        if (one_req(VIRTIO_BLK_T_IN, blk * (BS / 512), rbuf, BS) != 0)
            die("verify: read failed");
        if (memcmp(wbuf, rbuf, BS))
            die("verify: read back wrong data");
    }
    printf("{\"ios\": %llu, \"seeds\": [", (unsigned long long)k * 2);
    for (unsigned i = 0; i < NBLK; i++)
        printf("%s%llu", i ? ", " : "", (unsigned long long)seeds[i]);
    printf("]}\n");
    return 0;
}

/* ---- verified I/O on every queue ----------------------------------------------------------- */

/* Wait until every queue has had n completions; count bad statuses. */
static int wait_all(unsigned n, unsigned depth, uint64_t *failed)
{
    for (unsigned qi = 0; qi < nq; qi++) {
        unsigned got = 0;
        while (got < n) {
            uint32_t ids[256];
            int k = harvest(&qs[qi], ids, 256, TIMEOUT_MS);
            if (k < 0)
                return -1;
            for (int j = 0; j < k; j++) {
                unsigned i = use_indirect ? ids[j] : ids[j] / 3;
                if (i >= depth || *(SLOT_HDR(qi * depth + i) + 32) != 0)
                    (*failed)++;
            }
            got += k;
        }
    }
    return 0;
}

/* Stop every ring while its requests are in flight (GET_VRING_BASE is
 * answered once the ring drained), hand the memory table over again and
 * restart the rings where they stopped, as QEMU does around a stop/cont.
 * Returns the number of rings stopped before they popped all we queued
 * (they go on from their base after the restart). */
static unsigned restart_queues(void)
{
    struct vhost_user_msg m;
    unsigned early = 0;
    uint16_t base[64];

    for (unsigned i = 0; i < nq; i++) {
        struct vhost_user_vring_state s = { i, 0 };
        if (send_msg(VHOST_USER_GET_VRING_BASE, 0, &s, 8, NULL, 0) < 0 || recv_reply(&m) != 8)
            die("get vring base");
        if (m.p.state.index != i || m.p.state.num > 0xffff ||
            (uint16_t)(qs[i].avail_idx - m.p.state.num) > qsize)
            die("get vring base: bad answer");
        base[i] = m.p.state.num;
        early += base[i] != qs[i].avail_idx;
    }
    send_mem_table("set mem table again");
    for (unsigned i = 0; i < nq; i++) {
        program_ring(i, base[i]);
        uint64_t v = i;
        if (send_ack(VHOST_USER_SET_VRING_KICK, &v, 8, &qs[i].kick, 1) != 0)
            die("vring kick");
    }
    return early;
}

static int cmd_mqverify(uint32_t bs, unsigned depth, unsigned rounds, int hold_fd)
{
    bool cycle = getenv("VUB_CYCLE") != NULL;
    unsigned restarts = 0, early = 0;
    uint64_t nblk = cfg.capacity * 512 / bs, failed = 0, bad = 0, checked = 0;
    unsigned total = depth * nq;
    uint8_t *want = malloc(bs);

    if (!want || !nblk || depth * 3 > qsize || bs % 512 ||
        (uint64_t)total * bs > MEM_SIZE - DATA_AREA - (2u << 20))
        die("mqverify: depth or block size too large for the ring or memory");
    for (unsigned r = 0; r < rounds; r++) {
        /* every queue writes its blocks, all at once */
        for (unsigned qi = 0; qi < nq; qi++) {
            for (unsigned i = 0; i < depth; i++) {
                unsigned b = qi * depth + i;
                uint64_t blk = ((uint64_t)r * total + b) % nblk;
                fill(DATA(b, bs), bs, (uint64_t)r << 32 | b);
                publish(&qs[qi], build(&qs[qi], i, b, VIRTIO_BLK_T_OUT, blk * bs / 512,
                                       DATA(b, bs), bs));
            }
        }
        for (unsigned qi = 0; qi < nq; qi++)
            kick(&qs[qi]);
        if (cycle) {
            /* the writes are in flight: the rings stop only once they completed */
            early += restart_queues();
            restarts++;
        }
        if (wait_all(depth, depth, &failed) < 0)
            die("mqverify: server stopped answering");
        /* then reads back the blocks the next queue wrote */
        for (unsigned qi = 0; qi < nq; qi++) {
            for (unsigned i = 0; i < depth; i++) {
                unsigned b = qi * depth + i, src = ((qi + 1) % nq) * depth + i;
                uint64_t blk = ((uint64_t)r * total + src) % nblk;
                memset(DATA(b, bs), 0, bs);
                publish(&qs[qi], build(&qs[qi], i, b, VIRTIO_BLK_T_IN, blk * bs / 512,
                                       DATA(b, bs), bs));
            }
        }
        for (unsigned qi = 0; qi < nq; qi++)
            kick(&qs[qi]);
        if (wait_all(depth, depth, &failed) < 0)
            die("mqverify: server stopped answering");
        for (unsigned qi = 0; qi < nq; qi++) {
            for (unsigned i = 0; i < depth; i++) {
                unsigned b = qi * depth + i, src = ((qi + 1) % nq) * depth + i;
                fill(want, bs, (uint64_t)r << 32 | src);
                bad += memcmp(want, DATA(b, bs), bs) != 0;
                checked++;
            }
        }
        if (r == 0 && hold_fd >= 0) {
            /* "ready" and the eventfd-id of every kick fd (Linux 6.8+, else -1):
             * the test finds which of the server's loops watches each */
            char line[64 * 24] = "ready", c;
            for (unsigned qi = 0; qi < nq; qi++) {
                char path[64], buf[512];
                long id = -1;
                snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", qs[qi].kick);
                FILE *f = fopen(path, "r");
                while (f && fgets(buf, sizeof(buf), f))
                    sscanf(buf, "eventfd-id: %ld", &id);
                if (f)
                    fclose(f);
                snprintf(line + strlen(line), sizeof(line) - strlen(line), " %ld", id);
            }
            strcat(line, "\n");
            if (write(hold_fd, line, strlen(line)) != (ssize_t)strlen(line) || read(0, &c, 1) < 0)
                die("mqverify: hold");
        }
    }
    free(want);
    printf("{\"rounds\": %u, \"queues\": %u, \"checked\": %llu, \"mismatches\": %llu, "
           "\"failed\": %llu, \"restarts\": %u, \"stopped_early\": %u}\n", rounds, nq,
           (unsigned long long)checked, (unsigned long long)bad, (unsigned long long)failed,
           restarts, early);
    return 0;
}

/* ---- benchmark ------------------------------------------------------------------------------ */

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double proc_cpu_s(int pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    unsigned long ut = 0, st = 0;
    if (p)
        sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st);
    return (ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static uint16_t avail_event(struct q *q)
{
    uint16_t v;
    memcpy(&v, &q->used->ring[qsize], sizeof(v));
    return v;
}

static int cmd_bench(const char *rw, uint32_t bs, unsigned depth, double secs, int pid)
{
    uint64_t cap = cfg.capacity * 512, span = cap / bs, seq = 0, done = 0;
    bool write = !strcmp(rw, "write") || !strcmp(rw, "randwrite");
    bool rnd = !strncmp(rw, "rand", 4);
    unsigned per_q = depth, total = depth * nq;
    uint64_t x = 88172645463325252ull;

    if (per_q * (use_indirect ? 1 : 3) > qsize || per_q > 4096 ||
        (uint64_t)total * bs > MEM_SIZE - DATA_AREA - (1u << 20) - (1u << 20))
        die("depth too large for the ring or memory");
    double c0 = pid ? proc_cpu_s(pid) : 0, t0 = now_s(), t1;
    for (unsigned qi = 0; qi < nq; qi++)
        for (unsigned i = 0; i < per_q; i++) {
            uint64_t blk = rnd ? (x ^= x << 13, x ^= x >> 7, x ^= x << 17, x % span) : seq++ % span;
            struct q *q = &qs[qi];
            publish(q, build(q, i, qi * per_q + i, write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, blk * bs / 512,
                             DATA(qi * per_q + i, bs), bs));
        }
    for (unsigned qi = 0; qi < nq; qi++)
        kick(&qs[qi]);
    printf("{\"started\": true}\n");
    for (uint64_t before = done, idle = 0;; idle = done == before, before = done) {
        t1 = now_s();
        if (t1 - t0 >= secs)
            break;
        if (nq > 1 && idle) {
            /* nothing on any queue last pass: sleep on every call fd */
            struct pollfd p[65];
            for (unsigned qi = 0; qi < nq; qi++)
                p[qi] = (struct pollfd){ qs[qi].call, POLLIN, 0 };
            p[nq] = (struct pollfd){ sock, POLLIN, 0 };
            int pr = poll(p, nq + 1, TIMEOUT_MS);
            if (pr <= 0 || p[nq].revents) {
                for (unsigned qi = 0; qi < nq; qi++)
                    fprintf(stderr, "q%u: avail %u used %u seen %u used_event %u avail_event %u\n", qi,
                            qs[qi].avail_idx, qs[qi].used->idx, qs[qi].used_seen,
                            qs[qi].avail->ring[qsize], avail_event(&qs[qi]));
                die(pr <= 0 ? "bench: server stopped answering (timeout)" : "bench: server closed the connection");
            }
        }
        for (unsigned qi = 0; qi < nq; qi++) {
            struct q *q = &qs[qi];
            uint32_t ids[256];
            int n = harvest(q, ids, 256, nq > 1 ? 0 : TIMEOUT_MS);
            if (n < 0) {
                if (nq > 1)
                    continue;
                die("bench: server stopped answering");
            }
            for (int k = 0; k < n; k++) {
                unsigned i = use_indirect ? ids[k] : ids[k] / 3;
                if (*(SLOT_HDR(qi * per_q + i) + 32) != 0)
                    die("bench: request failed");
                uint64_t blk = rnd ? (x ^= x << 13, x ^= x >> 7, x ^= x << 17, x % span) : seq++ % span;
                publish(q, build(q, i, qi * per_q + i, write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, blk * bs / 512,
                                 DATA(qi * per_q + i, bs), bs));
            }
            done += n;
            if (n)
                kick(q);
        }
    }
    double cpu = pid ? proc_cpu_s(pid) - c0 : 0, el = t1 - t0;
    /* every queue has per_q requests in flight: wait for them (-d) */
    for (unsigned qi = 0; drain_at_end && qi < nq; qi++)
        for (unsigned left = per_q; left;) {
            uint32_t ids[256];
            int n = harvest(&qs[qi], ids, 256, TIMEOUT_MS);
            if (n < 0)
                die("bench: server stopped answering while draining");
            left = (unsigned)n >= left ? 0 : left - n;
        }
    printf("{\"rw\": \"%s\", \"bs\": %u, \"depth\": %u, \"queues\": %u, \"ios\": %llu, "
           "\"seconds\": %.3f, \"iops\": %.0f, \"MiBps\": %.1f, \"server_cpu_s\": %.3f, "
           "\"server_us_per_io\": %.2f}\n",
           rw, bs, depth, nq, (unsigned long long)done, el, done / el,
           done * (double)bs / el / 1048576, cpu, done ? cpu * 1e6 / done : 0);
    return 0;
}

int main(int argc, char **argv)
{
    int opt;
    while ((opt = getopt(argc, argv, "q:n:id")) != -1) {
        if (opt == 'q')
            nq = atoi(optarg);
        else if (opt == 'n')
            qsize = atoi(optarg);
        else if (opt == 'i')
            use_indirect = true;
        else if (opt == 'd')
            drain_at_end = true;
        else
            return 2;
    }
    /* a queue's rings live in RING_AREA / 64 (128 KiB): up to 4096 entries */
    if (argc - optind < 2 || nq < 1 || nq > 64 || qsize < 8 || qsize > 4096 || (qsize & (qsize - 1))) {
        fprintf(stderr, "usage: vub-client [-q N] [-n N] [-i] [-d] SOCK CMD ARGS...\n");
        return 2;
    }
    const char *path = argv[optind], *cmd = argv[optind + 1];
    char **a = argv + optind + 2;
    int na = argc - optind - 2;
    setvbuf(stdout, NULL, _IOLBF, 0);

    if (!strcmp(cmd, "badmsg") && na >= 1 && strcmp(a[0], "vring-addr-oob") &&
        strcmp(a[0], "mem-too-big")) {
        connect_sock(path);
        handshake();
        return cmd_badmsg(a[0]);
    }
    start(path);
    if (!strcmp(cmd, "info"))
        return cmd_info();
    if (!strcmp(cmd, "write") && na >= 3)
        return cmd_rw(true, strtoull(a[0], 0, 0), strtoul(a[1], 0, 0), strtoull(a[2], 0, 0));
    if (!strcmp(cmd, "read") && na >= 2)
        return cmd_rw(false, strtoull(a[0], 0, 0), strtoul(a[1], 0, 0), 0);
    if (!strcmp(cmd, "req") && na >= 1)
        return cmd_req(strtoul(a[0], 0, 0), na > 1 ? strtoull(a[1], 0, 0) : 0,
                       na > 2 ? strtoul(a[2], 0, 0) : 0);
    if (!strcmp(cmd, "inflight") && na >= 2)
        return cmd_inflight(strtoull(a[0], 0, 0), strtoul(a[1], 0, 0));
    if (!strcmp(cmd, "hostile") && na >= 1)
        return cmd_hostile(a[0]);
    if (!strcmp(cmd, "badmsg") && na >= 1)
        return cmd_badmsg(a[0]);
    if (!strcmp(cmd, "mqverify") && na >= 3)
        return cmd_mqverify(strtoul(a[0], 0, 0), strtoul(a[1], 0, 0), strtoul(a[2], 0, 0),
                            na > 3 ? atoi(a[3]) : -1);
    if (!strcmp(cmd, "verify") && na >= 1)
        return cmd_verify(atof(a[0]));
    if (!strcmp(cmd, "bench") && na >= 4)
        return cmd_bench(a[0], strtoul(a[1], 0, 0), strtoul(a[2], 0, 0), atof(a[3]),
                         na > 4 ? atoi(a[4]) : 0);
    fprintf(stderr, "vub-client: bad command\n");
    return 2;
}
