/*
 * The NBD client's side of the fixed-newstyle handshake (proto.md), with
 * blocking I/O bounded by a deadline: STARTTLS when TLS is configured,
 * structured replies, the block status context, then NBD_OPT_GO asking
 * for block sizes (NBD_OPT_EXPORT_NAME where the server lacks GO or fixed
 * newstyle).  Errors are worded as QEMU 7.2's client words them.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "block/nbd-client.h"
#include "export/nbd/nbd-protocol.h"
#include "util/cleanup.h"
#include "block/block.h"
#include "util/loop.h"
#include "util/sockets.h"
#include "util/xalloc.h"

#define NBD_OLDSTYLE_MAGIC UINT64_C(0x0000420281861253)

/* ---- the wire ---- */

static int wait_fd(int fd, int cancel_fd, short events, uint64_t deadline_ms)
{
    for (;;) {
        int timeout = -1;
        if (deadline_ms) {
            uint64_t now = now_ms();
            if (now >= deadline_ms)
                return -ETIMEDOUT;
            timeout = (int)MIN(deadline_ms - now, (uint64_t)INT_MAX);
        }
        struct pollfd p[2] = { { .fd = fd, .events = events },
                               { .fd = cancel_fd, .events = POLLIN } };
        int r = poll(p, cancel_fd >= 0 ? 2 : 1, timeout);
        if (r > 0 && p[1].revents && cancel_fd >= 0)
            return -ECANCELED;
        if (r > 0)
            return 0;
        if (r < 0 && errno != EINTR)
            return -errno;
    }
}

