/*
 * QOM: the class registry, the tree and the qom-* commands (see qom.h).
 *
 * Theory of operation: a path is resolved as QEMU resolves it.  An
 * absolute path ("/objects/io0", empty components skipped) walks child
 * properties from the root.  Any other path is partial: every object in
 * the tree from which the components lead somewhere is a match, and more
 * than one match is ambiguous ("" matches everything).  Property lists
 * come out in QEMU's order: "type", then each class's own properties from
 * the root class down, then the children of a container.  Values of a
 * leaf's properties come from its container; qom-set checks the value
 * against the property's QAPI type (so errors read as qsd's) before the
 * container applies it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "object/qom.h"
#include "qmp/qmp.h"
#include "qmp/schema.h"
#include "util/cleanup.h"
#include "util/opts.h"
#include "util/xalloc.h"

static struct qom_class *classes;

void qom_class_register(struct qom_class *c)
{
    struct qom_class **p = &classes;
    while (*p)
        p = &(*p)->next;
    *p = c;
}

const struct qom_class *qom_class_find(const char *name)
{
    for (struct qom_class *c = classes; c; c = c->next)
        if (!strcmp(c->name, name))
            return c;
    return NULL;
}

static const struct qom_prop type_props[] = {
    { "type", "string", NULL, NULL },
    { NULL },
};
static struct qom_class object_class = { .name = "object", .abstract = true, .props = type_props };
static struct qom_class interface_class = { .name = "interface", .abstract = true };
static struct qom_class user_creatable_class = {
    .name = "user-creatable", .parent = "interface", .abstract = true,
};
static struct qom_class container_class = { .name = "container", .parent = "object" };
QOM_CLASS_REGISTER(object_class)
QOM_CLASS_REGISTER(interface_class)
QOM_CLASS_REGISTER(user_creatable_class)
QOM_CLASS_REGISTER(container_class)

static const struct qom_class *class_parent(const struct qom_class *c)
{
    return c->parent ? qom_class_find(c->parent) : NULL;
}

const struct qom_prop *qom_class_prop(const struct qom_class *cls, const char *name)
{
    for (; cls; cls = class_parent(cls))
        for (const struct qom_prop *p = cls->props; p && p->name; p++)
            if (!strcmp(p->name, name))
                return p;
    return NULL;
}

json_t *qom_prop_default(const struct qom_prop *p)
{
    json_t *v = p->dflt ? json_loads(p->dflt, JSON_DECODE_ANY, NULL) : NULL;
    return v ? v : json_null();
}

static bool class_is_a(const struct qom_class *cls, const struct qom_class *target)
{
    for (const struct qom_class *c = cls; c; c = class_parent(c))
        if (c == target)
            return true;
    return false;
}

/* cls is, descends from, or implements (through an ancestor) target. */
static bool class_implements(const struct qom_class *cls, const struct qom_class *target)
{
    for (const struct qom_class *c = cls; c; c = class_parent(c)) {
        if (c == target)
            return true;
        if (c->user_creatable && class_implements(&user_creatable_class, target))
            return true;
    }
    return false;
}

/* ---- the tree ---- */

extern const struct qom_container object_container;
extern const struct qom_container chardev_container;
static const struct qom_container *const containers[] = { &object_container,
                                                           &chardev_container };

enum node_kind { NODE_ROOT, NODE_CONTAINER, NODE_LEAF };

struct node {
    enum node_kind kind;
    const struct qom_container *cont;   /* CONTAINER: its own; LEAF: its parent */
    void *obj;                          /* LEAF */
};

static const struct qom_class *node_class(const struct node *n)
{
    return n->kind == NODE_LEAF ? n->cont->cls(n->obj) : &container_class;
}

