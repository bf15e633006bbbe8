/*
 * Listening sockets for QAPI SocketAddress values.
 *
 * Theory of operation: an inet address is resolved with getaddrinfo and a
 * socket listens on every address it resolves to (as QEMU's QIONetListener
 * does), succeeding if at least one does; with "to", each address tries
 * ports port..to until one is free.  A UNIX path is unlinked before bind,
 * as QEMU does, so a stale socket file does not block a restart.  An "fd"
 * address is an inherited descriptor number that must be a socket, or the
 * name of a socket systemd passed (LISTEN_FDNAMES, util/systemd.h).  Every
 * socket is non-blocking and close-on-exec.  Error messages are QEMU's.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/vm_sockets.h>
#include "util/cleanup.h"
#include "util/sockets.h"
#include "util/opts.h"
#include "util/xalloc.h"
#include "util/systemd.h"

int socket_set_nonblock(int fd, bool nonblock)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -errno;
    fl = nonblock ? fl | O_NONBLOCK : fl & ~O_NONBLOCK;
    return fcntl(fd, F_SETFL, fl) < 0 ? -errno : 0;
}

json_t *socket_address_flatten(json_t *legacy)
{
    json_t *type = json_object_get(legacy, "type");
    json_t *data = json_object_get(legacy, "data");
    if (!json_is_string(type) || !json_is_object(data))
        return NULL;
    json_t *flat = json_deep_copy(data);
    json_object_set(flat, "type", type);
    return flat;
}

/* ---- UNIX ---- */

static int unix_listen(json_t *addr, int backlog, int *fdp, error **errp)
{
    const char *path = opt_str(addr, "path", "");
    bool abstract = opt_bool(addr, "abstract", false);
    bool has_tight = opt_has(addr, "tight"), tight = opt_bool(addr, "tight", false);
    struct sockaddr_un un = { .sun_family = AF_UNIX };
    size_t len = strlen(path);
    socklen_t addrlen;

    if (!has_tight)
        tight = true;
    if (len > sizeof(un.sun_path) || (abstract && len > sizeof(un.sun_path) - 1)) {
        error_setg(errp, "UNIX socket path '%s' is too long", path);
        return -1;
    }
    CLEANUP_CLOSE int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        error_setg_errno(errp, errno, "Failed to create Unix socket");
        return -1;
    }
    if (abstract) {
        memcpy(un.sun_path + 1, path, len);
        addrlen = tight ? offsetof(struct sockaddr_un, sun_path) + 1 + len : sizeof(un);
    } else {
        memcpy(un.sun_path, path, len);
        addrlen = sizeof(un);
        if (unlink(path) < 0 && errno != ENOENT) {
            error_setg_errno(errp, errno, "Failed to unlink socket %s", path);
            return -1;
        }
    }
    if (bind(fd, (struct sockaddr *)&un, addrlen) < 0) {
        error_setg_errno(errp, errno, "Failed to bind socket to %s", path);
        return -1;
    }
    if (listen(fd, backlog) < 0) {
        error_setg_errno(errp, errno, "Failed to listen on socket");
        return -1;
    }
    *fdp = fd;
    fd = -1;
    return 0;
}

/* ---- inet ---- */

