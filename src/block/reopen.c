/*
 * blockdev-reopen: change the options of live nodes, as QEMU 7.2's
 * bdrv_reopen_multiple() does, all of the list or nothing.
 *
 * Theory of operation.  The list becomes a queue of entries, one per node
 * (a node named twice gets the options of both, the later winning), each
 * followed by the children its parent opened from inline definitions
 * (QEMU's inherits_from): a child given again inline gets those options, a
 * child named by its current node name keeps its own, and both inherit
 * read-only and cache modes from the parent when the parent gives them and
 * they do not.  Nodes referenced by name at blockdev-add are never reopened
 * through their parents.
 *
 * Every entry is then prepared in queue order, nothing changing yet:
 * generic options (read-only, discard, detect-zeroes, cache modes), the
 * options left out that may not go back to their default, the driver's own
 * check (which opens what it needs), a changed "file" child, and last every
 * remaining option, which must be what it was ("Cannot change the option
 * 'X'").  Then the permissions: a node going read-only must have no user
 * holding write.  Only when all of this holds is every entry committed, in
 * queue order (a format node flushes before its file turns read-only), then
 * the drivers' post-commit step runs (a format node writes its header once
 * its file is writable).  Any error aborts every prepared entry.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "qmp/qmp.h"
#include "util/cleanup.h"
#include "util/keyval.h"
#include "util/log.h"
#include "util/opts.h"
#include "util/xalloc.h"

struct entry {
    struct reopen_state rs;
    json_t *explicit;           /* the options given for the node (stored on commit) */
    const char *role;           /* a child queued with its parent: "file", "backing" */
    bool keep_old;
    bool prepared;              /* the driver's prepare succeeded */
    bool file_change;
    struct bnode_user *new_file_link;
    bool backing_change;
    struct bnode *new_backing;
    struct bnode_user *new_backing_link;
    struct entry *next;
};

/* ---- options ---- */

static bool key_in(const char *key, const char *const *list)
{
    for (; list && *list; list++) {
        size_t n = strlen(*list);
        if (!strncmp(key, *list, n) && (key[n] == 0 || key[n] == '.'))
            return true;
    }
    return false;
}

/* Keys a node's options hold for its children: handled apart. */
static bool child_key(const char *key)
{
    static const char *const roles[] = { "file", "backing", "data-file", NULL };
    return key_in(key, roles);
}

/* bexd's own keys (x-bexd-...), never given over QMP */
static bool internal_key(const char *key)
{
    return !strncmp(key, "x-bexd-", 7);
}

/* The options the node was given, as QEMU keeps them in explicit_options:
 * without what it inherited from its parent. */
static json_t *old_explicit(struct bnode *bs)
{
    json_t *o = json_deep_copy(bs->options);
    if (bs->ro_inherited)
        json_object_del(o, "read-only");
    json_t *cache = json_object_get(o, "cache");
    if (bs->cache_inherited & INHERITED_DIRECT)
        json_object_del(cache, "direct");
    if (bs->cache_inherited & INHERITED_NO_FLUSH)
        json_object_del(cache, "no-flush");
    if (json_is_object(cache) && !json_object_size(cache))
        json_object_del(o, "cache");
    if (bs->discard_inherited)
        json_object_del(o, "discard");
    return o;
}

/* ---- the queue ---- */

static struct entry *find_entry(struct entry *q, struct bnode *bs)
{
    for (; q; q = q->next)
        if (q->rs.bs == bs)
            return q;
    return NULL;
}

static void entry_free(struct entry *e)
{
    json_decref(e->explicit);
    json_decref(e->rs.opts);
    free(e);
}

static bool parent_gives(json_t *popts, const char *key, bool *val)
{
    json_t *v = json_object_get(popts, key);
    if (!json_is_boolean(v))
        return false;
    *val = json_is_true(v);
    return true;
}

/* The generic values of an entry from its final options, with QEMU's
 * inheritance (bdrv_inherited_options, bdrv_backing_options). */
