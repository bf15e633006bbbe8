/*
 * Driver "rbd": a Ceph RBD image through librbd, with QEMU 7.2's options
 * and error messages.
 *
 * Theory of operation.
 *
 * Open (main thread, blocking but bounded): a librados handle configured
 * like QEMU's (conf file, user, mon_host from server=, the key from a
 * secret object, auth_client_required, rbd_cache off for cache.direct=on).
 * Unlike QEMU, nodes opened with the same connection options share one
 * connected handle (refcounted): a handle costs ~15 threads and a session
 * with every OSD, which would bound the number of exports per daemon.  A
 * handle that gets blocklisted (fenced) is not handed to new nodes.  Unless the configuration says otherwise, librados'
 * open-ended waits are bounded (client_mount_timeout, rados_mon_op_timeout,
 * rados_osd_op_timeout): an unreachable cluster fails blockdev-add within
 * seconds, and I/O to a cluster that stops answering fails with EIO instead
 * of hanging.  Read-only nodes (and snapshots) open the image read-only,
 * so they never take part in locking; any number of daemons can read.
 *
 * Writing: taking the WRITE permission acquires the image's exclusive lock
 * explicitly (rbd_lock_acquire), which librbd then refuses to hand over to
 * other clients: a second writer gets a clear error naming the owner.
 *
 * Data path: every request becomes one librbd AIO (readv, writev, flush,
 * discard, write_zeroes; a FUA write is followed by a flush).  librbd calls
 * back in its own threads; the callback only hands the request back to the
 * submitting loop through its completion channel (bchan.h).  So the loop
 * never blocks on the cluster, completions run in the submitting thread,
 * and a burst of completions costs one wake-up.
 *
 * Block status follows QEMU: with fast-diff, rbd_diff_iterate2(whole_object)
 * over the query gives the first run of allocated or unallocated objects;
 * unallocated runs are zero holes.  It is a synchronous call, so after an
 * I/O timed out (cluster unreachable) it answers "all data" without asking
 * the cluster until an I/O succeeds again.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
#include "util/atomic.h"
#include "block/block.h"
#include "block/bchan.h"
#include "object/secret.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/xalloc.h"
#include "util/opts.h"

/* Defaults applied only where the configuration left librados' own
 * default (which waits forever, or 300 s for the first connection). */
#define RBD_MOUNT_TIMEOUT  "10"
#define RBD_MON_OP_TIMEOUT "10"
#define RBD_OSD_OP_TIMEOUT "30"

#define DIFF_STOP (-9000)           /* our early exit from rbd_diff_iterate2 */

struct rbd_state;

/* One librados connection, shared by the nodes opened with the same
 * connection options (main thread only, except `poisoned`). */
struct rbd_cluster {
    char *id;                       /* the options, key included (wiped) */
    rados_t handle;
    int refcnt;
    bool poisoned;                  /* atomic: blocklisted, not for new nodes */
    struct rbd_cluster *next;
};

static struct rbd_cluster *clusters;

struct rbd_state {
    struct rbd_cluster *cl;
    rados_ioctx_t ioctx;
    rbd_image_t image;
    bool have_ioctx, have_image;
    char *image_name;
    uint64_t object_size;
    bool lock_held;
    bool failing;                   /* atomic: the last I/O timed out */
    int inflight;                   /* atomic */
    struct bchan_set chans;         /* completions back to their loops */
    /* The image's size in bytes as librbd has it (atomic to read; changed
     * under size_lock): a write past it resizes the image first. */
    uint64_t image_size;
    pthread_mutex_t size_lock;
};

enum { ST_OP, ST_FUA_FLUSH };

/* ---- errors ---- */

/* librados/librbd errno -> what the client should see.  Anything that is
 * not the caller's fault (timeouts, blocklisting, lost connections) is EIO. */
static int map_err(int err)
{
    switch (err) {
    case -EPERM: case -EROFS: case -EACCES: return -EPERM;
    case -ENOSPC: case -EDQUOT: return -ENOSPC;
    case -EINVAL: return -EINVAL;
    case -ENOTSUP: return -ENOTSUP;
    case -ENOMEM: return -ENOMEM;
    default: return -EIO;
    }
}

