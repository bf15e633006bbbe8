/*
 * NBD replies: how each request is answered on the wire.
 *
 * Theory of operation.  A reply is built in its request's slot: the
 * headers in s->hdr, the data by reference (the slot's buffer, the extents
 * array, or a file range to splice), listed in s->iov, then queued on the
 * connection, whose flush at the end of the loop iteration sends every
 * queued reply in one sendmsg (conn.c).  Without structured replies every
 * answer is a simple reply.  With them, a READ is OFFSET_DATA chunks, and
 * OFFSET_HOLE chunks for the zero 4 KiB blocks of what was read unless the
 * client asked DF; an error is an ERROR chunk carrying QEMU's message
 * (nbd_slot_fail sets it, with the wire error); BLOCK_STATUS is one chunk
 * per negotiated context.  Errnos reach the wire through one mapping,
 * nbd_errno_to_wire.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include "nbd-internal.h"
#include "util/xalloc.h"

/* The one errno -> NBD error mapping. */
uint32_t nbd_errno_to_wire(int err)
{
    switch (err) {
    case 0: return NBD_SUCCESS;
    case EPERM: case EROFS: return NBD_EPERM;
    case EIO: return NBD_EIO;
    case ENOMEM: return NBD_ENOMEM;
    case ENOSPC: case EDQUOT: case EFBIG: return NBD_ENOSPC;
    case EOVERFLOW: return NBD_EOVERFLOW;
    case ENOTSUP: return NBD_ENOTSUP;
#if EOPNOTSUPP != ENOTSUP
    case EOPNOTSUPP: return NBD_ENOTSUP;
#endif
    case ESHUTDOWN: return NBD_ESHUTDOWN;
    default: return NBD_EINVAL;
    }
}

/* ---- replies ---- */

static void *hdr_alloc(struct nbd_slot *s, size_t len)
{
    void *p = s->hdr + s->hdr_used;
    s->hdr_used += len;
    return p;
}

static void iov_add(struct nbd_slot *s, void *base, size_t len)
{
    s->iov[s->iovcnt].iov_base = base;
    s->iov[s->iovcnt].iov_len = len;
    s->iovcnt++;
}

static void queue_reply(struct nbd_slot *s)
{
    struct nbd_conn *c = s->conn;

    if (c->state == CONN_CLOSED) {
        nbd_slot_release(s);
        return;
    }
    s->state = SLOT_REPLY;
    s->next = NULL;
    if (c->reply_tail)
        c->reply_tail->next = s;
    else
        c->reply_head = s;
    c->reply_tail = s;
    nbd_conn_schedule_flush(c);
}

static void reply_start(struct nbd_slot *s)
{
    s->hdr_used = 0;
    s->iovcnt = 0;
    s->splice_len = 0;
}

static void add_simple(struct nbd_slot *s, uint32_t err)
{
    struct nbd_simple_reply *r = hdr_alloc(s, sizeof(*r));
    r->magic = htobe32(NBD_SIMPLE_REPLY_MAGIC);
    r->error = htobe32(err);
    r->handle = s->req.handle;   /* kept in wire order */
    iov_add(s, r, sizeof(*r));
}

static struct nbd_structured_reply *add_chunk(struct nbd_slot *s, uint16_t type,
                                              uint32_t len, size_t extra)
{
    struct nbd_structured_reply *r = hdr_alloc(s, sizeof(*r) + extra);
    r->magic = htobe32(NBD_STRUCTURED_REPLY_MAGIC);
    r->flags = 0;
    r->type = htobe16(type);
    r->handle = s->req.handle;
    r->length = htobe32(len);
    iov_add(s, r, sizeof(*r) + extra);
    return r;
}

static void set_done(struct nbd_structured_reply *r)
{
    r->flags = htobe16(NBD_REPLY_FLAG_DONE);
}

static void add_error_chunk(struct nbd_slot *s, uint32_t err)
{
    size_t mlen = strnlen(s->errmsg, sizeof(s->errmsg));
    struct nbd_structured_reply *r = add_chunk(s, NBD_REPLY_TYPE_ERROR,
                                               sizeof(struct nbd_chunk_error) + mlen,
                                               sizeof(struct nbd_chunk_error) + mlen);
    struct nbd_chunk_error *e = (void *)(r + 1);
    e->error = htobe32(err);
    e->len = htobe16(mlen);
    memcpy(e + 1, s->errmsg, mlen);
    set_done(r);
}

uint32_t nbd_slot_fail(struct nbd_slot *s, uint32_t err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
uint32_t nbd_slot_fail(struct nbd_slot *s, uint32_t err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->errmsg, sizeof(s->errmsg), fmt, ap);
    va_end(ap);
    s->error = err;
    return err;
}

