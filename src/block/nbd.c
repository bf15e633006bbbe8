/*
 * Driver "nbd": an export of an NBD server as a block node (QEMU 7.2's
 * BlockdevOptionsNbd: server, export, tls-creds, tls-hostname,
 * x-dirty-bitmap, reconnect-delay, open-timeout).  With it a mirror or a
 * backup job writes to another host's server, and a remote export is served
 * again through any of bexd's exports.
 *
 * Theory of operation.
 *
 * Open (main thread): connect and negotiate (nbd-handshake.c) in a thread,
 * retrying for open-timeout seconds, while the main thread serves the
 * handshakes of this process's own NBD server (the node may name one of
 * its exports).  Then a sender and a reader thread own the connection
 * (nbd-conn.c).  A request becomes wire requests of at most the server's
 * maximum block (32 MiB without one) for READ and WRITE, 1 GiB for the
 * others; FUA is sent when the server has it, else a flush follows the
 * write; write zeroes without NBD_CMD_WRITE_ZEROES become writes of zeros;
 * trim, cache and flush go out only when the server offers them; a READ's
 * part past the export (the node's size is rounded up to 512 bytes) reads
 * zeros.
 *
 * Block status is synchronous in this block layer (a loop asks and waits),
 * so it is one BLOCK_STATUS request with REQ_ONE, answered within
 * NBDC_STATUS_MS or taken as "data" (always a correct answer).  A node
 * connected to this very process's NBD server never asks: the loop that
 * waits could be the one that must answer.  Without structured
 * replies or the context, everything is data.  x-dirty-bitmap asks for
 * that context instead and reads its flags as base:allocation's, as QEMU
 * does (a dirty area is a hole; allocation-depth 0 data, 1 hole, 2+ zero).
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include "block/bchan.h"
#include "block/block.h"
#include "block/nbd-client.h"
#include "export/nbd/nbd-protocol.h"
#include "export/nbd/nbd.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/opts.h"
#include "util/sockets.h"
#include "util/xalloc.h"

enum { PHASE_OP, PHASE_FUA_FLUSH };

/* ---- requests ---- */

/* Queue the wire requests of r for [off, off+len) in pieces of at most
 * max bytes; r->pending counts those not finished. */
static void queue_pieces(struct nbd_state *s, struct breq *r, uint16_t type, uint16_t flags,
                         uint64_t off, uint64_t len, uint32_t max, bool zeroes)
{
    for (uint64_t done = 0; done < len;) {
        uint32_t n = (uint32_t)MIN(len - done, (uint64_t)max);
        struct nreq *q = nbdc_nreq_new(r, type, flags, off + done, n, done);
        q->zeroes = zeroes;
        __atomic_add_fetch(&r->pending, 1, __ATOMIC_RELAXED);
        nbdc_enqueue(s, q, false);
        done += n;
    }
}

/* A request without a range (FLUSH). */
static void queue_one(struct nbd_state *s, struct breq *r, uint16_t type)
{
    __atomic_add_fetch(&r->pending, 1, __ATOMIC_RELAXED);
    nbdc_enqueue(s, nbdc_nreq_new(r, type, 0, 0, 0, 0), false);
}

/* A write or write zeroes that must be durable on completion. */
static bool fua_wanted(struct bnode *bs, struct breq *r)
{
    return (r->flags & BREQ_FUA) && !bs->cache_no_flush &&
           (r->op == BREQ_WRITE || r->op == BREQ_WRITE_ZEROES);
}

