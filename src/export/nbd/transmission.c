/*
 * NBD transmission phase: requests in, replies out.
 *
 * Theory of operation.  Socket bytes are read in large chunks into c->rx and
 * parsed there, so one recv may carry many small requests; a large WRITE
 * payload is received straight into its slot's buffer.  The receive state
 * (RX_HDR / RX_PAYLOAD / RX_DRAIN plus cursors) survives short reads.
 *
 * Each request takes a preallocated slot; a header is only consumed when a
 * slot (and, for READ/WRITE, buffer budget) is available, otherwise reading
 * pauses until a slot is released.  Validation is one step
 * (request_error): a bad request is answered with the protocol's error (a
 * bad WRITE's payload is drained first), so the next step only sees valid
 * requests.  Valid requests go to the block layer asynchronously; when one
 * completes its reply is built in the slot (reply.c: headers in s->hdr, data by
 * reference) and queued, and the flush deferred to the end of the loop
 * iteration sends every queued reply in one sendmsg.  Replies therefore go
 * out in completion order, not request order.  A structured READ reply
 * describes zero 4 KiB blocks of what was read as OFFSET_HOLE chunks.  A
 * large READ of a RAM-backed file is not read at all: its reply carries the
 * file range, and the flush splices it from the page cache to the socket.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "util/cleanup.h"
#include "util/log.h"
#include "nbd-internal.h"
#include "util/xalloc.h"

/* ---- slots ---- */

/* Every slot buffer byte is reserved from the global budget first
 * (budget.c), so the bound is hard; c->buf_total is this connection's. */
static void buf_account(struct nbd_conn *c, ssize_t delta)
{
    __atomic_store_n(&c->buf_total, c->buf_total + delta, __ATOMIC_RELAXED);
    if (delta < 0)
        nbd_budget_give(-delta);
}

static size_t buf_size_for(uint32_t len)
{
    size_t want = MAX((size_t)len, (size_t)65536);
    return (want + 4095) & ~(size_t)4095;
}

static void slot_free_buf(struct nbd_slot *s)
{
    aio_fixed_release(&s->fixed);
    free(s->buf);
    s->buf = NULL;
}

/* Free the buffers of idle slots (kept for reuse) but keep. */
static void trim_idle(struct nbd_conn *c, struct nbd_slot *keep)
{
    for (struct nbd_slot *s = c->free_slots; s; s = s->next) {
        if (s == keep || !s->buf)
            continue;
        slot_free_buf(s);
        buf_account(c, -(ssize_t)s->bufsize);
        s->bufsize = 0;
    }
}

void nbd_slots_trim(struct nbd_conn *c)
{
    if (c->slots && c->state != CONN_CLOSED)
        trim_idle(c, NULL);
}

/* Give slot s a buffer of at least len bytes within both budgets.  false:
 * wait (for this connection's own completions, or on the global budget). */
static bool slot_get_buf(struct nbd_conn *c, struct nbd_slot *s, uint32_t len, bool *oom)
{
    size_t want = buf_size_for(len), grow;
    void *p;

    *oom = false;
    if (s->bufsize >= len)
        return true;
    grow = want - s->bufsize;
    if (c->buf_total + grow > NBD_CONN_BUF_BUDGET) {
        trim_idle(c, s);
        if (c->buf_total + grow > NBD_CONN_BUF_BUDGET)
            return false;          /* woken by its own slot releases */
    }
    if (!nbd_budget_take(grow)) {
        trim_idle(c, s);
        if (!nbd_budget_take(grow)) {
            nbd_budget_wait(c, grow);
            return false;
        }
    }
    if (posix_memalign(&p, 4096, want)) {
        nbd_budget_give(grow);
        *oom = true;
        return true;
    }
    slot_free_buf(s);
    __atomic_store_n(&c->buf_total, c->buf_total + grow, __ATOMIC_RELAXED);
    s->buf = p;
    s->bufsize = want;
    s->fixed = (struct aio_fixed){ .base = p, .len = want };
    return true;
}

