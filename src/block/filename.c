/*
 * A node's file name as QEMU 7.2 reports it (bdrv_refresh_filename), for
 * query-named-block-nodes' "file" and "image"."filename".
 *
 * Every node has an exact file name (one that opens the same data by
 * itself, or none) and its full open options: "driver", "filename" and the
 * driver's strong options (those that change the data: raw's offset and
 * size, null-co's size and read-zeroes, blkdebug's rules and limits, ...)
 * taken from its own options, plus each child's full options under the
 * child's name (newest child first), the backing child only when it is not
 * the one the image header names ("backing": null when that one was left
 * out).  A node's name is its exact file name, else "json:" and its full
 * options as QEMU's qobject_to_json writes a QDict: keys in the order of
 * their hash buckets, ", " and ": " between them.
 *
 * The exact name: a protocol node (file, host_device, null-co, blkdebug,
 * rbd) keeps its "filename" option; a format node takes its primary
 * child's exact name when that child is a protocol node and the format
 * node has no strong option and no overridden backing; null-co is
 * "null-co://" without size or read-zeroes; blkdebug without rules or
 * limits is "blkdebug:CONFIG:CHILD"; copy-before-write and snapshot-access
 * show their file child's name.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "qmp/json-out.h"
#include "util/keyval.h"
#include "util/opts.h"
#include "util/cleanup.h"
#include "util/xalloc.h"

#define FILENAME_MAX_LEN 4096           /* QEMU's PATH_MAX-sized bs->filename */

struct fname {
    char *exact;                        /* "" = none */
    json_t *full;                       /* members in insertion order */
};

static void fname_free(struct fname *f)
{
    free(f->exact);
    json_decref(f->full);
}

/* QEMU's append_strong_runtime_options: copies "driver", "filename" and
 * the driver's strong options (a name ending in '.' is a prefix) from the
 * node's options into d; true if one other than driver/filename was there. */
static bool append_strong(json_t *d, struct bnode *bs)
{
    static const char *const global[] = { "driver", "filename", NULL };
    CLEANUP_JSON json_t *flat = keyval_flatten(bs->options);
    bool found = false;
    for (int pass = 0; pass < 2; pass++) {
        const char *const *names = pass ? bs->drv->strong_opts : global;
        for (; names && *names; names++) {
            const char *name = *names;
            size_t len = strlen(name);
            bool given = false;
            if (name[len - 1] != '.') {
                json_t *v = json_object_get(flat, name);
                if (v) {
                    json_object_set(d, name, v);
                    given = true;
                }
            } else {
                /* in the order QEMU walks the node's options QDict */
                CLEANUP_JSON json_t *walk = qdict_ordered(flat);
                const char *k;
                json_t *v;
                json_object_foreach(walk, k, v)
                    if (!strncmp(k, name, len)) {
                        json_object_set(d, k, v);
                        given = true;
                    }
            }
            if (given && pass)
                found = true;
        }
    }
    if (!json_object_get(d, "driver"))
        json_object_set_new(d, "driver", json_string(bs->drv->name));
    return found;
}

static void refresh(struct bnode *bs, struct fname *out);

/* bs's filename from its exact name or its full options (QEMU's tail of
 * bdrv_refresh_filename, with its truncation to PATH_MAX). */
static char *filename_of(const struct fname *f)
{
    if (f->exact[0])
        return xstrdup(f->exact);
    CLEANUP_JSON json_t *ordered = qdict_ordered(f->full);
    size_t len;
    CLEANUP_FREE char *text = qmp_json_line(ordered, false, &len);
    text[len - 2] = 0;                  /* without the "\r\n" */
    char *name = xasprintf("json:%s", text);
    if (strlen(name) >= FILENAME_MAX_LEN)
        strcpy(name + FILENAME_MAX_LEN - 4, "...");
    return name;
}

char *bnode_filename(struct bnode *bs)
{
    struct fname f;
    refresh(bs, &f);
    char *name = filename_of(&f);
    fname_free(&f);
    return name;
}

/* QEMU's bdrv_backing_overridden: the backing child is not the one the
 * image header names (may say yes when it would be the same). */
static bool backing_overridden(struct bnode *bs)
{
    const char *auto_bf = bs->auto_backing_file ? bs->auto_backing_file : "";
    if (!bs->backing)
        return auto_bf[0] != 0;
    CLEANUP_FREE char *name = bnode_filename(bs->backing);
    return strcmp(auto_bf, name) != 0;
}

