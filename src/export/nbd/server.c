/*
 * The NBD server: listening sockets and accepting clients (main loop), and
 * the QMP commands nbd-server-start / nbd-server-stop.
 *
 * Theory of operation.  One server per process (QEMU's model).  Accepted
 * sockets become connections that start the handshake; max-connections
 * counts every connection not yet finalized, and at the limit the server
 * stops accepting, as QEMU does: the next client waits in the backlog and
 * is served as soon as a connection ends.  On EMFILE/ENFILE accepting pauses briefly instead of
 * spinning.  Stopping removes every NBD export (hard, as QEMU does), closes
 * the connections still negotiating and the listening sockets; connections
 * finish tearing down on their own, each holding its references.
 */
#include <errno.h>
#include <poll.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "object/object.h"
#include "qmp/qmp.h"
#include "util/accept.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/sockets.h"
#include "export/nbd/nbd.h"
#include "nbd-internal.h"
#include "util/xalloc.h"
#include "util/opts.h"

struct nbd_server nbd_srv;

bool nbd_server_running(void)
{
    return nbd_srv.running;
}

static void nbd_accept_pause(bool pause)
{
    for (int i = 0; i < nbd_srv.nlisten; i++)
        loop_watch_set(nbd_srv.listen_watch[i], pause ? 0 : LOOP_IN);
}

static void nbd_accept_retry(void *opaque)
{
    if (nbd_srv.running && !nbd_srv.full_paused)
        nbd_accept_pause(false);
}

/* Large socket buffers let big READ replies and WRITE payloads move in a
 * few system calls instead of one per default buffer (the kernel caps the
 * value). */
static void nbd_socket_tune(int fd)
{
    int sz = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof(sz));
}

/* "192.0.2.1:4711", "[::1]:4711", "unix:pid=123" (the peer's credentials:
 * a UNIX client rarely has a name), "vsock:3:4711". */
static void nbd_peer_name(int fd, char *buf, size_t len)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    char host[INET6_ADDRSTRLEN];

    snprintf(buf, len, "unix");
    if (getpeername(fd, (struct sockaddr *)&ss, &sl) < 0)
        return;
    if (ss.ss_family == AF_INET || ss.ss_family == AF_INET6) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (ss.ss_family == AF_INET) {
            struct sockaddr_in *in = (struct sockaddr_in *)&ss;
            inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
            snprintf(buf, len, "%s:%u", host, ntohs(in->sin_port));
        } else {
            struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
            inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
            snprintf(buf, len, "[%s]:%u", host, ntohs(in6->sin6_port));
        }
    } else if (ss.ss_family == AF_UNIX) {
        struct ucred cr;
        socklen_t cl = sizeof(cr);
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) == 0)
            snprintf(buf, len, "unix:pid=%d", (int)cr.pid);
    } else if (ss.ss_family == AF_VSOCK) {
        struct sockaddr_vm *vm = (struct sockaddr_vm *)&ss;
        snprintf(buf, len, "vsock:%u:%u", vm->svm_cid, vm->svm_port);
    }
}

static bool nbd_server_full(void)
{
    return nbd_srv.max_connections && (uint32_t)nbd_srv.nconns >= nbd_srv.max_connections;
}

/* A connection was finalized: below the limit again, accept again. */
void nbd_server_conn_gone(void)
{
    if (nbd_srv.running && nbd_srv.full_paused && !nbd_server_full()) {
        nbd_srv.full_paused = false;
        nbd_accept_pause(false);
    }
}

static void nbd_accept(void *opaque, uint32_t revents)
{
    int lfd = (int)(intptr_t)opaque;

    for (int i = 0; i < 64; i++) {
        char peer[96];

        if (nbd_server_full()) {
            /* As QEMU: at max-connections stop accepting; the next client
             * waits in the backlog and is served when a slot frees. */
            nbd_srv.full_paused = true;
            nbd_accept_pause(true);
            return;
        }
        int fd = accept_conn(lfd, false);

        if (fd < 0) {
            if (accept_backoff(&nbd_srv.backoff, -fd))
                nbd_accept_pause(true);
            return;   /* EAGAIN, ECONNABORTED...: wait for the next event */
        }
        if (nbd_server_full()) {
            /* cannot happen: paused at the limit; keep the bound anyway */
            close(fd);
            continue;
        }
        nbd_socket_tune(fd);
        nbd_peer_name(fd, peer, sizeof(peer));
        nbd_srv.accepted++;
        if (!nbd_conn_new(fd, peer))
            close(fd);   /* out of memory: nothing took the socket */
    }
}

