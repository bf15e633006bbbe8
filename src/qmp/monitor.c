/*
 * Character devices and QMP monitors.
 *
 * Theory of operation: a chardev is a listening socket (UNIX or TCP, all
 * addresses the host resolves to) or stdio.  As in QEMU, a socket chardev
 * serves one client at a time: while a client is connected the listening
 * sockets are not watched, so further connections wait in the backlog.
 * A monitor attached to a chardev greets each client, reads bytes into a
 * QEMU-compatible JSON stream (json-stream.c), dispatches each complete
 * request and queues the response.  Output is written without blocking;
 * while more than MON_OUT_PAUSE bytes wait, no further request is taken:
 * the rest of the bytes read stay in the input buffer and the socket is not
 * read (so a client that does not read cannot make the daemon buffer
 * replies without bound); when the output drains, a deferred call resumes
 * the input.  A client whose queue passes MON_OUT_MAX (events pile up too)
 * is dropped.  A client that goes away loses only its own state.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "qmp/json-out.h"
#include "object/qom.h"
#include "qmp/monitor.h"
#include "qmp/qmp-int.h"
#include "util/accept.h"
#include "util/cleanup.h"
#include "util/json-stream.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/sockets.h"
#include "util/xalloc.h"
#include "util/id.h"

#define MAX_LISTEN 8
#define MON_READ_CHUNK 65536
#define MON_OUT_PAUSE (1u << 20)
#define MON_OUT_MAX (64u << 20)

enum chardev_kind { CHR_SOCKET, CHR_STDIO };

struct monitor;

struct chardev {
    char *id;
    enum chardev_kind kind;
    json_t *addr;                      /* flat SocketAddress (sockets) */
    int lfd[MAX_LISTEN];
    struct loop_watch *lwatch[MAX_LISTEN];
    int nlisten;
    int waiting_fd;                    /* client accepted by wait=on, or -1 */
    struct accept_backoff backoff;     /* out of fds: listeners paused */
    struct monitor *mon;
    struct chardev *next;
};

struct monitor {
    struct chardev *chr;
    bool pretty;
    int in_fd, out_fd;                 /* -1 when no client */
    struct loop_watch *in_watch, *out_watch;
    struct json_stream *js;
    struct json_stream *dead_js;       /* closed from inside its own callback */
    bool feeding;                      /* inside json_stream_feed() */
    struct qmp_session session;
    char *out;
    size_t out_len, out_cap, out_off;
    char *in;                          /* bytes read, not yet fed */
    size_t in_len, in_off;
    struct loop_defer resume;
    struct monitor *next;
};

static struct chardev *chardevs;
static struct monitor *monitors;