static void op_start(struct rbd_state *s, struct breq *r);

/* In the loop: one finished librbd operation of request r. */
static void op_finish(struct breq *r)
{
    struct rbd_state *s = r->bs->opaque;
    int ret = r->aio.res < 0 ? (int)r->aio.res : 0;   /* res >= 0: bytes done */

    __atomic_sub_fetch(&s->inflight, 1, __ATOMIC_RELAXED);
    if (ret < 0) {
        if (ret == -ETIMEDOUT)
            __atomic_store_n(&s->failing, true, __ATOMIC_RELAXED);
        if (ret == -ESHUTDOWN)          /* librados' EBLOCKLISTED: fenced */
            __atomic_store_n(&s->cl->poisoned, true, __ATOMIC_RELAXED);
        log_debug("rbd %s: %s at %" PRIu64 "+%" PRIu64 " failed: %s", s->image_name,
                  r->stage == ST_FUA_FLUSH ? "flush" : "request", r->drv_offset, r->len,
                  strerror(-ret));
        breq_complete(r, map_err(ret));
        return;
    }
    if (__atomic_load_n(&s->failing, __ATOMIC_RELAXED))
        __atomic_store_n(&s->failing, false, __ATOMIC_RELAXED);
    if (r->stage == ST_OP && (r->flags & BREQ_FUA) &&
        (r->op == BREQ_WRITE || r->op == BREQ_WRITE_ZEROES) && !r->bs->cache_no_flush) {
        r->stage = ST_FUA_FLUSH;
        op_start(s, r);
        return;
    }
    breq_complete(r, 0);
}

/* In a librbd thread. */
static void op_callback(rbd_completion_t comp, void *arg)
{
    struct breq *r = arg;
    int64_t res = rbd_aio_get_return_value(comp);

    rbd_aio_release(comp);
    bchan_push(r->chan, r, res);
}

/* ---- requests ---- */

static int op_issue(struct rbd_state *s, struct breq *r, rbd_completion_t comp)
{
    uint64_t off = r->drv_offset;

    if (r->stage == ST_FUA_FLUSH)
        return rbd_aio_flush(s->image, comp);
    switch (r->op) {
    case BREQ_READ:
        return rbd_aio_readv(s->image, r->iov, r->iovcnt, off, comp);
    case BREQ_WRITE:
        return rbd_aio_writev(s->image, r->iov, r->iovcnt, off, comp);
    case BREQ_FLUSH:
        return rbd_aio_flush(s->image, comp);
    case BREQ_DISCARD:
        return rbd_aio_discard(s->image, off, r->len, comp);
    case BREQ_WRITE_ZEROES: {
        /* As QEMU: zeros stay allocated unless the client allows unmapping
         * and the node has discard=unmap. */
        bool unmap = (r->flags & BREQ_MAY_UNMAP) && r->bs->discard;
        return rbd_aio_write_zeroes(s->image, off, r->len, comp,
                                    unmap ? 0 : RBD_WRITE_ZEROES_FLAG_THICK_PROVISION, 0);
    }
    case BREQ_CACHE:
        break;
    }
    return -EINVAL;
}

static void op_start(struct rbd_state *s, struct breq *r)
{
    rbd_completion_t comp;
    int ret = rbd_aio_create_completion(r, op_callback, &comp);
    if (ret < 0) {
        breq_complete(r, map_err(ret));
        return;
    }
    __atomic_add_fetch(&s->inflight, 1, __ATOMIC_RELAXED);
    ret = op_issue(s, r, comp);
    if (ret < 0) {
        __atomic_sub_fetch(&s->inflight, 1, __ATOMIC_RELAXED);
        rbd_aio_release(comp);
        breq_complete(r, map_err(ret));
    }
}

