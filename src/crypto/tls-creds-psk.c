/*
 * tls-creds-psk: pre-shared keys from dir/keys.psk (psktool's
 * "username:hexkey" lines).  A server reads the file through GnuTLS at
 * each handshake, so keys can be added without recreating the object; a
 * client takes its username's key (default "qemu") once.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "crypto/tls-creds.h"
#include "object/qom.h"
#include "util/cleanup.h"
#include "util/xalloc.h"
#include "util/opts.h"

#define PSK_EXTRA "+ECDHE-PSK:+DHE-PSK:+PSK"

/* The hex key of user in the psk file, as a new string. */
static char *psk_find_key(const char *path, const char *user, error **errp)
{
    size_t len, ulen = strlen(user);
    CLEANUP_FREE char *text = tls_read_file(path, &len);
    char *line, *save = NULL;

    if (!text) {
        error_setg_errno(errp, errno, "Cannot read PSK file %s", path);
        return NULL;
    }
    for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, user, ulen) == 0 && line[ulen] == ':') {
            char *key = xstrdup(line + ulen + 1);
            return key;
        }
    }
    error_setg(errp, "Username %s not found in PSK file %s", user, path);
    return NULL;
}

static int psk_client_load(struct tls_creds *c, const char *path, const char *user,
                           error **errp)
{
    CLEANUP_FREE char *key = psk_find_key(path, user ? user : "qemu", errp);
    gnutls_datum_t d;
    int r;

    if (!key)
        return -1;
    r = gnutls_psk_allocate_client_credentials(&c->u.psk_client);
    if (r < 0) {
        error_setg(errp, "Cannot allocate credentials: %s", gnutls_strerror(r));
        return -1;
    }
    d.data = (unsigned char *)key;
    d.size = strlen(key);
    r = gnutls_psk_set_client_credentials(c->u.psk_client, user ? user : "qemu", &d,
                                          GNUTLS_PSK_KEY_HEX);
    if (r < 0) {
        error_setg(errp, "Cannot set PSK client credentials: %s", gnutls_strerror(r));
        return -1;
    }
    return 0;
}

static int psk_server_load(struct tls_creds *c, const char *path, error **errp)
{
    int r = gnutls_psk_allocate_server_credentials(&c->u.psk_server);

    if (r < 0) {
        error_setg(errp, "Cannot allocate credentials: %s", gnutls_strerror(r));
        return -1;
    }
    if (tls_creds_load_dh(c, errp) < 0)
        return -1;
    gnutls_psk_set_server_credentials_file(c->u.psk_server, path);
    if (c->dh)
        gnutls_psk_set_server_dh_params(c->u.psk_server, c->dh);
    else
        gnutls_psk_set_server_known_dh_params(c->u.psk_server, GNUTLS_SEC_PARAM_MEDIUM);
    return 0;
}

static int psk_complete(struct object *obj, json_t *props, error **errp)
{
    struct tls_creds *c = (struct tls_creds *)obj;
    const char *user = opt_str(props, "username", NULL);
    CLEANUP_FREE char *path = NULL;

    c->kind = TLS_CREDS_PSK;
    tls_creds_common_props(c, props, PSK_EXTRA);
    if (c->endpoint == TLS_ENDPOINT_SERVER && user) {
        error_setg(errp, "username should not be set when endpoint=server");
        return -1;
    }
    /* a server looks its dh-params.pem up first (it may be missing), then
     * keys.psk, as QEMU does */
    CLEANUP_FREE char *dh = NULL;
    if (c->endpoint == TLS_ENDPOINT_SERVER &&
        tls_creds_get_path(c, TLS_DH_PARAMS, false, &dh, errp) < 0)
        return -1;
    if (tls_creds_get_path(c, TLS_PSK_FILE, true, &path, errp) < 0)
        return -1;
    if (c->endpoint == TLS_ENDPOINT_CLIENT)
        return psk_client_load(c, path, user, errp);
    return psk_server_load(c, path, errp);
}

static void psk_finalize(struct object *obj)
{
    struct tls_creds *c = (struct tls_creds *)obj;

    if (c->endpoint == TLS_ENDPOINT_CLIENT && c->u.psk_client)
        gnutls_psk_free_client_credentials(c->u.psk_client);
    else if (c->endpoint == TLS_ENDPOINT_SERVER && c->u.psk_server)
        gnutls_psk_free_server_credentials(c->u.psk_server);
    tls_creds_common_finalize(c);
}

static const struct qom_prop tls_creds_psk_props[] = {
    { "username", "string", "str", "\"\"" },
    { "loaded", "bool", NULL, "true" },
    { NULL },
};
static struct qom_class tls_creds_psk_class = {
    .name = "tls-creds-psk", .parent = "tls-creds", .user_creatable = true,
    .props = tls_creds_psk_props,
};
QOM_CLASS_REGISTER(tls_creds_psk_class)

static const struct object_type tls_creds_psk_type = {
    .name = "tls-creds-psk",
    .instance_size = sizeof(struct tls_creds),
    .qom = &tls_creds_psk_class,
    .set_prop = tls_creds_set_prop,
    .complete = psk_complete,
    .finalize = psk_finalize,
};
OBJECT_TYPE_REGISTER(tls_creds_psk_type)
