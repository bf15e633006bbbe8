/* Per-client I/O counters shared by the export types (client-stats.h). */
#include "export/client-stats.h"

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
/* one writer: a plain add published with a relaxed store */
#define BUMP(x, v) __atomic_store_n(&(x), (x) + (v), __ATOMIC_RELAXED)

void client_stats_account(struct client_stats *st, enum client_op op, uint64_t bytes,
                          uint64_t ns, int ret)
{
    if (ret < 0) {
        BUMP(st->errors, 1);
        return;
    }
    switch (op) {
    case CLIENT_OP_READ:
        BUMP(st->rd_ops, 1);
        BUMP(st->rd_bytes, bytes);
        BUMP(st->rd_ns, ns);
        break;
    case CLIENT_OP_WRITE:
        BUMP(st->wr_ops, 1);
        BUMP(st->wr_bytes, bytes);
        BUMP(st->wr_ns, ns);
        break;
    case CLIENT_OP_FLUSH:
        BUMP(st->flush_ops, 1);
        break;
    case CLIENT_OP_OTHER:
        BUMP(st->other_ops, 1);
        break;
    }
}

void client_stats_spliced(struct client_stats *st, uint64_t n)
{
    BUMP(st->spliced_bytes, n);
}

void client_stats_copied(struct client_stats *st, uint64_t n)
{
    BUMP(st->copied_bytes, n);
}

void client_stats_read(const struct client_stats *st, struct client_stats *out)
{
    out->rd_ops = LOAD(st->rd_ops);
    out->rd_bytes = LOAD(st->rd_bytes);
    out->rd_ns = LOAD(st->rd_ns);
    out->wr_ops = LOAD(st->wr_ops);
    out->wr_bytes = LOAD(st->wr_bytes);
    out->wr_ns = LOAD(st->wr_ns);
    out->flush_ops = LOAD(st->flush_ops);
    out->other_ops = LOAD(st->other_ops);
    out->errors = LOAD(st->errors);
    out->spliced_bytes = LOAD(st->spliced_bytes);
    out->copied_bytes = LOAD(st->copied_bytes);
}

void client_stats_add(struct client_stats *sum, const struct client_stats *st)
{
    struct client_stats v;

    client_stats_read(st, &v);
    sum->rd_ops += v.rd_ops;
    sum->rd_bytes += v.rd_bytes;
    sum->rd_ns += v.rd_ns;
    sum->wr_ops += v.wr_ops;
    sum->wr_bytes += v.wr_bytes;
    sum->wr_ns += v.wr_ns;
    sum->flush_ops += v.flush_ops;
    sum->other_ops += v.other_ops;
    sum->errors += v.errors;
    sum->spliced_bytes += v.spliced_bytes;
    sum->copied_bytes += v.copied_bytes;
}

#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

void client_stats_store(struct client_stats *dst, const struct client_stats *src)
{
    STORE(dst->rd_ops, src->rd_ops);
    STORE(dst->rd_bytes, src->rd_bytes);
    STORE(dst->rd_ns, src->rd_ns);
    STORE(dst->wr_ops, src->wr_ops);
    STORE(dst->wr_bytes, src->wr_bytes);
    STORE(dst->wr_ns, src->wr_ns);
    STORE(dst->flush_ops, src->flush_ops);
    STORE(dst->other_ops, src->other_ops);
    STORE(dst->errors, src->errors);
    STORE(dst->spliced_bytes, src->spliced_bytes);
    STORE(dst->copied_bytes, src->copied_bytes);
}

/* Counters only grow, but a reading may be a little older than base. */
#define SUB(x) sum->x = sum->x > base->x ? sum->x - base->x : 0

void client_stats_sub(struct client_stats *sum, const struct client_stats *base)
{
    SUB(rd_ops);
    SUB(rd_bytes);
    SUB(rd_ns);
    SUB(wr_ops);
    SUB(wr_bytes);
    SUB(wr_ns);
    SUB(flush_ops);
    SUB(other_ops);
    SUB(errors);
    SUB(spliced_bytes);
    SUB(copied_bytes);
}

json_t *client_stats_json(const struct client_stats *v)
{
    return json_pack("{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}",
                     "read-operations", (json_int_t)v->rd_ops,
                     "read-bytes", (json_int_t)v->rd_bytes,
                     "read-total-time-ns", (json_int_t)v->rd_ns,
                     "read-spliced-bytes", (json_int_t)v->spliced_bytes,
                     "write-operations", (json_int_t)v->wr_ops,
                     "write-bytes", (json_int_t)v->wr_bytes,
                     "write-total-time-ns", (json_int_t)v->wr_ns,
                     "write-copied-bytes", (json_int_t)v->copied_bytes,
                     "flush-operations", (json_int_t)v->flush_ops,
                     "failed-operations", (json_int_t)v->errors);
}