static int inet_bind_one(struct addrinfo *e, json_t *addr, int port_min, int port_max,
                         bool v6only, int backlog, int *fdp, error **errp)
{
    CLEANUP_CLOSE int fd = socket(e->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;

    if (fd < 0) {
        error_setg_errno(errp, errno, "Failed to create socket");
        return -1;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (opt_bool(addr, "keep-alive", false))
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    if (e->ai_family == AF_INET6) {
        int v = v6only;
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v, sizeof(v));
    }
    for (int p = port_min; p <= port_max; p++) {
        if (e->ai_family == AF_INET6)
            ((struct sockaddr_in6 *)e->ai_addr)->sin6_port = htons(p);
        else
            ((struct sockaddr_in *)e->ai_addr)->sin_port = htons(p);
        if (bind(fd, e->ai_addr, e->ai_addrlen) < 0) {
            if (errno == EADDRINUSE && p < port_max)
                continue;
            if (errno == EADDRINUSE) {
                error_setg_errno(errp, errno, "Failed to find an available port");
                return -1;
            }
            error_setg_errno(errp, errno, "Failed to bind socket");
            return -1;
        }
        if (listen(fd, backlog) < 0) {
            error_setg_errno(errp, errno, "Failed to listen on socket");
            return -1;
        }
        *fdp = fd;
        fd = -1;
        return 0;
    }
    error_setg(errp, "Failed to find an available port");
    return -1;
}

static int inet_listen(json_t *addr, int backlog, int fds[], int max_fds, error **errp)
{
    const char *host = opt_str(addr, "host", "");
    char port[33];              /* QEMU's buffer: a longer port is cut to 32 characters */
    snprintf(port, sizeof(port), "%s", opt_str(addr, "port", ""));
    bool has4 = opt_has(addr, "ipv4"), v4 = opt_bool(addr, "ipv4", false);
    bool has6 = opt_has(addr, "ipv6"), v6 = opt_bool(addr, "ipv6", false);
    struct addrinfo hints = { .ai_flags = AI_PASSIVE, .ai_socktype = SOCK_STREAM };
    struct addrinfo *res = NULL;
    error *first = NULL;
    int n = 0;

    if (opt_bool(addr, "numeric", false))
        hints.ai_flags |= AI_NUMERICHOST | AI_NUMERICSERV;
    if (has4 && has6 && !v4 && !v6) {
        error_setg(errp, "Cannot disable IPv4 and IPv6 at same time");
        return -1;
    }
    if ((has4 && v4 && !(has6 && v6)) || (has6 && !v6 && !has4))
        hints.ai_family = AF_INET;
    else if ((has6 && v6 && !(has4 && v4)) || (has4 && !v4 && !has6))
        hints.ai_family = AF_INET6;
    int rc = getaddrinfo(*host ? host : NULL, *port ? port : NULL, &hints, &res);
    if (rc != 0) {
        error_setg(errp, "address resolution failed for %s:%s: %s", host, port,
                   gai_strerror(rc));
        return -1;
    }
    bool any4 = false;
    for (struct addrinfo *e = res; e; e = e->ai_next)
        any4 |= e->ai_family == AF_INET;
    for (struct addrinfo *e = res; e && n < max_fds; e = e->ai_next) {
        if (e->ai_family != AF_INET && e->ai_family != AF_INET6)
            continue;
        int pmin = ntohs(e->ai_family == AF_INET6
                         ? ((struct sockaddr_in6 *)e->ai_addr)->sin6_port
                         : ((struct sockaddr_in *)e->ai_addr)->sin_port);
        json_t *to = json_object_get(addr, "to");
        int pmax = json_is_integer(to) ? (int)json_integer_value(to) : pmin;
        error *err = NULL;
        if (inet_bind_one(e, addr, pmin, MAX(pmin, pmax), any4 || (has6 && v6 && has4 && !v4),
                          backlog, &fds[n], &err) == 0)
            n++;
        else if (!first)
            first = err;
        else
            error_free(err);
    }
    freeaddrinfo(res);
    if (n == 0) {
        if (!first)
            error_setg(&first, "Failed to create a socket");
        error_propagate(errp, first);
        return -1;
    }
    error_free(first);
    return n;
}

/* ---- fd, vsock ---- */

static bool monitor_context;

void socket_set_monitor_context(bool in_monitor)
{
    monitor_context = in_monitor;
}

static int fd_listen(json_t *addr, int backlog, int *fdp, error **errp)
{
    const char *s = opt_str(addr, "str", "");
    char *end;
    struct stat st;

    /* A socket systemd passed by this name (bexd's extension; qsd takes
     * numbers only).  A duplicate, so the named socket outlives its user. */
    int named = systemd_listen_fd_dup(s);
    if (named >= 0) {
        socket_set_nonblock(named, true);
        *fdp = named;
        return 0;
    }
    if (monitor_context) {
        error_setg(errp, "only QEMU supports file descriptor passing");
        return -1;
    }
    errno = 0;
    long v = strtol(s, &end, 10);
    if (!*s || *end || errno || v < 0 || v > INT_MAX) {
        error_setg(errp, "Unable to parse FD number %s", s);
        return -1;
    }
    if (fstat((int)v, &st) < 0 || !S_ISSOCK(st.st_mode)) {
        error_setg(errp, "File descriptor '%s' is not a socket", s);
        return -1;
    }
    int fd = (int)v;
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    socket_set_nonblock(fd, true);
    if (listen(fd, backlog) < 0) {
        error_setg_errno(errp, errno, "Failed to listen on fd socket");
        return -1;
    }
    *fdp = fd;
    return 0;
}

static int parse_u32(const char *s, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (!*s || *end || errno || v > UINT32_MAX)
        return -1;
    *out = v;
    return 0;
}

static int vsock_listen(json_t *addr, int backlog, int *fdp, error **errp)
{
    struct sockaddr_vm svm = { .svm_family = AF_VSOCK };
    unsigned cid, port;

    if (parse_u32(opt_str(addr, "cid", ""), &cid) < 0) {
        error_setg(errp, "Failed to parse cid '%s'", opt_str(addr, "cid", ""));
        return -1;
    }
    if (parse_u32(opt_str(addr, "port", ""), &port) < 0) {
        error_setg(errp, "Failed to parse port '%s'", opt_str(addr, "port", ""));
        return -1;
    }
    svm.svm_cid = cid;
    svm.svm_port = port;
    CLEANUP_CLOSE int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        error_setg_errno(errp, errno, "Failed to create socket");
        return -1;
    }
    if (bind(fd, (struct sockaddr *)&svm, sizeof(svm)) < 0) {
        error_setg_errno(errp, errno, "Failed to bind socket");
        return -1;
    }
    if (listen(fd, backlog) < 0) {
        error_setg_errno(errp, errno, "Failed to listen on socket");
        return -1;
    }
    *fdp = fd;
    fd = -1;
    return 0;
}

