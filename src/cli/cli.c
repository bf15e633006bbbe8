/*
 * qemu-storage-daemon's command line.
 *
 * Theory of operation: getopt_long walks argv once, in order.  Each
 * configuration option turns its argument into a JSON object (keyval with
 * the option's implied key, or JSON when it starts with '{'), checks it
 * against the schema type the QMP command uses (keyval mode converts the
 * strings; JSON is checked strictly, as qsd does), and calls the same
 * operation the QMP command calls.  --chardev is parsed the QemuOpts way
 * (flat keys, "server" alone means server=on), as in qsd.  Errors carry
 * the option and its argument as location, like qsd's
 * "--blockdev driver=file: Parameter 'filename' is missing"; main prints
 * them after the program name.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "cli/cli.h"
#include "config.h"
#include "export/export.h"
#include "export/nbd/nbd.h"
#include "object/object.h"
#include "chardev/chardev.h"
#include "ops/metrics.h"
#include "qmp/monitor.h"
#include "qmp/schema.h"
#include "util/cleanup.h"
#include "util/keyval.h"
#include "util/xalloc.h"

enum {
    OPT_BLOCKDEV = 256, OPT_CHARDEV, OPT_DAEMONIZE, OPT_EXPORT, OPT_MONITOR,
    OPT_NBD_SERVER, OPT_OBJECT, OPT_PIDFILE,
    OPT_METRICS,        /* bexd's own (ops) */
};

static const struct option long_options[] = {
    { "blockdev",   required_argument, NULL, OPT_BLOCKDEV },
    { "chardev",    required_argument, NULL, OPT_CHARDEV },
    { "daemonize",  no_argument,       NULL, OPT_DAEMONIZE },
    { "export",     required_argument, NULL, OPT_EXPORT },
    { "help",       no_argument,       NULL, 'h' },
    { "metrics",    required_argument, NULL, OPT_METRICS },
    { "monitor",    required_argument, NULL, OPT_MONITOR },
    { "nbd-server", required_argument, NULL, OPT_NBD_SERVER },
    { "object",     required_argument, NULL, OPT_OBJECT },
    { "pidfile",    required_argument, NULL, OPT_PIDFILE },
    { "trace",      required_argument, NULL, 'T' },
    { "version",    no_argument,       NULL, 'V' },
    { NULL, 0, NULL, 0 },
};

static const char short_options[] = "-:hT:V";

static void print_help(void)
{
    printf(
"Usage: bexd [options]\n"
"bexd, a block export daemon (drop-in for qemu-storage-daemon)\n"
"\n"
"  -h, --help             display this help and exit\n"
"  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]\n"
"                         accepted for compatibility and ignored\n"
"  -V, --version          output version information and exit\n"
"\n"
"  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]\n"
"             [,cache.direct=on|off][,cache.no-flush=on|off]\n"
"             [,read-only=on|off][,auto-read-only=on|off]\n"
"             [,force-share=on|off][,detect-zeroes=on|off|unmap]\n"
"             [,driver specific parameters...]\n"
"                         configure a block backend\n"
"\n"
"  --chardev <options>    configure a character device backend\n"
"                         (socket,id=<id>,path=<path>,server=on,wait=off;\n"
"                          socket,id=<id>,host=<host>,port=<port>,server=on,wait=off;\n"
"                          stdio,id=<id>)\n"
"\n"
"  --daemonize            daemonize the process, and have the parent exit\n"
"                         once startup is complete\n"
"\n"
"  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]\n"
"           [,writable=on|off][,bitmap=<name>]\n"
"                         export the specified block node over NBD\n"
"                         (requires --nbd-server)\n"
"\n"
"  --export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>\n"
"           [,growable=on|off][,writable=on|off][,allow-other=on|off|auto]\n"
"                         export the specified block node over FUSE\n"
"\n"
"  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,\n"
"           addr.type=unix,addr.path=<socket-path>[,writable=on|off]\n"
"           [,logical-block-size=<block-size>][,num-queues=<num-queues>]\n"
"                         export the specified block node as a\n"
"                         vhost-user-blk device over UNIX domain socket\n"
"\n"
"  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]\n"
"                         configure a QMP monitor\n"
"\n"
"  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>\n"
"               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]\n"
"               [,handshake-max-seconds=<n>]\n"
"  --nbd-server addr.type=unix,addr.path=<path>\n"
"               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]\n"
"               [,handshake-max-seconds=<n>]\n"
"                         start an NBD server for exporting block nodes\n"
"\n"
"  --object help          list object types that can be added\n"
"  --object <type>[,<property>=<value>...]\n"
"                         create a new object of type <type>, setting\n"
"                         properties in the order they are specified. Note\n"
"                         that the 'id' property must be set.\n"
"\n"
"  --pidfile <path>       write process ID to a file after startup\n"
"\n"
"  --metrics addr.type=inet,addr.host=<host>,addr.port=<port>\n"
"  --metrics addr.type=unix,addr.path=<path> | addr.type=fd,addr.str=<name>\n"
"                         serve Prometheus metrics over HTTP at /metrics\n"
"                         (bexd only; off unless given)\n");
}

