/*
 * The systemd service protocols, without libsystemd: socket activation
 * (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES) and readiness notification
 * (NOTIFY_SOCKET: READY=1, STATUS=, STOPPING=1, WATCHDOG=1).
 *
 * Both are read once at start-up by systemd_init() and the variables are
 * removed from the environment, so no child inherits them.  When bexd is
 * not started by systemd every function here is a cheap no-op.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>

/* Main thread, before anything else opens a file descriptor. */
void systemd_init(void);

/* Socket activation.  The passed socket called name (LISTEN_FDNAMES; a
 * socket without a name is "unknown", as systemd says), or -1.  Returns a
 * close-on-exec duplicate the caller owns, so a server that stops and
 * starts again can have the socket anew. */
int  systemd_listen_fd_dup(const char *name);
/* How many sockets were passed, and the name of the i-th one. */
int  systemd_listen_count(void);
const char *systemd_listen_name(int i);

/* Readiness.  True when NOTIFY_SOCKET was set. */
bool systemd_notify_enabled(void);
/* Send one datagram of "KEY=VALUE\n" lines; no-op without a notify socket. */
void systemd_notify(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Watchdog interval the service manager asked for (WATCHDOG_USEC for this
 * process), in microseconds; 0 when none. */
uint64_t systemd_watchdog_usec(void);