int socket_listen(json_t *addr, int backlog, int fds[], int max_fds, error **errp)
{
    const char *type = opt_str(addr, "type", "");
    int r;

    if (max_fds < 1) {
        error_setg(errp, "no room for a socket");
        return -1;
    }
    if (!strcmp(type, "inet"))
        return inet_listen(addr, backlog, fds, max_fds, errp);
    if (!strcmp(type, "unix"))
        r = unix_listen(addr, backlog, &fds[0], errp);
    else if (!strcmp(type, "fd"))
        r = fd_listen(addr, backlog, &fds[0], errp);
    else if (!strcmp(type, "vsock"))
        r = vsock_listen(addr, backlog, &fds[0], errp);
    else {
        error_setg(errp, "Unknown socket address type '%s'", type);
        return -1;
    }
    return r < 0 ? -1 : 1;
}

void socket_address_cleanup(json_t *addr)
{
    if (!strcmp(opt_str(addr, "type", ""), "unix") && !opt_bool(addr, "abstract", false) &&
        *opt_str(addr, "path", ""))
        unlink(opt_str(addr, "path", ""));
}

char *socket_address_str(json_t *addr)
{
    const char *type = opt_str(addr, "type", "");

    if (!strcmp(type, "inet")) {
        const char *host = opt_str(addr, "host", "");
        return xasprintf(strchr(host, ':') ? "[%s]:%s" : "%s:%s", host, opt_str(addr, "port", ""));
    }
    if (!strcmp(type, "unix"))
        return xasprintf("unix:%s%s", opt_bool(addr, "abstract", false) ? "@" : "", opt_str(addr, "path", ""));
    if (!strcmp(type, "vsock"))
        return xasprintf("vsock:%s:%s", opt_str(addr, "cid", ""), opt_str(addr, "port", ""));
    return xasprintf("fd:%s", opt_str(addr, "str", ""));
}

json_t *socket_fd_address(int fd, bool peer)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    char host[NI_MAXHOST], serv[NI_MAXSERV];

    memset(&ss, 0, sizeof(ss));
    if ((peer ? getpeername(fd, (struct sockaddr *)&ss, &len)
              : getsockname(fd, (struct sockaddr *)&ss, &len)) < 0)
        return NULL;
    if (ss.ss_family == AF_UNIX) {
        struct sockaddr_un *un = (struct sockaddr_un *)&ss;
        size_t plen = len > offsetof(struct sockaddr_un, sun_path)
                      ? len - offsetof(struct sockaddr_un, sun_path) : 0;
        if (plen && !un->sun_path[0]) {      /* abstract: tight when len says so */
            size_t n = strnlen(un->sun_path + 1, sizeof(un->sun_path) - 1);
            CLEANUP_FREE char *p = xstrndup(un->sun_path + 1, n);
            return json_pack("{s:s, s:s, s:b, s:b}", "type", "unix", "path", p,
                             "abstract", 1, "tight", plen == n + 1);
        }
        CLEANUP_FREE char *p = xstrndup(un->sun_path, strnlen(un->sun_path, plen));
        return json_pack("{s:s, s:s}", "type", "unix", "path", p);
    }
    if (ss.ss_family != AF_INET && ss.ss_family != AF_INET6)
        return NULL;
    if (getnameinfo((struct sockaddr *)&ss, len, host, sizeof(host), serv, sizeof(serv),
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0)
        return NULL;
    return json_pack("{s:s, s:s, s:s, s:b}", "type", "inet", "host", host, "port", serv,
                     ss.ss_family == AF_INET ? "ipv4" : "ipv6", 1);
}

