/*
 * libFuzzer target: FUSE requests against the export's real dispatcher
 * (libfuse's fuse_session_process_buf() and bexd's fuse-ops.c /
 * fuse-session.c), with a socketpair in place of /dev/fuse.
 *
 * The daemon's main loop runs in a thread of its own with a null-co node
 * (read-zeroes) and a raw node over blkdebug over it whose rules fail some
 * writes, reads and flushes, so that the error paths run too.  For each
 * input a fresh struct fuse_export is set up on one of them in the loop
 * thread: a libfuse session "mounted" on "/dev/fd/N" (libfuse then takes
 * the fd as it is, no kernel mount), one queue on it (fuse_queues_setup),
 * served by fuse_session_start() as a mounted export is.  The fuzzer thread plays the kernel: a FUSE_INIT,
 * then the input's records as requests, one SOCK_SEQPACKET message each
 * (as /dev/fuse delivers them); it reads and drops the replies.  Once all
 * are sent, the loop thread serves what is queued, waits for requests in
 * flight, and tears the session down.  A session that does not finish
 * within 20 s is reported as a crash.
 *
 * Input: byte 0 = flags (bit 0 growable, bit 1 writable, bit 2 the
 * blkdebug node, bit 3 no FUSE_INIT first), then records
 *   u8 opcode, u8 nodeid (0 = root), u16 body length (LE), body
 * The harness keeps what the kernel guarantees and the dispatcher relies
 * on: the header's length is the message's, a WRITE's size is its
 * payload's, a name is NUL-terminated; no INTERRUPT or NOTIFY_REPLY is
 * sent (the kernel interrupts only requests it has in flight and answers
 * only retrieves it was sent; libfuse keeps one it cannot match forever
 * and leaks it: not the export's code, and LeakSanitizer would stop every
 * run on it).
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include "block/block.h"
#include "export/fuse/fuse-export.h"
#include "fuzz-daemon.h"
#include "util/loop.h"
#include "util/xalloc.h"

/* The kernel's side of the protocol (linux/fuse.h), kept apart from
 * libfuse's headers. */
struct in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};
struct init_in {
    uint32_t major, minor, max_readahead, flags, flags2, unused[11];
};
struct write_in {
    uint64_t fh, offset;
    uint32_t size, write_flags;
    uint64_t lock_owner;
    uint32_t flags, padding;
};
enum { OP_LOOKUP = 1, OP_WRITE = 16, OP_INTERRUPT = 36, OP_NOTIFY_REPLY = 41, OP_INIT = 26, OP_CREATE = 35, OP_MKNOD = 8, OP_MKDIR = 9,
       OP_UNLINK = 10, OP_RMDIR = 11, OP_GETXATTR = 22, OP_REMOVEXATTR = 24 };

struct ctx {
    int fd;                     /* the server's end */
    uint8_t flags;
    struct fuse_export *exp;
    struct loop_timer *timer;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int state;                  /* 1 started, 2 torn down */
};

static void signal_state(struct ctx *c, int state)
{
    pthread_mutex_lock(&c->lock);
    c->state = state;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
}

static void wait_state(struct ctx *c, int state)
{
    pthread_mutex_lock(&c->lock);
    while (c->state < state)
        pthread_cond_wait(&c->cond, &c->lock);
    pthread_mutex_unlock(&c->lock);
}

/* ---- the loop thread ---- */

static void setup_cb(void *opaque)
{
    fuzz_qmp("{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"null-co\","
            "\"node-name\":\"n0\",\"size\":67108864,\"read-zeroes\":true}}");
    fuzz_qmp("{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"raw\",\"node-name\":\"r0\","
            "\"file\":{\"driver\":\"blkdebug\",\"image\":{\"driver\":\"null-co\","
            "\"size\":1048576,\"read-zeroes\":true},\"align\":512,\"max-transfer\":65536,"
            "\"inject-error\":[{\"event\":\"write_aio\",\"iotype\":\"write\",\"sector\":8,"
            "\"errno\":28},{\"event\":\"read_aio\",\"iotype\":\"read\",\"sector\":100,"
            "\"once\":true},{\"event\":\"flush_to_disk\",\"errno\":5,\"immediately\":true}]}}}");
}

static void start_cb(void *opaque)
{
    struct ctx *c = opaque;
    struct fuse_export *exp = xzalloc(sizeof(*exp));
    char opts[64], mnt[32];
    char *argv[] = { (char *)"bexd", (char *)"-o", opts, NULL };
    struct fuse_args args = FUSE_ARGS_INIT(3, argv);

    exp->common.id = (char *)"fuzz";
    exp->common.node = bnode_find(c->flags & 4 ? "r0" : "n0");
    exp->common.writable = c->flags & 2;
    exp->common.loop = loop_main();
    exp->mountpoint = (char *)"fuzz";
    exp->growable = c->flags & 1;
    exp->st_mode = S_IFREG | S_IRUSR | (exp->common.writable ? S_IWUSR : 0);
    /* as fuse_export_create sets it: at 0 the queue would stop reading
     * before its first request */
    exp->max_inflight = FUSE_MAX_INFLIGHT;
    snprintf(opts, sizeof(opts), "max_read=%u,default_permissions", FUSE_RW_MAX);
    exp->se = fuse_session_new(&args, &fuse_export_ops, sizeof(fuse_export_ops), exp);
    fuse_opt_free_args(&args);
    snprintf(mnt, sizeof(mnt), "/dev/fd/%d", c->fd);
    if (!exp->se || fuse_session_mount(exp->se, mnt) < 0)
        abort();
    error *err = NULL;
    if (fuse_queues_setup(exp, false, &err) < 0)      /* one queue: the fd */
        abort();
    c->exp = exp;
    fuse_session_start(exp);
    signal_state(c, 1);
}

