/*
 * The vhost-user-blk export: block-export-add type "vhost-user-blk".
 *
 * Theory of operation.  create() checks the options in QEMU 7.2's order
 * and with its messages (logical-block-size, num-queues, address type),
 * listens on the UNIX socket (or the passed fd) from the main thread, and
 * hands the listening fd to the export's loop (exp->loop: an iothread's or
 * the main loop), where everything else runs, except the virtqueues of an
 * export whose `iothread` is a list: queue i runs in iothread i mod n (see
 * "queues in other loops" below).
 *
 * One front-end at a time, as QEMU: while a client is connected, or while
 * a disconnected one still has requests in flight, the listening socket is
 * not watched; when the last request of a dropped client completes, its
 * memory is unmapped (the vq_mem references), it is freed, and the next
 * front-end is accepted.  The export is never recreated for a reconnect.
 *
 * Data path.  A kick (eventfd readable) pops every available chain into a
 * preallocated slot of its queue (as many slots as ring entries, at most
 * VUB_MAX_INFLIGHT, so the data path never allocates; with every slot busy
 * the rest wait in the ring until a slot is released) and gives it to the
 * virtio-blk handler, whose
 * block requests point straight into guest memory.  A completion puts the
 * head on the used ring at once; the call eventfd is signalled once per
 * loop iteration per queue (loop_defer), EVENT_IDX permitting.
 *
 * A ring the guest broke (bad descriptor, loop, address outside its
 * memory) gets its bad head completed with length 0, then the front-end is
 * dropped; other exports are unaffected.  So is a front-end that truncated
 * the files behind its memory (the SIGBUS guard of virtq.h replaced the
 * mapping with zeros and flagged it): checked after every batch of pops
 * and every completion.
 *
 * Shutdown: shutdown() (main thread) forwards to the export's loop, which
 * stops listening, drops the client (or, for mode hide, waits for it to
 * leave), and once nothing is in flight calls export_shutdown_done() back
 * in the main thread.
 *
 * Moving (x-blockdev-set-iothread), as QEMU drains then moves: the main
 * thread asks the loop that runs the export (vx->loop) to quiesce it.  It
 * drops its watches at once (listener, vhost-user socket, kicks: no new
 * message or request is taken), lets the requests in flight complete and
 * their deferred notify / resume / free run, then hands the export to the
 * main thread, which posts it to the export's new loop; there the watches
 * come back as they were and every started ring is processed (the guest
 * may have queued requests meanwhile; their kicks are still pending on the
 * eventfds).  The main thread posts nothing else to it during a move: a
 * shutdown or a resize notice waits for the move's end.  An export on
 * several iothreads is never moved (it stays in them, as in QEMU 10.1).
 */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include "export/client-stats.h"
#include "export/export.h"
#include "export/vhost-user-blk/vhost-user.h"
#include "export/vhost-user-blk/virtio-blk.h"
#include "util/accept.h"
#include "util/cleanup.h"
#include "util/log.h"
#include "util/loop.h"
#include "util/sockets.h"
#include "util/xalloc.h"
#include "util/opts.h"

#define VUB_EARLY_NOTIFY_BYTES (256u << 10)
#define VUB_MAX_IOV 258          /* seg_max + header + status, with room for region splits */
/* Requests in flight per queue: slots are allocated for min(ring size,
 * this).  The front-end picks the ring size (up to VIRTQ_MAX_SIZE, 32768);
 * QEMU's own virtqueues are at most 1024 entries, so no guest QEMU runs
 * has more in flight, and past it the rest wait in the ring, taken as
 * slots free.  Bounds a queue's slots at 1024 * sizeof(struct vub_slot)
 * (about 4.3 MiB) instead of 32768 of them (141 MiB). */
#define VUB_MAX_INFLIGHT 1024

struct vub_queue;

struct vub_slot {
    struct vblk_req r;           /* first: the handler's request */
    struct vub_queue *q;
    struct vq_mem *mem;          /* pins the mapping the iovecs point into */
    unsigned gen;
    uint16_t head;
    struct vub_slot *next_free;  /* also: completed while the queue was parked */
    struct iovec iov[VUB_MAX_IOV];
};

/* Everything here belongs to the queue's loop (q->loop), except where the
 * control loop may touch it while the queue is parked (see "Queues in other
 * loops" below). */
struct vub_queue {
    struct vub_client *cl;
    struct vu_vq *vq;
    struct loop *loop;           /* serves the kick fd, pops, completions, calls */
    bool remote;                 /* loop is not the client's control loop */
    struct loop_watch *kick_w;
    struct vub_slot *slots;
    unsigned nslots, busy;
    struct vub_slot *free;
    struct loop_defer notify;
    bool notify_queued;
    bool starved;
    bool kick_on;                /* watched its kick fd before a move */
    bool parked;                 /* remote: the control loop owns the ring state now */
    bool broken;                 /* remote: asked the control loop to drop the client */
    bool released;               /* dropped its reference on the dead client */
    const char *drop_why;
    struct vub_slot *parked_done;  /* completed while parked: pushed when unparked */
    uint64_t unsignalled_bytes;  /* completed since the last signal */
};

struct vub_client {
    struct vub_export *vx;
    struct vu_conn conn;
    int fd;
    struct loop *ctl;            /* the control loop: socket, messages, lifetime */
    struct loop_watch *sock_w;
    struct vub_queue *queues;
    unsigned nremote;            /* queues served by other loops */
    int refs;                    /* atomic: freed (in ctl) when it reaches 0 */
    int parking;                 /* atomic: remote queues yet to park */
    bool park_active;            /* ctl: a park round is under way */
    bool want_read, want_resume; /* ctl: what to do once the queues are parked */
    bool dropping;               /* ctl: client_drop waits for the park */
    bool all_parked;             /* ctl: in park_done_fn, every remote queue parked */
    bool dead;                   /* atomic loads where queues read it */
    bool resume_queued;
    struct loop_defer resume;
};

