/*
 * Character devices (--chardev, chardev-add, chardev-change, chardev-remove,
 * query-chardev), as QEMU's: a backend (socket, ringbuf/memory, stdio)
 * carries bytes between a peer and at most one frontend (a QMP monitor).
 *
 * The frontend sees a connection that comes and goes: CHARDEV_OPENED when
 * a peer is there (a client connected to a server socket, a client socket
 * connected, stdio), CHARDEV_CLOSED when it left.  While open it reads and
 * writes without blocking, as with a file descriptor, and says which
 * readiness it wants to hear about; ready() then reports LOOP_IN/LOOP_OUT
 * (and EPOLLHUP/EPOLLERR).  Everything runs in the main loop.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <jansson.h>
#include "util/error.h"

struct chardev;

enum chardev_event { CHARDEV_OPENED, CHARDEV_CLOSED };

struct chardev_fe_ops {
    void (*event)(void *opaque, enum chardev_event ev);
    void (*ready)(void *opaque, uint32_t revents);
};

/* chardev-add's ChardevBackend ({"type": ..., "data": {...}}, checked). */
int  chardev_add(const char *id, json_t *backend, error **errp);
/* --chardev: QemuOpts-style flat options (backend=, id=, path=...). */
int  chardev_add_opts(json_t *opts, error **errp);
/* The checking half of chardev_add_opts(): the backend's data (new
 * reference; *idp and *backendp point into opts), or NULL with errp set.
 * Creates nothing. */
json_t *chardev_check_opts(json_t *opts, const char **idp, const char **backendp,
                           error **errp);
struct chardev *chardev_find(const char *id);
const char *chardev_id(const struct chardev *c);

/* Whether a monitor on it may offer out-of-band execution, as QEMU's. */
bool chardev_offers_oob(const struct chardev *c);

/* Frontends.  attach fails ("Device 'ID' is in use") if one is attached;
 * when the backend is already open, OPENED is delivered at once. */
int  chardev_attach(struct chardev *c, const struct chardev_fe_ops *ops, void *opaque,
                    error **errp);
/* Bytes from the peer: > 0, 0 at end of input, -EAGAIN, or -errno. */
ssize_t chardev_read(struct chardev *c, void *buf, size_t len);
/* Bytes to the peer (also to the logfile): > 0, -EAGAIN, or -errno. */
ssize_t chardev_write(struct chardev *c, const void *buf, size_t len);
/* Which of LOOP_IN / LOOP_OUT the frontend wants ready() for. */
void chardev_set_interest(struct chardev *c, uint32_t events);
/* Drop the peer now (the frontend gets CLOSED). */
void chardev_disconnect(struct chardev *c);

/* --daemonize took stdin and stdout away: stdio chardevs are refused. */
void chardev_set_daemonized(void);
/* Shutdown: close every chardev (frontends get CLOSED first). */
void chardevs_close_all(void);
