/*
 * The nbd driver's connection (nbd-client.h): a sender and a reader thread.
 *
 * Theory of operation.  The sender takes wire requests from a queue and
 * writes them (a WRITE's payload straight from the submitter's buffers);
 * at most NBDC_SLOTS are in flight, so it waits for a free handle rather
 * than flood the server.  The reader reads replies (a READ's data straight
 * into the buffers, holes zeroed) and finishes each request; a breq whose
 * pieces have all finished goes back to the loop that submitted it through
 * its completion channel (bchan.h).  Loops never wait on the network.
 *
 * Replies are checked against the request they name (handle, chunk types,
 * offsets inside the request, lengths, the context id): a server that
 * breaks the protocol loses its connection, never our memory.  A reply
 * that ends while its request is still being sent (a WRITE answered before
 * its payload was read) is finished by the sender once the payload is out.
 *
 * The connection lost: requests in flight fail with EIO, unless
 * reconnect-delay is set, in which case they wait (queued again) for that
 * long while the reader reconnects; past it, they and every new request
 * fail at once until a reconnection succeeds.  The reader keeps trying,
 * 1 s apart doubling to 16 s, as QEMU's client does, and a request that
 * fails meanwhile makes it try at once; a server that comes back with
 * another size or fewer features is refused.  A server given as a file
 * descriptor (type fd) cannot be dialled again: its loss is final.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include "block/nbd-client.h"
#include "export/nbd/nbd-protocol.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/xalloc.h"

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

void nbdc_state_put(struct nbd_state *s)
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
void nbdc_enqueue(struct nbd_state *s, struct nreq *q, bool front)
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

void *nbdc_sender_main(void *opaque)
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

void *nbdc_reader_main(void *opaque)
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
                nbdc_enqueue(s, q, true);
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
    nbdc_state_put(s);
    return NULL;
}

/* Lock held: a request while the connection is down past reconnect-delay
 * fails, and makes the reader try again at once (as a request makes
 * QEMU's client try): the next one finds the server if it is back. */
int nbdc_fail_fast(struct nbd_state *s)
{
    s->kick = true;
    pthread_cond_broadcast(&s->cond);
    return -EIO;
}

struct nreq *nbdc_nreq_new(struct breq *r, uint16_t type, uint16_t flags, uint64_t off,
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

/* Zero [off, off + len) of r's buffers (a READ's part past the export). */
void nbdc_zero_buffers(struct breq *r, uint64_t off, uint64_t len)
{
    struct nreq tmp = { .breq = r };
    into_buffers(NULL, &tmp, off, len, true);
}

/* A request whose caller waits for it: NULL on timeout (abandoned). */
struct nreq *nbdc_sync_request(struct nbd_state *s, uint16_t type, uint16_t flags,
                               uint64_t off, uint32_t len, uint64_t timeout_ms)
{
    struct nreq *q = nbdc_nreq_new(NULL, type, flags, off, len, 0);
    struct timespec ts = cond_deadline(timeout_ms);
    pthread_mutex_lock(&s->lock);
    if (s->fail_fast) {
        q->err = nbdc_fail_fast(s);
        pthread_mutex_unlock(&s->lock);
        return q;
    }
    nbdc_enqueue(s, q, false);
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