/* A queue's counters: one writer (the loop serving the queue), read by the
 * main thread for __org.bexd_query-export-clients and /metrics. */
struct vub_qacct {
    struct client_stats st;
    uint64_t started;            /* requests taken from the ring */
    int tid;                     /* the thread that completed the last request */
    const char *iothread;        /* the iothread serving the queue, or NULL */
};

struct vub_export {
    struct export exp;           /* first */
    struct vub_qacct *acct;      /* one per queue, for the export's life */
    struct client_stats base;    /* the sum of acct when the front-end connected */
    int peer_pid;                /* of the front-end connected now (SO_PEERCRED) */
    int64_t connected_at;
    json_t *addr;
    int listen_fd;
    struct loop_watch *listen_w;
    struct accept_backoff backoff;   /* out of fds: listening paused */
    struct vblk_dev dev;
    uint8_t wce;                 /* config space wce, as the guest last wrote it */
    struct vub_client *client;
    bool stopping;
    enum export_remove_mode mode;
    struct loop *loop;           /* runs the export; main changes it only during a move */
    bool quiescing;              /* vx->loop: handing over once idle */
    bool listen_on;              /* ... watched its listener before */
    bool moving;                 /* main: a move is under way */
    bool stop_after_move;        /* main: shutdown() came meanwhile */
    bool resize_after_move;      /* main: node_resized() came meanwhile */
};

static void vub_try_handoff(struct vub_export *vx);

static void client_drop(struct vub_client *cl, const char *why);
static void client_free_fn(void *opaque);
static void process_queue(struct vub_queue *q);
static void maybe_finish(struct vub_export *vx);
static void queue_request_drop(struct vub_queue *q, const char *why);
static void queue_maybe_release(struct vub_queue *q);

static bool client_dead(struct vub_client *cl)
{
    return __atomic_load_n(&cl->dead, __ATOMIC_ACQUIRE);
}

static void client_ref(struct vub_client *cl)
{
    __atomic_add_fetch(&cl->refs, 1, __ATOMIC_RELAXED);
}

/* From any loop; the client is freed in its control loop. */
static void client_unref(struct vub_client *cl)
{
    if (__atomic_sub_fetch(&cl->refs, 1, __ATOMIC_ACQ_REL) == 0)
        loop_call(cl->ctl, client_free_fn, cl);
}

/* May the queue's loop work on the ring now? */
static bool queue_live(struct vub_queue *q)
{
    return !q->parked && !q->broken && !client_dead(q->cl);
}

/* ---- completions -------------------------------------------------------------- */

static void notify_now(struct vub_queue *q);

static void notify_fn(void *opaque)
{
    struct vub_queue *q = opaque;
    struct vu_vq *vq = q->vq;

    q->notify_queued = false;
    if (client_dead(q->cl)) {
        queue_maybe_release(q);
        return;
    }
    if (q->parked)
        return;                 /* unparking signals and pops */
    notify_now(q);
    if (q->cl->vx->quiescing) {
        vub_try_handoff(q->cl->vx);      /* starved stays: resumed after the move */
        return;
    }
    if (q->starved && vq->started && queue_live(q)) {
        q->starved = false;
        process_queue(q);
    }
}

/* Signal the guest now if it wants it (EVENT_IDX permitting). */
static void notify_now(struct vub_queue *q)
{
    struct vu_vq *vq = q->vq;

    q->unsignalled_bytes = 0;
    if (vq->q.used && vq->call_fd >= 0 && virtq_should_notify(&vq->q))
        eventfd_write(vq->call_fd, 1);
}

static void schedule_notify(struct vub_queue *q)
{
    if (!q->notify_queued) {
        q->notify_queued = true;
        loop_defer(q->loop, &q->notify);
    }
}

static void resume_call_fn(void *opaque);

static void slot_release(struct vub_slot *s)
{
    struct vub_queue *q = s->q;
    struct vub_client *cl = q->cl;

    vq_mem_unref(s->mem);
    s->mem = NULL;
    s->next_free = q->free;
    q->free = s;
    q->busy--;
    if (client_dead(cl)) {
        queue_maybe_release(q);
        return;
    }
    if (q->starved)
        schedule_notify(q);     /* notify_fn pops what waits in the ring */
    /* blocked_vq changes only while this queue is parked (or in this loop) */
    if (cl->conn.blocked_vq == (int)q->vq->idx && q->vq->q.inflight == 0) {
        if (!q->remote) {
            if (!cl->resume_queued) {
                cl->resume_queued = true;
                client_ref(cl);
                loop_defer(cl->ctl, &cl->resume);
            }
        } else {
            client_ref(cl);
            loop_call(cl->ctl, resume_call_fn, cl);
        }
    }
    if (!q->remote && cl->vx->quiescing)
        vub_try_handoff(cl->vx);
}

/* Put a head on the used ring, unless the ring was forgotten meanwhile. */
static void slot_push(struct vub_slot *s, uint32_t len)
{
    struct vub_queue *q = s->q;

    if (!client_dead(q->cl) && s->gen == q->vq->gen && q->vq->q.used) {
        virtq_push(&q->vq->q, s->head, len);
        /* Small requests are signalled in one batch per loop iteration;
         * after large ones (page-cache hits complete inline, one after
         * the other) the guest hears at once and can refill the ring
         * while the next ones are copied. */
        q->unsignalled_bytes += s->r.breq.len;
        if (q->unsignalled_bytes >= VUB_EARLY_NOTIFY_BYTES)
            notify_now(q);
        else
            schedule_notify(q);
    }
}

/* Did the front-end shrink the memory behind a mapping we use? */
static bool client_mem_faulted(struct vub_client *cl, struct vq_mem *extra)
{
    if (vq_mem_faulted(cl->conn.mem) || vq_mem_faulted(extra))
        return true;
    for (unsigned i = 0; i < cl->conn.nvqs; i++)
        if (vq_mem_faulted(cl->conn.vqs[i].ring_mem))
            return true;
    return false;
}

