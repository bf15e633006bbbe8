/*
 * The NBD client of the "nbd" block driver (nbd.c): a connection to one
 * export, negotiated (nbd-handshake.c) with blocking I/O bounded by a
 * deadline, then owned by a sender and a reader thread (nbd-conn.c).
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include <jansson.h>
#include "crypto/tls-creds.h"
#include "crypto/tls-session.h"
#include "block/bchan.h"
#include "block/block.h"
#include "util/error.h"

/* A connected socket, TLS or not.  One thread may send while another
 * receives (GnuTLS allows one of each on a session). */
struct nbdc_wire {
    int fd;
    struct tls_session *tls;
    int cancel_fd;                  /* readable: give up waiting (-ECANCELED); -1 none */
};

/* What to ask for (fixed for the node's life). */
struct nbdc_cfg {
    json_t *server;                 /* flat SocketAddress */
    const char *export;             /* "" when not given */
    struct tls_creds *tls;          /* NULL: no TLS */
    const char *tls_hostname;       /* NULL: none */
    const char *context;            /* block status context: base:allocation or x-dirty-bitmap */
};

/* What the server granted. */
struct nbdc_info {
    uint64_t size;
    uint16_t flags;                 /* NBD_FLAG_* transmission flags */
    bool structured;                /* structured replies */
    bool have_context;              /* the block status context was granted */
    uint32_t context_id;
    uint32_t min_block, pref_block, max_block;   /* 0: not said */
};

/* Blocking I/O on the wire; deadline_ms is a now_ms() time, 0 = none.
 * 0 or -errno (-ECONNRESET at end of stream, -ETIMEDOUT). */
int nbdc_wire_send(struct nbdc_wire *w, const struct iovec *iov, int iovcnt,
                   uint64_t deadline_ms);
int nbdc_wire_recv(struct nbdc_wire *w, void *buf, size_t len, uint64_t deadline_ms);
void nbdc_wire_close(struct nbdc_wire *w);

/* Connect and negotiate (NBD_OPT_GO, structured replies and the context
 * when possible, TLS first when configured).  0, or -errno with *errp set
 * as QEMU 7.2 words it; *w is open only on success.  Waits for the server
 * end at deadline_ms, or when cancel_fd (-1: none) becomes readable. */
int nbdc_connect(const struct nbdc_cfg *cfg, struct nbdc_wire *w, struct nbdc_info *info,
                 uint64_t deadline_ms, int cancel_fd, error **errp);

/* ---- the connection's threads (nbd-conn.c), for the driver (nbd.c) ---- */

#define NBDC_SLOTS        64            /* wire requests in flight */
#define NBDC_MAX_PAYLOAD  (32u << 20)   /* READ/WRITE without a server maximum */
#define NBDC_MAX_RANGE    (1u << 30)    /* TRIM/WRITE_ZEROES/CACHE/BLOCK_STATUS */
#define NBDC_ZERO_CHUNK   (1u << 20)    /* write zeroes emulated by writes */
#define NBDC_STATUS_MS    10000
#define NBDC_HANDSHAKE_MS 30000
#define NBDC_BACKOFF_MAX_MS 16000

/* One request on the wire. */
struct nreq {
    struct nreq *next;              /* in the queue */
    uint16_t type, flags;
    uint64_t offset;
    uint32_t len;
    uint64_t handle;
    bool zeroes;                    /* a WRITE of zeros (no WRITE_ZEROES on the server) */
    struct breq *breq;              /* NULL: a synchronous request */
    uint64_t boff;                  /* READ/WRITE: its first byte in breq's buffers */
    int err;
    bool in_send;                   /* the sender is writing it (lock) */
    bool replied;                   /* ... and its reply ended meanwhile: the sender finishes it */
    /* synchronous requests (under the lock) */
    bool done, abandoned;
    bool have_extent;
    uint32_t ext_len, ext_flags;
};

struct nbd_state {
    struct nbdc_cfg cfg;
    json_t *server;
    char *export, *tls_hostname, *context;
    char *desc;                     /* for log lines: server address and export */
    bool read_only;                 /* the node's, at open */
    bool alloc_depth;               /* x-dirty-bitmap=qemu:allocation-depth */
    uint32_t reconnect_delay_ms;
    bool no_reconnect;              /* server type fd: that socket was all there was */
    struct nbdc_info info;
    bool self;                      /* the server is this process */
    uint32_t max_payload;
    struct bchan_set chans;

    pthread_mutex_t lock;
    pthread_cond_t send_cond;       /* sender: work, a slot, a connection, closing */
    pthread_cond_t cond;            /* sync requests done, sender idle, reader's backoff */
    struct nbdc_wire wire;          /* fd -1: none */
    bool connected;
    bool fail_fast;                 /* lost past reconnect-delay: fail at once */
    bool kick;                      /* a request failed so: try reconnecting now */
    bool closing;
    bool sending;                   /* the sender uses wire outside the lock */
    struct nreq *q_head, **q_tail;
    struct nreq *slots[NBDC_SLOTS];
    unsigned nfree;
    uint64_t gen;
    int refs;                       /* the node, the reader thread */
    pthread_t sender, reader;
    bool have_sender, have_reader;
    int stop_fd;                    /* eventfd: closing, stop reconnecting */
};


/* Any thread (lock held where said): */
void nbdc_state_put(struct nbd_state *s);           /* the last reference frees it */
void nbdc_enqueue(struct nbd_state *s, struct nreq *q, bool front);   /* lock held */
int  nbdc_fail_fast(struct nbd_state *s);           /* lock held: -EIO, and reconnect now */
struct nreq *nbdc_nreq_new(struct breq *r, uint16_t type, uint16_t flags, uint64_t off,
                           uint32_t len, uint64_t boff);
/* A request whose caller waits for it, at most timeout_ms: NULL when it
 * did not end in time (it is abandoned, and freed when it ends). */
struct nreq *nbdc_sync_request(struct nbd_state *s, uint16_t type, uint16_t flags,
                               uint64_t off, uint32_t len, uint64_t timeout_ms);
/* Zero [off, off + len) of r's buffers. */
void nbdc_zero_buffers(struct breq *r, uint64_t off, uint64_t len);
void *nbdc_sender_main(void *s);
void *nbdc_reader_main(void *s);
/* In the submitting loop: a breq all of whose wire requests finished (the
 * driver's; the completion channels call it). */
void nbdc_breq_finished(struct breq *r);