static void entry_values(struct entry *e, json_t *popts)
{
    struct bnode *bs = e->rs.bs;
    json_t *o = e->rs.opts;
    bool cow = e->role && !strcmp(e->role, "backing");
    bool v;
    json_t *pcache = json_object_get(popts, "cache"), *cache = json_object_get(o, "cache");

    if (parent_gives(o, "read-only", &v)) {
        e->rs.read_only = v;
    } else if (cow) {
        e->rs.read_only = true;
        json_object_set_new(o, "read-only", json_true());   /* its children inherit it */
    }
    else if (popts && parent_gives(popts, "read-only", &v))
        e->rs.read_only = v;
    else
        e->rs.read_only = e->keep_old ? bs->read_only : false;

    if (parent_gives(cache, "direct", &v) || (popts && parent_gives(pcache, "direct", &v)))
        e->rs.cache_direct = v;
    else
        e->rs.cache_direct = e->keep_old ? bs->cache_direct : false;
    if (parent_gives(cache, "no-flush", &v) || (popts && parent_gives(pcache, "no-flush", &v)))
        e->rs.cache_no_flush = v;
    else
        e->rs.cache_no_flush = e->keep_old ? bs->cache_no_flush : false;

    /* discard left out: as it is (QEMU keeps the flag) */
    const char *d = opt_str(o, "discard", NULL);
    e->rs.discard = d ? !strcmp(d, "unmap") : bs->discard;
    const char *dz = opt_str(o, "detect-zeroes", NULL);
    if (dz)
        e->rs.detect_zeroes = !strcmp(dz, "unmap") ? DETECT_ZEROES_UNMAP :
                              !strcmp(dz, "on") ? DETECT_ZEROES_ON : DETECT_ZEROES_OFF;
    else
        e->rs.detect_zeroes = e->keep_old ? bs->detect_zeroes : DETECT_ZEROES_OFF;
}

static void queue_node(struct entry **q, struct bnode *bs, json_t *opts, json_t *popts,
                       const char *role, bool keep_old);

/* The children bs opened from inline definitions go with it. */
static void queue_children(struct entry **q, struct entry *e)
{
    struct bnode *bs = e->rs.bs;
    struct { const char *role; struct bnode *child; } kids[] = {
        { "file", bs->file }, { "backing", bs->backing },
    };
    for (unsigned i = 0; i < ARRAY_SIZE(kids); i++) {
        struct bnode *c = kids[i].child;
        if (!c || c->inherits_from != bs)
            continue;
        json_t *v = json_object_get(e->rs.opts, kids[i].role);
        if (json_is_string(v)) {
            if (strcmp(json_string_value(v), c->node_name))
                continue;               /* replaced: not reopened */
            CLEANUP_JSON json_t *old = old_explicit(c);
            queue_node(q, c, old, e->rs.opts, kids[i].role, true);
        } else if (json_is_object(v)) {
            queue_node(q, c, v, e->rs.opts, kids[i].role, false);
        } else if (!v) {
            CLEANUP_JSON json_t *old = old_explicit(c);
            queue_node(q, c, old, e->rs.opts, kids[i].role, true);
        }
    }
}

static void queue_node(struct entry **q, struct bnode *bs, json_t *opts, json_t *popts,
                       const char *role, bool keep_old)
{
    struct entry *e = find_entry(*q, bs);
    if (e) {
        /* named twice: the later options win, the earlier ones stay */
        json_t *merged = json_deep_copy(opts);
        json_object_update_missing(merged, e->explicit);
        json_decref(e->explicit);
        e->explicit = merged;
    } else {
        e = xzalloc(sizeof(*e));
        e->rs.bs = bs;
        e->explicit = json_deep_copy(opts);
        struct entry **p = q;
        while (*p)
            p = &(*p)->next;
        *p = e;
    }
    e->role = role;
    e->keep_old = keep_old;
    json_decref(e->rs.opts);
    e->rs.opts = json_deep_copy(e->explicit);
    e->rs.backing_missing = !keep_old && !json_object_get(e->rs.opts, "backing");
    entry_values(e, popts);
    queue_children(q, e);
}

/* ---- prepare ---- */

static const char *const common_opts[] = {
    "node-name", "discard", "cache.direct", "cache.no-flush", "read-only",
    "auto-read-only", "detect-zeroes", NULL
};
/* generic options reopen applies: not compared */
static const char *const absorbed_opts[] = {
    "discard", "cache", "read-only", "auto-read-only", "detect-zeroes", NULL
};

bool bnode_is_ancestor_or_self(struct bnode *anc, struct bnode *bs)
{
    if (anc == bs)
        return true;
    for (struct bnode_user *u = bs->users; u; u = u->next)
        if (u->parent && bnode_is_ancestor_or_self(anc, u->parent))
            return true;
    return false;
}

