/*
 * A light NBD load generator for bench/disk_bench.py's "nbdc" transport:
 * the NBD counterpart of tests/vhost/vub-client's bench mode.  fio's nbd
 * engine (libnbd) spends 11-16 us of CPU per 4k request on this machine,
 * more than the whole limit row, so on two CPUs its rows measure the
 * client.  This client keeps QD requests in flight over one connection
 * with one thread and no library: replies are received in bulk into one
 * buffer and parsed there, and every request issued in a turn goes out in
 * one sendmsg, so a request costs it a fraction of a system call.  It
 * measures what the server can do when the client is cheap, as a guest's
 * kernel or QEMU client with spare cores would be.
 *
 *   nbd-load-client [-e NAME] [-s SIZE] [-F] [-b] SOCKET RW BS QD SECONDS
 *
 * SOCKET is a UNIX socket path; RW is read, write, randread or randwrite;
 * BS the request size in bytes; QD the requests in flight; SIZE limits the
 * rows to the export's first SIZE bytes; -F sets NBD_CMD_FLAG_FUA on every
 * write (durable before its reply); -b never sleeps: it polls the socket
 * without a timeout, as a polling (SPDK-style) client would, which takes a
 * whole CPU but no wake-up per reply.  Fixed newstyle handshake with
 * NBD_OPT_GO and no structured replies (simple replies only, which every
 * server must support).  Read data is received and dropped; written data
 * is one random buffer.  Requests still in flight at the end are waited
 * for and not counted, then NBD_CMD_DISC.
 *
 * Prints one JSON line: {"ios":N,"iops":X,"MiBps":Y,"secs":S,"cpu":C}
 * (C: the client's CPU seconds over the measured interval).  Exit status 1
 * with a message on stderr on any failure, including an NBD error reply.
 *
 * Built by the bench (cc -O2); needs nothing beyond libc.  Not part of the
 * daemon or its tests.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define NBD_OPTS_MAGIC    0x49484156454F5054ull   /* "IHAVEOPT" */
#define NBD_REP_MAGIC     0x0003e889045565a9ull
#define NBD_REQ_MAGIC     0x25609513u
#define NBD_SIMPLE_MAGIC  0x67446698u
#define NBD_OPT_GO        7
#define NBD_REP_ACK       1
#define NBD_REP_INFO      3
#define NBD_INFO_EXPORT   0
#define NBD_CMD_READ      0
#define NBD_CMD_WRITE     1
#define NBD_CMD_DISC      2
#define NBD_CMD_FLAG_FUA  1
#define RBUF_SIZE         (2u << 20)
#define MAX_QD            1024

struct req_hdr {                    /* NBD request, wire layout */
    uint32_t magic;
    uint16_t flags, type;
    uint64_t cookie, offset;
    uint32_t length;
} __attribute__((packed));

static void die(const char *what)
{
    fprintf(stderr, "nbd-load-client: %s%s%s\n", what, errno ? ": " : "",
            errno ? strerror(errno) : "");
    exit(1);
}

static void read_full(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n == 0) {
            errno = 0;
            die("server closed the connection in the handshake");
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("handshake read");
        }
        p += n;
        len -= (size_t)n;
    }
}

static void write_full(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("handshake write");
        }
        p += n;
        len -= (size_t)n;
    }
}

