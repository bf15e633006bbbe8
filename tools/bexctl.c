/*
 * bexctl: run one QMP command against bexd (or qemu-storage-daemon).
 *
 *   bexctl -s SOCK COMMAND [key=value ...]     dotted keys nest; values are
 *                                              JSON literals (true, false,
 *                                              null, numbers) or strings;
 *                                              key:=JSON takes raw JSON
 *   bexctl -s SOCK COMMAND '{"json": ...}'     arguments as one JSON object
 *   bexctl -s SOCK --events | events           print events until interrupted
 *   bexctl -s SOCK exports|nodes|stats|clients short names of the queries
 *   bexctl -s SOCK top [-n N]                  live view (bexctl-view.c)
 *
 * The query commands print a table (query-block-exports,
 * query-named-block-nodes, query-blockstats, query-iothreads,
 * __org.bexd_query-export-clients); other return values are printed as
 * indented JSON; --json prints any of them as one line of JSON.
 * Exit status: 0 success, 1 QMP error ("Class: message" on stderr),
 * 2 usage or connection error.
 *
 * Theory of operation: connect, read the greeting, negotiate, send the
 * command with an id, read "\n"-terminated messages until the response
 * carrying that id arrives (events in between are skipped).
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <jansson.h>
#include "tools/bexctl.h"
#include "util/xalloc.h"

#define EXIT_QMP 1
#define EXIT_USAGE 2
#define MAX_LINE (64u << 20)

static int sock = -1;
static char *rbuf;
static size_t rlen, rcap;
static bool one_line, pretty;

static void die(const char *fmt, const char *arg)
{
    fprintf(stderr, "bexctl: ");
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    exit(EXIT_USAGE);
}

static void usage(FILE *f)
{
    fprintf(f,
        "Usage: bexctl -s SOCKET [--json] COMMAND [key=value | key:=JSON ...]\n"
        "       bexctl -s SOCKET [--json] COMMAND '{\"json\": \"arguments\"}'\n"
        "       bexctl -s SOCKET [--json] --events   (or: events)\n"
        "       bexctl -s SOCKET exports | nodes | stats | clients\n"
        "       bexctl -s SOCKET top [-n COUNT]\n"
        "\n"
        "Runs one QMP command on a bexd or qemu-storage-daemon monitor socket.\n"
        "Query commands print a table; others print indented JSON.\n"
        "  -s, --socket PATH|HOST:PORT  monitor socket (UNIX path, or TCP)\n"
        "  -j, --json                   print results as one line of JSON\n"
        "  -p, --pretty                 print results as indented JSON, never a table\n"
        "  -e, --events                 print events as they come until interrupted\n"
        "  -h, --help                   this help\n"
        "Values: true/false/null and numbers are JSON, anything else a string;\n"
        "dotted keys nest (addr.type=unix), numeric parts make lists (rules.0.match=x).\n"
        "Exit status: 0 ok, 1 QMP error, 2 usage or connection error.\n");
}

static int connect_to(const char *where)
{
    const char *colon = strrchr(where, ':');
    int fd;
    if (!strchr(where, '/') && colon) {
        char host[256];
        struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res, *e;
        snprintf(host, sizeof(host), "%.*s", (int)(colon - where), where);
        if (getaddrinfo(host, colon + 1, &hints, &res) != 0)
            die("cannot resolve %s", where);
        for (e = res; e; e = e->ai_next) {
            fd = socket(e->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (fd >= 0 && connect(fd, e->ai_addr, e->ai_addrlen) == 0) {
                freeaddrinfo(res);
                return fd;
            }
            if (fd >= 0)
                close(fd);
        }
        freeaddrinfo(res);
        die("cannot connect to %s", where);
    }
    struct sockaddr_un un = { .sun_family = AF_UNIX };
    if (strlen(where) >= sizeof(un.sun_path))
        die("socket path too long: %s", where);
    strcpy(un.sun_path, where);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&un, sizeof(un)) < 0) {
        fprintf(stderr, "bexctl: cannot connect to %s: %s\n", where, strerror(errno));
        exit(EXIT_USAGE);
    }
    return fd;
}

/* Next message; NULL at EOF.  Messages may span lines (pretty monitors). */
static json_t *recv_msg(void)
{
    for (;;) {
        size_t skip = 0;
        while (skip < rlen && isspace((unsigned char)rbuf[skip]))
            skip++;
        if (skip) {
            memmove(rbuf, rbuf + skip, rlen - skip);
            rlen -= skip;
        }
        if (rlen) {
            json_error_t jerr;
            json_t *v = json_loadb(rbuf, rlen, JSON_DISABLE_EOF_CHECK, &jerr);
            if (v) {
                size_t n = jerr.position;
                memmove(rbuf, rbuf + n, rlen - n);
                rlen -= n;
                return v;
            }
            if (json_error_code(&jerr) != json_error_premature_end_of_input) {
                char *nl = memchr(rbuf, '\n', rlen);      /* garbage: drop a line */
                size_t n = nl ? (size_t)(nl - rbuf + 1) : rlen;
                memmove(rbuf, rbuf + n, rlen - n);
                rlen -= n;
                continue;
            }
        }
        if (rlen == rcap) {
            if (rcap >= MAX_LINE)
                die("%s", "reply too long");
            rcap = rcap ? rcap * 2 : 65536;
            rbuf = xrealloc(rbuf, rcap);
        }
        ssize_t r = read(sock, rbuf + rlen, rcap - rlen);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return NULL;
        rlen += r;
    }
}

