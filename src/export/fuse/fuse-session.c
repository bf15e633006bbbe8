/*
 * FUSE export: the session fd driven by the export's event loop.
 *
 * Theory of operation.  The /dev/fuse fd of the session is non-blocking and
 * watched by exp->common.loop.  Each readable event reads up to
 * FUSE_RX_BATCH requests with fuse_session_receive_buf() and hands each to
 * fuse_session_process_buf(), which calls the operation in fuse-ops.c.  An
 * operation either replies at once or takes a request slot (struct
 * fuse_ioreq), submits a struct breq to the block layer and returns; the
 * breq completion replies with fuse_reply_*.  No thread per request, no
 * blocking read: when the fd has nothing more, the loop goes back to sleep.
 *
 * Buffers.  libfuse reads each request into exp->fbuf.mem (allocated by
 * libfuse itself, one payload-sized buffer).  A WRITE keeps its payload where
 * the kernel put it: the request slot takes the whole receive buffer and the
 * next receive gets another from the pool, so data is never copied.  READs
 * borrow a pooled buffer of the same size for the data they return.  Slots
 * and buffers go back to small free lists, so a steady workload allocates
 * nothing.
 *
 * Shutdown.  fuse_session_stop() (main thread) asks the loop to stop
 * watching the fd; requests already handed to the block layer are still
 * answered.  When the last one has replied, the main thread unmounts,
 * destroys the session and reports export_shutdown_done().  Requests the
 * kernel still holds are failed by the kernel (ENOTCONN) once the session
 * fd is closed.
 */
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include "export/fuse/fuse-export.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/xalloc.h"

/* ---- buffer pool (loop thread) ---- */

static void *buf_pool_get(struct fuse_export *exp)
{
    void *b = exp->buf_pool;
    if (b) {
        exp->buf_pool = *(void **)b;
        exp->buf_pool_len--;
    }
    return b;
}

static void buf_pool_put(struct fuse_export *exp, void *b)
{
    if (!b)
        return;
    if (exp->buf_pool_len >= FUSE_POOL_KEEP) {
        free(b);
        return;
    }
    *(void **)b = exp->buf_pool;
    exp->buf_pool = b;
    exp->buf_pool_len++;
}

/* ---- request slots (loop thread) ---- */

struct fuse_ioreq *fuse_ioreq_get(struct fuse_export *exp, fuse_req_t req)
{
    struct fuse_ioreq *r = exp->req_pool;
    if (r) {
        exp->req_pool = r->next_free;
        exp->req_pool_len--;
    } else {
        r = xmalloc(sizeof(*r));
    }
    memset(r, 0, sizeof(*r));
    r->exp = exp;
    r->req = req;
    exp->inflight++;
    return r;
}

static void fuse_maybe_drained(struct fuse_export *exp);

void fuse_ioreq_put(struct fuse_ioreq *r)
{
    struct fuse_export *exp = r->exp;

    buf_pool_put(exp, r->mem);
    r->mem = NULL;
    if (exp->req_pool_len < FUSE_POOL_KEEP) {
        r->next_free = exp->req_pool;
        exp->req_pool = r;
        exp->req_pool_len++;
    } else {
        free(r);
    }
    exp->inflight--;
    fuse_maybe_drained(exp);
}

int fuse_ioreq_take_data(struct fuse_ioreq *r, const void *data, size_t len)
{
    struct fuse_export *exp = r->exp;
    char *mem = exp->fbuf.mem;

    /* O_DIRECT nodes need aligned memory: copy then (the payload sits
     * just after the request header, at no useful alignment). */
    bool any_alignment = exp->common.node->request_alignment <= 1;

    if (any_alignment && mem && !(exp->fbuf.flags & FUSE_BUF_IS_FD) &&
        (const char *)data >= mem &&
        (const char *)data + len <= mem + exp->fbuf.size) {
        r->mem = mem;                 /* steal: the next receive uses another */
        exp->fbuf.mem = NULL;
        r->iov.iov_base = (void *)data;
        r->iov.iov_len = len;
        return 0;
    }
    if (fuse_ioreq_alloc(r, len) < 0)
        return -ENOMEM;
    memcpy(r->iov.iov_base, data, len);
    return 0;
}