/*
 * librbd refuses a write that does not fit in the image (EINVAL), so a
 * write past the end (a format driver such as qcow2 allocating clusters
 * past it: BREQ_BEYOND_EOF) grows the image to the write's end first, as
 * QEMU 7.2's qemu_rbd_start_co() does.  rbd_resize() waits for the
 * cluster, in the caller's loop, as in QEMU.  The image only ever grows
 * here: concurrent writes past the end, from any loop, resize under
 * size_lock to the largest end asked.
 */
static int grow_for_write(struct bnode *bs, struct rbd_state *s, uint64_t end)
{
    int r = 0;
    pthread_mutex_lock(&s->size_lock);
    if (end > s->image_size) {
        r = rbd_resize(s->image, end);
        if (r == 0) {
            __atomic_store_n(&s->image_size, end, __ATOMIC_RELAXED);
            atomic_max_u64(&bs->size, bnode_round_size(end));
        } else {
            log_debug("rbd %s: growing the image to %" PRIu64 " for a write failed: %s",
                      s->image_name, end, strerror(-r));
        }
    }
    pthread_mutex_unlock(&s->size_lock);
    return r;
}

static void rbd_submit(struct bnode *bs, struct breq *r, uint64_t offset)
{
    struct rbd_state *s = bs->opaque;

    if (r->op == BREQ_CACHE) {
        breq_complete(r, 0);
        return;
    }
    if ((r->op == BREQ_WRITE || r->op == BREQ_WRITE_ZEROES) &&
        offset + r->len > __atomic_load_n(&s->image_size, __ATOMIC_RELAXED)) {
        int ret = grow_for_write(bs, s, offset + r->len);
        if (ret < 0) {
            breq_complete(r, map_err(ret));
            return;
        }
    }
    r->bs = bs;
    r->drv_offset = offset;
    r->stage = ST_OP;
    r->chan = bchan_get(&s->chans, r->loop);
    op_start(s, r);
}

/* ---- connecting ---- */

/* QEMU's mon_host string: "host:port;[v6host]:port;..." */
static char *mon_host_string(json_t *servers)
{
    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);
    size_t i;
    json_t *srv;

    if (!f)
        xalloc_die();
    json_array_foreach(servers, i, srv) {
        const char *host = opt_str(srv, "host", "");
        const char *port = opt_str(srv, "port", "");
        if (strchr(host, ':'))
            fprintf(f, "%s[%s]:%s", i ? ";" : "", host, port);
        else
            fprintf(f, "%s%s:%s", i ? ";" : "", host, port);
    }
    fclose(f);
    return out;
}

static void conf_default(rados_t c, const char *opt, const char *librados_default,
                         const char *ours)
{
    char cur[64];
    if (rados_conf_get(c, opt, cur, sizeof(cur)) == 0 && !strcmp(cur, librados_default))
        rados_conf_set(c, opt, ours);
}

static int set_auth(rados_t c, json_t *opts, char **key_out, error **errp)
{
    const char *secret_id = opt_str(opts, "key-secret", NULL);
    json_t *acr = json_object_get(opts, "auth-client-required");
    int r;

    if (secret_id) {
        char *key = secret_lookup_as_base64(secret_id, errp);
        if (!key)
            return -EIO;
        r = rados_conf_set(c, "key", key);
        *key_out = key;
        if (r < 0) {
            error_setg_errno(errp, -r, "Could not set 'key'");
            return r;
        }
    }
    if (acr) {
        char buf[64] = "";
        size_t i;
        json_t *m;
        json_array_foreach(acr, i, m) {
            if (strlen(buf) + 8 >= sizeof(buf))
                break;                      /* only cephx/none exist */
            if (buf[0])
                strcat(buf, ";");
            strcat(buf, json_string_value(m));
        }
        r = rados_conf_set(c, "auth_client_required", buf);
        if (r < 0) {
            error_setg_errno(errp, -r, "Could not set 'auth_client_required'");
            return r;
        }
    }
    return 0;
}

static void wipe_free(char *p)
{
    if (p) {
        explicit_bzero(p, strlen(p));
        free(p);
    }
}