static int thread_id(void)
{
    static __thread int tid;

    if (!tid)
        tid = (int)gettid();
    return tid;
}

static void slot_account(struct vub_slot *s)
{
    struct vub_qacct *a = &s->q->cl->vx->acct[s->q - s->q->cl->queues];
    const struct breq *b = &s->r.breq;

    if (a->tid != thread_id())
        __atomic_store_n(&a->tid, thread_id(), __ATOMIC_RELAXED);
    client_stats_account(&a->st, client_op_of(b->op), b->len, b->acct_lat_ns,
                         s->r.result == VIRTIO_BLK_S_OK ? 0 : -EIO);
}

/* Push a completed slot and let it go (the queue is not parked). */
static void slot_finish(struct vub_slot *s)
{
    struct vub_queue *q = s->q;

    slot_push(s, s->r.in_len);
    if (!client_dead(q->cl) && !q->broken && client_mem_faulted(q->cl, s->mem))
        queue_request_drop(q, "the front-end truncated its guest memory");
    slot_release(s);
}

static void slot_complete(struct vblk_req *r)
{
    struct vub_slot *s = (struct vub_slot *)r;
    struct vub_queue *q = s->q;

    slot_account(s);
    if (q->parked && !client_dead(q->cl)) {
        /* the control loop may be re-pointing the ring: push when unparked */
        s->next_free = q->parked_done;
        q->parked_done = s;
        return;
    }
    slot_finish(s);
}

/* ---- request intake -------------------------------------------------------------- */

static struct vub_slot *slot_get(struct vub_queue *q)
{
    struct vub_slot *s = q->free;

    q->free = s->next_free;
    q->busy++;
    s->q = q;
    s->gen = q->vq->gen;
    s->mem = q->cl->conn.mem;
    vq_mem_ref(s->mem);
    s->r.loop = q->loop;
    s->r.breq.op = BREQ_CACHE;   /* "other" until the handler submits it */
    s->r.breq.len = 0;
    s->r.breq.acct_lat_ns = 0;
    struct vub_qacct *a = &q->cl->vx->acct[q - q->cl->queues];
    __atomic_store_n(&a->started, a->started + 1, __ATOMIC_RELAXED);
    return s;
}

/* Returns false when the queue is broken (the client is being dropped). */
static bool pop_one(struct vub_queue *q, bool *empty)
{
    struct vub_client *cl = q->cl;
    struct vub_slot *s = q->free;
    struct virtq_elem e = { .iov = s->iov, .max_iov = VUB_MAX_IOV };
    int r = virtq_pop(&q->vq->q, cl->conn.mem, &e);

    *empty = r == 0;
    if (r == 0)
        return true;
    if (r == -EPROTO) {
        queue_request_drop(q, "virtqueue avail ring is corrupt");
        return false;
    }
    /* The queue's own requests: other queues may run in other loops. */
    bool alone = q->busy == 0 && virtq_avail(&q->vq->q) == 0;
    s = slot_get(q);
    s->head = e.head;
    s->r.alone = alone;
    if (r < 0) {
        log_warn("vhost-user-blk: %s: queue %u: bad descriptor chain at head %u (%s)",
                 cl->vx->exp.id, q->vq->idx, e.head, strerror(-r));
        slot_push(s, 0);
        slot_release(s);
        queue_request_drop(q, "malformed descriptor chain");
        return false;
    }
    s->r.complete = slot_complete;
    if (vblk_handle(&cl->vx->dev, &s->r, s->iov, e.out_num, e.in_num) < 0) {
        log_warn("vhost-user-blk: %s: queue %u: request without header or status byte",
                 cl->vx->exp.id, q->vq->idx);
        slot_push(s, 0);
        slot_release(s);
    }
    return true;
}

static void process_queue(struct vub_queue *q)
{
    bool empty = false;

    for (;;) {
        while (q->free && queue_live(q) && q->vq->started) {
            if (!pop_one(q, &empty))
                return;
            if (empty)
                break;
        }
        if (queue_live(q) && client_mem_faulted(q->cl, NULL))
            queue_request_drop(q, "the front-end truncated its guest memory");
        if (!queue_live(q) || !q->vq->started)
            return;
        if (!q->free) {
            q->starved = true;      /* resumed when a slot is released */
            return;
        }
        if (!virtq_enable_kick(&q->vq->q))
            return;
    }
}

static void kick_cb(void *opaque, uint32_t revents)
{
    struct vub_queue *q = opaque;
    uint64_t v;
    ssize_t n = read(q->vq->kick_fd, &v, sizeof(v));

    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        queue_request_drop(q, "kick fd closed or failed");
        return;
    }
    process_queue(q);
}

/* ---- queues in other loops ---------------------------------------------------------
 *
 * With `iothread` given as a list, queue i is served by iothread i % n (as
 * QEMU's iothread-vq-mapping assigns virtqueues round-robin): its kick fd,
 * its pops, its completions and its call fd live in that loop, and nothing
 * on the data path is shared with another queue but the memory table's
 * atomic reference count.  The front-end's socket, the vhost-user state and
 * the client's lifetime stay in the control loop (the export's first
 * iothread).
 *
 * A vhost-user message may re-point rings (SET_MEM_TABLE, SET_VRING_ADDR),
 * stop them (GET_VRING_BASE, SET_VRING_KICK, RESET_OWNER) or start them.
 * So before the control loop reads the socket it parks every remote queue:
 * each queue's loop stops watching its kick fd and keeps the completions
 * that arrive meanwhile instead of pushing them; when the last queue has
 * parked, the control loop reads and applies the messages, and unparks
 * the queues: each pushes what completed meanwhile, watches its kick fd
 * again if its ring runs, and pops.  Messages are rare after set-up, so
 * this costs nothing on the data path.  No thread ever waits for another.
 *
 * A queue's loop that finds the ring broken (or the memory truncated) stops
 * the queue and asks the control loop to drop the client.  Dropping parks
 * the queues first too; the client is freed when every queue's loop has
 * let go of it (no request in flight, no signal queued).
 */

