/*
 * bexd's downstream QMP extensions for operators (vendor prefix
 * "__org.bexd_", QAPI's rule for downstream names):
 *   __org.bexd_query-export-clients  each export with its clients and counters
 *   __org.bexd_reload-tls-creds      reread certificate files (as SIGHUP does)
 *   __org.bexd_x-query-memory        what the heap holds (mallinfo2, arenas) and
 *                                    the NBD buffers, to tell a leak from what
 *                                    the allocator keeps (tests/soak/soak.py)
 */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "export/nbd/nbd.h"
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

/* The number of arenas glibc made: one "<heap nr=" per arena in malloc_info. */
static int count_arenas(void)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    int n = 0;

    if (!f)
        return -1;
    if (malloc_info(0, f) != 0)
        n = -1;
    fclose(f);
    for (const char *p = buf; n >= 0 && p && (p = strstr(p, "<heap nr=")); p++)
        n++;
    free(buf);
    return n;
}

static json_t *qmp_x_query_memory(json_t *args, error **errp)
{
    struct mallinfo2 m = mallinfo2();
#if defined(__SANITIZE_ADDRESS__)
    const char *allocator = "sanitizer";    /* glibc's figures do not count ASan's heap */
#else
    const char *allocator = "glibc";
#endif

    uint64_t bused, bpeak, blimit;

    bnode_bounce_stats(&bused, &bpeak, &blimit);
    return json_pack("{s:s, s:I, s:I, s:I, s:I, s:I, s:i, s:I, s:I, s:I, s:I}",
                     "allocator", allocator,
                     "heap-in-use", (json_int_t)(m.uordblks + m.hblkhd),
                     "heap-free", (json_int_t)m.fordblks,
                     "heap-arena-bytes", (json_int_t)m.arena,
                     "heap-mmapped-bytes", (json_int_t)m.hblkhd,
                     "heap-top-releasable", (json_int_t)m.keepcost,
                     "arenas", count_arenas(),
                     "nbd-buffer-bytes", (json_int_t)nbd_budget_used(),
                     "bounce-bytes", (json_int_t)bused,
                     "bounce-bytes-peak", (json_int_t)bpeak,
                     "bounce-budget", (json_int_t)blimit);
}
QMP_COMMAND("__org.bexd_x-query-memory", qmp_x_query_memory)
