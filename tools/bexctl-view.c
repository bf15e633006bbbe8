/*
 * bexctl's human views: tables for the query commands and `top`.
 *
 * Theory of operation: a table is a list of columns, each a title and a
 * function that formats one row's cell from the command's JSON; widths are
 * measured over all rows first, so columns line up whatever the content.
 * `top` asks __org.bexd_query-export-clients and query-blockstats once a
 * second and shows the difference from the previous answer divided by the
 * time between them: operations and MiB per second and the average
 * latency of the requests completed in that second (iostat -x style), per
 * export and per client.  On a terminal it redraws in place and quits on
 * 'q'; otherwise (or with -n N) it prints N snapshots one after the other.
 */
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <jansson.h>
#include "tools/bexctl.h"
#include "util/xalloc.h"

/* ---- tables ---- */

#define MAX_COLS 16

struct column {
    const char *title;
    const char *key;              /* member to print (dotted: a.b), or NULL */
    bool right;                   /* numbers align right */
};

static const char *cell_text(json_t *row, const char *key, char *buf, size_t len)
{
    char path[128];
    json_t *v = row;
    snprintf(path, sizeof(path), "%s", key);
    for (char *save, *p = strtok_r(path, ".", &save); p && v; p = strtok_r(NULL, ".", &save))
        v = json_object_get(v, p);
    if (!v || json_is_null(v))
        return "-";
    if (json_is_string(v))
        return json_string_value(v);
    if (json_is_true(v))
        return "yes";
    if (json_is_false(v))
        return "no";
    if (json_is_integer(v)) {
        snprintf(buf, len, "%lld", (long long)json_integer_value(v));
        return buf;
    }
    if (json_is_real(v)) {
        snprintf(buf, len, "%.1f", json_real_value(v));
        return buf;
    }
    if (json_is_array(v)) {
        snprintf(buf, len, "%zu", json_array_size(v));
        return buf;
    }
    return "...";
}

/* No padding after the last column: lines end with their text. */
static void print_cell(const struct column *cols, const size_t *w, int c, int ncols,
                       const char *text)
{
    int width = cols[c].right ? (int)w[c] : c == ncols - 1 ? 0 : -(int)w[c];
    printf(c ? "  %*s" : "%*s", width, text);
}

static void print_table(json_t *rows, const struct column *cols, int ncols)
{
    size_t w[MAX_COLS];
    char buf[64];
    size_t i;
    json_t *row;

    for (int c = 0; c < ncols; c++)
        w[c] = strlen(cols[c].title);
    json_array_foreach(rows, i, row)
        for (int c = 0; c < ncols; c++) {
            size_t n = strlen(cell_text(row, cols[c].key, buf, sizeof(buf)));
            if (n > w[c])
                w[c] = n;
        }
    for (int c = 0; c < ncols; c++)
        print_cell(cols, w, c, ncols, cols[c].title);
    putchar('\n');
    json_array_foreach(rows, i, row) {
        for (int c = 0; c < ncols; c++)
            print_cell(cols, w, c, ncols, cell_text(row, cols[c].key, buf, sizeof(buf)));
        putchar('\n');
    }
}

/* Flatten per-export client lists into one row per client. */
static json_t *client_rows(json_t *exports)
{
    json_t *rows = json_array(), *e, *c;
    size_t i, j;
    json_array_foreach(exports, i, e) {
        json_array_foreach(json_object_get(e, "clients"), j, c) {
            json_t *r = json_deep_copy(c);
            json_object_set(r, "export", json_object_get(e, "id"));
            json_array_append_new(rows, r);
        }
    }
    return rows;
}

/* query-blockstats: one row per node, children included once. */
static void stats_rows(json_t *list, json_t *rows)
{
    size_t i;
    json_t *n;
    json_array_foreach(list, i, n)
        json_array_append(rows, n);
}