/* ---- QemuOpts-style parsing for --chardev ---- */

static char *opts_value(const char **sp)
{
    const char *s = *sp;
    size_t n = 0;
    char *out = xmalloc(strlen(s) + 1);
    while (*s) {
        if (*s == ',') {
            if (s[1] != ',')
                break;
            s++;
        }
        out[n++] = *s++;
    }
    out[n] = 0;
    if (*s == ',')
        s++;
    *sp = s;
    return out;
}

static json_t *qemu_opts_parse(const char *s, const char *implied, error **errp)
{
    json_t *o = json_object();
    bool first = true;
    while (*s) {
        size_t klen = strcspn(s, "=,");
        CLEANUP_FREE char *key = xstrndup(s, klen);
        if (s[klen] == '=') {
            s += klen + 1;
            char *v = opts_value(&s);
            json_object_set_new(o, key, json_string(v) ?: json_null());
            free(v);
        } else if (first && implied) {
            char *v = opts_value(&s);
            json_object_set_new(o, implied, json_string(v));
            free(v);
        } else {
            s += klen;
            if (*s == ',')
                s++;
            if (!strncmp(key, "no", 2) && key[2])
                json_object_set_new(o, key + 2, json_string("off"));
            else
                json_object_set_new(o, key, json_string("on"));
        }
        first = false;
    }
    (void)errp;
    return o;
}

/* ---- options ---- */

static int apply_checked(const char *arg, const char *implied, const char *type,
                         int (*op)(json_t *, error **), error **errp)
{
    bool is_json;
    CLEANUP_JSON json_t *raw = keyval_or_json_parse(arg, implied, &is_json, errp);
    if (!raw)
        return -1;
    CLEANUP_JSON json_t *checked = schema_check_type(type, raw, !is_json, "", errp);
    if (!checked)
        return -1;
    return op(checked, errp) < 0 ? -1 : 0;
}

static int op_blockdev(json_t *o, error **errp) { return blockdev_add(o, errp) ? 0 : -1; }
static int op_export(json_t *o, error **errp) { return block_export_add(o, errp); }
static int op_nbd(json_t *o, error **errp) { return nbd_server_start(o, errp); }
static int op_object(json_t *o, error **errp) { return object_add(o, errp); }
static int op_monitor(json_t *o, error **errp) { return monitor_add(o, errp); }
#ifndef CONFIG_METRICS
static int op_metrics(json_t *o, error **errp)
{
    error_setg(errp, "this bexd was built without the metrics endpoint (libmicrohttpd)");
    return -1;
}
#endif

const struct cli_ops cli_ops_apply = {
    .blockdev = op_blockdev,
    .export = op_export,
    .nbd_server = op_nbd,
    .object = op_object,
    .monitor = op_monitor,
    .chardev = chardev_add_opts,
#ifdef CONFIG_METRICS
    .metrics = metrics_start,
#else
    .metrics = op_metrics,
#endif
};

