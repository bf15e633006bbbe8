/*
 * Authorization: lookup by id at check time, and the rule list engine of
 * authz-list and authz-listfile (first matching rule decides, else the
 * default policy; "exact" compares strings, "glob" uses fnmatch(3)).
 */
#include <fnmatch.h>
#include <stdlib.h>
#include <string.h>
#include "crypto/authz.h"
#include "object/qom.h"
#include "util/xalloc.h"
#include "util/opts.h"

static bool authz_is(const struct object *o)
{
    return strncmp(o->type->name, "authz-", 6) == 0;
}

static struct qom_class authz_class = { .name = "authz", .parent = "object", .abstract = true };
QOM_CLASS_REGISTER(authz_class)

int authz_is_allowed_by_id(const char *id, const char *identity, error **errp)
{
    struct object *o = object_find(id);
    const struct authz_type *t;

    if (!o) {
        error_setg(errp, "Cannot find QAuthZ object ID %s", id);
        return -1;
    }
    if (!authz_is(o)) {
        error_setg(errp, "Object '%s' is not a QAuthZ subclass", id);
        return -1;
    }
    t = (const struct authz_type *)o->type;
    return t->is_allowed((struct authz *)o, identity, errp);
}

int authz_rules_parse(struct authz_rules *r, json_t *props, error **errp)
{
    json_t *rules = json_object_get(props, "rules");
    size_t i;
    json_t *rule;

    r->allow = !strcmp(opt_str(props, "policy", "deny"), "allow");
    r->n = 0;
    r->v = NULL;
    if (!json_is_array(rules) || json_array_size(rules) == 0)
        return 0;
    r->v = xcalloc(json_array_size(rules), sizeof(*r->v));
    json_array_foreach(rules, i, rule) {
        struct authz_rule *x = &r->v[r->n];
        x->match = xstrdup(opt_str(rule, "match", ""));
        x->allow = !strcmp(opt_str(rule, "policy", "deny"), "allow");
        x->glob = !strcmp(opt_str(rule, "format", "exact"), "glob");
        r->n++;
    }
    return 0;
}

bool authz_rules_allow(const struct authz_rules *r, const char *identity)
{
    for (size_t i = 0; i < r->n; i++) {
        const struct authz_rule *x = &r->v[i];
        bool hit = x->glob ? fnmatch(x->match, identity, 0) == 0 : !strcmp(x->match, identity);
        if (hit)
            return x->allow;
    }
    return r->allow;
}

void authz_rules_clear(struct authz_rules *r)
{
    for (size_t i = 0; i < r->n; i++)
        free(r->v[i].match);
    free(r->v);
    r->v = NULL;
    r->n = 0;
}