int nbd_transmission_init(struct nbd_conn *c)
{
    c->rx = xmalloc(NBD_RX_BUF);
    c->slots = xcalloc(NBD_SLOTS, sizeof(*c->slots));
    for (int i = NBD_SLOTS - 1; i >= 0; i--) {
        c->slots[i].conn = c;
        c->slots[i].next = c->free_slots;
        c->free_slots = &c->slots[i];
    }
    c->rx_state = RX_HDR;
    return 0;
}

void nbd_slots_free(struct nbd_conn *c)
{
    if (!c->slots)
        return;
    for (int i = 0; i < NBD_SLOTS; i++) {
        slot_free_buf(&c->slots[i]);
        free(c->slots[i].ext);
    }
    buf_account(c, -(ssize_t)c->buf_total);
    free(c->slots);
    c->slots = NULL;
}

static void kick_cb(void *opaque)
{
    struct nbd_conn *c = opaque;
    nbd_transmission_readable(c);
    nbd_conn_unref(c);
}

/* Re-run the parser soon: buffered requests may wait for a free slot. */
void nbd_transmission_kick(struct nbd_conn *c)
{
    if (c->kick_defer.pending || c->state != CONN_TRANSMISSION)
        return;
    nbd_conn_ref(c);
    c->kick_defer.fn = kick_cb;
    c->kick_defer.opaque = c;
    loop_defer(c->loop, &c->kick_defer);
}

void nbd_slot_release(struct nbd_slot *s)
{
    struct nbd_conn *c = s->conn;

    if (s->bufsize > NBD_KEEP_BUF || (s->buf && nbd_budget_pressure())) {
        slot_free_buf(s);
        buf_account(c, -(ssize_t)s->bufsize);
        s->bufsize = 0;
    }
    s->state = SLOT_FREE;
    s->next = c->free_slots;
    c->free_slots = s;
    c->busy_slots--;
    if (c->rx_paused && c->state == CONN_TRANSMISSION) {
        c->rx_paused = false;
        nbd_conn_update_watch(c);
        nbd_transmission_kick(c);
    }
}

/* ---- block requests ---- */

static void submit(struct nbd_slot *s, enum breq_op op, unsigned flags);

static void breq_done(struct breq *req, int ret)
{
    struct nbd_slot *s = req->opaque;
    struct nbd_conn *c = s->conn;

    if (s->stage == 0)
        nbd_client_account(c, s->req.type, s->req.count, req->acct_lat_ns, ret);
    if (c->state == CONN_CLOSED) {
        nbd_slot_release(s);
    } else if (ret < 0) {
        nbd_reply_io_error(s, ret);
    } else if (s->req.type == NBD_CMD_TRIM && (s->req.flags & NBD_CMD_FLAG_FUA) &&
               s->stage == 0) {
        s->stage = 1;
        submit(s, BREQ_FLUSH, 0);
    } else {
        nbd_reply_success(s);
    }
    nbd_conn_unref(c);
}

static void submit(struct nbd_slot *s, enum breq_op op, unsigned flags)
{
    struct nbd_conn *c = s->conn;
    struct breq *r = &s->breq;

    memset(r, 0, sizeof(*r));
    r->op = op;
    r->flags = flags | BREQ_PEER;
    r->offset = op == BREQ_FLUSH ? 0 : s->req.offset;
    r->len = op == BREQ_FLUSH ? 0 : s->req.count;
    if (op == BREQ_READ || op == BREQ_WRITE) {
        s->data_iov.iov_base = s->buf;
        s->data_iov.iov_len = s->req.count;
        r->iov = &s->data_iov;
        r->iovcnt = 1;
        r->fixed = &s->fixed;
    }
    r->loop = c->loop;
    if (c->pool_slot >= 0 || c->iot_slot >= 0)   /* clients spread over loops: copy in this one */
        r->flags |= BREQ_COPY_INLINE;
    r->done = breq_done;
    r->opaque = s;
    s->state = SLOT_IO;
    nbd_conn_ref(c);
    bnode_submit(c->exp->common.node, r);
}

static unsigned fua_flags(struct nbd_slot *s)
{
    struct nbd_export *exp = s->conn->exp;
    return ((s->req.flags & NBD_CMD_FLAG_FUA) || exp->common.writethrough) ? BREQ_FUA : 0;
}

