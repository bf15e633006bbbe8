/*
 * I/O accounting of block nodes (see stats.h).
 *
 * Theory of operation: bnode_submit() calls bstats_submit(), which stamps
 * the request with the node's counters, the kind of operation and the time;
 * bnode_submit_child() counts the levels a request is forwarded down (raw
 * over file), and breq_complete() calls bstats_complete(), which adds the
 * request to the node and to each child it went through: one operation, its
 * bytes and time, or a failure (ret < 0).  A request the block layer refuses
 * before any driver sees it (out of range, a write to a read-only node) is
 * counted as invalid by bstats_invalid() instead.
 * Every add is a relaxed atomic: counters are exact, only their ordering
 * against each other is loose.  A histogram is swapped in by the main
 * thread with a release store; the one it replaces may still be counted
 * into by a request in flight, so it is kept until the node closes.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "block/stats.h"
#include "util/xalloc.h"

#define ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)

struct bstats *bstats_new(void)
{
    return xzalloc(sizeof(struct bstats));
}

void bstats_free(struct bstats *st)
{
    if (!st)
        return;
    for (int i = 0; i < BSTAT_NR; i++)
        free(st->hist[i]);
    while (st->retired) {
        struct bstat_hist *h = st->retired;
        st->retired = h->retired_next;
        free(h);
    }
    free(st);
}

static enum bstat_op op_of(enum breq_op op)
{
    switch (op) {
    case BREQ_READ: return BSTAT_RD;
    case BREQ_WRITE: case BREQ_WRITE_ZEROES: return BSTAT_WR;
    case BREQ_FLUSH: return BSTAT_FLUSH;
    case BREQ_DISCARD: return BSTAT_UNMAP;
    default: return BSTAT_NONE;
    }
}

void bstats_submit(struct bnode *bs, struct breq *req)
{
    req->acct = bs;
    req->acct_op = op_of(req->op);
    req->acct_fwd = 0;
    req->acct_start_ns = bstats_now_ns();
}

static void hist_add(struct bstat_hist *h, uint64_t ns)
{
    int lo = 0, hi = h->nbounds;     /* first bound > ns */
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (h->bounds[mid] > ns)
            hi = mid;
        else
            lo = mid + 1;
    }
    ADD(&h->bins[lo], 1);
}

static unsigned log2_bucket(uint64_t ns)
{
    /* smallest k with ns < 2^(MIN+k) */
    unsigned bits = ns ? 64 - __builtin_clzll(ns) : 0;
    if (bits <= BSTAT_LOG2_MIN)
        return 0;
    bits -= BSTAT_LOG2_MIN;
    return bits < BSTAT_LOG2_BUCKETS ? bits : BSTAT_LOG2_BUCKETS - 1;
}

