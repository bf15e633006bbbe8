/* Between the chardev registry (chardev.c) and its backends (char-*.c). */
#pragma once
#include "chardev/chardev.h"

struct qom_class;

struct chardev_backend {
    const char *name;                      /* ChardevBackendKind: "socket", ... */
    const struct qom_class *qom;           /* QOM class of its chardevs */
    size_t state_size;                     /* c->state, zeroed */
    bool no_oob;                           /* a monitor on it offers no "oob" (QEMU's
                                            * chardevs without their own context) */
    /* --chardev: its QemuOpts keys (besides backend, id, logfile,
     * logappend, mux) and their conversion to the backend's "data". */
    const char *const *cli_keys;
    json_t *(*parse_cli)(json_t *opts, error **errp);
    /* Checks that take no resource (chardev-change runs them before it
     * replaces anything).  NULL: none. */
    int  (*check)(json_t *data, error **errp);
    /* Open; call chardev_opened() when a peer is there (now or later).
     * On failure close() is still called, on the partly opened state. */
    int  (*open)(struct chardev *c, json_t *data, error **errp);
    void (*close)(struct chardev *c);      /* free everything, no event */
    ssize_t (*read)(struct chardev *c, void *buf, size_t len);
    ssize_t (*write)(struct chardev *c, const void *buf, size_t len);
    void (*set_interest)(struct chardev *c, uint32_t events);
    void (*attached)(struct chardev *c);   /* a frontend arrived; NULL: nothing to do */
    void (*disconnect)(struct chardev *c); /* NULL: the peer cannot be dropped */
    char *(*filename)(struct chardev *c);  /* query-chardev's "filename" */
    json_t *(*qom_get)(struct chardev *c, const char *prop);
};

struct chardev {
    char *id;
    const struct chardev_backend *be;
    void *state;
    bool open;                             /* a peer is there */
    const struct chardev_fe_ops *fe;
    void *fe_opaque;
    uint32_t interest;                     /* what the frontend asked for */
    int logfd;                             /* logfile, or -1 */
    struct chardev *next;
};

void chardev_backend_register(const struct chardev_backend *be);
#define CHARDEV_BACKEND_REGISTER(b) \
    __attribute__((constructor)) static void chardev_backend_register_##b(void) \
    { chardev_backend_register(&b); }

/* Backends report their peer. */
void chardev_opened(struct chardev *c);
void chardev_closed(struct chardev *c);
/* Readiness for the frontend (only what it asked for is passed on). */
void chardev_ready(struct chardev *c, uint32_t revents);
bool chardev_has_frontend(const struct chardev *c);

/* QemuOpts values: "on"/"off"... as bool, numbers as text. */
int chardev_opt_bool(json_t *opts, const char *key, bool dflt, bool *out, error **errp);
const char *chardev_opt_text(json_t *opts, const char *key);
/* stdio: refused after --daemonize, and to a second chardev. */
bool chardev_daemonized(void);