/* ---- connecting (client chardevs) ---- */

static int connect_fd(int family, const struct sockaddr *sa, socklen_t len, int *err)
{
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        *err = errno;
        return -1;
    }
    int r;
    do {
        r = connect(fd, sa, len);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
        *err = errno;
        close(fd);
        return -1;
    }
    socket_set_nonblock(fd, true);
    return fd;
}

static int unix_connect(json_t *addr, error **errp)
{
    const char *path = opt_str(addr, "path", "");
    bool abstract = opt_bool(addr, "abstract", false);
    bool tight = opt_has(addr, "tight") ? opt_bool(addr, "tight", true) : true;
    struct sockaddr_un un = { .sun_family = AF_UNIX };
    size_t len = strlen(path);
    socklen_t addrlen = sizeof(un);
    int err;

    if (len > sizeof(un.sun_path) - (abstract ? 1 : 0)) {
        error_setg(errp, "UNIX socket path '%s' is too long", path);
        return -1;
    }
    if (abstract) {
        memcpy(un.sun_path + 1, path, len);
        if (tight)
            addrlen = offsetof(struct sockaddr_un, sun_path) + 1 + len;
    } else {
        memcpy(un.sun_path, path, len);
    }
    int fd = connect_fd(AF_UNIX, (struct sockaddr *)&un, addrlen, &err);
    if (fd < 0)
        error_setg_errno(errp, err, "Failed to connect to '%s'", path);
    return fd;
}

static int inet_connect(json_t *addr, error **errp)
{
    const char *host = opt_str(addr, "host", ""), *port = opt_str(addr, "port", "");
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM };
    struct addrinfo *res = NULL;
    int fd = -1, err = ECONNREFUSED;

    if (opt_bool(addr, "numeric", false))
        hints.ai_flags |= AI_NUMERICHOST | AI_NUMERICSERV;
    if (opt_has(addr, "ipv4") && opt_bool(addr, "ipv4", false) &&
        !(opt_has(addr, "ipv6") && opt_bool(addr, "ipv6", false)))
        hints.ai_family = AF_INET;
    else if (opt_has(addr, "ipv6") && opt_bool(addr, "ipv6", false) &&
             !(opt_has(addr, "ipv4") && opt_bool(addr, "ipv4", false)))
        hints.ai_family = AF_INET6;
    int rc = getaddrinfo(*host ? host : NULL, *port ? port : NULL, &hints, &res);
    if (rc != 0) {
        error_setg(errp, "address resolution failed for %s:%s: %s", host, port,
                   gai_strerror(rc));
        return -1;
    }
    for (struct addrinfo *e = res; e && fd < 0; e = e->ai_next)
        fd = connect_fd(e->ai_family, e->ai_addr, e->ai_addrlen, &err);
    freeaddrinfo(res);
    if (fd < 0) {
        error_setg_errno(errp, err, "Failed to connect to '%s:%s'", host, port);
        return -1;
    }
    int one = 1;
    if (opt_bool(addr, "keep-alive", false))
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    return fd;
}

int socket_connect(json_t *addr, error **errp)
{
    const char *type = opt_str(addr, "type", "");

    if (!strcmp(type, "unix"))
        return unix_connect(addr, errp);
    if (!strcmp(type, "inet"))
        return inet_connect(addr, errp);
    if (!strcmp(type, "fd")) {
        if (monitor_context) {
            error_setg(errp, "only QEMU supports file descriptor passing");
            return -1;
        }
        const char *s = opt_str(addr, "str", "");
        char *end;
        struct stat st;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (!*s || *end || errno || v < 0 || v > INT_MAX) {
            error_setg(errp, "Unable to parse FD number %s", s);
            return -1;
        }
        if (fstat((int)v, &st) < 0 || !S_ISSOCK(st.st_mode)) {
            error_setg(errp, "File descriptor '%s' is not a socket", s);
            return -1;
        }
        fcntl((int)v, F_SETFD, FD_CLOEXEC);
        socket_set_nonblock((int)v, true);
        return (int)v;
    }
    error_setg(errp, "Connecting to a socket address of type '%s' is not supported", type);
    return -1;
}