static void send_msg(json_t *msg)
{
    char *s = json_dumps(msg, JSON_COMPACT);
    size_t len = strlen(s), off = 0;
    while (off < len) {
        ssize_t w = write(sock, s + off, len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            die("%s", "connection lost while sending");
        off += w;
    }
    if (write(sock, "\n", 1) != 1)
        die("%s", "connection lost while sending");
    free(s);
}

static void print_json(json_t *v)
{
    char *s = json_dumps(v, JSON_ENCODE_ANY | (one_line ? JSON_COMPACT : JSON_INDENT(2)));
    puts(s);
    free(s);
    fflush(stdout);
}

/* Run a command; returns its "return" or exits on error. */
json_t *bexctl_execute(const char *cmd, json_t *args, json_int_t id)
{
    json_t *req = json_pack("{s:s, s:I}", "execute", cmd, "id", id);
    if (args)
        json_object_set(req, "arguments", args);
    send_msg(req);
    json_decref(req);
    for (;;) {
        json_t *m = recv_msg();
        if (!m)
            die("%s", "connection closed by the daemon");
        json_t *mid = json_object_get(m, "id");
        if (!json_is_integer(mid) || json_integer_value(mid) != id) {
            json_decref(m);
            continue;
        }
        json_t *err = json_object_get(m, "error");
        if (err) {
            fprintf(stderr, "%s: %s\n", json_string_value(json_object_get(err, "class")),
                    json_string_value(json_object_get(err, "desc")));
            json_decref(m);
            free(rbuf);
            exit(EXIT_QMP);
        }
        json_t *ret = json_incref(json_object_get(m, "return"));
        json_decref(m);
        return ret;
    }
}

/* ---- key=value arguments ---- */

static json_t *scalar_value(const char *s)
{
    if (!strcmp(s, "true")) return json_true();
    if (!strcmp(s, "false")) return json_false();
    if (!strcmp(s, "null")) return json_null();
    if (*s && (isdigit((unsigned char)*s) || (*s == '-' && isdigit((unsigned char)s[1])))) {
        json_error_t e;
        json_t *v = json_loads(s, JSON_DECODE_ANY, &e);
        if (v && json_is_number(v))
            return v;
        json_decref(v);
    }
    return json_string(s);
}

static bool all_digits(const char *s)
{
    if (!*s)
        return false;
    for (; *s; s++)
        if (!isdigit((unsigned char)*s))
            return false;
    return true;
}

/* Objects whose keys are all indexes become arrays. */
static json_t *listify(json_t *v)
{
    if (!json_is_object(v))
        return v;
    const char *k;
    json_t *e;
    void *tmp;
    bool idx = json_object_size(v) > 0;
    json_object_foreach_safe(v, tmp, k, e) {
        json_object_set_new(v, k, listify(json_incref(e)));
        idx &= all_digits(k);
    }
    if (!idx)
        return v;
    json_t *arr = json_array();
    for (size_t i = 0; i < json_object_size(v); i++) {
        char key[24];
        snprintf(key, sizeof(key), "%zu", i);
        e = json_object_get(v, key);
        if (!e)
            die("list index %s missing", key);
        json_array_append(arr, e);
    }
    json_decref(v);
    return arr;
}

static void put_kv(json_t *root, const char *arg)
{
    const char *eq = strchr(arg, '=');
    if (!eq || eq == arg)
        die("expected key=value, got '%s'", arg);
    bool raw = eq[-1] == ':';
    char *key = xstrndup(arg, eq - arg - raw);
    json_t *val;
    if (raw) {
        json_error_t e;
        val = json_loads(eq + 1, JSON_DECODE_ANY, &e);
        if (!val)
            die("invalid JSON value in '%s'", arg);
    } else {
        val = scalar_value(eq + 1);
    }
    json_t *cur = root;
    char *save, *frag = strtok_r(key, ".", &save), *next;
    for (; (next = strtok_r(NULL, ".", &save)); frag = next) {
        json_t *sub = json_object_get(cur, frag);
        if (!json_is_object(sub)) {
            sub = json_object();
            json_object_set_new(cur, frag, sub);
        }
        cur = sub;
    }
    if (!frag)
        die("empty key in '%s'", arg);
    json_object_set_new(cur, frag, val);
    free(key);
}

static json_t *build_args(int n, char **argv)
{
    if (n == 0)
        return NULL;
    if (n == 1 && argv[0][0] == '{') {
        json_error_t e;
        json_t *v = json_loads(argv[0], 0, &e);
        if (!json_is_object(v))
            die("arguments are not a JSON object: %s", e.text);
        return v;
    }
    json_t *root = json_object();
    for (int i = 0; i < n; i++)
        put_kv(root, argv[i]);
    return listify(root);
}

static void on_interrupt(int sig)
{
    _exit(0);
}

static void run_events(void)
{
    signal(SIGINT, on_interrupt);
    signal(SIGTERM, on_interrupt);
    fprintf(stderr, "Waiting for events (interrupt to stop)\n");
    for (;;) {
        json_t *m = recv_msg();
        if (!m)
            exit(0);
        if (json_object_get(m, "event"))
            print_json(m);
        json_decref(m);
    }
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "socket", required_argument, NULL, 's' },
        { "json", no_argument, NULL, 'j' },
        { "pretty", no_argument, NULL, 'p' },
        { "events", no_argument, NULL, 'e' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    const char *path = NULL;
    bool events = false;
    int c;

    while ((c = getopt_long(argc, argv, "+s:jpeh", opts, NULL)) != -1) {
        switch (c) {
        case 's': path = optarg; break;
        case 'j': one_line = true; break;
        case 'p': pretty = true; break;
        case 'e': events = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return EXIT_USAGE;
        }
    }
    if (!events && optind < argc && !strcmp(argv[optind], "events")) {
        events = true;
        optind++;
    }
    if (!path || (!events && optind >= argc) || (events && optind < argc)) {
        usage(stderr);
        return EXIT_USAGE;
    }
    static const struct { const char *alias, *cmd, *args; } aliases[] = {
        { "exports", "query-block-exports", NULL },
        { "nodes", "query-named-block-nodes", NULL },
        { "stats", "query-blockstats", "query-nodes=true" },
        { "clients", "__org.bexd_query-export-clients", NULL },
    };
    const char *cmd = events ? NULL : argv[optind];
    json_t *args = NULL;
    int top = -1;
    if (cmd && !strcmp(cmd, "top")) {
        top = 0;
        if (optind + 3 == argc && !strcmp(argv[optind + 1], "-n") && atoi(argv[optind + 2]) > 0)
            top = atoi(argv[optind + 2]);
        else if (optind + 1 != argc)
            die("%s", "usage: bexctl -s SOCKET top [-n COUNT]");
    } else if (cmd) {
        char *alias_arg[1];
        int n = argc - optind - 1;
        char **av = argv + optind + 1;
        for (size_t i = 0; i < sizeof(aliases) / sizeof(aliases[0]); i++) {
            if (!strcmp(cmd, aliases[i].alias)) {
                cmd = aliases[i].cmd;
                if (aliases[i].args && n == 0) {
                    alias_arg[0] = (char *)aliases[i].args;
                    av = alias_arg;
                    n = 1;
                }
            }
        }
        args = build_args(n, av);
    }

    sock = connect_to(path);
    json_t *greeting = recv_msg();
    if (!json_object_get(greeting, "QMP"))
        die("%s", "no QMP greeting");
    json_decref(greeting);
    json_decref(bexctl_execute("qmp_capabilities", NULL, 1));
    if (events)
        run_events();
    if (top >= 0)
        return bexctl_top(top);
    json_t *ret = bexctl_execute(cmd, args, 2);
    if (one_line || pretty || !bexctl_print_table(cmd, ret))
        print_json(ret);
    json_decref(ret);
    json_decref(args);
    close(sock);
    return 0;
}