/* Fixed newstyle handshake, NBD_OPT_GO; returns the export size. */
static uint64_t handshake(int fd, const char *name)
{
    char greet[18];
    read_full(fd, greet, sizeof(greet));
    uint64_t opts;
    memcpy(&opts, greet + 8, 8);
    errno = 0;
    if (memcmp(greet, "NBDMAGIC", 8) || be64toh(opts) != NBD_OPTS_MAGIC)
        die("not a newstyle NBD server");
    uint32_t cflags = htobe32(1 | 2);      /* FIXED_NEWSTYLE | NO_ZEROES */
    write_full(fd, &cflags, 4);

    size_t nlen = strlen(name);
    size_t olen = 4 + nlen + 2;
    char *opt = malloc(16 + olen);
    if (!opt)
        die("out of memory");
    uint64_t m = htobe64(NBD_OPTS_MAGIC);
    uint32_t o = htobe32(NBD_OPT_GO), l = htobe32((uint32_t)olen), nl = htobe32((uint32_t)nlen);
    memcpy(opt, &m, 8);
    memcpy(opt + 8, &o, 4);
    memcpy(opt + 12, &l, 4);
    memcpy(opt + 16, &nl, 4);
    memcpy(opt + 20, name, nlen);
    memset(opt + 20 + nlen, 0, 2);        /* no information requests */
    write_full(fd, opt, 16 + olen);
    free(opt);

    uint64_t size = 0;
    for (;;) {
        char rep[20];
        read_full(fd, rep, sizeof(rep));
        uint64_t rm;
        uint32_t type, len;
        memcpy(&rm, rep, 8);
        memcpy(&type, rep + 12, 4);
        memcpy(&len, rep + 16, 4);
        type = be32toh(type);
        len = be32toh(len);
        errno = 0;
        if (be64toh(rm) != NBD_REP_MAGIC || len > 65536)
            die("bad option reply");
        char data[65536];
        read_full(fd, data, len);
        if (type & 0x80000000u) {
            fprintf(stderr, "nbd-load-client: NBD_OPT_GO refused (reply 0x%x): %.*s\n",
                    type, (int)(len > 4 ? len - 4 : 0), data + 4);
            exit(1);
        }
        if (type == NBD_REP_INFO && len >= 12) {
            uint16_t info;
            memcpy(&info, data, 2);
            if (be16toh(info) == NBD_INFO_EXPORT) {
                memcpy(&size, data + 2, 8);
                size = be64toh(size);
            }
        } else if (type == NBD_REP_ACK) {
            break;
        }
    }
    errno = 0;
    if (!size)
        die("the server did not give the export's size");
    return size;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_secs(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

int main(int argc, char **argv)
{
    const char *name = "";
    uint64_t limit = 0;
    int c, fua = 0, busy = 0;
    while ((c = getopt(argc, argv, "e:s:Fb")) != -1) {
        if (c == 'F')
            fua = 1;
        else if (c == 'b')
            busy = 1;
        else if (c == 'e')
            name = optarg;
        else if (c == 's')
            limit = strtoull(optarg, NULL, 0);
        else
            return 2;
    }
    if (argc - optind != 5) {
        fprintf(stderr, "usage: nbd-load-client [-e NAME] [-s SIZE] [-F] [-b] SOCKET "
                        "read|write|randread|randwrite BS QD SECONDS\n");
        return 2;
    }
    const char *path = argv[optind], *rw = argv[optind + 1];
    uint32_t bs = (uint32_t)strtoul(argv[optind + 2], NULL, 0);
    int qd = atoi(argv[optind + 3]);
    double secs = atof(argv[optind + 4]);
    int is_write = !strcmp(rw, "write") || !strcmp(rw, "randwrite");
    int is_rand = !strncmp(rw, "rand", 4);
    errno = 0;
    if ((!is_write && strcmp(rw, "read") && strcmp(rw, "randread")) || !bs ||
        bs > (32u << 20) || qd < 1 || qd > MAX_QD || secs <= 0)
        die("bad arguments");

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (fd < 0 || strlen(path) >= sizeof(sa.sun_path))
        die("socket");
    strcpy(sa.sun_path, path);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        die(path);
    uint64_t size = handshake(fd, name);
    if (limit && limit < size)
        size = limit;
    uint64_t blocks = size / bs;
    errno = 0;
    if (!blocks)
        die("the export is smaller than one request");
    if (fcntl(fd, F_SETFL, O_NONBLOCK) < 0)
        die("fcntl");

    char *wbuf = NULL;
    if (is_write) {
        wbuf = malloc(bs);
        if (!wbuf)
            die("out of memory");
        for (uint32_t i = 0; i < bs; i += 8) {
            uint64_t r = next_rand();
            memcpy(wbuf + i, &r, bs - i < 8 ? bs - i : 8);
        }
    }
    char *rbuf = malloc(RBUF_SIZE);
    struct req_hdr *hdrs = calloc(MAX_QD, sizeof(*hdrs));
    int *free_slots = malloc(MAX_QD * sizeof(int));
    /* requests waiting to be sent, in order, and how far the first has gone */
    int *sendq = malloc(MAX_QD * sizeof(int));
    struct iovec *iov = malloc(2 * MAX_QD * sizeof(*iov));
    if (!rbuf || !hdrs || !free_slots || !sendq || !iov)
        die("out of memory");
    int nfree = qd, nsend = 0, inflight = 0;
    size_t sent_part = 0;
    for (int i = 0; i < qd; i++)
        free_slots[i] = qd - 1 - i;
    uint32_t *slot_len = calloc(MAX_QD, sizeof(uint32_t));
    if (!slot_len)
        die("out of memory");

    uint64_t seq = 0, done = 0;
    size_t rhead = 0, rtail = 0;        /* unparsed bytes in rbuf */
    uint64_t skip = 0;                  /* read payload bytes still to drop */
    double t0 = now(), c0 = cpu_secs(), deadline = t0 + secs, t_end = 0, c_end = 0;
    int stopping = 0, want_poll = 1;
    unsigned turns = 0;

    for (;;) {
        /* issue requests into the free slots */
        while (!stopping && nfree) {
            int s = free_slots[--nfree];
            uint64_t blk = is_rand ? next_rand() % blocks : seq++ % blocks;
            hdrs[s] = (struct req_hdr){
                .magic = htobe32(NBD_REQ_MAGIC),
                .flags = htobe16(is_write && fua ? NBD_CMD_FLAG_FUA : 0),
                .type = htobe16(is_write ? NBD_CMD_WRITE : NBD_CMD_READ),
                .cookie = (uint64_t)s,
                .offset = htobe64(blk * bs),
                .length = htobe32(bs),
            };
            slot_len[s] = bs;
            sendq[nsend++] = s;
            inflight++;
        }
        /* send everything queued in one sendmsg */
        while (nsend) {
            int n = 0;
            size_t skip_bytes = sent_part;
            for (int i = 0; i < nsend && n < 2 * MAX_QD - 1; i++) {
                iov[n++] = (struct iovec){ &hdrs[sendq[i]], sizeof(struct req_hdr) };
                if (is_write)
                    iov[n++] = (struct iovec){ wbuf, bs };
            }
            int first = 0;
            while (skip_bytes) {          /* drop what a partial send already took */
                if (skip_bytes >= iov[first].iov_len) {
                    skip_bytes -= iov[first].iov_len;
                    first++;
                } else {
                    iov[first].iov_base = (char *)iov[first].iov_base + skip_bytes;
                    iov[first].iov_len -= skip_bytes;
                    skip_bytes = 0;
                }
            }
            struct msghdr mh = { .msg_iov = iov + first, .msg_iovlen = (size_t)(n - first) };
            if (mh.msg_iovlen > 1024)
                mh.msg_iovlen = 1024;
            ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN)
                    break;
                die("send");
            }
            /* retire the requests sent whole */
            size_t per = sizeof(struct req_hdr) + (is_write ? bs : 0);
            size_t total = sent_part + (size_t)w;
            int whole = (int)(total / per);
            memmove(sendq, sendq + whole, (size_t)(nsend - whole) * sizeof(int));
            nsend -= whole;
            sent_part = total % per;
        }
        if (!inflight)
            break;
        /* wait only when the last receive drained the socket */
        if (want_poll) {
            struct pollfd p = { fd, POLLIN | (nsend ? POLLOUT : 0), 0 };
            if (poll(&p, 1, busy ? 0 : -1) < 0 && errno != EINTR)
                die("poll");
            if (!(p.revents & (POLLIN | POLLHUP | POLLERR)))
                continue;               /* room to send only */
            want_poll = 0;
        }
        /* receive what is there and parse it */
        size_t room = RBUF_SIZE - rtail;
        ssize_t r = recv(fd, rbuf + rtail, room, 0);
        if (r == 0) {
            errno = 0;
            die("server closed the connection");
        }
        if (r < 0) {
            if (errno == EAGAIN)
                want_poll = 1;
            else if (errno != EINTR)
                die("recv");
            continue;
        }
        if ((size_t)r < room)
            want_poll = 1;
        rtail += (size_t)r;
        turns++;
        for (;;) {
            if (skip) {
                uint64_t take = rtail - rhead < skip ? rtail - rhead : skip;
                rhead += take;
                skip -= take;
                if (skip)
                    break;
                continue;
            }
            if (rtail - rhead < 16)
                break;
            uint32_t magic, err;
            uint64_t cookie;
            memcpy(&magic, rbuf + rhead, 4);
            memcpy(&err, rbuf + rhead + 4, 4);
            memcpy(&cookie, rbuf + rhead + 8, 8);
            errno = 0;
            if (be32toh(magic) != NBD_SIMPLE_MAGIC || cookie >= (uint64_t)qd)
                die("bad reply from the server");
            if (err) {
                fprintf(stderr, "nbd-load-client: request failed with NBD error %u\n",
                        be32toh(err));
                exit(1);
            }
            rhead += 16;
            if (!is_write)
                skip = slot_len[cookie];
            free_slots[nfree++] = (int)cookie;
            inflight--;
            if (!stopping)
                done++;
        }
        if (rhead == rtail) {
            rhead = rtail = 0;
        } else if (rtail > RBUF_SIZE / 2) {
            memmove(rbuf, rbuf + rhead, rtail - rhead);
            rtail -= rhead;
            rhead = 0;
        }
        if (!stopping && (turns & 63) == 0 && now() >= deadline) {
            stopping = 1;
            t_end = now();
            c_end = cpu_secs();
        }
    }
    if (!stopping) {
        t_end = now();
        c_end = cpu_secs();
    }
    struct req_hdr disc = { .magic = htobe32(NBD_REQ_MAGIC), .type = htobe16(NBD_CMD_DISC) };
    if (fcntl(fd, F_SETFL, 0) == 0)
        write_full(fd, &disc, sizeof(disc));
    close(fd);
    double el = t_end - t0;
    printf("{\"ios\": %llu, \"iops\": %.1f, \"MiBps\": %.1f, \"secs\": %.3f, \"cpu\": %.3f}\n",
           (unsigned long long)done, done / el, done * (double)bs / el / 1048576.0, el,
           c_end - c0);
    return 0;
}