/* The link a parent holds to a new child: what the old link held. */
static struct bnode_user *link_new_child(struct bnode *bs, struct bnode *child,
                                         const char *role, struct bnode_user *old,
                                         error **errp)
{
    CLEANUP_FREE char *me = xasprintf("node '%s'", bs->node_name);
    struct bnode_user *u = bnode_attach(child, 0, PERM_ALL, me, role, errp);
    if (!u)
        return NULL;
    u->parent = bs;
    if (old && bnode_user_set_perm(u, old->perm, old->shared, errp) < 0) {
        bnode_detach(u);
        return NULL;
    }
    return u;
}

/* "backing" given by node name or null (QEMU's
 * bdrv_reopen_parse_file_or_backing for the backing child). */
static int parse_backing(struct entry *e, error **errp)
{
    struct bnode *bs = e->rs.bs;
    json_t *v = json_object_get(e->rs.opts, "backing");
    if (!bs->drv->reopen_backing_link || !(json_is_string(v) || json_is_null(v)))
        return 0;
    struct bnode *nb = NULL;
    if (json_is_string(v)) {
        const char *name = json_string_value(v);
        nb = bnode_find(name);
        if (!nb) {
            error_setg(errp, "Cannot find device='' nor node-name='%s'", name);
            return -1;
        }
    }
    json_object_del(e->rs.opts, "backing");
    if (nb == bs->backing)
        return 0;
    if (nb && bnode_is_ancestor_or_self(nb, bs)) {
        error_setg(errp, "Making '%s' a backing child of '%s' would create a cycle",
                   nb->node_name, bs->node_name);
        return -1;
    }
    if (nb) {
        e->new_backing_link = link_new_child(bs, nb, "backing",
                                             *bs->drv->reopen_backing_link(bs), errp);
        if (!e->new_backing_link)
            return -1;
    }
    e->backing_change = true;
    e->new_backing = nb;
    return 0;
}

/* A "file" given by node name: the current child, or a new one. */
static int parse_file(struct entry *e, error **errp)
{
    struct bnode *bs = e->rs.bs;
    json_t *v = json_object_get(e->rs.opts, "file");
    e->rs.new_file = bs->file;
    if (!json_is_string(v))
        return 0;
    const char *name = json_string_value(v);
    struct bnode *nf = bnode_find(name);
    if (!nf) {
        error_setg(errp, "Cannot find device='' nor node-name='%s'", name);
        return -1;
    }
    json_object_del(e->rs.opts, "file");
    if (nf == bs->file)
        return 0;
    if (!bs->file) {
        error_setg(errp, "Cannot set file child to format node without file child");
        return -1;
    }
    if (bnode_is_ancestor_or_self(nf, bs)) {
        error_setg(errp, "Making '%s' a file child of '%s' would create a cycle",
                   nf->node_name, bs->node_name);
        return -1;
    }
    /* The new child gets what the old one holds, checked against its users. */
    struct bnode_user *u = link_new_child(bs, nf, "file", bs->file_link, errp);
    if (!u)
        return -1;
    e->file_change = true;
    e->new_file_link = u;
    e->rs.new_file = nf;
    return 0;
}

static int prepare(struct entry *e, error **errp)
{
    struct bnode *bs = e->rs.bs;
    const struct bdrv *drv = bs->drv;

    if (e->rs.detect_zeroes == DETECT_ZEROES_UNMAP && !e->rs.discard) {
        error_setg(errp, "setting detect-zeroes to unmap is not allowed "
                         "without setting discard operation to unmap");
        return -1;
    }
    if (!drv->reopen_prepare) {
        error_setg(errp, "Block format '%s' used by node '%s' does not support reopening "
                   "files", drv->name, bs->node_name);
        return -1;
    }
    /* Options given before and left out now go back to their default:
     * only those the driver allows. */
    CLEANUP_JSON json_t *old = old_explicit(bs);
    CLEANUP_JSON json_t *oldf = keyval_flatten(old);
    CLEANUP_JSON json_t *newf = keyval_flatten(e->rs.opts);
    const char *k;
    json_t *v;
    json_object_foreach(oldf, k, v) {
        if (child_key(k) || internal_key(k) || json_object_get(newf, k) ||
            key_in(k, common_opts) || key_in(k, drv->reopen_resettable))
            continue;
        error_setg(errp, "Option '%s' cannot be reset to its default value", k);
        return -1;
    }
    if (drv->reopen_prepare(&e->rs, errp) < 0)
        return -1;
    e->prepared = true;
    if (parse_backing(e, errp) < 0 || parse_file(e, errp) < 0)
        return -1;
    /* Whatever is left must not change (checked in QEMU's walk of its
     * QDict, so that the first change named is QEMU's). */
    CLEANUP_JSON json_t *cur = keyval_flatten(bs->options);
    CLEANUP_JSON json_t *flat = keyval_flatten(e->rs.opts);
    CLEANUP_JSON json_t *rest = qdict_ordered(flat);
    json_object_foreach(rest, k, v) {
        if (key_in(k, absorbed_opts) || key_in(k, drv->reopen_keys))
            continue;
        if (json_is_object(json_object_get(e->rs.opts, "file")) && key_in(k, (const char *[]){ "file", NULL }) &&
            bs->file && bs->file->inherits_from == bs)
            continue;               /* given to the inline child */
        if (json_is_object(json_object_get(e->rs.opts, "backing")) && key_in(k, (const char *[]){ "backing", NULL }) &&
            bs->backing && bs->backing->inherits_from == bs)
            continue;
        if (!strcmp(k, "backing") || !strcmp(k, "data-file"))
            continue;               /* the driver's */
        json_t *was = json_object_get(cur, k);
        if (!was || !json_equal(was, v)) {
            error_setg(errp, "Cannot change the option '%s'", k);
            return -1;
        }
    }
    return 0;
}