/* Lock held: the wire requests for r at offset (or -errno to fail it). */
static int start_op(struct nbd_state *s, struct bnode *bs, struct breq *r, uint64_t offset,
                    int phase)
{
    uint16_t eflags = s->info.flags;
    uint64_t len = r->len, size = s->info.size;
    uint32_t range = NBDC_MAX_RANGE;
    bool fua = fua_wanted(bs, r) && (eflags & NBD_FLAG_SEND_FUA);

    if (s->info.min_block > 1)
        range -= range % s->info.min_block;
    if (phase == PHASE_FUA_FLUSH) {
        queue_one(s, r, NBD_CMD_FLUSH);
        return 0;
    }
    switch (r->op) {
    case BREQ_READ:
        if (offset + len > size) {
            /* the tail past the export's end (its size rounded up) reads zeros */
            uint64_t keep = offset < size ? size - offset : 0;
            nbdc_zero_buffers(r, keep, len - keep);
            len = keep;
        }
        queue_pieces(s, r, NBD_CMD_READ, 0, offset, len, s->max_payload, false);
        return 0;
    case BREQ_WRITE:
        if (offset + len > size)
            return -EIO;
        queue_pieces(s, r, NBD_CMD_WRITE,
                     fua ? NBD_CMD_FLAG_FUA : 0, offset, len,
                     s->max_payload, false);
        return 0;
    case BREQ_FLUSH:
        if (eflags & NBD_FLAG_SEND_FLUSH)
            queue_one(s, r, NBD_CMD_FLUSH);
        return 0;
    case BREQ_DISCARD:
        if (offset >= size || !(eflags & NBD_FLAG_SEND_TRIM))
            return 0;
        queue_pieces(s, r, NBD_CMD_TRIM, 0, offset, MIN(len, size - offset), range, false);
        return 0;
    case BREQ_CACHE:
        if (offset >= size || !(eflags & NBD_FLAG_SEND_CACHE))
            return 0;
        queue_pieces(s, r, NBD_CMD_CACHE, 0, offset, MIN(len, size - offset), range, false);
        return 0;
    case BREQ_WRITE_ZEROES: {
        if (offset >= size)
            return 0;
        len = MIN(len, size - offset);
        uint16_t f = fua ? NBD_CMD_FLAG_FUA : 0;
        if (r->flags & BREQ_NO_FALLBACK) {
            if (!(eflags & NBD_FLAG_SEND_FAST_ZERO) || !(eflags & NBD_FLAG_SEND_WRITE_ZEROES))
                return -ENOTSUP;
            f |= NBD_CMD_FLAG_FAST_ZERO;
        }
        if (eflags & NBD_FLAG_SEND_WRITE_ZEROES) {
            if (!(r->flags & BREQ_MAY_UNMAP))
                f |= NBD_CMD_FLAG_NO_HOLE;
            queue_pieces(s, r, NBD_CMD_WRITE_ZEROES, f, offset, len, range, false);
        } else {
            queue_pieces(s, r, NBD_CMD_WRITE, f, offset, len,
                         MIN(s->max_payload, NBDC_ZERO_CHUNK), true);
        }
        return 0;
    }
    }
    return -EINVAL;
}

static void issue(struct bnode *bs, struct breq *r, int phase)
{
    struct nbd_state *s = bs->opaque;

    r->pending = 1;                 /* ours, until every piece is queued */
    r->aio.res = 0;                 /* the first error of a piece */
    r->stage = phase;
    pthread_mutex_lock(&s->lock);
    int ret = s->fail_fast ? nbdc_fail_fast(s) : start_op(s, bs, r, r->drv_offset, phase);
    pthread_mutex_unlock(&s->lock);
    if (ret < 0) {
        /* nothing was queued for r */
        breq_complete(r, ret);
        return;
    }
    if (__atomic_sub_fetch(&r->pending, 1, __ATOMIC_ACQ_REL) == 0)
        nbdc_breq_finished(r);           /* nothing to send, or all done already */
}

void nbdc_breq_finished(struct breq *r)
{
    struct bnode *bs = r->bs;
    struct nbd_state *s = bs->opaque;
    int ret = (int)r->aio.res;

    if (ret == 0 && r->stage == PHASE_OP && fua_wanted(bs, r) &&
        !(s->info.flags & NBD_FLAG_SEND_FUA) && (s->info.flags & NBD_FLAG_SEND_FLUSH)) {
        issue(bs, r, PHASE_FUA_FLUSH);      /* FUA emulated: a flush after the write */
        return;
    }
    breq_complete(r, ret);
}

static void nbd_submit(struct bnode *bs, struct breq *r, uint64_t offset)
{
    struct nbd_state *s = bs->opaque;

    r->bs = bs;
    r->drv_offset = offset;
    r->chan = bchan_get(&s->chans, r->loop);
    issue(bs, r, PHASE_OP);
}