/* The i-th child of n (false when there is none). */
static bool node_child(const struct node *n, size_t i, struct node *out, const char **name)
{
    if (n->kind == NODE_ROOT) {
        if (i >= ARRAY_SIZE(containers))
            return false;
        *out = (struct node){ .kind = NODE_CONTAINER, .cont = containers[i] };
        *name = containers[i]->name;
        return true;
    }
    if (n->kind != NODE_CONTAINER)
        return false;
    void *c = n->cont->first();
    for (; c && i; i--)
        c = n->cont->next(c);
    if (!c)
        return false;
    *out = (struct node){ .kind = NODE_LEAF, .cont = n->cont, .obj = c };
    *name = n->cont->id(c);
    return true;
}

static bool node_child_named(const struct node *n, const char *name, struct node *out)
{
    struct node c;
    const char *cn;
    for (size_t i = 0; node_child(n, i, &c, &cn); i++)
        if (!strcmp(cn, name)) {
            *out = c;
            return true;
        }
    return false;
}

static char *node_path(const struct node *n)
{
    if (n->kind == NODE_ROOT)
        return xstrdup("/");
    if (n->kind == NODE_CONTAINER)
        return xasprintf("/%s", n->cont->name);
    return xasprintf("/%s/%s", n->cont->name, n->cont->id(n->obj));
}

static bool resolve_abs(const struct node *from, char **parts, struct node *out)
{
    struct node cur = *from;
    for (; *parts; parts++) {
        if (!**parts)
            continue;
        struct node next;
        if (!node_child_named(&cur, *parts, &next))
            return false;
        cur = next;
    }
    *out = cur;
    return true;
}

/* QEMU's object_resolve_partial_path(): 0 none, 1 found, -1 ambiguous. */
static int resolve_partial(const struct node *from, char **parts, struct node *out)
{
    int found = resolve_abs(from, parts, out) ? 1 : 0;
    struct node c, sub;
    const char *cn;
    for (size_t i = 0; node_child(from, i, &c, &cn); i++) {
        int r = resolve_partial(&c, parts, &sub);
        if (r < 0 || (r > 0 && found))
            return -1;
        if (r > 0) {
            *out = sub;
            found = 1;
        }
    }
    return found;
}

static char **split_path(const char *path)
{
    size_t n = 1;
    for (const char *p = path; *p; p++)
        n += *p == '/';
    char **parts = xcalloc(n + 1, sizeof(*parts));
    if (!*path)
        return parts;           /* no component at all, as g_strsplit("") */
    const char *s = path;
    for (size_t i = 0; i < n; i++) {
        const char *e = strchr(s, '/');
        size_t len = e ? (size_t)(e - s) : strlen(s);
        parts[i] = xstrndup(s, len);
        s += len + 1;
    }
    return parts;
}

static void free_parts(char **parts)
{
    for (char **p = parts; *p; p++)
        free(*p);
    free(parts);
}

/* 0 found, -1 not found, -2 ambiguous. */
static int resolve(const char *path, struct node *out)
{
    char **parts = split_path(path);
    struct node root = { .kind = NODE_ROOT };
    int r;
    if (parts[0] && !*parts[0]) {
        r = resolve_abs(&root, parts + 1, out) ? 0 : -1;
    } else {
        r = resolve_partial(&root, parts, out);
        r = r > 0 ? 0 : r < 0 ? -2 : -1;
    }
    free_parts(parts);
    return r;
}

static bool resolve_or_error(const char *path, struct node *n, bool say_ambiguous, error **errp)
{
    int r = resolve(path, n);
    if (r == -2 && say_ambiguous)
        error_setg(errp, "Path '%s' is ambiguous", path);
    else if (r < 0)
        error_set(errp, ERR_DEVICE_NOT_FOUND, "Device '%s' not found", path);
    return r == 0;
}

/* ---- properties ---- */

static void class_props_into(const struct qom_class *cls, json_t *list)
{
    if (!cls)
        return;
    class_props_into(class_parent(cls), list);
    for (const struct qom_prop *p = cls->props; p && p->name; p++)
        json_array_append_new(list, json_pack("{s:s, s:s}", "name", p->name, "type", p->type));
}

