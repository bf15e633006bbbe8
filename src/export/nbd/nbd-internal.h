/*
 * NBD server internals, in sections: limits, server, exports, transport,
 * connections, request slots, and the functions each stage file provides.
 *
 * Threads: the listening sockets, the handshake and every list (server's
 * connections, exports) live in the main loop.  After NBD_OPT_GO a
 * connection moves to its export's loop (main or an iothread) and all its
 * I/O happens there.  Connections are reference-counted with atomics: the
 * socket holds one reference until nbd_conn_close(), every in-flight block
 * request, queued deferral and cross-thread call holds one more.  The last
 * reference tears the connection down in its own loop, then the main loop
 * unlinks it (nbd_conn_finalize), which is the only place export client
 * counts drop, so an export outlives every connection using it.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <jansson.h>
#include "block/block.h"
#include "export/client-stats.h"
#include "export/export.h"
#include "util/accept.h"
#include "util/loop.h"
#include "nbd-protocol.h"

/* ---- limits (every one bounds something a peer controls) ---- */
#define NBD_MAX_OPTIONS        4096         /* options per handshake */
#define NBD_MAX_OPT_LEN        65536        /* option payload kept in memory */
#define NBD_MAX_OPT_DRAIN      (1u << 20)   /* larger payloads: disconnect */
#define NBD_MAX_QUERIES        1024         /* meta context queries per option */
#define NBD_HANDSHAKE_MS       10000        /* default handshake time limit */
#define NBD_SLOTS              64           /* requests in flight per connection */
#define NBD_RX_BUF             (128u << 10) /* buffered socket reads */
#define NBD_DIRECT_RECV        (64u << 10)  /* payloads above: recv into slot buffer */
#define NBD_CONN_BUF_BUDGET    (128u << 20) /* slot buffers per connection */
#define NBD_BUF_BUDGET         (1ull << 30) /* ... and for all connections (hard) */
#define NBD_STALL_MS           30000        /* not reading replies while others wait for
                                             * memory: closed (budget.c) */
#define NBD_KEEP_BUF           (4u << 20)   /* slot buffers above: freed after use */
#define NBD_MAX_EXTENTS        2048         /* block status descriptors per context */
#define NBD_BLOCK_STATUS_MS    200          /* ... and time spent finding them */
#define NBD_SLICE_MS           20           /* requests parsed per loop turn, in time */
#define NBD_HS_OUT_MAX         (1u << 20)   /* unread handshake replies: stop reading */
#define NBD_MAX_READ_CHUNKS    16           /* structured read chunks per reply */
#define NBD_SLOT_HDR           768
#define NBD_SLOT_IOV           (2 * NBD_MAX_READ_CHUNKS + 8)
#define NBD_SEND_IOV           256
#define NBD_MAX_EXPORT_BITMAPS 16           /* dirty bitmaps one export publishes */
#define NBD_MAX_CONTEXTS       (2 + NBD_MAX_EXPORT_BITMAPS)
#define NBD_SPLICE_MIN         (64u << 10)  /* READs from this size: spliced when possible */
#define NBD_PIPE_SIZE          (1u << 20)   /* a connection's splice pipe */

/* meta context ids (as QEMU numbers them) */
#define NBD_META_ID_BASE_ALLOCATION   0
#define NBD_META_ID_ALLOCATION_DEPTH  1
#define NBD_META_ID_DIRTY_BITMAP      2     /* + the bitmap's index in the export */

/* ---- server (singleton, main thread) ---- */
struct nbd_conn;

struct nbd_server {
    bool running;
    json_t *addr;                 /* flat SocketAddress */
    char *tls_creds, *tls_authz;
    uint32_t max_connections;     /* 0 = unlimited */
    bool full_paused;             /* not accepting: max-connections reached */
    int nlisten;
    int listen_fd[8];
    struct loop_watch *listen_watch[8];
    struct accept_backoff backoff;  /* out of fds: accepting paused */
    int nconns;                   /* every connection not yet finalized */
    struct nbd_conn *conns;       /* list through conn->next */
    uint64_t handshake_ms;
    uint64_t accepted, handshake_failures, tls_failures;   /* for /metrics */
    void (*drained)(void *);      /* graceful stop: called when nconns reaches 0 */
    void *drained_opaque;
};
extern struct nbd_server nbd_srv;