static const char *const object_types[] = {
    "authz-list", "authz-listfile", "authz-pam", "authz-simple", "iothread", "main-loop",
    "secret", "tls-creds-anon", "tls-creds-psk", "tls-creds-x509",
};

static void print_object_types(void)
{
    printf("List of user creatable objects:\n");
    for (size_t i = 0; i < ARRAY_SIZE(object_types); i++)
        printf("  %s\n", object_types[i]);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* "--object TYPE,help": the type's properties, sorted, typed as QOM shows them. */
static void print_object_props(const char *type)
{
    CLEANUP_JSON json_t *m = schema_members("ObjectOptions", type);
    const char *names[64];
    size_t n = 0;
    const char *k;
    json_t *v;

    json_object_foreach(m, k, v)
        if (strcmp(k, "qom-type") && strcmp(k, "id") && strcmp(k, "loaded") && n < 64)
            names[n++] = k;
    qsort(names, n, sizeof(names[0]), cmp_str);
    printf("%s options:\n", type);
    for (size_t i = 0; i < n; i++) {
        const char *t = json_string_value(json_object_get(m, names[i]));
        if (!strcmp(t, "str"))
            t = "string";
        else if (!strncmp(t, "int", 3) || !strncmp(t, "uint", 4) || !strcmp(t, "size"))
            t = "int";
        if (t[0] == '[')        /* a list shows its element type */
            printf("  %s=<%.*s>\n", names[i], (int)strlen(t) - 2, t + 1);
        else
            printf("  %s=<%s>\n", names[i], t);
    }
}

/* QEMU's --object help handling: "help" (or "?") as an item asks for help:
 * on the type named first (or by qom-type=), else the list of types.
 * Returns whether help was asked; *typep is the type to describe, or NULL
 * for the list. */
static bool object_help(const char *arg, const char **typep)
{
    CLEANUP_FREE char *copy = xstrdup(arg);
    char *type = NULL, *save, *item;
    bool help = false, first = true;

    *typep = NULL;
    if (arg[0] == '{')
        return false;
    for (item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        if (!strcmp(item, "help") || !strcmp(item, "?"))
            help = true;
        else if (!strncmp(item, "qom-type=", 9))
            type = item + 9;
        else if (first && !strchr(item, '='))
            type = item;
        first = false;
    }
    if (!help)
        return false;
    for (size_t i = 0; type && i < ARRAY_SIZE(object_types); i++)
        if (!strcmp(type, object_types[i]))
            *typep = object_types[i];
    return true;
}

/* 0: applied; -1: error; 1: help asked (res->print says which) */
static int apply_one(int c, const char *arg, const struct cli_ops *ops,
                     struct cli_result *res, error **errp)
{
    switch (c) {
    case OPT_BLOCKDEV:
        return apply_checked(arg, "driver", "BlockdevOptions", ops->blockdev, errp);
    case OPT_EXPORT:
        return apply_checked(arg, "type", "BlockExportOptions", ops->export, errp);
    case OPT_NBD_SERVER:
        return apply_checked(arg, NULL, "NbdServerOptions", ops->nbd_server, errp);
    case OPT_MONITOR:
        return apply_checked(arg, "chardev", "MonitorOptions", ops->monitor, errp);
    case OPT_OBJECT:
        if (object_help(arg, &res->print_type)) {
            res->print = res->print_type ? CLI_PRINT_OBJECT_PROPS : CLI_PRINT_OBJECT_TYPES;
            return 1;
        }
        return apply_checked(arg, "qom-type", "ObjectOptions", ops->object, errp);
    case OPT_CHARDEV: {
        CLEANUP_JSON json_t *o = qemu_opts_parse(arg, "backend", errp);
        return o ? (ops->chardev(o, errp) < 0 ? -1 : 0) : -1;
    }
    case OPT_PIDFILE:
        res->pidfile = arg;
        return 0;
    case OPT_METRICS:
        return apply_checked(arg, NULL, "__org.bexd_MetricsOptions", ops->metrics, errp);
    case OPT_DAEMONIZE:
        res->daemonize = true;
        return 0;
    case 'T':
        return 0;       /* tracing is not implemented; accepted for compatibility */
    }
    return 0;
}

static int option_error(int c, char **argv, error **errp)
{
    const char *arg = argv[optind - 1];
    bool is_long = !strncmp(arg, "--", 2);
    if (c == ':') {
        if (is_long)
            error_setg(errp, "option '%s' requires an argument", arg);
        else
            error_setg(errp, "option requires an argument -- '%c'", optopt);
        return -1;
    }
    if (!is_long) {
        error_setg(errp, "invalid option -- '%c'", optopt);
        return -1;
    }
    if (strchr(arg, '=')) {
        size_t n = strchr(arg, '=') - arg - 2;
        for (const struct option *o = long_options; o->name; o++) {
            if (o->has_arg == no_argument && !strncmp(o->name, arg + 2, n)) {
                error_setg(errp, "option '--%s' doesn't allow an argument", o->name);
                return -1;
            }
        }
    }
    error_setg(errp, "unrecognized option '%s'", arg);
    return -1;
}

int cli_parse(int argc, char **argv, const struct cli_ops *ops, struct cli_result *res,
              error **errp)
{
    int c;

    optind = 0;      /* full re-initialisation of glibc's getopt */
    opterr = 0;
    while ((c = getopt_long(argc, argv, short_options, long_options, NULL)) != -1) {
        switch (c) {
        case '?':
        case ':':
            return option_error(c, argv, errp);
        case 'h':
            res->print = CLI_PRINT_HELP;
            return 1;
        case 'V':
            res->print = CLI_PRINT_VERSION;
            return 1;
        case 1:
            error_setg(errp, "%s: Unexpected argument", optarg);
            return -1;
        }
        error *err = NULL;
        int r = apply_one(c, optarg, ops, res, &err);
        if (r < 0) {
            /* location: "--option arg", or "--option=arg" as given */
            const char *last = argv[optind - 1];
            if (last != optarg)
                error_setg(errp, "%s: %s", last, err->msg);
            else
                error_setg(errp, "%s %s: %s", argv[optind - 2], optarg, err->msg);
            error_free(err);
            return -1;
        }
        if (r > 0)
            return 1;
    }
    return 0;
}

void cli_print(const struct cli_result *res)
{
    switch (res->print) {
    case CLI_PRINT_NONE:
        break;
    case CLI_PRINT_HELP:
        print_help();
        break;
    case CLI_PRINT_VERSION:
        printf("bexd version " BEXD_VERSION "\n"
               "A block export daemon compatible with qemu-storage-daemon\n");
        break;
    case CLI_PRINT_OBJECT_TYPES:
        print_object_types();
        break;
    case CLI_PRINT_OBJECT_PROPS:
        print_object_props(res->print_type);
        break;
    }
}

/*
 * The pass before anything is applied, as qemu-storage-daemon's pre-init
 * pass: the same getopt_long walk over the same table, so --daemonize is
 * seen exactly where the real pass sees it (an abbreviation such as
 * --daemon included, nothing after "--", nothing that is another option's
 * argument).  It stops at the first getopt error, -h or -V: those are the
 * real pass's to report, in the foreground, as qsd's pre-init pass does.
 * `--object help` is not among them: qsd prints it in its second pass,
 * after forking (the parent, never told "ready", then exits 1), and so
 * does bexd.
 */
bool cli_wants_daemonize(int argc, char **argv)
{
    bool daemonize = false;
    int c;

    optind = 0;
    opterr = 0;
    while ((c = getopt_long(argc, argv, short_options, long_options, NULL)) != -1) {
        if (c == '?' || c == ':' || c == 1 || c == 'h' || c == 'V')
            return false;
        if (c == OPT_DAEMONIZE)
            daemonize = true;
    }
    return daemonize;
}