/* What makes two nodes' connections interchangeable. */
static char *cluster_id(struct bnode *bs, json_t *opts, const char *key)
{
    CLEANUP_JSON json_t *o = json_pack("{s:O?,s:O?,s:O?,s:O?,s:s?,s:b}",
        "conf", json_object_get(opts, "conf"), "user", json_object_get(opts, "user"),
        "server", json_object_get(opts, "server"),
        "auth", json_object_get(opts, "auth-client-required"), "key", key,
        "direct", bs->cache_direct);
    char *id = o ? json_dumps(o, JSON_SORT_KEYS | JSON_COMPACT) : NULL;
    if (!id)
        xalloc_die();
    return id;
}

static struct rbd_cluster *cluster_find(const char *id)
{
    for (struct rbd_cluster *c = clusters; c; c = c->next)
        if (!strcmp(c->id, id) && !__atomic_load_n(&c->poisoned, __ATOMIC_RELAXED))
            return c;
    return NULL;
}

static void cluster_put(struct rbd_cluster *c)
{
    if (--c->refcnt > 0)
        return;
    for (struct rbd_cluster **p = &clusters; *p; p = &(*p)->next)
        if (*p == c) {
            *p = c->next;
            break;
        }
    rados_shutdown(c->handle);
    wipe_free(c->id);
    free(c);
}

/* Configure a handle as QEMU does (errors in QEMU's order), then reuse a
 * connected one with the same options, or connect this one. */
static int cluster_get(struct bnode *bs, struct rbd_state *s, json_t *opts, error **errp)
{
    const char *conf = opt_str(opts, "conf", NULL);
    json_t *servers = json_object_get(opts, "server");
    char *key = NULL;
    rados_t h;
    int r;

    r = rados_create(&h, opt_str(opts, "user", NULL));
    if (r < 0) {
        error_setg_errno(errp, -r, "error initializing");
        return r;
    }
    /* conf absent: the default locations, failure ignored (as QEMU) */
    r = rados_conf_read_file(h, conf);
    if (conf && r < 0) {
        error_setg_errno(errp, -r, "error reading conf file %s", conf);
        goto fail;
    }
    if (servers && json_array_size(servers)) {
        CLEANUP_FREE char *mon_host = mon_host_string(servers);
        r = rados_conf_set(h, "mon_host", mon_host);
        if (r < 0) {
            error_setg_errno(errp, -r, "Could not set 'mon_host'");
            goto fail;
        }
    }
    r = set_auth(h, opts, &key, errp);
    if (r < 0)
        goto fail;
    rados_conf_set(h, "rbd_cache", bs->cache_direct ? "false" : "true");
    conf_default(h, "client_mount_timeout", "300", RBD_MOUNT_TIMEOUT);
    conf_default(h, "rados_mon_op_timeout", "0", RBD_MON_OP_TIMEOUT);
    conf_default(h, "rados_osd_op_timeout", "0", RBD_OSD_OP_TIMEOUT);

    char *id = cluster_id(bs, opts, key);
    wipe_free(key);
    key = NULL;
    s->cl = cluster_find(id);
    if (s->cl) {
        wipe_free(id);
        rados_shutdown(h);
        s->cl->refcnt++;
        return 0;
    }
    r = rados_connect(h);
    if (r < 0) {
        error_setg_errno(errp, -r, "error connecting");
        wipe_free(id);
        goto fail;
    }
    s->cl = xzalloc(sizeof(*s->cl));
    *s->cl = (struct rbd_cluster){ .id = id, .handle = h, .refcnt = 1, .next = clusters };
    clusters = s->cl;
    return 0;

fail:
    wipe_free(key);
    rados_shutdown(h);
    return r;
}

