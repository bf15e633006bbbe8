/*
 * Socket addresses as QAPI's SocketAddress (flat: {"type":"inet","host":..,
 * "port":..} / "unix" path / "fd" str / "vsock") and SocketAddressLegacy
 * ({"type":"inet","data":{...}}), and listening sockets for them.
 */
#pragma once
#include <stdbool.h>
#include <jansson.h>
#include "util/error.h"

/* Convert a checked SocketAddressLegacy to the flat SocketAddress form. */
json_t *socket_address_flatten(json_t *legacy);
/* Listen on a checked flat SocketAddress.  Returns the number of listening
 * fds put in fds[] (IPv4 and IPv6 may give two), or -1 with errp set.
 * Sockets are non-blocking and close-on-exec. */
int socket_listen(json_t *addr, int backlog, int fds[], int max_fds, error **errp);
/* Connect to a checked flat SocketAddress (unix, inet, or an fd that is a
 * connected socket), blocking until connected as QEMU's chardevs do.
 * Returns a non-blocking close-on-exec fd, or -1 with errp set ("Failed to
 * connect to 'PATH'" / "'HOST:PORT'"). */
int socket_connect(json_t *addr, error **errp);
/* Remove a UNIX socket path created by socket_listen (no-op for others). */
void socket_address_cleanup(json_t *addr);
/* Human form, e.g. "unix:/tmp/s" or "127.0.0.1:10809"; caller frees. */
char *socket_address_str(json_t *addr);
int socket_set_nonblock(int fd, bool nonblock);
/* The local (or, with peer, the remote) address of a socket as a flat
 * SocketAddress, as QEMU reports it: numeric host and port with ipv4 or
 * ipv6 set; a UNIX path, with abstract and tight when abstract.  NULL if
 * unknown. */
json_t *socket_fd_address(int fd, bool peer);
/* Set while a QMP command runs: like qsd, "fd" addresses are then refused
 * (file descriptor passing over QMP is not supported). */
void socket_set_monitor_context(bool in_monitor);
