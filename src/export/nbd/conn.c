/*
 * NBD connections: lifetime, transport and output.
 *
 * Theory of operation.  A connection is created by the accept handler in the
 * main loop with one reference, owned by its socket.  nbd_conn_close(reason)
 * is the single way to end it: it shuts the socket down, drops queued
 * replies and the socket's reference.  Everything else that may outlive a
 * callback (an in-flight block request, a queued loop_defer, a loop_call to
 * another thread) holds its own reference, so a handler may close its own
 * connection and an export or the server may go away with requests in
 * flight: the last nbd_conn_unref() (always in the connection's loop) frees
 * the I/O state, then nbd_conn_finalize() in the main loop unlinks it from
 * the server and its export.  Only the main thread changes c->loop, so the
 * main thread can always post to the right loop.
 *
 * Output: handshake replies go to a byte buffer; transmission replies are
 * request slots queued in order of completion.  nbd_conn_flush() sends both
 * with one vectored send per call, remembering how far a short write got.
 * Transmission flushes are deferred to the end of the loop iteration so that
 * replies completing together leave in one sendmsg.  A reply may end in a
 * file range instead of a buffer (a spliced READ): the gather stops after
 * its headers, and the range goes file -> the connection's pipe -> socket,
 * the pipe keeping what a short send left over.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <inttypes.h>
#include <linux/vm_sockets.h>
#include <unistd.h>
#include "util/cleanup.h"
#include "util/log.h"
#include "nbd-internal.h"
#include "object/iothread.h"
#include "util/loop-pool.h"
#include "util/xalloc.h"

/* ---- plain socket transport ---- */