static int connect_cluster(struct bnode *bs, struct rbd_state *s, json_t *opts, error **errp)
{
    const char *pool = opt_str(opts, "pool", "");
    const char *ns = opt_str(opts, "namespace", NULL);
    int r = cluster_get(bs, s, opts, errp);
    if (r < 0)
        return r;
    r = rados_ioctx_create(s->cl->handle, pool, &s->ioctx);
    if (r < 0) {
        error_setg_errno(errp, -r, "error opening pool %s", pool);
        return r;
    }
    s->have_ioctx = true;
    if (ns && ns[0]) {
        bool exists = false;
        r = rbd_namespace_exists(s->ioctx, ns, &exists);
        if (r < 0) {
            error_setg_errno(errp, -r, "error checking namespace");
            return r;
        }
        if (!exists) {
            error_setg(errp, "namespace '%s' does not exist", ns);
            return -ENOENT;
        }
    }
    rados_ioctx_set_namespace(s->ioctx, ns ? ns : "");
    return 0;
}

/* ---- open/close ---- */

static void state_free(struct rbd_state *s)
{
    if (s->have_image)
        rbd_close(s->image);
    if (s->have_ioctx)
        rados_ioctx_destroy(s->ioctx);
    if (s->cl)
        cluster_put(s->cl);
    bchan_set_destroy(&s->chans);
    pthread_mutex_destroy(&s->size_lock);
    free(s->image_name);
    free(s);
}

/* encrypt={format=luks|luks2,key-secret=ID}: librbd decrypts (QEMU 7.2 has
 * neither luks-any nor parent=, which need librbd 1.17's encryption_load2) */
static int load_encryption(struct rbd_state *s, json_t *enc, error **errp)
{
    const char *fmt = opt_str(enc, "format", "");
    rbd_encryption_luks1_format_options_t luks1 = { 0 };
    rbd_encryption_luks2_format_options_t luks2 = { 0 };
    uint8_t *pass = NULL;
    size_t pass_len;
    int r;

    if (!enc)
        return 0;
    if (strcmp(fmt, "luks") && strcmp(fmt, "luks2")) {
        error_setg(errp, "Parameter 'format' does not accept value '%s'", fmt);
        return -EINVAL;
    }
    if (json_object_get(enc, "parent")) {
        error_setg(errp, "Parameter 'parent' is unexpected");
        return -EINVAL;
    }
    if (secret_lookup(opt_str(enc, "key-secret", ""), &pass, &pass_len, errp) < 0)
        return -EIO;
    if (!strcmp(fmt, "luks")) {
        luks1.passphrase = (const char *)pass;
        luks1.passphrase_size = pass_len;
        r = rbd_encryption_load(s->image, RBD_ENCRYPTION_FORMAT_LUKS1, &luks1, sizeof(luks1));
    } else {
        luks2.passphrase = (const char *)pass;
        luks2.passphrase_size = pass_len;
        r = rbd_encryption_load(s->image, RBD_ENCRYPTION_FORMAT_LUKS2, &luks2, sizeof(luks2));
    }
    explicit_bzero(pass, pass_len);
    free(pass);
    if (r < 0) {
        error_setg_errno(errp, -r, "encryption load fail");
        return r;
    }
    return 0;
}

static int open_image(struct bnode *bs, struct rbd_state *s, json_t *opts, error **errp)
{
    const char *snap = opt_str(opts, "snapshot", NULL);
    rbd_image_info_t info;
    int r;

    if (bs->read_only || snap)
        r = rbd_open_read_only(s->ioctx, s->image_name, &s->image, snap);
    else
        r = rbd_open(s->ioctx, s->image_name, &s->image, NULL);
    if (r < 0) {
        error_setg_errno(errp, -r, "error reading header from %s", s->image_name);
        return r;
    }
    s->have_image = true;
    r = load_encryption(s, json_object_get(opts, "encrypt"), errp);
    if (r < 0)
        return r;
    r = rbd_stat(s->image, &info, sizeof(info));
    if (r < 0) {
        error_setg_errno(errp, -r, "error getting image info from %s", s->image_name);
        return r;
    }
    bs->size = info.size;
    s->image_size = info.size;
    s->object_size = info.obj_size;
    if (snap && !bs->read_only) {
        if (!opt_bool(opts, "auto-read-only", false)) {
            error_setg(errp, "rbd snapshots are read-only");
            return -EROFS;
        }
        bs->read_only = true;
    }
    return 0;
}