static void park_done_fn(void *opaque);

static void park_fn(void *opaque)
{
    struct vub_queue *q = opaque;
    struct vub_client *cl = q->cl;

    q->parked = true;
    if (q->kick_w)
        loop_watch_del(q->kick_w);
    q->kick_w = NULL;
    if (__atomic_sub_fetch(&cl->parking, 1, __ATOMIC_ACQ_REL) == 0)
        loop_call(cl->ctl, park_done_fn, cl);     /* passes this call's reference on */
    else
        client_unref(cl);
}

/* Control loop: park every remote queue, then run what is wanted. */
static void park_start(struct vub_client *cl)
{
    if (cl->park_active)
        return;
    cl->park_active = true;
    if (cl->sock_w)
        loop_watch_set(cl->sock_w, 0);
    __atomic_store_n(&cl->parking, (int)cl->nremote, __ATOMIC_RELEASE);
    for (unsigned i = 0; i < cl->conn.nvqs; i++) {
        struct vub_queue *q = &cl->queues[i];
        if (q->remote) {
            client_ref(cl);
            loop_call(q->loop, park_fn, q);
        }
    }
}

static void unpark_fn(void *opaque)
{
    struct vub_queue *q = opaque;
    struct vub_client *cl = q->cl;
    struct vub_slot *done = q->parked_done;

    q->parked = false;
    q->parked_done = NULL;
    while (done) {
        struct vub_slot *s = done;
        done = s->next_free;
        slot_finish(s);
    }
    if (queue_live(q)) {
        notify_now(q);
        if (q->vq->started && q->vq->kick_fd >= 0) {
            q->kick_w = loop_watch_fd(q->loop, q->vq->kick_fd, LOOP_IN, kick_cb, q);
            if (!q->kick_w)
                queue_request_drop(q, "cannot watch the kick fd");
            else
                process_queue(q);
        }
    }
    client_unref(cl);
}

/* A remote queue of a client now dead: let go of what it still holds. */
static void dead_fn(void *opaque)
{
    struct vub_queue *q = opaque;
    struct vub_client *cl = q->cl;
    struct vub_slot *done = q->parked_done;

    q->parked_done = NULL;
    while (done) {
        struct vub_slot *s = done;
        done = s->next_free;
        slot_release(s);
    }
    queue_maybe_release(q);
    client_unref(cl);
}

/* In the queue's loop: a dead client's queue lets go of it once nothing of
 * it is in flight or queued there. */
static void queue_maybe_release(struct vub_queue *q)
{
    if (q->released || !client_dead(q->cl) || q->busy || q->notify_queued || q->parked_done)
        return;
    q->released = true;
    client_unref(q->cl);
}

static void drop_req_fn(void *opaque)
{
    struct vub_queue *q = opaque;
    struct vub_client *cl = q->cl;

    client_drop(cl, q->drop_why);
    client_unref(cl);
}

/* In the queue's loop: the ring or the memory is broken. */
static void queue_request_drop(struct vub_queue *q, const char *why)
{
    if (!q->remote) {
        client_drop(q->cl, why);
        return;
    }
    if (q->broken)
        return;
    q->broken = true;
    q->drop_why = why;
    if (q->kick_w)
        loop_watch_del(q->kick_w);
    q->kick_w = NULL;
    client_ref(q->cl);
    loop_call(q->cl->ctl, drop_req_fn, q);
}

/* ---- device ops (called from vu_conn_readable) ------------------------------------ */

static uint64_t op_features(void *opaque)
{
    struct vub_client *cl = opaque;
    return vblk_features(&cl->vx->dev);
}

static void op_get_config(void *opaque, uint8_t *buf, uint32_t len)
{
    struct vub_client *cl = opaque;
    struct virtio_blk_config cfg;

    vblk_config(&cl->vx->dev, &cfg);
    cfg.wce = cl->vx->wce;
    memcpy(buf, &cfg, MIN(len, sizeof(cfg)));
}

static int op_set_config(void *opaque, const uint8_t *data, uint32_t offset,
                         uint32_t size, uint32_t flags)
{
    struct vub_client *cl = opaque;

    /* Only the front-end's write of wce, as QEMU (no migration). */
    if (flags != 0 || offset != offsetof(struct virtio_blk_config, wce) || size != 1)
        return -EINVAL;
    cl->vx->wce = data[0];
    cl->vx->dev.write_cache = data[0] != 0;
    return 0;
}

static int queue_slots(struct vub_queue *q, unsigned num)
{
    if (q->nslots >= num)
        return 0;
    if (q->busy)
        return -EBUSY;
    struct vub_slot *s = xcalloc(num, sizeof(*s));
    free(q->slots);
    q->slots = s;
    q->nslots = num;
    q->free = NULL;
    for (unsigned i = 0; i < num; i++) {
        s[i].q = q;
        s[i].next_free = q->free;
        q->free = &s[i];
    }
    return 0;
}

static int op_queue_start(void *opaque, struct vu_vq *vq)
{
    struct vub_client *cl = opaque;
    struct vub_queue *q = &cl->queues[vq->idx];
    int r;

    if (cl->dead || cl->dropping)
        return -EIO;
    q->vq = vq;
    vq->priv = q;
    /* a remote queue is parked: its slots are ours */
    r = queue_slots(q, vq->num < VUB_MAX_INFLIGHT ? vq->num : VUB_MAX_INFLIGHT);
    if (r < 0)
        return r;
    fcntl(vq->kick_fd, F_SETFL, fcntl(vq->kick_fd, F_GETFL) | O_NONBLOCK);
    if (q->remote)
        return 0;                     /* its loop watches the kick fd when unparked */
    q->kick_w = loop_watch_fd(q->loop, vq->kick_fd, LOOP_IN, kick_cb, q);
    if (!q->kick_w)
        return -EINVAL;
    process_queue(q);     /* the guest may have queued requests already */
    return 0;
}