int nbdc_wire_send(struct nbdc_wire *w, const struct iovec *iov_in, int iovcnt,
                   uint64_t deadline_ms)
{
    struct iovec local[64];
    int done = 0;

    /* a copy we can advance, in pieces of at most 64 entries */
    while (done < iovcnt) {
        int n = MIN(iovcnt - done, 64);
        memcpy(local, iov_in + done, n * sizeof(*local));
        done += n;
        struct iovec *v = local;
        while (n > 0) {
            ssize_t r;
            if (v->iov_len == 0) {
                v++, n--;
                continue;
            }
            if (w->tls) {
                r = tls_session_sendv(w->tls, v, n);
            } else {
                struct msghdr msg = { .msg_iov = v, .msg_iovlen = n };
                r = sendmsg(w->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (r < 0)
                    r = errno == EWOULDBLOCK ? -EAGAIN : -errno;
            }
            if (r == -EINTR)
                continue;
            if (r == -EAGAIN) {
                int e = wait_fd(w->fd, w->cancel_fd, POLLOUT, deadline_ms);
                if (e < 0)
                    return e;
                continue;
            }
            if (r < 0)
                return r;
            while (r > 0 && n > 0) {
                size_t k = MIN((size_t)r, v->iov_len);
                v->iov_base = (char *)v->iov_base + k;
                v->iov_len -= k;
                r -= k;
                if (v->iov_len == 0)
                    v++, n--;
            }
        }
    }
    return 0;
}

int nbdc_wire_recv(struct nbdc_wire *w, void *buf, size_t len, uint64_t deadline_ms)
{
    size_t got = 0;

    while (got < len) {
        ssize_t r;
        short ev = POLLIN;
        if (w->tls) {
            r = tls_session_recv(w->tls, (char *)buf + got, len - got);
            if (r == -EAGAIN)
                ev = tls_session_wait_events(w->tls) == LOOP_OUT ? POLLOUT : POLLIN;
        } else {
            r = recv(w->fd, (char *)buf + got, len - got, MSG_DONTWAIT);
            if (r < 0)
                r = errno == EWOULDBLOCK ? -EAGAIN : -errno;
        }
        if (r == 0)
            return -ECONNRESET;
        if (r == -EINTR)
            continue;
        if (r == -EAGAIN) {
            int e = wait_fd(w->fd, w->cancel_fd, ev, deadline_ms);
            if (e < 0)
                return e;
            continue;
        }
        if (r < 0)
            return (int)r;
        got += r;
    }
    return 0;
}

void nbdc_wire_close(struct nbdc_wire *w)
{
    if (w->tls) {
        tls_session_bye(w->tls);
        tls_session_free(w->tls);
        w->tls = NULL;
    }
    if (w->fd >= 0)
        close(w->fd);
    w->fd = -1;
}

/* ---- options ---- */

struct hs {
    const struct nbdc_cfg *cfg;
    struct nbdc_wire *w;
    struct nbdc_info *info;
    uint64_t deadline;
    error **errp;
};

static const char *opt_name(uint32_t opt)
{
    switch (opt) {
    case NBD_OPT_EXPORT_NAME: return "export name";
    case NBD_OPT_ABORT: return "abort";
    case NBD_OPT_LIST: return "list";
    case NBD_OPT_STARTTLS: return "starttls";
    case NBD_OPT_INFO: return "info";
    case NBD_OPT_GO: return "go";
    case NBD_OPT_STRUCTURED_REPLY: return "structured reply";
    case NBD_OPT_LIST_META_CONTEXT: return "list meta context";
    case NBD_OPT_SET_META_CONTEXT: return "set meta context";
    default: return "<unknown>";
    }
}

static int io_fail(struct hs *h, int r, const char *what)
{
    if (r == -ECONNRESET)
        error_setg(h->errp, "%s: Unexpected end-of-file before all data were read", what);
    else if (r == -ETIMEDOUT)
        error_setg(h->errp, "%s: the server did not answer in time", what);
    else if (r == -ECANCELED)
        error_setg(h->errp, "%s: the node is closing", what);
    else
        error_setg_errno(h->errp, -r, "%s", what);
    return r;
}

static int hs_recv(struct hs *h, void *buf, size_t len, const char *what)
{
    int r = nbdc_wire_recv(h->w, buf, len, h->deadline);
    return r < 0 ? io_fail(h, r, what) : 0;
}

static int hs_send(struct hs *h, const struct iovec *iov, int n, const char *what)
{
    int r = nbdc_wire_send(h->w, iov, n, h->deadline);
    return r < 0 ? io_fail(h, r, what) : 0;
}

static int opt_send(struct hs *h, uint32_t opt, const void *data, uint32_t len)
{
    struct nbd_option_hdr hdr = {
        .version = htobe64(NBD_OPTS_MAGIC), .option = htobe32(opt), .length = htobe32(len),
    };
    struct iovec iov[2] = { { &hdr, sizeof(hdr) }, { (void *)data, len } };
    return hs_send(h, iov, len ? 2 : 1, "Failed to send option request header");
}

/* Best effort: tell the server we are leaving. */
static void opt_abort(struct hs *h)
{
    struct nbd_option_hdr hdr = {
        .version = htobe64(NBD_OPTS_MAGIC), .option = htobe32(NBD_OPT_ABORT),
    };
    struct iovec iov = { &hdr, sizeof(hdr) };
    nbdc_wire_send(h->w, &iov, 1, now_ms() + 1000);
}

struct opt_reply {
    uint32_t type;
    uint32_t len;
};

static int reply_hdr(struct hs *h, uint32_t opt, struct opt_reply *r)
{
    struct nbd_fixed_new_option_reply rep;
    if (hs_recv(h, &rep, sizeof(rep), "Failed to read option reply") < 0)
        return -EIO;
    if (be64toh(rep.magic) != NBD_REP_MAGIC) {
        error_setg(h->errp, "Unexpected option reply magic");
        return -EINVAL;
    }
    if (be32toh(rep.option) != opt) {
        error_setg(h->errp, "Unexpected option type %u (%s), expected %u (%s)",
                   be32toh(rep.option), opt_name(be32toh(rep.option)), opt, opt_name(opt));
        return -EINVAL;
    }
    r->type = be32toh(rep.reply);
    r->len = be32toh(rep.replylen);
    if (r->len > NBD_MAX_BUFFER_SIZE) {
        error_setg(h->errp, "server's reply to option %u (%s) is too long", opt, opt_name(opt));
        return -EINVAL;
    }
    return 0;
}

static int skip(struct hs *h, uint32_t len)
{
    char buf[4096];
    while (len) {
        uint32_t n = MIN(len, (uint32_t)sizeof(buf));
        if (hs_recv(h, buf, n, "Failed to read option reply") < 0)
            return -EIO;
        len -= n;
    }
    return 0;
}

/* An error reply (its payload still to read).  Returns 0 for
 * NBD_REP_ERR_UNSUP, and for any error of an option that is not strict
 * (one the client can do without, as QEMU's nbd_handle_reply_err): the
 * caller goes on without it.  Else -errno with the error set. */
static int reply_err(struct hs *h, uint32_t opt, const struct opt_reply *r, bool strict)
{
    if (skip(h, r->len) < 0)        /* the message: QEMU only hints it */
        return -EIO;
    if (!(r->type & (1u << 31))) {
        error_setg(h->errp, "Unexpected reply type %u to option %u (%s)", r->type, opt,
                   opt_name(opt));
        return -EINVAL;
    }
    if (r->type == NBD_REP_ERR_UNSUP || !strict)
        return 0;
    switch (r->type) {
    case NBD_REP_ERR_POLICY:
        error_setg(h->errp, "Denied by server for option %u (%s)", opt, opt_name(opt));
        break;
    case NBD_REP_ERR_INVALID:
        error_setg(h->errp, "Invalid parameters for option %u (%s)", opt, opt_name(opt));
        break;
    case NBD_REP_ERR_PLATFORM:
        error_setg(h->errp, "Server lacks support for option %u (%s)", opt, opt_name(opt));
        break;
    case NBD_REP_ERR_TLS_REQD:
        error_setg(h->errp, "TLS negotiation required before option %u (%s)", opt,
                   opt_name(opt));
        break;
    case NBD_REP_ERR_UNKNOWN:
        error_setg(h->errp, "Requested export not available");
        break;
    case NBD_REP_ERR_SHUTDOWN:
        error_setg(h->errp, "Server shutting down before option %u (%s)", opt, opt_name(opt));
        break;
    case NBD_REP_ERR_BLOCK_SIZE_REQD:
        error_setg(h->errp, "Server requires INFO_BLOCK_SIZE for option %u (%s)", opt,
                   opt_name(opt));
        break;
    default:
        error_setg(h->errp, "Unknown error code when asking for option %u (%s)", opt,
                   opt_name(opt));
        break;
    }
    opt_abort(h);
    return -EINVAL;
}

/* An option answered by ACK alone: 1 = acked, 0 = not supported. */
static int simple_option(struct hs *h, uint32_t opt, bool strict)
{
    struct opt_reply r;
    if (opt_send(h, opt, NULL, 0) < 0 || reply_hdr(h, opt, &r) < 0)
        return -EIO;
    if (r.type == NBD_REP_ACK) {
        if (r.len) {
            error_setg(h->errp, "Option %u (%s) reply had unexpected payload", opt,
                       opt_name(opt));
            return -EINVAL;
        }
        return 1;
    }
    int e = reply_err(h, opt, &r, strict);
    return e < 0 ? e : 0;
}

/* ---- steps ---- */

static int start_tls(struct hs *h)
{
    int r = simple_option(h, NBD_OPT_STARTTLS, true);
    if (r < 0)
        return r;
    if (r == 0) {
        error_setg(h->errp, "Server don't support STARTTLS option");
        opt_abort(h);
        return -EINVAL;
    }
    h->w->tls = tls_session_new_client(h->cfg->tls, h->w->fd, h->cfg->tls_hostname, h->errp);
    if (!h->w->tls)
        return -EINVAL;
    for (;;) {
        r = tls_session_handshake(h->w->tls, h->errp);
        if (r == 0)
            break;
        if (r != -EAGAIN)
            return -EIO;
        short ev = tls_session_wait_events(h->w->tls) == LOOP_OUT ? POLLOUT : POLLIN;
        int e = wait_fd(h->w->fd, h->w->cancel_fd, ev, h->deadline);
        if (e < 0)
            return io_fail(h, e, "TLS handshake failed");
    }
    return tls_session_check_peer(h->w->tls, NULL, h->errp) < 0 ? -EINVAL : 0;
}

static int set_meta_context(struct hs *h)
{
    const char *exp = h->cfg->export, *ctx = h->cfg->context;
    uint32_t el = strlen(exp), cl = strlen(ctx);
    size_t len = 4 + el + 4 + 4 + cl;
    CLEANUP_FREE uint8_t *buf = xmalloc(len);
    uint8_t *p = buf;
    uint32_t v;

    v = htobe32(el); memcpy(p, &v, 4); p += 4;
    memcpy(p, exp, el); p += el;
    v = htobe32(1); memcpy(p, &v, 4); p += 4;
    v = htobe32(cl); memcpy(p, &v, 4); p += 4;
    memcpy(p, ctx, cl);
    if (opt_send(h, NBD_OPT_SET_META_CONTEXT, buf, len) < 0)
        return -EIO;
    for (;;) {
        struct opt_reply r;
        if (reply_hdr(h, NBD_OPT_SET_META_CONTEXT, &r) < 0)
            return -EIO;
        if (r.type == NBD_REP_ACK)
            return r.len ? skip(h, r.len) : 0;
        if (r.type != NBD_REP_META_CONTEXT) {
            int e = reply_err(h, NBD_OPT_SET_META_CONTEXT, &r, false);
            return e;       /* 0: unsupported, no context */
        }
        if (r.len < 4 || r.len > 4 + NBD_MAX_STRING_SIZE) {
            error_setg(h->errp, "Failed to read meta context reply");
            return -EINVAL;
        }
        CLEANUP_FREE char *name = xzalloc(r.len - 4 + 1);
        uint32_t id;
        if (hs_recv(h, &id, 4, "Failed to read context id") < 0 ||
            hs_recv(h, name, r.len - 4, "Failed to read context name") < 0)
            return -EIO;
        if (strcmp(name, ctx)) {
            error_setg(h->errp, "Unexpected context name: %s", name);
            return -EINVAL;
        }
        if (h->info->have_context) {
            error_setg(h->errp, "Server replied with more than one context");
            return -EINVAL;
        }
        h->info->have_context = true;
        h->info->context_id = be32toh(id);
    }
}

/* 1 done, 0 GO not supported, < 0 error */
static int opt_go(struct hs *h)
{
    const char *exp = h->cfg->export;
    uint32_t el = strlen(exp);
    size_t len = 4 + el + 2 + 2;
    CLEANUP_FREE uint8_t *buf = xmalloc(len);
    uint32_t v = htobe32(el);
    uint16_t n = htobe16(1), bs = htobe16(NBD_INFO_BLOCK_SIZE);
    bool have_export = false;

    memcpy(buf, &v, 4);
    memcpy(buf + 4, exp, el);
    memcpy(buf + 4 + el, &n, 2);
    memcpy(buf + 6 + el, &bs, 2);
    if (opt_send(h, NBD_OPT_GO, buf, len) < 0)
        return -EIO;
    for (;;) {
        struct opt_reply r;
        if (reply_hdr(h, NBD_OPT_GO, &r) < 0)
            return -EIO;
        if (r.type == NBD_REP_ACK) {
            if (r.len && skip(h, r.len) < 0)
                return -EIO;
            if (!have_export) {
                error_setg(h->errp, "broken server omitted NBD_INFO_EXPORT");
                return -EINVAL;
            }
            return 1;
        }
        if (r.type != NBD_REP_INFO) {
            int e = reply_err(h, NBD_OPT_GO, &r, true);
            return e;
        }
        uint16_t type;
        if (r.len < 2) {
            error_setg(h->errp, "NBD_REP_INFO length %u is too short", r.len);
            return -EINVAL;
        }
        if (hs_recv(h, &type, 2, "Failed to read info type") < 0)
            return -EIO;
        type = be16toh(type);
        if (type == NBD_INFO_EXPORT) {
            struct { uint64_t size; uint16_t flags; } __attribute__((packed)) e;
            if (r.len != 2 + sizeof(e)) {
                error_setg(h->errp, "remaining export info len %u is unexpected size",
                           r.len - 2);
                return -EINVAL;
            }
            if (hs_recv(h, &e, sizeof(e), "Failed to read info size") < 0)
                return -EIO;
            h->info->size = be64toh(e.size);
            h->info->flags = be16toh(e.flags);
            have_export = true;
        } else if (type == NBD_INFO_BLOCK_SIZE) {
            uint32_t b[3];
            if (r.len != 2 + sizeof(b)) {
                error_setg(h->errp, "remaining export info len %u is unexpected size",
                           r.len - 2);
                return -EINVAL;
            }
            if (hs_recv(h, b, sizeof(b), "Failed to read info block sizes") < 0)
                return -EIO;
            h->info->min_block = be32toh(b[0]);
            h->info->pref_block = be32toh(b[1]);
            h->info->max_block = be32toh(b[2]);
        } else if (skip(h, r.len - 2) < 0) {
            return -EIO;
        }
    }
}

static int opt_export_name(struct hs *h, bool no_zeroes)
{
    struct nbd_export_name_reply rep;
    char zeroes[124];

    if (opt_send(h, NBD_OPT_EXPORT_NAME, h->cfg->export, strlen(h->cfg->export)) < 0)
        return -EIO;
    if (hs_recv(h, &rep, sizeof(rep), "Failed to read export length") < 0)
        return -EIO;
    if (!no_zeroes && hs_recv(h, zeroes, sizeof(zeroes), "Failed to read reserved block") < 0)
        return -EIO;
    h->info->size = be64toh(rep.exportsize);
    h->info->flags = be16toh(rep.eflags);
    return 0;
}

static bool pow2(uint32_t v) { return v && !(v & (v - 1)); }

static int check_info(struct hs *h)
{
    struct nbdc_info *i = h->info;
    if (i->min_block &&
        (!pow2(i->min_block) || i->min_block > (64u << 10) ||
         (i->max_block && (i->max_block < i->min_block || i->max_block % i->min_block)))) {
        error_setg(h->errp, "server has invalid block sizes %u/%u/%u", i->min_block,
                   i->pref_block, i->max_block);
        return -EINVAL;
    }
    if (i->size > (uint64_t)BNODE_MAX_LENGTH) {
        error_setg(h->errp, "server export size %" PRIu64 " is too large", i->size);
        return -EINVAL;
    }
    return 0;
}

static int negotiate(struct hs *h)
{
    struct { uint64_t magic, opts; } __attribute__((packed)) m;
    uint16_t gflags;

    if (hs_recv(h, &m.magic, 8, "Failed to read initial magic") < 0)
        return -EIO;
    if (be64toh(m.magic) != NBD_MAGIC) {
        error_setg(h->errp, "Bad initial magic received: 0x%" PRIx64, be64toh(m.magic));
        return -EINVAL;
    }
    if (hs_recv(h, &m.opts, 8, "Failed to read server magic") < 0)
        return -EIO;
    if (be64toh(m.opts) == NBD_OLDSTYLE_MAGIC) {
        error_setg(h->errp, "Server is using the oldstyle protocol, which bexd does not "
                   "speak");
        return -EINVAL;
    }
    if (be64toh(m.opts) != NBD_OPTS_MAGIC) {
        error_setg(h->errp, "Bad server magic received: 0x%" PRIx64, be64toh(m.opts));
        return -EINVAL;
    }
    if (hs_recv(h, &gflags, 2, "Failed to read server flags") < 0)
        return -EIO;
    gflags = be16toh(gflags);
    bool fixed = gflags & NBD_FLAG_FIXED_NEWSTYLE, no_zeroes = gflags & NBD_FLAG_NO_ZEROES;
    uint32_t cflags = htobe32((fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) |
                              (no_zeroes ? NBD_FLAG_C_NO_ZEROES : 0));
    struct iovec iov = { &cflags, 4 };
    if (hs_send(h, &iov, 1, "Failed to send clientFlags field") < 0)
        return -EIO;
    if (h->cfg->tls) {
        if (!fixed) {
            error_setg(h->errp, "Server does not support STARTTLS");
            return -EINVAL;
        }
        int r = start_tls(h);
        if (r < 0)
            return r;
    }
    if (!fixed)
        return opt_export_name(h, no_zeroes);
    int r = simple_option(h, NBD_OPT_STRUCTURED_REPLY, false);
    if (r < 0)
        return r;
    h->info->structured = r == 1;
    if (h->info->structured) {
        r = set_meta_context(h);
        if (r < 0)
            return r;
    }
    r = opt_go(h);
    if (r < 0)
        return r;
    if (r == 0)
        return opt_export_name(h, no_zeroes);
    return 0;
}

int nbdc_connect(const struct nbdc_cfg *cfg, struct nbdc_wire *w, struct nbdc_info *info,
                 uint64_t deadline_ms, int cancel_fd, error **errp)
{
    struct hs h = { .cfg = cfg, .w = w, .info = info, .deadline = deadline_ms, .errp = errp };

    memset(info, 0, sizeof(*info));
    w->tls = NULL;
    w->cancel_fd = cancel_fd;
    w->fd = socket_connect(cfg->server, errp);
    if (w->fd < 0)
        return -ECONNREFUSED;
    int r = negotiate(&h);
    if (r == 0)
        r = check_info(&h);
    if (r < 0) {
        nbdc_wire_close(w);
        return r;
    }
    w->cancel_fd = -1;              /* the transmission phase is woken by shutdown() */
    return 0;
}
