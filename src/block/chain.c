/*
 * Backing chains for the jobs that shorten them (see chain.h).
 *
 * A job's filter node is what QEMU shows above the node a stream or commit
 * job works on (its copy-on-read or commit_top node): bexd's does not take
 * that node's place under its users, so it passes on what reaches it and
 * holds nothing of its own.  It is not offered to blockdev-add.
 */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include "block/chain.h"
#include "block/qcow2-int.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/xalloc.h"

/* ---- finding nodes ---- */

/* The file name a node names its backing file with, made absolute from
 * the node's own directory and canonical; NULL if it does not exist. */
static char *canonical(struct bnode *bs, const char *name)
{
    CLEANUP_FREE char *abs = NULL;
    if (name[0] == '/' || strstr(name, "://")) {
        abs = xstrdup(name);
    } else {
        const char *dir = bnode_leaf_path(bs);
        const char *slash = dir ? strrchr(dir, '/') : NULL;
        abs = xasprintf("%.*s%s", slash ? (int)(slash - dir + 1) : 0, dir ? dir : "", name);
    }
    return realpath(abs, NULL);
}

struct bnode *chain_find_backing_image(struct bnode *bs, const char *name)
{
    for (; bs && bs->backing; bs = bs->backing) {
        if (!bs->auto_backing_file)
            continue;
        if (strstr(name, "://") || strstr(bs->auto_backing_file, "://")) {
            if (!strcmp(name, bs->auto_backing_file))
                return bs->backing;
            continue;
        }
        CLEANUP_FREE char *want = canonical(bs, name);
        CLEANUP_FREE char *have = canonical(bs, bs->auto_backing_file);
        if (want && have && !strcmp(want, have))
            return bs->backing;
    }
    return NULL;
}

int chain_depth(struct bnode *top, struct bnode *bs)
{
    int d = 1;
    for (struct bnode *b = top; b; b = b->backing, d++)
        if (b == bs)
            return d;
    return 0;
}

struct bnode *chain_lookup_node(const char *name, error **errp)
{
    struct bnode *bs = bnode_find(name);
    if (!bs)
        error_setg(errp, "Cannot find device='' nor node-name='%s'", name);
    return bs;
}

struct bnode *chain_root_node(const char *device, error **errp)
{
    struct bnode *bs = bnode_find(device);
    if (!bs) {
        error_setg(errp, "Cannot find device='%s' nor node-name='%s'", device, device);
        return NULL;
    }
    if (bnode_has_parent_node(bs) || bs->blocker) {
        error_setg(errp, "Need a root block node");
        return NULL;
    }
    return bs;
}

struct bnode *chain_overlay(struct bnode *top, struct bnode *bs)
{
    for (struct bnode *b = top; b; b = b->backing)
        if (b->backing == bs)
            return b;
    return NULL;
}

/* ---- relinking ---- */

int chain_link_backing(struct bnode *bs, struct bnode *base)
{
    if (bs->backing != base) {
        struct bnode_user **slot = bs->drv->reopen_backing_link(bs);
        struct bnode_user *old = *slot, *link = NULL;
        if (base) {
            error *err = NULL;
            link = bnode_attach_child(bs, base, "backing", &err);
            if (link && old && bnode_user_set_perm(link, old->perm, old->shared, &err) < 0) {
                bnode_detach(link);
                link = NULL;
            }
            if (!link) {
                log_error("node '%s': %s", bs->node_name, err->msg);
                error_free(err);
                return -EPERM;
            }
        }
        *slot = link;
        __atomic_store_n(&bs->backing, base, __ATOMIC_RELEASE);
        if (old)
            bnode_retire_link(old);
        if (json_object_get(bs->options, "backing"))      /* a reopen named the old one */
            json_object_set_new(bs->options, "backing",
                                base ? json_string(base->node_name) : json_null());
    }
    return 0;
}

int chain_set_backing(struct bnode *bs, struct bnode *base, const char *backing_file)
{
    int ret = chain_link_backing(bs, base);
    if (ret < 0)
        return ret;
    CLEANUP_FREE char *base_name = base ? bnode_filename(base) : NULL;
    const char *id = base ? (backing_file ? backing_file : base_name) : NULL;
    return qcow2_change_backing_file(bs, id, base ? base->drv->name : NULL);
}

/* ---- the job's filter node ---- */

static int filter_open(struct bnode *bs, json_t *opts, error **errp)
{
    bs->size = bs->file->size;
    return 0;
}

static void filter_submit(struct bnode *bs, struct breq *req, uint64_t offset)
{
    bnode_submit_child(bs->file, req, offset);
}

#define JOB_FILTER(drv_name) {                  \
    .name = drv_name,                           \
    .is_filter = true,                          \
    .job_filter = true,                         \
    .filename_rule = FNAME_FILE_CHILD,          \
    .open = filter_open,                        \
    .submit = filter_submit,                    \
    .block_status = bnode_filter_block_status,        \
}
static const struct bdrv bdrv_copy_on_read = JOB_FILTER("copy-on-read");
static const struct bdrv bdrv_commit_top = JOB_FILTER("commit_top");
static const struct bdrv bdrv_mirror_top = JOB_FILTER("mirror_top");
BDRV_REGISTER(bdrv_copy_on_read)
BDRV_REGISTER(bdrv_commit_top)
BDRV_REGISTER(bdrv_mirror_top)

struct bnode *chain_filter_open(const char *driver, struct bnode *bs, const char *name,
                                bool prefix, struct bnode_user **user, error **errp)
{
    json_t *o = json_pack("{s:s, s:s}", "driver", driver, "file", bs->node_name);
    if (name)
        json_object_set_new(o, "node-name", json_string(name));
    struct bnode *f = bnode_open_ref(o, false, errp);
    json_decref(o);
    *user = f ? bnode_attach(f, 0, PERM_ALL, "block job", "root", errp) : NULL;
    if (!*user) {
        if (prefix)
            error_prepend(errp, "Could not create node: ");
        if (f)
            bnode_unref(f);
        return NULL;
    }
    return f;
}

void chain_filter_close(struct bnode **filter, struct bnode_user **user)
{
    if (*user) {
        bnode_detach(*user);
        *user = NULL;
    }
    if (*filter) {
        bnode_unref(*filter);
        *filter = NULL;
    }
}

void chain_restore_read_only(struct bnode **bs, const char *job)
{
    if (!*bs)
        return;
    error *err = NULL;
    if (bnode_reopen_set_read_only(*bs, true, &err) < 0) {
        log_warn("%s: node '%s' stays read-write: %s", job, (*bs)->node_name, err->msg);
        error_free(err);
    }
    *bs = NULL;
}