static int rbd_open_node(struct bnode *bs, json_t *opts, error **errp)
{
    struct rbd_state *s = xzalloc(sizeof(*s));
    int r;

    bchan_set_init(&s->chans, op_finish);
    pthread_mutex_init(&s->size_lock, NULL);
    s->image_name = xstrdup(opt_str(opts, "image", ""));
    r = connect_cluster(bs, s, opts, errp);
    if (r == 0)
        r = open_image(bs, s, opts, errp);
    if (r < 0) {
        state_free(s);
        return -1;
    }
    bs->opaque = s;
    return 0;
}

static void rbd_close_node(struct bnode *bs)
{
    struct rbd_state *s = bs->opaque;
    if (!s)
        return;
    if (__atomic_load_n(&s->inflight, __ATOMIC_ACQUIRE) > 0) {
        /* Cannot happen if users drain first; leaking beats a callback
         * into freed memory. */
        log_error("rbd %s: closed with %d requests in flight; leaking its state",
                  s->image_name, s->inflight);
        return;
    }
    state_free(s);
    bs->opaque = NULL;
}

/* ---- write permission: the exclusive lock ---- */

static void lock_owner_name(struct rbd_state *s, char *buf, size_t len)
{
    rbd_lock_mode_t mode;
    char *owners[4];
    size_t n = 4;
    snprintf(buf, len, "owner unknown");
    if (rbd_lock_get_owners(s->image, &mode, owners, &n) == 0 && n > 0) {
        snprintf(buf, len, "%s", owners[0]);
        rbd_lock_get_owners_cleanup(owners, n);
    }
}

static int rbd_set_perm(struct bnode *bs, uint64_t perm, uint64_t shared, error **errp)
{
    struct rbd_state *s = bs->opaque;
    uint64_t features = 0;
    int r, owner = 0;
    bool write = perm & PERM_WRITE;

    if (write && s->lock_held)
        return 0;
    if (!write) {
        if (s->lock_held) {
            r = rbd_lock_release(s->image);
            if (r < 0)
                log_warn("rbd %s: releasing the exclusive lock: %s", s->image_name, strerror(-r));
            s->lock_held = false;
        }
        return 0;
    }
    if (rbd_get_features(s->image, &features) == 0 && !(features & RBD_FEATURE_EXCLUSIVE_LOCK))
        return 0;     /* nothing to lock with: librbd cannot keep writers apart */
    r = rbd_lock_acquire(s->image, RBD_LOCK_MODE_EXCLUSIVE);
    if (r == 0 && rbd_is_exclusive_lock_owner(s->image, &owner) == 0 && !owner)
        r = -EBUSY;
    if (r < 0) {
        char who[128];
        if (r == -EROFS || r == -EBUSY) {
            lock_owner_name(s, who, sizeof(who));
            error_setg(errp, "Failed to get the exclusive lock of rbd image '%s': "
                       "another client holds it (%s)", s->image_name, who);
        } else {
            error_setg_errno(errp, -r, "Failed to get the exclusive lock of rbd image '%s'",
                             s->image_name);
        }
        return -1;
    }
    s->lock_held = true;
    return 0;
}

/* ---- block status ---- */

struct diff_req {
    uint64_t offs;       /* start of the query (object aligned) */
    uint64_t bytes;      /* length of the first run found so far */
    bool exists;         /* that run is allocated */
};

static int diff_cb(uint64_t offs, size_t len, int exists, void *opaque)
{
    struct diff_req *q = opaque;

    if (!exists)
        return 0;                          /* a discarded object: a hole */
    if (!q->exists && offs > q->offs) {
        q->bytes = offs - q->offs;         /* hole up to the first data */
        return DIFF_STOP;
    }
    if (q->exists && offs > q->offs + q->bytes)
        return DIFF_STOP;                  /* data ended before a hole */
    q->bytes = offs + len - q->offs;
    q->exists = true;
    return 0;
}

