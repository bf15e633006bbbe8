/*
 * Drivers "null-co" and "null-aio" (QEMU's two, which differ only in how
 * QEMU completes a request: in a coroutine or a bottom half): a device of
 * a given size that drops writes and reads zeroes (read-zeroes=on) or
 * leaves the buffer untouched (QEMU's default).
 * latency-ns delays the completion of every read, write, write-zeroes and
 * flush by that long, as QEMU sleeps in each (a timer of the request's
 * loop, so in whole milliseconds, rounded up; fault-injection tests use it
 * for slow nodes).
 */
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "util/loop.h"
#include "util/xalloc.h"
#include "util/opts.h"

struct null_state {
    bool read_zeroes;
    uint64_t latency_ms;        /* latency-ns, rounded up; 0 = none */
};

struct null_delay {
    struct loop_timer *timer;
    struct breq *req;
};

static void null_delay_done(void *opaque)
{
    struct null_delay *d = opaque;
    struct breq *r = d->req;

    loop_timer_free(d->timer);
    free(d);
    breq_complete(r, 0);
}

static int null_open(struct bnode *bs, json_t *opts, error **errp)
{
    struct null_state *s = xzalloc(sizeof(*s));
    bs->opaque = s;
    json_t *size = json_object_get(opts, "size");
    bs->size = size ? (uint64_t)json_integer_value(size) : 1ull << 30;
    s->read_zeroes = opt_bool(opts, "read-zeroes", false);
    s->latency_ms = ((uint64_t)opt_int(opts, "latency-ns", 0) + 999999) / 1000000;
    return 0;
}

static void null_close(struct bnode *bs)
{
    free(bs->opaque);
}

static void null_submit(struct bnode *bs, struct breq *r, uint64_t offset)
{
    struct null_state *s = bs->opaque;
    if (r->op == BREQ_READ && s->read_zeroes)
        for (int i = 0; i < r->iovcnt; i++)
            memset(r->iov[i].iov_base, 0, r->iov[i].iov_len);
    if (s->latency_ms && r->op != BREQ_DISCARD && r->op != BREQ_CACHE) {
        struct null_delay *d = xmalloc(sizeof(*d));
        d->req = r;
        d->timer = loop_timer_new(r->loop, null_delay_done, d);
        loop_timer_arm(d->timer, s->latency_ms);
        return;
    }
    breq_complete(r, 0);
}

static int null_block_status(struct bnode *bs, uint64_t offset, uint64_t bytes,
                             uint64_t *pnum, unsigned *flags)
{
    struct null_state *s = bs->opaque;
    *pnum = bytes;
    *flags = s->read_zeroes ? BS_ZERO | BS_ALLOCATED : 0;
    return 0;
}

static bool null_true(struct bnode *bs) { return true; }

/* QEMU's null-co has no bdrv_get_info: its image info (and that of a raw
 * node over it) carries no dirty-flag. */
static void null_query_info(struct bnode *bs, json_t *info)
{
    json_object_del(json_object_get(info, "image"), "dirty-flag");
}

/* Nothing of its own changes (QEMU's null_reopen_prepare). */
static int null_reopen_prepare(struct reopen_state *rs, error **errp) { return 0; }

static const char *const null_strong_opts[] = { "size", "read-zeroes", NULL };

#define NULL_DRIVER(NAME) {                 \
    .is_protocol = true,                    \
    .strong_opts = null_strong_opts,        \
    .filename_rule = FNAME_NULL,            \
    .name = NAME,                           \
    .open = null_open,                      \
    .close = null_close,                    \
    .submit = null_submit,                  \
    .block_status = null_block_status,      \
    .can_write_zeroes_fast = null_true,     \
    .reopen_prepare = null_reopen_prepare,  \
    .query_info = null_query_info,          \
}

static const struct bdrv bdrv_null_co = NULL_DRIVER("null-co");
BDRV_REGISTER(bdrv_null_co)
static const struct bdrv bdrv_null_aio = NULL_DRIVER("null-aio");
BDRV_REGISTER(bdrv_null_aio)
