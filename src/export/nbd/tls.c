/*
 * NBD over TLS: NBD_OPT_STARTTLS and the TLS transport.
 *
 * Theory of operation.  When a server has tls-creds, the handshake code
 * refuses every option but STARTTLS and ABORT while c->tr is still the
 * plain transport.  STARTTLS is answered with an ACK in clear text; then
 * the connection's transport becomes the TLS one and the TLS handshake
 * runs, driven by the main loop: this file owns the socket's watch for the
 * duration (c->watch is NULL meanwhile), waits for the direction GnuTLS
 * asks for on EAGAIN, and is bounded by the NBD handshake timer.  When it
 * completes, the client's certificate DN (or PSK username) is checked
 * against the tls-authz object, looked up by id now; the connection then
 * gets its ordinary watch back and option haggling resumes, encrypted.
 *
 * After NBD_OPT_GO the session moves with the connection to the export's
 * loop; the TLS transport state is only touched by the loop that owns the
 * connection.  Because GnuTLS and our receive buffer may hold data the
 * socket no longer signals, a read that fills the caller's buffer while
 * more is pending re-runs the reader before the loop sleeps.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include "config.h"
#include "object/object.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "nbd-internal.h"

#ifdef CONFIG_TLS
#include "crypto/tls-session.h"
#include "util/xalloc.h"

struct nbd_tls {
    struct tls_session *s;
    struct loop_watch *hs_watch;      /* during the TLS handshake */
    bool handshaking;
    struct loop_defer hs_kick;        /* handshake phase reader re-run */
};

/* ---- the transport ---- */

static void tls_kick_cb(void *opaque)
{
    struct nbd_conn *c = opaque;

    if (c->loop == loop_current() && c->state == CONN_HANDSHAKE)
        nbd_handshake_readable(c);
    else if (c->loop == loop_current() && c->state == CONN_TRANSMISSION)
        nbd_transmission_readable(c);
    nbd_conn_unref(c);
}

static void tls_kick(struct nbd_conn *c, struct nbd_tls *t)
{
    if (c->state == CONN_TRANSMISSION) {
        nbd_transmission_kick(c);
        return;
    }
    if (t->hs_kick.pending)
        return;
    nbd_conn_ref(c);
    t->hs_kick.fn = tls_kick_cb;
    t->hs_kick.opaque = c;
    loop_defer(c->loop, &t->hs_kick);
}

static ssize_t tls_recv(struct nbd_conn *c, void *buf, size_t len)
{
    struct nbd_tls *t = c->tr_opaque;
    ssize_t n;

    if (t->handshaking)
        return -EAGAIN;
    n = tls_session_recv(t->s, buf, len);
    if (n > 0 && (size_t)n == len && tls_session_pending(t->s))
        tls_kick(c, t);
    return n;
}

/* The STARTTLS ACK may still be queued in clear text when the TLS
 * handshake begins: it leaves first, unencrypted. */
static ssize_t tls_sendv(struct nbd_conn *c, const struct iovec *iov, int iovcnt)
{
    struct nbd_tls *t = c->tr_opaque;

    if (t->handshaking)
        return nbd_plain_transport.sendv(c, iov, iovcnt);
    return tls_session_sendv(t->s, iov, iovcnt);
}

static void tls_shutdown(struct nbd_conn *c)
{
    struct nbd_tls *t = c->tr_opaque;

    if (t->hs_watch)
        loop_watch_del(t->hs_watch);
    t->hs_watch = NULL;
    if (!t->handshaking)
        tls_session_bye(t->s);
    nbd_plain_transport.shutdown(c);
}

static void tls_close(struct nbd_conn *c)
{
    struct nbd_tls *t = c->tr_opaque;

    if (t->hs_watch)
        loop_watch_del(t->hs_watch);
    tls_session_free(t->s);
    free(t);
    c->tr_opaque = NULL;
    c->tr = &nbd_plain_transport;
    nbd_plain_transport.close(c);
}

const struct nbd_transport nbd_tls_transport = {
    .recv = tls_recv, .sendv = tls_sendv,
    .shutdown = tls_shutdown, .close = tls_close,
};

/* ---- the TLS handshake ---- */

static void tls_handshake_done(struct nbd_conn *c, struct nbd_tls *t)
{
    error *err = NULL;

    loop_watch_del(t->hs_watch);
    t->hs_watch = NULL;
    t->handshaking = false;
    if (tls_session_check_peer(t->s, nbd_srv.tls_authz, &err) < 0) {
        log_warn("nbd: TLS client from %s refused: %s", c->peer, err->msg);
        error_free(err);
        nbd_conn_close(c, "TLS peer check failed");
        return;
    }
    log_debug("nbd: TLS established with %s (%s)", c->peer,
              tls_session_peer_name(t->s) ? tls_session_peer_name(t->s) : "anonymous");
    c->tls = true;
    if (tls_session_peer_name(t->s))
        c->tls_identity = xstrdup(tls_session_peer_name(t->s));
    c->watch = loop_watch_fd(c->loop, c->fd, LOOP_IN, nbd_conn_io, c);
    /* the client may have sent options along with its last handshake message */
    nbd_handshake_readable(c);
}

