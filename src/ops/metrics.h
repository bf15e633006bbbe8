/* Prometheus /metrics endpoint (metrics.c); --metrics addr.type=...  */
#pragma once
#include <jansson.h>
#include "util/error.h"

/* opts: checked __org.bexd_MetricsOptions ({"addr": flat SocketAddress}). */
int  metrics_start(json_t *opts, error **errp);
void metrics_stop(void);
