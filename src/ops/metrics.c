/*
 * Prometheus /metrics over HTTP (libmicrohttpd), off unless --metrics
 * names where to listen.
 *
 * Theory of operation: libmicrohttpd runs without a thread of its own
 * (MHD_USE_EPOLL, external polling): its epoll descriptor is watched by the
 * main loop and MHD_run() is called when it is ready or its timeout passes.
 * So every request is answered in the main thread, where the export and
 * node registries live, and reads the data-path counters with relaxed
 * loads: scraping takes no lock and costs the data path nothing.  The
 * listening socket comes from socket_listen(), so any SocketAddress works,
 * including a socket passed by systemd (addr.type=fd,addr.str=NAME).
 *
 * Exposition: text format 0.0.4.  Per export: operations, bytes, time and
 * failures its clients caused (NBD), connected clients.  Per node: the
 * query-blockstats counters and a latency histogram (log2 buckets from 4 us
 * to 17 s, always on).  Per NBD server: accepted connections, handshake
 * failures, TLS failures, connections open.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <microhttpd.h>
#include "block/block.h"
#include "block/stats.h"
#include "config.h"
#include "export/export.h"
#include "export/nbd/nbd.h"
#include "ops/metrics.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/sockets.h"
#include "util/xalloc.h"

struct metrics_server {
    struct MHD_Daemon *mhd;
    struct loop_watch *watch;
    struct loop_timer *timer;
    int fd;
};

static struct metrics_server *srv;

/* ---- text building ---- */

struct text {
    char *buf;
    size_t len, cap;
};

static void tprintf(struct text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tprintf(struct text *t, const char *fmt, ...)
{
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(t->buf + t->len, t->cap - t->len, fmt, ap);
        va_end(ap);
        if (n >= 0 && (size_t)n < t->cap - t->len) {
            t->len += n;
            return;
        }
        t->cap = t->cap ? t->cap * 2 : 16384;
        t->buf = xrealloc(t->buf, t->cap);
    }
}

/* A label value with \, " and newline escaped (ids are well-formed, but
 * file names and peers are not ours to trust). */
static const char *esc(const char *s, char *buf, size_t len)
{
    size_t o = 0;
    for (; s && *s && o + 3 < len; s++) {
        if (*s == '\\' || *s == '"') {
            buf[o++] = '\\';
            buf[o++] = *s;
        } else if (*s == '\n') {
            buf[o++] = '\\';
            buf[o++] = 'n';
        } else {
            buf[o++] = *s;
        }
    }
    buf[o] = 0;
    return buf;
}

