/*
 * authz-pam: ask PAM's account management (pam_acct_mgmt) of a service
 * whether the identity may log in, as QEMU does.  PAM modules may block;
 * a check runs once per connection, at the end of its TLS handshake.
 */
#include <stdlib.h>
#include <string.h>
#include <security/pam_appl.h>
#include "crypto/authz.h"
#include "util/xalloc.h"
#include "util/opts.h"

struct authz_pam {
    struct authz a;
    char *service;
};

static int pam_complete(struct object *obj, json_t *props, error **errp)
{
    struct authz_pam *p = (struct authz_pam *)obj;

    p->service = xstrdup(opt_str(props, "service", ""));
    return 0;
}

static void pam_finalize(struct object *obj)
{
    free(((struct authz_pam *)obj)->service);
}

static int pam_is_allowed(struct authz *a, const char *identity, error **errp)
{
    static const struct pam_conv conv = { NULL, NULL };
    struct authz_pam *p = (struct authz_pam *)a;
    pam_handle_t *h = NULL;
    int r = pam_start(p->service, identity, &conv, &h);

    if (r != PAM_SUCCESS) {
        error_setg(errp, "Unable to start PAM transaction: %s", pam_strerror(NULL, r));
        return -1;
    }
    r = pam_acct_mgmt(h, PAM_SILENT);
    if (r != PAM_SUCCESS)
        error_setg(errp, "Unable to authorize user '%s': %s", identity, pam_strerror(h, r));
    pam_end(h, r);
    return r == PAM_SUCCESS ? 1 : -1;
}

static struct authz_type authz_pam_type = {
    .base = {
        .name = "authz-pam",
        .instance_size = sizeof(struct authz_pam),
        .complete = pam_complete,
        .finalize = pam_finalize,
    },
    .is_allowed = pam_is_allowed,
};
AUTHZ_TYPE_REGISTER(authz_pam_type)