/* ---- a client's counters (ops) ---- */
/* ---- exports ---- */
struct nbd_export {
    struct export common;         /* first */
    char *name;
    char *description;
    bool alloc_depth;
    bool hidden;                  /* no new clients (shutdown begun) */
    int soft;                     /* atomic: answer ESHUTDOWN */
    int nclients;                 /* connections attached (main thread) */
    bool done_posted;        /* export_shutdown_done queued */
    uint16_t eflags;              /* transmission flags, before SEND_DF */
    uint32_t min_block;
    uint32_t max_block;
    int nbitmaps;                 /* published dirty bitmaps, busy while here */
    struct dirty_bitmap *bitmaps[NBD_MAX_EXPORT_BITMAPS];
    char *bitmap_ctx[NBD_MAX_EXPORT_BITMAPS];   /* "qemu:dirty-bitmap:NAME" */
    struct client_stats gone;      /* clients that left, summed (main thread) */
    unsigned *loop_users;         /* clients per common.loops[i] (main thread) */
    struct nbd_export *next;
};

struct nbd_export *nbd_export_lookup(const char *name);   /* visible ones */
struct nbd_export *nbd_export_first(void);
void nbd_export_client_gone(struct nbd_export *exp);      /* main thread */
void nbd_exports_close_all(void);                         /* server stop */

/* ---- transport: TLS replaces these without touching protocol code ---- */
struct nbd_transport {
    /* > 0 bytes, 0 = EOF, -errno (-EAGAIN: wait for LOOP_IN) */
    ssize_t (*recv)(struct nbd_conn *c, void *buf, size_t len);
    /* bytes sent or -errno; never raises SIGPIPE */
    ssize_t (*sendv)(struct nbd_conn *c, const struct iovec *iov, int iovcnt);
    /* move up to len bytes from pipe_rd to the peer, as sendv; NULL when the
     * transport cannot take pages by reference (TLS encrypts them) */
    ssize_t (*splice)(struct nbd_conn *c, int pipe_rd, size_t len);
    void (*shutdown)(struct nbd_conn *c);   /* stop both directions now */
    void (*close)(struct nbd_conn *c);      /* release (fd closed) */
};
extern const struct nbd_transport nbd_plain_transport;
extern const struct nbd_transport nbd_tls_transport;   /* tls.c */

/* ---- request slots ---- */
enum nbd_slot_state { SLOT_FREE, SLOT_PAYLOAD, SLOT_IO, SLOT_REPLY };

struct nbd_slot {
    struct nbd_conn *conn;
    enum nbd_slot_state state;
    struct nbd_request req;       /* host byte order */
    int error;                    /* wire error for the reply, 0 = success */
    char errmsg[160];             /* its message (structured error chunk) */
    int stage;                    /* multi-step commands (TRIM+FUA) */
    struct breq breq;
    struct iovec data_iov;
    char *buf;                    /* READ/WRITE data, page aligned */
    size_t bufsize;
    struct aio_fixed fixed;       /* buf, for rings that register it (O_DIRECT) */
    uint32_t payload_got;         /* WRITE payload received so far */
    struct nbd_block_descriptor *ext;   /* block status, lazily allocated */
    /* the reply: headers serialized into hdr, iov over hdr and buf */
    uint8_t hdr[NBD_SLOT_HDR];
    size_t hdr_used;
    struct iovec iov[NBD_SLOT_IOV];
    int iovcnt;
    /* and then, if splice_len, that many bytes of splice_fd from splice_off */
    int splice_fd;
    uint64_t splice_off;
    uint32_t splice_len;
    struct nbd_slot *next;        /* free list or reply queue */
};

/* ---- connections ---- */

enum nbd_conn_state { CONN_HANDSHAKE, CONN_TRANSMISSION, CONN_CLOSED };
enum nbd_rx_state { RX_HDR, RX_PAYLOAD, RX_DRAIN };