static int nbd_block_status(struct bnode *bs, uint64_t offset, uint64_t bytes,
                            uint64_t *pnum, unsigned *flags)
{
    struct nbd_state *s = bs->opaque;
    uint64_t size = s->info.size;

    if (offset >= size) {           /* the rounded-up tail reads zeros */
        *pnum = bytes;
        *flags = BS_ZERO | BS_ALLOCATED;
        return 0;
    }
    uint64_t len = MIN(bytes, size - offset);
    *pnum = len;
    *flags = BS_DATA | BS_ALLOCATED;
    if (!s->info.have_context || s->self)
        return 0;
    len = MIN(len, (uint64_t)NBDC_MAX_RANGE);
    struct nreq *q = nbdc_sync_request(s, NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, offset,
                                  (uint32_t)len, NBDC_STATUS_MS);
    if (!q)
        return 0;                   /* no answer in time: data */
    if (q->err || !q->have_extent || q->ext_len == 0) {
        int err = q->err;
        free(q);
        return err == -EIO ? -EIO : 0;
    }
    uint64_t n = MIN((uint64_t)q->ext_len, len);
    uint32_t f = q->ext_flags, a = s->info.min_block;
    free(q);
    if (a > 1 && n % a)
        n = n > a ? n - n % a : MIN((uint64_t)a, len);
    if (s->alloc_depth && f > 2)
        f = 2;
    *pnum = n;
    *flags = ((f & NBD_STATE_HOLE) ? 0 : BS_DATA) | ((f & NBD_STATE_ZERO) ? BS_ZERO : 0);
    if (*flags)
        *flags |= BS_ALLOCATED;
    return 0;
}

static int nbd_flush_sync(struct bnode *bs)
{
    struct nbd_state *s = bs->opaque;
    if (!(s->info.flags & NBD_FLAG_SEND_FLUSH) || bs->read_only)
        return 0;
    struct nreq *q = nbdc_sync_request(s, NBD_CMD_FLUSH, 0, 0, 0, NBDC_HANDSHAKE_MS);
    if (!q)
        return -ETIMEDOUT;
    int err = q->err;
    free(q);
    return err;
}

/* ---- open / close ---- */

/* Connect, retrying for open_timeout seconds (a thread of its own). */
struct opening {
    struct nbd_state *s;
    uint32_t open_timeout;
    error *err;
    int ret;
    int wake_fd;                    /* written when done */
    bool done;                      /* atomic */
};

static void *opening_main(void *opaque)
{
    struct opening *o = opaque;
    struct nbd_state *s = o->s;
    uint64_t until = now_ms() + (uint64_t)o->open_timeout * 1000;

    for (;;) {
        error *err = NULL;
        o->ret = nbdc_connect(&s->cfg, &s->wire, &s->info, now_ms() + NBDC_HANDSHAKE_MS, -1,
                              &err);
        if (o->ret == 0 || !o->open_timeout || now_ms() >= until) {
            o->err = err;
            break;
        }
        error_free(err);
        struct timespec ts = { 1, 0 };
        nanosleep(&ts, NULL);
    }
    __atomic_store_n(&o->done, true, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if (write(o->wake_fd, &one, sizeof(one)) < 0)
        log_debug("nbd: waking the main thread failed: %s", strerror(errno));
    return NULL;
}

/* Main thread.  The handshake runs in a thread while this one serves this
 * process's own NBD server's handshakes: a node may connect to an export
 * of this very daemon, whose handshake runs in the main loop. */
static int connect_first(struct nbd_state *s, uint32_t open_timeout, error **errp)
{
    struct opening o = { .s = s, .open_timeout = open_timeout,
                         .wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK) };
    pthread_t t;

    if (o.wake_fd < 0 || pthread_create(&t, NULL, opening_main, &o) != 0) {
        if (o.wake_fd >= 0)
            close(o.wake_fd);
        error_setg(errp, "Could not start the NBD client's threads");
        return -1;
    }
    while (!__atomic_load_n(&o.done, __ATOMIC_ACQUIRE))
        nbd_server_pump(o.wake_fd, 1000);
    pthread_join(t, NULL);
    close(o.wake_fd);
    if (o.ret < 0) {
        error_propagate(errp, o.err);
        return -1;
    }
    return 0;
}

