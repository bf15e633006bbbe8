/*
 * Accepting connections when file descriptors run out.
 *
 * When the fd table is full, accept() fails with EMFILE (or ENFILE) and the
 * pending connection stays in the backlog, so a level-triggered listener is
 * ready again at once: retrying spins.  Every listener goes through here:
 *
 *  - accept_conn() takes a connection.  bexd keeps ACCEPT_FD_RESERVE fds
 *    open on /dev/null; a listener that serves management (the QMP
 *    monitor) may spend one of them when the table is full, so an operator
 *    can still get in and remove exports.  The reserve is refilled as soon
 *    as fds are free again (accept_reserve_refill(), also called by every
 *    accept_conn()).
 *  - accept_backoff() is called with the error: for the out-of-fds family
 *    it logs (at most once per ACCEPT_LOG_MS, with how many failures it
 *    did not log) and tells the caller to stop watching its listening
 *    sockets; a timer calls the caller's resume function ACCEPT_PAUSE_MS
 *    later, and the client still waiting in the backlog is served then.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include "util/loop.h"

#define ACCEPT_FD_RESERVE 2
#define ACCEPT_PAUSE_MS   100
#define ACCEPT_LOG_MS     5000

/* accept4(SOCK_NONBLOCK | SOCK_CLOEXEC); -errno on failure.  management:
 * may use a reserved fd when the table is full. */
int accept_conn(int lfd, bool management);
/* Reopen reserved fds that were spent (cheap when none were). */
void accept_reserve_refill(void);

struct accept_backoff {
    const char *who;                 /* "nbd", "monitor qmp0", ... */
    struct loop *loop;               /* where the listener runs */
    loop_fn *resume;                 /* watch the listening sockets again */
    void *opaque;
    struct loop_timer *timer;        /* made on first use */
    uint64_t last_log_ms;
    unsigned unlogged;
};

/* accept_conn() failed with err (> 0): true if the caller must stop
 * watching its listening sockets (b->resume runs later); false for errors
 * that need nothing (EAGAIN, ECONNABORTED, ...). */
bool accept_backoff(struct accept_backoff *b, int err);
/* Cancel a pending resume and free the timer (listener closing). */
void accept_backoff_cleanup(struct accept_backoff *b);