static void nbd_server_clear(void)
{
    for (int i = 0; i < nbd_srv.nlisten; i++) {
        loop_watch_del(nbd_srv.listen_watch[i]);
        close(nbd_srv.listen_fd[i]);
    }
    nbd_srv.nlisten = 0;
    nbd_srv.full_paused = false;
    accept_backoff_cleanup(&nbd_srv.backoff);
    if (nbd_srv.addr) {
        socket_address_cleanup(nbd_srv.addr);
        json_decref(nbd_srv.addr);
    }
    nbd_srv.addr = NULL;
    if (nbd_srv.tls_creds)
        nbd_tls_pin_creds(nbd_srv.tls_creds, false);
    free(nbd_srv.tls_creds);
    free(nbd_srv.tls_authz);
    nbd_srv.tls_creds = nbd_srv.tls_authz = NULL;
    nbd_srv.running = false;
}

int nbd_server_start(json_t *opts, error **errp)
{
    json_t *addr = json_object_get(opts, "addr");
    const char *creds = opt_str(opts, "tls-creds", NULL);
    const char *authz = opt_str(opts, "tls-authz", NULL);
    int fds[8];
    int n;

    if (nbd_srv.running) {
        error_setg(errp, "NBD server already running");
        return -1;
    }
    /* QEMU listens first, then looks the credentials up (and closes the
     * listener again if they are missing), so its errors come in that order */
    n = socket_listen(addr, 128, fds, ARRAY_SIZE(fds), errp);
    if (n < 0)
        return -1;
    if (creds && nbd_tls_check_creds(creds, errp) < 0) {
        for (int i = 0; i < n; i++)
            close(fds[i]);
        socket_address_cleanup(addr);
        return -1;
    }
    nbd_srv.running = true;
    nbd_srv.addr = json_deep_copy(addr);
    nbd_srv.tls_creds = creds ? xstrdup(creds) : NULL;
    if (creds)
        nbd_tls_pin_creds(creds, true);
    nbd_srv.tls_authz = authz ? xstrdup(authz) : NULL;
    nbd_srv.max_connections = opt_int(opts, "max-connections", 0);
    /* QEMU 10.0's handshake-max-seconds: 0 = no limit */
    nbd_srv.handshake_ms = opt_int(opts, "handshake-max-seconds", NBD_HANDSHAKE_MS / 1000) * 1000;
    nbd_srv.backoff = (struct accept_backoff){ .who = "nbd", .loop = loop_main(),
                                               .resume = nbd_accept_retry };
    accept_reserve_refill();
    nbd_budget_init();
    for (int i = 0; i < n; i++) {
        nbd_srv.listen_fd[i] = fds[i];
        nbd_srv.listen_watch[i] = loop_watch_fd(loop_main(), fds[i], LOOP_IN, nbd_accept,
                                                (void *)(intptr_t)fds[i]);
    }
    nbd_srv.nlisten = n;
    return 0;
}

void nbd_server_stop(void)
{
    if (!nbd_srv.running)
        return;
    nbd_exports_close_all();
    nbd_server_clear();
}

/* Graceful stop: close the listening sockets (new clients are refused by
 * the kernel), let every connection finish what it has read, and call
 * done once none is left.  The exports stay; the caller removes them. */
void nbd_server_drain(void (*done)(void *), void *opaque)
{
    for (int i = 0; i < nbd_srv.nlisten; i++) {
        loop_watch_del(nbd_srv.listen_watch[i]);
        close(nbd_srv.listen_fd[i]);
    }
    nbd_srv.nlisten = 0;
    if (nbd_srv.nconns == 0) {
        done(opaque);
        return;
    }
    nbd_srv.drained = done;
    nbd_srv.drained_opaque = opaque;
    nbd_conns_drain();
}

/* The shutdown deadline passed: say which connections are still busy. */
void nbd_server_report_stuck(void)
{
    for (struct nbd_conn *c = nbd_srv.conns; c; c = c->next)
        log_warn("nbd: client %s of export '%s' still has %d requests in flight",
                 c->peer, c->exp ? c->exp->common.id : "(none: negotiating)",
                 __atomic_load_n(&c->busy_slots, __ATOMIC_RELAXED));
}

void nbd_server_counters(struct nbd_server_counters *out)
{
    out->open = nbd_srv.nconns;
    out->accepted = nbd_srv.accepted;
    out->handshake_failures = nbd_srv.handshake_failures;
    out->tls_failures = nbd_srv.tls_failures;
}

int nbd_server_nclients(void)
{
    return nbd_srv.nconns;
}

/* ---- QMP ---- */