static void op_queue_stop(void *opaque, struct vu_vq *vq)
{
    struct vub_client *cl = opaque;
    struct vub_queue *q = &cl->queues[vq->idx];

    /* a remote queue is parked: its loop deleted the watch already */
    if (q->kick_w)
        loop_watch_del(q->kick_w);
    q->kick_w = NULL;
    q->starved = false;
}

static const struct vu_dev_ops vub_ops = {
    .features = op_features,
    .get_config = op_get_config,
    .set_config = op_set_config,
    .queue_start = op_queue_start,
    .queue_stop = op_queue_stop,
};

/* ---- client lifetime -------------------------------------------------------------- */

/* Read and apply the front-end's messages (remote queues parked). */
static void client_read(struct vub_client *cl)
{
    int r = vu_conn_readable(&cl->conn);

    if (r < 0) {
        client_drop(cl, r == -ECONNRESET ? NULL : cl->conn.last_error ?
                    cl->conn.last_error : strerror(-r));
        return;
    }
    if (cl->conn.blocked_vq >= 0)
        loop_watch_set(cl->sock_w, 0);      /* until that ring drained */
}

/* The ring GET_VRING_BASE waits for is idle: answer, read again.
 * Remote queues parked. */
static void client_resume(struct vub_client *cl)
{
    if (cl->conn.blocked_vq < 0)
        return;
    struct vu_vq *vq = &cl->conn.vqs[cl->conn.blocked_vq];
    if (vq->q.avail && vq->q.inflight > 0)
        return;                              /* a late word from an older ring */
    if (vu_conn_unblock(&cl->conn) < 0) {
        client_drop(cl, "could not send reply");
        return;
    }
    if (cl->vx->quiescing) {
        vub_try_handoff(cl->vx);         /* the socket is read again after the move */
        return;
    }
    loop_watch_set(cl->sock_w, LOOP_IN);
    client_read(cl);
}

static void client_sock_cb(void *opaque, uint32_t revents)
{
    struct vub_client *cl = opaque;

    if (!cl->nremote) {
        client_read(cl);
        return;
    }
    cl->want_read = true;
    park_start(cl);
}

static void finish_drop(struct vub_client *cl);

/* Control loop: every remote queue is parked. */
static void park_done_fn(void *opaque)
{
    struct vub_client *cl = opaque;

    cl->park_active = false;
    cl->all_parked = true;
    if (!cl->dropping && cl->want_resume) {
        cl->want_resume = false;
        client_resume(cl);
    }
    if (!cl->dropping && cl->want_read) {
        cl->want_read = false;
        client_read(cl);
    }
    if (cl->dropping) {
        if (!cl->dead)
            finish_drop(cl);       /* the queues stay parked */
    } else {
        cl->all_parked = false;
        for (unsigned i = 0; i < cl->conn.nvqs; i++) {
            struct vub_queue *q = &cl->queues[i];
            if (q->remote) {
                client_ref(cl);
                loop_call(q->loop, unpark_fn, q);
            }
        }
        if (cl->sock_w && cl->conn.blocked_vq < 0)
            loop_watch_set(cl->sock_w, LOOP_IN);
    }
    client_unref(cl);
}

static void resume_body(struct vub_client *cl)
{
    if (!cl->dead && !cl->dropping) {
        if (cl->nremote) {
            cl->want_resume = true;
            park_start(cl);
        } else {
            client_resume(cl);
        }
    }
    client_unref(cl);
}

/* Deferred by a queue served in the control loop. */
static void resume_fn(void *opaque)
{
    struct vub_client *cl = opaque;

    cl->resume_queued = false;
    resume_body(cl);
}

/* Called by a queue served in another loop. */
static void resume_call_fn(void *opaque)
{
    resume_body(opaque);
}

static void client_free_fn(void *opaque)
{
    struct vub_client *cl = opaque;
    struct vub_export *vx = cl->vx;

    vu_conn_destroy(&cl->conn);     /* unmaps guest memory: nothing is in flight */
    for (unsigned i = 0; i < cl->conn.nvqs; i++)
        free(cl->queues[i].slots);
    free(cl->queues);
    close(cl->fd);
    free(cl);
    vx->client = NULL;
    if (vx->stopping) {
        maybe_finish(vx);           /* the main loop may free vx from here on */
        return;
    }
    if (vx->listen_w)
        loop_watch_set(vx->listen_w, LOOP_IN);
    if (vx->quiescing)
        vub_try_handoff(vx);
}

/* Control loop, all remote queues parked (or none): the client is dead. */
static void finish_drop(struct vub_client *cl)
{
    __atomic_store_n(&cl->dead, true, __ATOMIC_RELEASE);
    for (unsigned i = 0; i < cl->conn.nvqs; i++) {
        struct vub_queue *q = &cl->queues[i];
        if (q->remote) {
            client_ref(cl);
            loop_call(q->loop, dead_fn, q);
        } else {
            op_queue_stop(cl, &cl->conn.vqs[i]);
            queue_maybe_release(q);
        }
    }
    client_unref(cl);               /* the control loop's own reference */
}

static void client_drop(struct vub_client *cl, const char *why)
{
    if (cl->dead || cl->dropping)
        return;
    if (why)
        log_warn("vhost-user-blk: %s: dropping front-end: %s", cl->vx->exp.id, why);
    cl->dropping = true;
    if (cl->sock_w)
        loop_watch_del(cl->sock_w);
    cl->sock_w = NULL;
    shutdown(cl->fd, SHUT_RDWR);
    if (!cl->nremote || cl->all_parked)
        finish_drop(cl);
    else if (!cl->park_active)
        park_start(cl);
    /* else the park under way finishes the drop */
}

static struct vub_client *client_new(struct vub_export *vx, int fd)
{
    struct vub_client *cl = xzalloc(sizeof(*cl));
    struct export *exp = &vx->exp;

