/*
 * Export registry and lifecycle (see export.h).
 *
 * Theory of operation: an export is created in one step (common checks,
 * node and iothread resolution, permission, then the type's create) and
 * removed in two: block_export_del() marks it shutting down and asks the
 * type to stop; the type calls export_shutdown_done() once no client or
 * request refers to it any more.  Only then is the node released, the id
 * freed for reuse and BLOCK_EXPORT_DELETED emitted.
 */
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "block/throttle-group.h"
#include "export/export.h"
#include "object/iothread.h"
#include "qmp/qmp.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/xalloc.h"
#include "util/opts.h"
#include "util/id.h"

static const struct export_type *types[8];
static int n_types;
static struct export *exports;
static void (*all_done_cb)(void *);
static void *all_done_opaque;

void export_type_register(const struct export_type *t)
{
    if (n_types < (int)(sizeof(types) / sizeof(types[0])))
        types[n_types++] = t;
}

static const struct export_type *type_find(const char *name)
{
    for (int i = 0; i < n_types; i++)
        if (!strcmp(types[i]->name, name))
            return types[i];
    return NULL;
}

struct export *export_find(const char *id)
{
    for (struct export *e = exports; e; e = e->next)
        if (!strcmp(e->id, id))
            return e;
    return NULL;
}

struct export *export_first(void) { return exports; }

int export_remove_mode_parse(const char *s)
{
    static const char *const names[] = { "safe", "hard", "hide", "soft" };
    for (int i = 0; i < 4; i++)
        if (!strcmp(s, names[i]))
            return i;
    return -1;
}

static void export_node_resized(struct bnode_user *u)
{
    struct export *exp = u->opaque;
    if (!exp->shutting_down && exp->type->node_resized)
        exp->type->node_resized(exp);
}

/* An overlay took the node's place (blockdev-snapshot): serve it from now
 * on.  Main thread, while writes are held. */
static void export_node_replaced(struct bnode_user *u)
{
    struct export *exp = u->opaque;
    __atomic_store_n(&exp->node, u->bs, __ATOMIC_RELEASE);
    if (exp->type->node_replaced)
        exp->type->node_replaced(exp);
}

/* Hold (+1) or drop (-1) the export's iothreads: they cannot be deleted
 * while it runs in them. */
static void export_iothreads_ref(struct export *exp, int d)
{
    unsigned n = exp->n_loops ? exp->n_loops : exp->iothread ? 1 : 0;

    for (unsigned i = 0; i < n; i++) {
        struct iothread *t = exp->n_loops ? exp->iothreads[i] : exp->iothread;
        if (d > 0)
            object_ref(&t->obj);
        else
            object_unref(&t->obj);
    }
}

/* `iothread` as a list (QEMU 10.1's BlockExportIothreads 'multi'): every
 * member must name an iothread; the same one twice counts once. */
static struct iothread **multi_iothreads(const struct export_type *type, json_t *opts,
                                         json_t *list, unsigned *n, error **errp)
{
    size_t len = json_array_size(list);
    struct iothread **v;

    if (!type->multi_iothread) {
        error_setg(errp, "The %s export does not support multi-threading", type->name);
        return NULL;
    }
    if (opt_bool(opts, "fixed-iothread", false)) {
        error_setg(errp, "Cannot use fixed-iothread for a multi-threaded export");
        return NULL;
    }
    if (!len) {
        error_setg(errp, "The set of I/O threads must not be empty");
        return NULL;
    }
    v = xcalloc(len, sizeof(*v));
    *n = 0;
    for (size_t i = 0; i < len; i++) {
        struct iothread *t = iothread_find(json_string_value(json_array_get(list, i)), errp);
        unsigned j;
        if (!t) {
            free(v);
            return NULL;
        }
        for (j = 0; j < *n && v[j] != t; j++)
            ;
        if (j == *n)
            v[(*n)++] = t;
    }
    return v;
}