static struct chardev *chardev_find(const char *id)
{
    for (struct chardev *c = chardevs; c; c = c->next)
        if (!strcmp(c->id, id))
            return c;
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Output */

static void mon_client_close(struct monitor *m);
static void mon_update_watches(struct monitor *m);

static void mon_flush(struct monitor *m)
{
    while (m->out_off < m->out_len) {
        ssize_t n = write(m->out_fd, m->out + m->out_off, m->out_len - m->out_off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            mon_client_close(m);
            return;
        }
        m->out_off += n;
    }
    if (m->out_off == m->out_len)
        m->out_off = m->out_len = 0;
    mon_update_watches(m);
}

static void mon_send(struct monitor *m, json_t *msg)
{
    size_t len;
    if (m->out_fd < 0)
        return;
    CLEANUP_FREE char *text = qmp_json_line(msg, m->pretty, &len);
    if (m->out_len - m->out_off + len > MON_OUT_MAX) {
        log_warn("monitor %s: client does not read its output; disconnecting", m->chr->id);
        mon_client_close(m);
        return;
    }
    if (m->out_off && m->out_len + len > m->out_cap) {
        memmove(m->out, m->out + m->out_off, m->out_len - m->out_off);
        m->out_len -= m->out_off;
        m->out_off = 0;
    }
    if (m->out_len + len > m->out_cap) {
        size_t cap = m->out_cap ? m->out_cap : 4096;
        while (cap < m->out_len + len)
            cap *= 2;
        m->out = xrealloc(m->out, cap);
        m->out_cap = cap;
    }
    memcpy(m->out + m->out_len, text, len);
    m->out_len += len;
    mon_flush(m);
}

/* ------------------------------------------------------------------ */
/* Input */

static bool mon_output_full(struct monitor *m)
{
    return m->out_len - m->out_off > MON_OUT_PAUSE;
}

static void mon_message(void *opaque, json_t *value, error *err)
{
    struct monitor *m = opaque;
    json_t *rsp;
    if (err) {
        rsp = qmp_error_response(error_class_name(err->cls), err->msg);
        error_free(err);
    } else {
        rsp = qmp_dispatch_session(value, &m->session);
        json_decref(value);
    }
    mon_send(m, rsp);
    json_decref(rsp);
    if (m->js && (m->in_fd < 0 || mon_output_full(m)))
        json_stream_stop(m->js);
}

/* Feed buffered input until it is used up or the output is too full. */
static void mon_process_input(struct monitor *m)
{
    while (m->in_fd >= 0 && m->in_off < m->in_len && !mon_output_full(m)) {
        m->feeding = true;
        size_t used = json_stream_feed(m->js, m->in + m->in_off, m->in_len - m->in_off);
        m->feeding = false;
        if (m->dead_js) {               /* the client went away meanwhile */
            json_stream_free(m->dead_js);
            m->dead_js = NULL;
            return;
        }
        m->in_off += used;
    }
    if (m->in_fd >= 0 && m->in_off == m->in_len)
        m->in_off = m->in_len = 0;
    mon_update_watches(m);
}

static void mon_resume(void *opaque)
{
    mon_process_input(opaque);
}

static void mon_readable(void *opaque, uint32_t revents)
{
    struct monitor *m = opaque;
    if (m->in_off < m->in_len)
        return;             /* still working through the last read */
    if (!m->in)
        m->in = xmalloc(MON_READ_CHUNK);
    ssize_t n = read(m->in_fd, m->in, MON_READ_CHUNK);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        mon_client_close(m);
        return;
    }
    m->in_off = 0;
    m->in_len = n;
    mon_process_input(m);
}

static void mon_writable(void *opaque, uint32_t revents)
{
    struct monitor *m = opaque;
    if (revents & (EPOLLERR | EPOLLHUP)) {
        mon_client_close(m);
        return;
    }
    mon_flush(m);
}

static void mon_update_watches(struct monitor *m)
{
    if (m->in_fd < 0)
        return;
    size_t pending = m->out_len - m->out_off;
    bool full = pending > MON_OUT_PAUSE, unfed = m->in_off < m->in_len;
    uint32_t in_ev = full || unfed ? 0 : LOOP_IN;
    if (!full && unfed && !m->resume.pending) {
        m->resume.fn = mon_resume;
        m->resume.opaque = m;
        loop_defer(loop_main(), &m->resume);
    }
    if (m->in_fd == m->out_fd) {
        loop_watch_set(m->in_watch, in_ev | (pending ? LOOP_OUT : 0));
        return;
    }
    loop_watch_set(m->in_watch, in_ev);
    if (m->out_watch)
        loop_watch_set(m->out_watch, pending ? LOOP_OUT : 0);
}

static void mon_socket_event(void *opaque, uint32_t revents)
{
    struct monitor *m = opaque;
    if (revents & LOOP_OUT) {
        mon_flush(m);
        if (m->in_fd < 0)
            return;
    }
    if (revents & (LOOP_IN | EPOLLHUP | EPOLLERR))
        mon_readable(m, revents);
}

/* ------------------------------------------------------------------ */
/* Clients */

