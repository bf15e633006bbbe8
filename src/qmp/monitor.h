/*
 * Character devices (only what monitors need: socket server on UNIX or TCP,
 * stdio) and QMP monitors on them.  --chardev / --monitor on the command
 * line; several monitors may run at once.
 */
#pragma once
#include <jansson.h>
#include "util/error.h"

/* opts: checked ChardevOptions-like object from --chardev keyval
 * ("socket,id=x,path=..,server=on,wait=off" / host+port / "stdio,id=x"). */
int chardev_add(json_t *opts, error **errp);
/* opts: checked MonitorOptions: {"chardev": id, "mode": "control", "pretty": bool}. */
int monitor_add(json_t *opts, error **errp);
/* Flush pending output and close every monitor (shutdown). */
void monitors_close_all(void);