static void header(struct text *t, const char *name, const char *type, const char *help)
{
    tprintf(t, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static uint64_t get(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

/* ---- exports ---- */

static void export_metrics(struct text *t)
{
    static const struct { const char *name, *key, *help; } ctr[] = {
        { "bexd_export_read_operations_total", "read-operations", "Read requests completed." },
        { "bexd_export_read_bytes_total", "read-bytes", "Bytes read by clients." },
        { "bexd_export_read_seconds_total", "read-total-time-ns", "Time spent in reads." },
        { "bexd_export_read_spliced_bytes_total", "read-spliced-bytes",
          "Bytes of reads sent from the page cache by splice (NBD)." },
        { "bexd_export_write_operations_total", "write-operations", "Write requests completed." },
        { "bexd_export_write_bytes_total", "write-bytes", "Bytes written by clients." },
        { "bexd_export_write_seconds_total", "write-total-time-ns", "Time spent in writes." },
        { "bexd_export_write_copied_bytes_total", "write-copied-bytes",
          "Bytes of writes copied to another buffer before being written (FUSE)." },
        { "bexd_export_flush_operations_total", "flush-operations", "Flush requests completed." },
        { "bexd_export_errors_total", "failed-operations", "Requests that failed." },
    };
    char a[256], b[256], c[256];

    header(t, "bexd_export_clients", "gauge", "Clients connected to the export.");
    for (struct export *e = export_first(); e; e = e->next)
        tprintf(t, "bexd_export_clients{export=\"%s\",type=\"%s\",node=\"%s\"} %u\n",
                esc(e->id, a, sizeof(a)), e->type->name, esc(e->node->node_name, b, sizeof(b)),
                export_nclients(e));
    for (size_t i = 0; i < sizeof(ctr) / sizeof(ctr[0]); i++) {
        header(t, ctr[i].name, "counter", ctr[i].help);
        for (struct export *e = export_first(); e; e = e->next) {
            if (!e->type->query_totals)
                continue;
            CLEANUP_JSON json_t *tot = e->type->query_totals(e);
            json_int_t v = json_integer_value(json_object_get(tot, ctr[i].key));
            snprintf(c, sizeof(c), "export=\"%s\",type=\"%s\",node=\"%s\"",
                     esc(e->id, a, sizeof(a)), e->type->name,
                     esc(e->node->node_name, b, sizeof(b)));
            if (strstr(ctr[i].key, "time-ns"))
                tprintf(t, "%s{%s} %.9f\n", ctr[i].name, c, v / 1e9);
            else
                tprintf(t, "%s{%s} %lld\n", ctr[i].name, c, (long long)v);
        }
    }
}

/* ---- nodes ---- */

static void node_metrics(struct text *t)
{
    static const struct { const char *what, *help; size_t off; } ctr[] = {
        { "operations_total", "Requests completed, by operation.",
          offsetof(struct bstat_op_counters, ops) },
        { "bytes_total", "Bytes transferred, by operation.",
          offsetof(struct bstat_op_counters, bytes) },
        { "failed_operations_total", "Requests that failed, by operation.",
          offsetof(struct bstat_op_counters, failed) },
        { "invalid_operations_total", "Requests refused as invalid, by operation.",
          offsetof(struct bstat_op_counters, invalid) },
    };
    static const char *const op_names[] = { "read", "write", "flush", "discard" };
    char a[256], name[96];

    for (size_t i = 0; i < sizeof(ctr) / sizeof(ctr[0]); i++) {
        snprintf(name, sizeof(name), "bexd_node_%s", ctr[i].what);
        header(t, name, "counter", ctr[i].help);
        for (struct bnode *bs = bnode_first(); bs; bs = bs->next)
            for (int op = 0; op < BSTAT_NR; op++) {
                if (op == BSTAT_FLUSH && ctr[i].off == offsetof(struct bstat_op_counters, bytes))
                    continue;
                const uint64_t *p = (const uint64_t *)((const char *)&bs->stats->op[op] +
                                                       ctr[i].off);
                tprintf(t, "%s{node=\"%s\",driver=\"%s\",op=\"%s\"} %llu\n", name,
                        esc(bs->node_name, a, sizeof(a)), bs->drv->name, op_names[op],
                        (unsigned long long)get(p));
            }
    }
    header(t, "bexd_node_latency_seconds", "histogram",
           "Time from submission to completion of successful requests.");
    for (struct bnode *bs = bnode_first(); bs; bs = bs->next)
        for (int op = 0; op < BSTAT_NR; op++) {
            struct bstat_op_counters *c = &bs->stats->op[op];
            uint64_t cum = 0;
            esc(bs->node_name, a, sizeof(a));
            for (int k = 0; k < BSTAT_LOG2_BUCKETS - 1; k++) {
                cum += get(&c->log2_buckets[k]);
                tprintf(t, "bexd_node_latency_seconds_bucket{node=\"%s\",driver=\"%s\","
                        "op=\"%s\",le=\"%.9g\"} %llu\n", a, bs->drv->name, op_names[op],
                        (double)(1ull << (BSTAT_LOG2_MIN + k)) / 1e9, (unsigned long long)cum);
            }
            cum += get(&c->log2_buckets[BSTAT_LOG2_BUCKETS - 1]);
            tprintf(t, "bexd_node_latency_seconds_bucket{node=\"%s\",driver=\"%s\",op=\"%s\","
                    "le=\"+Inf\"} %llu\n", a, bs->drv->name, op_names[op],
                    (unsigned long long)cum);
            tprintf(t, "bexd_node_latency_seconds_sum{node=\"%s\",driver=\"%s\",op=\"%s\"} "
                    "%.9f\n", a, bs->drv->name, op_names[op], get(&c->total_ns) / 1e9);
            tprintf(t, "bexd_node_latency_seconds_count{node=\"%s\",driver=\"%s\",op=\"%s\"} "
                    "%llu\n", a, bs->drv->name, op_names[op], (unsigned long long)cum);
        }
}

/* ---- the NBD server ---- */

static void nbd_metrics(struct text *t)
{
    struct nbd_server_counters n;
    nbd_server_counters(&n);
    header(t, "bexd_nbd_connections", "gauge", "NBD connections open (negotiating or attached).");
    tprintf(t, "bexd_nbd_connections %d\n", n.open);
    header(t, "bexd_nbd_connections_accepted_total", "counter", "NBD connections accepted.");
    tprintf(t, "bexd_nbd_connections_accepted_total %llu\n", (unsigned long long)n.accepted);
    header(t, "bexd_nbd_handshake_failures_total", "counter",
           "NBD connections that ended during the handshake for another reason than "
           "the client's NBD_OPT_ABORT.");
    tprintf(t, "bexd_nbd_handshake_failures_total %llu\n",
            (unsigned long long)n.handshake_failures);
    header(t, "bexd_nbd_tls_failures_total", "counter",
           "NBD connections refused at TLS: failed handshakes, peer checks, authorization.");
    tprintf(t, "bexd_nbd_tls_failures_total %llu\n", (unsigned long long)n.tls_failures);
}

static char *metrics_text(size_t *len)
{
    struct text t = { 0 };
    header(&t, "bexd_info", "gauge", "bexd's version.");
    tprintf(&t, "bexd_info{version=\"%s\"} 1\n", BEXD_VERSION);
    export_metrics(&t);
    node_metrics(&t);
    nbd_metrics(&t);
    *len = t.len;
    return t.buf;
}

/* ---- HTTP ---- */

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload, size_t *upload_size, void **state)
{
    struct MHD_Response *rsp;
    enum MHD_Result ret;
    unsigned code = MHD_HTTP_OK;

    if (strcmp(method, "GET") && strcmp(method, "HEAD")) {
        static const char msg[] = "only GET\n";
        rsp = MHD_create_response_from_buffer(sizeof(msg) - 1, (void *)msg,
                                              MHD_RESPMEM_PERSISTENT);
        code = MHD_HTTP_METHOD_NOT_ALLOWED;
    } else if (strcmp(url, "/metrics")) {
        static const char msg[] = "bexd: metrics are at /metrics\n";
        rsp = MHD_create_response_from_buffer(sizeof(msg) - 1, (void *)msg,
                                              MHD_RESPMEM_PERSISTENT);
        code = MHD_HTTP_NOT_FOUND;
    } else {
        size_t len;
        char *text = metrics_text(&len);
        rsp = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    }
    if (!rsp)
        return MHD_NO;
    MHD_add_response_header(rsp, "Content-Type",
                            code == MHD_HTTP_OK ? "text/plain; version=0.0.4; charset=utf-8"
                                                : "text/plain; charset=utf-8");
    ret = MHD_queue_response(conn, code, rsp);
    MHD_destroy_response(rsp);
    return ret;
}

static void metrics_run(struct metrics_server *m)
{
    MHD_UNSIGNED_LONG_LONG ms;
    MHD_run(m->mhd);
    if (MHD_get_timeout(m->mhd, &ms) == MHD_YES)
        loop_timer_arm(m->timer, ms ? ms : 1);
    else
        loop_timer_cancel(m->timer);
}

static void on_ready(void *opaque, uint32_t revents)
{
    metrics_run(opaque);
}

static void on_timer(void *opaque)
{
    metrics_run(opaque);
}

int metrics_start(json_t *opts, error **errp)
{
    json_t *addr = json_object_get(opts, "addr");
    int fds[2];

    if (srv) {
        error_setg(errp, "metrics server already running");
        return -1;
    }
    int n = socket_listen(addr, 16, fds, 2, errp);
    if (n < 0)
        return -1;
    for (int i = 1; i < n; i++)
        close(fds[i]);       /* one address is enough for a scrape target */
    struct metrics_server *m = xzalloc(sizeof(*m));
    m->fd = fds[0];
    m->mhd = MHD_start_daemon(MHD_USE_EPOLL | MHD_USE_ERROR_LOG, 0, NULL, NULL,
                              on_request, NULL,
                              MHD_OPTION_LISTEN_SOCKET, (MHD_socket)m->fd,
                              MHD_OPTION_CONNECTION_LIMIT, (unsigned)32,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10,
                              MHD_OPTION_END);
    if (!m->mhd) {
        error_setg(errp, "cannot start the metrics HTTP server");
        close(m->fd);
        free(m);
        return -1;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(m->mhd, MHD_DAEMON_INFO_EPOLL_FD);
    m->timer = loop_timer_new(loop_main(), on_timer, m);
    m->watch = loop_watch_fd(loop_main(), info->epoll_fd, LOOP_IN, on_ready, m);
    srv = m;
    CLEANUP_FREE char *where = socket_address_str(addr);
    log_info("metrics: serving /metrics on %s", where ? where : "?");
    return 0;
}

void metrics_stop(void)
{
    if (!srv)
        return;
    loop_watch_del(srv->watch);
    loop_timer_free(srv->timer);
    MHD_stop_daemon(srv->mhd);   /* closes the listening socket */
    free(srv);
    srv = NULL;
}