static void chardev_listen_enable(struct chardev *c, bool on)
{
    for (int i = 0; i < c->nlisten; i++)
        loop_watch_set(c->lwatch[i], on ? LOOP_IN : 0);
}

static void mon_client_close(struct monitor *m)
{
    if (m->in_fd < 0)
        return;
    if (m->in_watch)
        loop_watch_del(m->in_watch);
    if (m->out_watch)
        loop_watch_del(m->out_watch);
    m->in_watch = m->out_watch = NULL;
    if (m->chr->kind == CHR_SOCKET) {
        close(m->in_fd);
        accept_reserve_refill();    /* the fd it may have used from the reserve */
    }
    m->in_fd = m->out_fd = -1;
    if (m->js) {
        if (m->feeding) {
            /* inside the stream's own callback: stop it, free it after */
            json_stream_stop(m->js);
            m->dead_js = m->js;
        } else {
            json_stream_free(m->js);
        }
        m->js = NULL;
    }
    free(m->out);
    m->out = NULL;
    m->out_len = m->out_cap = m->out_off = 0;
    free(m->in);
    m->in = NULL;
    m->in_len = m->in_off = 0;
    m->session = (struct qmp_session){ 0 };
    if (m->chr->kind == CHR_SOCKET)
        chardev_listen_enable(m->chr, true);
}

static void mon_client_open(struct monitor *m, int in_fd, int out_fd)
{
    m->in_fd = in_fd;
    m->out_fd = out_fd;
    m->in_off = m->in_len = 0;
    m->js = json_stream_new(mon_message, m);
    m->session = (struct qmp_session){ .oob_offered = true };   /* qsd offers it on stdio too */
    if (in_fd == out_fd) {
        m->in_watch = loop_watch_fd(loop_main(), in_fd, LOOP_IN, mon_socket_event, m);
    } else {
        m->in_watch = loop_watch_fd(loop_main(), in_fd, LOOP_IN, mon_readable, m);
        m->out_watch = loop_watch_fd(loop_main(), out_fd, 0, mon_writable, m);
    }
    json_t *greeting = qmp_greeting(m->session.oob_offered);
    mon_send(m, greeting);
    json_decref(greeting);
}

static void chardev_accept(void *opaque, uint32_t revents)
{
    struct chardev *c = opaque;
    for (int i = 0; i < c->nlisten; i++) {
        int fd = accept_conn(c->lfd[i], true);   /* management: may use the fd reserve */
        if (fd < 0) {
            if (accept_backoff(&c->backoff, -fd)) {
                chardev_listen_enable(c, false);
                return;
            }
            continue;
        }
        if (!c->mon || c->mon->in_fd >= 0) {
            close(fd);           /* no monitor attached yet: refuse */
            continue;
        }
        chardev_listen_enable(c, false);
        mon_client_open(c->mon, fd, fd);
        return;
    }
}

/* The pause after running out of fds is over: listen again if free. */
static void chardev_accept_resume(void *opaque)
{
    struct chardev *c = opaque;
    if (!c->mon || c->mon->in_fd < 0)
        chardev_listen_enable(c, true);
}

/* ------------------------------------------------------------------ */
/* --chardev */

static const char *const socket_keys[] = {
    "backend", "id", "path", "host", "port", "to", "ipv4", "ipv6", "server",
    "wait", "nodelay", "telnet", "tn3270", "websocket", "reconnect",
    "tls-creds", "tls-authz", "fd", "abstract", "tight", "logfile",
    "logappend", "mux", "delay", "numeric", "keep-alive", "mptcp", NULL,
};
static const char *const stdio_keys[] = {
    "backend", "id", "signal", "logfile", "logappend", "mux", NULL,
};