/* QEMU 7.2 applies the export's flags without an error message
 * (nbd_handle_updated_info(bs, NULL)): blockdev-add then says "Could not
 * open image" and the errno. */
static int check_granted(struct bnode *bs, struct nbd_state *s, json_t *opts, error **errp)
{
    int err = 0;
    if (json_object_get(opts, "x-dirty-bitmap") && !s->info.have_context)
        err = EINVAL;
    else if ((s->info.flags & NBD_FLAG_READ_ONLY) && !bs->read_only) {
        if (opt_bool(opts, "auto-read-only", false))
            bs->read_only = true;
        else
            err = EACCES;
    }
    if (err) {
        error_setg_errno(errp, err, "Could not open image");
        return -1;
    }
    return 0;
}

static int nbd_open(struct bnode *bs, json_t *opts, error **errp)
{
    struct nbd_state *s = xzalloc(sizeof(*s));
    const char *tls = opt_str(opts, "tls-creds", NULL);

    s->wire.fd = -1;
    s->wire.cancel_fd = -1;
    s->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    s->refs = 1;
    s->q_tail = &s->q_head;
    s->nfree = NBDC_SLOTS;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->send_cond, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cond, &ca);
    pthread_condattr_destroy(&ca);
    bchan_set_init(&s->chans, nbdc_breq_finished);
    bs->opaque = s;

    s->server = json_deep_copy(json_object_get(opts, "server"));
    s->export = xstrdup(opt_str(opts, "export", ""));
    const char *ctx = opt_str(opts, "x-dirty-bitmap", NULL);
    s->context = xstrdup(ctx ? ctx : "base:allocation");
    s->alloc_depth = !strcmp(s->context, "qemu:allocation-depth");
    s->reconnect_delay_ms = (uint32_t)opt_int(opts, "reconnect-delay", 0) * 1000u;
    s->no_reconnect = !strcmp(opt_str(s->server, "type", ""), "fd");
    if (s->no_reconnect)
        s->reconnect_delay_ms = 0;
    const char *host = opt_str(opts, "tls-hostname", NULL);
    if (!host && !strcmp(opt_str(s->server, "type", ""), "inet"))
        host = opt_str(s->server, "host", NULL);
    s->tls_hostname = host ? xstrdup(host) : NULL;
    if (strlen(s->export) > NBD_MAX_STRING_SIZE) {
        error_setg(errp, "export name too long to send to server");
        return -1;
    }
    if (strlen(s->context) > NBD_MAX_STRING_SIZE) {
        error_setg(errp, "x-dirty-bitmap query too long to send to server");
        return -1;
    }
    if (tls) {
        s->cfg.tls = tls_creds_lookup(tls, TLS_ENDPOINT_CLIENT, errp);
        if (!s->cfg.tls)
            return -1;
        object_ref(&s->cfg.tls->obj);
    }
    s->cfg.server = s->server;
    s->cfg.export = s->export;
    s->cfg.tls_hostname = s->tls_hostname;
    s->cfg.context = s->context;
    CLEANUP_FREE char *addr = socket_address_str(s->server);
    s->desc = xasprintf("'%s' at %s", s->export, addr);

    if (connect_first(s, (uint32_t)opt_int(opts, "open-timeout", 0), errp) < 0 ||
        check_granted(bs, s, opts, errp) < 0)
        return -1;
    s->self = nbd_server_is_peer(s->wire.fd);
    s->max_payload = NBDC_MAX_PAYLOAD;
    if (s->info.max_block)
        s->max_payload = MIN(s->max_payload, s->info.max_block);
    if (s->info.min_block > 1) {
        bs->request_alignment = s->info.min_block;
        s->max_payload -= s->max_payload % s->info.min_block;
    }
    bs->max_transfer = s->max_payload;
    bs->size = s->info.size;
    s->read_only = bs->read_only;
    s->connected = true;

    s->refs = 2;                    /* the node's and the reader's */
    if (s->stop_fd < 0 || pthread_create(&s->reader, NULL, nbdc_reader_main, s) != 0) {
        s->refs = 1;
        error_setg(errp, "Could not start the NBD client's threads");
        return -1;
    }
    s->have_reader = true;
    if (pthread_create(&s->sender, NULL, nbdc_sender_main, s) != 0) {
        error_setg(errp, "Could not start the NBD client's threads");
        return -1;
    }
    s->have_sender = true;
    return 0;
}

