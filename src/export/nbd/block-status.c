/*
 * Block status for NBD: base:allocation, qemu:allocation-depth and
 * qemu:dirty-bitmap:NAME extents.  Answers are bounded (a maximum number of
 * descriptors per context, one with REQ_ONE), so a client asking about a
 * huge range gets a partial answer in bounded time and memory and asks
 * again.  A dirty bitmap answers from its pages under the node's bitmap
 * lock: clean and dirty runs alternate, found a page at a time.
 */
#include <endian.h>
#include <errno.h>
#include "block/dirty-bitmap.h"
#include "util/cleanup.h"
#include "nbd-internal.h"

/* Append an extent, merging it into the previous one of the same flags;
 * false when the array is full. */
static bool extent_add(struct nbd_block_descriptor *ext, int *n, int max,
                       uint64_t len, uint32_t flags)
{
    if (len == 0)
        return true;
    if (*n > 0 && ext[*n - 1].status_flags == flags) {
        ext[*n - 1].length += len;
        return true;
    }
    if (*n == max)
        return false;
    ext[*n].length = len;
    ext[*n].status_flags = flags;
    (*n)++;
    return true;
}

/* Extents of a dirty bitmap over [offset, offset+len); len fits 32 bits. */
static int bitmap_extents(struct dirty_bitmap *bm, uint64_t offset, uint64_t len,
                          struct nbd_block_descriptor *ext, int max)
{
    uint64_t end = offset + len, start = offset;
    bool full = false;
    int n = 0;

    dirty_bitmaps_lock(bm->bs);
    for (;;) {
        uint64_t dstart = start, dlen;
        if (!dirty_bitmap_next_dirty_area_locked(bm, &dstart, end, UINT32_MAX, &dlen))
            break;
        if (!extent_add(ext, &n, max, dstart - start, 0) ||
            !extent_add(ext, &n, max, dlen, NBD_STATE_DIRTY)) {
            full = true;
            break;
        }
        start = dstart + dlen;
    }
    if (!full)
        extent_add(ext, &n, max, end - start, 0);
    dirty_bitmaps_unlock(bm->bs);
    return n;
}

static uint32_t extent_value(int ctx, unsigned flags, int depth)
{
    if (ctx == NBD_META_ID_ALLOCATION_DEPTH)
        return depth < 0 ? 0 : (uint32_t)depth;
    return ((flags & BS_DATA) ? 0 : NBD_STATE_HOLE) |
           ((flags & BS_ZERO) ? NBD_STATE_ZERO : 0);
}

int nbd_block_status_extents(struct nbd_export *exp, int ctx, uint64_t offset,
                             uint64_t len, bool req_one,
                             struct nbd_block_descriptor *ext, int max)
{
    struct bnode *bs = exp->common.node;
    uint64_t end = offset + len;
    uint64_t deadline = now_ms() + NBD_BLOCK_STATUS_MS;
    unsigned steps = 0;
    int n = 0;

    if (ctx >= NBD_META_ID_DIRTY_BITMAP) {
        n = bitmap_extents(exp->bitmaps[ctx - NBD_META_ID_DIRTY_BITMAP], offset, len, ext,
                           req_one ? 1 : max);
        goto out;
    }
    while (offset < end) {
        uint64_t pnum = 0;
        unsigned flags = 0;
        int depth = 0;
        int r = bnode_block_status(bs, offset, end - offset, &pnum, &flags, &depth);
        uint32_t v;

        if (r < 0 || pnum == 0) {
            if (n > 0)
                break;   /* report what we have; the client asks again */
            return r < 0 ? r : -EIO;
        }
        pnum = MIN(pnum, end - offset);
        v = extent_value(ctx, flags, depth);
        if (n > 0 && ext[n - 1].status_flags == v) {
            ext[n - 1].length += pnum;
        } else {
            if (n == max)
                break;
            ext[n].length = pnum;
            ext[n].status_flags = v;
            n++;
        }
        offset += pnum;
        /* steps, not n: merged extents do not grow n */
        if (req_one || ((++steps & 63) == 0 && now_ms() > deadline))
            break;   /* a partial answer is fine: the client asks again */
    }
out:
    for (int i = 0; i < n; i++) {
        ext[i].length = htobe32(ext[i].length);
        ext[i].status_flags = htobe32(ext[i].status_flags);
    }
    return n;
}
