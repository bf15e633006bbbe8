/*
 * What one export client did: operations, bytes, time and errors, kept by
 * the loop that serves it (a single writer per counter set) and read from
 * the main thread for __org.bexd_query-export-clients and /metrics.  The
 * same counters for every export type (NBD connection, vhost-user-blk
 * front-end, FUSE mount), so the operator sees one shape.
 */
#pragma once
#include <stdint.h>
#include <jansson.h>
#include "block/block.h"

enum client_op { CLIENT_OP_READ, CLIENT_OP_WRITE, CLIENT_OP_FLUSH, CLIENT_OP_OTHER };

struct client_stats {
    uint64_t rd_ops, rd_bytes, rd_ns;
    uint64_t wr_ops, wr_bytes, wr_ns;
    uint64_t flush_ops, other_ops, errors;
    uint64_t spliced_bytes;      /* of rd_bytes: sent from the page cache by splice (NBD) */
    uint64_t copied_bytes;       /* of wr_bytes: payload copied before the write (FUSE) */
};

/* What a block request counts as. */
static inline enum client_op client_op_of(enum breq_op op)
{
    return op == BREQ_READ ? CLIENT_OP_READ
         : op == BREQ_WRITE || op == BREQ_WRITE_ZEROES ? CLIENT_OP_WRITE
         : op == BREQ_FLUSH ? CLIENT_OP_FLUSH : CLIENT_OP_OTHER;
}

/* One finished request (its writer's thread only): ret < 0 counts as an
 * error; ns is its latency as the block layer measured it (breq). */
void client_stats_account(struct client_stats *st, enum client_op op, uint64_t bytes,
                          uint64_t ns, int ret);
/* A READ reply of n bytes goes to the socket by splice(2), not copied
 * (its writer's thread only; counted when the reply is queued). */
void client_stats_spliced(struct client_stats *st, uint64_t n);
/* A WRITE payload of n bytes had to be copied to another buffer before it
 * could be written (its writer's thread only; counted when copied). */
void client_stats_copied(struct client_stats *st, uint64_t n);
/* A consistent-enough copy, from any thread. */
void client_stats_read(const struct client_stats *st, struct client_stats *out);
/* sum += st (sum is the caller's own). */
void client_stats_add(struct client_stats *sum, const struct client_stats *st);
/* *dst = *src, published field by field (dst's single writer). */
void client_stats_store(struct client_stats *dst, const struct client_stats *src);
/* sum -= base, each counter (base an earlier reading of the same counters). */
void client_stats_sub(struct client_stats *sum, const struct client_stats *base);
/* The schema's __org.bexd_ExportIOCounters object. */
json_t *client_stats_json(const struct client_stats *v);
