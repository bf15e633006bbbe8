/*
 * NBD fixed-newstyle handshake (option haggling), in the main loop.
 *
 * Theory of operation.  The server greets with NBDMAGIC/IHAVEOPT and its
 * flags; then a small receive state machine reads exactly the bytes each
 * step needs into hs_buf (client flags, an option header, an option
 * payload), so a short read only moves a cursor and nothing is read past
 * the handshake.  Each option is answered into the output buffer and
 * flushed at once.  NBD_OPT_EXPORT_NAME and NBD_OPT_GO end the handshake
 * by attaching the connection to its export.  Every length the client
 * sends is bounded; the whole handshake is bounded in time by a timer that
 * drops the client.
 */
#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "util/cleanup.h"
#include "util/log.h"
#include "nbd-internal.h"
#include "util/xalloc.h"

enum { HS_FLAGS, HS_OPT_HDR, HS_OPT_DATA, HS_OPT_DRAIN, HS_DONE };

static void hs_timeout(void *opaque)
{
    struct nbd_conn *c = opaque;
    nbd_conn_close(c, "handshake timed out");
}

void nbd_handshake_start(struct nbd_conn *c)
{
    struct nbd_new_handshake g = {
        .nbdmagic = htobe64(NBD_MAGIC),
        .version = htobe64(NBD_OPTS_MAGIC),
        .gflags = htobe16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES),
    };

    c->hs_state = HS_FLAGS;
    c->hs_have = 0;
    if (nbd_srv.handshake_ms) {
        c->hs_timer = loop_timer_new(loop_main(), hs_timeout, c);
        loop_timer_arm(c->hs_timer, nbd_srv.handshake_ms);
    }
    if (nbd_out_append(c, &g, sizeof(g)) < 0) {
        nbd_conn_close(c, "out of memory");
        return;
    }
    nbd_conn_flush(c);
}

/* ---- option replies ---- */

int nbd_opt_reply(struct nbd_conn *c, uint32_t opt, uint32_t type,
                  const void *data, uint32_t len)
{
    struct nbd_fixed_new_option_reply r = {
        .magic = htobe64(NBD_REP_MAGIC), .option = htobe32(opt),
        .reply = htobe32(type), .replylen = htobe32(len),
    };
    if (nbd_out_append(c, &r, sizeof(r)) < 0 ||
        (len && nbd_out_append(c, data, len) < 0))
        return -ENOMEM;
    return 0;
}

int nbd_opt_error(struct nbd_conn *c, uint32_t opt, uint32_t type, const char *fmt, ...)
{
    char msg[NBD_MAX_STRING_SIZE];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof(msg))
        n = sizeof(msg) - 1;
    log_debug("nbd: option %u refused: %s", opt, msg);
    return nbd_opt_reply(c, opt, type, msg, n);
}

/* ---- options ---- */

static uint16_t hs_eflags(struct nbd_conn *c, struct nbd_export *exp)
{
    return exp->eflags | (c->structured ? NBD_FLAG_SEND_DF : 0);
}

static void opt_export_name(struct nbd_conn *c, const uint8_t *data, uint32_t len)
{
    char name[NBD_MAX_STRING_SIZE + 1];
    uint8_t zeroes[124] = { 0 };
    struct nbd_export *exp;
    struct nbd_export_name_reply r;

    memcpy(name, data, len);
    name[len] = 0;
    exp = nbd_export_lookup(name);
    if (!exp) {
        nbd_conn_close(c, "unknown export (NBD_OPT_EXPORT_NAME)");
        return;
    }
    c->eflags = hs_eflags(c, exp);
    r.exportsize = htobe64(exp->common.node->size);
    r.eflags = htobe16(c->eflags);
    if (nbd_out_append(c, &r, sizeof(r)) < 0 ||
        (!c->no_zeroes && nbd_out_append(c, zeroes, sizeof(zeroes)) < 0)) {
        nbd_conn_close(c, "out of memory");
        return;
    }
    c->hs_state = HS_DONE;
    nbd_conn_attach(c, exp);
}