int fuse_ioreq_alloc(struct fuse_ioreq *r, size_t len)
{
    struct fuse_export *exp = r->exp;
    void *b = buf_pool_get(exp);

    /* The data starts page-aligned inside the buffer (O_DIRECT nodes need
     * that); pooled receive buffers are usually big enough for it. */
    if (b && malloc_usable_size(b) < len + FUSE_BUF_ALIGN) {
        free(b);
        b = NULL;
    }
    /* Big enough to serve as a receive buffer later, when pooled. */
    if (!b)
        b = xmalloc(MAX(len + FUSE_BUF_ALIGN, exp->rx_size));
    r->mem = b;
    r->iov.iov_base = (void *)(((uintptr_t)b + FUSE_BUF_ALIGN - 1) & ~(uintptr_t)(FUSE_BUF_ALIGN - 1));
    r->iov.iov_len = len;
    return 0;
}

static void fuse_ioreq_done(struct breq *b, int ret)
{
    struct fuse_ioreq *r = b->opaque;
    enum client_op op = b->op == BREQ_READ ? CLIENT_OP_READ
                      : b->op == BREQ_WRITE || b->op == BREQ_WRITE_ZEROES ? CLIENT_OP_WRITE
                      : b->op == BREQ_FLUSH ? CLIENT_OP_FLUSH : CLIENT_OP_OTHER;

    client_stats_account(&r->exp->st, op, b->len, b->acct_lat_ns,
                         ret == -ENOTSUP && b->op == BREQ_DISCARD ? 0 : ret);
    r->breq_done(b, ret);
}

void fuse_ioreq_submit(struct fuse_ioreq *r, enum breq_op op, unsigned flags,
                       uint64_t offset, uint64_t len,
                       void (*done)(struct breq *, int))
{
    struct breq *b = &r->breq;

    memset(b, 0, sizeof(*b));
    b->op = op;
    b->flags = flags;
    b->offset = offset;
    b->len = len;
    if (op == BREQ_READ || op == BREQ_WRITE) {
        b->iov = &r->iov;
        b->iovcnt = 1;
    }
    b->loop = r->exp->common.loop;
    b->done = fuse_ioreq_done;
    b->opaque = r;
    r->breq_done = done;
    bnode_submit(r->exp->common.node, b);
}

void fuse_session_free_pools(struct fuse_export *exp)
{
    void *b;
    while ((b = buf_pool_get(exp)))
        free(b);
    while (exp->req_pool) {
        struct fuse_ioreq *r = exp->req_pool;
        exp->req_pool = r->next_free;
        free(r);
    }
    exp->req_pool_len = 0;
    free(exp->fbuf.mem);
    exp->fbuf.mem = NULL;
}

/* ---- receiving ---- */

static void fuse_stop_watching(struct fuse_export *exp)
{
    if (exp->watch) {
        loop_watch_del(exp->watch);
        exp->watch = NULL;
    }
}

/* Returns false when no more requests should be read now. */
static bool fuse_receive_one(struct fuse_export *exp)
{
    bool fresh;
    int ret;

    if (!exp->fbuf.mem)
        exp->fbuf.mem = buf_pool_get(exp);   /* NULL: libfuse allocates one */
    if (exp->fbuf.mem && malloc_usable_size(exp->fbuf.mem) < exp->rx_size) {
        free(exp->fbuf.mem);                 /* libfuse reads se->bufsize bytes */
        exp->fbuf.mem = NULL;
    }
    fresh = !exp->fbuf.mem;
    exp->fbuf.size = 0;
    exp->fbuf.flags = 0;
    ret = fuse_session_receive_buf(exp->se, &exp->fbuf);
    if (ret == -EINTR)
        return true;
    if (ret == -EAGAIN)
        return false;
    if (ret <= 0 || fuse_session_exited(exp->se)) {
        /* 0: the kernel says ENODEV (unmounted behind our back); anything
         * else is an fd we can no longer use.  Stop watching, else the
         * loop would spin on a permanently readable fd. */
        log_warn("FUSE export '%s': session on '%s' ended (%s)",
                 exp->common.id, exp->mountpoint,
                 ret < 0 ? strerror(-ret) : "unmounted");
        fuse_stop_watching(exp);
        return false;
    }
    if (fresh)   /* learn the size libfuse wants (the first receive is fresh) */
        exp->rx_size = MAX(exp->rx_size, malloc_usable_size(exp->fbuf.mem));
    /* Count this request in flight while processing, so that a reply made
     * inside cannot make a stopping export look drained too early. */
    exp->inflight++;
    fuse_session_process_buf(exp->se, &exp->fbuf);
    exp->inflight--;
    fuse_maybe_drained(exp);
    return !exp->stopping;
}