static void execute(struct nbd_slot *s)
{
    unsigned f;

    if (s->req.count == 0 && s->req.type != NBD_CMD_FLUSH) {
        nbd_reply_success(s);      /* nothing to do: succeed without touching the node */
        return;
    }
    switch (s->req.type) {
    case NBD_CMD_READ:
        if (!nbd_reply_read_spliced(s))
            submit(s, BREQ_READ, 0);
        break;
    case NBD_CMD_WRITE: submit(s, BREQ_WRITE, fua_flags(s)); break;
    case NBD_CMD_FLUSH: submit(s, BREQ_FLUSH, 0); break;
    case NBD_CMD_TRIM: submit(s, BREQ_DISCARD, 0); break;
    case NBD_CMD_CACHE: submit(s, BREQ_CACHE, 0); break;
    case NBD_CMD_WRITE_ZEROES:
        f = fua_flags(s);
        if (!(s->req.flags & NBD_CMD_FLAG_NO_HOLE))
            f |= BREQ_MAY_UNMAP;
        if (s->req.flags & NBD_CMD_FLAG_FAST_ZERO)
            f |= BREQ_NO_FALLBACK;
        submit(s, BREQ_WRITE_ZEROES, f);
        break;
    case NBD_CMD_BLOCK_STATUS:
        nbd_reply_block_status(s);
        break;
    }
}

/* ---- validation: one place maps every bad request to its error ----
 * Checks and messages in QEMU 7.2's order; returns the wire error. */

static uint32_t request_error(struct nbd_slot *s)
{
    struct nbd_conn *c = s->conn;
    const struct nbd_request *r = &s->req;
    struct nbd_export *exp = c->exp;
    uint64_t size = exp->common.node->size;
    uint16_t valid = NBD_CMD_FLAG_FUA;

    if (__atomic_load_n(&exp->soft, __ATOMIC_ACQUIRE))
        return nbd_slot_fail(s, NBD_ESHUTDOWN, "export is shutting down");
    if ((r->type == NBD_CMD_READ || r->type == NBD_CMD_WRITE) &&
        r->count > NBD_MAX_BUFFER_SIZE)
        return nbd_slot_fail(s, NBD_EINVAL, "len (%" PRIu32 " ) is larger than max len (%u)",
                    r->count, NBD_MAX_BUFFER_SIZE);
    if (!exp->common.writable && (r->type == NBD_CMD_WRITE || r->type == NBD_CMD_TRIM ||
                                  r->type == NBD_CMD_WRITE_ZEROES))
        return nbd_slot_fail(s, NBD_EPERM, "Export is read-only");
    if (r->offset > size || r->count > size - r->offset)
        return nbd_slot_fail(s, NBD_EINVAL, "operation past EOF; From: %" PRIu64 ", Len: %" PRIu32
                    ", Size: %" PRIu64, r->offset, r->count, size);
    /* min_block is advisory: as in QEMU, the block layer serves unaligned
     * requests (bounce buffers, read-modify-write), so they are not refused. */
    if (r->type == NBD_CMD_READ && c->structured)
        valid |= NBD_CMD_FLAG_DF;
    else if (r->type == NBD_CMD_WRITE_ZEROES)
        valid |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
    else if (r->type == NBD_CMD_BLOCK_STATUS)
        valid |= NBD_CMD_FLAG_REQ_ONE;
    if (r->flags & ~valid)
        return nbd_slot_fail(s, NBD_EINVAL, "unsupported flags for command %s (got 0x%x)",
                    nbd_cmd_name(r->type), r->flags & ~valid);
    switch (r->type) {
    case NBD_CMD_READ: case NBD_CMD_WRITE: case NBD_CMD_FLUSH: case NBD_CMD_TRIM:
    case NBD_CMD_CACHE: case NBD_CMD_WRITE_ZEROES:
        return 0;
    case NBD_CMD_BLOCK_STATUS:
        if (r->count == 0)
            return nbd_slot_fail(s, NBD_EINVAL, "need non-zero length");
        if (!c->meta_base && !c->meta_depth && !c->meta_bitmaps)
            return nbd_slot_fail(s, NBD_EINVAL, "CMD_BLOCK_STATUS not negotiated");
        return 0;
    default:
        return nbd_slot_fail(s, NBD_EINVAL, "invalid request type (%u) received", r->type);
    }
}