static int by_seq_desc(const void *a, const void *b)
{
    const struct bnode_user *x = *(struct bnode_user *const *)a;
    const struct bnode_user *y = *(struct bnode_user *const *)b;
    return x->seq > y->seq ? -1 : x->seq < y->seq;
}

/* bs's child links, newest first (QEMU's bs->children order). */
static struct bnode_user **children_of(struct bnode *bs, size_t *n)
{
    struct bnode_user **v = NULL;
    *n = 0;
    for (struct bnode *c = bnode_first(); c; c = c->next)
        for (struct bnode_user *u = c->users; u; u = u->next)
            if (u->parent == bs) {
                v = xrealloc(v, (*n + 1) * sizeof(*v));
                v[(*n)++] = u;
            }
    if (*n)
        qsort(v, *n, sizeof(*v), by_seq_desc);
    return v;
}

static bool only_keys(json_t *obj, const char *const *keys)
{
    const char *k;
    json_t *v;
    json_object_foreach(obj, k, v) {
        const char *const *p = keys;
        while (*p && strcmp(*p, k))
            p++;
        if (!*p)
            return false;
    }
    return true;
}

/* QEMU's nbd_refresh_filename: a URI for a UNIX socket or a plain inet
 * address, else none. */
static char *nbd_exact_name(json_t *opts)
{
    json_t *srv = json_object_get(opts, "server");
    const char *type = opt_str(srv, "type", "");
    const char *exp = opt_str(opts, "export", NULL);
    char *name = NULL;

    if (!strcmp(type, "unix")) {
        const char *path = opt_str(srv, "path", "");
        name = exp ? xasprintf("nbd+unix:///%s?socket=%s", exp, path)
                   : xasprintf("nbd+unix://?socket=%s", path);
    } else if (!strcmp(type, "inet") && !opt_has(srv, "ipv4") && !opt_has(srv, "ipv6") &&
               !opt_has(srv, "to")) {
        const char *host = opt_str(srv, "host", ""), *port = opt_str(srv, "port", "");
        name = exp ? xasprintf("nbd://%s:%s/%s", host, port, exp)
                   : xasprintf("nbd://%s:%s", host, port);
    }
    if (name && strlen(name) >= FILENAME_MAX_LEN)
        name[0] = 0;                    /* too long to be exact: none */
    return name;
}

static void refresh(struct bnode *bs, struct fname *out)
{
    bool overridden = backing_overridden(bs);
    out->full = json_object();
    bool generate_json = append_strong(out->full, bs) || overridden;
    size_t n;
    struct bnode_user **kids = children_of(bs, &n);
    for (size_t i = 0; i < n; i++) {
        if (kids[i]->bs == bs->backing && !strcmp(kids[i]->role, "backing") && !overridden)
            continue;
        struct fname c;
        refresh(kids[i]->bs, &c);
        json_object_set(out->full, kids[i]->role, c.full);
        fname_free(&c);
    }
    free(kids);
    if (overridden && !bs->backing)
        json_object_set_new(out->full, "backing", json_null());

    struct bnode *primary = bs->file;
    const char *given = json_string_value(json_object_get(bs->options, "filename"));
    out->exact = NULL;
    switch (bs->drv->filename_rule) {
    case FNAME_NULL: {
        static const char *const plain[] = { "filename", "driver", "latency-ns", NULL };
        out->exact = only_keys(out->full, plain) ? xasprintf("%s://", bs->drv->name) : NULL;
        break;
    }
    case FNAME_BLKDEBUG: {
        static const char *const plain[] = { "config", "image", "x-image", "driver", NULL };
        struct fname c;
        refresh(primary, &c);
        if (c.exact[0] && only_keys(out->full, plain)) {
            const char *config = json_string_value(json_object_get(bs->options, "config"));
            out->exact = xasprintf("blkdebug:%s:%s", config ? config : "", c.exact);
            if (strlen(out->exact) >= FILENAME_MAX_LEN)
                out->exact[0] = 0;      /* unusable when cut: none */
        }
        fname_free(&c);
        break;
    }
    case FNAME_FILE_CHILD:
        out->exact = bnode_filename(primary);
        break;
    case FNAME_NBD:
        out->exact = nbd_exact_name(bs->options);
        break;
    case FNAME_DEFAULT:
        if (!primary) {
            out->exact = xstrdup(given ? given : "");
            break;
        }
        if (!bs->drv->is_filter && primary->drv->is_protocol && !generate_json) {
            struct fname c;
            refresh(primary, &c);
            out->exact = c.exact;
            c.exact = NULL;
            fname_free(&c);
        }
        break;
    }
    if (!out->exact)
        out->exact = xstrdup("");
}
