/*
 * The NBD client of the "nbd" block driver (nbd.c): a connection to one
 * export, negotiated here (nbd-handshake.c) with blocking I/O bounded by a
 * deadline, then used by the driver's sender and reader threads.
 */
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include <jansson.h>
#include "crypto/tls-creds.h"
#include "crypto/tls-session.h"
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
