/*
 * authz-pam: ask PAM's account management (pam_acct_mgmt) of a service
 * whether the identity may log in, as QEMU does.  PAM modules may block;
 * a check runs once per connection, at the end of its TLS handshake.
 */
#include <stdlib.h>
#include <string.h>
#include <security/pam_appl.h>
#include "crypto/authz.h"
#include "object/qom.h"
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

/* qom-set service: the next check uses it, as in QEMU. */
static int pam_set_prop(struct object *obj, const char *name, json_t *value, error **errp)
{
    struct authz_pam *p = (struct authz_pam *)obj;

    free(p->service);
    p->service = xstrdup(json_string_value(value));
    return 0;
}

static const struct qom_prop authz_pam_props[] = {
    { "service", "string", "str", "\"\"" },
    { NULL },
};
static struct qom_class authz_pam_class = {
    .name = "authz-pam", .parent = "authz", .user_creatable = true, .props = authz_pam_props,
};
QOM_CLASS_REGISTER(authz_pam_class)

static struct authz_type authz_pam_type = {
    .base = {
        .name = "authz-pam",
        .instance_size = sizeof(struct authz_pam),
        .qom = &authz_pam_class,
        .set_prop = pam_set_prop,
        .complete = pam_complete,
        .finalize = pam_finalize,
    },
    .is_allowed = pam_is_allowed,
};
AUTHZ_TYPE_REGISTER(authz_pam_type)