static void opt_list(struct nbd_conn *c, uint32_t len)
{
    if (len) {
        nbd_opt_error(c, NBD_OPT_LIST, NBD_REP_ERR_INVALID, "option '%s' has unexpected length",
                      nbd_opt_name(NBD_OPT_LIST));
        return;
    }
    for (struct nbd_export *e = nbd_export_first(); e; e = e->next) {
        size_t nl, dl;
        uint32_t be;
        CLEANUP_FREE uint8_t *buf = NULL;

        if (e->hidden)
            continue;
        nl = strlen(e->name);
        dl = e->description ? strlen(e->description) : 0;
        buf = xmalloc(4 + nl + dl);
        be = htobe32(nl);
        memcpy(buf, &be, 4);
        memcpy(buf + 4, e->name, nl);
        if (dl)
            memcpy(buf + 4 + nl, e->description, dl);
        nbd_opt_reply(c, NBD_OPT_LIST, NBD_REP_SERVER, buf, 4 + nl + dl);
    }
    nbd_opt_reply(c, NBD_OPT_LIST, NBD_REP_ACK, NULL, 0);
}

static void send_info_string(struct nbd_conn *c, uint32_t opt, uint16_t type, const char *s)
{
    size_t n = strlen(s);
    CLEANUP_FREE uint8_t *buf = xmalloc(2 + n);
    uint16_t be = htobe16(type);

    memcpy(buf, &be, 2);
    memcpy(buf + 2, s, n);
    nbd_opt_reply(c, opt, NBD_REP_INFO, buf, 2 + n);
}

/* QEMU's reading of a name (u32 length + bytes) from an option payload:
 * returns false after answering the error. */
bool nbd_opt_take_name(struct nbd_conn *c, uint32_t opt, const uint8_t **p,
                       uint32_t *left, char name[NBD_MAX_STRING_SIZE + 1])
{
    uint32_t nlen;

    if (*left < 4) {
        nbd_opt_error(c, opt, NBD_REP_ERR_INVALID, "Inconsistent lengths in option %s",
                      nbd_opt_name(opt));
        return false;
    }
    memcpy(&nlen, *p, 4);
    nlen = be32toh(nlen);
    *p += 4;
    *left -= 4;
    if (nlen > NBD_MAX_STRING_SIZE) {
        nbd_opt_error(c, opt, NBD_REP_ERR_INVALID, "Invalid name length: %u", nlen);
        return false;
    }
    if (nlen > *left) {
        nbd_opt_error(c, opt, NBD_REP_ERR_INVALID, "Inconsistent lengths in option %s",
                      nbd_opt_name(opt));
        return false;
    }
    memcpy(name, *p, nlen);
    name[nlen] = 0;
    *p += nlen;
    *left -= nlen;
    return true;
}

static void opt_info_go(struct nbd_conn *c, uint32_t opt, const uint8_t *data, uint32_t len)
{
    char name[NBD_MAX_STRING_SIZE + 1];
    bool want_name = false, want_bs = false;
    struct nbd_export *exp;
    const uint8_t *p = data;
    uint32_t left = len;
    uint16_t nreq;

    if (!nbd_opt_take_name(c, opt, &p, &left, name))
        return;
    if (left < 2) {
        nbd_opt_error(c, opt, NBD_REP_ERR_INVALID, "Inconsistent lengths in option %s",
                      nbd_opt_name(opt));
        return;
    }
    memcpy(&nreq, p, 2);
    nreq = be16toh(nreq);
    p += 2;
    left -= 2;
    if (left != 2u * nreq) {
        nbd_opt_error(c, opt, NBD_REP_ERR_INVALID, "Inconsistent lengths in option %s",
                      nbd_opt_name(opt));
        return;
    }
    for (uint16_t i = 0; i < nreq; i++) {
        uint16_t t;
        memcpy(&t, p + 2 * i, 2);
        switch (be16toh(t)) {
        case NBD_INFO_NAME: want_name = true; break;
        case NBD_INFO_BLOCK_SIZE: want_bs = true; break;
        default: break;   /* DESCRIPTION is sent anyway; unknown ones ignored */
        }
    }
    exp = nbd_export_lookup(name);
    if (!exp) {
        nbd_opt_error(c, opt, NBD_REP_ERR_UNKNOWN, "export '%s' not present", name);
        return;
    }
    if (opt == NBD_OPT_INFO && !want_bs && exp->min_block > 1) {
        nbd_opt_error(c, opt, NBD_REP_ERR_BLOCK_SIZE_REQD,
                      "request NBD_INFO_BLOCK_SIZE to use this export");
        return;
    }
    if (want_name)
        send_info_string(c, opt, NBD_INFO_NAME, exp->name);
    if (exp->description)
        send_info_string(c, opt, NBD_INFO_DESCRIPTION, exp->description);
    struct nbd_info_block_size bs = {
        .info = htobe16(NBD_INFO_BLOCK_SIZE), .minimum = htobe32(exp->min_block),
        .preferred = htobe32(MAX(4096u, exp->min_block)), .maximum = htobe32(exp->max_block),
    };
    nbd_opt_reply(c, opt, NBD_REP_INFO, &bs, sizeof(bs));
    struct nbd_info_export ie = {
        .info = htobe16(NBD_INFO_EXPORT), .exportsize = htobe64(exp->common.node->size),
        .eflags = htobe16(hs_eflags(c, exp)),
    };
    nbd_opt_reply(c, opt, NBD_REP_INFO, &ie, sizeof(ie));
    nbd_opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
    if (opt == NBD_OPT_GO) {
        c->eflags = hs_eflags(c, exp);
        if (c->meta_exp != exp || !c->structured) {
            c->meta_base = c->meta_depth = false;
            c->meta_bitmaps = 0;
        }
        c->meta_depth = c->meta_depth && exp->alloc_depth;
        c->hs_state = HS_DONE;
        nbd_conn_attach(c, exp);
    }
}