struct nbd_conn {
    int refcnt;                   /* atomic */
    int fd;
    const struct nbd_transport *tr;
    void *tr_opaque;
    enum nbd_conn_state state;
    struct loop *loop;            /* where its I/O runs; changed in main only */
    struct iothread *iot;         /* the iothread owning loop, pinned; NULL: main/worker */
    int pool_slot;                /* worker loop taken (loop-pool.h), -1 if none */
    int iot_slot;                 /* index in exp->common.loops (multi-threaded export), -1 if none */
    struct loop_watch *watch;
    char *peer;                   /* for log messages */
    struct nbd_conn *next;        /* server list (main thread) */

    /* handshake */
    struct loop_timer *hs_timer;
    int hs_state;
    uint32_t hs_opt, hs_len, hs_have;
    uint32_t hs_drain;
    unsigned hs_nopts;
    bool fixed, no_zeroes;
    uint8_t *hs_buf;              /* NBD_MAX_OPT_LEN + header */
    uint8_t *out;                 /* handshake output */
    size_t out_len, out_cap, out_sent;

    /* negotiated */
    struct nbd_export *exp;
    bool structured;
    bool meta_base, meta_depth;   /* selected contexts */
    uint32_t meta_bitmaps;        /* ... and dirty bitmaps, by index */
    struct nbd_export *meta_exp;  /* export they were selected for (compared only) */
    uint16_t eflags;

    /* transmission receive */
    enum nbd_rx_state rx_state;
    uint8_t *rx;                  /* NBD_RX_BUF */
    size_t rx_start, rx_end;
    struct nbd_slot *rx_slot;     /* receiving a WRITE payload */
    uint64_t drain_left;
    bool rx_paused;               /* no slot or buffer budget */
    bool rx_yield;                /* used its time slice: resumes next loop turn */
    bool rx_eof;
    bool disc;                    /* NBD_CMD_DISC received */

    /* slots and replies */
    struct nbd_slot *slots;
    struct nbd_slot *free_slots;
    int busy_slots;
    size_t buf_total;             /* atomic reads from the main loop (budget.c) */
    uint64_t out_stalled_since;   /* atomic: ms since replies wait for the socket, 0 = none */
    bool budget_waiting;          /* on the budget's wait list (under its lock) */
    struct nbd_conn *budget_next;
    struct nbd_slot *reply_head, *reply_tail;
    size_t reply_off;             /* bytes of reply_head already sent */
    int pipe[2];                  /* splice: file -> pipe -> socket; -1 until used */
    size_t pipe_fill;             /* bytes of reply_head in the pipe */
    bool want_out;
    struct loop_defer flush_defer;
    struct loop_defer kick_defer;

    /* operations (ops): who it is, and what it did.  The counters have
     * one writer (the connection's loop) and are read by the main thread
     * with relaxed atomic loads. */
    const char *transport;        /* "unix", "tcp", "vsock" */
    char *tls_identity;           /* x509 DN or PSK user, NULL if none */
    bool tls;
    int64_t connected_at;         /* CLOCK_REALTIME seconds */
    bool draining;                /* graceful stop: finish what was read, then close */
    const char *close_reason;     /* static string, for the log */
    struct client_stats st;

    /* moving to another loop (x-blockdev-set-iothread, see conn.c) */
    bool quiescing;               /* loop: no new requests; hands over when idle */
    bool move_closed;             /* loop -> main: it closed instead */
    bool moving;                  /* main: a move is under way */
    bool close_after_move;        /* main: close or drain requested meanwhile */
    bool drain_after_move;
};

/* server.c: a connection was finalized (main thread) */
void nbd_server_conn_gone(void);

