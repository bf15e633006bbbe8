/*
 * The "socket" chardev backend: a server listening on UNIX or TCP (every
 * address the host resolves to), or a client connecting out, one peer at a
 * time, as QEMU's char-socket.
 *
 * Theory of operation.  A server watches its listening sockets only while
 * no peer is connected, so further clients wait in the backlog, and (wait
 * on) may block start-up until the first one arrives.  A client connects
 * at once, blocking as QEMU does; with reconnect=N it also survives a
 * failed connection and tries again N seconds after every loss.  While a
 * peer is connected the frontend's interest is the watch's; with no
 * frontend the bytes are read and dropped, so a hang-up is still noticed
 * (QEMU stops reading, and stays "connected" to a peer long gone).
 * filename and the QOM addr report QEMU's strings: the listener's own
 * address (resolved port) for a server, the configured one for a client,
 * and both ends of the connection while connected.
 */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include "config.h"
#include "chardev/chardev-int.h"
#ifdef CONFIG_TLS
#include "crypto/tls-creds.h"
#endif
#include "object/qom.h"
#include "util/accept.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/opts.h"
#include "util/sockets.h"
#include "util/xalloc.h"

#define MAX_LISTEN 8

struct sock {
    struct chardev *chr;
    json_t *addr;              /* flat: listener's local address, or the configured one */
    json_t *listen_addr;       /* flat, as configured (server: to clean up a UNIX path) */
    bool server, nodelay;
    int64_t reconnect_s;       /* client: seconds between attempts, 0 = never */
    int lfd[MAX_LISTEN];
    struct loop_watch *lwatch[MAX_LISTEN];
    int nlisten;
    struct accept_backoff backoff;
    int fd;                    /* the peer, or -1 */
    struct loop_watch *watch;
    struct loop_timer *reconnect;
};

static struct sock *sock_of(struct chardev *c) { return c->state; }

/* ---- the connection ---- */

static void listen_enable(struct sock *s, bool on)
{
    for (int i = 0; i < s->nlisten; i++)
        loop_watch_set(s->lwatch[i], on ? LOOP_IN : 0);
}

static void conn_drop(struct sock *s);