bool bexctl_print_table(const char *cmd, json_t *ret)
{
    static const struct column exports[] = {
        { "ID", "id", false }, { "TYPE", "type", false }, { "NODE", "node-name", false },
        { "SHUTTING-DOWN", "shutting-down", false },
    };
    static const struct column nodes[] = {
        { "NODE", "node-name", false }, { "DRIVER", "drv", false },
        { "SIZE", "image.virtual-size", true }, { "RO", "ro", false },
        { "FILE", "file", false },
    };
    static const struct column iothreads[] = {
        { "ID", "id", false }, { "THREAD", "thread-id", true },
        { "POLL-MAX-NS", "poll-max-ns", true },
    };
    static const struct column stats[] = {
        { "NODE", "node-name", false },
        { "RD-OPS", "stats.rd_operations", true }, { "RD-BYTES", "stats.rd_bytes", true },
        { "WR-OPS", "stats.wr_operations", true }, { "WR-BYTES", "stats.wr_bytes", true },
        { "FLUSH", "stats.flush_operations", true }, { "UNMAP", "stats.unmap_operations", true },
        { "FAILED-RD", "stats.failed_rd_operations", true },
        { "FAILED-WR", "stats.failed_wr_operations", true },
        { "IDLE-NS", "stats.idle_time_ns", true },
    };
    static const struct column clients[] = {
        { "EXPORT", "export", false }, { "TRANSPORT", "transport", false },
        { "PEER", "peer", false }, { "TLS-IDENTITY", "tls-identity", false },
        { "SINCE", "connected-since", true }, { "INFLIGHT", "requests-in-flight", true },
        { "RD-OPS", "read-operations", true }, { "RD-BYTES", "read-bytes", true },
        { "WR-OPS", "write-operations", true }, { "WR-BYTES", "write-bytes", true },
        { "FAILED", "failed-operations", true },
    };
#define T(c) c, (int)(sizeof(c) / sizeof(c[0]))
    if (!json_is_array(ret))
        return false;
    if (!strcmp(cmd, "query-block-exports")) {
        print_table(ret, T(exports));
    } else if (!strcmp(cmd, "query-named-block-nodes")) {
        print_table(ret, T(nodes));
    } else if (!strcmp(cmd, "query-iothreads")) {
        print_table(ret, T(iothreads));
    } else if (!strcmp(cmd, "query-blockstats")) {
        json_t *rows = json_array();
        stats_rows(ret, rows);
        print_table(rows, T(stats));
        json_decref(rows);
    } else if (!strcmp(cmd, "__org.bexd_query-export-clients")) {
        json_t *rows = client_rows(ret);
        print_table(rows, T(clients));
        json_decref(rows);
    } else {
        return false;
    }
#undef T
    fflush(stdout);
    return true;
}

/* ---- top ---- */

struct io_sample {
    double rd_ops, wr_ops, rd_bytes, wr_bytes, rd_ns, wr_ns;
};

static double num(json_t *o, const char *k)
{
    return (double)json_integer_value(json_object_get(o, k));
}

static struct io_sample sample_counters(json_t *c)
{
    return (struct io_sample){
        num(c, "read-operations"), num(c, "write-operations"), num(c, "read-bytes"),
        num(c, "write-bytes"), num(c, "read-total-time-ns"), num(c, "write-total-time-ns"),
    };
}

static struct io_sample sample_node(json_t *s)
{
    return (struct io_sample){
        num(s, "rd_operations"), num(s, "wr_operations"), num(s, "rd_bytes"),
        num(s, "wr_bytes"), num(s, "rd_total_time_ns"), num(s, "wr_total_time_ns"),
    };
}

/* Previous samples by name ("e:ID", "c:ID:PEER"). */
static json_t *prev;