/* conn.c */
bool nbd_conn_new(int fd, const char *peer);
void nbd_conn_ref(struct nbd_conn *c);
bool nbd_conn_tryref(struct nbd_conn *c);
void nbd_conn_unref(struct nbd_conn *c);
void nbd_conn_close(struct nbd_conn *c, const char *reason);
void nbd_conn_close_remote(struct nbd_conn *c, const char *reason);  /* main thread */
void nbd_conns_close(struct nbd_export *exp, const char *reason);      /* main thread */
/* Main thread: graceful stop of every connection (see nbd_server_drain). */
void nbd_conns_drain(void);
void nbd_conn_update_watch(struct nbd_conn *c);
void nbd_conn_io(void *opaque, uint32_t revents);   /* the socket watch's callback */
void nbd_conn_attach(struct nbd_conn *c, struct nbd_export *exp);   /* after GO */
void nbd_conn_move(struct nbd_conn *c);   /* main: follow the export to its loop now */
void nbd_conn_flush(struct nbd_conn *c);
bool nbd_conn_can_splice(struct nbd_conn *c);
void nbd_conn_schedule_flush(struct nbd_conn *c);
int  nbd_out_append(struct nbd_conn *c, const void *data, size_t len);

/* tls.c: NBD_OPT_STARTTLS (answers and flushes itself); tls-creds of a
 * server: checked at start, pinned while it runs */
void nbd_opt_starttls(struct nbd_conn *c, uint32_t len);
int  nbd_tls_check_creds(const char *id, error **errp);
void nbd_tls_pin_creds(const char *id, bool pin);

/* handshake.c */
void nbd_handshake_start(struct nbd_conn *c);
void nbd_handshake_readable(struct nbd_conn *c);

/* handshake.c helpers shared with meta.c */
const char *nbd_opt_name(uint32_t opt);
bool nbd_opt_take_name(struct nbd_conn *c, uint32_t opt, const uint8_t **p,
                       uint32_t *left, char name[NBD_MAX_STRING_SIZE + 1]);

/* meta.c: parse a LIST/SET_META_CONTEXT payload and answer it */
void nbd_opt_meta_context(struct nbd_conn *c, uint32_t opt, const uint8_t *data, uint32_t len);
int  nbd_opt_reply(struct nbd_conn *c, uint32_t opt, uint32_t type, const void *data, uint32_t len);
int  nbd_opt_error(struct nbd_conn *c, uint32_t opt, uint32_t type, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* transmission.c */
int  nbd_transmission_init(struct nbd_conn *c);
void nbd_transmission_readable(struct nbd_conn *c);
void nbd_transmission_kick(struct nbd_conn *c);
void nbd_slots_free(struct nbd_conn *c);
void nbd_slot_release(struct nbd_slot *s);

/* reply.c: a request's reply, built in its slot and queued */
uint32_t nbd_errno_to_wire(int err);
uint32_t nbd_slot_fail(struct nbd_slot *s, uint32_t err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));       /* the error to answer; returns err */
void nbd_reply_error(struct nbd_slot *s);        /* the error set by nbd_slot_fail */
void nbd_reply_io_error(struct nbd_slot *s, int ret);    /* ret: -errno of the node */
void nbd_reply_success(struct nbd_slot *s);      /* a READ's data is in s->buf */
bool nbd_reply_read_spliced(struct nbd_slot *s); /* false: read it the usual way */
void nbd_reply_block_status(struct nbd_slot *s);
const char *nbd_cmd_name(uint16_t type);
void nbd_client_account(struct nbd_conn *c, uint16_t type, uint64_t bytes, uint64_t ns, int ret);

/* budget.c: the hard bound on request buffers across connections */
void nbd_budget_init(void);                       /* main thread, server start */
bool nbd_budget_take(size_t bytes);               /* false: over the budget */
void nbd_budget_give(size_t bytes);               /* wakes the waiters */
void nbd_budget_wait(struct nbd_conn *c, size_t bytes);   /* c's loop; c->rx_paused set */
bool nbd_budget_pressure(void);                   /* someone waits */
void nbd_slots_trim(struct nbd_conn *c);          /* transmission.c: free idle buffers */

/* block-status.c: fill up to max descriptors for one context; returns the
 * count (>= 1) or -errno. */
int nbd_block_status_extents(struct nbd_export *exp, int ctx, uint64_t offset,
                             uint64_t len, bool req_one,
                             struct nbd_block_descriptor *ext, int max);