static void conn_io(void *opaque, uint32_t revents)
{
    struct sock *s = opaque;
    if (chardev_has_frontend(s->chr)) {
        chardev_ready(s->chr, revents);
        return;
    }
    char buf[4096];
    ssize_t n;
    do {                       /* nobody listens: drop what comes, notice the end */
        n = recv(s->fd, buf, sizeof(buf), MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n == 0 || (n < 0 && errno != EAGAIN))
        conn_drop(s);
}

static void conn_watch_update(struct sock *s)
{
    if (s->watch)
        loop_watch_set(s->watch, chardev_has_frontend(s->chr) ? s->chr->interest : LOOP_IN);
}

static void conn_start(struct sock *s, int fd)
{
    int one = 1;
    s->fd = fd;
    if (s->nodelay)
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    s->watch = loop_watch_fd(loop_main(), fd, 0, conn_io, s);
    listen_enable(s, false);
    chardev_opened(s->chr);
    conn_watch_update(s);
}

static void reconnect_fn(void *opaque);

static void conn_drop(struct sock *s)
{
    if (s->fd < 0)
        return;
    loop_watch_del(s->watch);
    s->watch = NULL;
    close(s->fd);
    s->fd = -1;
    accept_reserve_refill();
    chardev_closed(s->chr);
    if (s->server)
        listen_enable(s, true);
    else if (s->reconnect_s > 0)
        loop_timer_arm(s->reconnect, s->reconnect_s * 1000);
}

static void sock_accept(void *opaque, uint32_t revents)
{
    struct sock *s = opaque;
    for (int i = 0; i < s->nlisten && s->fd < 0; i++) {
        int fd = accept_conn(s->lfd[i], true);   /* a monitor may use the fd reserve */
        if (fd < 0) {
            if (accept_backoff(&s->backoff, -fd)) {
                listen_enable(s, false);
                return;
            }
            continue;
        }
        conn_start(s, fd);
    }
}

/* The pause after running out of fds is over: listen again if free. */
static void accept_resume(void *opaque)
{
    struct sock *s = opaque;
    if (s->fd < 0)
        listen_enable(s, true);
}

static int client_connect(struct sock *s, error **errp)
{
    int fd = socket_connect(s->addr, errp);
    if (fd < 0)
        return -1;
    conn_start(s, fd);
    return 0;
}

static void reconnect_fn(void *opaque)
{
    struct sock *s = opaque;
    error *err = NULL;
    if (s->fd >= 0 || client_connect(s, &err) == 0)
        return;
    log_debug("chardev %s: %s", s->chr->id, err->msg);
    error_free(err);
    loop_timer_arm(s->reconnect, s->reconnect_s * 1000);
}

/* ---- backend ops ---- */

static ssize_t sock_read(struct chardev *c, void *buf, size_t len)
{
    struct sock *s = sock_of(c);
    ssize_t n;
    do {
        n = recv(s->fd, buf, len, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? (errno == EWOULDBLOCK ? -EAGAIN : -errno) : n;
}

static ssize_t sock_write(struct chardev *c, const void *buf, size_t len)
{
    struct sock *s = sock_of(c);
    ssize_t n;
    do {
        n = send(s->fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? (errno == EWOULDBLOCK ? -EAGAIN : -errno) : n;
}

static void sock_set_interest(struct chardev *c, uint32_t events)
{
    conn_watch_update(sock_of(c));
}

static void sock_disconnect(struct chardev *c)
{
    conn_drop(sock_of(c));
}

/* QEMU's disconnected name: "disconnected:unix:/p,server=on", "...tcp:h:p". */
static char *addr_text(struct sock *s, const char *prefix)
{
    json_t *a = s->addr;
    const char *type = opt_str(a, "type", ""), *srv = s->server ? ",server=on" : "";
    if (!strcmp(type, "inet"))
        return xasprintf("%stcp:%s:%s%s", prefix, opt_str(a, "host", ""),
                         opt_str(a, "port", ""), srv);
    if (!strcmp(type, "unix")) {
        bool abstract = opt_bool(a, "abstract", false);
        return xasprintf("%sunix:%s%s%s%s", prefix, opt_str(a, "path", ""),
                         abstract ? ",abstract=on" : "",
                         abstract && opt_bool(a, "tight", true) ? ",tight=on" : "", srv);
    }
    if (!strcmp(type, "fd"))
        return xasprintf("%sfd:%s%s", prefix, opt_str(a, "str", ""), srv);
    return xasprintf("%svsock:%s:%s", prefix, opt_str(a, "cid", ""), opt_str(a, "port", ""));
}

/* QEMU's connected name, from both ends of the connection. */
static char *conn_text(struct sock *s)
{
    struct sockaddr_storage ls, ps;
    socklen_t ll = sizeof(ls), pl = sizeof(ps);
    char lh[NI_MAXHOST], lp[NI_MAXSERV], ph[NI_MAXHOST], pp[NI_MAXSERV];
    const char *srv = s->server ? ",server=on" : "";

    memset(&ls, 0, sizeof(ls));
    memset(&ps, 0, sizeof(ps));
    if (getsockname(s->fd, (struct sockaddr *)&ls, &ll) < 0 ||
        getpeername(s->fd, (struct sockaddr *)&ps, &pl) < 0)
        return xstrdup("unknown");
    if (ls.ss_family == AF_UNIX) {
        const char *path = ((struct sockaddr_un *)&ls)->sun_path;
        return xasprintf("unix:%.*s%s", (int)strnlen(path, sizeof(((struct sockaddr_un *)0)->sun_path)),
                         path, srv);
    }
    if (ls.ss_family != AF_INET && ls.ss_family != AF_INET6)
        return xstrdup("unknown");
    const char *l = ls.ss_family == AF_INET6 ? "[" : "", *r = ls.ss_family == AF_INET6 ? "]" : "";
    if (getnameinfo((struct sockaddr *)&ls, ll, lh, sizeof(lh), lp, sizeof(lp),
                    NI_NUMERICHOST | NI_NUMERICSERV) ||
        getnameinfo((struct sockaddr *)&ps, pl, ph, sizeof(ph), pp, sizeof(pp),
                    NI_NUMERICHOST | NI_NUMERICSERV))
        return xstrdup("unknown");
    return xasprintf("tcp:%s%s%s:%s%s <-> %s%s%s:%s", l, lh, r, lp, srv, l, ph, r, pp);
}

static char *sock_filename(struct chardev *c)
{
    struct sock *s = sock_of(c);
    return s->fd >= 0 ? conn_text(s) : addr_text(s, "disconnected:");
}

static json_t *sock_qom_get(struct chardev *c, const char *prop)
{
    struct sock *s = sock_of(c);
    if (!strcmp(prop, "connected"))
        return json_boolean(s->fd >= 0);
    if (!strcmp(prop, "addr"))
        return json_deep_copy(s->addr);
    return NULL;
}

/* ---- open ---- */

/* The credentials are looked up first, as in QEMU. */
static int check_creds(const char *id, bool server, error **errp)
{
#ifdef CONFIG_TLS
    return tls_creds_lookup(id, server ? TLS_ENDPOINT_SERVER : TLS_ENDPOINT_CLIENT, errp)
           ? 0 : -1;
#else
    error_setg(errp, "No TLS credentials with id '%s'", id);
    return -1;
#endif
}

/* QEMU's qmp_chardev_validate_socket(), then what bexd does not do. */
static int sock_check(json_t *data, error **errp)
{
    json_t *addr = json_object_get(data, "addr");
    const char *type = opt_str(addr, "type", "");
    bool has_server = opt_has(data, "server"), server = opt_bool(data, "server", true);
    bool tls = opt_has(data, "tls-creds");

    if (tls && check_creds(opt_str(data, "tls-creds", ""), server, errp) < 0)
        return -1;

    if (!strcmp(type, "fd")) {
        if (opt_has(data, "reconnect")) {
            error_setg(errp, "'reconnect' option is incompatible with 'fd' address type");
            return -1;
        }
        if (tls && !(has_server && server)) {
            error_setg(errp, "'tls_creds' option is incompatible with 'fd' address type as client");
            return -1;
        }
    } else if (tls && (!strcmp(type, "unix") || !strcmp(type, "vsock"))) {
        error_setg(errp, "'tls_creds' option is incompatible with '%s' address type", type);
        return -1;
    }
    if (opt_has(data, "tls-authz") && !tls) {
        error_setg(errp, "'tls_authz' option requires 'tls_creds' option");
        return -1;
    }
    if (server) {
        if (opt_has(data, "reconnect")) {
            error_setg(errp, "'reconnect' option is incompatible with socket in server listen mode");
            return -1;
        }
    } else {
        if (opt_bool(data, "websocket", false)) {
            error_setg(errp, "Websocket client is not implemented");
            return -1;
        }
        if (opt_has(data, "wait")) {
            error_setg(errp, "'wait' option is incompatible with socket in client connect mode");
            return -1;
        }
    }
    static const char *const unsupported[] = { "tls-creds", "telnet", "tn3270", "websocket" };
    for (size_t i = 0; i < ARRAY_SIZE(unsupported); i++) {
        json_t *v = json_object_get(data, unsupported[i]);
        if (v && !json_is_false(v)) {
            error_setg(errp, "socket chardev option '%s' is not supported by bexd",
                       unsupported[i]);
            return -1;
        }
    }
    return 0;
}

/* wait on: like QEMU, block until the first client connects. */
static int wait_first_client(struct sock *s)
{
    struct pollfd pfd[MAX_LISTEN];
    CLEANUP_FREE char *where = addr_text(s, "disconnected:");

    log_info("QEMU waiting for connection on: %s", where);
    for (int i = 0; i < s->nlisten; i++)
        pfd[i] = (struct pollfd){ .fd = s->lfd[i], .events = POLLIN };
    for (;;) {
        if (poll(pfd, s->nlisten, -1) < 0 && errno != EINTR)
            return -1;
        for (int i = 0; i < s->nlisten; i++) {
            if (!(pfd[i].revents & POLLIN))
                continue;
            int fd = accept_conn(s->lfd[i], true);
            if (fd >= 0)
                return fd;
        }
    }
}

static int sock_open(struct chardev *c, json_t *data, error **errp)
{
    struct sock *s = sock_of(c);
    s->chr = c;
    s->fd = -1;
    s->server = opt_bool(data, "server", true);
    s->nodelay = opt_bool(data, "nodelay", false);
    json_t *flat = socket_address_flatten(json_object_get(data, "addr"));
    if (!flat) {
        error_setg(errp, "invalid address");
        return -1;
    }
    if (!s->server) {
        s->addr = flat;
        s->reconnect_s = opt_int(data, "reconnect", 0);
        s->reconnect = loop_timer_new(loop_main(), reconnect_fn, s);
        error *err = NULL;
        if (client_connect(s, &err) == 0)
            return 0;
        if (s->reconnect_s > 0) {          /* keep trying in the background */
            log_debug("chardev %s: %s", c->id, err->msg);
            error_free(err);
            loop_timer_arm(s->reconnect, s->reconnect_s * 1000);
            return 0;
        }
        error_propagate(errp, err);
        return -1;
    }
    s->listen_addr = flat;
    int n = socket_listen(flat, 1, s->lfd, MAX_LISTEN, errp);
    if (n < 0)
        return -1;
    s->nlisten = n;
    s->addr = socket_fd_address(s->lfd[0], false);
    if (!s->addr)
        s->addr = json_deep_copy(flat);
    s->backoff = (struct accept_backoff){ .who = c->id, .loop = loop_main(),
                                          .resume = accept_resume, .opaque = s };
    accept_reserve_refill();
    for (int i = 0; i < n; i++)
        s->lwatch[i] = loop_watch_fd(loop_main(), s->lfd[i], LOOP_IN, sock_accept, s);
    if (opt_bool(data, "wait", false)) {
        int fd = wait_first_client(s);
        if (fd >= 0)
            conn_start(s, fd);
    }
    return 0;
}

static void sock_close(struct chardev *c)
{
    struct sock *s = sock_of(c);
    if (s->watch)
        loop_watch_del(s->watch);
    if (s->fd >= 0) {
        close(s->fd);
        accept_reserve_refill();
    }
    for (int i = 0; i < s->nlisten; i++) {
        loop_watch_del(s->lwatch[i]);
        close(s->lfd[i]);
    }
    accept_backoff_cleanup(&s->backoff);
    if (s->reconnect)
        loop_timer_free(s->reconnect);
    if (s->listen_addr && s->nlisten)
        socket_address_cleanup(s->listen_addr);
    json_decref(s->listen_addr);
    json_decref(s->addr);
}

/* ---- --chardev socket,... ---- */

static const char *const socket_keys[] = {
    "path", "host", "port", "to", "ipv4", "ipv6", "server", "wait", "nodelay", "delay",
    "telnet", "tn3270", "websocket", "reconnect", "tls-creds", "tls-authz", "fd",
    "abstract", "tight", "numeric", "keep-alive", "mptcp", NULL,
};

static json_t *cli_addr(json_t *opts, error **errp)
{
    const char *path = chardev_opt_text(opts, "path"), *host = chardev_opt_text(opts, "host");
    const char *fd = chardev_opt_text(opts, "fd");
    bool b;

    if (!!path + !!host + !!fd > 1) {
        error_setg(errp, "None or one of 'path', 'fd' or 'host' option required.");
        return NULL;
    }
    if (path) {
        /* QEMU's command line always sets both (abstract off, tight on) */
        bool abstract, tight;
        if (chardev_opt_bool(opts, "abstract", false, &abstract, errp) < 0 ||
            chardev_opt_bool(opts, "tight", true, &tight, errp) < 0)
            return NULL;
        return json_pack("{s:s, s:{s:s, s:b, s:b}}", "type", "unix", "data", "path", path,
                         "abstract", abstract, "tight", tight);
    }
    if (host) {
        const char *port = chardev_opt_text(opts, "port");
        if (!port) {
            error_setg(errp, "chardev: socket: no port given");
            return NULL;
        }
        json_t *d = json_pack("{s:s, s:s}", "host", host, "port", port);
        static const char *const bools[] = { "ipv4", "ipv6", "numeric", "keep-alive" };
        for (size_t i = 0; i < ARRAY_SIZE(bools); i++) {
            if (!opt_has(opts, bools[i]))
                continue;
            if (chardev_opt_bool(opts, bools[i], false, &b, errp) < 0) {
                json_decref(d);
                return NULL;
            }
            json_object_set_new(d, bools[i], json_boolean(b));
        }
        const char *to = chardev_opt_text(opts, "to");
        if (to)
            json_object_set_new(d, "to", json_integer(atoi(to)));
        return json_pack("{s:s, s:o}", "type", "inet", "data", d);
    }
    return json_pack("{s:s, s:{s:s}}", "type", "fd", "data", "str", fd ? fd : "");
}

/* QemuOpts' defaults: server off, wait on (for a server); "nodelay" is
 * "delay=off". */
static json_t *sock_parse_cli(json_t *opts, error **errp)
{
    bool server, wait, b;
    if (chardev_opt_bool(opts, "server", false, &server, errp) < 0 ||
        chardev_opt_bool(opts, "wait", true, &wait, errp) < 0)
        return NULL;
    json_t *addr = cli_addr(opts, errp);
    if (!addr)
        return NULL;
    json_t *d = json_pack("{s:o, s:b}", "addr", addr, "server", server);
    if (server || opt_has(opts, "wait"))
        json_object_set_new(d, "wait", json_boolean(server && wait));
    if (opt_has(opts, "delay") || opt_has(opts, "nodelay")) {
        bool delay = true;
        if (chardev_opt_bool(opts, "delay", true, &delay, errp) < 0 ||
            chardev_opt_bool(opts, "nodelay", !delay, &b, errp) < 0) {
            json_decref(d);
            return NULL;
        }
        json_object_set_new(d, "nodelay", json_boolean(b));
    }
    static const char *const bools[] = { "telnet", "tn3270", "websocket" };
    for (size_t i = 0; i < ARRAY_SIZE(bools); i++) {
        if (!opt_has(opts, bools[i]))
            continue;
        if (chardev_opt_bool(opts, bools[i], false, &b, errp) < 0) {
            json_decref(d);
            return NULL;
        }
        json_object_set_new(d, bools[i], json_boolean(b));
    }
    const char *rc = chardev_opt_text(opts, "reconnect");
    if (rc)
        json_object_set_new(d, "reconnect", json_integer(atoll(rc)));
    static const char *const strs[] = { "tls-creds", "tls-authz" };
    for (size_t i = 0; i < ARRAY_SIZE(strs); i++)
        if (chardev_opt_text(opts, strs[i]))
            json_object_set_new(d, strs[i], json_string(chardev_opt_text(opts, strs[i])));
    return d;
}

static const struct qom_prop chardev_socket_props[] = {
    { "connected", "bool", NULL, NULL },
    { "addr", "SocketAddress", NULL, NULL },
    { NULL },
};
static struct qom_class chardev_socket_class = {
    .name = "chardev-socket", .parent = "chardev", .props = chardev_socket_props,
};
QOM_CLASS_REGISTER(chardev_socket_class)

static const struct chardev_backend socket_backend = {
    .name = "socket",
    .qom = &chardev_socket_class,
    .state_size = sizeof(struct sock),
    .cli_keys = socket_keys,
    .parse_cli = sock_parse_cli,
    .check = sock_check,
    .open = sock_open,
    .close = sock_close,
    .read = sock_read,
    .write = sock_write,
    .set_interest = sock_set_interest,
    .disconnect = sock_disconnect,
    .filename = sock_filename,
    .qom_get = sock_qom_get,
};
CHARDEV_BACKEND_REGISTER(socket_backend)