static void account(struct bnode *bs, const struct breq *req, int ret, uint64_t now, uint64_t ns)
{
    struct bstats *st = bs->stats;
    struct bstat_op_counters *c = &st->op[req->acct_op];

    if (ret < 0) {
        ADD(&c->failed, 1);
    } else {
        ADD(&c->ops, 1);
        ADD(&c->bytes, req->len);
        ADD(&c->total_ns, ns);
        ADD(&c->log2_buckets[log2_bucket(ns)], 1);
        struct bstat_hist *h = __atomic_load_n(&st->hist[req->acct_op], __ATOMIC_ACQUIRE);
        if (h)
            hist_add(h, ns);
        if (req->acct_op == BSTAT_WR) {
            uint64_t end = req->offset + req->len;
            uint64_t old = __atomic_load_n(&st->wr_highest_offset, __ATOMIC_RELAXED);
            while (end > old &&
                   !__atomic_compare_exchange_n(&st->wr_highest_offset, &old, end, true,
                                                __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                ;
        }
    }
    __atomic_store_n(&st->last_access_ns, now, __ATOMIC_RELAXED);
}

void bstats_complete(struct breq *req, int ret)
{
    struct bnode *bs = req->acct;

    if (!bs || req->acct_op == BSTAT_NONE)
        return;
    req->acct = NULL;
    uint64_t now = bstats_now_ns();
    uint64_t ns = now - req->acct_start_ns;
    req->acct_lat_ns = ns;
    account(bs, req, ret, now, ns);
    for (int i = 0; i < req->acct_fwd && bs->file; i++) {
        bs = bs->file;
        account(bs, req, ret, now, ns);
    }
}

void bstats_invalid(struct breq *req)
{
    struct bnode *bs = req->acct;

    if (!bs || req->acct_op == BSTAT_NONE)
        return;
    req->acct = NULL;
    ADD(&bs->stats->op[req->acct_op].invalid, 1);
}

uint64_t bstats_get(const uint64_t *counter)
{
    return __atomic_load_n(counter, __ATOMIC_RELAXED);
}

const char *bstat_op_name(enum bstat_op op)
{
    static const char *const names[] = { "rd", "wr", "flush", "unmap" };
    return op < BSTAT_NR ? names[op] : "?";
}

static json_t *hist_query(struct bstat_hist *h)
{
    json_t *b = json_array(), *bins = json_array();
    for (int i = 0; i < h->nbounds; i++)
        json_array_append_new(b, json_integer((json_int_t)h->bounds[i]));
    for (int i = 0; i <= h->nbounds; i++)
        json_array_append_new(bins, json_integer((json_int_t)bstats_get(&h->bins[i])));
    return json_pack("{s:o, s:o}", "boundaries", b, "bins", bins);
}

json_t *bstats_query(struct bstats *st)
{
    json_t *o = json_object();
    char key[64];

    for (int i = 0; i < BSTAT_NR; i++) {
        const char *n = bstat_op_name(i);
        struct bstat_op_counters *c = &st->op[i];
        if (i != BSTAT_FLUSH) {
            snprintf(key, sizeof(key), "%s_bytes", n);
            json_object_set_new(o, key, json_integer((json_int_t)bstats_get(&c->bytes)));
            snprintf(key, sizeof(key), "%s_merged", n);
            json_object_set_new(o, key, json_integer(0));
        }
        snprintf(key, sizeof(key), "%s_operations", n);
        json_object_set_new(o, key, json_integer((json_int_t)bstats_get(&c->ops)));
        snprintf(key, sizeof(key), "%s_total_time_ns", n);
        json_object_set_new(o, key, json_integer((json_int_t)bstats_get(&c->total_ns)));
        snprintf(key, sizeof(key), "failed_%s_operations", n);
        json_object_set_new(o, key, json_integer((json_int_t)bstats_get(&c->failed)));
        snprintf(key, sizeof(key), "invalid_%s_operations", n);
        json_object_set_new(o, key, json_integer((json_int_t)bstats_get(&c->invalid)));
        struct bstat_hist *h = __atomic_load_n(&st->hist[i], __ATOMIC_ACQUIRE);
        if (h && i != BSTAT_UNMAP) {    /* QEMU has no unmap histogram */
            snprintf(key, sizeof(key), "%s_latency_histogram", n);
            json_object_set_new(o, key, hist_query(h));
        }
    }
    json_object_set_new(o, "wr_highest_offset",
                        json_integer((json_int_t)bstats_get(&st->wr_highest_offset)));
    uint64_t last = bstats_get(&st->last_access_ns);
    if (last)
        json_object_set_new(o, "idle_time_ns", json_integer((json_int_t)(bstats_now_ns() - last)));
    json_object_set_new(o, "timed_stats", json_array());
    /* bexd always counts failed and invalid requests */
    json_object_set_new(o, "account_invalid", json_true());
    json_object_set_new(o, "account_failed", json_true());
    return o;
}

void bstats_set_histogram(struct bstats *st, enum bstat_op op, const uint64_t *bounds, int n)
{
    struct bstat_hist *h = NULL;
    if (bounds) {
        h = xzalloc(sizeof(*h));
        h->nbounds = n;
        memcpy(h->bounds, bounds, n * sizeof(bounds[0]));
    }
    struct bstat_hist *old = __atomic_exchange_n(&st->hist[op], h, __ATOMIC_ACQ_REL);
    if (old) {
        old->retired_next = st->retired;
        st->retired = old;
    }
}