static void teardown_cb(void *opaque)
{
    struct ctx *c = opaque;
    struct fuse_export *exp = c->exp;
    struct fuse_queue *q = &exp->queues[0];

    /* Everything was sent before this was queued: serve what is left. */
    for (;;) {
        struct pollfd p = { .fd = c->fd, .events = POLLIN };
        if (!q->watch || poll(&p, 1, 0) <= 0)
            break;
        fuse_session_poll_now(exp);
    }
    if (q->inflight) {              /* completions or a resize still to come */
        if (!c->timer)
            c->timer = loop_timer_new(loop_main(), teardown_cb, c);
        loop_timer_arm(c->timer, 1);
        return;
    }
    if (c->timer)
        loop_timer_free(c->timer);
    c->timer = NULL;
    if (q->watch)
        loop_watch_del(q->watch);
    q->watch = NULL;
    fuse_queues_free(exp);
    fuse_session_destroy(exp->se);  /* closes c->fd */
    free(exp);
    c->exp = NULL;
    signal_state(c, 2);
}

/* ---- the fuzzer thread: the kernel's part ---- */

static char sink[FUSE_RW_MAX + 4096];

static void drain(int fd)
{
    while (recv(fd, sink, sizeof(sink), MSG_DONTWAIT) > 0)
        ;
}

/* Send one message, reading replies while the socket is full. */
static void send_msg(int fd, const void *msg, size_t len)
{
    for (int waited = 0;;) {
        ssize_t w = send(fd, msg, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
            return;                  /* sent, or the session is gone */
        struct pollfd p = { .fd = fd, .events = POLLIN | POLLOUT };
        if (poll(&p, 1, 100) == 0 && (waited += 100) >= 20000) {
            fprintf(stderr, "fuzz-fuse: the session stopped reading\n");
            abort();
        }
        drain(fd);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int inited;
    static uint8_t msg[65536 + sizeof(struct in_header) + 8];
    int sv[2];
    uint64_t unique = 1;

    if (!inited) {
        fuzz_daemon_start(setup_cb, NULL);
        inited = 1;
    }
    if (size < 1)
        return 0;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        abort();
    struct ctx c = { .fd = sv[1], .flags = data[0], .lock = PTHREAD_MUTEX_INITIALIZER,
                     .cond = PTHREAD_COND_INITIALIZER };
    loop_call(loop_main(), start_cb, &c);
    wait_state(&c, 1);

    struct in_header *h = (struct in_header *)msg;
    if (!(c.flags & 8)) {
        struct init_in in = { .major = 7, .minor = 31, .max_readahead = 131072,
                              .flags = 0x3fffffff };
        memset(h, 0, sizeof(*h));
        h->len = sizeof(*h) + sizeof(in);
        h->opcode = OP_INIT;
        h->unique = unique++;
        memcpy(h + 1, &in, sizeof(in));
        send_msg(sv[0], msg, h->len);
    }
    size_t pos = 1;
    while (pos + 4 <= size) {
        uint8_t op = data[pos], node = data[pos + 1];
        size_t blen = data[pos + 2] | (size_t)data[pos + 3] << 8;
        pos += 4;
        blen = MIN(blen, size - pos);
        uint8_t *body = (uint8_t *)(h + 1);
        memcpy(body, data + pos, blen);
        pos += blen;
        if (op == OP_INTERRUPT || op == OP_NOTIFY_REPLY)
            continue;
        memset(h, 0, sizeof(*h));
        h->opcode = op;
        h->unique = unique++;
        h->nodeid = node ? node : 1;
        if (op == OP_WRITE) {
            if (blen < sizeof(struct write_in)) {   /* the kernel never sends less */
                memset(body + blen, 0, sizeof(struct write_in) - blen);
                blen = sizeof(struct write_in);
            }
            ((struct write_in *)body)->size = (uint32_t)(blen - sizeof(struct write_in));
        }
        if ((op == OP_LOOKUP || op == OP_CREATE || op == OP_MKNOD || op == OP_MKDIR ||
             op == OP_UNLINK || op == OP_RMDIR || op == OP_GETXATTR ||
             op == OP_REMOVEXATTR) && (blen == 0 || body[blen - 1]))
            body[blen++] = 0;
        h->len = (uint32_t)(sizeof(*h) + blen);
        send_msg(sv[0], msg, h->len);
    }
    loop_call(loop_main(), teardown_cb, &c);
    for (int waited = 0;;) {
        struct pollfd p = { .fd = sv[0], .events = POLLIN };
        int n = poll(&p, 1, 100);
        if (n > 0 && recv(sv[0], sink, sizeof(sink), MSG_DONTWAIT) == 0)
            break;                   /* the session closed its end */
        if (n == 0 && (waited += 100) >= 20000) {
            fprintf(stderr, "fuzz-fuse: the session did not finish\n");
            abort();
        }
    }
    wait_state(&c, 2);
    close(sv[0]);
    return 0;
}
