/*
 * GnuTLS sessions over non-blocking sockets: the NBD server's, and the NBD
 * client driver's (which checks the server's certificate and host name).
 *
 * Theory of operation.  GnuTLS reads through our pull function, which
 * serves it from a 64 KiB receive buffer refilled with one recv() when
 * empty: pipelined requests arrive as many small records, and reading them
 * with one system call each would dominate the cost.  Writes go out with
 * one sendmsg per record through a vectored push function.
 *
 * sendv packs small iovec entries (reply headers, 4 KiB reads) into one
 * record of up to 16 KiB in a staging buffer and sends large ones straight
 * from the caller's memory.  When the socket is full GnuTLS keeps the
 * encrypted record and says EAGAIN; the record's plaintext is then already
 * consumed, so the next call first finishes that record (send with NULL/0
 * as GnuTLS allows) and counts its bytes then.  Callers always resend
 * from the first unsent byte, so counts stay consistent.
 *
 * recv loops over records until the caller's buffer is full or GnuTLS
 * would block; data left in our buffer or in GnuTLS after a full buffer is
 * reported by tls_session_pending(), since no poller will wake for it.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <gnutls/x509.h>
#include "crypto/authz.h"
#include "crypto/tls-session.h"
#include "util/cleanup.h"
#include "util/loop.h"
#include "util/xalloc.h"

#define TLS_RBUF        (64u << 10)
#define TLS_RECORD      16384           /* largest TLS plaintext record */
#define TLS_MAX_DN      4096
#define TLS_HS_RETRIES  64              /* non-fatal alerts tolerated per call */

struct tls_session {
    gnutls_session_t sess;
    struct tls_creds *creds;
    int fd;
    bool client;
    char *hostname;                     /* client: the name the certificate must have */
    bool send_pending;                  /* a record waits in GnuTLS */
    char *peer;                         /* DN or PSK username */
    uint8_t *rbuf;
    size_t rb_start, rb_end;
    uint8_t stage[TLS_RECORD];
};

/* ---- transport callbacks ---- */

static ssize_t tls_pull(gnutls_transport_ptr_t p, void *data, size_t size)
{
    struct tls_session *s = p;
    size_t n;

    if (s->rb_start == s->rb_end) {
        ssize_t r;
        s->rb_start = s->rb_end = 0;
        do {
            r = recv(s->fd, s->rbuf, TLS_RBUF, MSG_DONTWAIT);
        } while (r < 0 && errno == EINTR);
        if (r < 0) {
            gnutls_transport_set_errno(s->sess, errno == EWOULDBLOCK ? EAGAIN : errno);
            return -1;
        }
        if (r == 0)
            return 0;
        s->rb_end = r;
    }
    n = MIN(size, s->rb_end - s->rb_start);
    memcpy(data, s->rbuf + s->rb_start, n);
    s->rb_start += n;
    return n;
}

static int tls_pull_timeout(gnutls_transport_ptr_t p, unsigned ms)
{
    struct tls_session *s = p;
    struct pollfd pfd = { .fd = s->fd, .events = POLLIN };

    if (s->rb_start < s->rb_end)
        return 1;
    return poll(&pfd, 1, 0);   /* never wait: the loop does that */
}

