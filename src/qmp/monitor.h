/*
 * QMP monitors, each on a character device (chardev/chardev.h): --monitor
 * on the command line; several monitors may run at once.
 */
#pragma once
#include <jansson.h>
#include "util/error.h"

/* opts: checked MonitorOptions: {"chardev": id, "mode": "control", "pretty": bool}. */
int monitor_add(json_t *opts, error **errp);
/* Flush pending output and close every monitor's session (shutdown). */
void monitors_close_all(void);
