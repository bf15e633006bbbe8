/*
 * Throttle groups (--object throttle-group): I/O limits shared by the
 * throttle filter nodes that name the group (block/throttle.c), as QEMU
 * 7.2's util/throttle.c and block/throttle-groups.c.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include "block/block.h"
#include "util/error.h"

struct throttle_group;

/* The group named id, pinned (object-del refuses it) until put. */
struct throttle_group *throttle_group_get(const char *id, error **errp);
void throttle_group_put(struct throttle_group *g);

/* Let req (a READ, or a write when write) through the group's limits:
 * false, it may go on at once (and is counted); true, it waits in the
 * group, which submits it to bs's file child at offset when its turn
 * comes, from the request's own loop. */
bool throttle_group_intercept(struct throttle_group *g, bool write, struct bnode *bs,
                              struct breq *req, uint64_t offset);

/* While a drain is under way (writes held for a snapshot, an export's
 * hard removal, the daemon's stop), limits are off: what waits goes at
 * once and new requests do not wait (QEMU's io_limits_disabled, set by
 * its drain).  Main thread; nested calls count. */
void throttle_bypass_begin(void);
void throttle_bypass_end(void);