static int parse_bool(json_t *opts, const char *key, bool dflt, bool *out, error **errp)
{
    json_t *v = json_object_get(opts, key);
    const char *s = json_string_value(v);
    if (!v) {
        *out = dflt;
        return 0;
    }
    if (json_is_boolean(v)) {
        *out = json_is_true(v);
        return 0;
    }
    if (s && (!strcmp(s, "on") || !strcmp(s, "yes") || !strcmp(s, "true") || !strcmp(s, "y"))) {
        *out = true;
        return 0;
    }
    if (s && (!strcmp(s, "off") || !strcmp(s, "no") || !strcmp(s, "false") || !strcmp(s, "n"))) {
        *out = false;
        return 0;
    }
    error_setg(errp, "Parameter '%s' expects 'on' or 'off'", key);
    return -1;
}

static int check_keys(json_t *opts, const char *const *keys, error **errp)
{
    const char *k;
    json_t *v;
    json_object_foreach(opts, k, v) {
        size_t i;
        for (i = 0; keys[i] && strcmp(keys[i], k); i++)
            ;
        if (!keys[i]) {
            error_setg(errp, "Invalid parameter '%s'", k);
            return -1;
        }
        if (!json_is_string(v) && !json_is_boolean(v) && !json_is_integer(v)) {
            error_setg(errp, "Invalid parameter '%s'", k);
            return -1;
        }
    }
    return 0;
}

static const char *chardev_opt(json_t *opts, const char *key)
{
    json_t *v = json_object_get(opts, key);
    static char num[32];
    if (json_is_integer(v)) {
        snprintf(num, sizeof(num), "%lld", (long long)json_integer_value(v));
        return num;
    }
    return json_string_value(v);
}

/* Build the flat SocketAddress from QemuOpts-style chardev options. */
static json_t *chardev_socket_addr(json_t *opts, error **errp)
{
    const char *path = chardev_opt(opts, "path"), *host = chardev_opt(opts, "host");
    const char *fd = chardev_opt(opts, "fd");
    if (!!path + !!host + !!fd > 1) {
        error_setg(errp, "None or one of 'path', 'fd' or 'host' option required.");
        return NULL;
    }
    if (path) {
        json_t *a = json_pack("{s:s, s:s}", "type", "unix", "path", path);
        bool b;
        if (json_object_get(opts, "abstract")) {
            if (parse_bool(opts, "abstract", false, &b, errp) < 0) {
                json_decref(a);
                return NULL;
            }
            json_object_set_new(a, "abstract", json_boolean(b));
        }
        if (json_object_get(opts, "tight")) {
            if (parse_bool(opts, "tight", true, &b, errp) < 0) {
                json_decref(a);
                return NULL;
            }
            json_object_set_new(a, "tight", json_boolean(b));
        }
        return a;
    }
    if (host) {
        const char *port = chardev_opt(opts, "port");
        if (!port) {
            error_setg(errp, "chardev: socket: no port given");
            return NULL;
        }
        json_t *a = json_pack("{s:s, s:s, s:s}", "type", "inet", "host", host, "port", port);
        static const char *bools[] = { "ipv4", "ipv6", "numeric", "keep-alive" };
        for (size_t i = 0; i < ARRAY_SIZE(bools); i++) {
            bool b;
            if (!json_object_get(opts, bools[i]))
                continue;
            if (parse_bool(opts, bools[i], false, &b, errp) < 0) {
                json_decref(a);
                return NULL;
            }
            json_object_set_new(a, bools[i], json_boolean(b));
        }
        const char *to = chardev_opt(opts, "to");
        if (to)
            json_object_set_new(a, "to", json_integer(atoi(to)));
        return a;
    }
    return json_pack("{s:s, s:s}", "type", "fd", "str", fd ? fd : "");
}

/* server=on without wait=off: like QEMU, block until the first client
 * connects; it is greeted once a monitor attaches. */
