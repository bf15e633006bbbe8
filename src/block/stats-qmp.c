/*
 * QMP commands of block statistics: query-blockstats and
 * block-latency-histogram-set (QEMU 7.2's, see block/stats.h).
 *
 * qemu-storage-daemon has no BlockBackend with a name, so its
 * query-blockstats lists nothing unless query-nodes is true, and then
 * reports zeros (QEMU counts on BlockBackends, not nodes).  bexd answers
 * in the same shape with the real counts of each node, and has
 * block-latency-histogram-set, which qsd 7.2 lacks; its id is a node name
 * or an export id (that export's node).
 */
#include <stdio.h>
#include <string.h>
#include "block/block.h"
#include "block/stats.h"
#include "export/export.h"
#include "qmp/qmp.h"
#include "util/opts.h"

static json_t *node_blockstats(struct bnode *bs)
{
    json_t *o = json_object();
    struct bstats *st = bs->stats;

    json_object_set_new(o, "node-name", json_string(bs->node_name));
    json_object_set_new(o, "stats", bstats_query(st));
    if (!strcmp(bs->drv->name, "file") || !strcmp(bs->drv->name, "host_device")) {
        struct bstat_op_counters *u = &st->op[BSTAT_UNMAP];
        json_object_set_new(o, "driver-specific",
            json_pack("{s:s, s:I, s:I, s:I}", "driver", bs->drv->name,
                      "discard-nb-ok", (json_int_t)bstats_get(&u->ops),
                      "discard-nb-failed", (json_int_t)bstats_get(&u->failed),
                      "discard-bytes-ok", (json_int_t)bstats_get(&u->bytes)));
    }
    if (bs->file)
        json_object_set_new(o, "parent", node_blockstats(bs->file));
    if (bs->backing)
        json_object_set_new(o, "backing", node_blockstats(bs->backing));
    return o;
}

static json_t *qmp_query_blockstats(json_t *args, error **errp)
{
    json_t *list = json_array();

    if (!opt_bool(args, "query-nodes", false))
        return list;       /* no named BlockBackends, as in qsd */
    /* creation order, as QEMU lists nodes (bexd's list is newest first) */
    for (struct bnode *bs = bnode_first(); bs; bs = bs->next)
        json_array_insert_new(list, 0, node_blockstats(bs));
    return list;
}
QMP_COMMAND("query-blockstats", qmp_query_blockstats)

static int get_bounds(json_t *list, uint64_t *out, error **errp, const char *id,
                      const char *what)
{
    size_t i, n = json_array_size(list);
    uint64_t prev = 0;

    if (n > BSTAT_HIST_MAX_BOUNDS) {
        error_setg(errp, "Device '%s' set %s boundaries fail: at most %d boundaries",
                   id, what, BSTAT_HIST_MAX_BOUNDS);
        return -1;
    }
    for (i = 0; i < n; i++) {
        uint64_t v = (uint64_t)json_integer_value(json_array_get(list, i));
        if (v <= prev) {
            error_setg(errp, "Device '%s' set %s boundaries fail: they must be "
                       "positive and strictly increasing", id, what);
            return -1;
        }
        out[i] = prev = v;
    }
    return (int)n;
}

static json_t *qmp_block_latency_histogram_set(json_t *args, error **errp)
{
    const char *id = opt_str(args, "id", "");
    struct bnode *bs = bnode_find(id);
    static const struct { const char *key, *what; enum bstat_op op; } kinds[] = {
        { "boundaries-read", "read", BSTAT_RD },
        { "boundaries-write", "write", BSTAT_WR },
        { "boundaries-flush", "flush", BSTAT_FLUSH },
    };
    uint64_t bounds[3][BSTAT_HIST_MAX_BOUNDS];
    int n[3];
    json_t *all = json_object_get(args, "boundaries");

    if (!bs) {
        struct export *e = export_find(id);
        bs = e ? e->node : NULL;
    }
    if (!bs) {
        error_set(errp, ERR_DEVICE_NOT_FOUND, "Device '%s' not found", id);
        return NULL;
    }
    /* check everything first: a bad list changes nothing */
    for (int i = 0; i < 3; i++) {
        json_t *l = json_object_get(args, kinds[i].key);
        if (!l)
            l = all;
        n[i] = l ? get_bounds(l, bounds[i], errp, id, kinds[i].what) : -2;
        if (n[i] == -1)
            return NULL;
    }
    for (int i = 0; i < 3; i++)
        bstats_set_histogram(bs->stats, kinds[i].op, n[i] >= 0 ? bounds[i] : NULL,
                             n[i] >= 0 ? n[i] : 0);
    return json_object();
}
QMP_COMMAND("block-latency-histogram-set", qmp_block_latency_histogram_set)
