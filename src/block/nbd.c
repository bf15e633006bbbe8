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
 * its exports).  Then two threads own the connection: the sender
 * takes requests from a queue and writes them (a WRITE's payload straight
 * from the submitter's buffers), the reader reads replies (a READ's data
 * straight into them) and hands each finished request back to the loop
 * that submitted it through its completion channel (bchan.h).  Loops never
 * wait on the network.  A request is split into wire requests of at most
 * the server's maximum block (32 MiB without one); at most NBDC_SLOTS are in
 * flight, so the sender waits for a free handle rather than flooding the
 * server.  Replies are checked against the request they name (handle,
 * offsets, lengths, chunk types): a server that breaks the protocol loses
 * its connection, never our memory.
 *
 * The connection lost: requests in flight fail with EIO, unless
 * reconnect-delay is set, in which case they wait (queued again) for that
 * long while the reader reconnects; past it, they and every new request
 * fail at once until a reconnection succeeds.  The reader keeps trying,
 * 1 s apart doubling to 16 s, as QEMU's client does; a server that comes
 * back with another size or fewer features is refused.  A server given as
 * a file descriptor (type fd) cannot be dialled again: its loss is final.
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

#define NBDC_SLOTS        64            /* wire requests in flight */
#define NBDC_MAX_PAYLOAD  (32u << 20)   /* READ/WRITE without a server maximum */
#define NBDC_MAX_RANGE    (1u << 30)    /* TRIM/WRITE_ZEROES/CACHE/BLOCK_STATUS */
#define NBDC_ZERO_CHUNK   (1u << 20)    /* write zeroes emulated by writes */
#define NBDC_STATUS_MS    10000
#define NBDC_HANDSHAKE_MS 30000
#define NBDC_BACKOFF_MAX_MS 16000

/* One request on the wire. */
struct nreq {
    struct nreq *next;              /* in the queue */
    uint16_t type, flags;
    uint64_t offset;
    uint32_t len;
    uint64_t handle;
    bool zeroes;                    /* a WRITE of zeros (no WRITE_ZEROES on the server) */
    struct breq *breq;              /* NULL: a synchronous request */
    uint64_t boff;                  /* READ/WRITE: its first byte in breq's buffers */
    int err;
    bool in_send;                   /* the sender is writing it (lock) */
    bool replied;                   /* ... and its reply ended meanwhile: the sender finishes it */
    /* synchronous requests (under the lock) */
    bool done, abandoned;
    bool have_extent;
    uint32_t ext_len, ext_flags;
};

struct nbd_state {
    struct nbdc_cfg cfg;
    json_t *server;
    char *export, *tls_hostname, *context;
    char *desc;                     /* for log lines: server address and export */
    bool read_only;                 /* the node's, at open */
    bool alloc_depth;               /* x-dirty-bitmap=qemu:allocation-depth */
    uint32_t reconnect_delay_ms;
    bool no_reconnect;              /* server type fd: that socket was all there was */
    struct nbdc_info info;
    bool self;                      /* the server is this process */
    uint32_t max_payload;
    struct bchan_set chans;

    pthread_mutex_t lock;
    pthread_cond_t send_cond;       /* sender: work, a slot, a connection, closing */
    pthread_cond_t cond;            /* sync requests done, sender idle, reader's backoff */
    struct nbdc_wire wire;          /* fd -1: none */
    bool connected;
    bool fail_fast;                 /* lost past reconnect-delay: fail at once */
    bool kick;                      /* a request failed so: try reconnecting now */
    bool closing;
    bool sending;                   /* the sender uses wire outside the lock */
    struct nreq *q_head, **q_tail;
    struct nreq *slots[NBDC_SLOTS];
    unsigned nfree;
    uint64_t gen;
    int refs;                       /* the node, the reader thread */
    pthread_t sender, reader;
    bool have_sender, have_reader;
    int stop_fd;                    /* eventfd: closing, stop reconnecting */
};