static void print_rate(const char *what, const char *name, const char *extra,
                       struct io_sample now, double dt)
{
    json_t *p = json_object_get(prev, name);
    struct io_sample d = { 0 };
    if (p) {
        d.rd_ops = now.rd_ops - num(p, "r");
        d.wr_ops = now.wr_ops - num(p, "w");
        d.rd_bytes = now.rd_bytes - num(p, "rb");
        d.wr_bytes = now.wr_bytes - num(p, "wb");
        d.rd_ns = now.rd_ns - num(p, "rn");
        d.wr_ns = now.wr_ns - num(p, "wn");
    }
    json_object_set_new(prev, name, json_pack("{s:I, s:I, s:I, s:I, s:I, s:I}",
        "r", (json_int_t)now.rd_ops, "w", (json_int_t)now.wr_ops,
        "rb", (json_int_t)now.rd_bytes, "wb", (json_int_t)now.wr_bytes,
        "rn", (json_int_t)now.rd_ns, "wn", (json_int_t)now.wr_ns));
    printf("%-28.28s %9.0f %9.0f %9.1f %9.1f %9.3f %9.3f  %s\n", what,
           d.rd_ops / dt, d.wr_ops / dt, d.rd_bytes / dt / 1048576, d.wr_bytes / dt / 1048576,
           d.rd_ops > 0 ? d.rd_ns / d.rd_ops / 1e6 : 0.0,
           d.wr_ops > 0 ? d.wr_ns / d.wr_ops / 1e6 : 0.0, extra);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void top_frame(json_int_t *id, double dt, bool tty)
{
    json_t *exports = bexctl_execute("__org.bexd_query-export-clients", NULL, (*id)++);
    json_t *args = json_pack("{s:b}", "query-nodes", 1);
    json_t *nodes = bexctl_execute("query-blockstats", args, (*id)++);
    json_decref(args);
    time_t t = time(NULL);
    char when[32];
    size_t i, j;
    json_t *e, *c;
    unsigned nclients = 0;

    strftime(when, sizeof(when), "%H:%M:%S", localtime(&t));
    json_array_foreach(exports, i, e)
        nclients += json_array_size(json_object_get(e, "clients"));
    if (tty)
        printf("\033[H\033[2J");
    printf("bexctl top - %s  %zu exports, %u clients  (every %.0f s%s)\n\n", when,
           json_array_size(exports), nclients, 1.0, tty ? "; q quits" : "");
    printf("%-28s %9s %9s %9s %9s %9s %9s  %s\n", "EXPORT / CLIENT", "r/s", "w/s",
           "rMiB/s", "wMiB/s", "r_await", "w_await", "INFO");
    json_array_foreach(exports, i, e) {
        const char *eid = json_string_value(json_object_get(e, "id"));
        const char *node = json_string_value(json_object_get(e, "node-name"));
        char name[256], info[256];
        struct io_sample s = { 0 };
        json_t *totals = json_object_get(e, "totals"), *n;
        if (totals) {
            s = sample_counters(totals);
        } else {
            json_array_foreach(nodes, j, n)       /* no per-export counters: its node's */
                if (!strcmp(json_string_value(json_object_get(n, "node-name")), node))
                    s = sample_node(json_object_get(n, "stats"));
        }
        snprintf(name, sizeof(name), "e:%s", eid);
        snprintf(info, sizeof(info), "%s on %s, %zu clients",
                 json_string_value(json_object_get(e, "type")), node,
                 json_array_size(json_object_get(e, "clients")));
        print_rate(eid, name, info, s, dt);
        json_array_foreach(json_object_get(e, "clients"), j, c) {
            const char *peer = json_string_value(json_object_get(c, "peer"));
            char label[64];
            snprintf(name, sizeof(name), "c:%s:%s", eid, peer);
            snprintf(label, sizeof(label), "  %s", peer);
            snprintf(info, sizeof(info), "%s%s%s, %lld in flight",
                     json_string_value(json_object_get(c, "transport")),
                     json_is_true(json_object_get(c, "tls")) ? " tls " : "",
                     json_string_value(json_object_get(c, "tls-identity"))
                         ? json_string_value(json_object_get(c, "tls-identity")) : "",
                     (long long)json_integer_value(json_object_get(c, "requests-in-flight")));
            print_rate(label, name, info, sample_counters(c), dt);
        }
    }
    fflush(stdout);
    json_decref(exports);
    json_decref(nodes);
}

static struct termios saved_tio;
static bool tio_saved;

static void restore_tty(void)
{
    if (tio_saved)
        tcsetattr(STDIN_FILENO, TCSANOW, &saved_tio);
}

static void on_stop(int sig)
{
    restore_tty();
    _exit(0);
}

int bexctl_top(int iterations)
{
    bool tty = isatty(STDOUT_FILENO) && isatty(STDIN_FILENO) && iterations == 0;
    json_int_t id = 100;
    double last = now_s();

    prev = json_object();
    if (tty && tcgetattr(STDIN_FILENO, &saved_tio) == 0) {
        struct termios raw = saved_tio;
        raw.c_lflag &= ~(ICANON | ECHO);
        tio_saved = tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0;
        atexit(restore_tty);
        signal(SIGINT, on_stop);
        signal(SIGTERM, on_stop);
    }
    top_frame(&id, 1.0, tty);      /* first frame: rates need a previous sample */
    for (int n = 1; iterations == 0 || n < iterations; n++) {
        struct pollfd p = { .fd = STDIN_FILENO, .events = POLLIN };
        double deadline = last + 1.0;
        for (;;) {
            int ms = (int)((deadline - now_s()) * 1000);
            if (ms <= 0)
                break;
            if (tty && poll(&p, 1, ms) > 0) {
                char ch;
                if (read(STDIN_FILENO, &ch, 1) == 1 && (ch == 'q' || ch == 'Q'))
                    return 0;
            } else if (!tty) {
                poll(NULL, 0, ms);
            }
        }
        double t = now_s();
        if (!tty)
            putchar('\n');
        top_frame(&id, t - last, tty);
        last = t;
    }
    return 0;
}
