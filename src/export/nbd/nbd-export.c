/*
 * The "nbd" export type (block-export-add type=nbd, --export type=nbd,
 * deprecated nbd-server-add / nbd-server-remove).
 *
 * Theory of operation.  The registry (export/export.h) resolves the node
 * and the loop and calls create(); an NBD export adds a name, an optional
 * description and the allocation-depth context, and is visible to new
 * clients by name.  Removal: shutdown() hides it at once (a new export may
 * take the name); hard closes every attached connection, soft makes further
 * requests fail with ESHUTDOWN, hide just waits.  The export is finished
 * (export_shutdown_done, from the main loop) when its last connection has
 * been finalized, so no connection ever sees a freed export.
 */
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "export/nbd/nbd.h"
#include "nbd-internal.h"
#include "util/xalloc.h"
#include "util/opts.h"

static struct nbd_export *nbd_exports;   /* creation order (main thread) */

struct nbd_export *nbd_export_first(void)
{
    return nbd_exports;
}

struct nbd_export *nbd_export_lookup(const char *name)
{
    for (struct nbd_export *e = nbd_exports; e; e = e->next)
        if (!e->hidden && strcmp(e->name, name) == 0)
            return e;
    return NULL;
}

static uint16_t nbd_export_flags(struct nbd_export *exp)
{
    /* as QEMU 7.2: flush/FUA/cache always, multi-conn since every
     * connection shares the one node (a flush covers them all), unless
     * max-connections=1 makes a second connection impossible */
    uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
                 NBD_FLAG_SEND_CACHE;
    if (nbd_srv.max_connections != 1)
        f |= NBD_FLAG_CAN_MULTI_CONN;
    if (exp->common.writable)
        f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    else
        f |= NBD_FLAG_READ_ONLY;
    return f;
}

/* A bitmap named on the export: on its node or any node below (backing
 * files first, then format nodes' files). */
static struct dirty_bitmap *bitmap_below(struct bnode *bs, const char *name)
{
    struct dirty_bitmap *bm = NULL;
    if (!bs)
        return NULL;
    if ((bm = dirty_bitmap_find(bs, name)))
        return bm;
    if ((bm = bitmap_below(bs->backing, name)))
        return bm;
    return bitmap_below(bs->file, name);
}

static void nbd_exp_bitmaps_release(struct nbd_export *exp)
{
    for (int i = 0; i < exp->nbitmaps; i++) {
        dirty_bitmap_set_busy(exp->bitmaps[i], false);
        bnode_unref(exp->bitmaps[i]->bs);
        free(exp->bitmap_ctx[i]);
    }
    exp->nbitmaps = 0;
}

/* The `bitmaps` option: each is looked up and checked as QEMU does, then
 * all are published and made busy together (nothing changes on failure). */
static int nbd_exp_bitmaps(struct nbd_export *exp, json_t *list, error **errp)
{
    struct dirty_bitmap *found[NBD_MAX_EXPORT_BITMAPS];
    struct bnode *node = exp->common.node;
    size_t i;
    json_t *b;
    int n = 0;

    if (json_array_size(list) > NBD_MAX_EXPORT_BITMAPS) {
        error_setg(errp, "An NBD export can publish at most %d dirty bitmaps",
                   NBD_MAX_EXPORT_BITMAPS);
        return -1;
    }
    json_array_foreach(list, i, b) {
        struct dirty_bitmap *bm;
        struct bnode *where = node;
        if (json_is_string(b)) {
            bm = bitmap_below(node, json_string_value(b));
            if (!bm) {
                error_setg(errp, "Bitmap '%s' is not found", json_string_value(b));
                return -1;
            }
            where = bm->bs;
        } else {
            bm = dirty_bitmap_lookup(opt_str(b, "node", ""), opt_str(b, "name", ""), NULL, errp);
            if (!bm)
                return -1;
        }
        if (dirty_bitmap_check(bm, DBM_CHECK_ALLOW_RO, errp) < 0)
            return -1;
        if (!exp->common.writable && !where->read_only && !bm->disabled) {
            error_setg(errp, "Enabled bitmap '%s' incompatible with readonly export", bm->name);
            return -1;
        }
        found[n++] = bm;
    }
    for (int k = 0; k < n; k++) {
        exp->bitmap_ctx[k] = xasprintf("qemu:dirty-bitmap:%s", found[k]->name);
        exp->bitmaps[k] = found[k];
        dirty_bitmap_set_busy(found[k], true);
        bnode_ref(found[k]->bs);          /* its node stays while published */
        exp->nbitmaps = k + 1;
    }
    return 0;
}

