/*
 * tls-creds-anon: anonymous Diffie-Hellman, no authentication of either
 * side (QEMU's TLS_PRIORITY_ADDITIONAL_ANON enables the key exchange).
 */
#include <stdlib.h>
#include "crypto/tls-creds.h"
#include "object/qom.h"

static int anon_complete(struct object *obj, json_t *props, error **errp)
{
    struct tls_creds *c = (struct tls_creds *)obj;
    int r;

    c->kind = TLS_CREDS_ANON;
    tls_creds_common_props(c, props, "+ANON-DH");
    if (c->endpoint == TLS_ENDPOINT_CLIENT) {
        r = gnutls_anon_allocate_client_credentials(&c->u.anon_client);
        if (r < 0) {
            error_setg(errp, "Cannot allocate credentials: %s", gnutls_strerror(r));
            return -1;
        }
        return 0;
    }
    if (tls_creds_load_dh(c, errp) < 0)
        return -1;
    r = gnutls_anon_allocate_server_credentials(&c->u.anon_server);
    if (r < 0) {
        error_setg(errp, "Cannot allocate credentials: %s", gnutls_strerror(r));
        return -1;
    }
    if (c->dh)
        gnutls_anon_set_server_dh_params(c->u.anon_server, c->dh);
    else
        gnutls_anon_set_server_known_dh_params(c->u.anon_server, GNUTLS_SEC_PARAM_MEDIUM);
    return 0;
}

static void anon_finalize(struct object *obj)
{
    struct tls_creds *c = (struct tls_creds *)obj;

    if (c->endpoint == TLS_ENDPOINT_CLIENT && c->u.anon_client)
        gnutls_anon_free_client_credentials(c->u.anon_client);
    else if (c->endpoint == TLS_ENDPOINT_SERVER && c->u.anon_server)
        gnutls_anon_free_server_credentials(c->u.anon_server);
    tls_creds_common_finalize(c);
}

static const struct qom_prop tls_creds_anon_props[] = {
    { "loaded", "bool", NULL, "true" },
    { NULL },
};
static struct qom_class tls_creds_anon_class = {
    .name = "tls-creds-anon", .parent = "tls-creds", .user_creatable = true,
    .props = tls_creds_anon_props,
};
QOM_CLASS_REGISTER(tls_creds_anon_class)

static const struct object_type tls_creds_anon_type = {
    .name = "tls-creds-anon",
    .instance_size = sizeof(struct tls_creds),
    .qom = &tls_creds_anon_class,
    .set_prop = tls_creds_set_prop,
    .complete = anon_complete,
    .finalize = anon_finalize,
};
OBJECT_TYPE_REGISTER(tls_creds_anon_type)
