/*
 * tls-creds-x509: certificates from dir, in QEMU's layout.
 *
 * Theory of operation.  complete() finds the files (server: ca-cert.pem,
 * server-cert.pem, server-key.pem, optional ca-crl.pem and dh-params.pem;
 * client: ca-cert.pem, optional client-cert.pem/client-key.pem), then, with
 * sanity-check on (the default), checks our own certificate and the CA
 * certificates the way QEMU does (validity dates, basic constraints, key
 * usage and purpose, our certificate verifies against the CA), so that a
 * mistake is reported when the object is created with QEMU's message
 * rather than as a failed handshake later.  Finally the files go into one
 * gnutls_certificate_credentials_t shared by every session.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <gnutls/x509.h>
#include "crypto/tls-creds.h"
#include "object/qom.h"
#include "object/secret.h"
#include "util/cleanup.h"
#include "util/opts.h"
#include "util/xalloc.h"

#define X509_MAX_CA 16

struct x509_files {
    char *cacert, *cacrl, *cert, *key;
};

static void x509_files_free(struct x509_files *f)
{
    free(f->cacert);
    free(f->cacrl);
    free(f->cert);
    free(f->key);
}

/* ---- sanity checks (QEMU's, with its messages) ---- */

static const char *who(bool server, bool ca)
{
    return ca ? "CA" : server ? "server" : "client";
}

static int check_times(gnutls_x509_crt_t crt, const char *file, bool server, bool ca,
                       error **errp)
{
    time_t now = time(NULL);

    if (gnutls_x509_crt_get_expiration_time(crt) < now) {
        error_setg(errp, "The %s certificate %s has expired", who(server, ca), file);
        return -1;
    }
    if (gnutls_x509_crt_get_activation_time(crt) > now) {
        error_setg(errp, "The %s certificate %s is not yet active", who(server, ca), file);
        return -1;
    }
    return 0;
}

static int check_constraints(gnutls_x509_crt_t crt, const char *file, bool server, bool ca,
                             error **errp)
{
    int st = gnutls_x509_crt_get_basic_constraints(crt, NULL, NULL, NULL);

    if (st > 0 && !ca) {
        error_setg(errp, "The certificate %s basic constraints show a CA, but we need one for a %s",
                   file, server ? "server" : "client");
        return -1;
    }
    if (st == 0 && ca) {
        error_setg(errp, "The certificate %s basic constraints do not show a CA", file);
        return -1;
    }
    if (st == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE && ca) {
        error_setg(errp, "The certificate %s is missing basic constraints for a CA", file);
        return -1;
    }
    if (st < 0 && st != GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE) {
        error_setg(errp, "Unable to query certificate %s basic constraints: %s",
                   file, gnutls_strerror(st));
        return -1;
    }
    return 0;
}

