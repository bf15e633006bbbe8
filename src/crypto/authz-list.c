/* authz-list: an ordered list of exact/glob rules and a default policy. */
#include "crypto/authz.h"
#include "object/qom.h"

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

/* qom-set policy or rules: the next check uses the new list, as in QEMU. */
static int list_set_prop(struct object *obj, const char *name, json_t *value, error **errp)
{
    struct authz_list *l = (struct authz_list *)obj;
    struct authz_rules r;
    json_t *props = json_deep_copy(obj->props);

    json_object_set(props, name, value);
    int ret = authz_rules_parse(&r, props, errp);
    json_decref(props);
    if (ret < 0)
        return -1;
    authz_rules_clear(&l->rules);
    l->rules = r;
    return 0;
}

static const struct qom_prop authz_list_props[] = {
    { "policy", "QAuthZListPolicy", "QAuthZListPolicy", "\"deny\"" },
    { "rules", "QAuthZListRule", "[QAuthZListRule]", "[]" },
    { NULL },
};
static struct qom_class authz_list_class = {
    .name = "authz-list", .parent = "authz", .user_creatable = true,
    .props = authz_list_props,
};
QOM_CLASS_REGISTER(authz_list_class)

static struct authz_type authz_list_type = {
    .base = {
        .name = "authz-list",
        .instance_size = sizeof(struct authz_list),
        .qom = &authz_list_class,
        .set_prop = list_set_prop,
        .complete = list_complete,
        .finalize = list_finalize,
    },
    .is_allowed = list_is_allowed,
};
AUTHZ_TYPE_REGISTER(authz_list_type)
