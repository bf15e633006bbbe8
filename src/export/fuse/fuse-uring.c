/*
 * FUSE export: requests and replies over io_uring (Linux 6.14+).
 *
 * Theory of operation.  With FUSE over io_uring the kernel keeps one
 * request queue per CPU (a request goes to the queue of the CPU its
 * application runs on) and hands requests to the server through io_uring
 * commands on the /dev/fuse fd, instead of read()/write():
 *
 *   REGISTER          gives the kernel a ring entry: a header buffer
 *                     (struct ur_header) and a payload buffer; the command
 *                     completes when a request has been copied into them;
 *   COMMIT_AND_FETCH  sends the reply held in the entry's buffers (the
 *                     request's unique id is the commit id) and gives the
 *                     entry back for the next request.
 *
 * The kernel uses the rings only once every CPU's queue has an entry, and
 * only when the INIT reply asked for it (FUSE_OVER_IO_URING) and the fuse
 * module's enable_uring parameter is set.  A REGISTER it refuses turns the
 * feature off for the connection: requests then travel over /dev/fuse,
 * which the queues keep reading anyway (INIT, FORGET and INTERRUPT always
 * do).
 *
 * Each struct fuse_queue (one per loop) owns one io_uring with 128-byte
 * SQEs (the command's arguments live in the SQE) and ur_depth() entries
 * (the export's budget of UR_BUDGET entries shared by every CPU's queue,
 * 2 to 32 each) for each kernel queue given to it; the ring fd is watched
 * by the queue's
 * loop.  A completion carries a request: its headers are copied in front
 * of the payload, so that libfuse sees the same contiguous request as from
 * /dev/fuse, and processed like one.  READs read straight into the entry's
 * payload and WRITEs write from it (it stays the request's until the
 * reply), so the only copies are the kernel's.  Replies arrive through the
 * session's writev hook (fuse-session.c), are put into the entry and
 * committed; the commits of one loop iteration are submitted together.
 *
 * The uapi structures are declared here under our own names: they are
 * ABI, and the system headers may predate them.
 */
#include <errno.h>
#include <inttypes.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <linux/fuse.h>
#include "export/fuse/fuse-export.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/xalloc.h"

/* ---- uapi (include/uapi/linux/fuse.h, protocol 7.42) ---- */
#define UR_IN_OUT_HEADER_SZ 128
#define UR_OP_IN_OUT_SZ     128
#define UR_CMD_REGISTER          1
#define UR_CMD_COMMIT_AND_FETCH  2

struct ur_ent_in_out {
    uint64_t flags;
    uint64_t commit_id;      /* the request's unique id: quote it in the commit */
    uint32_t payload_sz;     /* bytes of the payload buffer in use */
    uint32_t padding;
    uint64_t reserved;
};

struct ur_header {
    char in_out[UR_IN_OUT_HEADER_SZ];   /* fuse_in_header / fuse_out_header */
    char op_in[UR_OP_IN_OUT_SZ];        /* the operation's own header */
    struct ur_ent_in_out ent_in_out;
};

struct ur_cmd_req {
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};

/* ---- ours ---- */
#define UR_DEPTH 32          /* entries per kernel queue, at most */
#define UR_MIN_DEPTH 2       /* ... and at least */
/* Entries of one export over all kernel queues (each has a 1 MiB payload
 * buffer, touched only as far as requests use it): 64 on 2 CPUs (32 per
 * queue), 256 MiB of address space on 32 CPUs (8 per queue) instead of
 * 1 GiB.  BEXD_FUSE_URING_ENTRIES overrides it. */
#define UR_BUDGET 256
#define UR_GAP   4096        /* room for the headers in front of the payload */

struct ur_ent {
    struct fuse_uring *ur;
    uint16_t qid;
    bool in_kernel;          /* a command of ours is pending on it */
    bool dead;               /* the kernel refused or cancelled it */
    uint64_t unique;         /* request held, awaiting our reply (0: none) */
    struct ur_header *hdr;
    char *mem;               /* UR_GAP bytes, then the payload */
    char *payload;
    struct iovec iov[2];
};