static int check_usage(gnutls_x509_crt_t crt, const char *file, bool ca, error **errp)
{
    unsigned usage = 0, critical = 0;
    int st = gnutls_x509_crt_get_key_usage(crt, &usage, &critical);

    if (st == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
        return 0;   /* no extension: anything goes */
    if (st < 0) {
        error_setg(errp, "Unable to query certificate %s key usage: %s", file, gnutls_strerror(st));
        return -1;
    }
    /* QEMU 7.2 no longer asks for key encipherment (ECDSA keys lack it) */
    if (!critical)
        return 0;
    if (ca && !(usage & GNUTLS_KEY_KEY_CERT_SIGN)) {
        error_setg(errp, "Certificate %s usage does not permit certificate signing", file);
        return -1;
    }
    if (!ca && !(usage & GNUTLS_KEY_DIGITAL_SIGNATURE)) {
        error_setg(errp, "Certificate %s usage does not permit digital signature", file);
        return -1;
    }
    return 0;
}

static int check_purpose(gnutls_x509_crt_t crt, const char *file, bool server, error **errp)
{
    bool allow_server = false, allow_client = false, critical = false;

    for (unsigned i = 0;; i++) {
        char oid[256];
        size_t size = sizeof(oid);
        unsigned crit = 0;
        int st = gnutls_x509_crt_get_key_purpose_oid(crt, i, oid, &size, &crit);

        if (st == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE) {
            if (i == 0)
                allow_server = allow_client = true;
            break;
        }
        if (st < 0) {
            error_setg(errp, "Unable to query certificate %s key purpose: %s",
                       file, gnutls_strerror(st));
            return -1;
        }
        critical |= crit != 0;
        if (!strcmp(oid, GNUTLS_KP_TLS_WWW_SERVER))
            allow_server = true;
        else if (!strcmp(oid, GNUTLS_KP_TLS_WWW_CLIENT))
            allow_client = true;
        else if (!strcmp(oid, GNUTLS_KP_ANY))
            allow_server = allow_client = true;
    }
    if (server && !allow_server && critical) {
        error_setg(errp, "Certificate %s purpose does not allow use with a TLS server", file);
        return -1;
    }
    if (!server && !allow_client && critical) {
        error_setg(errp, "Certificate %s purpose does not allow use with a TLS client", file);
        return -1;
    }
    return 0;
}

static int check_cert(gnutls_x509_crt_t crt, const char *file, bool server, bool ca,
                      error **errp)
{
    if (check_times(crt, file, server, ca, errp) < 0 ||
        check_constraints(crt, file, server, ca, errp) < 0 ||
        check_usage(crt, file, ca, errp) < 0)
        return -1;
    return ca ? 0 : check_purpose(crt, file, server, errp);
}

/* GnuTLS verification status bits -> QEMU's one-line reason. */
const char *tls_cert_status_reason(unsigned status)
{
    if (status & GNUTLS_CERT_INSECURE_ALGORITHM)
        return "The certificate uses an insecure algorithm";
    if (status & GNUTLS_CERT_REVOKED)
        return "The certificate has been revoked";
    if (status & GNUTLS_CERT_SIGNER_NOT_FOUND)
        return "The certificate hasn't got a known issuer";
    if (status & GNUTLS_CERT_INVALID)
        return "The certificate is not trusted";
    return "Invalid certificate";
}

static int check_pair(gnutls_x509_crt_t crt, const char *file, gnutls_x509_crt_t *cas,
                      unsigned nca, const char *cafile, bool server, error **errp)
{
    unsigned status = 0;

    if (gnutls_x509_crt_list_verify(&crt, 1, cas, nca, NULL, 0, 0, &status) < 0) {
        error_setg(errp, "Unable to verify %s certificate %s against CA certificate %s",
                   server ? "server" : "client", file, cafile);
        return -1;
    }
    if (status) {
        error_setg(errp, "Our own certificate %s failed validation against %s: %s",
                   file, cafile, tls_cert_status_reason(status));
        return -1;
    }
    return 0;
}

static int load_pem(const char *file, gnutls_datum_t *d, char **buf, error **errp)
{
    size_t len;

    *buf = tls_read_file(file, &len);
    if (!*buf) {
        error_setg_errno(errp, errno, "Cannot load CA cert list %s", file);
        return -1;
    }
    d->data = (unsigned char *)*buf;
    d->size = strlen(*buf);
    return 0;
}

static gnutls_x509_crt_t load_cert(const char *file, bool server, error **errp)
{
    CLEANUP_FREE char *buf = NULL;
    gnutls_x509_crt_t crt;
    gnutls_datum_t d;
    int r;

    if (load_pem(file, &d, &buf, errp) < 0)
        return NULL;
    r = gnutls_x509_crt_init(&crt);
    if (r < 0) {
        error_setg(errp, "Unable to initialize certificate: %s", gnutls_strerror(r));
        return NULL;
    }
    r = gnutls_x509_crt_import(crt, &d, GNUTLS_X509_FMT_PEM);
    if (r < 0) {
        error_setg(errp, "Unable to import %s certificate %s: %s",
                   server ? "server" : "client", file, gnutls_strerror(r));
        gnutls_x509_crt_deinit(crt);
        return NULL;
    }
    return crt;
}

static int load_ca_list(const char *file, gnutls_x509_crt_t *cas, unsigned *nca, error **errp)
{
    CLEANUP_FREE char *buf = NULL;
    gnutls_datum_t d;

    *nca = 0;
    if (load_pem(file, &d, &buf, errp) < 0)
        return -1;
    unsigned max = X509_MAX_CA;
    if (gnutls_x509_crt_list_import(cas, &max, &d, GNUTLS_X509_FMT_PEM, 0) < 0) {
        error_setg(errp, "Unable to import CA certificate list %s", file);
        return -1;
    }
    *nca = max;
    return 0;
}

static int x509_sanity_check(const struct x509_files *f, bool server, error **errp)
{
    gnutls_x509_crt_t crt = NULL, cas[X509_MAX_CA];
    unsigned nca = 0;
    int ret = -1;

    if (f->cert && access(f->cert, R_OK) == 0) {
        crt = load_cert(f->cert, server, errp);
        if (!crt)
            return -1;
    }
    if (access(f->cacert, R_OK) == 0 && load_ca_list(f->cacert, cas, &nca, errp) < 0)
        goto out;
    if (crt && check_cert(crt, f->cert, server, false, errp) < 0)
        goto out;
    for (unsigned i = 0; i < nca; i++)
        if (check_cert(cas[i], f->cacert, server, true, errp) < 0)
            goto out;
    if (crt && nca && check_pair(crt, f->cert, cas, nca, f->cacert, server, errp) < 0)
        goto out;
    ret = 0;
out:
    if (crt)
        gnutls_x509_crt_deinit(crt);
    for (unsigned i = 0; i < nca; i++)
        gnutls_x509_crt_deinit(cas[i]);
    return ret;
}

/* ---- loading ---- */

static int x509_find_files(struct tls_creds *c, struct x509_files *f, error **errp)
{
    bool server = c->endpoint == TLS_ENDPOINT_SERVER;

    if (tls_creds_get_path(c, TLS_CA_CERT, true, &f->cacert, errp) < 0)
        return -1;
    if (server)
        return tls_creds_get_path(c, TLS_CA_CRL, false, &f->cacrl, errp) < 0 ||
               tls_creds_get_path(c, TLS_SERVER_CERT, true, &f->cert, errp) < 0 ||
               tls_creds_get_path(c, TLS_SERVER_KEY, true, &f->key, errp) < 0 ? -1 : 0;
    return tls_creds_get_path(c, TLS_CLIENT_CERT, false, &f->cert, errp) < 0 ||
           tls_creds_get_path(c, TLS_CLIENT_KEY, false, &f->key, errp) < 0 ? -1 : 0;
}

/* x509_load: dh is loaded the first time only; a reload keeps it. */
static int x509_load(struct tls_creds *c, const struct x509_files *f, const char *passwordid,
                     bool load_dh, error **errp)
{
    int r = gnutls_certificate_allocate_credentials(&c->u.x509);

    if (r < 0) {
        error_setg(errp, "Cannot allocate credentials: '%s'", gnutls_strerror(r));
        return -1;
    }
    r = gnutls_certificate_set_x509_trust_file(c->u.x509, f->cacert, GNUTLS_X509_FMT_PEM);
    if (r < 0) {
        error_setg(errp, "Cannot load CA certificate '%s': %s", f->cacert, gnutls_strerror(r));
        return -1;
    }
    if (f->cert && f->key) {
        CLEANUP_FREE char *password = NULL;
        if (passwordid && !(password = secret_lookup_as_utf8(passwordid, errp)))
            return -1;
        r = gnutls_certificate_set_x509_key_file2(c->u.x509, f->cert, f->key,
                                                  GNUTLS_X509_FMT_PEM, password, 0);
        if (r < 0) {
            error_setg(errp, "Cannot load certificate '%s' & key '%s': %s",
                       f->cert, f->key, gnutls_strerror(r));
            return -1;
        }
    }
    if (f->cacrl) {
        r = gnutls_certificate_set_x509_crl_file(c->u.x509, f->cacrl, GNUTLS_X509_FMT_PEM);
        if (r < 0) {
            error_setg(errp, "Cannot load CRL '%s': %s", f->cacrl, gnutls_strerror(r));
            return -1;
        }
    }
    if (c->endpoint == TLS_ENDPOINT_SERVER) {
        if (load_dh && tls_creds_load_dh(c, errp) < 0)
            return -1;
        if (c->dh)
            gnutls_certificate_set_dh_params(c->u.x509, c->dh);
        else
            gnutls_certificate_set_known_dh_params(c->u.x509, GNUTLS_SEC_PARAM_MEDIUM);
    }
    return 0;
}

static int x509_complete(struct object *obj, json_t *props, error **errp)
{
    struct tls_creds *c = (struct tls_creds *)obj;
    struct x509_files f = { 0 };
    int ret = -1;

    c->kind = TLS_CREDS_X509;
    tls_creds_common_props(c, props, NULL);
    if (x509_find_files(c, &f, errp) < 0)
        goto out;
    c->sanity_check = opt_bool(props, "sanity-check", true);
    c->passwordid = xstrdup_opt(opt_str(props, "passwordid", NULL));
    if (c->sanity_check &&
        x509_sanity_check(&f, c->endpoint == TLS_ENDPOINT_SERVER, errp) < 0)
        goto out;
    ret = x509_load(c, &f, c->passwordid, true, errp);
out:
    x509_files_free(&f);
    return ret;
}

struct tls_retired_x509 {
    gnutls_certificate_credentials_t x509;
    struct tls_retired_x509 *next;
};

/* Certificate rotation: read the files again, check them as object-add
 * does, and make them the credentials of new sessions.  Sessions already
 * established keep the credentials they started with (GnuTLS points at
 * them), so those stay allocated until the object goes.  Any failure
 * leaves the object as it was. */
static int x509_reload(struct object *obj, error **errp)
{
    struct tls_creds *c = (struct tls_creds *)obj;
    struct tls_creds fresh = *c;
    struct x509_files f = { 0 };
    int ret = -1;

    fresh.u.x509 = NULL;
    if (x509_find_files(c, &f, errp) < 0)
        goto out;
    if (c->sanity_check &&
        x509_sanity_check(&f, c->endpoint == TLS_ENDPOINT_SERVER, errp) < 0)
        goto out;
    if (x509_load(&fresh, &f, c->passwordid, false, errp) < 0)
        goto out;
    struct tls_retired_x509 *r = xzalloc(sizeof(*r));
    r->x509 = c->u.x509;
    r->next = c->retired;
    c->retired = r;
    c->u.x509 = fresh.u.x509;
    fresh.u.x509 = NULL;
    ret = 0;
out:
    if (fresh.u.x509)
        gnutls_certificate_free_credentials(fresh.u.x509);
    x509_files_free(&f);
    return ret;
}

static void x509_finalize(struct object *obj)
{
    struct tls_creds *c = (struct tls_creds *)obj;

    if (c->u.x509)
        gnutls_certificate_free_credentials(c->u.x509);
    while (c->retired) {
        struct tls_retired_x509 *r = c->retired;
        c->retired = r->next;
        gnutls_certificate_free_credentials(r->x509);
        free(r);
    }
    free(c->passwordid);
    tls_creds_common_finalize(c);
}

static const struct qom_prop tls_creds_x509_props[] = {
    { "sanity-check", "bool", "bool", "true" },
    { "passwordid", "string", "str", "\"\"" },
    { "loaded", "bool", NULL, "true" },
    { NULL },
};
static struct qom_class tls_creds_x509_class = {
    .name = "tls-creds-x509", .parent = "tls-creds", .user_creatable = true,
    .props = tls_creds_x509_props,
};
QOM_CLASS_REGISTER(tls_creds_x509_class)

static const struct object_type tls_creds_x509_type = {
    .name = "tls-creds-x509",
    .instance_size = sizeof(struct tls_creds),
    .qom = &tls_creds_x509_class,
    .set_prop = tls_creds_set_prop,
    .complete = x509_complete,
    .finalize = x509_finalize,
    .reload = x509_reload,
};
OBJECT_TYPE_REGISTER(tls_creds_x509_type)
