/*
 * FUSE export: changing the node's size on behalf of a request.
 *
 * bnode_truncate() is a control operation of the main thread.  A request
 * being served in an iothread hops there with loop_call(), truncates, and
 * hops back to continue in its own loop; on the main loop it runs inline.
 * Several writes past the end may race to grow the node: with grow_only the
 * later ones find the node already large enough and do nothing, so the node
 * never shrinks under a write.
 */
#include <errno.h>
#include "export/fuse/fuse-export.h"
#include "util/loop.h"

static int fuse_do_resize(struct fuse_export *exp, uint64_t size, bool grow_only)
{
    struct bnode *bs = exp->common.node;
    error *err = NULL;
    int ret;

    if (size > INT64_MAX)
        return -EFBIG;
    if (grow_only && bs->size >= size)
        return 0;
    exp->self_resizing = true;      /* the kernel knows this size already */
    ret = bnode_truncate(bs, size, &err);
    exp->self_resizing = false;
    error_free(err);
    if (ret >= 0)
        return 0;
    return ret == -1 ? -EIO : ret;
}

static void fuse_resize_back(void *opaque)
{
    struct fuse_ioreq *r = opaque;
    r->next_step(r, r->resize_ret);
}

static void fuse_resize_in_main(void *opaque)
{
    struct fuse_ioreq *r = opaque;
    bool grow_only = r->resize_ret;

    r->resize_ret = fuse_do_resize(r->exp, r->new_size, grow_only);
    loop_call(r->q->loop, fuse_resize_back, r);
}

void fuse_resize(struct fuse_ioreq *r, bool grow_only, fuse_ioreq_fn *next)
{
    r->next_step = next;
    if (loop_in_thread(loop_main())) {
        next(r, fuse_do_resize(r->exp, r->new_size, grow_only));
        return;
    }
    r->resize_ret = grow_only;   /* carries the flag to the main thread */
    loop_call(loop_main(), fuse_resize_in_main, r);
}