static void opt_structured(struct nbd_conn *c, uint32_t len)
{
    if (len) {
        nbd_opt_error(c, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_INVALID,
                      "option '%s' has unexpected length", nbd_opt_name(NBD_OPT_STRUCTURED_REPLY));
    } else if (c->structured) {
        nbd_opt_error(c, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_INVALID,
                      "structured reply already negotiated");
    } else {
        c->structured = true;
        nbd_opt_reply(c, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NULL, 0);
    }
}

const char *nbd_opt_name(uint32_t opt)
{
    static const char *names[] = {
        [NBD_OPT_EXPORT_NAME] = "export name", [NBD_OPT_ABORT] = "abort",
        [NBD_OPT_LIST] = "list", [4] = "peek export", [NBD_OPT_STARTTLS] = "starttls",
        [NBD_OPT_INFO] = "info", [NBD_OPT_GO] = "go",
        [NBD_OPT_STRUCTURED_REPLY] = "structured reply",
        [NBD_OPT_LIST_META_CONTEXT] = "list meta context",
        [NBD_OPT_SET_META_CONTEXT] = "set meta context",
    };
    return opt < ARRAY_SIZE(names) && names[opt] ? names[opt] : "<unknown>";
}

/* One complete option (header in hs_opt/hs_len, payload in hs_buf). */
static void handle_option(struct nbd_conn *c)
{
    uint32_t opt = c->hs_opt, len = c->hs_len;
    const uint8_t *data = c->hs_buf;

    c->hs_state = HS_OPT_HDR;
    c->hs_have = 0;
    if (!c->fixed && opt != NBD_OPT_EXPORT_NAME) {
        nbd_conn_close(c, "option other than EXPORT_NAME from a non-fixed client");
        return;
    }
    if (nbd_srv.tls_creds && c->tr == &nbd_plain_transport &&
        opt != NBD_OPT_STARTTLS && opt != NBD_OPT_ABORT) {
        if (opt == NBD_OPT_EXPORT_NAME) {
            nbd_conn_close(c, "TLS required");
            return;
        }
        nbd_opt_error(c, opt, NBD_REP_ERR_TLS_REQD, "Option 0x%x not permitted before TLS", opt);
        goto flush;
    }
    switch (opt) {
    case NBD_OPT_EXPORT_NAME:
        opt_export_name(c, data, len);
        return;
    case NBD_OPT_ABORT:
        nbd_opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
        nbd_conn_flush(c);
        nbd_conn_close(c, "client aborted the handshake");
        return;
    case NBD_OPT_LIST:
        opt_list(c, len);
        break;
    case NBD_OPT_STARTTLS:
        nbd_opt_starttls(c, len);   /* tls.c */
        return;
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
        opt_info_go(c, opt, data, len);
        if (c->hs_state == HS_DONE)
            return;
        break;
    case NBD_OPT_STRUCTURED_REPLY:
        opt_structured(c, len);
        break;
    case NBD_OPT_LIST_META_CONTEXT:
    case NBD_OPT_SET_META_CONTEXT:
        nbd_opt_meta_context(c, opt, data, len);
        break;
    default:
        nbd_opt_error(c, opt, NBD_REP_ERR_UNSUP, "Unsupported option %u (%s)", opt, nbd_opt_name(opt));
        break;
    }
flush:
    nbd_conn_flush(c);
}