static ssize_t tls_push(gnutls_transport_ptr_t p, const giovec_t *iov, int iovcnt)
{
    struct tls_session *s = p;
    struct msghdr msg = { .msg_iov = (struct iovec *)iov, .msg_iovlen = iovcnt };
    ssize_t r;

    do {
        r = sendmsg(s->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        gnutls_transport_set_errno(s->sess, errno == EWOULDBLOCK ? EAGAIN : errno);
    return r;
}

/* ---- set-up ---- */

static int session_set_creds(struct tls_session *s, struct tls_creds *c, error **errp)
{
    int r;

    if (!c->prio) {
        const char *err_pos = NULL;
        gnutls_priority_t tmp;
        r = gnutls_priority_init(&tmp, c->priority, &err_pos);
        error_setg(errp, "Unable to set TLS session priority %s: %s",
                   c->priority, gnutls_strerror(r < 0 ? r : GNUTLS_E_INVALID_REQUEST));
        if (r >= 0)
            gnutls_priority_deinit(tmp);
        return -1;
    }
    gnutls_priority_set(s->sess, c->prio);
    switch (c->kind) {
    case TLS_CREDS_X509:
        r = gnutls_credentials_set(s->sess, GNUTLS_CRD_CERTIFICATE, c->u.x509);
        /* request, not require: the check after the handshake enforces */
        if (!s->client)
            gnutls_certificate_server_set_request(s->sess, GNUTLS_CERT_REQUEST);
        break;
    case TLS_CREDS_PSK:
        r = gnutls_credentials_set(s->sess, GNUTLS_CRD_PSK,
                                   s->client ? (void *)c->u.psk_client : (void *)c->u.psk_server);
        break;
    default:
        r = gnutls_credentials_set(s->sess, GNUTLS_CRD_ANON,
                                   s->client ? (void *)c->u.anon_client : (void *)c->u.anon_server);
        break;
    }
    if (r < 0) {
        error_setg(errp, "Cannot set session credentials: %s", gnutls_strerror(r));
        return -1;
    }
    return 0;
}

static struct tls_session *session_new(struct tls_creds *c, int fd, bool client,
                                       const char *hostname, error **errp)
{
    struct tls_session *s = xzalloc(sizeof(*s));
    int r;

    s->rbuf = xmalloc(TLS_RBUF);
    s->fd = fd;
    s->creds = c;
    s->client = client;
    s->hostname = hostname ? xstrdup(hostname) : NULL;
    object_ref(&c->obj);
    r = gnutls_init(&s->sess, (client ? GNUTLS_CLIENT : GNUTLS_SERVER) | GNUTLS_NONBLOCK |
                              GNUTLS_NO_SIGNAL);
    if (r < 0) {
        s->sess = NULL;
        error_setg(errp, "Cannot initialize TLS session: %s", gnutls_strerror(r));
        tls_session_free(s);
        return NULL;
    }
    if (session_set_creds(s, c, errp) < 0) {
        tls_session_free(s);
        return NULL;
    }
    gnutls_transport_set_ptr(s->sess, s);
    gnutls_transport_set_pull_function(s->sess, tls_pull);
    gnutls_transport_set_pull_timeout_function(s->sess, tls_pull_timeout);
    gnutls_transport_set_vec_push_function(s->sess, tls_push);
    return s;
}

struct tls_session *tls_session_new_server(struct tls_creds *c, int fd, error **errp)
{
    return session_new(c, fd, false, NULL, errp);
}

struct tls_session *tls_session_new_client(struct tls_creds *c, int fd, const char *hostname,
                                           error **errp)
{
    return session_new(c, fd, true, hostname, errp);
}

void tls_session_free(struct tls_session *s)
{
    if (!s)
        return;
    if (s->sess)
        gnutls_deinit(s->sess);
    object_unref(&s->creds->obj);
    free(s->peer);
    free(s->hostname);
    free(s->rbuf);
    free(s);
}

/* ---- handshake and peer checks ---- */

int tls_session_handshake(struct tls_session *s, error **errp)
{
    for (int i = 0; i < TLS_HS_RETRIES; i++) {
        int r = gnutls_handshake(s->sess);
        if (r == 0)
            return 0;
        if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
            return -EAGAIN;
        if (gnutls_error_is_fatal(r)) {
            error_setg(errp, "TLS handshake failed: %s", gnutls_strerror(r));
            return -1;
        }
    }
    error_setg(errp, "TLS handshake failed: too many alerts");
    return -1;
}

uint32_t tls_session_wait_events(struct tls_session *s)
{
    return gnutls_record_get_direction(s->sess) ? LOOP_OUT : LOOP_IN;
}

const char *tls_session_peer_name(const struct tls_session *s)
{
    return s->peer;
}

static int cert_dn(gnutls_x509_crt_t crt, char **out, error **errp)
{
    size_t size = 0;
    int r = gnutls_x509_crt_get_dn(crt, NULL, &size);

    if (r != GNUTLS_E_SHORT_MEMORY_BUFFER || size > TLS_MAX_DN) {
        error_setg(errp, "Cannot get client distinguished name: %s",
                   gnutls_strerror(r < 0 ? r : GNUTLS_E_INTERNAL_ERROR));
        return -1;
    }
    *out = xmalloc(size + 1);
    r = gnutls_x509_crt_get_dn(crt, *out, &size);
    if (r < 0) {
        error_setg(errp, "Cannot get client distinguished name: %s", gnutls_strerror(r));
        return -1;
    }
    return 0;
}

/* One certificate of the peer's chain: dates, and the first one's DN. */
static int check_one_cert(struct tls_session *s, const gnutls_datum_t *der, bool first,
                          error **errp)
{
    gnutls_x509_crt_t crt;
    time_t now = time(NULL);
    int r = gnutls_x509_crt_init(&crt), ret = -1;

    if (r < 0) {
        error_setg(errp, "Cannot initialize certificate: %s", gnutls_strerror(r));
        return -1;
    }
    r = gnutls_x509_crt_import(crt, der, GNUTLS_X509_FMT_DER);
    if (r < 0)
        error_setg(errp, "Cannot import certificate: %s", gnutls_strerror(r));
    else if (gnutls_x509_crt_get_expiration_time(crt) < now)
        error_setg(errp, "The certificate has expired");
    else if (gnutls_x509_crt_get_activation_time(crt) > now)
        error_setg(errp, "The certificate is not yet activated");
    else if (first && s->client && !s->hostname)
        error_setg(errp, "No hostname for certificate validation");
    else if (first && s->client && !gnutls_x509_crt_check_hostname(crt, s->hostname))
        error_setg(errp, "Certificate does not match the hostname %s", s->hostname);
    else if (!first || cert_dn(crt, &s->peer, errp) == 0)
        ret = 0;
    gnutls_x509_crt_deinit(crt);
    return ret;
}

static int check_certificate(struct tls_session *s, error **errp)
{
    const gnutls_datum_t *certs;
    unsigned status = 0, n = 0;
    int r = gnutls_certificate_verify_peers2(s->sess, &status);

    if (r < 0) {
        error_setg(errp, "Verify failed: %s", gnutls_strerror(r));
        return -1;
    }
    if (status) {
        error_setg(errp, "%s", tls_cert_status_reason(status));
        return -1;
    }
    certs = gnutls_certificate_get_peers(s->sess, &n);
    if (!certs || n == 0) {
        error_setg(errp, "No certificate peers");
        return -1;
    }
    for (unsigned i = 0; i < n; i++)
        if (check_one_cert(s, &certs[i], i == 0, errp) < 0)
            return -1;
    return 0;
}

static int authorize(struct tls_session *s, const char *authzid, const char *what,
                     error **errp)
{
    int r;

    if (!authzid)
        return 0;
    r = authz_is_allowed_by_id(authzid, s->peer, errp);
    if (r < 0)
        return -1;
    if (r == 0) {
        error_setg(errp, "TLS %s authz check for %s is denied", what, s->peer);
        return -1;
    }
    return 0;
}

int tls_session_check_peer(struct tls_session *s, const char *authzid, error **errp)
{
    switch (s->creds->kind) {
    case TLS_CREDS_X509:
        if (!s->creds->verify_peer)
            return 0;   /* as QEMU: no verification, no authorization */
        if (check_certificate(s, errp) < 0)
            return -1;
        return authorize(s, authzid, "x509", errp);
    case TLS_CREDS_PSK: {
        if (s->client)
            return 0;
        const char *user = gnutls_psk_server_get_username(s->sess);
        s->peer = xstrdup(user ? user : "");
        return authorize(s, authzid, "PSK", errp);
    }
    default:
        return 0;
    }
}

/* ---- data ---- */

bool tls_session_pending(struct tls_session *s)
{
    return s->rb_start < s->rb_end || gnutls_record_check_pending(s->sess) > 0;
}

ssize_t tls_session_recv(struct tls_session *s, void *buf, size_t len)
{
    size_t got = 0;

    while (got < len) {
        ssize_t r = gnutls_record_recv(s->sess, (char *)buf + got, len - got);
        if (r > 0) {
            got += r;
            continue;
        }
        if (r == GNUTLS_E_INTERRUPTED)
            continue;
        if (got)
            break;      /* report the error, if any, on the next call */
        if (r == 0 || r == GNUTLS_E_PREMATURE_TERMINATION)
            return 0;
        if (r == GNUTLS_E_AGAIN)
            return -EAGAIN;
        if (r == GNUTLS_E_REHANDSHAKE || gnutls_error_is_fatal(r))
            return r == GNUTLS_E_PUSH_ERROR || r == GNUTLS_E_PULL_ERROR ? -ECONNRESET : -EPROTO;
        /* a warning alert: keep reading */
    }
    return got;
}

/* Next chunk at (*i, *off): a pointer into the caller's memory for large
 * entries, else small entries packed into the staging buffer. */
static size_t next_chunk(struct tls_session *s, const struct iovec *iov, int iovcnt,
                         int i, size_t off, const void **p)
{
    size_t n = 0;

    if (iov[i].iov_len - off >= TLS_RECORD) {
        *p = (const char *)iov[i].iov_base + off;
        return TLS_RECORD;
    }
    for (; i < iovcnt && n < TLS_RECORD; i++, off = 0) {
        size_t take = MIN(iov[i].iov_len - off, TLS_RECORD - n);
        memcpy(s->stage + n, (const char *)iov[i].iov_base + off, take);
        n += take;
    }
    *p = s->stage;
    return n;
}

static void advance(const struct iovec *iov, int iovcnt, int *i, size_t *off, size_t n)
{
    while (n > 0 && *i < iovcnt) {
        size_t left = iov[*i].iov_len - *off;
        if (n < left) {
            *off += n;
            return;
        }
        n -= left;
        (*i)++;
        *off = 0;
    }
}

ssize_t tls_session_sendv(struct tls_session *s, const struct iovec *iov, int iovcnt)
{
    size_t done = 0, off = 0;
    int i = 0;

    if (s->send_pending) {
        ssize_t r = gnutls_record_send(s->sess, NULL, 0);
        if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
            return -EAGAIN;
        if (r < 0)
            return -EPIPE;
        s->send_pending = false;
        done = r;
        advance(iov, iovcnt, &i, &off, r);
    }
    while (i < iovcnt) {
        const void *p;
        size_t n;
        ssize_t r;

        if (iov[i].iov_len == off) {
            i++;
            off = 0;
            continue;
        }
        n = next_chunk(s, iov, iovcnt, i, off, &p);
        r = gnutls_record_send(s->sess, p, n);
        if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
            s->send_pending = true;
            break;
        }
        if (r < 0)
            return done ? (ssize_t)done : -EPIPE;
        done += r;
        advance(iov, iovcnt, &i, &off, r);
    }
    return done ? (ssize_t)done : -EAGAIN;
}

void tls_session_bye(struct tls_session *s)
{
    if (!s->send_pending)
        gnutls_bye(s->sess, GNUTLS_SHUT_WR);   /* non-blocking: best effort */
}