int block_export_add(json_t *opts, error **errp)
{
    const char *type_name = opt_str(opts, "type", "");
    const char *id = opt_str(opts, "id", "");
    const char *node_name = opt_str(opts, "node-name", "");
    const char *iothread_id = opt_str(opts, "iothread", NULL);
    json_t *iothread_list = json_is_array(json_object_get(opts, "iothread")) ?
                            json_object_get(opts, "iothread") : NULL;
    const struct export_type *type = type_find(type_name);

    if (!type) {
        error_setg(errp, "No driver found for the requested export type");
        return -1;
    }
    if (!id_wellformed(id)) {
        error_setg(errp, "Invalid block export id");
        return -1;
    }
    if (export_find(id)) {
        error_setg(errp, "Block export id '%s' is already in use", id);
        return -1;
    }
    struct bnode *bs = bnode_lookup(node_name, errp);
    if (!bs)
        return -1;
    struct iothread *iot = NULL;
    if (iothread_id) {
        iot = iothread_find(iothread_id, errp);
        if (!iot)
            return -1;
    }
    struct iothread **iots = NULL;
    unsigned n_iots = 0;
    if (iothread_list && !(iots = multi_iothreads(type, opts, iothread_list, &n_iots, errp)))
        return -1;
    if (iots)
        iot = iots[0];
    bool writable = opt_bool(opts, "writable", false);
    if (writable && bs->read_only) {
        error_setg(errp, "Cannot export read-only node as writable");
        return -1;
    }
    struct bnode_user *user = bnode_attach(bs, PERM_CONSISTENT_READ |
                                           (writable ? PERM_WRITE : 0), PERM_ALL,
                                           "an unnamed block device", "root", errp);
    if (!user) {
        free(iots);
        return -1;
    }

    struct export *exp = xzalloc(type->instance_size);
    exp->id = xstrdup(id);
    exp->type = type;
    exp->node = bs;
    exp->user = user;
    user->resized = export_node_resized;
    user->replaced = export_node_replaced;
    user->opaque = exp;
    exp->writable = writable;
    exp->writethrough = opt_bool(opts, "writethrough", false);
    exp->fixed_iothread = opt_bool(opts, "fixed-iothread", false);
    exp->iothread = iot;
    exp->loop = iot ? iot->loop : loop_main();
    if (iots) {
        exp->iothreads = iots;
        exp->n_loops = n_iots;
        exp->loops = xcalloc(n_iots, sizeof(*exp->loops));
        for (unsigned i = 0; i < n_iots; i++)
            exp->loops[i] = iots[i]->loop;
    }
    export_iothreads_ref(exp, 1);
    if (type->create(exp, opts, errp) < 0) {
        export_iothreads_ref(exp, -1);
        bnode_detach(user);
        free(exp->iothreads);
        free(exp->loops);
        free(exp->id);
        free(exp);
        return -1;
    }
    /* Newest first: query-block-exports lists them so in QEMU. */
    exp->next = exports;
    exports = exp;
    return 0;
}

/* A hard removal waits for the requests in flight: those a throttle group
 * holds go at once (QEMU drains the export's node). */
static void export_bypass_throttle(struct export *exp)
{
    if (!exp->throttle_bypassed) {
        exp->throttle_bypassed = true;
        throttle_bypass_begin();
    }
}

int block_export_del(const char *id, enum export_remove_mode mode, error **errp)
{
    struct export *exp = export_find(id);
    if (!exp) {
        error_setg(errp, "Export '%s' is not found", id);
        return -1;
    }
    if (exp->shutting_down) {
        /* As QEMU, except that bexd's own hide/soft removals may still be
         * escalated to hard. */
        if (mode != EXPORT_DEL_HARD || exp->del_mode == EXPORT_DEL_HARD ||
            exp->del_mode == EXPORT_DEL_SAFE) {
            error_setg(errp, "Export '%s' is already shutting down", id);
            return -1;
        }
        exp->del_mode = mode;
        export_bypass_throttle(exp);
        exp->type->shutdown(exp, mode);
        return 0;
    }
    if (mode == EXPORT_DEL_SAFE && exp->type->in_use && exp->type->in_use(exp)) {
        error_setg(errp, "export '%s' still in use", id);
        return -1;
    }
    exp->shutting_down = true;
    exp->del_mode = mode;
    if (mode == EXPORT_DEL_HARD)
        export_bypass_throttle(exp);
    exp->type->shutdown(exp, mode);
    return 0;
}