static json_t *qmp_nbd_server_start(json_t *args, error **errp)
{
    CLEANUP_JSON json_t *opts = json_deep_copy(args);
    json_t *flat;

    if (!opts) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    flat = socket_address_flatten(json_object_get(args, "addr"));
    if (!flat) {
        error_setg(errp, "invalid address");
        return NULL;
    }
    json_object_set_new(opts, "addr", flat);
    if (nbd_server_start(opts, errp) < 0)
        return NULL;
    return json_object();
}
QMP_COMMAND("nbd-server-start", qmp_nbd_server_start)

static json_t *qmp_nbd_server_stop(json_t *args, error **errp)
{
    if (!nbd_srv.running) {
        error_setg(errp, "NBD server not running");
        return NULL;
    }
    nbd_server_stop();
    return json_object();
}
QMP_COMMAND("nbd-server-stop", qmp_nbd_server_stop)

/* ---- serving handshakes while the main thread waits ---- */

void nbd_server_pump(int wake_fd, int timeout_ms)
{
    struct pollfd pfd[72];
    struct nbd_conn *conn[72];
    int n = 0;

    pfd[n] = (struct pollfd){ .fd = wake_fd, .events = POLLIN };
    conn[n++] = NULL;
    for (int i = 0; nbd_srv.running && i < nbd_srv.nlisten; i++) {
        if (!loop_watch_events(nbd_srv.listen_watch[i]))
            continue;       /* paused: full, or out of descriptors */
        pfd[n] = (struct pollfd){ .fd = nbd_srv.listen_fd[i], .events = POLLIN };
        conn[n++] = NULL;
    }
    for (struct nbd_conn *c = nbd_srv.conns; c && n < (int)ARRAY_SIZE(pfd); c = c->next) {
        if (c->state != CONN_HANDSHAKE || c->loop != loop_main() || !c->watch ||
            !loop_watch_events(c->watch))
            continue;
        uint32_t ev = loop_watch_events(c->watch);
        pfd[n] = (struct pollfd){ .fd = c->fd,
                                  .events = (ev & LOOP_IN ? POLLIN : 0) |
                                            (ev & LOOP_OUT ? POLLOUT : 0) };
        conn[n++] = c;
        nbd_conn_ref(c);
    }
    int r = poll(pfd, n, timeout_ms);
    for (int i = 1; i < n; i++) {
        struct nbd_conn *c = conn[i];
        if (r > 0 && pfd[i].revents) {
            uint32_t ev = (pfd[i].revents & POLLIN ? LOOP_IN : 0) |
                          (pfd[i].revents & POLLOUT ? LOOP_OUT : 0) |
                          (pfd[i].revents & POLLHUP ? EPOLLHUP : 0) |
                          (pfd[i].revents & POLLERR ? EPOLLERR : 0);
            if (!c)
                nbd_accept((void *)(intptr_t)pfd[i].fd, LOOP_IN);
            else if (c->state == CONN_HANDSHAKE && c->loop == loop_main())
                nbd_conn_io(c, ev);
        }
        if (c)
            nbd_conn_unref(c);
    }
}

/* Is fd, a connected socket, a client of this server's listening sockets? */
bool nbd_server_is_peer(int fd)
{
    struct sockaddr_storage peer, mine;
    socklen_t pl = sizeof(peer);

    if (!nbd_srv.running || getpeername(fd, (struct sockaddr *)&peer, &pl) < 0)
        return false;
    for (int i = 0; i < nbd_srv.nlisten; i++) {
        socklen_t ml = sizeof(mine);
        if (getsockname(nbd_srv.listen_fd[i], (struct sockaddr *)&mine, &ml) < 0 ||
            mine.ss_family != peer.ss_family)
            continue;
        if (peer.ss_family == AF_UNIX) {
            if (pl == ml && !memcmp(&peer, &mine, pl))
                return true;
        } else if (peer.ss_family == AF_INET) {
            struct sockaddr_in *p = (struct sockaddr_in *)&peer, *m = (struct sockaddr_in *)&mine;
            if (p->sin_port == m->sin_port &&
                (m->sin_addr.s_addr == htonl(INADDR_ANY) || m->sin_addr.s_addr == p->sin_addr.s_addr))
                return true;
        } else if (peer.ss_family == AF_INET6) {
            struct sockaddr_in6 *p = (struct sockaddr_in6 *)&peer;
            struct sockaddr_in6 *m = (struct sockaddr_in6 *)&mine;
            if (p->sin6_port == m->sin6_port &&
                (IN6_IS_ADDR_UNSPECIFIED(&m->sin6_addr) ||
                 IN6_ARE_ADDR_EQUAL(&m->sin6_addr, &p->sin6_addr)))
                return true;
        }
    }
    return false;
}