/* A node going read-only may not keep users that write; a format node that
 * writes its metadata needs a writable file. */
static bool new_read_only(struct entry *q, struct bnode *bs)
{
    struct entry *e = find_entry(q, bs);
    return e ? e->rs.read_only : bs->read_only;
}

/* Will this user still write the node after the reopen?  A parent's link
 * writes for the parent's own users, and for a metadata-writing parent
 * that stays (or turns) read-write. */
static bool link_needs_write(struct entry *q, struct bnode_user *u)
{
    if (!(u->perm & (PERM_WRITE | PERM_WRITE_UNCHANGED)) && !u->parent)
        return false;
    if (!u->parent)
        return true;
    struct bnode *p = u->parent;
    if (!find_entry(q, p))
        return u->perm & (PERM_WRITE | PERM_WRITE_UNCHANGED);
    for (struct bnode_user *pu = p->users; pu; pu = pu->next)
        if (pu->perm & (PERM_WRITE | PERM_WRITE_UNCHANGED))
            return true;
    return p->drv->reopen_needs_rw_file && !new_read_only(q, p) &&
           !strcmp(u->role, "file");
}

static int check_perms(struct entry *q, error **errp)
{
    for (struct entry *e = q; e; e = e->next) {
        struct bnode *bs = e->rs.bs;
        if (!e->rs.read_only)
            continue;
        for (struct bnode_user *u = bs->users; u; u = u->next) {
            if (link_needs_write(q, u)) {
                if (bs->read_only)
                    error_setg(errp, "Block node is read-only");
                else
                    error_setg(errp, "Read-only block node '%s' cannot support read-write "
                               "users", bs->node_name);
                return -1;
            }
        }
    }
    for (struct entry *e = q; e; e = e->next) {
        struct bnode *f = e->rs.new_file;
        if (f && !e->rs.read_only && e->rs.bs->drv->reopen_needs_rw_file &&
            new_read_only(q, f)) {
            error_setg(errp, "Block node is read-only");
            return -1;
        }
    }
    return 0;
}

/* ---- commit / abort ---- */

static void commit(struct entry *e)
{
    struct bnode *bs = e->rs.bs;
    uint64_t old_size = bs->size;
    if (bs->drv->reopen_commit)
        bs->drv->reopen_commit(&e->rs);
    __atomic_store_n(&bs->read_only, e->rs.read_only, __ATOMIC_RELEASE);
    __atomic_store_n(&bs->discard, e->rs.discard, __ATOMIC_RELAXED);
    __atomic_store_n(&bs->detect_zeroes, e->rs.detect_zeroes, __ATOMIC_RELAXED);
    __atomic_store_n(&bs->cache_no_flush, e->rs.cache_no_flush, __ATOMIC_RELAXED);
    bs->cache_direct = e->rs.cache_direct;
    if (e->file_change) {
        struct bnode_user *old = bs->file_link;
        e->new_file_link->resized = old->resized;
        e->new_file_link->opaque = old->opaque;
        old->resized = NULL;
        bs->file_link = e->new_file_link;
        e->new_file_link = NULL;
        __atomic_store_n(&bs->file, e->rs.new_file, __ATOMIC_RELEASE);
        bnode_retire_link(old);
        if (bs->drv->child_resized)
            bs->drv->child_resized(bs);       /* a size that follows the file's */
    }
    if (e->backing_change) {
        struct bnode_user **slot = bs->drv->reopen_backing_link(bs);
        struct bnode_user *old = *slot;
        *slot = e->new_backing_link;
        e->new_backing_link = NULL;
        __atomic_store_n(&bs->backing, e->new_backing, __ATOMIC_RELEASE);
        if (old)
            bnode_retire_link(old);
    }
    if (!e->keep_old) {
        json_t *o = e->explicit;
        e->explicit = NULL;
        /* bexd's own keys stay */
        const char *k;
        json_t *v;
        json_object_foreach(bs->options, k, v)
            if (internal_key(k))
                json_object_set(o, k, v);
        json_decref(bs->options);
        bs->options = o;
        bs->ro_inherited = false;
        bs->cache_inherited = 0;
        bs->discard_inherited = false;
    }
    if (bs->size != old_size)
        bnode_notify_resized(bs);
}

