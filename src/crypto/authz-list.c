/* authz-list: an ordered list of exact/glob rules and a default policy. */
#include "crypto/authz.h"

struct authz_list {
    struct authz a;
    struct authz_rules rules;
};

static int list_complete(struct object *obj, json_t *props, error **errp)
{
    return authz_rules_parse(&((struct authz_list *)obj)->rules, props, errp);
}

static void list_finalize(struct object *obj)
{
    authz_rules_clear(&((struct authz_list *)obj)->rules);
}

static int list_is_allowed(struct authz *a, const char *identity, error **errp)
{
    return authz_rules_allow(&((struct authz_list *)a)->rules, identity);
}

static struct authz_type authz_list_type = {
    .base = {
        .name = "authz-list",
        .instance_size = sizeof(struct authz_list),
        .complete = list_complete,
        .finalize = list_finalize,
    },
    .is_allowed = list_is_allowed,
};
AUTHZ_TYPE_REGISTER(authz_list_type)