static void chardev_wait_client(struct chardev *c)
{
    struct pollfd pfd[MAX_LISTEN];
    CLEANUP_FREE char *where = socket_address_str(c->addr);
    const char *type = json_string_value(json_object_get(c->addr, "type"));

    log_info("QEMU waiting for connection on: disconnected:%s%s,server=on",
             type && !strcmp(type, "inet") ? "tcp:" : "", where ? where : "");
    for (int i = 0; i < c->nlisten; i++)
        pfd[i] = (struct pollfd){ .fd = c->lfd[i], .events = POLLIN };
    while (c->waiting_fd < 0) {
        if (poll(pfd, c->nlisten, -1) < 0 && errno != EINTR)
            return;
        for (int i = 0; i < c->nlisten && c->waiting_fd < 0; i++)
            if (pfd[i].revents & POLLIN)
                c->waiting_fd = accept4(c->lfd[i], NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    }
}

static int chardev_socket_open(struct chardev *c, json_t *opts, error **errp)
{
    bool server, wait;
    if (parse_bool(opts, "server", false, &server, errp) < 0 ||
        parse_bool(opts, "wait", true, &wait, errp) < 0)
        return -1;
    c->addr = chardev_socket_addr(opts, errp);
    if (!c->addr)
        return -1;
    if (!server) {
        CLEANUP_FREE char *s = socket_address_str(c->addr);
        error_setg(errp, "Failed to connect to '%s': client mode is not supported",
                   s ? s : "?");
        return -1;
    }
    int n = socket_listen(c->addr, 1, c->lfd, MAX_LISTEN, errp);
    if (n < 0)
        return -1;
    c->nlisten = n;
    c->backoff = (struct accept_backoff){ .who = c->id, .loop = loop_main(),
                                          .resume = chardev_accept_resume, .opaque = c };
    accept_reserve_refill();
    if (wait)
        chardev_wait_client(c);
    for (int i = 0; i < n; i++)
        c->lwatch[i] = loop_watch_fd(loop_main(), c->lfd[i], LOOP_IN, chardev_accept, c);
    return 0;
}

int chardev_add(json_t *opts, error **errp)
{
    const char *backend = chardev_opt(opts, "backend");
    const char *id = chardev_opt(opts, "id");

    if (!id) {
        error_setg(errp, "chardev: no id specified");
        return -1;
    }
    if (!id_wellformed(id)) {
        error_setg(errp, "Parameter 'id' expects an identifier");
        return -1;
    }
    if (!backend) {
        error_setg(errp, "chardev: \"%s\" missing backend", id);
        return -1;
    }
    bool is_socket = !strcmp(backend, "socket");
    if (!is_socket && strcmp(backend, "stdio")) {
        error_setg(errp, "'%s' is not a valid char driver name", backend);
        return -1;
    }
    if (check_keys(opts, is_socket ? socket_keys : stdio_keys, errp) < 0)
        return -1;
    if (chardev_find(id)) {
        error_setg(errp, is_socket ? "duplicate yank instance"
                                   : "attempt to add duplicate property '%s' to object (type 'container')",
                   id);
        return -1;
    }
    struct chardev *c = xzalloc(sizeof(*c));
    c->id = xstrdup(id);
    c->kind = is_socket ? CHR_SOCKET : CHR_STDIO;
    c->waiting_fd = -1;
    if (is_socket && chardev_socket_open(c, opts, errp) < 0) {
        json_decref(c->addr);
        free(c->id);
        free(c);
        return -1;
    }
    c->next = chardevs;
    chardevs = c;
    return 0;
}

/* ------------------------------------------------------------------ */
/* --monitor */

int monitor_add(json_t *opts, error **errp)
{
    const char *id = json_string_value(json_object_get(opts, "chardev"));
    const char *mode = json_string_value(json_object_get(opts, "mode"));
    struct chardev *c = id ? chardev_find(id) : NULL;

    if (!c) {
        error_setg(errp, "chardev \"%s\" not found", id ? id : "");
        return -1;
    }
    if (mode && strcmp(mode, "control")) {
        error_setg(errp, "Only QMP is supported");
        return -1;
    }
    if (c->mon) {
        error_setg(errp, "Device '%s' is in use", id);
        return -1;
    }
    struct monitor *m = xzalloc(sizeof(*m));
    m->chr = c;
    m->pretty = json_is_true(json_object_get(opts, "pretty"));
    m->in_fd = m->out_fd = -1;
    c->mon = m;
    m->next = monitors;
    monitors = m;
    if (c->kind == CHR_STDIO) {
        socket_set_nonblock(STDIN_FILENO, true);
        socket_set_nonblock(STDOUT_FILENO, true);
        mon_client_open(m, STDIN_FILENO, STDOUT_FILENO);
    } else if (c->waiting_fd >= 0) {
        int fd = c->waiting_fd;
        c->waiting_fd = -1;
        chardev_listen_enable(c, false);
        mon_client_open(m, fd, fd);
    }
    return 0;
}

void monitors_broadcast(json_t *event)
{
    for (struct monitor *m = monitors; m; m = m->next)
        if (m->in_fd >= 0 && m->session.negotiated)
            mon_send(m, event);
}

void monitors_close_all(void)
{
    for (struct monitor *m = monitors; m; m = m->next) {
        if (m->out_fd >= 0 && m->out_off < m->out_len)
            mon_flush(m);    /* best effort, never blocks: the final replies */
        mon_client_close(m);
    }
    for (struct chardev *c = chardevs; c; c = c->next) {
        for (int i = 0; i < c->nlisten; i++) {
            loop_watch_del(c->lwatch[i]);
            close(c->lfd[i]);
        }
        c->nlisten = 0;
        accept_backoff_cleanup(&c->backoff);
        if (c->addr)
            socket_address_cleanup(c->addr);
    }
}

/* ------------------------------------------------------------------ */
/* QOM: the "/chardevs" container */

static const struct qom_prop chardev_socket_props[] = {
    { "connected", "bool", NULL, NULL },
    { "addr", "SocketAddress", NULL, NULL },
    { NULL },
};
static struct qom_class chardev_class = { .name = "chardev", .parent = "object", .abstract = true };
static struct qom_class chardev_socket_class = {
    .name = "chardev-socket", .parent = "chardev", .props = chardev_socket_props,
};
static struct qom_class chardev_fd_class = {
    .name = "chardev-fd", .parent = "chardev", .abstract = true,
};
static struct qom_class chardev_stdio_class = { .name = "chardev-stdio", .parent = "chardev-fd" };
QOM_CLASS_REGISTER(chardev_class)
QOM_CLASS_REGISTER(chardev_socket_class)
QOM_CLASS_REGISTER(chardev_fd_class)
QOM_CLASS_REGISTER(chardev_stdio_class)

static void *chardevs_first(void) { return chardevs; }
static void *chardevs_next(void *c) { return ((struct chardev *)c)->next; }
static const char *chardevs_id(void *c) { return ((struct chardev *)c)->id; }

static const struct qom_class *chardevs_cls(void *c)
{
    return ((struct chardev *)c)->kind == CHR_SOCKET ? &chardev_socket_class
                                                     : &chardev_stdio_class;
}

static json_t *chardevs_get(void *obj, const struct qom_prop *p)
{
    struct chardev *c = obj;
    if (!strcmp(p->name, "connected"))
        return json_boolean(c->mon && c->mon->in_fd >= 0);
    json_t *a = c->nlisten ? socket_fd_address(c->lfd[0], false) : NULL;
    return a ? a : json_null();
}

static int chardevs_set(void *obj, const struct qom_prop *p, json_t *value, error **errp)
{
    return 0;           /* no writable property */
}

const struct qom_container chardev_container = {
    .name = "chardevs", .first = chardevs_first, .next = chardevs_next, .id = chardevs_id,
    .cls = chardevs_cls, .get = chardevs_get, .set = chardevs_set,
};