void export_shutdown_done(struct export *exp)
{
    struct export **p = &exports;
    while (*p && *p != exp)
        p = &(*p)->next;
    if (*p)
        *p = exp->next;
    char *id = exp->id;
    if (exp->throttle_bypassed)
        throttle_bypass_end();
    bnode_detach(exp->user);
    export_iothreads_ref(exp, -1);
    if (exp->type->free)
        exp->type->free(exp);
    free(exp->iothreads);
    free(exp->loops);
    free(exp);
    qmp_event("BLOCK_EXPORT_DELETED", json_pack("{s:s}", "id", id));
    free(id);
    if (!exports && all_done_cb) {
        void (*cb)(void *) = all_done_cb;
        all_done_cb = NULL;
        cb(all_done_opaque);
    }
}

void exports_shutdown_all(void (*all_done)(void *), void *opaque)
{
    if (!exports) {
        all_done(opaque);
        return;
    }
    all_done_cb = all_done;
    all_done_opaque = opaque;
    /* shutdown() may finish synchronously and unlink the export: walk a snapshot. */
    int n = 0;
    for (struct export *e = exports; e; e = e->next)
        n++;
    char **ids = xcalloc(n, sizeof(*ids));
    int i = 0;
    for (struct export *e = exports; e; e = e->next)
        ids[i++] = xstrdup(e->id);
    for (i = 0; i < n; i++) {
        struct export *e = export_find(ids[i]);
        if (e && !(e->shutting_down && e->del_mode == EXPORT_DEL_HARD)) {
            e->shutting_down = true;
            e->del_mode = EXPORT_DEL_HARD;
            export_bypass_throttle(e);
            e->type->shutdown(e, EXPORT_DEL_HARD);
        }
        free(ids[i]);
    }
    free(ids);
}

unsigned export_nclients(struct export *exp)
{
    return exp->type->nclients ? exp->type->nclients(exp) : 0;
}

void exports_report_stuck(void)
{
    for (struct export *e = exports; e; e = e->next)
        log_warn("export '%s' (%s, node '%s') not removed yet: %u clients",
                 e->id, e->type->name, e->node->node_name, export_nclients(e));
}

/* The node QEMU names: a job's filter node takes the place of the node it
 * works on under that node's exports in QEMU's graph (not in bexd's). */
json_t *query_block_exports(void)
{
    json_t *list = json_array();
    for (struct export *e = exports; e; e = e->next) {
        struct bnode *f = bnode_job_filter_above(e->node);
        json_array_append_new(list, json_pack("{s:s, s:s, s:s, s:b}",
                                              "id", e->id, "type", e->type->name,
                                              "node-name", (f ? f : e->node)->node_name,
                                              "shutting-down", e->shutting_down));
    }
    return list;
}

/* ---- QMP ---- */

static json_t *qmp_block_export_add(json_t *args, error **errp)
{
    return block_export_add(args, errp) < 0 ? NULL : json_object();
}
QMP_COMMAND("block-export-add", qmp_block_export_add)

static json_t *qmp_block_export_del(json_t *args, error **errp)
{
    int mode = export_remove_mode_parse(opt_str(args, "mode", "safe"));
    if (block_export_del(opt_str(args, "id", ""), mode, errp) < 0)
        return NULL;
    return json_object();
}
QMP_COMMAND("block-export-del", qmp_block_export_del)

static json_t *qmp_query_block_exports(json_t *args, error **errp)
{
    return query_block_exports();
}
QMP_COMMAND("query-block-exports", qmp_query_block_exports)