struct fuse_uring {
    struct fuse_queue *q;
    struct io_uring ring;
    bool ring_ok;
    struct loop_watch *watch;
    struct ur_ent *ents;
    unsigned nents;
    size_t payload_sz;
    struct ur_ent *cur;      /* entry whose request is being processed */
    struct loop_defer submit;   /* the commands prepared this iteration go in one call */
    unsigned unsubmitted;
    bool stopped;
    bool failed_logged;
};

bool fuse_uring_kernel_enabled(const char **why)
{
    char c = 0;
    FILE *f = fopen("/sys/module/fuse/parameters/enable_uring", "r");

    if (!f) {
        *why = "the kernel has no FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)";
        return false;
    }
    if (fread(&c, 1, 1, f) != 1)
        c = 0;
    fclose(f);
    if (c != 'Y' && c != 'y' && c != '1') {
        *why = "disabled in the kernel: /sys/module/fuse/parameters/enable_uring is N";
        return false;
    }
    return true;
}

/* The kernel keeps a queue per possible CPU (num_possible_cpus()). */
unsigned fuse_uring_nr_cpu_queues(void)
{
    char buf[256];
    unsigned n = 0;
    FILE *f = fopen("/sys/devices/system/cpu/possible", "r");

    if (f) {
        if (fgets(buf, sizeof(buf), f)) {
            /* "0-3" or "0,2-5": the highest number, plus one */
            char *p = buf;
            while (*p) {
                char *end;
                unsigned long v;
                if (*p < '0' || *p > '9') {
                    p++;
                    continue;
                }
                v = strtoul(p, &end, 10);
                if (v + 1 > n)
                    n = v + 1;
                p = end;
            }
        }
        fclose(f);
    }
    return n ? n : 1;
}

static void ur_submit_now(struct fuse_uring *ur)
{
    if (ur->unsubmitted) {
        ur->unsubmitted = 0;
        io_uring_submit(&ur->ring);
    }
}

static void ur_submit_deferred(void *opaque)
{
    ur_submit_now(opaque);
}

static void ur_prep(struct fuse_uring *ur, struct ur_ent *e, uint32_t op, uint64_t commit_id)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ur->ring);
    struct ur_cmd_req *cr;

    if (!sqe) {
        ur_submit_now(ur);
        sqe = io_uring_get_sqe(&ur->ring);
        if (!sqe) {       /* cannot happen: the ring holds every entry's command */
            log_error("FUSE export '%s': io_uring submission queue full", ur->q->exp->common.id);
            e->dead = true;
            return;
        }
    }
    memset(sqe, 0, 2 * sizeof(*sqe));            /* a 128-byte SQE */
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = ur->q->fd;
    sqe->cmd_op = op;
    if (op == UR_CMD_REGISTER) {
        sqe->addr = (uintptr_t)e->iov;
        sqe->len = 2;
    }
    cr = (struct ur_cmd_req *)sqe->cmd;
    cr->qid = e->qid;
    cr->commit_id = commit_id;
    io_uring_sqe_set_data(sqe, e);
    e->in_kernel = true;
    ur->unsubmitted++;
    if (!ur->submit.pending)
        loop_defer(ur->q->loop, &ur->submit);
}

static void ur_log_failure(struct fuse_uring *ur, struct ur_ent *e, int err)
{
    if (ur->failed_logged)
        return;
    ur->failed_logged = true;
    log_warn("FUSE export '%s': the kernel refused io_uring queue %u (%s): serving /dev/fuse",
             ur->q->exp->common.id, e->qid, strerror(err));
}

