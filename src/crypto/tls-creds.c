/*
 * What every tls-creds-* object shares: the common properties (dir,
 * endpoint, verify-peer, priority), credential file paths with QEMU's
 * messages, optional DH parameters, and lookup by id for users.
 *
 * The priority string is compiled once when the object is created; an
 * invalid one is reported (as QEMU does) only when a session is made.
 * Servers that get no dh-params.pem use GnuTLS's RFC 7919 groups instead
 * of generating parameters (QEMU generates 2048-bit ones, which is slow).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "crypto/tls-creds.h"
#include "object/qom.h"
#include "util/cleanup.h"
#include "util/xalloc.h"
#include "util/opts.h"

#define TLS_FILE_MAX (1u << 20)     /* credential files larger than this are refused */
#define TLS_DEFAULT_PRIORITY "NORMAL"

bool tls_creds_is(const struct object *o)
{
    return o && strncmp(o->type->name, "tls-creds-", 10) == 0;
}

struct tls_creds *tls_creds_lookup(const char *id, enum tls_endpoint ep, error **errp)
{
    struct object *o = object_find(id);
    struct tls_creds *c;

    if (!o) {
        error_setg(errp, "No TLS credentials with id '%s'", id);
        return NULL;
    }
    if (!tls_creds_is(o)) {
        error_setg(errp, "Object with id '%s' is not TLS credentials", id);
        return NULL;
    }
    c = (struct tls_creds *)o;
    if (c->endpoint != ep) {
        error_setg(errp, "Expected TLS credentials for a %s endpoint",
                   ep == TLS_ENDPOINT_SERVER ? "server" : "client");
        return NULL;
    }
    return c;
}

/* Sessions made earlier keep the compiled priority they took (GnuTLS
 * counts its users), so the old one can go at once. */
static void set_priority(struct tls_creds *c, const char *prio)
{
    const char *extra = c->prio_extra;

    if (c->prio)
        gnutls_priority_deinit(c->prio);
    free(c->priority);
    if (!prio || !*prio)
        prio = TLS_DEFAULT_PRIORITY;
    c->priority = xasprintf("%s%s%s", prio, extra ? ":" : "", extra ? extra : "");
    if (gnutls_priority_init(&c->prio, c->priority, NULL) < 0)
        c->prio = NULL;
}

void tls_creds_common_props(struct tls_creds *c, json_t *props, const char *extra)
{
    const char *dir = opt_str(props, "dir", NULL);
    const char *ep = opt_str(props, "endpoint", "client");

    c->endpoint = strcmp(ep, "server") == 0 ? TLS_ENDPOINT_SERVER : TLS_ENDPOINT_CLIENT;
    c->verify_peer = opt_bool(props, "verify-peer", true);
    c->dir = xstrdup_opt(dir);
    c->prio_extra = extra;
    set_priority(c, opt_str(props, "priority", NULL));
}

int tls_creds_set_prop(struct object *obj, const char *name, json_t *value, error **errp)
{
    struct tls_creds *c = (struct tls_creds *)obj;

    if (!strcmp(name, "verify-peer"))
        c->verify_peer = json_is_true(value);
    else if (!strcmp(name, "priority"))
        set_priority(c, json_string_value(value));
    return 0;
}

static const struct qom_prop tls_creds_props[] = {
    { "endpoint", "QCryptoTLSCredsEndpoint", "QCryptoTLSCredsEndpoint", "\"client\"" },
    { "dir", "string", "str", "\"\"" },
    { "verify-peer", "bool", "bool", "true" },
    { "priority", "string", "str", "\"\"" },
    { NULL },
};
static struct qom_class tls_creds_class = {
    .name = "tls-creds", .parent = "object", .abstract = true, .props = tls_creds_props,
};
QOM_CLASS_REGISTER(tls_creds_class)

int tls_creds_get_path(struct tls_creds *c, const char *name, bool required,
                       char **path, error **errp)
{
    struct stat st;
    char *p;

    *path = NULL;
    if (!c->dir) {
        if (!required)
            return 0;
        error_setg(errp, "Missing 'dir' property value");
        return -1;
    }
    p = xasprintf("%s/%s", c->dir, name);
    if (stat(p, &st) < 0) {
        int err = errno;
        if (err == ENOENT && !required) {
            free(p);
            return 0;
        }
        error_setg_errno(errp, err, "Unable to access credentials %s", p);
        free(p);
        return -1;
    }
    *path = p;
    return 0;
}

char *tls_read_file(const char *path, size_t *len)
{
    CLEANUP_CLOSE int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    char *buf;
    size_t got = 0;

    if (fd < 0 || fstat(fd, &st) < 0)
        return NULL;
    if (st.st_size > TLS_FILE_MAX) {
        errno = EFBIG;
        return NULL;
    }
    buf = xmalloc(st.st_size + 1);
    while (got < (size_t)st.st_size) {
        ssize_t n = read(fd, buf + got, st.st_size - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;      /* shrank meanwhile: keep what was read */
        got += n;
    }
    buf[got] = '\0';
    *len = got;
    return buf;
}

int tls_creds_load_dh(struct tls_creds *c, error **errp)
{
    CLEANUP_FREE char *path = NULL;
    CLEANUP_FREE char *pem = NULL;
    gnutls_datum_t d;
    size_t len;
    int r;

    if (tls_creds_get_path(c, TLS_DH_PARAMS, false, &path, errp) < 0)
        return -1;
    if (!path)
        return 0;
    pem = tls_read_file(path, &len);
    if (!pem) {
        error_setg_errno(errp, errno, "Failed to open file \u201c%s\u201d", path);
        return -1;
    }
    r = gnutls_dh_params_init(&c->dh);
    if (r < 0) {
        error_setg(errp, "Unable to initialize DH parameters: %s", gnutls_strerror(r));
        return -1;
    }
    d.data = (unsigned char *)pem;
    d.size = len;
    r = gnutls_dh_params_import_pkcs3(c->dh, &d, GNUTLS_X509_FMT_PEM);
    if (r < 0) {
        gnutls_dh_params_deinit(c->dh);
        c->dh = NULL;
        error_setg(errp, "Unable to load DH parameters from %s: %s", path, gnutls_strerror(r));
        return -1;
    }
    return 0;
}

void tls_creds_common_finalize(struct tls_creds *c)
{
    if (c->prio)
        gnutls_priority_deinit(c->prio);
    if (c->dh)
        gnutls_dh_params_deinit(c->dh);
    free(c->dir);
    free(c->priority);
}
