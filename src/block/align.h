/*
 * Block layer internals: requests that do not fit a node's
 * request_alignment (align.c).  Only block.c calls these.
 */
#pragma once
#include <stdbool.h>
#include "block/block.h"

/* State of a node with request_alignment > 1; NULL on failure. */
struct bnode_align *bnode_align_new(void);
void bnode_align_free(struct bnode_align *al);

/* Called by bnode_submit() for a valid, non-empty request on a node with
 * bs->align.  true: taken over (req->done runs later, in req->loop);
 * false: submit req to the driver as it is (it may now be counted as a
 * fast-path write: req->align_track set). */
bool bnode_align_submit(struct bnode *bs, struct breq *req);

/* A counted fast-path write finished (breq_complete). */
void bnode_align_fast_end(struct bnode_align *al);

