/*
 * FUSE export: internal interfaces shared by the files of src/export/fuse.
 *
 *   fuse-export.c   lifecycle: options, mountpoint checks, mount, shutdown
 *   fuse-session.c  the session fd on the export's loop, request slots,
 *                   receive-buffer pool, in-flight accounting and draining
 *   fuse-ops.c      the low-level operations (getattr, read, write, ...)
 *   fuse-resize.c   growing/truncating the node from the main thread
 *   fuse-uring.c    FUSE over io_uring: the request rings of a queue
 *
 * Threads: create/shutdown/free and the mount run in the main thread.  The
 * session is served by one or more queues (struct fuse_queue), one per
 * loop: the export's loop, or each iothread of a multi-threaded export
 * (`iothread` given as a list).  Queue 0 reads the session's /dev/fuse fd,
 * the others a clone of it (FUSE_DEV_IOC_CLONE); with io_uring, the queue
 * of a loop also owns the FUSE io_uring queues (one per CPU) given to it.
 * A request is received, processed and replied in its queue's loop; the
 * threads meet only through loop_call() and the atomic open-handle count.
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
/* Requests in flight per queue: past it the queue stops reading its
 * /dev/fuse fd (the kernel keeps the rest queued) until one is answered.
 * Each holds a receive buffer (a WRITE) or a pooled one (a READ) of
 * FUSE_RX_ALLOC bytes.  The kernel bounds background requests (readahead,
 * asynchronous direct I/O) by max_background, which bexd sets to this
 * same number at INIT, and serializes writes, fsync and fallocate on the
 * inode; this makes the bound bexd's own rather than the kernel's.
 * BEXD_FUSE_MAX_INFLIGHT (environment, read at export creation) may lower
 * it, for tests.  io_uring entries are a fixed set, bounded by themselves. */
#define FUSE_MAX_INFLIGHT  64
/* Alignment of data buffers we allocate (O_DIRECT memory alignment). */
#define FUSE_BUF_ALIGN     4096u
/* Largest single write-zeroes/discard handed to the block layer. */
#define FUSE_ZERO_CHUNK    (1ull << 30)

struct fuse_export;
struct fuse_ioreq;
struct fuse_queue;
struct fuse_uring;

typedef void fuse_ioreq_fn(struct fuse_ioreq *r, int ret);

/* One in-flight asynchronous request. */
struct fuse_ioreq {
    struct breq breq;
    struct fuse_export *exp;
    struct fuse_queue *q;       /* the queue that received it: replies from its loop */
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

/* One queue: a /dev/fuse fd (and io_uring rings) served by one loop. */
struct fuse_queue {
    struct fuse_export *exp;
    unsigned index;
    struct loop *loop;
    int fd;                     /* the session fd (queue 0) or a clone */
    /* ---- this queue's loop thread only ---- */
    struct loop_watch *watch;
    struct fuse_buf fbuf;       /* request being processed: fbuf.mem = rx_buf + FUSE_RX_SKEW */
    char *rx_buf;               /* receive buffer behind fbuf.mem, or NULL (taken by a WRITE) */
    unsigned inflight;          /* requests started and not yet replied */
    bool rx_paused;             /* fd not watched: FUSE_MAX_INFLIGHT in flight */
    bool rx_lone;               /* the client sends one request at a time (qd 1): read
                                   one per readable event (fuse_on_readable) */
    bool stopping;              /* shutdown requested: read no more requests */
    bool drained_posted;        /* this queue's drain has been reported */
    bool quiescing;             /* moving: no more reading; hand over when idle */
    bool handoff_posted;        /* ... the hand-over is queued */
    bool watch_on;              /* ... it watched its fd before */
    void *buf_pool;             /* idle buffers of FUSE_RX_ALLOC bytes (linked through their first word) */
    unsigned buf_pool_len;
    struct fuse_ioreq *req_pool;
    unsigned req_pool_len;
    struct fuse_uring *ur;      /* FUSE io_uring queues served here, or NULL */
    uint64_t n_dev, n_uring;    /* requests received over /dev/fuse and io_uring */
    struct client_stats st;     /* what this queue served (its loop writes) */
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

