/*
 * Internal interface between the engine (aio.c), its Linux AIO part
 * (aio-linux.c) and the loop that owns it (loop.c).  Everything here runs
 * in the owning loop's thread.
 */
#pragma once
#include <stdbool.h>
#include "util/aio.h"

struct laio;

/* A Linux AIO context for loop l, its completions signalled on an eventfd
 * the loop watches; NULL with *err = -errno if the kernel refuses. */
struct laio *laio_new(struct loop *l, struct aio_stats *stats, int *err);
void laio_free(struct laio *s);
/* Queue a READ/WRITE; it goes to the kernel with the loop turn's batch. */
void laio_submit(struct laio *s, struct aio_req *r);
/* Requests queued or in the kernel. */
unsigned laio_busy(const struct laio *s);

/* aio.c: run r in the worker pool (Linux AIO cannot take it now). */
void aio_pool_fallback(struct aio_req *r);

/* loop.c: a loop's engine, made with the loop; what its I/O waits for. */
struct aio_engine;
struct aio_engine *aio_engine_new(struct loop *l);
void aio_engine_free(struct aio_engine *e);
/* Does the loop's I/O wait on worker threads, the io_uring ring or the
 * Linux AIO context (then the loop sleeps rather than polls)? */
bool aio_engine_waits(struct aio_engine *e);
