/*
 * A GnuTLS session (server or client) over a non-blocking socket.  Nothing here
 * blocks: every call returns -EAGAIN when the socket is not ready, and
 * tls_session_wait_events() says which direction to wait for.  A session
 * belongs to one thread at a time (it may move between loops with its
 * connection); it pins its credentials object until freed.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include "crypto/tls-creds.h"
#include "util/error.h"

struct tls_session;

struct tls_session *tls_session_new_server(struct tls_creds *creds, int fd, error **errp);
/* A client session; hostname (NULL: none) is the name the server's x509
 * certificate must carry when the credentials verify the peer. */
struct tls_session *tls_session_new_client(struct tls_creds *creds, int fd,
                                           const char *hostname, error **errp);
void tls_session_free(struct tls_session *s);

/* 0 when complete, -EAGAIN to wait, -1 on failure (*errp set). */
int tls_session_handshake(struct tls_session *s, error **errp);
/* LOOP_IN or LOOP_OUT: what the last -EAGAIN waits for. */
uint32_t tls_session_wait_events(struct tls_session *s);
/* After the handshake: verify the peer's certificate (x509 with
 * verify-peer; a client's server also by host name) and, on a server, ask
 * authz object authzid (NULL: none) about the client's identity (the
 * certificate's DN, or the PSK username).  0 or -1. */
int tls_session_check_peer(struct tls_session *s, const char *authzid, error **errp);
/* The authenticated identity, or NULL. */
const char *tls_session_peer_name(const struct tls_session *s);

/* Plaintext I/O.  recv fills as much of buf as the data already received
 * allows: > 0 bytes, 0 at end of stream, -EAGAIN, -errno.  sendv returns
 * the bytes taken (possibly short) or -errno; after a short count or
 * -EAGAIN, call it again with the same unsent data once writable. */
ssize_t tls_session_recv(struct tls_session *s, void *buf, size_t len);
ssize_t tls_session_sendv(struct tls_session *s, const struct iovec *iov, int iovcnt);
/* Decrypted or received bytes not yet returned by recv (the socket may
 * have nothing left to wake a poller). */
bool tls_session_pending(struct tls_session *s);
/* Send close_notify if the socket takes it now; never waits. */
void tls_session_bye(struct tls_session *s);