static int nbd_exp_create(struct export *e, json_t *opts, error **errp)
{
    struct nbd_export *exp = (struct nbd_export *)e;
    const char *name = opt_str(opts, "name", opt_str(opts, "node-name", e->node->node_name));
    const char *desc = opt_str(opts, "description", NULL);
    json_t *bitmaps = json_object_get(opts, "bitmaps");
    struct nbd_export **pp;
    uint32_t align;

    if (!nbd_srv.running) {
        error_setg(errp, "NBD server not running");
        return -1;
    }
    if (strlen(name) > NBD_MAX_STRING_SIZE) {
        error_setg(errp, "export name '%s' too long", name);
        return -1;
    }
    if (desc && strlen(desc) > NBD_MAX_STRING_SIZE) {
        error_setg(errp, "description '%s' too long", desc);
        return -1;
    }
    if (nbd_export_lookup(name)) {
        error_setg(errp, "NBD server already has export named '%s'", name);
        return -1;
    }
    /* The size is fixed while clients may rely on it: share no RESIZE. */
    if (bnode_user_set_perm(e->user, e->user->perm, e->user->shared & ~PERM_RESIZE, errp) < 0)
        return -1;
    if (nbd_exp_bitmaps(exp, bitmaps, errp) < 0)
        return -1;
    exp->name = xstrdup(name);
    exp->description = xstrdup_opt(desc);
    exp->alloc_depth = opt_bool(opts, "allocation-depth", false);
    align = e->node->request_alignment ? e->node->request_alignment : 1;
    exp->min_block = align;
    exp->max_block = NBD_MAX_BUFFER_SIZE;
    if (e->node->max_transfer && e->node->max_transfer < exp->max_block)
        exp->max_block = e->node->max_transfer;
    exp->max_block -= exp->max_block % align;
    exp->eflags = nbd_export_flags(exp);
    for (pp = &nbd_exports; *pp; pp = &(*pp)->next)
        ;
    *pp = exp;
    return 0;
}

static bool nbd_exp_in_use(struct export *e)
{
    return ((struct nbd_export *)e)->nclients > 0;
}

static void nbd_exp_done_cb(void *opaque)
{
    export_shutdown_done(opaque);
}

static void nbd_exp_maybe_done(struct nbd_export *exp)
{
    if (exp->hidden && exp->nclients == 0 && !exp->done_posted) {
        exp->done_posted = true;
        /* not from inside the registry's del(): it may still use exp */
        loop_call(loop_main(), nbd_exp_done_cb, &exp->common);
    }
}

static void nbd_exp_shutdown(struct export *e, enum export_remove_mode mode)
{
    struct nbd_export *exp = (struct nbd_export *)e;

    exp->hidden = true;
    if (mode == EXPORT_DEL_SOFT)
        __atomic_store_n(&exp->soft, 1, __ATOMIC_RELEASE);
    if (mode == EXPORT_DEL_HARD)
        nbd_conns_close(exp, "export removed");
    if (exp->nclients == 0 && !exp->done_posted) {
        /* Nobody attached: finish now, so BLOCK_EXPORT_DELETED comes before
         * the command's reply, as in QEMU (the registry no longer uses exp). */
        exp->done_posted = true;
        export_shutdown_done(e);
        return;
    }
    nbd_exp_maybe_done(exp);
}

void nbd_export_client_gone(struct nbd_export *exp)
{
    exp->nclients--;
    nbd_exp_maybe_done(exp);
}

static void nbd_exp_free(struct export *e)
{
    struct nbd_export *exp = (struct nbd_export *)e;

    for (struct nbd_export **pp = &nbd_exports; *pp; pp = &(*pp)->next) {
        if (*pp == exp) {
            *pp = exp->next;
            break;
        }
    }
    nbd_exp_bitmaps_release(exp);
    free(exp->name);
    free(exp->description);
    free(exp->loop_users);
    exp->loop_users = NULL;
    exp->name = exp->description = NULL;
}

/* nbd-server-stop: every NBD export goes, hard, like QEMU (the registry
 * escalates exports already leaving in hide or soft mode). */
void nbd_exports_close_all(void)
{
    struct nbd_export *e, *next;

    for (e = nbd_exports; e; e = next) {
        next = e->next;   /* only e itself may be freed by its removal */
        if (!(e->common.shutting_down && e->common.del_mode == EXPORT_DEL_HARD))
            block_export_del(e->common.id, EXPORT_DEL_HARD, NULL);
    }
    /* connections still negotiating have no export to follow */
    nbd_conns_close(NULL, "server stopped");
}

/* ---- operations: clients and their counters ---- */

