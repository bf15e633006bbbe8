/*
 * I/O accounting of block nodes: what query-blockstats reports (QEMU's
 * BlockDeviceStats: bytes, operations, failed and invalid operations, total
 * times, idle time, latency histograms) and what /metrics exports.
 *
 * The data path (any loop thread) only adds to counters with relaxed
 * atomic operations: no lock, no allocation, one clock read at submission
 * and one at completion.  Readers (main thread) load each counter on its
 * own, so a snapshot may be a few requests out of step between fields.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <time.h>
#include <jansson.h>

struct bnode;
struct breq;

enum bstat_op { BSTAT_RD, BSTAT_WR, BSTAT_FLUSH, BSTAT_UNMAP, BSTAT_NR, BSTAT_NONE = BSTAT_NR };

/* A latency histogram: bins[i] counts latencies in [bounds[i-1], bounds[i])
 * (ns), bins[0] from 0, bins[nbounds] from the last bound up. */
#define BSTAT_HIST_MAX_BOUNDS 64
struct bstat_hist {
    int nbounds;
    uint64_t bounds[BSTAT_HIST_MAX_BOUNDS];
    uint64_t bins[BSTAT_HIST_MAX_BOUNDS + 1];
    struct bstat_hist *retired_next;   /* replaced ones, freed with the node */
};

/* Always-on latency buckets for /metrics: bucket k counts latencies below
 * 2^(BSTAT_LOG2_MIN+k) ns (4 us .. 17 s), the last one everything above. */
#define BSTAT_LOG2_MIN 12
#define BSTAT_LOG2_BUCKETS 24

struct bstat_op_counters {
    uint64_t bytes, ops, failed, invalid, total_ns;
    uint64_t log2_buckets[BSTAT_LOG2_BUCKETS];
};

struct bstats {
    struct bstat_op_counters op[BSTAT_NR];
    uint64_t last_access_ns;         /* CLOCK_MONOTONIC of the last completion, 0 = none */
    uint64_t wr_highest_offset;
    struct bstat_hist *hist[BSTAT_NR];   /* NULL = no histogram (swapped by the main thread) */
    struct bstat_hist *retired;
};

static inline uint64_t bstats_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

struct bstats *bstats_new(void);
void bstats_free(struct bstats *st);

/* Data path: bnode_submit() stamps the request, breq_complete() counts it. */
void bstats_submit(struct bnode *bs, struct breq *req);
void bstats_complete(struct breq *req, int ret);
/* The request is refused by validation: count it as invalid, not failed. */
void bstats_invalid(struct breq *req);

/* Main thread. */
uint64_t bstats_get(const uint64_t *counter);
/* A BlockDeviceStats object (QEMU 7.2 field names). */
json_t *bstats_query(struct bstats *st);
/* block-latency-histogram-set on one op (NULL bounds: remove it); errp-free:
 * the bounds were checked by the caller. */
void bstats_set_histogram(struct bstats *st, enum bstat_op op, const uint64_t *bounds, int n);
const char *bstat_op_name(enum bstat_op op);    /* "rd", "wr", "flush", "unmap" */