/* ---- receive state machine ---- */

static void parse_header(const uint8_t *p, struct nbd_request *r)
{
    memcpy(r, p, sizeof(*r));
    r->magic = be32toh(r->magic);
    r->flags = be16toh(r->flags);
    r->type = be16toh(r->type);
    /* handle stays in wire order: it is echoed untouched */
    r->offset = be64toh(r->offset);
    r->count = be32toh(r->count);
}

static bool needs_buffer(const struct nbd_request *r)
{
    return (r->type == NBD_CMD_READ || r->type == NBD_CMD_WRITE) &&
           r->count <= NBD_MAX_BUFFER_SIZE;
}

/* Start one request whose header is at rx_start; false = must wait. */
static bool start_request(struct nbd_conn *c)
{
    struct nbd_request r;
    struct nbd_slot *s = c->free_slots;
    bool oom = false;
    uint32_t err;

    parse_header(c->rx + c->rx_start, &r);
    if (r.magic != NBD_REQUEST_MAGIC) {
        nbd_conn_close(c, "bad request magic");
        return false;
    }
    if (!s || (needs_buffer(&r) && r.count && !slot_get_buf(c, s, r.count, &oom))) {
        c->rx_paused = true;
        nbd_conn_update_watch(c);
        return false;
    }
    if (r.type == NBD_CMD_WRITE && r.count > NBD_MAX_BUFFER_SIZE) {
        /* skipping up to 4 GiB is not worth it: drop the client, as QEMU */
        nbd_conn_close(c, "write request too large");
        return false;
    }
    c->rx_start += sizeof(struct nbd_request);
    if (r.type == NBD_CMD_DISC) {
        c->disc = true;
        nbd_conn_update_watch(c);
        nbd_conn_schedule_flush(c);   /* closes once idle */
        return false;
    }
    c->free_slots = s->next;
    c->busy_slots++;
    s->req = r;
    s->error = 0;
    s->errmsg[0] = 0;
    s->stage = 0;
    s->payload_got = 0;
    err = request_error(s);
    if (!err && oom)
        err = nbd_slot_fail(s, NBD_ENOMEM, "out of memory");
    if (r.type == NBD_CMD_WRITE && r.count) {
        c->rx_slot = s;
        s->state = SLOT_PAYLOAD;
        if (err) {
            c->rx_state = RX_DRAIN;
            c->drain_left = r.count;
        } else {
            c->rx_state = RX_PAYLOAD;
        }
        return true;
    }
    if (err)
        nbd_reply_error(s);
    else
        execute(s);
    return true;
}

static void payload_complete(struct nbd_conn *c)
{
    struct nbd_slot *s = c->rx_slot;

    c->rx_slot = NULL;
    c->rx_state = RX_HDR;
    if (s->error)
        nbd_reply_error(s);
    else
        execute(s);
}

static void yield_resume_cb(void *opaque)
{
    struct nbd_conn *c = opaque;

    c->rx_yield = false;
    if (c->state == CONN_TRANSMISSION) {
        nbd_conn_update_watch(c);
        nbd_transmission_readable(c);
    }
    nbd_conn_unref(c);
}

/* A client whose requests are served synchronously (BLOCK_STATUS, inline
 * copies) must not hold the loop: after NBD_SLICE_MS of parsing, the rest
 * waits for the next loop turn, after every other ready fd was served
 * (loop_call runs at the start of the next iteration). */
static bool slice_used(struct nbd_conn *c, uint64_t t0)
{
    if (now_ms() - t0 < NBD_SLICE_MS)
        return false;
    c->rx_yield = true;
    nbd_conn_update_watch(c);
    nbd_conn_ref(c);
    loop_call(c->loop, yield_resume_cb, c);
    return true;
}

/* Parse everything buffered; returns when more bytes are needed or reading
 * must pause. */