/* A request was copied into e: hand it to libfuse as /dev/fuse would. */
static void ur_request(struct fuse_uring *ur, struct ur_ent *e)
{
    struct fuse_in_header ih;
    struct fuse_buf fb;
    uint32_t psz = e->hdr->ent_in_out.payload_sz;
    size_t oplen;
    char *start;

    memcpy(&ih, e->hdr->in_out, sizeof(ih));
    if (ih.len < sizeof(ih) + (uint64_t)psz || ih.len - sizeof(ih) - psz > UR_OP_IN_OUT_SZ ||
        psz > ur->payload_sz || !ih.unique) {
        /* Not a request we can parse: fail it, keep the entry. */
        struct fuse_out_header oh = { .len = sizeof(oh), .error = -EIO, .unique = ih.unique };
        log_warn("FUSE export '%s': malformed io_uring request (len %u, payload %u)",
                 ur->q->exp->common.id, ih.len, psz);
        memcpy(e->hdr->in_out, &oh, sizeof(oh));
        e->hdr->ent_in_out.payload_sz = 0;
        ur_prep(ur, e, UR_CMD_COMMIT_AND_FETCH, e->hdr->ent_in_out.commit_id);
        return;
    }
    oplen = ih.len - sizeof(ih) - psz;
    start = e->payload - oplen - sizeof(ih);
    memcpy(start, &ih, sizeof(ih));
    memcpy(start + sizeof(ih), e->hdr->op_in, oplen);
    e->unique = ih.unique;
    memset(&fb, 0, sizeof(fb));
    fb.mem = start;
    fb.size = ih.len;
    ur->q->n_uring++;
    struct ur_ent *outer = ur->cur;
    ur->cur = e;
    fuse_queue_process(ur->q, &fb);
    ur->cur = outer;
}

static void ur_cqe(struct fuse_uring *ur, struct ur_ent *e, int res)
{
    e->in_kernel = false;
    if (res < 0) {
        /* Refused (no io_uring on this connection, bad queue) or
         * cancelled (teardown): the entry is done for. */
        e->dead = true;
        if (res != -ENOTCONN && res != -ECANCELED && !ur->stopped)
            ur_log_failure(ur, e, -res);
        return;
    }
    if (ur->stopped) {
        /* Shutting down: not served; the kernel fails it on unmount. */
        e->dead = true;
        return;
    }
    ur_request(ur, e);
}

void fuse_uring_poll(struct fuse_uring *ur)
{
    struct io_uring_cqe *cqe;

    while (!ur->stopped && io_uring_peek_cqe(&ur->ring, &cqe) == 0) {
        struct ur_ent *e = io_uring_cqe_get_data(cqe);
        int res = cqe->res;

        io_uring_cqe_seen(&ur->ring, cqe);
        if (e)
            ur_cqe(ur, e, res);
    }
}

static void ur_on_readable(void *opaque, uint32_t revents)
{
    fuse_uring_poll(opaque);
}

bool fuse_uring_reply(struct fuse_uring *ur, const struct iovec *iov, int count, ssize_t *ret)
{
    const struct fuse_out_header *oh = iov[0].iov_base;
    struct ur_ent *e = NULL;
    size_t total = 0, off = 0;

    if (ur->cur && ur->cur->unique == oh->unique) {
        e = ur->cur;
    } else {
        for (unsigned i = 0; i < ur->nents; i++) {
            if (ur->ents[i].unique == oh->unique) {
                e = &ur->ents[i];
                break;
            }
        }
    }
    if (!e)
        return false;
    e->unique = 0;
    for (int i = 1; i < count; i++)
        total += iov[i].iov_len;
    memcpy(e->hdr->in_out, oh, sizeof(*oh));
    if (total > ur->payload_sz) {
        /* Never: replies are at most max_read bytes.  Fail the request
         * rather than the connection. */
        struct fuse_out_header err = { .len = sizeof(err), .error = -EIO, .unique = oh->unique };
        memcpy(e->hdr->in_out, &err, sizeof(err));
        total = 0;
    } else {
        for (int i = 1; i < count; i++) {
            if (iov[i].iov_base != e->payload + off)
                memmove(e->payload + off, iov[i].iov_base, iov[i].iov_len);
            off += iov[i].iov_len;
        }
    }
    e->hdr->ent_in_out.payload_sz = total;
    if (ur->stopped) {
        /* No fetch after the stop: the reply must still reach the kernel. */
        ur_prep(ur, e, UR_CMD_COMMIT_AND_FETCH, oh->unique);
        ur_submit_now(ur);
    } else {
        ur_prep(ur, e, UR_CMD_COMMIT_AND_FETCH, oh->unique);
    }
    *ret = (ssize_t)(iov[0].iov_len + total);
    return true;
}

void *fuse_uring_current_payload(struct fuse_uring *ur, size_t *size)
{
    if (!ur->cur)
        return NULL;
    *size = ur->payload_sz;
    return ur->cur->payload;
}