static ssize_t plain_recv(struct nbd_conn *c, void *buf, size_t len)
{
    ssize_t n;
    do {
        n = recv(c->fd, buf, len, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    return n;
}

static ssize_t plain_sendv(struct nbd_conn *c, const struct iovec *iov, int iovcnt)
{
    struct msghdr msg = { .msg_iov = (struct iovec *)iov, .msg_iovlen = iovcnt };
    ssize_t n;
    do {
        n = sendmsg(c->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    return n;
}

static ssize_t plain_splice(struct nbd_conn *c, int pipe_rd, size_t len)
{
    ssize_t n;
    do {
        n = splice(pipe_rd, NULL, c->fd, NULL, len, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    return n;
}

static void plain_shutdown(struct nbd_conn *c)
{
    if (c->fd >= 0)
        shutdown(c->fd, SHUT_RDWR);
}

static void plain_close(struct nbd_conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
}

const struct nbd_transport nbd_plain_transport = {
    .recv = plain_recv, .sendv = plain_sendv, .splice = plain_splice,
    .shutdown = plain_shutdown, .close = plain_close,
};

/* ---- references ---- */

void nbd_conn_ref(struct nbd_conn *c)
{
    __atomic_add_fetch(&c->refcnt, 1, __ATOMIC_ACQ_REL);
}

/* Take a reference unless teardown has begun. */
bool nbd_conn_tryref(struct nbd_conn *c)
{
    int old = __atomic_load_n(&c->refcnt, __ATOMIC_ACQUIRE);
    while (old > 0) {
        if (__atomic_compare_exchange_n(&c->refcnt, &old, old + 1, false,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return true;
    }
    return false;
}

static const char *nbd_transport_of(int fd)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);

    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0)
        return "unix";
    switch (ss.ss_family) {
    case AF_INET: case AF_INET6: return "tcp";
    case AF_VSOCK: return "vsock";
    default: return "unix";
    }
}

static void nbd_conn_finalize(void *opaque)
{
    struct nbd_conn *c = opaque;
    struct nbd_conn **pp;

    for (pp = &nbd_srv.conns; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    nbd_srv.nconns--;
    nbd_server_conn_gone();
    loop_pool_release(c->pool_slot);
    if (c->iot)
        object_unref(&c->iot->obj);
    if (c->exp && c->iot_slot >= 0)
        c->exp->loop_users[c->iot_slot]--;
    if (c->exp) {
        struct client_stats v;
        client_stats_read(&c->st, &v);
        log_info("nbd: client %s left export '%s' (%s): %" PRIu64 " reads, %" PRIu64
                 " writes, %" PRIu64 " errors", c->peer, c->exp->common.id,
                 c->close_reason ? c->close_reason : "closed", v.rd_ops, v.wr_ops, v.errors);
        client_stats_add(&c->exp->gone, &c->st);
        nbd_export_client_gone(c->exp);
    }
    free(c->tls_identity);
    free(c->peer);
    free(c);
    if (nbd_srv.nconns == 0 && nbd_srv.drained) {
        void (*cb)(void *) = nbd_srv.drained;
        nbd_srv.drained = NULL;
        cb(nbd_srv.drained_opaque);
    }
}

static void nbd_conn_destroy(struct nbd_conn *c)
{
    if (c->watch)
        loop_watch_del(c->watch);
    c->watch = NULL;
    c->tr->close(c);
    for (int i = 0; i < 2; i++)
        if (c->pipe[i] >= 0)
            close(c->pipe[i]);
    nbd_slots_free(c);
    free(c->rx);
    free(c->hs_buf);
    free(c->out);
    c->rx = c->hs_buf = c->out = NULL;
    if (loop_in_thread(loop_main()))
        nbd_conn_finalize(c);
    else
        loop_call(loop_main(), nbd_conn_finalize, c);
}

static void nbd_conn_quiesced(struct nbd_conn *c);
static void nbd_conn_moved_cb(void *opaque);

/* Every unref but the move's own runs in the connection's loop, so a
 * quiescing connection notices here when its last pending work is done. */
void nbd_conn_unref(struct nbd_conn *c)
{
    int left = __atomic_sub_fetch(&c->refcnt, 1, __ATOMIC_ACQ_REL);

    if (left == 0)
        nbd_conn_destroy(c);
    else if (left == 2 && c->quiescing)
        nbd_conn_quiesced(c);   /* only the socket and the move hold it */
}

/* ---- watch ---- */

void nbd_conn_update_watch(struct nbd_conn *c)
{
    uint32_t ev = 0;

    if (!c->watch)
        return;
    if (c->state != CONN_CLOSED) {
        if (!c->rx_paused && !c->rx_yield && !c->disc && !c->rx_eof && !c->quiescing &&
            !(c->draining && c->rx_state == RX_HDR))
            ev |= LOOP_IN;
        if (c->want_out)
            ev |= LOOP_OUT;
    }
    if (loop_watch_events(c->watch) != ev)
        loop_watch_set(c->watch, ev);
}

void nbd_conn_io(void *opaque, uint32_t revents)
{
    struct nbd_conn *c = opaque;

    nbd_conn_ref(c);
    if ((revents & LOOP_OUT) && c->state != CONN_CLOSED)
        nbd_conn_flush(c);
    if ((revents & (LOOP_IN | EPOLLHUP | EPOLLERR)) && c->state != CONN_CLOSED) {
        if (c->state == CONN_HANDSHAKE)
            nbd_handshake_readable(c);
        else
            nbd_transmission_readable(c);
    }
    nbd_conn_unref(c);
}

/* ---- creation and closing ---- */

/* The connection may already be gone when this returns (greeting failed). */
bool nbd_conn_new(int fd, const char *peer)
{
    struct nbd_conn *c = xzalloc(sizeof(*c));

    c->refcnt = 1;
    c->fd = fd;
    c->tr = &nbd_plain_transport;
    c->pipe[0] = c->pipe[1] = -1;
    c->loop = loop_main();
    c->pool_slot = -1;
    c->iot_slot = -1;
    c->transport = nbd_transport_of(fd);
    c->connected_at = time(NULL);
    c->peer = xstrdup(peer ? peer : "?");
    c->hs_buf = xmalloc(NBD_MAX_OPT_LEN + 64);
    c->watch = loop_watch_fd(c->loop, fd, LOOP_IN, nbd_conn_io, c);
    c->next = nbd_srv.conns;
    nbd_srv.conns = c;
    nbd_srv.nconns++;
    nbd_handshake_start(c);
    return true;
}

void nbd_conn_close(struct nbd_conn *c, const char *reason)
{
    struct nbd_slot *s, *next;

    if (c->state == CONN_CLOSED)
        return;
    log_debug("nbd: closing connection from %s: %s", c->peer, reason);
    c->close_reason = reason;
    if (c->state == CONN_HANDSHAKE && strcmp(reason, "client aborted the handshake")) {
        nbd_srv.handshake_failures++;       /* the handshake runs in the main loop */
        if (!strncmp(reason, "TLS", 3))
            nbd_srv.tls_failures++;
    }
    c->state = CONN_CLOSED;
    c->tr->shutdown(c);
    if (c->watch)
        loop_watch_del(c->watch);
    c->watch = NULL;
    if (c->hs_timer)
        loop_timer_free(c->hs_timer);
    c->hs_timer = NULL;
    /* replies that can no longer be sent; in-flight I/O keeps its slot */
    for (s = c->reply_head; s; s = next) {
        next = s->next;
        nbd_slot_release(s);
    }
    c->reply_head = c->reply_tail = NULL;
    if (c->rx_slot)
        nbd_slot_release(c->rx_slot);
    c->rx_slot = NULL;
    if (c->quiescing) {
        /* it will not move: the main thread gets the move's reference back */
        c->quiescing = false;
        c->move_closed = true;
        loop_call(loop_main(), nbd_conn_moved_cb, c);
    }
    nbd_conn_unref(c);   /* the socket's reference */
}

static void nbd_conn_close_cb(void *opaque)
{
    struct nbd_conn *c = opaque;
    nbd_conn_close(c, "export or server shut down");
    nbd_conn_unref(c);
}

/* Main thread: close a connection whatever loop it runs in. */
void nbd_conn_close_remote(struct nbd_conn *c, const char *reason)
{
    if (c->moving) {
        c->close_after_move = true;   /* no loop owns it now: done after the move */
        return;
    }
    if (c->loop == loop_main()) {
        nbd_conn_close(c, reason);
        return;
    }
    if (nbd_conn_tryref(c))
        loop_call(c->loop, nbd_conn_close_cb, c);
}

/* Main thread: close the connections attached to exp (NULL: those still
 * negotiating).  Closing one may finalize (free) it, never another. */
void nbd_conns_close(struct nbd_export *exp, const char *reason)
{
    struct nbd_conn *c, *next;

    for (c = nbd_srv.conns; c; c = next) {
        next = c->next;
        if (c->exp == exp)
            nbd_conn_close_remote(c, reason);
    }
}

/* ---- graceful stop ---- */

static bool nbd_conn_drained(struct nbd_conn *c)
{
    return c->draining && c->rx_state == RX_HDR &&
           c->rx_end - c->rx_start < sizeof(struct nbd_request);
}

static void nbd_conn_drain_cb(void *opaque)
{
    struct nbd_conn *c = opaque;

    if (c->state == CONN_TRANSMISSION) {
        c->draining = true;
        nbd_conn_update_watch(c);
        nbd_transmission_kick(c);     /* requests already buffered still run */
        nbd_conn_flush(c);            /* closes at once if idle */
    }
    nbd_conn_unref(c);
}

/* Main thread.  A connection still negotiating has nothing to finish and
 * closes now; one in transmission stops reading new requests (a WRITE
 * whose payload is arriving is read to its end), answers those it has,
 * and closes when its last reply is sent. */
void nbd_conns_drain(void)
{
    struct nbd_conn *c, *next;

    for (c = nbd_srv.conns; c; c = next) {
        next = c->next;
        if (!c->exp) {
            nbd_conn_close_remote(c, "server shutting down");
        } else if (c->moving) {
            c->drain_after_move = true;
        } else if (nbd_conn_tryref(c)) {
            if (c->loop == loop_main())
                nbd_conn_drain_cb(c);
            else
                loop_call(c->loop, nbd_conn_drain_cb, c);
        }
    }
}

/* ---- moving to the export's loop after NBD_OPT_GO ---- */

/* In the connection's new loop: watch its socket there, send what was
 * queued and parse what was buffered (also after a move). */
static void nbd_conn_attach_cb(void *opaque)
{
    struct nbd_conn *c = opaque;

    if (c->state != CONN_CLOSED) {
        c->watch = loop_watch_fd(c->loop, c->fd, 0, nbd_conn_io, c);
        nbd_conn_flush(c);
        nbd_conn_update_watch(c);
        nbd_transmission_kick(c);
    }
    nbd_conn_unref(c);
}

/* The loop an attached connection of exp belongs in (main thread): the
 * export's iothread, else a worker loop (its slot in c->pool_slot). */
static struct loop *nbd_conn_pick_loop(struct nbd_conn *c, struct nbd_export *exp)
{
    struct iothread *iot = exp->common.iothread;

    if (iot)
        object_ref(&iot->obj);    /* not deleted while the connection runs there */
    if (c->iot)
        object_unref(&c->iot->obj);
    c->iot = iot;
    return iot ? exp->common.loop : loop_pool_pick(&c->pool_slot);
}

void nbd_conn_attach(struct nbd_conn *c, struct nbd_export *exp)
{
    /* An export's iothread serves all its clients; several iothreads (a
     * list in `iothread`) share them, least busy first; otherwise clients
     * are spread over the worker loops so that several of them use every
     * core. */
    struct loop *target;

    if (exp->common.n_loops) {
        unsigned best = 0;
        if (!exp->loop_users)
            exp->loop_users = xcalloc(exp->common.n_loops, sizeof(*exp->loop_users));
        for (unsigned i = 1; i < exp->common.n_loops; i++)
            if (exp->loop_users[i] < exp->loop_users[best])
                best = i;
        exp->loop_users[best]++;
        c->iot_slot = best;
        target = exp->common.loops[best];
        c->iot = exp->common.iothreads[best];
        object_ref(&c->iot->obj);
    } else {
        target = nbd_conn_pick_loop(c, exp);
    }

    c->exp = exp;
    exp->nclients++;
    log_info("nbd: client %s attached to export '%s'%s%s", c->peer, exp->common.id,
             c->tls_identity ? " as " : "", c->tls_identity ? c->tls_identity : "");
    if (c->hs_timer)
        loop_timer_free(c->hs_timer);
    c->hs_timer = NULL;
    free(c->hs_buf);
    c->hs_buf = NULL;
    if (nbd_transmission_init(c) < 0) {
        nbd_conn_close(c, "out of memory");
        return;
    }
    c->state = CONN_TRANSMISSION;
    nbd_conn_flush(c);
    if (c->state == CONN_CLOSED)
        return;
    if (target == c->loop) {
        nbd_conn_update_watch(c);
        return;
    }
    if (c->watch)
        loop_watch_del(c->watch);
    c->watch = NULL;
    c->loop = target;
    nbd_conn_ref(c);
    loop_call(target, nbd_conn_attach_cb, c);
}

/* ---- output ---- */

int nbd_out_append(struct nbd_conn *c, const void *data, size_t len)
{
    if (c->out_len + len > c->out_cap) {
        size_t cap = MAX(c->out_cap * 2, c->out_len + len + 256);
        c->out = xrealloc(c->out, cap);
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
    return 0;
}

/* Gather the unsent output into iov; returns the number of entries. */
static int nbd_conn_gather(struct nbd_conn *c, struct iovec *iov, size_t *total)
{
    int n = 0;
    size_t skip = c->reply_off;
    struct nbd_slot *s;

    *total = 0;
    if (c->out_sent < c->out_len) {
        iov[n].iov_base = c->out + c->out_sent;
        iov[n].iov_len = c->out_len - c->out_sent;
        *total += iov[n++].iov_len;
    }
    for (s = c->reply_head; s && n < NBD_SEND_IOV; s = s->next) {
        for (int i = 0; i < s->iovcnt && n < NBD_SEND_IOV; i++) {
            size_t len = s->iov[i].iov_len;
            if (skip >= len) {
                skip -= len;
                continue;
            }
            iov[n].iov_base = (char *)s->iov[i].iov_base + skip;
            iov[n].iov_len = len - skip;
            skip = 0;
            *total += iov[n++].iov_len;
        }
        if (s->splice_len)
            break;          /* its data goes out by splice before anything else */
    }
    return n;
}

static size_t slot_iov_len(const struct nbd_slot *s)
{
    size_t len = 0;
    for (int i = 0; i < s->iovcnt; i++)
        len += s->iov[i].iov_len;
    return len;
}

static size_t slot_reply_len(const struct nbd_slot *s)
{
    return slot_iov_len(s) + s->splice_len;
}

/* The connection's pipe for spliced replies, made on first use; false if it
 * cannot have one (the reply is then copied). */
bool nbd_conn_can_splice(struct nbd_conn *c)
{
    if (!c->tr->splice)
        return false;
    if (c->pipe[0] >= 0)
        return true;
    if (pipe2(c->pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
        c->pipe[0] = c->pipe[1] = -1;
        return false;
    }
    fcntl(c->pipe[1], F_SETPIPE_SZ, NBD_PIPE_SIZE);   /* else the default: more rounds */
    int fl = fcntl(c->fd, F_GETFL);     /* splice to a socket only obeys O_NONBLOCK */
    if (fl >= 0 && !(fl & O_NONBLOCK))
        fcntl(c->fd, F_SETFL, fl | O_NONBLOCK);
    return true;
}

/* Send more of reply_head's spliced data: refill the pipe from the file
 * when it is empty, then pass the pipe to the socket.  Returns bytes sent
 * or -errno; *total is what was offered.  A file that ends early
 * (truncated by someone else) reads as zeros, as a short read does. */
static ssize_t nbd_conn_splice_step(struct nbd_conn *c, struct nbd_slot *s, size_t *total)
{
    static const char zeros[64 << 10];
    size_t done = c->reply_off - slot_iov_len(s);
    size_t left = s->splice_len - done - c->pipe_fill;

    if (c->pipe_fill == 0) {
        loff_t off = s->splice_off + done;
        ssize_t k;
        do {
            k = splice(s->splice_fd, &off, c->pipe[1], NULL, MIN(left, NBD_PIPE_SIZE),
                       SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
        } while (k < 0 && errno == EINTR);
        if (k == 0)
            k = write(c->pipe[1], zeros, MIN(left, sizeof(zeros)));
        if (k <= 0)
            return k < 0 ? -errno : -EIO;
        c->pipe_fill = k;
    }
    *total = c->pipe_fill;
    ssize_t r = c->tr->splice(c, c->pipe[0], c->pipe_fill);
    if (r > 0)
        c->pipe_fill -= r;
    return r;
}

/* Account n sent bytes: handshake output first, then queued replies. */
static void nbd_conn_consume(struct nbd_conn *c, size_t n)
{
    size_t k = MIN(n, c->out_len - c->out_sent);

    c->out_sent += k;
    n -= k;
    if (c->out_sent == c->out_len)
        c->out_sent = c->out_len = 0;
    while (n > 0 && c->reply_head) {
        struct nbd_slot *s = c->reply_head;
        size_t left = slot_reply_len(s) - c->reply_off;
        if (n < left) {
            c->reply_off += n;
            return;
        }
        n -= left;
        c->reply_off = 0;
        c->reply_head = s->next;
        if (!c->reply_head)
            c->reply_tail = NULL;
        nbd_slot_release(s);
    }
}

void nbd_conn_flush(struct nbd_conn *c)
{
    struct iovec iov[NBD_SEND_IOV];
    bool moved = false;

    while (c->state != CONN_CLOSED) {
        struct nbd_slot *head = c->reply_head;
        size_t total = 0;
        int n = 0;
        ssize_t r;

        if (c->out_sent == c->out_len && head && head->splice_len &&
            c->reply_off >= slot_iov_len(head)) {
            r = nbd_conn_splice_step(c, head, &total);
        } else {
            n = nbd_conn_gather(c, iov, &total);
            if (n == 0) {
                c->want_out = false;
                break;
            }
            r = c->tr->sendv(c, iov, n);
        }
        if (r == -EAGAIN) {
            c->want_out = true;
            break;
        }
        if (r < 0) {
            nbd_conn_close(c, "write error");
            return;
        }
        nbd_conn_consume(c, r);
        moved |= r > 0;
        if ((size_t)r < total) {
            c->want_out = true;
            break;
        }
    }
    if (c->state == CONN_CLOSED)
        return;
    /* how long replies have waited for a client that does not read (budget.c) */
    if (!c->want_out)
        __atomic_store_n(&c->out_stalled_since, 0, __ATOMIC_RELEASE);
    else if (moved || !c->out_stalled_since)
        __atomic_store_n(&c->out_stalled_since, now_ms(), __ATOMIC_RELEASE);
    if (c->state == CONN_HANDSHAKE && c->rx_paused &&
        c->out_len - c->out_sent < NBD_HS_OUT_MAX) {
        c->rx_paused = false;   /* the client reads its replies again */
    }
    if (c->state == CONN_TRANSMISSION && !c->want_out &&
        (c->disc || c->rx_eof || nbd_conn_drained(c)) && c->busy_slots == 0) {
        nbd_conn_close(c, c->disc ? "client disconnected" :
                          c->rx_eof ? "client closed" : "server shutting down");
        return;
    }
    nbd_conn_update_watch(c);
}

static void nbd_conn_flush_cb(void *opaque)
{
    struct nbd_conn *c = opaque;
    nbd_conn_flush(c);
    nbd_conn_unref(c);
}

void nbd_conn_schedule_flush(struct nbd_conn *c)
{
    if (c->flush_defer.pending || c->want_out)
        return;   /* already queued, or waiting for LOOP_OUT */
    nbd_conn_ref(c);
    c->flush_defer.fn = nbd_conn_flush_cb;
    c->flush_defer.opaque = c;
    loop_defer(c->loop, &c->flush_defer);
}

/* ---- moving to another loop (x-blockdev-set-iothread) ----
 *
 * As QEMU drains a node before it changes its AioContext: the main thread
 * asks the connection's loop to quiesce it (nbd_conn_move).  There it stops
 * taking requests (a WRITE payload half received stays in its buffers),
 * lets every request in flight complete and its reply queue, and waits for
 * its deferred flush, parser kick, budget wake-up or time-slice resume to
 * run: each of those holds a reference, so the connection is idle when only
 * the socket's and the move's remain (nbd_conn_unref notices).  The loop
 * then drops its socket watch and hands the connection to the main thread,
 * which owns it alone until it posts it to the export's loop (wherever the
 * export is by then, so moves requested meanwhile fold into one); that loop
 * watches the socket, sends the queued replies and parses what was
 * buffered.  While a move is under way the main thread posts nothing to
 * the connection (a close or a graceful stop waits for the move's end), so
 * at every moment exactly one thread touches it. */

static void nbd_conn_quiesce_cb(void *opaque)
{
    struct nbd_conn *c = opaque;

    if (c->state != CONN_TRANSMISSION) {
        c->move_closed = true;
        loop_call(loop_main(), nbd_conn_moved_cb, c);
        return;
    }
    c->quiescing = true;
    nbd_conn_update_watch(c);
    if (__atomic_load_n(&c->refcnt, __ATOMIC_ACQUIRE) == 2)
        nbd_conn_quiesced(c);
}

/* The connection's loop, idle: let go of it (nothing of it is pending here). */
static void nbd_conn_quiesced(struct nbd_conn *c)
{
    c->quiescing = false;
    c->move_closed = false;
    loop_watch_del(c->watch);
    c->watch = NULL;
    /* buffers registered with this loop's ring: the next loop registers its own */
    for (int i = 0; i < NBD_SLOTS; i++)
        aio_fixed_release(&c->slots[i].fixed);
    loop_call(loop_main(), nbd_conn_moved_cb, c);
}

/* Main thread, the connection idle and unowned (or closed): post it to its
 * export's loop now, then what was asked of it meanwhile. */
static void nbd_conn_moved_cb(void *opaque)
{
    struct nbd_conn *c = opaque;
    bool close = c->close_after_move, drain = c->drain_after_move;

    c->moving = c->close_after_move = c->drain_after_move = false;
    if (c->move_closed) {
        nbd_conn_unref(c);
        return;
    }
    loop_pool_release(c->pool_slot);
    c->pool_slot = -1;
    c->loop = nbd_conn_pick_loop(c, c->exp);
    if (close || drain)
        nbd_conn_ref(c);
    loop_call(c->loop, nbd_conn_attach_cb, c);     /* the move's reference goes along */
    if (close)
        loop_call(c->loop, nbd_conn_close_cb, c);
    else if (drain)
        loop_call(c->loop, nbd_conn_drain_cb, c);
}

void nbd_conn_move(struct nbd_conn *c)
{
    struct nbd_export *exp = c->exp;

    if (c->moving)
        return;                 /* the move under way ends where the export is */
    if (c->iot_slot >= 0 || c->iot == exp->common.iothread)
        return;                 /* already there (any worker loop will do for main) */
    if (!nbd_conn_tryref(c))
        return;                 /* being torn down */
    c->moving = true;
    loop_call(c->loop, nbd_conn_quiesce_cb, c);
}
