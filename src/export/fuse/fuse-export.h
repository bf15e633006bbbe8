/*
 * FUSE export: internal interfaces shared by the files of src/export/fuse.
 *
 *   fuse-export.c   lifecycle: options, mountpoint checks, mount, shutdown
 *   fuse-session.c  the session fd on the export's loop, request slots,
 *                   receive-buffer pool, in-flight accounting and draining
 *   fuse-ops.c      the low-level operations (getattr, read, write, ...)
 *   fuse-resize.c   growing/truncating the node from the main thread
 *
 * Threads: create/shutdown/free and the mount run in the main thread; all
 * session I/O (receive, process, reply) runs in exp->common.loop's thread.
 * The two meet only through loop_call() and the atomic open-handle count.
 */
#pragma once
#define FUSE_USE_VERSION 31
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <fuse_lowlevel.h>
#include "block/block.h"
#include "export/client-stats.h"
#include "export/export.h"

/* Largest read/write we accept in one request (and advertise as max_read /
 * max_write): libfuse's receive buffer holds 1 MiB of payload. */
#define FUSE_RW_MAX        (1u << 20)
/* Requests read from the fd per readable event before yielding to the loop. */
#define FUSE_RX_BATCH      32
/* Idle request slots and receive buffers kept for reuse. */
#define FUSE_POOL_KEEP     64
/* Alignment of data buffers we allocate (O_DIRECT memory alignment). */
#define FUSE_BUF_ALIGN     4096u
/* Largest single write-zeroes/discard handed to the block layer. */
#define FUSE_ZERO_CHUNK    (1ull << 30)

struct fuse_export;
struct fuse_ioreq;

typedef void fuse_ioreq_fn(struct fuse_ioreq *r, int ret);

/* One in-flight asynchronous request. */
struct fuse_ioreq {
    struct breq breq;
    struct fuse_export *exp;
    fuse_req_t req;
    void *mem;                  /* owned buffer (a receive buffer) or NULL */
    struct iovec iov;
    uint64_t offset;            /* chunked operations: next offset */
    uint64_t remaining;         /* chunked operations: bytes still to do */
    uint64_t new_size;          /* resize target */
    unsigned zero_flags;        /* BREQ_* flags of chunked write-zeroes */
    int whence_or_mode;         /* fallocate mode */
    struct stat attr;           /* setattr: requested attributes */
    int to_set;                 /* setattr: FUSE_SET_ATTR_* */
    fuse_ioreq_fn *next_step;   /* continuation after a resize */
    void (*breq_done)(struct breq *, int);   /* after accounting */
    int resize_ret;
    struct fuse_ioreq *next_free;
};

struct fuse_export {
    struct export common;
    char *mountpoint;
    bool growable;
    bool allow_other;           /* the mount was made with allow_other */
    struct fuse_session *se;
    bool mounted;
    /* Mode and owner reported by getattr (chmod/chown may change them). */
    mode_t st_mode;
    uid_t st_uid;
    gid_t st_gid;
    bool stop_requested;        /* main thread: shutdown() already ran */
    bool self_resizing;         /* main thread: the resize is this export's own */
    /* Path of the leaf file for st_blocks, or NULL. */
    char *alloc_path;

    /* ---- loop thread only ---- */
    struct loop_watch *watch;
    struct fuse_buf fbuf;       /* receive buffer of the request being processed */
    size_t rx_size;             /* usable size of libfuse's receive buffers */
    unsigned inflight;          /* requests started and not yet replied */
    bool stopping;              /* shutdown requested: read no more requests */
    bool finishing;             /* the main-thread finish has been queued */
    void *buf_pool;             /* idle receive buffers (singly linked through their first word) */
    unsigned buf_pool_len;
    struct fuse_ioreq *req_pool;
    unsigned req_pool_len;

    /* ---- any thread ---- */
    int open_handles;           /* __atomic: files open on the mountpoint */
    int64_t mounted_at;         /* the kernel's mount is this export's one client */
    struct client_stats st;     /* what it did (written by the loop) */
};

/* fuse-session.c */
extern const struct fuse_lowlevel_ops fuse_export_ops;
void fuse_session_start(struct fuse_export *exp);     /* main thread */
void fuse_session_stop(struct fuse_export *exp);      /* main thread */
/* The node changed size under the export (block_resize): drop the
 * kernel's cached size and pages. */
void fuse_session_node_resized(struct fuse_export *exp);   /* main thread */
/* Serve what the kernel has queued now, when called in the export's loop. */
void fuse_session_poll_now(struct fuse_export *exp);
void fuse_session_free_pools(struct fuse_export *exp);
struct fuse_ioreq *fuse_ioreq_get(struct fuse_export *exp, fuse_req_t req);
void fuse_ioreq_put(struct fuse_ioreq *r);
/* Take the receive buffer holding `data` for r (no copy), or copy `len`
 * bytes into an aligned buffer (data not in the receive buffer, or a node
 * that needs aligned memory). */
int  fuse_ioreq_take_data(struct fuse_ioreq *r, const void *data, size_t len);
/* r->mem: a buffer holding len bytes at a page-aligned r->iov.iov_base. */
int  fuse_ioreq_alloc(struct fuse_ioreq *r, size_t len);
void fuse_ioreq_submit(struct fuse_ioreq *r, enum breq_op op, unsigned flags,
                       uint64_t offset, uint64_t len,
                       void (*done)(struct breq *, int));

/* fuse-resize.c: set the node's size to r->new_size in the main thread,
 * then run r->next_step(r, 0 or -errno) in the export's loop.
 * grow_only: do nothing when the node is already at least that large. */
void fuse_resize(struct fuse_ioreq *r, bool grow_only, fuse_ioreq_fn *next);

/* fuse-ops.c helpers used by setattr after a resize */
void fuse_reply_attr_of(struct fuse_export *exp, fuse_req_t req);
