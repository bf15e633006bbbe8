/* Operations helpers shared by the QMP extensions and /metrics. */
#pragma once
#include <jansson.h>

struct export;

/* An __org.bexd_ExportClients object for one export. */
json_t *ops_export_clients(struct export *e);