/* Entries per kernel queue: the export's budget shared by every CPU's
 * queue, within [UR_MIN_DEPTH, UR_DEPTH]. */
static unsigned ur_depth(void)
{
    const char *env = getenv("BEXD_FUSE_URING_ENTRIES");
    unsigned long budget = env && *env ? strtoul(env, NULL, 10) : UR_BUDGET;
    unsigned ncpu = fuse_uring_nr_cpu_queues();
    unsigned long d = budget / (ncpu ? ncpu : 1);

    return d < UR_MIN_DEPTH ? UR_MIN_DEPTH : d > UR_DEPTH ? UR_DEPTH : (unsigned)d;
}

struct fuse_uring *fuse_uring_new(struct fuse_queue *q, const uint16_t *qids, unsigned nqids,
                                  error **errp)
{
    struct fuse_uring *ur = xzalloc(sizeof(*ur));
    struct io_uring_params p;
    unsigned depth = ur_depth();
    unsigned n = nqids * depth;
    int ret;

    ur->q = q;
    ur->payload_sz = FUSE_RW_MAX;   /* max_write and max_pages are both 1 MiB */
    ur->submit.fn = ur_submit_deferred;
    ur->submit.opaque = ur;
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;
    p.cq_entries = 2 * n;
    ret = io_uring_queue_init_params(n, &ur->ring, &p);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "cannot create an io_uring with 128-byte entries");
        free(ur);
        return NULL;
    }
    ur->ring_ok = true;
    ur->ents = xcalloc(n, sizeof(*ur->ents));
    ur->nents = n;
    for (unsigned i = 0; i < n; i++) {
        struct ur_ent *e = &ur->ents[i];
        e->ur = ur;
        e->qid = qids[i / depth];
        if (posix_memalign((void **)&e->hdr, 64, sizeof(*e->hdr)) ||
            posix_memalign((void **)&e->mem, FUSE_BUF_ALIGN, UR_GAP + ur->payload_sz)) {
            error_setg(errp, "out of memory for the io_uring buffers");
            fuse_uring_free(ur);
            return NULL;
        }
        memset(e->hdr, 0, sizeof(*e->hdr));
        e->payload = e->mem + UR_GAP;
        e->iov[0].iov_base = e->hdr;
        e->iov[0].iov_len = sizeof(*e->hdr);
        e->iov[1].iov_base = e->payload;
        e->iov[1].iov_len = ur->payload_sz;
    }
    return ur;
}

void fuse_uring_register(struct fuse_queue *q)
{
    struct fuse_uring *ur = q->ur;

    if (ur->watch || ur->stopped)
        return;
    ur->watch = loop_watch_fd(q->loop, ur->ring.ring_fd, LOOP_IN, ur_on_readable, ur);
    if (!ur->watch) {
        log_error("FUSE export '%s': cannot watch the io_uring", q->exp->common.id);
        return;   /* the kernel waits for every queue: it must not get them */
    }
    for (unsigned i = 0; i < ur->nents; i++)
        ur_prep(ur, &ur->ents[i], UR_CMD_REGISTER, 0);
    ur_submit_now(ur);
    log_info("FUSE export '%s': queue %u registered %u io_uring entries", q->exp->common.id,
             q->index, ur->nents);
}

void fuse_uring_stop(struct fuse_uring *ur)
{
    ur->stopped = true;
    if (ur->watch) {
        loop_watch_del(ur->watch);
        ur->watch = NULL;
    }
    ur_submit_now(ur);
}

void fuse_uring_free(struct fuse_uring *ur)
{
    if (!ur)
        return;
    /* Closing the ring cancels the commands waiting for requests; the
     * buffers go after it. */
    if (ur->ring_ok)
        io_uring_queue_exit(&ur->ring);
    for (unsigned i = 0; i < ur->nents; i++) {
        free(ur->ents[i].hdr);
        free(ur->ents[i].mem);
    }
    free(ur->ents);
    /* Pending only after registration, and then freed in q's loop (a
     * loop stopping right after would never run it). */
    loop_defer_cancel(ur->q->loop, &ur->submit);
    free(ur);
}