static void nbd_close(struct bnode *bs)
{
    struct nbd_state *s = bs->opaque;

    pthread_mutex_lock(&s->lock);
    s->closing = true;
    pthread_cond_broadcast(&s->send_cond);
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    uint64_t one = 1;
    if (s->stop_fd >= 0 && write(s->stop_fd, &one, sizeof(one)) < 0)
        log_debug("nbd: waking the reader failed: %s", strerror(errno));
    if (s->have_sender)
        pthread_join(s->sender, NULL);
    pthread_mutex_lock(&s->lock);
    if (s->wire.fd >= 0)
        shutdown(s->wire.fd, SHUT_RDWR);    /* wakes the reader */
    pthread_mutex_unlock(&s->lock);
    if (s->have_reader) {
        /* it ends at once, unless it is inside connect() to a host that does
         * not answer: then it is left to end on its own, and frees s */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 5;
        if (pthread_timedjoin_np(s->reader, NULL, &ts) != 0) {
            log_warn("nbd client of %s: still connecting; left to give up on its own",
                     s->desc);
            pthread_detach(s->reader);
        }
    }
    bs->opaque = NULL;
    nbdc_state_put(s);                   /* the reader frees it if it is last */
}

static bool nbd_can_discard(struct bnode *bs)
{
    struct nbd_state *s = bs->opaque;
    return s->info.flags & NBD_FLAG_SEND_TRIM;
}

/* block_resize: an export cannot grow; a smaller size is ignored, as
 * QEMU's nbd_co_truncate does when the size need not be exact. */
static int nbd_truncate(struct bnode *bs, uint64_t size, error **errp)
{
    struct nbd_state *s = bs->opaque;
    if (size > s->info.size) {
        error_setg(errp, "Cannot grow NBD nodes");
        return -EINVAL;
    }
    return 1;
}

/* blockdev-reopen: only read-only may change (QEMU's
 * nbd_client_reopen_prepare); the other options are checked as fixed. */
static int nbd_reopen_prepare(struct reopen_state *rs, error **errp)
{
    struct nbd_state *s = rs->bs->opaque;
    if (!rs->read_only && (s->info.flags & NBD_FLAG_READ_ONLY)) {
        error_setg(errp, "Can't reopen read-only NBD mount as read/write");
        return -1;
    }
    return 0;
}

static void nbd_reopen_commit(struct reopen_state *rs)
{
    struct nbd_state *s = rs->bs->opaque;
    pthread_mutex_lock(&s->lock);
    s->read_only = rs->read_only;       /* what a reconnection must still allow */
    pthread_mutex_unlock(&s->lock);
}

/* QEMU's nbd has no bdrv_get_info: no dirty-flag. */
static void nbd_query_info(struct bnode *bs, json_t *info)
{
    json_object_del(json_object_get(info, "image"), "dirty-flag");
}

static const char *const nbd_strong_opts[] = {
    "path", "host", "port", "export", "tls-creds", "server.", NULL
};

static const struct bdrv bdrv_nbd = {
    .name = "nbd",
    .is_protocol = true,
    .strong_opts = nbd_strong_opts,
    .filename_rule = FNAME_NBD,
    .open = nbd_open,
    .close = nbd_close,
    .submit = nbd_submit,
    .block_status = nbd_block_status,
    .flush_sync = nbd_flush_sync,
    .can_discard = nbd_can_discard,
    .query_info = nbd_query_info,
    .truncate = nbd_truncate,
    .reopen_prepare = nbd_reopen_prepare,
    .reopen_commit = nbd_reopen_commit,
};
BDRV_REGISTER(bdrv_nbd)
