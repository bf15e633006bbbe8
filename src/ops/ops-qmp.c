/*
 * bexd's downstream QMP extensions for operators (vendor prefix
 * "__org.bexd_", QAPI's rule for downstream names):
 *   __org.bexd_query-export-clients  each export with its clients and counters
 *   __org.bexd_reload-tls-creds      reread certificate files (as SIGHUP does)
 */
#include <string.h>
#include "block/block.h"
#include "export/export.h"
#include "object/object.h"
#include "ops/ops.h"
#include "qmp/qmp.h"
#include "util/opts.h"

json_t *ops_export_clients(struct export *e)
{
    json_t *o = json_pack("{s:s, s:s, s:s, s:b}", "id", e->id, "type", e->type->name,
                          "node-name", e->node->node_name, "shutting-down", e->shutting_down);
    json_object_set_new(o, "clients",
                        e->type->query_clients ? e->type->query_clients(e) : json_array());
    if (e->type->query_totals)
        json_object_set_new(o, "totals", e->type->query_totals(e));
    return o;
}

static json_t *qmp_query_export_clients(json_t *args, error **errp)
{
    const char *id = opt_str(args, "id", NULL);
    json_t *list;

    if (id) {
        struct export *e = export_find(id);
        if (!e) {
            error_setg(errp, "Export '%s' is not found", id);
            return NULL;
        }
        return json_pack("[o]", ops_export_clients(e));
    }
    list = json_array();
    for (struct export *e = export_first(); e; e = e->next)
        json_array_append_new(list, ops_export_clients(e));
    return list;
}
QMP_COMMAND("__org.bexd_query-export-clients", qmp_query_export_clients)

static json_t *qmp_reload_tls_creds(json_t *args, error **errp)
{
    const char *id = opt_str(args, "id", NULL);

    if (id) {
        struct object *o = object_find(id);
        if (!o) {
            error_setg(errp, "object '%s' not found", id);
            return NULL;
        }
        if (!o->type->reload) {
            error_setg(errp, "object '%s' (%s) has nothing to reload", id, o->type->name);
            return NULL;
        }
    }
    return objects_reload(id, errp) < 0 ? NULL : json_object();
}
QMP_COMMAND("__org.bexd_reload-tls-creds", qmp_reload_tls_creds)
