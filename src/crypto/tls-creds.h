/*
 * TLS credentials objects (tls-creds-x509, tls-creds-psk, tls-creds-anon):
 * QEMU 7.2's properties, files and messages, loaded once into GnuTLS
 * credentials when the object is created.  Users look them up by id
 * (tls_creds_lookup) and pin them with object_ref() while they use them.
 */
#pragma once
#include <stdbool.h>
#include <gnutls/gnutls.h>
#include "object/object.h"
#include "util/error.h"

enum tls_endpoint { TLS_ENDPOINT_CLIENT, TLS_ENDPOINT_SERVER };
enum tls_creds_kind { TLS_CREDS_ANON, TLS_CREDS_PSK, TLS_CREDS_X509 };

struct tls_creds {
    struct object obj;                 /* first */
    enum tls_creds_kind kind;
    enum tls_endpoint endpoint;
    bool verify_peer;
    char *dir;
    char *priority;                    /* full string given to GnuTLS */
    const char *prio_extra;            /* what this kind appends to the priority */
    gnutls_priority_t prio;            /* NULL: priority string is invalid */
    gnutls_dh_params_t dh;             /* from dh-params.pem, if any */
    /* x509 reload (ops): how the object was made, and the credentials
     * replaced by a reload that sessions may still use (freed with it) */
    bool sanity_check;
    char *passwordid;
    struct tls_retired_x509 *retired;
    union {
        gnutls_certificate_credentials_t x509;
        gnutls_psk_server_credentials_t psk_server;
        gnutls_psk_client_credentials_t psk_client;
        gnutls_anon_server_credentials_t anon_server;
        gnutls_anon_client_credentials_t anon_client;
    } u;
};

/* File names inside dir, as QEMU names them. */
#define TLS_CA_CERT     "ca-cert.pem"
#define TLS_CA_CRL      "ca-crl.pem"
#define TLS_SERVER_CERT "server-cert.pem"
#define TLS_SERVER_KEY  "server-key.pem"
#define TLS_CLIENT_CERT "client-cert.pem"
#define TLS_CLIENT_KEY  "client-key.pem"
#define TLS_DH_PARAMS   "dh-params.pem"
#define TLS_PSK_FILE    "keys.psk"

/* The credentials named id, for the given endpoint.  QEMU's messages:
 * "No TLS credentials with id 'x'", "Object with id 'x' is not TLS
 * credentials", "Expected TLS credentials for a server endpoint". */
struct tls_creds *tls_creds_lookup(const char *id, enum tls_endpoint ep, error **errp);
bool tls_creds_is(const struct object *o);

/* ---- for the tls-creds-* types (tls-creds.c) ---- */
/* Read dir, endpoint, verify-peer, priority (extra: appended to the
 * priority string for this kind of credentials, or NULL). */
void tls_creds_common_props(struct tls_creds *c, json_t *props, const char *extra);
/* dir/name in *path (NULL when optional and absent); QEMU's messages. */
int  tls_creds_get_path(struct tls_creds *c, const char *name, bool required,
                        char **path, error **errp);
/* Load dh-params.pem when the directory has one (server endpoints). */
int  tls_creds_load_dh(struct tls_creds *c, error **errp);
void tls_creds_common_finalize(struct tls_creds *c);
/* qom-set on any tls-creds-*: verify-peer and priority apply to the next
 * session, as in QEMU; the rest (read when the credentials were loaded) is
 * only recorded. */
int  tls_creds_set_prop(struct object *obj, const char *name, json_t *value, error **errp);
/* Whole file in a NUL-terminated buffer (bounded), or NULL with errno set. */
char *tls_read_file(const char *path, size_t *len);
/* GnuTLS certificate verification status -> QEMU's reason text. */
const char *tls_cert_status_reason(unsigned status);