static bool fast_diff_usable(struct rbd_state *s)
{
    uint64_t features, flags;
    if (rbd_get_features(s->image, &features) < 0 || !(features & RBD_FEATURE_FAST_DIFF))
        return false;
    if (rbd_get_flags(s->image, &flags) < 0 || (flags & RBD_FLAG_FAST_DIFF_INVALID))
        return false;
#if LIBRBD_VERSION_CODE < LIBRBD_VERSION(1, 17, 0)
    /* librbd before 1.17 reports wrong offsets for a diff that does not
     * start on an object boundary (ceph tracker 53784): we round down,
     * which is right only for plain striping and images without parent. */
    if (features & RBD_FEATURE_STRIPINGV2)
        return false;
    rbd_linked_image_spec_t parent;
    rbd_snap_spec_t parent_snap;
    int r = rbd_get_parent(s->image, &parent, &parent_snap);
    if (r == 0) {
        rbd_linked_image_spec_cleanup(&parent);
        rbd_snap_spec_cleanup(&parent_snap);
    }
    if (r != -ENOENT)
        return false;
#endif
    return true;
}

static int rbd_block_status(struct bnode *bs, uint64_t offset, uint64_t bytes,
                            uint64_t *pnum, unsigned *flags)
{
    struct rbd_state *s = bs->opaque;

    *pnum = bytes;
    *flags = BS_DATA | BS_ALLOCATED;      /* the answer when we cannot tell */
    if (__atomic_load_n(&s->failing, __ATOMIC_RELAXED) || !s->object_size ||
        !fast_diff_usable(s))
        return 0;

    uint64_t head = offset & (s->object_size - 1);
    struct diff_req q = { .offs = offset - head };
    int r = rbd_diff_iterate2(s->image, NULL, q.offs, bytes + head, true, true, diff_cb, &q);
    if (r < 0 && r != DIFF_STOP) {
        if (r == -ETIMEDOUT)
            __atomic_store_n(&s->failing, true, __ATOMIC_RELAXED);
        return 0;
    }
    if (!q.exists) {
        if (r == 0)
            q.bytes = bytes + head;        /* no callback at all: all hole */
        *flags = BS_ZERO | BS_ALLOCATED;
    }
    if (q.bytes <= head)                   /* cannot happen; stay safe */
        return 0;
    *pnum = MIN(q.bytes - head, bytes);
    return 0;
}

/* ---- misc ---- */

static int rbd_truncate(struct bnode *bs, uint64_t size, error **errp)
{
    struct rbd_state *s = bs->opaque;
    pthread_mutex_lock(&s->size_lock);
    int r = rbd_resize(s->image, size);
    if (r == 0)
        __atomic_store_n(&s->image_size, size, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&s->size_lock);
    if (r < 0) {
        error_setg_errno(errp, -r, "failed to resize rbd image %s", s->image_name);
        return r;
    }
    return 0;
}

static int rbd_flush_sync(struct bnode *bs)
{
    struct rbd_state *s = bs->opaque;
    return rbd_flush(s->image);
}

static bool rbd_true(struct bnode *bs) { return true; }

static int rbd_snapshot_list(struct bnode *bs, struct bsnapshot **list);

/* QEMU reports the object size as the cluster size (the node's json:
 * name comes from filename.c: rbd is a protocol without a "filename"). */