    cl->vx = vx;
    cl->fd = fd;
    cl->ctl = vx->loop;
    if (vu_conn_init(&cl->conn, fd, vx->dev.num_queues, &vub_ops, cl) < 0)
        goto fail;
    cl->queues = xcalloc(cl->conn.nvqs, sizeof(*cl->queues));
    cl->refs = 1 + cl->conn.nvqs;   /* the control loop's, and one per queue */
    for (unsigned i = 0; i < cl->conn.nvqs; i++) {
        struct vub_queue *q = &cl->queues[i];
        q->cl = cl;
        q->vq = &cl->conn.vqs[i];
        /* QEMU's iothread-vq-mapping without explicit vqs: round-robin */
        q->loop = exp->n_loops ? exp->loops[i % exp->n_loops] : vx->loop;
        q->remote = q->loop != cl->ctl;
        cl->nremote += q->remote;
        q->notify.fn = notify_fn;
        q->notify.opaque = q;
    }
    cl->resume.fn = resume_fn;
    cl->resume.opaque = cl;
    cl->sock_w = loop_watch_fd(cl->ctl, fd, LOOP_IN, client_sock_cb, cl);
    if (!cl->sock_w)
        goto fail;
    return cl;
fail:
    vu_conn_destroy(&cl->conn);
    free(cl->queues);
    free(cl);
    return NULL;
}

static void listen_cb(void *opaque, uint32_t revents)
{
    struct vub_export *vx = opaque;
    int fd;

    if (vx->client || vx->stopping) {
        loop_watch_set(vx->listen_w, 0);
        return;
    }
    fd = accept_conn(vx->listen_fd, false);
    if (fd < 0) {
        if (accept_backoff(&vx->backoff, -fd))
            loop_watch_set(vx->listen_w, 0);
        return;
    }
    vx->client = client_new(vx, fd);
    if (!vx->client) {
        close(fd);
        return;
    }
    struct ucred cr = { .pid = 0 };
    socklen_t crlen = sizeof(cr);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &crlen) == 0)
        log_info("vhost-user-blk: front-end unix:pid=%d connected to export '%s'",
                 (int)cr.pid, vx->exp.id);
    if (vx->exp.n_loops > 1)
        log_info("vhost-user-blk: export '%s': %u queues over %u iothreads, queue i in "
                 "iothread i mod %u (first: '%s')", vx->exp.id, (unsigned)vx->dev.num_queues,
                 vx->exp.n_loops, vx->exp.n_loops, loop_name(vx->exp.loops[0]));
    /* what this front-end does counts from here */
    struct client_stats sum = { 0 };
    for (unsigned i = 0; i < vx->dev.num_queues; i++)
        client_stats_add(&sum, &vx->acct[i].st);
    client_stats_store(&vx->base, &sum);
    __atomic_store_n(&vx->peer_pid, (int)cr.pid, __ATOMIC_RELAXED);
    __atomic_store_n(&vx->connected_at, (int64_t)time(NULL), __ATOMIC_RELAXED);
    loop_watch_set(vx->listen_w, 0);    /* one front-end at a time */
}

/* The pause after running out of fds is over. */
static void listen_resume(void *opaque)
{
    struct vub_export *vx = opaque;

    if (vx->listen_w && !vx->client && !vx->stopping)
        loop_watch_set(vx->listen_w, LOOP_IN);
}

/* ---- export type ----------------------------------------------------------------- */

static void start_listen_fn(void *opaque)
{
    struct vub_export *vx = opaque;

    if (vx->stopping)
        return;
    vx->backoff = (struct accept_backoff){ .who = vx->exp.id, .loop = vx->loop,
                                           .resume = listen_resume, .opaque = vx };
    accept_reserve_refill();
    vx->listen_w = loop_watch_fd(vx->loop, vx->listen_fd, LOOP_IN, listen_cb, vx);
    if (!vx->listen_w)
        log_error("vhost-user-blk: %s: cannot watch the listening socket", vx->exp.id);
}

static bool check_block_size(const char *id, int64_t v, error **errp)
{
    if (v < 512 || v > 2 * 1024 * 1024) {
        error_setg(errp, "Property %s.logical-block-size doesn't take value %lld "
                   "(minimum: 512, maximum: 2097152)", id, (long long)v);
        return false;
    }
    if (v & (v - 1)) {
        error_setg(errp, "Property %s.logical-block-size doesn't take value '%lld', "
                   "it's not a power of 2", id, (long long)v);
        return false;
    }
    return true;
}

static int vub_create(struct export *exp, json_t *opts, error **errp)
{
    struct vub_export *vx = (struct vub_export *)exp;
    json_t *addr = json_object_get(opts, "addr");
    /* 0 means "unset", as in QEMU's check: the default 512 (qsd 7.2 tells
     * the front-end 0 instead and divides by it on the first request) */
    long long lbs = opt_int(opts, "logical-block-size", 0) ?: 512;
    long long nq = opt_int(opts, "num-queues", 1);
    const char *type;
    int fds[2];

    vx->listen_fd = -1;
    if (!check_block_size(exp->id, lbs, errp))
        return -EINVAL;
    if (nq == 0) {
        error_setg(errp, "num-queues must be greater than 0");
        return -EINVAL;
    }
    type = json_string_value(json_object_get(addr, "type"));
    if (!type || (strcmp(type, "unix") && strcmp(type, "fd"))) {
        error_setg(errp, "Only socket address types 'unix' and 'fd' are supported");
        return -EINVAL;
    }
    int n = socket_listen(addr, 1, fds, 2, errp);
    if (n < 0)
        return -EADDRNOTAVAIL;
    for (int i = 1; i < n; i++)
        close(fds[i]);
    vx->listen_fd = fds[0];
    vx->addr = json_deep_copy(addr);
    vx->dev.bs = exp->node;
    vx->loop = exp->loop;
    vx->dev.loop = exp->loop;
    vx->dev.blk_size = lbs;
    vx->dev.num_queues = nq;
    vx->acct = xcalloc(nq, sizeof(*vx->acct));
    for (long long i = 0; i < nq; i++)
        if (exp->n_loops)
            vx->acct[i].iothread = loop_name(exp->loops[i % exp->n_loops]);
    vx->dev.writable = exp->writable;
    vx->dev.write_cache = !exp->writethrough;
    vx->wce = 0;
    loop_call(vx->loop, start_listen_fn, vx);
    return 0;
}