const char *nbd_cmd_name(uint16_t type)
{
    static const char *names[] = {
        [NBD_CMD_READ] = "read", [NBD_CMD_WRITE] = "write", [NBD_CMD_DISC] = "disconnect",
        [NBD_CMD_FLUSH] = "flush", [NBD_CMD_TRIM] = "trim", [NBD_CMD_CACHE] = "cache",
        [NBD_CMD_WRITE_ZEROES] = "write zeroes", [NBD_CMD_BLOCK_STATUS] = "block status",
    };
    return type < ARRAY_SIZE(names) ? names[type] : "<unknown>";
}

static const char *io_failure(uint16_t type)
{
    switch (type) {
    case NBD_CMD_READ: return "reading from file failed";
    case NBD_CMD_FLUSH: return "flush failed";
    case NBD_CMD_TRIM: return "discard failed";
    case NBD_CMD_CACHE: return "prefetch failed";
    case NBD_CMD_WRITE_ZEROES: return "writing to file failed";
    case NBD_CMD_BLOCK_STATUS: return "can't get block status";
    default: return "writing to file failed";
    }
}

/* Any command's error reply: an error chunk when structured replies were
 * negotiated (as QEMU), else a simple reply. */
void nbd_reply_error(struct nbd_slot *s)
{
    reply_start(s);
    if (s->conn->structured)
        add_error_chunk(s, s->error);
    else
        add_simple(s, s->error);
    queue_reply(s);
}

/* A failed block request's reply, with QEMU's message for its command. */
void nbd_reply_io_error(struct nbd_slot *s, int ret)
{
    nbd_slot_fail(s, nbd_errno_to_wire(-ret), "%s", io_failure(s->req.type));
    nbd_reply_error(s);
}

/* The header of an OFFSET_DATA chunk; its len bytes of data follow. */
static struct nbd_structured_reply *add_data_header(struct nbd_slot *s, uint64_t off,
                                                    uint32_t len)
{
    struct nbd_structured_reply *r = add_chunk(s, NBD_REPLY_TYPE_OFFSET_DATA,
                                               8 + len, 8);
    uint64_t be = htobe64(off);
    memcpy(r + 1, &be, 8);
    return r;
}

static struct nbd_structured_reply *add_data_chunk(struct nbd_slot *s, uint64_t off,
                                                   char *data, uint32_t len)
{
    struct nbd_structured_reply *r = add_data_header(s, off, len);
    iov_add(s, data, len);
    return r;
}

static struct nbd_structured_reply *add_hole_chunk(struct nbd_slot *s, uint64_t off,
                                                   uint32_t len)
{
    struct nbd_structured_reply *r = add_chunk(s, NBD_REPLY_TYPE_OFFSET_HOLE,
                                               sizeof(struct nbd_chunk_offset_hole),
                                               sizeof(struct nbd_chunk_offset_hole));
    struct nbd_chunk_offset_hole *h = (void *)(r + 1);
    h->offset = htobe64(off);
    h->length = htobe32(len);
    return r;
}

static bool block_is_zero(const char *p, size_t len)
{
    static const char zero[4096];
    /* random data fails on the first word: this costs almost nothing */
    return len <= sizeof(zero) && memcmp(p, zero, len) == 0;
}

/* Split the data just read into runs of data and of zeros (4 KiB blocks,
 * aligned to the export), at most max runs; zeros go out as OFFSET_HOLE
 * chunks, which is what a hole reads as.  Scanning what was read is cheaper
 * than asking the file system (SEEK_HOLE is linear in file size on tmpfs)
 * and also finds zeros that were written. */
static int read_runs(const char *buf, uint64_t off, uint32_t len,
                     uint32_t *run_len, bool *run_zero, int max)
{
    uint32_t pos = 0;
    int n = 0;

    while (pos < len) {
        uint32_t blk = 4096 - ((off + pos) & 4095);
        bool zero;

        blk = MIN(blk, len - pos);
        zero = blk == 4096 && block_is_zero(buf + pos, blk);
        if (n > 0 && run_zero[n - 1] == zero) {
            run_len[n - 1] += blk;
        } else if (n == max) {
            run_zero[n - 1] = false;   /* out of chunks: the rest is data */
            run_len[n - 1] += len - pos;
            return n;
        } else {
            run_len[n] = blk;
            run_zero[n] = zero;
            n++;
        }
        pos += blk;
    }
    return n;
}

