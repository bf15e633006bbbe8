/*
 * User-creatable objects: registry shared by --object, object-add and
 * object-del.  Type-specific work lives in each type's hooks.
 */
#include <assert.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "object/object.h"
#include "object/qom.h"
#include "qmp/qmp.h"
#include "util/xalloc.h"
#include "util/opts.h"
#include "util/id.h"
#include "util/log.h"

static const struct object_type *types[16];
static int n_types;
static struct object *objects;

void object_type_register(const struct object_type *t)
{
    if (n_types < (int)(sizeof(types) / sizeof(types[0])))
        types[n_types++] = t;
}

static const struct object_type *type_find(const char *name)
{
    for (int i = 0; i < n_types; i++)
        if (!strcmp(types[i]->name, name))
            return types[i];
    return NULL;
}

void object_ref(struct object *o)
{
    __atomic_add_fetch(&o->refcnt, 1, __ATOMIC_ACQ_REL);
}

void object_unref(struct object *o)
{
    int left = __atomic_sub_fetch(&o->refcnt, 1, __ATOMIC_ACQ_REL);
    assert(left >= 0);
    (void)left;
}

struct object *object_find(const char *id)
{
    for (struct object *o = objects; o; o = o->next)
        if (!strcmp(o->id, id))
            return o;
    return NULL;
}

int object_add(json_t *props, error **errp)
{
    const char *type_name = opt_str(props, "qom-type", "");
    const char *id = opt_str(props, "id", "");
    const struct object_type *t = type_find(type_name);
    if (!t) {
        error_setg(errp, "invalid object type: %s", type_name);
        return -1;
    }
    if (!id_wellformed(id)) {
        error_setg(errp, "Parameter 'id' expects an identifier");
        return -1;
    }
    /* the deprecated "loaded" of secrets and TLS credentials: QEMU lists
     * it, and refuses it as a read-only property when it is set (before
     * the id is taken) */
    if (json_object_get(props, "loaded")) {
        error_setg(errp, "Property '%s.loaded' is not writable", t->name);
        return -1;
    }
    if (object_find(id)) {
        error_setg(errp, "attempt to add duplicate property '%s' to object (type 'container')", id);
        return -1;
    }
    struct object *o = xzalloc(t->instance_size);
    o->id = xstrdup(id);
    o->type = t;
    if (t->complete && t->complete(o, props, errp) < 0) {
        if (t->finalize)
            t->finalize(o);
        free(o->id);
        free(o);
        return -1;
    }
    o->props = json_deep_copy(props);
    json_object_del(o->props, "qom-type");
    json_object_del(o->props, "id");
    o->next = objects;
    objects = o;
    return 0;
}

static void object_unlink_free(struct object *o)
{
    for (struct object **p = &objects; *p; p = &(*p)->next)
        if (*p == o) {
            *p = o->next;
            break;
        }
    if (o->type->finalize)
        o->type->finalize(o);
    json_decref(o->props);
    free(o->id);
    free(o);
}

int object_del(const char *id, error **errp)
{
    struct object *o = object_find(id);
    if (!o) {
        error_setg(errp, "object '%s' not found", id);
        return -1;
    }
    bool pinned = __atomic_load_n(&o->refcnt, __ATOMIC_ACQUIRE) > 0;
    if (pinned || (o->type->can_delete && !o->type->can_delete(o))) {
        error_setg(errp, "object '%s' is in use, can not be deleted", id);
        return -1;
    }
    object_unlink_free(o);
    return 0;
}

void objects_delete_all(void)
{
    /* One still pinned stays: a thread that outlives the shutdown uses it
     * (an nbd node's reconnection attempt, bounded, holds its TLS
     * credentials); the process ends anyway. */
    for (struct object **p = &objects; *p;) {
        if (__atomic_load_n(&(*p)->refcnt, __ATOMIC_ACQUIRE) > 0)
            p = &(*p)->next;
        else
            object_unlink_free(*p);
    }
}

static json_t *qmp_object_add(json_t *args, error **errp)
{
    return object_add(args, errp) < 0 ? NULL : json_object();
}
QMP_COMMAND("object-add", qmp_object_add)

static json_t *qmp_object_del(json_t *args, error **errp)
{
    return object_del(opt_str(args, "id", ""), errp) < 0 ? NULL : json_object();
}
QMP_COMMAND("object-del", qmp_object_del)

struct object *object_first(void) { return objects; }

/* ---- QOM: the "/objects" container ---- */

static void *objects_first(void) { return objects; }
static void *objects_next(void *o) { return ((struct object *)o)->next; }
static const char *objects_id(void *o) { return ((struct object *)o)->id; }

static const struct qom_class *objects_cls(void *o)
{
    return ((struct object *)o)->type->qom;
}

/* Read-only properties ("loaded") always read as their default. */
static json_t *objects_get(void *obj, const struct qom_prop *p)
{
    struct object *o = obj;
    json_t *v = o->type->get_prop && !p->dflt ? o->type->get_prop(o, p->name) : NULL;
    if (v)
        return v;
    v = p->schema ? json_object_get(o->props, p->name) : NULL;
    return v ? json_incref(v) : qom_prop_default(p);
}

static int objects_set(void *obj, const struct qom_prop *p, json_t *value, error **errp)
{
    struct object *o = obj;
    if (o->type->set_prop && o->type->set_prop(o, p->name, value, errp) < 0)
        return -1;
    json_object_set(o->props, p->name, value);
    return 0;
}

const struct qom_container object_container = {
    .name = "objects", .first = objects_first, .next = objects_next, .id = objects_id,
    .cls = objects_cls, .get = objects_get, .set = objects_set,
};

int objects_reload(const char *id, error **errp)
{
    int ret = 0;
    for (struct object *o = objects; o; o = o->next) {
        error *err = NULL;
        if (!o->type->reload || (id && strcmp(o->id, id)))
            continue;
        if (o->type->reload(o, &err) < 0) {
            log_error("%s '%s': reload failed, keeping the old credentials: %s",
                      o->type->name, o->id, err->msg);
            if (ret == 0)
                error_propagate(errp, err);
            else
                error_free(err);
            ret = -1;
        } else {
            log_info("%s '%s': reloaded", o->type->name, o->id);
        }
    }
    return ret;
}
