/*
 * libFuzzer target: an NBD client, from the first byte of the handshake to
 * the end of transmission, against the real server code (as nbdkit fuzzes
 * its server through a socketpair).  The daemon's main loop runs in a
 * thread of its own with a null-co node (read-zeroes) exported writable
 * and an export of a raw node over it; each input is written to a new
 * connection made by the server's own nbd_conn_new(), the replies are
 * read and dropped, and the input ends at EOF: the server must then close
 * the connection (a hang of 20 s is reported as a crash).
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
#include "fuzz-daemon.h"
#include "util/loop.h"
#include "export/nbd/nbd-internal.h"

static char sock[64];

static void remove_sock(void)
{
    unlink(sock);
}

static void setup_cb(void *opaque)
{
    snprintf(sock, sizeof(sock), "/tmp/bexd-fuzz-nbd-%d.sock", (int)getpid());
    atexit(remove_sock);
    fuzz_qmp("{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"null-co\","
            "\"node-name\":\"n0\",\"size\":67108864,\"read-zeroes\":true}}");
    fuzz_qmp("{\"execute\":\"nbd-server-start\",\"arguments\":{\"addr\":"
             "{\"type\":\"unix\",\"data\":{\"path\":\"%s\"}}}}", sock);
    fuzz_qmp("{\"execute\":\"block-export-add\",\"arguments\":{\"type\":\"nbd\",\"id\":\"e0\","
            "\"node-name\":\"n0\",\"name\":\"\",\"writable\":true}}");
    fuzz_qmp("{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"raw\",\"node-name\":\"r0\","
            "\"file\":\"n0\",\"offset\":4096,\"size\":1048576}}");
    fuzz_qmp("{\"execute\":\"block-export-add\",\"arguments\":{\"type\":\"nbd\",\"id\":\"e1\","
            "\"node-name\":\"r0\",\"name\":\"r\",\"description\":\"raw\"}}");
}

static void new_conn_cb(void *opaque)
{
    int fd = (int)(intptr_t)opaque;
    if (!nbd_conn_new(fd, "fuzz"))
        close(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int inited;
    char sink[65536];
    int sv[2];
    size_t sent = 0;
    bool shut = false;

    if (!inited) {
        fuzz_daemon_start(setup_cb, NULL);
        inited = 1;
    }
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        abort();
    loop_call(loop_main(), new_conn_cb, (void *)(intptr_t)sv[1]);
    for (int waited = 0;;) {
        struct pollfd p = { .fd = sv[0], .events = POLLIN | (shut ? 0 : POLLOUT) };
        int n = poll(&p, 1, 100);
        if (n == 0 && (waited += 100) >= 20000) {
            fprintf(stderr, "fuzz-nbd: the server neither answered nor closed\n");
            abort();
        }
        if (n <= 0)
            continue;
        waited = 0;
        if (p.revents & POLLIN) {
            ssize_t r = recv(sv[0], sink, sizeof(sink), 0);
            if (r == 0 || (r < 0 && errno != EAGAIN))
                break;                       /* closed by the server */
        }
        if (!shut && (p.revents & POLLOUT)) {
            ssize_t w = send(sv[0], data + sent, size - sent, MSG_NOSIGNAL);
            if (w > 0)
                sent += w;
            if (w < 0 && errno != EAGAIN)
                break;
            if (sent == size) {
                shutdown(sv[0], SHUT_WR);
                shut = true;
            }
        }
    }
    close(sv[0]);
    return 0;
}
