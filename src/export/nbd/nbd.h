/* NBD server: the shared operation behind nbd-server-start and --nbd-server. */
#pragma once
#include <stdbool.h>
#include <jansson.h>
#include "util/error.h"

/* opts: checked NbdServerOptions (flat SocketAddress in "addr"). */
int  nbd_server_start(json_t *opts, error **errp);
void nbd_server_stop(void);
bool nbd_server_running(void);