    struct fuse_queue *queues;
    unsigned nqueues;
    unsigned max_inflight;      /* FUSE_MAX_INFLIGHT, or lower (test knob) */
    unsigned queues_drained;    /* main thread: queues done after a stop */
    bool finishing;             /* main thread: unmount queued or done */
    bool moving;                /* main thread: x-blockdev-set-iothread under way */
    bool stop_after_move;       /* main thread: shutdown came meanwhile */
    unsigned invals;            /* main thread: cache invalidation threads running */
    bool finish_after_invals;   /* main thread: drained, waiting for them */
    unsigned rings_open;        /* main thread: finishing, queue rings not yet closed (+1) */
    /* __org.bexd_io-uring asked and usable (the rings exist): INIT asks the
     * kernel for FUSE over io_uring, then the queues register. */
    bool want_uring;
    uint64_t init_unique;       /* queue 0: the INIT request being answered */

    /* ---- any thread ---- */
    int open_handles;           /* __atomic: files open on the mountpoint */
    int64_t mounted_at;         /* the kernel's mount is this export's one client */
};

/* fuse-session.c */
extern const struct fuse_lowlevel_ops fuse_export_ops;
/* Make the queues (clone fds, io_uring rings) and install the session's
 * custom I/O; main thread, after the mount. */
int  fuse_queues_setup(struct fuse_export *exp, bool io_uring, error **errp);
void fuse_queues_free(struct fuse_export *exp);
void fuse_session_start(struct fuse_export *exp);     /* main thread */
void fuse_session_stop(struct fuse_export *exp);      /* main thread */
/* The node changed size under the export (block_resize): drop the
 * kernel's cached size and pages (from a thread of its own). */
void fuse_session_node_resized(struct fuse_export *exp);   /* main thread */
/* x-blockdev-set-iothread (main thread): can the session move, and move it
 * to exp->common.loop (quiesced first; see fuse-session.c). */
bool fuse_session_can_move(struct fuse_export *exp, error **errp);
void fuse_session_move(struct fuse_export *exp);
/* Serve what the kernel has queued now on every queue (main thread): in
 * this loop at once, in the others' loops waiting up to 200 ms for them. */
void fuse_session_poll_now(struct fuse_export *exp);
/* The queue whose request is being processed in this thread (set around
 * fuse_session_process_buf), or NULL. */
struct fuse_queue *fuse_current_queue(void);
/* Process one request held in buf (either transport). */
void fuse_queue_process(struct fuse_queue *q, struct fuse_buf *buf);
void fuse_queue_maybe_drained(struct fuse_queue *q);
struct fuse_ioreq *fuse_ioreq_get(struct fuse_export *exp, fuse_req_t req);
void fuse_ioreq_put(struct fuse_ioreq *r);
/* Take the receive buffer holding `data` for r (no copy), or copy `len`
 * bytes into an aligned buffer (data not in the receive buffer, or not
 * aligned as the node needs: counted in the queue's write-copied-bytes). */
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

/* fuse-uring.c: FUSE over io_uring (Linux 6.14+).  A queue's rings serve the
 * kernel's io_uring queues qids[0..nqids); all of it runs in q's loop except
 * new (main thread, before start) and a free before start (main thread): once
 * registered, the rings are freed in q's loop (fuse-session.c). */
bool fuse_uring_kernel_enabled(const char **why);
unsigned fuse_uring_nr_cpu_queues(void);
struct fuse_uring *fuse_uring_new(struct fuse_queue *q, const uint16_t *qids, unsigned nqids,
                                  error **errp);
void fuse_uring_free(struct fuse_uring *ur);
/* After the INIT reply: register every entry (q's loop). */
void fuse_uring_register(struct fuse_queue *q);
/* Stop watching the ring (q's loop). */
void fuse_uring_stop(struct fuse_uring *ur);
/* Reap what the kernel delivered (q's loop). */
void fuse_uring_poll(struct fuse_uring *ur);
/* A reply to a request that came over q's rings: true if it was one (sent
 * or failed), false to send it on /dev/fuse. */
bool fuse_uring_reply(struct fuse_uring *ur, const struct iovec *iov, int count, ssize_t *ret);
/* The payload buffer of the ring entry whose request is being processed
 * (a page-aligned buffer of *size bytes), or NULL. */
void *fuse_uring_current_payload(struct fuse_uring *ur, size_t *size);
