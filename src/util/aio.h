/*
 * File I/O engine.  Requests are submitted from a loop's thread and complete
 * in that same thread via req->done.  Engines:
 *   AIO_IO_URING  liburing ring per loop; submissions batched until the loop
 *                 sleeps; completions reaped when the loop sees the ring's
 *                 fd readable.
 *   AIO_NATIVE    Linux AIO (aio-linux.c), as QEMU's aio=native: a context
 *                 per loop, made by its first request; reads and writes
 *                 batched into one io_submit until the loop sleeps;
 *                 completions signalled on an eventfd (edge-triggered, not
 *                 read) and reaped from the context's ring in user memory.
 *                 fdatasync and fallocate go to the pool (Linux AIO has no
 *                 fallocate; many file systems refuse IOCB_CMD_FDSYNC), as
 *                 in QEMU.
 *   AIO_THREADS   shared worker pools doing preadv/pwritev/...: one for calls
 *                 that may block, one sized to the CPUs for AIO_CPU_BOUND
 *                 copies; completions go back to the submitting loop.
 * If io_uring cannot be set up, AIO_IO_URING falls back to AIO_THREADS; if
 * a loop cannot make a Linux AIO context, AIO_NATIVE does too (logged once,
 * as QEMU).  done may be called before aio_submit returns.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

struct loop;

enum aio_kind { AIO_THREADS, AIO_IO_URING, AIO_NATIVE };

enum aio_op {
    AIO_OP_READ,       /* preadv(fd, iov, iovcnt, offset) */
    AIO_OP_WRITE,      /* pwritev */
    AIO_OP_FSYNC,      /* fdatasync */
    AIO_OP_FALLOCATE,  /* fallocate(fd, mode, offset, len) */
    AIO_OP_CALL,       /* res = fn(req) in a pool worker (never inline, never a ring):
                          CPU work kept off the loop; with AIO_CPU_BOUND in the pool
                          sized to the CPUs */
};

#define AIO_NO_INLINE   1u   /* never try inline (O_DIRECT: "non-blocking" still
                                waits for the device) */
#define AIO_INLINE_SYNC 2u   /* do it inline, blocking: RAM-backed files never wait for a device */
#define AIO_NOWAIT_UNSUPPORTED 4u  /* set by aio_submit: the fd refused RWF_NOWAIT */
#define AIO_CPU_BOUND   8u   /* AIO_THREADS: a copy that never waits for a device (RAM-backed
                                file); runs in the pool sized to the CPUs */
#define AIO_DSYNC      16u   /* WRITE: durable when it completes (RWF_DSYNC): a FUA write
                                is one request, not a write and an fdatasync; never
                                tried inline (it waits for the device's flush) */

/* A buffer of the submitter's that rings may register (io_uring fixed
 * buffers): its pages are then pinned once, when the first O_DIRECT request
 * that goes to the ring uses it, instead of at every request (get_user_pages
 * was 14% of the CPU of 1 MiB O_DIRECT writes over NBD).  Registration is
 * best effort: a full table, a lack of locked-memory allowance or an
 * engine without a ring leave the request on the ordinary path.  The owner
 * fills base and len, zeroes the rest, and calls aio_fixed_release() before
 * it frees or reuses the memory for another buffer (from any thread: the
 * ring keeps the pages of requests in flight until they complete). */
struct aio_fixed {
    void *base;
    size_t len;
    /* private */
    struct aio_engine *engine;      /* registered there, at index */
    int index;
};

void aio_fixed_release(struct aio_fixed *f);

struct aio_req {
    enum aio_op op;
    int fd;
    const struct iovec *iov;
    int iovcnt;
    uint64_t offset;
    uint64_t len;        /* FALLOCATE length; READ/WRITE: total iov bytes */
    int mode;            /* FALLOCATE mode */
    unsigned flags;      /* AIO_* flags above */
    /* res: bytes transferred (READ/WRITE) or 0, or -errno. */
    void (*done)(struct aio_req *req, int64_t res);
    struct aio_fixed *fixed;     /* READ/WRITE, optional: a buffer holding iov[0] */
    int64_t (*fn)(struct aio_req *req);   /* CALL: the work (its result is res) */
    /* private */
    struct aio_req *next;
    struct loop *loop;
    int64_t res;
};

void aio_submit(struct loop *l, enum aio_kind kind, struct aio_req *req);

/* Handing finished requests from other threads to one loop: any thread
 * pushes onto *head (lock-free) and wakes the loop only when the push
 * finds the list empty (the return value), so a burst of completions
 * costs one wake-up; the loop takes the whole list, oldest first.  The
 * engine's pool completions and the drivers' completion channels
 * (block/bchan.c) both go this way. */
bool aio_req_push(struct aio_req **head, struct aio_req *r);
struct aio_req *aio_req_take_all(struct aio_req **head);

/* What l's engine has done (l's thread, or with l stopped). */
struct aio_stats {
    uint64_t submit_calls;      /* io_uring_submit: one per loop iteration with new entries */
    uint64_t ring_wakeups;      /* the ring's fd was readable */
    uint64_t ring_completions;  /* completions reaped from the ring */
    uint64_t efd_reads;         /* reads of the eventfd: thread completions only */
    uint64_t native_submit_calls;   /* io_submit: one per loop iteration with new
                                       requests (more if the kernel took part) */
    uint64_t native_wakeups;        /* the Linux AIO eventfd signalled (never read) */
    uint64_t native_completions;    /* completions reaped from the context */
};
void aio_get_stats(struct loop *l, struct aio_stats *st);
/* 0 if a Linux AIO context can be had (one is made and kept for the first
 * loop that needs one), else -errno (EAGAIN: fs.aio-max-nr reached; ENOSYS:
 * no Linux AIO).  Any thread. */
int aio_native_probe(void);
/* "threads" / "io_uring" / "native" -> kind; returns -1 if unknown. */
int aio_kind_parse(const char *s);