static void process_rx(struct nbd_conn *c)
{
    uint64_t t0 = now_ms();

    while (c->state == CONN_TRANSMISSION && !c->disc && !c->rx_yield && !c->quiescing) {
        size_t avail = c->rx_end - c->rx_start;

        if (c->rx_state == RX_HDR) {
            if (avail < sizeof(struct nbd_request) || c->rx_paused)
                return;
            if (!start_request(c))
                return;
            if (slice_used(c, t0))
                return;
        } else if (c->rx_state == RX_PAYLOAD) {
            struct nbd_slot *s = c->rx_slot;
            size_t take = MIN(avail, (size_t)(s->req.count - s->payload_got));
            if (take == 0)
                return;
            memcpy(s->buf + s->payload_got, c->rx + c->rx_start, take);
            s->payload_got += take;
            c->rx_start += take;
            if (s->payload_got == s->req.count)
                payload_complete(c);
        } else {
            size_t take = MIN(avail, c->drain_left);
            if (take == 0)
                return;
            c->rx_start += take;
            c->drain_left -= take;
            if (c->drain_left == 0)
                payload_complete(c);
        }
    }
}

static ssize_t recv_more(struct nbd_conn *c, size_t *asked)
{
    struct nbd_slot *s = c->rx_slot;

    if (c->rx_start == c->rx_end)
        c->rx_start = c->rx_end = 0;
    if (c->rx_state == RX_PAYLOAD && c->rx_start == c->rx_end &&
        s->req.count - s->payload_got >= NBD_DIRECT_RECV) {
        /* large payload: straight into the request buffer */
        ssize_t n;
        *asked = s->req.count - s->payload_got;
        n = c->tr->recv(c, s->buf + s->payload_got, *asked);
        if (n > 0) {
            s->payload_got += n;
            if (s->payload_got == s->req.count)
                payload_complete(c);
        }
        return n;
    }
    if (c->rx_start > 0 && c->rx_end == NBD_RX_BUF) {
        memmove(c->rx, c->rx + c->rx_start, c->rx_end - c->rx_start);
        c->rx_end -= c->rx_start;
        c->rx_start = 0;
    }
    *asked = NBD_RX_BUF - c->rx_end;
    ssize_t n = c->tr->recv(c, c->rx + c->rx_end, *asked);
    if (n > 0)
        c->rx_end += n;
    return n;
}

/* The socket is drained: if a large WRITE payload is still arriving, its
 * rest comes as fast as the client copies it in, so the loop had better
 * sleep than poll for it (loop_poll_skip). */
static void waiting_for_socket(struct nbd_conn *c)
{
    if ((c->rx_state == RX_PAYLOAD && c->rx_slot->req.count >= NBD_DIRECT_RECV) ||
        (c->rx_state == RX_DRAIN && c->drain_left >= NBD_DIRECT_RECV))
        loop_poll_skip(c->loop);
}

void nbd_transmission_readable(struct nbd_conn *c)
{
    for (int rounds = 0; rounds < 16; rounds++) {
        size_t asked;
        ssize_t n;

        process_rx(c);
        if (c->state != CONN_TRANSMISSION || c->disc || c->rx_paused || c->rx_eof ||
            c->rx_yield || c->quiescing || (c->draining && c->rx_state == RX_HDR))
            break;
        n = recv_more(c, &asked);
        if (n == -EAGAIN) {
            waiting_for_socket(c);
            break;
        }
        if (n == 0) {
            /* the client may have only shut down its sending side: answer
             * what it sent in full, forget a request it sent in part */
            c->rx_eof = true;
            if (c->rx_slot) {
                nbd_slot_release(c->rx_slot);
                c->rx_slot = NULL;
                c->rx_state = RX_HDR;
            }
            nbd_conn_update_watch(c);
            nbd_conn_schedule_flush(c);   /* closes once idle */
            break;
        }
        if (n < 0) {
            nbd_conn_close(c, "read error");
            break;
        }
        if ((size_t)n < asked) {
            process_rx(c);
            if (c->state == CONN_TRANSMISSION)
                waiting_for_socket(c);
            break;
        }
    }
}