static void fuse_on_readable(void *opaque, uint32_t revents)
{
    struct fuse_export *exp = opaque;

    for (int i = 0; i < FUSE_RX_BATCH && exp->watch; i++) {
        if (!fuse_receive_one(exp))
            break;
    }
}

void fuse_session_poll_now(struct fuse_export *exp)
{
    if (exp->watch && loop_in_thread(exp->common.loop))
        fuse_on_readable(exp, LOOP_IN);
}

static void fuse_start_in_loop(void *opaque)
{
    struct fuse_export *exp = opaque;

    if (exp->stopping)
        return;
    exp->watch = loop_watch_fd(exp->common.loop, fuse_session_fd(exp->se),
                               LOOP_IN, fuse_on_readable, exp);
    if (!exp->watch)
        log_error("FUSE export '%s': cannot watch the session fd", exp->common.id);
}

void fuse_session_start(struct fuse_export *exp)
{
    int fd = fuse_session_fd(exp->se);
    int fl = fcntl(fd, F_GETFL);

    if (fl >= 0)
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    if (loop_in_thread(exp->common.loop))
        fuse_start_in_loop(exp);
    else
        loop_call(exp->common.loop, fuse_start_in_loop, exp);
}

/* ---- shutdown ---- */

static void fuse_finish_in_main(void *opaque)
{
    struct fuse_export *exp = opaque;

    if (exp->mounted) {
        fuse_session_unmount(exp->se);
        exp->mounted = false;
    }
    fuse_session_destroy(exp->se);
    exp->se = NULL;
    export_shutdown_done(&exp->common);
}

/* Posted to the export's own loop so that the completion which released
 * the last request has fully returned before the main thread frees it. */
static void fuse_drained_in_loop(void *opaque)
{
    loop_call(loop_main(), fuse_finish_in_main, opaque);
}

static void fuse_maybe_drained(struct fuse_export *exp)
{
    if (!exp->stopping || exp->inflight || exp->finishing)
        return;
    exp->finishing = true;
    loop_call(exp->common.loop, fuse_drained_in_loop, exp);
}

/* ---- invalidation after block_resize ----
 * The kernel caches the file's size (attr timeout) and pages.  The
 * notification is written from a thread of its own: invalidating pages
 * waits for page locks that requests being served by this loop may hold.
 * It counts as a request in flight, so the export outlives it. */

static void fuse_inval_done(void *opaque)
{
    struct fuse_export *exp = opaque;
    exp->inflight--;
    fuse_maybe_drained(exp);
}

static void *fuse_inval_thread(void *opaque)
{
    struct fuse_export *exp = opaque;
    int r = fuse_lowlevel_notify_inval_inode(exp->se, FUSE_ROOT_ID, 0, 0);
    if (r < 0 && r != -ENOENT)
        log_warn("FUSE export %s: could not invalidate the cached size: %s",
                 exp->common.id, strerror(-r));
    loop_call(exp->common.loop, fuse_inval_done, exp);
    return NULL;
}

static void fuse_inval_in_loop(void *opaque)
{
    struct fuse_export *exp = opaque;
    pthread_t th;
    pthread_attr_t attr;

    if (exp->stopping)
        return;
    exp->inflight++;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&th, &attr, fuse_inval_thread, exp) != 0) {
        log_warn("FUSE export %s: no thread to invalidate the cached size", exp->common.id);
        fuse_inval_done(exp);
    }
    pthread_attr_destroy(&attr);
}

void fuse_session_node_resized(struct fuse_export *exp)
{
    loop_call(exp->common.loop, fuse_inval_in_loop, exp);
}

static void fuse_stop_in_loop(void *opaque)
{
    struct fuse_export *exp = opaque;

    exp->stopping = true;
    fuse_stop_watching(exp);
    fuse_maybe_drained(exp);
}

void fuse_session_stop(struct fuse_export *exp)
{
    if (loop_in_thread(exp->common.loop) && loop_in_thread(loop_main()) &&
        !exp->inflight && !exp->finishing) {
        /* Nothing in flight, already in the main thread: unmount now, so
         * BLOCK_EXPORT_DELETED precedes the command's reply as in QEMU. */
        exp->stopping = true;
        exp->finishing = true;
        fuse_stop_watching(exp);
        fuse_finish_in_main(exp);
        return;
    }
    if (loop_in_thread(exp->common.loop))
        fuse_stop_in_loop(exp);
    else
        loop_call(exp->common.loop, fuse_stop_in_loop, exp);
}
