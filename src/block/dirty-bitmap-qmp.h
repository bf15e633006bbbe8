/* Dirty bitmap operations shared by their QMP commands and `transaction`
 * (dirty-bitmap-qmp.c): each takes the command's checked arguments and
 * does the command's lookups and checks, in QEMU's order. */
#pragma once
#include <jansson.h>
#include "util/error.h"

struct dirty_bitmap;
struct pbitmap;

/* block-dirty-bitmap-add: the new bitmap, or NULL. */
struct dirty_bitmap *dirty_bitmap_op_add(json_t *args, error **errp);
/* block-dirty-bitmap-remove's lookup and checks: the bitmap, or NULL. */
struct dirty_bitmap *dirty_bitmap_op_remove_check(json_t *args, error **errp);
/* Lookup by {node, name} and dirty_bitmap_check(check). */
struct dirty_bitmap *dirty_bitmap_op_lookup(json_t *args, unsigned check, error **errp);
/* block-dirty-bitmap-merge: the target, or NULL (then unchanged).  With
 * backup, the target's old bits are handed over for an undo. */
struct dirty_bitmap *dirty_bitmap_op_merge(json_t *args, struct pbitmap **backup, error **errp);
