/*
 * NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
 *
 * Payload: export name (u32 length + bytes), query count (u32), queries
 * (u32 length + bytes each).  The whole payload is already in memory and
 * bounded (NBD_MAX_OPT_LEN); every length is checked against what remains.
 * Contexts offered, with QEMU's ids: base:allocation (0), when the export
 * has allocation-depth=on qemu:allocation-depth (1), and each dirty bitmap
 * the export publishes as qemu:dirty-bitmap:NAME (2 + its index).  As QEMU
 * does, an empty query list or a bare namespace ("base:", "qemu:",
 * "qemu:dirty-bitmap:") lists everything under it for LIST, while SET only
 * selects exact names; SET needs structured replies first.
 */
#include <endian.h>
#include <string.h>
#include "util/cleanup.h"
#include "nbd-internal.h"

struct meta_sel {
    bool base, depth;
    uint32_t bitmaps;             /* by index in the export */
};

static bool take_u32(const uint8_t **p, uint32_t *left, uint32_t *v)
{
    if (*left < 4)
        return false;
    memcpy(v, *p, 4);
    *v = be32toh(*v);
    *p += 4;
    *left -= 4;
    return true;
}

static void match_query(struct nbd_conn *c, uint32_t opt, struct nbd_export *exp,
                        const char *q, uint32_t qlen, struct meta_sel *sel)
{
    bool list = opt == NBD_OPT_LIST_META_CONTEXT;

#define IS(s) (qlen == sizeof(s) - 1 && memcmp(q, s, qlen) == 0)
    uint32_t all_bitmaps = exp->nbitmaps ? (uint32_t)((1ull << exp->nbitmaps) - 1) : 0;
    if (IS("base:allocation") || (list && IS("base:"))) {
        sel->base = true;
    } else if (IS("qemu:allocation-depth")) {
        sel->depth = exp->alloc_depth;
    } else if (list && IS("qemu:")) {
        sel->depth = exp->alloc_depth;
        sel->bitmaps = all_bitmaps;
    } else if (list && IS("qemu:dirty-bitmap:")) {
        sel->bitmaps = all_bitmaps;
    } else {
        for (int i = 0; i < exp->nbitmaps; i++)
            if (strlen(exp->bitmap_ctx[i]) == qlen && !memcmp(q, exp->bitmap_ctx[i], qlen))
                sel->bitmaps |= 1u << i;
    }
#undef IS
}

static void send_context(struct nbd_conn *c, uint32_t opt, uint32_t id, const char *name)
{
    uint8_t buf[4 + NBD_MAX_STRING_SIZE];
    size_t n = strlen(name);
    uint32_t be = htobe32(opt == NBD_OPT_LIST_META_CONTEXT ? 0 : id);

    memcpy(buf, &be, 4);
    memcpy(buf + 4, name, n);
    nbd_opt_reply(c, opt, NBD_REP_META_CONTEXT, buf, 4 + n);
}

void nbd_opt_meta_context(struct nbd_conn *c, uint32_t opt, const uint8_t *data, uint32_t len)
{
    char name[NBD_MAX_STRING_SIZE + 1];
    struct meta_sel sel = { false, false, 0 };
    struct nbd_export *exp;
    const uint8_t *p = data;
    uint32_t left = len, nq;

    if (opt == NBD_OPT_SET_META_CONTEXT && !c->structured) {
        nbd_opt_error(c, opt, NBD_REP_ERR_INVALID,
                      "request option '%s' when structured reply is not negotiated",
                      nbd_opt_name(opt));
        return;
    }
    if (!nbd_opt_take_name(c, opt, &p, &left, name))
        return;
    exp = nbd_export_lookup(name);
    if (!exp) {
        nbd_opt_error(c, opt, NBD_REP_ERR_UNKNOWN, "export '%s' not present", name);
        return;
    }
    if (!take_u32(&p, &left, &nq)) {
        nbd_opt_error(c, opt, NBD_REP_ERR_INVALID, "Inconsistent lengths in option %s",
                      nbd_opt_name(opt));
        return;
    }
    if (nq > NBD_MAX_QUERIES) {
        nbd_opt_error(c, opt, NBD_REP_ERR_TOO_BIG, "too many queries");
        return;
    }
    if (nq == 0 && opt == NBD_OPT_LIST_META_CONTEXT) {
        sel.base = true;
        sel.depth = exp->alloc_depth;
        sel.bitmaps = exp->nbitmaps ? (uint32_t)((1ull << exp->nbitmaps) - 1) : 0;
    }
    for (uint32_t i = 0; i < nq; i++) {
        uint32_t qlen;
        if (!take_u32(&p, &left, &qlen) || qlen > left) {
            nbd_opt_error(c, opt, NBD_REP_ERR_INVALID, "Inconsistent lengths in option %s",
                          nbd_opt_name(opt));
            return;
        }
        if (qlen <= NBD_MAX_STRING_SIZE)
            match_query(c, opt, exp, (const char *)p, qlen, &sel);
        p += qlen;
        left -= qlen;
    }
    if (left) {
        nbd_opt_error(c, opt, NBD_REP_ERR_INVALID, "Inconsistent lengths in option %s",
                      nbd_opt_name(opt));
        return;
    }
    if (sel.base)
        send_context(c, opt, NBD_META_ID_BASE_ALLOCATION, "base:allocation");
    if (sel.depth)
        send_context(c, opt, NBD_META_ID_ALLOCATION_DEPTH, "qemu:allocation-depth");
    for (int i = 0; i < exp->nbitmaps; i++)
        if (sel.bitmaps & (1u << i))
            send_context(c, opt, NBD_META_ID_DIRTY_BITMAP + i, exp->bitmap_ctx[i]);
    if (opt == NBD_OPT_SET_META_CONTEXT) {
        c->meta_base = sel.base;
        c->meta_depth = sel.depth;
        c->meta_bitmaps = sel.bitmaps;
        c->meta_exp = exp;
    }
    nbd_opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
}
