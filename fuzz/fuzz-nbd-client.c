/*
 * libFuzzer target: the nbd block driver against a hostile server.  An
 * input is everything the server sends: the handshake's replies, then
 * transmission replies.  It is written into one end of a socketpair (what
 * the client sends is read and dropped) and the other end is opened as an
 * nbd node (server type fd), through the same blockdev_add() as
 * --blockdev.  If it opens, a read, a write, write zeroes, a trim, a flush
 * and block status are issued; the input's end is the connection's end,
 * so each completes with the data or an error, never a hang.  A refused
 * open must say why.
 */
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "block/block.h"
#include "util/coroutine.h"
#include "util/loop.h"

struct peer {
    int fd;
    const uint8_t *data;
    size_t size;
};

/* The server: write the input while dropping what the client sends, then
 * end the stream and drop the rest until the client closes. */
static void *peer_main(void *opaque)
{
    struct peer *p = opaque;
    size_t off = 0;
    char sink[65536];

    if (!p->size)
        shutdown(p->fd, SHUT_WR);

    for (;;) {
        struct pollfd pfd = { .fd = p->fd,
                              .events = POLLIN | (off < p->size ? POLLOUT : 0) };
        if (poll(&pfd, 1, -1) < 0)
            break;
        if (pfd.revents & POLLIN) {
            ssize_t n = recv(p->fd, sink, sizeof(sink), MSG_DONTWAIT);
            if (n == 0 || (n < 0 && off >= p->size))
                break;
        }
        if (off < p->size && (pfd.revents & POLLOUT)) {
            ssize_t n = send(p->fd, p->data + off, p->size - off, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n < 0)
                break;
            off += n;
            if (off == p->size)
                shutdown(p->fd, SHUT_WR);
        }
        if (pfd.revents & (POLLHUP | POLLERR))
            break;
    }
    close(p->fd);
    return NULL;
}

struct io {
    struct bnode *bs;
    int done;
};

static void do_io(void *opaque)
{
    struct io *io = opaque;
    static uint8_t buf[128 * 1024];
    uint64_t len = io->bs->size < sizeof(buf) ? io->bs->size : sizeof(buf);

    if (len) {
        bnode_co_pread(io->bs, 0, len, buf, 0);
        bnode_co_pwrite(io->bs, 0, len, buf, BREQ_FUA);
        bnode_co_pwrite_zeroes(io->bs, 0, len, BREQ_MAY_UNMAP);
        bnode_co_pdiscard(io->bs, 0, len);
    }
    bnode_co_flush(io->bs);
    io->done = 1;
    loop_stop(loop_main());
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int init;
    if (!init) {
        loop_main_init();
        init = 1;
    }
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        abort();
    struct peer p = { .fd = sv[0], .data = data, .size = size };
    pthread_t t;
    if (pthread_create(&t, NULL, peer_main, &p) != 0)
        abort();
    char json[256];
    snprintf(json, sizeof(json),
             "{\"driver\":\"nbd\",\"node-name\":\"fz\",\"export\":\"e\","
             "\"server\":{\"type\":\"fd\",\"str\":\"%d\"}}", sv[1]);
    json_t *opts = json_loads(json, 0, NULL);
    error *err = NULL;
    struct bnode *bs = blockdev_add(opts, &err);
    json_decref(opts);
    if (!bs) {
        if (!err || !err->msg[0])
            abort();                    /* a refusal always says why */
        error_free(err);                /* the driver closed sv[1] */
    } else {
        struct io io = { .bs = bs };
        co_enter(co_create(do_io, &io));
        if (!io.done)
            loop_run(loop_main());
        for (uint64_t off = 0, steps = 0; off < bs->size && steps < 64; steps++) {
            uint64_t pnum;
            unsigned flags;
            int depth;
            if (bnode_block_status(bs, off, bs->size - off, &pnum, &flags, &depth) < 0 ||
                !pnum)
                break;
            off += pnum;
        }
        blockdev_del("fz", NULL);
    }
    pthread_join(t, NULL);
    return 0;
}