static void reply_read(struct nbd_slot *s)
{
    struct nbd_conn *c = s->conn;
    uint64_t off = s->req.offset;
    uint32_t len = s->req.count;
    uint32_t run_len[NBD_MAX_READ_CHUNKS];
    bool run_zero[NBD_MAX_READ_CHUNKS];
    struct nbd_structured_reply *last = NULL;
    uint32_t pos = 0;
    int n = 1;

    reply_start(s);
    if (!c->structured) {
        add_simple(s, 0);
        iov_add(s, s->buf, len);
        queue_reply(s);
        return;
    }
    if (len == 0) {                 /* one NONE chunk, as QEMU */
        set_done(add_chunk(s, NBD_REPLY_TYPE_NONE, 0, 0));
        queue_reply(s);
        return;
    }
    run_len[0] = len;
    run_zero[0] = false;
    if (!(s->req.flags & NBD_CMD_FLAG_DF))
        n = read_runs(s->buf, off, len, run_len, run_zero, NBD_MAX_READ_CHUNKS);
    for (int i = 0; i < n; i++) {
        if (run_zero[i])
            last = add_hole_chunk(s, off + pos, run_len[i]);
        else
            last = add_data_chunk(s, off + pos, s->buf + pos, run_len[i]);
        pos += run_len[i];
    }
    set_done(last);
    queue_reply(s);
}

/* The client's counters (one writer: this loop; main reads them). */
void nbd_client_account(struct nbd_conn *c, uint16_t type, uint64_t bytes, uint64_t ns,
                           int ret)
{
    enum client_op op = type == NBD_CMD_READ ? CLIENT_OP_READ
                      : type == NBD_CMD_WRITE || type == NBD_CMD_WRITE_ZEROES ? CLIENT_OP_WRITE
                      : type == NBD_CMD_FLUSH ? CLIENT_OP_FLUSH : CLIENT_OP_OTHER;

    client_stats_account(&c->st, op, bytes, ns, ret);
}

/* A large READ of a RAM-backed file: the page cache goes to the socket by
 * reference (splice), never copied here.  Where holes must show as holes
 * (structured replies without DF), only ranges known to hold none are
 * spliced; zeros that were written are then sent as data, which is what
 * QEMU does too. */
bool nbd_reply_read_spliced(struct nbd_slot *s)
{
    struct nbd_conn *c = s->conn;
    bool need_holes = c->structured && !(s->req.flags & NBD_CMD_FLAG_DF);
    uint64_t foff;
    int fd;

    if (s->req.count < NBD_SPLICE_MIN ||
        bnode_splice_source(c->exp->common.node, s->req.offset, s->req.count, need_holes,
                            &fd, &foff) < 0 ||
        !nbd_conn_can_splice(c))
        return false;
    reply_start(s);
    if (c->structured)
        set_done(add_data_header(s, s->req.offset, s->req.count));
    else
        add_simple(s, 0);
    s->splice_fd = fd;
    s->splice_off = foff;
    s->splice_len = s->req.count;
    bnode_account_read(c->exp->common.node, s->req.count);
    nbd_client_account(c, NBD_CMD_READ, s->req.count, 0, 0);
    /* counted before any byte leaves, so a client that has its reply sees
     * it in the counter (tests prove the splice path with it) */
    client_stats_spliced(&c->st, s->req.count);
    queue_reply(s);
    return true;
}

void nbd_reply_block_status(struct nbd_slot *s)
{
    struct nbd_conn *c = s->conn;
    bool req_one = s->req.flags & NBD_CMD_FLAG_REQ_ONE;
    int ids[NBD_MAX_CONTEXTS], nctx = 0;
    struct nbd_structured_reply *last = NULL;

    if (c->meta_base)
        ids[nctx++] = NBD_META_ID_BASE_ALLOCATION;
    if (c->meta_depth)
        ids[nctx++] = NBD_META_ID_ALLOCATION_DEPTH;
    for (int i = 0; i < c->exp->nbitmaps; i++)
        if (c->meta_bitmaps & (1u << i))
            ids[nctx++] = NBD_META_ID_DIRTY_BITMAP + i;
    if (!s->ext) {
        /* sized for this connection's contexts, fixed since NBD_OPT_GO */
        s->ext = xmalloc(sizeof(*s->ext) * NBD_MAX_EXTENTS * nctx);
    }
    reply_start(s);
    for (int i = 0; i < nctx; i++) {
        struct nbd_block_descriptor *ext = s->ext + i * NBD_MAX_EXTENTS;
        int n = nbd_block_status_extents(c->exp, ids[i], s->req.offset, s->req.count,
                                         req_one, ext, NBD_MAX_EXTENTS);
        if (n < 0) {
            nbd_reply_io_error(s, n);
            return;
        }
        last = add_chunk(s, NBD_REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n, 4);
        uint32_t id = htobe32(ids[i]);
        memcpy(last + 1, &id, 4);
        iov_add(s, ext, 8 * n);
    }
    set_done(last);
    queue_reply(s);
}

void nbd_reply_success(struct nbd_slot *s)
{
    if (s->req.type == NBD_CMD_READ) {
        reply_read(s);
        return;
    }
    reply_start(s);
    add_simple(s, 0);
    queue_reply(s);
}