static void abort_entry(struct entry *e)
{
    if (e->prepared && e->rs.bs->drv->reopen_abort)
        e->rs.bs->drv->reopen_abort(&e->rs);
    e->prepared = false;
    if (e->new_file_link) {
        bnode_detach(e->new_file_link);
        e->new_file_link = NULL;
    }
    if (e->new_backing_link) {
        bnode_detach(e->new_backing_link);
        e->new_backing_link = NULL;
    }
}

static int run_queue(struct entry *q, error **errp);

static void queue_free(struct entry *q)
{
    while (q) {
        struct entry *n = q->next;
        entry_free(q);
        q = n;
    }
}

int bnode_reopen_multiple(json_t *list, error **errp)
{
    struct entry *q = NULL;
    int ret = -1;
    size_t i;
    json_t *opts;

    json_array_foreach(list, i, opts) {
        const char *name = opt_str(opts, "node-name", NULL);
        if (!name) {
            error_setg(errp, "node-name not specified");
            goto out;
        }
        struct bnode *bs = bnode_find(name);
        if (!bs) {
            error_setg(errp, "Failed to find node with node-name='%s'", name);
            goto out;
        }
        queue_node(&q, bs, opts, NULL, NULL, false);
    }
    return run_queue(q, errp);

out:
    queue_free(q);
    return ret;
}

/* Prepare every entry, then commit them all or abort them all; frees q. */
static int run_queue(struct entry *q, error **errp)
{
    int ret = -1;
    for (struct entry *e = q; e; e = e->next) {
        if (prepare(e, errp) < 0)
            goto abort;
    }
    if (check_perms(q, errp) < 0)
        goto abort;
    for (struct entry *e = q; e; e = e->next)
        e->rs.was_read_only = e->rs.bs->read_only;
    for (struct entry *e = q; e; e = e->next)
        commit(e);
    /* what the nodes ask of their children follows their new read-only */
    for (struct entry *e = q; e; e = e->next) {
        error *err = NULL;
        if (bnode_refresh_perms(e->rs.bs, &err) < 0) {
            log_error("blockdev-reopen: node '%s': %s", e->rs.bs->node_name, err->msg);
            error_free(err);
        }
    }
    for (struct entry *e = q; e; e = e->next)
        if (e->rs.bs->drv->reopen_commit_post)
            e->rs.bs->drv->reopen_commit_post(&e->rs);
    ret = 0;
    goto out;

abort:
    for (struct entry *e = q; e; e = e->next)
        abort_entry(e);
out:
    queue_free(q);
    return ret;
}

int bnode_reopen_set_read_only(struct bnode *bs, bool read_only, error **errp)
{
    CLEANUP_JSON json_t *o = old_explicit(bs);
    json_object_set_new(o, "read-only", json_boolean(read_only));
    /* the backing node it has now (a job may have changed it) */
    if (bs->backing)
        json_object_set_new(o, "backing", json_string(bs->backing->node_name));
    else if (json_object_get(o, "backing"))
        json_object_set_new(o, "backing", json_null());
    struct entry *q = NULL;
    queue_node(&q, bs, o, NULL, NULL, false);    /* by the node: its name may be generated */
    return run_queue(q, errp);
}

static json_t *qmp_blockdev_reopen(json_t *args, error **errp)
{
    return bnode_reopen_multiple(json_object_get(args, "options"), errp) < 0 ? NULL
                                                                         : json_object();
}
QMP_COMMAND("blockdev-reopen", qmp_blockdev_reopen)