enum { PHASE_OP, PHASE_FUA_FLUSH };

static const uint8_t zero_buf[64 << 10];

static int wire_errno(uint32_t e)
{
    switch (e) {
    case NBD_EPERM: return -EPERM;
    case NBD_EIO: return -EIO;
    case NBD_ENOMEM: return -ENOMEM;
    case NBD_ENOSPC: return -ENOSPC;
    case NBD_EOVERFLOW: return -EOVERFLOW;
    case NBD_ENOTSUP: return -ENOTSUP;
    case NBD_ESHUTDOWN: return -ESHUTDOWN;
    default: return -EINVAL;        /* EINVAL, and what we do not know */
    }
}

/* ms from now on CLOCK_MONOTONIC, the clock s->cond waits on. */
static struct timespec cond_deadline(uint64_t ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    return ts;
}

static void state_put(struct nbd_state *s)
{
    pthread_mutex_lock(&s->lock);
    bool last = --s->refs == 0;
    pthread_mutex_unlock(&s->lock);
    if (!last)
        return;
    nbdc_wire_close(&s->wire);
    if (s->stop_fd >= 0)
        close(s->stop_fd);
    if (s->cfg.tls)
        object_unref(&s->cfg.tls->obj);
    json_decref(s->server);
    free(s->export);
    free(s->tls_hostname);
    free(s->context);
    free(s->desc);
    bchan_set_destroy(&s->chans);
    pthread_cond_destroy(&s->send_cond);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

/* ---- finishing requests ---- */

/* In the submitting loop: a breq all of whose wire requests finished. */
static void breq_finished(struct breq *r);

/* Lock held.  q is out of the queue and the slots. */
static void nreq_finish(struct nbd_state *s, struct nreq *q, int err)
{
    if (!q->breq) {
        if (q->abandoned) {
            free(q);
            return;
        }
        q->err = err;
        q->done = true;
        pthread_cond_broadcast(&s->cond);
        return;
    }
    struct breq *r = q->breq;
    if (err) {
        int64_t zero = 0;
        __atomic_compare_exchange_n(&r->aio.res, &zero, (int64_t)err, false,
                                    __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    }
    free(q);
    if (__atomic_sub_fetch(&r->pending, 1, __ATOMIC_ACQ_REL) == 0)
        bchan_push(r->chan, r, __atomic_load_n(&r->aio.res, __ATOMIC_RELAXED));
}

static void fail_queue(struct nbd_state *s, int err)
{
    while (s->q_head) {
        struct nreq *q = s->q_head;
        s->q_head = q->next;
        nreq_finish(s, q, err);
    }
    s->q_tail = &s->q_head;
}

/* Lock held: queue q (at the front: a request sent before a reconnection). */
static void enqueue(struct nbd_state *s, struct nreq *q, bool front)
{
    if (front) {
        q->next = s->q_head;
        if (!s->q_head)
            s->q_tail = &q->next;
        s->q_head = q;
    } else {
        q->next = NULL;
        *s->q_tail = q;
        s->q_tail = &q->next;
    }
    pthread_cond_signal(&s->send_cond);
}

/* Lock held: q's reply ended; its handle is free again. */
static void complete_locked(struct nbd_state *s, struct nreq *q)
{
    s->slots[q->handle & 0xff] = NULL;
    s->nfree++;
    pthread_cond_signal(&s->send_cond);
    nreq_finish(s, q, q->err);
}

/* ---- sender ---- */

/* The pieces of [off, off + len) of r's buffers, in out (room for
 * r->iovcnt entries); how many. */
static int buffer_range(const struct breq *r, uint64_t off, uint64_t len, struct iovec *out)
{
    const struct iovec *iov = r->iov;
    int i = 0, n = 0;

    while (i < r->iovcnt && off >= iov[i].iov_len)
        off -= iov[i++].iov_len;
    for (; len && i < r->iovcnt; i++, off = 0) {
        size_t k = MIN(len, iov[i].iov_len - off);
        out[n++] = (struct iovec){ (char *)iov[i].iov_base + off, k };
        len -= k;
    }
    return n;
}

/* A WRITE: the header, then q's part of its breq's buffers, or zeros. */
static int send_payload(struct nbdc_wire *w, struct nreq *q, struct iovec *hdr)
{
    size_t zpieces = (q->len + sizeof(zero_buf) - 1) / sizeof(zero_buf);
    size_t max = 1 + (q->zeroes ? zpieces : (size_t)q->breq->iovcnt);
    CLEANUP_FREE struct iovec *v = xmalloc(max * sizeof(*v));
    int n = 1;

    v[0] = *hdr;
    if (q->zeroes) {
        for (uint64_t left = q->len; left; left -= v[n++].iov_len)
            v[n] = (struct iovec){ (void *)zero_buf, MIN(left, sizeof(zero_buf)) };
    } else {
        n += buffer_range(q->breq, q->boff, q->len, v + 1);
    }
    return nbdc_wire_send(w, v, n, 0);
}

static int send_req(struct nbdc_wire *w, struct nreq *q)
{
    struct nbd_request req = {
        .magic = htobe32(NBD_REQUEST_MAGIC), .flags = htobe16(q->flags),
        .type = htobe16(q->type), .handle = htobe64(q->handle),
        .offset = htobe64(q->offset), .count = htobe32(q->len),
    };
    struct iovec hdr = { &req, sizeof(req) };
    if (q->type == NBD_CMD_WRITE)
        return send_payload(w, q, &hdr);
    return nbdc_wire_send(w, &hdr, 1, 0);
}

static void *sender_main(void *opaque)
{
    struct nbd_state *s = opaque;

    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->closing && !(s->connected && s->q_head && s->nfree))
            pthread_cond_wait(&s->send_cond, &s->lock);
        if (s->closing)
            break;
        struct nreq *q = s->q_head;
        s->q_head = q->next;
        if (!s->q_head)
            s->q_tail = &s->q_head;
        unsigned i = 0;
        while (s->slots[i])
            i++;
        s->slots[i] = q;
        s->nfree--;
        q->handle = (++s->gen << 8) | i;
        q->in_send = true;
        struct nbdc_wire w = s->wire;
        s->sending = true;
        pthread_mutex_unlock(&s->lock);
        int r = send_req(&w, q);
        pthread_mutex_lock(&s->lock);
        s->sending = false;
        q->in_send = false;
        if (q->replied)
            complete_locked(s, q);      /* a server that answered before reading it all */
        if (r < 0 && s->connected)
            shutdown(w.fd, SHUT_RDWR);      /* the reader takes it from here */
        pthread_cond_broadcast(&s->cond);
    }
    if (s->connected && s->nfree == NBDC_SLOTS) {
        struct nbd_request req = {
            .magic = htobe32(NBD_REQUEST_MAGIC), .type = htobe16(NBD_CMD_DISC),
        };
        struct iovec v = { &req, sizeof(req) };
        nbdc_wire_send(&s->wire, &v, 1, now_ms() + 1000);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

/* ---- reader ---- */

static struct nreq *lookup(struct nbd_state *s, uint64_t handle)
{
    unsigned i = handle & 0xff;
    pthread_mutex_lock(&s->lock);
    struct nreq *q = i < NBDC_SLOTS ? s->slots[i] : NULL;
    if (q && q->handle != handle)
        q = NULL;
    pthread_mutex_unlock(&s->lock);
    return q;
}

/* The reply to q ended.  While the sender still writes q (a server may
 * answer a WRITE before reading its payload), the sender finishes it: its
 * buffers stay the request's until then. */
static void complete(struct nbd_state *s, struct nreq *q)
{
    pthread_mutex_lock(&s->lock);
    if (q->in_send)
        q->replied = true;
    else
        complete_locked(s, q);
    pthread_mutex_unlock(&s->lock);
}

static int skip_bytes(struct nbdc_wire *w, uint64_t len)
{
    char buf[4096];
    while (len) {
        size_t n = MIN(len, sizeof(buf));
        int r = nbdc_wire_recv(w, buf, n, 0);
        if (r < 0)
            return r;
        len -= n;
    }
    return 0;
}

/* Read len bytes into q's part of its breq's buffers at off (or zero them). */
static int into_buffers(struct nbdc_wire *w, struct nreq *q, uint64_t off, uint64_t len,
                        bool zero)
{
    CLEANUP_FREE struct iovec *v = xmalloc(q->breq->iovcnt * sizeof(*v));
    int n = buffer_range(q->breq, q->boff + off, len, v);

    for (int i = 0; i < n; i++) {
        if (zero) {
            memset(v[i].iov_base, 0, v[i].iov_len);
        } else {
            int r = nbdc_wire_recv(w, v[i].iov_base, v[i].iov_len, 0);
            if (r < 0)
                return r;
        }
    }
    return 0;
}

/* A reply that breaks the protocol: the connection goes. */
#define PROTO(fmt, ...) do {                                                        \
        log_warn("nbd client of %s: " fmt, s->desc, ##__VA_ARGS__);                 \
        return -EPROTO;                                                             \
    } while (0)

static int read_simple(struct nbd_state *s, struct nbdc_wire *w)
{
    struct nbd_simple_reply rep;
    int r = nbdc_wire_recv(w, (char *)&rep + 4, sizeof(rep) - 4, 0);
    if (r < 0)
        return r;
    struct nreq *q = lookup(s, be64toh(rep.handle));
    if (!q)
        PROTO("server sent a reply with an unknown handle");
    uint32_t err = be32toh(rep.error);
    if (err) {
        q->err = wire_errno(err);
    } else if (q->type == NBD_CMD_READ) {
        if (s->info.structured)
            PROTO("server sent a simple reply to a READ after agreeing to structured replies");
        r = into_buffers(w, q, 0, q->len, false);
        if (r < 0)
            return r;
    }
    complete(s, q);
    return 0;
}

static int read_chunk(struct nbd_state *s, struct nbdc_wire *w)
{
    struct nbd_structured_reply rep;
    int r = nbdc_wire_recv(w, (char *)&rep + 4, sizeof(rep) - 4, 0);
    if (r < 0)
        return r;
    uint16_t flags = be16toh(rep.flags), type = be16toh(rep.type);
    uint32_t len = be32toh(rep.length);
    struct nreq *q = lookup(s, be64toh(rep.handle));
    if (!q)
        PROTO("server sent a reply with an unknown handle");
    if (!s->info.structured)
        PROTO("server sent a structured reply it did not agree to");

    switch (type) {
    case NBD_REPLY_TYPE_NONE:
        if (len || !(flags & NBD_REPLY_FLAG_DONE))
            PROTO("malformed NONE chunk");
        break;
    case NBD_REPLY_TYPE_OFFSET_DATA:
    case NBD_REPLY_TYPE_OFFSET_HOLE: {
        bool hole = type == NBD_REPLY_TYPE_OFFSET_HOLE;
        uint64_t off;
        uint32_t n;
        if (q->type != NBD_CMD_READ || len < 8 + (hole ? 4 : 1) || (hole && len != 12))
            PROTO("malformed data chunk");
        if ((r = nbdc_wire_recv(w, &off, 8, 0)) < 0)
            return r;
        off = be64toh(off);
        if (hole) {
            if ((r = nbdc_wire_recv(w, &n, 4, 0)) < 0)
                return r;
            n = be32toh(n);
        } else {
            n = len - 8;
        }
        if (off < q->offset || n > q->len || off - q->offset > q->len - n || n == 0)
            PROTO("data chunk outside its request");
        r = into_buffers(w, q, off - q->offset, n, hole);
        if (r < 0)
            return r;
        break;
    }
    case NBD_REPLY_TYPE_BLOCK_STATUS: {
        uint32_t ctx, ext[2];
        if (q->type != NBD_CMD_BLOCK_STATUS || len < 12 || (len - 4) % 8)
            PROTO("malformed block status chunk");
        if ((r = nbdc_wire_recv(w, &ctx, 4, 0)) < 0 || (r = nbdc_wire_recv(w, ext, 8, 0)) < 0)
            return r;
        if (be32toh(ctx) != s->info.context_id)
            PROTO("block status for a context not asked for");
        if ((r = skip_bytes(w, len - 12)) < 0)
            return r;
        pthread_mutex_lock(&s->lock);
        if (!q->have_extent) {
            q->have_extent = true;
            q->ext_len = be32toh(ext[0]);
            q->ext_flags = be32toh(ext[1]);
        }
        pthread_mutex_unlock(&s->lock);
        break;
    }
    default: {
        if (!(type & (1u << 15)))
            PROTO("unknown chunk type %u", type);
        struct nbd_chunk_error e;
        if (len < sizeof(e))
            PROTO("malformed error chunk");
        if ((r = nbdc_wire_recv(w, &e, sizeof(e), 0)) < 0)
            return r;
        uint16_t mlen = be16toh(e.len);
        if (mlen > len - sizeof(e) || !e.error)
            PROTO("malformed error chunk");
        if ((r = skip_bytes(w, len - sizeof(e))) < 0)
            return r;
        if (!q->err)
            q->err = wire_errno(be32toh(e.error));
        break;
    }
    }
    if (flags & NBD_REPLY_FLAG_DONE)
        complete(s, q);
    return 0;
}

static int read_reply(struct nbd_state *s, struct nbdc_wire *w)
{
    uint32_t magic;
    int r = nbdc_wire_recv(w, &magic, 4, 0);
    if (r < 0)
        return r;
    if (be32toh(magic) == NBD_SIMPLE_REPLY_MAGIC)
        return read_simple(s, w);
    if (be32toh(magic) == NBD_STRUCTURED_REPLY_MAGIC)
        return read_chunk(s, w);
    PROTO("bad reply magic 0x%x", be32toh(magic));
}

/* The server we reconnected to serves what we opened. */
static bool same_export(struct nbd_state *s, const struct nbdc_info *ni, bool read_only,
                        error **errp)
{
    if (ni->size != s->info.size) {
        error_setg(errp, "the export's size changed from %" PRIu64 " to %" PRIu64,
                   s->info.size, ni->size);
        return false;
    }
    if ((ni->flags & NBD_FLAG_READ_ONLY) && !read_only) {
        error_setg(errp, "the export is read-only now");
        return false;
    }
    if (ni->structured != s->info.structured || ni->have_context != s->info.have_context) {
        error_setg(errp, "the server no longer offers what it did");
        return false;
    }
    return true;
}

static void *reader_main(void *opaque)
{
    struct nbd_state *s = opaque;
    const char *node = s->desc;

    pthread_mutex_lock(&s->lock);
    while (!s->closing) {
        struct nbdc_wire w = s->wire;
        pthread_mutex_unlock(&s->lock);
        int r;
        do {
            r = read_reply(s, &w);
        } while (r == 0);
        pthread_mutex_lock(&s->lock);
        if (!s->closing)
            log_warn("nbd client of %s: the connection to the server is lost (%s)", node,
                     strerror(-r));
        s->connected = false;
        shutdown(w.fd, SHUT_RDWR);
        while (s->sending)
            pthread_cond_wait(&s->cond, &s->lock);
        nbdc_wire_close(&s->wire);
        uint64_t lost_at = now_ms();
        /* what was in flight: sent again after a reconnection, or failed */
        for (unsigned i = 0; i < NBDC_SLOTS; i++) {
            struct nreq *q = s->slots[i];
            if (!q)
                continue;
            s->slots[i] = NULL;
            s->nfree++;
            if (!s->closing && s->reconnect_delay_ms) {
                q->err = 0;
                q->have_extent = false;
                enqueue(s, q, true);
            } else {
                nreq_finish(s, q, -EIO);
            }
        }
        if (!s->reconnect_delay_ms) {
            s->fail_fast = true;
            fail_queue(s, -EIO);
        }
        uint64_t backoff = 1000;
        if (s->no_reconnect) {
            s->fail_fast = true;
            fail_queue(s, -EIO);
            while (!s->closing)
                pthread_cond_wait(&s->cond, &s->lock);
        }
        while (!s->closing) {
            if (!s->fail_fast && now_ms() >= lost_at + s->reconnect_delay_ms) {
                s->fail_fast = true;
                fail_queue(s, -EIO);
            }
            bool ro = s->read_only;
            pthread_mutex_unlock(&s->lock);
            error *err = NULL;
            struct nbdc_wire nw;
            struct nbdc_info ni;
            r = nbdc_connect(&s->cfg, &nw, &ni, now_ms() + NBDC_HANDSHAKE_MS, s->stop_fd, &err);
            if (r == 0 && !same_export(s, &ni, ro, &err)) {
                nbdc_wire_close(&nw);
                r = -EINVAL;
            }
            pthread_mutex_lock(&s->lock);
            if (r == 0) {
                if (s->closing) {
                    nbdc_wire_close(&nw);
                    break;
                }
                s->wire = nw;
                s->info.context_id = ni.context_id;
                s->connected = true;
                s->fail_fast = false;
                log_info("nbd client of %s: reconnected", node);
                pthread_cond_broadcast(&s->send_cond);
                break;
            }
            log_debug("nbd client of %s: reconnecting failed: %s", node,
                      err ? err->msg : "");
            error_free(err);
            uint64_t until = now_ms() + backoff;
            if (!s->fail_fast)
                until = MIN(until, lost_at + s->reconnect_delay_ms);
            struct timespec ts = cond_deadline(until > now_ms() ? until - now_ms() : 0);
            s->kick = false;
            while (!s->closing && !s->kick &&
                   pthread_cond_timedwait(&s->cond, &s->lock, &ts) != ETIMEDOUT)
                ;
            backoff = s->kick ? 1000 : MIN(backoff * 2, (uint64_t)NBDC_BACKOFF_MAX_MS);
        }
    }
    fail_queue(s, -EIO);
    pthread_mutex_unlock(&s->lock);
    state_put(s);
    return NULL;
}

/* ---- requests ---- */

/* Lock held: a request while the connection is down past reconnect-delay
 * fails, and makes the reader try again at once (as a request makes
 * QEMU's client try): the next one finds the server if it is back. */
static int fail_fast(struct nbd_state *s)
{
    s->kick = true;
    pthread_cond_broadcast(&s->cond);
    return -EIO;
}

static struct nreq *nreq_new(struct breq *r, uint16_t type, uint16_t flags, uint64_t off,
                             uint32_t len, uint64_t boff)
{
    struct nreq *q = xzalloc(sizeof(*q));
    q->type = type;
    q->flags = flags;
    q->offset = off;
    q->len = len;
    q->breq = r;
    q->boff = boff;
    return q;
}

/* Queue the wire requests of r for [off, off+len) in pieces of at most
 * max bytes; r->pending counts those not finished. */
static void queue_pieces(struct nbd_state *s, struct breq *r, uint16_t type, uint16_t flags,
                         uint64_t off, uint64_t len, uint32_t max, bool zeroes)
{
    for (uint64_t done = 0; done < len;) {
        uint32_t n = (uint32_t)MIN(len - done, (uint64_t)max);
        struct nreq *q = nreq_new(r, type, flags, off + done, n, done);
        q->zeroes = zeroes;
        __atomic_add_fetch(&r->pending, 1, __ATOMIC_RELAXED);
        enqueue(s, q, false);
        done += n;
    }
}

/* A request without a range (FLUSH). */
static void queue_one(struct nbd_state *s, struct breq *r, uint16_t type)
{
    __atomic_add_fetch(&r->pending, 1, __ATOMIC_RELAXED);
    enqueue(s, nreq_new(r, type, 0, 0, 0, 0), false);
}

/* Lock held: the wire requests for r at offset (or -errno to fail it). */
static int start_op(struct nbd_state *s, struct bnode *bs, struct breq *r, uint64_t offset,
                    int phase)
{
    uint16_t eflags = s->info.flags;
    uint64_t len = r->len, size = s->info.size;
    uint32_t range = NBDC_MAX_RANGE;
    bool fua = (r->flags & BREQ_FUA) && !bs->cache_no_flush;

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
            struct nreq tmp = { .breq = r, .boff = 0 };
            into_buffers(NULL, &tmp, keep, len - keep, true);
            len = keep;
        }
        queue_pieces(s, r, NBD_CMD_READ, 0, offset, len, s->max_payload, false);
        return 0;
    case BREQ_WRITE:
        if (offset + len > size)
            return -EIO;
        queue_pieces(s, r, NBD_CMD_WRITE,
                     fua && (eflags & NBD_FLAG_SEND_FUA) ? NBD_CMD_FLAG_FUA : 0, offset, len,
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
        uint16_t f = fua && (eflags & NBD_FLAG_SEND_FUA) ? NBD_CMD_FLAG_FUA : 0;
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
    int ret = s->fail_fast ? fail_fast(s) : start_op(s, bs, r, r->drv_offset, phase);
    pthread_mutex_unlock(&s->lock);
    if (ret < 0) {
        /* nothing was queued for r */
        breq_complete(r, ret);
        return;
    }
    if (__atomic_sub_fetch(&r->pending, 1, __ATOMIC_ACQ_REL) == 0)
        breq_finished(r);           /* nothing to send, or all done already */
}

static void breq_finished(struct breq *r)
{
    struct bnode *bs = r->bs;
    struct nbd_state *s = bs->opaque;
    int ret = (int)r->aio.res;

    if (ret == 0 && r->stage == PHASE_OP && (r->flags & BREQ_FUA) && !bs->cache_no_flush &&
        (r->op == BREQ_WRITE || r->op == BREQ_WRITE_ZEROES) &&
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

/* A request whose caller waits for it: NULL on timeout (abandoned). */
static struct nreq *sync_request(struct nbd_state *s, uint16_t type, uint16_t flags,
                                 uint64_t off, uint32_t len, uint64_t timeout_ms)
{
    struct nreq *q = nreq_new(NULL, type, flags, off, len, 0);
    struct timespec ts = cond_deadline(timeout_ms);
    pthread_mutex_lock(&s->lock);
    if (s->fail_fast) {
        q->err = fail_fast(s);
        pthread_mutex_unlock(&s->lock);
        return q;
    }
    enqueue(s, q, false);
    while (!q->done) {
        if (pthread_cond_timedwait(&s->cond, &s->lock, &ts) == ETIMEDOUT && !q->done) {
            q->abandoned = true;    /* freed when it finishes */
            q = NULL;
            break;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return q;
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
    struct nreq *q = sync_request(s, NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, offset,
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
    struct nreq *q = sync_request(s, NBD_CMD_FLUSH, 0, 0, 0, NBDC_HANDSHAKE_MS);
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
    bchan_set_init(&s->chans, breq_finished);
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
    if (s->stop_fd < 0 || pthread_create(&s->reader, NULL, reader_main, s) != 0) {
        s->refs = 1;
        error_setg(errp, "Could not start the NBD client's threads");
        return -1;
    }
    s->have_reader = true;
    if (pthread_create(&s->sender, NULL, sender_main, s) != 0) {
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
    state_put(s);                   /* the reader frees it if it is last */
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