/* As QEMU 7.2, whose vhost-user server takes no export reference for its
 * client: a connected front-end does not make the export "in use", so a
 * safe block-export-del goes through and drops it. */
static bool vub_in_use(struct export *exp)
{
    return false;
}

static void done_main_fn(void *opaque)
{
    struct vub_export *vx = opaque;
    export_shutdown_done(&vx->exp);
}

static void maybe_finish(struct vub_export *vx)
{
    if (vx->client)
        return;
    loop_call(loop_main(), done_main_fn, vx);
}

static void stop_fn(void *opaque)
{
    struct vub_export *vx = opaque;
    bool idle = !vx->client;

    vx->stopping = true;
    if (vx->listen_w)
        loop_watch_del(vx->listen_w);
    vx->listen_w = NULL;
    accept_backoff_cleanup(&vx->backoff);
    if (vx->listen_fd >= 0)
        close(vx->listen_fd);
    vx->listen_fd = -1;
    if (vx->addr)
        socket_address_cleanup(vx->addr);
    if (vx->client && vx->mode != EXPORT_DEL_HIDE)
        client_drop(vx->client, NULL);
    if (idle && loop_in_thread(loop_main())) {
        /* No front-end ever attached to this shutdown: finish now, so
         * BLOCK_EXPORT_DELETED precedes the command's reply as in QEMU. */
        export_shutdown_done(&vx->exp);
        return;
    }
    maybe_finish(vx);
}

static void vub_shutdown(struct export *exp, enum export_remove_mode mode)
{
    struct vub_export *vx = (struct vub_export *)exp;

    vx->mode = mode;
    if (vx->moving)
        vx->stop_after_move = true;      /* no loop owns it now */
    else if (loop_in_thread(vx->loop))
        stop_fn(vx);
    else
        loop_call(vx->loop, stop_fn, vx);
}

static void vub_free(struct export *exp)
{
    struct vub_export *vx = (struct vub_export *)exp;

    if (vx->listen_fd >= 0)
        close(vx->listen_fd);
    json_decref(vx->addr);
    free(vx->acct);
}

/* The front-end connected (one at most); read from the main thread. */
static unsigned vub_nclients(struct export *exp)
{
    struct vub_export *vx = (struct vub_export *)exp;
    return __atomic_load_n(&vx->client, __ATOMIC_RELAXED) ? 1 : 0;
}

/* Everything front-ends did on this export, from any thread. */
static void vub_sum(struct vub_export *vx, struct client_stats *sum, uint64_t *started)
{
    *sum = (struct client_stats){ 0 };
    *started = 0;
    for (unsigned i = 0; i < vx->dev.num_queues; i++) {
        client_stats_add(sum, &vx->acct[i].st);
        *started += __atomic_load_n(&vx->acct[i].started, __ATOMIC_RELAXED);
    }
}

static json_t *vub_query_totals(struct export *exp)
{
    struct vub_export *vx = (struct vub_export *)exp;
    struct client_stats sum;
    uint64_t started;

    vub_sum(vx, &sum, &started);
    return client_stats_json(&sum);
}

/* The front-end connected now (vhost-user serves one at a time): its own
 * counters are the export's since it connected. */
static json_t *vub_query_clients(struct export *exp)
{
    struct vub_export *vx = (struct vub_export *)exp;
    struct client_stats sum, base;
    uint64_t started, done;
    json_t *list = json_array();
    char peer[32];

    if (!vub_nclients(exp))
        return list;
    vub_sum(vx, &sum, &started);
    client_stats_read(&vx->base, &base);
    done = sum.rd_ops + sum.wr_ops + sum.flush_ops + sum.other_ops + sum.errors;
    client_stats_sub(&sum, &base);
    json_t *o = client_stats_json(&sum);
    snprintf(peer, sizeof(peer), "pid=%d", __atomic_load_n(&vx->peer_pid, __ATOMIC_RELAXED));
    json_object_set_new(o, "transport", json_string("vhost-user"));
    json_object_set_new(o, "peer", json_string(peer));
    json_object_set_new(o, "tls", json_false());
    json_object_set_new(o, "connected-since",
                        json_integer(__atomic_load_n(&vx->connected_at, __ATOMIC_RELAXED)));
    json_object_set_new(o, "requests-in-flight",
                        json_integer(started > done ? (json_int_t)(started - done) : 0));
    /* which thread serves which virtqueue, and how much it did */
    json_t *qs = json_array();
    for (unsigned i = 0; i < vx->dev.num_queues && i < VU_MAX_QUEUES; i++) {
        json_t *qi = json_object();
        int tid = __atomic_load_n(&vx->acct[i].tid, __ATOMIC_RELAXED);
        json_object_set_new(qi, "index", json_integer(i));
        if (vx->acct[i].iothread)
            json_object_set_new(qi, "iothread", json_string(vx->acct[i].iothread));
        else if (vx->exp.iothread)
            json_object_set_new(qi, "iothread", json_string(loop_name(vx->exp.loop)));
        if (tid)
            json_object_set_new(qi, "thread-id", json_integer(tid));
        json_object_set_new(qi, "requests",
                            json_integer(__atomic_load_n(&vx->acct[i].started, __ATOMIC_RELAXED)));
        json_array_append_new(qs, qi);
    }
    json_object_set_new(o, "queues", qs);
    json_array_append_new(list, o);
    return list;
}

/* block_resize: the capacity in the config space follows the node; the
 * front-end is told on the back-end channel (QEMU 8.1 does so, 7.2 not). */
