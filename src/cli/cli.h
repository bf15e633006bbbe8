/*
 * qemu-storage-daemon's command line.  Options are applied in order, each
 * through the same operation QMP uses (blockdev_add, block_export_add,
 * nbd_server_start, object_add, chardev_add, monitor_add).
 */
#pragma once
#include <stdbool.h>
#include "util/error.h"

struct cli_result {
    const char *pidfile;     /* --pidfile, or NULL */
    bool daemonize;          /* --daemonize */
};

/* Handles -h/--help and -V/--version itself (prints, exits 0).  On a bad
 * argument returns -1 with errp set to one line (the caller prints it and
 * exits 1). */
int cli_apply(int argc, char **argv, struct cli_result *res, error **errp);
/* True if --daemonize is present (scanned before anything is applied). */
bool cli_wants_daemonize(int argc, char **argv);
