/* NBD server: the shared operation behind nbd-server-start and --nbd-server. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <jansson.h>
#include "util/error.h"

/* opts: checked NbdServerOptions (flat SocketAddress in "addr"). */
int  nbd_server_start(json_t *opts, error **errp);
void nbd_server_stop(void);
bool nbd_server_running(void);
/* Main thread, waiting for what only this server's handshake can give (an
 * nbd block node connecting to this very process): serve the listening
 * sockets and the connections still negotiating, for up to timeout_ms or
 * until wake_fd is readable.  The main loop stands still meanwhile:
 * nothing else is dispatched. */
void nbd_server_pump(int wake_fd, int timeout_ms);
/* Main thread: is fd, a connected socket, a client of this server? */
bool nbd_server_is_peer(int fd);

/* Graceful stop (SIGTERM): stop accepting, let each client finish the
 * requests it sent, call done when no connection is left. */
void nbd_server_drain(void (*done)(void *), void *opaque);
/* Log each connection still open (the stop deadline passed). */
void nbd_server_report_stuck(void);
int  nbd_server_nclients(void);

/* Counters of the server for /metrics (main thread). */
struct nbd_server_counters {
    int open;
    uint64_t accepted, handshake_failures, tls_failures;
};
void nbd_server_counters(struct nbd_server_counters *out);
/* Bytes of request buffers the connections hold now (budget.c; any thread). */
size_t nbd_budget_used(void);