static void tls_handshake_step(struct nbd_conn *c)
{
    struct nbd_tls *t = c->tr_opaque;
    error *err = NULL;
    int r;

    if (c->out_sent < c->out_len) {
        nbd_conn_flush(c);   /* the clear-text ACK */
        if (c->state == CONN_CLOSED)
            return;
        if (c->out_sent < c->out_len) {
            loop_watch_set(t->hs_watch, LOOP_OUT);
            return;
        }
    }
    r = tls_session_handshake(t->s, &err);
    if (r == -EAGAIN) {
        loop_watch_set(t->hs_watch, tls_session_wait_events(t->s));
        return;
    }
    if (r < 0) {
        log_debug("nbd: %s: %s", c->peer, err->msg);
        error_free(err);
        nbd_conn_close(c, "TLS handshake failed");
        return;
    }
    tls_handshake_done(c, t);
}

static void tls_handshake_io(void *opaque, uint32_t revents)
{
    struct nbd_conn *c = opaque;

    nbd_conn_ref(c);
    if (c->state == CONN_HANDSHAKE)
        tls_handshake_step(c);
    nbd_conn_unref(c);
}

static void starttls_refuse(struct nbd_conn *c, uint32_t type, const char *msg, bool fatal)
{
    nbd_opt_error(c, NBD_OPT_STARTTLS, type, "%s", msg);
    nbd_conn_flush(c);
    if (fatal)
        nbd_conn_close(c, msg);
}

void nbd_opt_starttls(struct nbd_conn *c, uint32_t len)
{
    struct tls_creds *creds;
    struct nbd_tls *t;
    error *err = NULL;

    if (c->tr != &nbd_plain_transport) {
        starttls_refuse(c, NBD_REP_ERR_INVALID, "TLS already enabled", false);
        return;
    }
    if (!nbd_srv.tls_creds) {
        starttls_refuse(c, NBD_REP_ERR_POLICY, "TLS not configured", false);
        return;
    }
    if (len) {
        starttls_refuse(c, NBD_REP_ERR_INVALID, "option 'starttls' has unexpected length", true);
        return;
    }
    creds = tls_creds_lookup(nbd_srv.tls_creds, TLS_ENDPOINT_SERVER, &err);
    t = xzalloc(sizeof(*t));
    if (!creds || !(t->s = tls_session_new_server(creds, c->fd, &err))) {
        log_warn("nbd: cannot start TLS for %s: %s", c->peer, err ? err->msg : "out of memory");
        error_free(err);
        free(t);
        nbd_conn_close(c, "TLS set-up failed");
        return;
    }
    nbd_opt_reply(c, NBD_OPT_STARTTLS, NBD_REP_ACK, NULL, 0);
    t->handshaking = true;
    c->tr = &nbd_tls_transport;
    c->tr_opaque = t;
    if (c->watch)
        loop_watch_del(c->watch);
    c->watch = NULL;
    t->hs_watch = loop_watch_fd(c->loop, c->fd, LOOP_IN, tls_handshake_io, c);
    tls_handshake_step(c);
}

/* ---- the server's credentials ---- */

int nbd_tls_check_creds(const char *id, error **errp)
{
    return tls_creds_lookup(id, TLS_ENDPOINT_SERVER, errp) ? 0 : -1;
}

/* A pinned credentials object cannot be deleted (object-del says it is in
 * use) while the server that names it runs. */
void nbd_tls_pin_creds(const char *id, bool pin)
{
    struct object *o = object_find(id);

    if (o && pin)
        object_ref(o);
    else if (o)
        object_unref(o);
}

#else /* !CONFIG_TLS: no credentials object can exist */

int nbd_tls_check_creds(const char *id, error **errp)
{
    if (!object_find(id))
        error_setg(errp, "No TLS credentials with id '%s'", id);
    else
        error_setg(errp, "Object with id '%s' is not TLS credentials", id);
    return -1;
}

void nbd_tls_pin_creds(const char *id, bool pin) {}

void nbd_opt_starttls(struct nbd_conn *c, uint32_t len)
{
    nbd_opt_error(c, NBD_OPT_STARTTLS, NBD_REP_ERR_POLICY, "TLS not configured");
    nbd_conn_flush(c);
}

#endif