static void vub_resized_in_loop(void *opaque)
{
    struct vub_export *vx = opaque;
    struct vub_client *cl = vx->client;

    if (!cl || cl->dead || vx->stopping)
        return;
    int r = vu_conn_notify_config_change(&cl->conn);
    if (r < 0 && r != -ENOTCONN)
        log_warn("vhost-user-blk: %s: could not announce the new size: %s",
                 vx->exp.id, strerror(-r));
}

/* An overlay took the node's place (writes held): requests go to it. */
static void vub_node_replaced(struct export *exp)
{
    struct vub_export *vx = (struct vub_export *)exp;
    __atomic_store_n(&vx->dev.bs, exp->node, __ATOMIC_RELEASE);
}

/* Main thread, never while shutting down: the call runs in the export's
 * loop before any shutdown step queued after it. */
static void vub_node_resized(struct export *exp)
{
    struct vub_export *vx = (struct vub_export *)exp;

    if (vx->moving)
        vx->resize_after_move = true;
    else
        loop_call(vx->loop, vub_resized_in_loop, exp);
}

/* ---- moving to another loop (see the top) ---------------------------------------- */

static bool vub_idle(struct vub_export *vx)
{
    struct vub_client *cl = vx->client;

    if (!cl)
        return true;
    /* a dead client is not idle until freed (client_free_fn tries again);
     * an export that moves runs in one loop: no queue is remote */
    if (cl->dead || cl->dropping || cl->resume_queued)
        return false;
    for (unsigned i = 0; i < cl->conn.nvqs; i++)
        if (cl->queues[i].busy || cl->queues[i].notify_queued)
            return false;
    return true;
}

static void vub_moved_main(void *opaque);

/* vx->loop, quiescing: once nothing of the export is pending here, give it
 * to the main thread (and touch it no more). */
static void vub_try_handoff(struct vub_export *vx)
{
    if (!vx->quiescing || !vub_idle(vx))
        return;
    vx->quiescing = false;
    accept_backoff_cleanup(&vx->backoff);    /* its timer is this loop's */
    loop_call(loop_main(), vub_moved_main, vx);
}

static void vub_quiesce_fn(void *opaque)
{
    struct vub_export *vx = opaque;
    struct vub_client *cl = vx->client;

    vx->quiescing = true;
    vx->listen_on = vx->listen_w != NULL;
    if (vx->listen_w)
        loop_watch_del(vx->listen_w);
    vx->listen_w = NULL;
    if (cl && !cl->dead) {
        if (cl->sock_w)
            loop_watch_del(cl->sock_w);
        cl->sock_w = NULL;
        for (unsigned i = 0; i < cl->conn.nvqs; i++) {
            struct vub_queue *q = &cl->queues[i];
            q->kick_on = q->kick_w != NULL;
            if (q->kick_w)
                loop_watch_del(q->kick_w);
            q->kick_w = NULL;
        }
    }
    vub_try_handoff(vx);
}

/* The new loop: watch what was watched, take what the guest queued. */
static void vub_resume_fn(void *opaque)
{
    struct vub_export *vx = opaque;
    struct vub_client *cl = vx->client;

    if (vx->listen_on && !vx->stopping) {
        vx->backoff = (struct accept_backoff){ .who = vx->exp.id, .loop = vx->loop,
                                               .resume = listen_resume, .opaque = vx };
        vx->listen_w = loop_watch_fd(vx->loop, vx->listen_fd, cl ? 0 : LOOP_IN, listen_cb, vx);
    }
    if (!cl || cl->dead)
        return;
    cl->ctl = vx->loop;
    for (unsigned i = 0; i < cl->conn.nvqs; i++)
        cl->queues[i].loop = vx->loop;
    cl->sock_w = loop_watch_fd(vx->loop, cl->fd, cl->conn.blocked_vq >= 0 ? 0 : LOOP_IN,
                               client_sock_cb, cl);
    for (unsigned i = 0; i < cl->conn.nvqs && !cl->dead; i++) {
        struct vub_queue *q = &cl->queues[i];
        if (!q->kick_on)
            continue;
        q->kick_on = false;
        q->starved = false;
        q->kick_w = loop_watch_fd(vx->loop, q->vq->kick_fd, LOOP_IN, kick_cb, q);
        process_queue(q);
    }
}

/* Main thread: the export is idle and no loop's; post it to its new one,
 * then what was asked of it meanwhile. */
static void vub_moved_main(void *opaque)
{
    struct vub_export *vx = opaque;

    vx->moving = false;
    vx->loop = vx->exp.loop;
    vx->dev.loop = vx->exp.loop;
    loop_call(vx->loop, vub_resume_fn, vx);
    if (vx->resize_after_move)
        loop_call(vx->loop, vub_resized_in_loop, vx);
    if (vx->stop_after_move)
        loop_call(vx->loop, stop_fn, vx);
    vx->resize_after_move = vx->stop_after_move = false;
}

static bool vub_can_move(struct export *exp, error **errp)
{
    return true;
}

static void vub_moved(struct export *exp)
{
    struct vub_export *vx = (struct vub_export *)exp;

    if (vx->moving || vx->loop == exp->loop)
        return;            /* a move under way ends where the export is then */
    vx->moving = true;
    loop_call(vx->loop, vub_quiesce_fn, vx);
}

static const struct export_type vhost_user_blk_type = {
    .name = "vhost-user-blk",
    .nclients = vub_nclients,
    .query_clients = vub_query_clients,
    .query_totals = vub_query_totals,
    .instance_size = sizeof(struct vub_export),
    .create = vub_create,
    .in_use = vub_in_use,
    .shutdown = vub_shutdown,
    .free = vub_free,
    .node_resized = vub_node_resized,
    .node_replaced = vub_node_replaced,
    .can_move = vub_can_move,
    .moved = vub_moved,
    .multi_iothread = true,
};
EXPORT_TYPE_REGISTER(vhost_user_blk_type)
