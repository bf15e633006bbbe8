/*
 * libFuzzer target: bexd's whole command line.  An input is argv after the
 * program name, arguments separated by NUL bytes.  It goes through the
 * real parser of main(): cli_parse() (getopt_long over the real option
 * table, keyval or JSON with each option's implied key, the schema check
 * of each option's type, --chardev's QemuOpts parsing and its backend's
 * checks, --object help, -h/-V, --pidfile, --daemonize, "--", stray
 * arguments) and cli_wants_daemonize(), the pass main() runs before it.
 * Nothing is started: the options are handed to checking-only operations
 * instead of blockdev_add(), block_export_add() and the others (chardevs
 * stop at chardev_check_opts()).
 *
 * Checked besides sanitizer reports: the pre-pass and the real pass agree
 * on --daemonize (bexd forks exactly when the command line it then applies
 * asks for it, and never before printing -h or -V); a parse that stops for
 * help says what to print; --pidfile points into argv; a failed parse says
 * why (some messages have QEMU's hint lines: a size's "Optional suffix k,
 * M, G...").
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "chardev/chardev.h"
#include "cli/cli.h"
#include "qmp/schema.h"
#include "util/cleanup.h"

#define MAX_ARGS 64

static int checked_object(json_t *opts, error **errp)
{
    if (!json_is_object(opts))
        abort();            /* the schema check hands over objects only */
    return 0;
}

static int check_chardev(json_t *opts, error **errp)
{
    const char *id, *backend;
    CLEANUP_JSON json_t *data = chardev_check_opts(opts, &id, &backend, errp);

    if (data && (!id || !backend))
        abort();
    return data ? 0 : -1;
}

static const struct cli_ops check_only = {
    .blockdev = checked_object,
    .export = checked_object,
    .nbd_server = checked_object,
    .object = checked_object,
    .monitor = checked_object,
    .chardev = check_chardev,
    .metrics = checked_object,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int init;
    char *argv[MAX_ARGS + 2];
    int argc = 0;

    if (!init) {
        schema_init();
        init = 1;
    }
    /* one buffer: the arguments, each NUL-terminated */
    char *buf = malloc(size + 1);
    memcpy(buf, data, size);
    buf[size] = 0;
    argv[argc++] = "bexd";
    for (size_t off = 0; off < size && argc <= MAX_ARGS; off += strlen(buf + off) + 1)
        argv[argc++] = buf + off;
    argv[argc] = NULL;

    bool wants = cli_wants_daemonize(argc, argv);
    struct cli_result res = { 0 };
    error *err = NULL;
    int r = cli_parse(argc, argv, &check_only, &res, &err);

    if (r < 0 && (!err || !err->msg || !err->msg[0]))
        abort();
    if (r >= 0 && err)
        abort();
    if (r == 0 && wants != res.daemonize) {
        fprintf(stderr, "--daemonize: pre-pass %d, real pass %d\n", wants, res.daemonize);
        abort();
    }
    bool object_help = res.print == CLI_PRINT_OBJECT_TYPES || res.print == CLI_PRINT_OBJECT_PROPS;
    if (r > 0 && ((wants && !object_help) || res.print == CLI_PRINT_NONE ||
                  (res.print == CLI_PRINT_OBJECT_PROPS) != !!res.print_type)) {
        fprintf(stderr, "help: pre-pass daemonizes %d, print %d\n", wants, res.print);
        abort();
    }
    if (res.pidfile) {
        bool in_argv = false;
        for (int i = 1; i < argc; i++)
            if (res.pidfile >= argv[i] && res.pidfile <= argv[i] + strlen(argv[i]))
                in_argv = true;
        if (!in_argv)
            abort();
    }
    error_free(err);
    free(buf);
    return 0;
}