static json_t *qmp_qom_list(json_t *args, error **errp)
{
    struct node n, c;
    const char *cn;
    if (!resolve_or_error(opt_str(args, "path", ""), &n, true, errp))
        return NULL;
    json_t *list = json_array();
    class_props_into(node_class(&n), list);
    for (size_t i = 0; node_child(&n, i, &c, &cn); i++) {
        CLEANUP_FREE char *t = xasprintf("child<%s>", node_class(&c)->name);
        json_array_append_new(list, json_pack("{s:s, s:s}", "name", cn, "type", t));
    }
    return list;
}
QMP_COMMAND("qom-list", qmp_qom_list)

static json_t *qmp_qom_get(json_t *args, error **errp)
{
    struct node n, c;
    const char *name = opt_str(args, "property", "");
    if (!resolve_or_error(opt_str(args, "path", ""), &n, false, errp))
        return NULL;
    const struct qom_class *cls = node_class(&n);
    if (!strcmp(name, "type"))
        return json_string(cls->name);
    if (node_child_named(&n, name, &c)) {
        CLEANUP_FREE char *path = node_path(&c);
        return json_string(path);
    }
    const struct qom_prop *p = n.kind == NODE_LEAF ? qom_class_prop(cls, name) : NULL;
    if (!p) {
        error_setg(errp, "Property '%s.%s' not found", cls->name, name);
        return NULL;
    }
    return n.cont->get(n.obj, p);
}
QMP_COMMAND("qom-get", qmp_qom_get)

static json_t *qmp_qom_set(json_t *args, error **errp)
{
    struct node n, c;
    const char *name = opt_str(args, "property", "");
    if (!resolve_or_error(opt_str(args, "path", ""), &n, false, errp))
        return NULL;
    const struct qom_class *cls = node_class(&n);
    const struct qom_prop *p = n.kind == NODE_LEAF ? qom_class_prop(cls, name) : NULL;
    if (!p && strcmp(name, "type") && !node_child_named(&n, name, &c)) {
        error_setg(errp, "Property '%s.%s' not found", cls->name, name);
        return NULL;
    }
    if (!p || !p->schema) {
        error_setg(errp, "Property '%s.%s' is not writable", cls->name, name);
        return NULL;
    }
    CLEANUP_JSON json_t *v = schema_check_type(p->schema, json_object_get(args, "value"),
                                                false, name, errp);
    if (!v || n.cont->set(n.obj, p, v, errp) < 0)
        return NULL;
    return json_object();
}
QMP_COMMAND("qom-set", qmp_qom_set)

static json_t *type_info(const struct qom_class *c)
{
    json_t *t = json_pack("{s:s}", "name", c->name);
    if (c->abstract)
        json_object_set_new(t, "abstract", json_true());
    if (c->parent)
        json_object_set_new(t, "parent", json_string(c->parent));
    return t;
}

static json_t *qmp_qom_list_types(json_t *args, error **errp)
{
    const char *impl = opt_str(args, "implements", NULL);
    bool abstract = opt_bool(args, "abstract", false);
    const struct qom_class *target = impl ? qom_class_find(impl) : NULL;
    json_t *list = json_array();
    if (impl && !target)
        return list;
    for (const struct qom_class *c = classes; c; c = c->next)
        if ((abstract || !c->abstract) && (!target || class_implements(c, target)))
            json_array_append_new(list, type_info(c));
    return list;
}
QMP_COMMAND("qom-list-types", qmp_qom_list_types)

static json_t *qmp_qom_list_properties(json_t *args, error **errp)
{
    const char *name = opt_str(args, "typename", "");
    const struct qom_class *c = qom_class_find(name);
    if (!c) {
        error_set(errp, ERR_DEVICE_NOT_FOUND, "Class '%s' not found", name);
        return NULL;
    }
    if (class_is_a(c, &interface_class)) {
        error_setg(errp, "Parameter 'typename' expects a QOM type");
        return NULL;
    }
    json_t *list = json_array();
    class_props_into(c, list);
    return list;
}
QMP_COMMAND("qom-list-properties", qmp_qom_list_properties)