static json_t *nbd_exp_query_clients(struct export *e)
{
    json_t *list = json_array();

    for (struct nbd_conn *c = nbd_srv.conns; c; c = c->next) {
        struct client_stats v;
        if (c->exp != (struct nbd_export *)e || c->state == CONN_CLOSED)
            continue;
        client_stats_read(&c->st, &v);
        json_t *o = client_stats_json(&v);
        json_object_set_new(o, "transport", json_string(c->transport));
        json_object_set_new(o, "peer", json_string(c->peer));
        json_object_set_new(o, "tls", json_boolean(c->tls));
        if (c->tls_identity)
            json_object_set_new(o, "tls-identity", json_string(c->tls_identity));
        json_object_set_new(o, "connected-since", json_integer(c->connected_at));
        json_object_set_new(o, "requests-in-flight",
                            json_integer(__atomic_load_n(&c->busy_slots, __ATOMIC_RELAXED)));
        json_array_append_new(list, o);
    }
    return list;
}

/* Everything its clients did, those connected and those gone. */
json_t *nbd_export_totals(struct export *e)
{
    struct nbd_export *exp = (struct nbd_export *)e;
    struct client_stats sum = exp->gone;

    for (struct nbd_conn *c = nbd_srv.conns; c; c = c->next)
        if (c->exp == exp)
            client_stats_add(&sum, &c->st);
    return client_stats_json(&sum);
}

static unsigned nbd_exp_nclients(struct export *e)
{
    return ((struct nbd_export *)e)->nclients;
}

/* New clients go to the export's loop; those attached follow it, each
 * quiesced first (conn.c). */
static bool nbd_export_can_move(struct export *e, error **errp)
{
    return true;
}

static void nbd_export_moved(struct export *e)
{
    for (struct nbd_conn *c = nbd_srv.conns; c; c = c->next)
        if (c->exp == (struct nbd_export *)e)
            nbd_conn_move(c);
}

static const struct export_type nbd_export_type = {
    .name = "nbd",
    .instance_size = sizeof(struct nbd_export),
    .can_move = nbd_export_can_move,
    .moved = nbd_export_moved,
    .multi_iothread = true,
    .create = nbd_exp_create,
    .in_use = nbd_exp_in_use,
    .shutdown = nbd_exp_shutdown,
    .free = nbd_exp_free,
    .query_clients = nbd_exp_query_clients,
    .nclients = nbd_exp_nclients,
    .query_totals = nbd_export_totals,
};
EXPORT_TYPE_REGISTER(nbd_export_type)

/* ---- deprecated QMP commands ---- */

static json_t *qmp_nbd_server_add(json_t *args, error **errp)
{
    const char *device = opt_str(args, "device", "");
    const char *name = opt_str(args, "name", device);
    const char *bitmap = opt_str(args, "bitmap", NULL);
    CLEANUP_JSON json_t *opts = NULL;
    struct bnode *bs;
    bool writable = opt_bool(args, "writable", false);

    bs = bnode_find(device);   /* QEMU looks the name up as both, first */
    if (!bs) {
        error_setg(errp, "Cannot find device='%s' nor node-name='%s'", device, device);
        return NULL;
    }
    /* whether the server runs is block-export-add's question, as in QEMU:
     * after the node's permissions */
    if (bs->read_only)
        writable = false;   /* nbd-server-add downgrades silently, as QEMU */
    opts = json_pack("{s:s, s:s, s:s, s:s, s:b}", "type", "nbd", "id", name,
                     "node-name", device, "name", name, "writable", writable);
    if (!opts) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    if (json_object_get(args, "description"))
        json_object_set(opts, "description", json_object_get(args, "description"));
    if (bitmap)
        json_object_set_new(opts, "bitmaps", json_pack("[s]", bitmap));
    if (block_export_add(opts, errp) < 0)
        return NULL;
    return json_object();
}
QMP_COMMAND("nbd-server-add", qmp_nbd_server_add)

static json_t *qmp_nbd_server_remove(json_t *args, error **errp)
{
    const char *name = opt_str(args, "name", "");
    const char *m = opt_str(args, "mode", "safe");
    struct export *e = export_find(name);
    int mode = export_remove_mode_parse(m);

    if (e && strcmp(e->type->name, "nbd") != 0) {
        error_setg(errp, "Block export '%s' is not an NBD export", name);
        return NULL;
    }
    if (mode < 0)
        mode = EXPORT_DEL_SAFE;
    if (block_export_del(name, mode, errp) < 0)
        return NULL;
    return json_object();
}
QMP_COMMAND("nbd-server-remove", qmp_nbd_server_remove)