static void handle_opt_header(struct nbd_conn *c)
{
    struct nbd_option_hdr h;

    memcpy(&h, c->hs_buf, sizeof(h));
    if (be64toh(h.version) != NBD_OPTS_MAGIC) {
        nbd_conn_close(c, "bad option magic");
        return;
    }
    if (++c->hs_nopts > NBD_MAX_OPTIONS) {
        nbd_conn_close(c, "too many options");
        return;
    }
    c->hs_opt = be32toh(h.option);
    c->hs_len = be32toh(h.length);
    c->hs_have = 0;
    if (c->hs_opt == NBD_OPT_EXPORT_NAME && c->hs_len > NBD_MAX_STRING_SIZE) {
        nbd_conn_close(c, "export name too long");
        return;
    }
    if (c->hs_len > NBD_MAX_OPT_LEN) {
        if (c->hs_len > NBD_MAX_OPT_DRAIN) {
            nbd_conn_close(c, "option payload too large");
            return;
        }
        c->hs_drain = c->hs_len;
        c->hs_state = HS_OPT_DRAIN;
        return;
    }
    c->hs_state = HS_OPT_DATA;
    if (c->hs_len == 0)
        handle_option(c);
}

static void handle_client_flags(struct nbd_conn *c)
{
    uint32_t f;

    memcpy(&f, c->hs_buf, 4);
    f = be32toh(f);
    c->fixed = f & NBD_FLAG_C_FIXED_NEWSTYLE;
    c->no_zeroes = f & NBD_FLAG_C_NO_ZEROES;
    if (f & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
        nbd_conn_close(c, "unknown client flags");
        return;
    }
    c->hs_state = HS_OPT_HDR;
    c->hs_have = 0;
}

static uint32_t hs_need(struct nbd_conn *c)
{
    switch (c->hs_state) {
    case HS_FLAGS: return 4;
    case HS_OPT_HDR: return sizeof(struct nbd_option_hdr);
    case HS_OPT_DATA: return c->hs_len;
    case HS_OPT_DRAIN: return MIN(c->hs_drain, (uint32_t)NBD_MAX_OPT_LEN);
    default: return 0;
    }
}

static void hs_step(struct nbd_conn *c)
{
    switch (c->hs_state) {
    case HS_FLAGS: handle_client_flags(c); break;
    case HS_OPT_HDR: handle_opt_header(c); break;
    case HS_OPT_DATA: handle_option(c); break;
    case HS_OPT_DRAIN:
        c->hs_drain -= c->hs_have;
        c->hs_have = 0;
        if (c->hs_drain == 0) {
            c->hs_state = HS_OPT_HDR;
            if (c->hs_opt == NBD_OPT_EXPORT_NAME) {
                nbd_conn_close(c, "export name too long");
                return;
            }
            nbd_opt_error(c, c->hs_opt, NBD_REP_ERR_TOO_BIG, "option payload too large");
            nbd_conn_flush(c);
        }
        break;
    }
}

void nbd_handshake_readable(struct nbd_conn *c)
{
    while (c->state == CONN_HANDSHAKE && c->hs_state != HS_DONE) {
        uint32_t need = hs_need(c);
        ssize_t n;

        if (c->out_len - c->out_sent >= NBD_HS_OUT_MAX) {
            /* the client is not reading our replies: stop reading until
             * it does (nbd_conn_flush resumes) */
            c->rx_paused = true;
            nbd_conn_flush(c);
            if (c->rx_paused)
                return;
        }
        if (c->hs_have < need) {
            n = c->tr->recv(c, c->hs_buf + c->hs_have, need - c->hs_have);
            if (n == -EAGAIN)
                return;
            if (n <= 0) {
                nbd_conn_close(c, n == 0 ? "client closed during handshake" : "read error");
                return;
            }
            c->hs_have += n;
            if (c->hs_have < need)
                continue;
        }
        hs_step(c);
    }
}
