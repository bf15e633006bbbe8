/* authz-simple: exactly one identity is allowed. */
#include <stdlib.h>
#include <string.h>
#include "crypto/authz.h"
#include "object/qom.h"
#include "util/xalloc.h"
#include "util/opts.h"

struct authz_simple {
    struct authz a;
    char *identity;
};

static int simple_complete(struct object *obj, json_t *props, error **errp)
{
    struct authz_simple *s = (struct authz_simple *)obj;

    s->identity = xstrdup(opt_str(props, "identity", ""));
    return 0;
}

static void simple_finalize(struct object *obj)
{
    free(((struct authz_simple *)obj)->identity);
}

static int simple_is_allowed(struct authz *a, const char *identity, error **errp)
{
    return strcmp(((struct authz_simple *)a)->identity, identity) == 0;
}

/* qom-set identity: the next check uses it, as in QEMU. */
static int simple_set_prop(struct object *obj, const char *name, json_t *value, error **errp)
{
    struct authz_simple *s = (struct authz_simple *)obj;

    free(s->identity);
    s->identity = xstrdup(json_string_value(value));
    return 0;
}

static const struct qom_prop authz_simple_props[] = {
    { "identity", "string", "str", "\"\"" },
    { NULL },
};
static struct qom_class authz_simple_class = {
    .name = "authz-simple", .parent = "authz", .user_creatable = true,
    .props = authz_simple_props,
};
QOM_CLASS_REGISTER(authz_simple_class)

static struct authz_type authz_simple_type = {
    .base = {
        .name = "authz-simple",
        .instance_size = sizeof(struct authz_simple),
        .qom = &authz_simple_class,
        .set_prop = simple_set_prop,
        .complete = simple_complete,
        .finalize = simple_finalize,
    },
    .is_allowed = simple_is_allowed,
};
AUTHZ_TYPE_REGISTER(authz_simple_type)