static void rbd_query_info(struct bnode *bs, json_t *info)
{
    struct rbd_state *s = bs->opaque;
    json_t *image = json_object_get(info, "image");
    const char *drv = json_string_value(json_object_get(info, "drv"));
    json_object_del(image, "actual-size");
    json_object_set_new(image, "cluster-size", json_integer(s->object_size));
    /* QEMU 7.2's raw has no format-specific info of its own: only the rbd
     * node shows rbd's */
    if (drv && !strcmp(drv, "rbd"))
        json_object_set_new(image, "format-specific",
                            json_pack("{s:s, s:{}}", "type", "rbd", "data"));
    /* The image's snapshots, as qemu_rbd_snap_list gives them (id and name
     * the snapshot's name, vm-state-size its size), on the rbd node and the
     * raw nodes and filters over it (bdrv_snapshot_list falls back to the
     * file child); a qcow2 node lists its own. */
    if (drv && !strcmp(drv, "qcow2"))
        return;
    struct bsnapshot *snaps;
    int n = rbd_snapshot_list(bs, &snaps);
    if (n > 0) {
        json_t *list = json_array();
        for (int i = 0; i < n; i++)
            json_array_append_new(list, bsnapshot_info(&snaps[i]));
        json_object_set_new(image, "snapshots", list);
    }
    bsnapshots_free(snaps, n);
}

/* Internal snapshots are the image's RBD snapshots (QEMU's
 * qemu_rbd_snap_*): the name is the id, the size is listed as the VM
 * state's, and nothing else is recorded. */
static int rbd_snapshot_list(struct bnode *bs, struct bsnapshot **list)
{
    struct rbd_state *s = bs->opaque;
    int max = 16, n;
    rbd_snap_info_t *snaps;
    for (;;) {
        snaps = xcalloc(max, sizeof(*snaps));
        n = rbd_snap_list(s->image, snaps, &max);
        if (n != -ERANGE)
            break;
        free(snaps);
    }
    *list = xcalloc(n > 0 ? n : 1, sizeof(**list));
    for (int i = 0; i < n; i++)
        (*list)[i] = (struct bsnapshot){ .id = xstrdup(snaps[i].name),
                                         .name = xstrdup(snaps[i].name),
                                         .vm_state_size = snaps[i].size };
    if (n > 0)
        rbd_snap_list_end(snaps);
    free(snaps);
    return n;
}

static int rbd_snapshot_create(struct bnode *bs, struct bsnapshot *sn)
{
    struct rbd_state *s = bs->opaque;
    if (!sn->name || !*sn->name)
        return -EINVAL;
    if (strlen(sn->name) >= 128)        /* QEMU's id_str holds the name */
        return -ERANGE;
    int r = rbd_snap_create(s->image, sn->name);
    if (r < 0) {
        log_error("failed to create snap: %s", strerror(-r));
        return r;
    }
    free(sn->id);
    sn->id = xstrdup(sn->name);
    return 0;
}

static int rbd_snapshot_delete(struct bnode *bs, const char *id, const char *name,
                               struct bsnapshot *gone, error **errp)
{
    struct rbd_state *s = bs->opaque;
    if (!name) {
        error_setg(errp, "rbd need a valid snapshot name");
        return -EINVAL;
    }
    if (id && strcmp(id, name)) {
        error_setg(errp, "rbd do not support snapshot id, it should be NULL or equal to "
                   "snapshot name");
        return -EINVAL;
    }
    int r = rbd_snap_remove(s->image, name);
    if (r < 0) {
        error_setg_errno(errp, -r, "Failed to remove the snapshot");
        return r;
    }
    gone->id = xstrdup(name);
    gone->name = xstrdup(name);
    return 0;
}

static const char *const rbd_strong_opts[] = {
    "pool", "namespace", "image", "conf", "snapshot", "user", "server.", "password-secret",
    NULL
};

static const struct bdrv bdrv_rbd = {
    .is_protocol = true,
    .strong_opts = rbd_strong_opts,
    .query_info = rbd_query_info,
    .name = "rbd",
    .open = rbd_open_node,
    .close = rbd_close_node,
    .submit = rbd_submit,
    .block_status = rbd_block_status,
    .truncate = rbd_truncate,
    .set_perm = rbd_set_perm,
    .flush_sync = rbd_flush_sync,
    .can_discard = rbd_true,
    .snapshot_list = rbd_snapshot_list,
    .snapshot_create = rbd_snapshot_create,
    .snapshot_delete = rbd_snapshot_delete,
};
BDRV_REGISTER(bdrv_rbd)
