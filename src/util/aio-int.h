/*
 * Internal interface between the engine (aio.c) and its Linux AIO part
 * (aio-linux.c).  Everything here runs in the owning loop's thread.
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
