/*
 * qemu-storage-daemon's command line.  Options are applied in order, each
 * through the same operation QMP uses (blockdev_add, block_export_add,
 * nbd_server_start, object_add, chardev_add, monitor_add).
 */
#pragma once
#include <stdbool.h>
#include <jansson.h>
#include "util/error.h"

enum cli_print {
    CLI_PRINT_NONE,
    CLI_PRINT_HELP,            /* -h, --help */
    CLI_PRINT_VERSION,         /* -V, --version */
    CLI_PRINT_OBJECT_TYPES,    /* --object help */
    CLI_PRINT_OBJECT_PROPS,    /* --object TYPE,help */
};

struct cli_result {
    const char *pidfile;       /* --pidfile, or NULL */
    bool daemonize;            /* --daemonize */
    enum cli_print print;      /* what cli_parse() stopped to print */
    const char *print_type;    /* CLI_PRINT_OBJECT_PROPS: the type */
};

/* What each option does once its argument is parsed and checked against
 * its schema type (the checked object; chardev: the QemuOpts-style flat
 * object).  0 or -1 with errp set. */
struct cli_ops {
    int (*blockdev)(json_t *opts, error **errp);
    int (*export)(json_t *opts, error **errp);
    int (*nbd_server)(json_t *opts, error **errp);
    int (*object)(json_t *opts, error **errp);
    int (*monitor)(json_t *opts, error **errp);
    int (*chardev)(json_t *opts, error **errp);
    int (*metrics)(json_t *opts, error **errp);
};

/* The daemon's: each option is applied (nodes, exports, servers...). */
extern const struct cli_ops cli_ops_apply;

/* Walk argv in order (getopt_long), parse and check each option and hand
 * it to ops.  0: done; -1: a bad argument, errp set to one line with the
 * option as location (the caller prints it and exits 1); 1: help or
 * version was asked: stopped there, res->print says what to print with
 * cli_print() (the caller then exits 0).  Prints nothing and never exits. */
int cli_parse(int argc, char **argv, const struct cli_ops *ops, struct cli_result *res,
              error **errp);
void cli_print(const struct cli_result *res);
/* True if the real pass will see --daemonize (scanned before anything is
 * applied, by the same getopt_long walk; false where that walk meets a
 * getopt error, -h or -V first). */
bool cli_wants_daemonize(int argc, char **argv);
