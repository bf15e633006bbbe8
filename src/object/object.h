/*
 * User-creatable objects (--object / object-add / object-del): iothread,
 * tls-creds-*, authz-*, secret.  Each type registers a validator-checked
 * property set in the QMP schema (ObjectOptions branch) and these hooks.
 */
#pragma once
#include <stdbool.h>
#include <jansson.h>
#include "util/error.h"

struct object;
struct qom_class;

struct object_type {
    const char *name;                 /* qom-type, e.g. "iothread" */
    size_t instance_size;             /* >= sizeof(struct object) */
    const struct qom_class *qom;      /* its QOM class (object/qom.h) */
    /* qom-set of a writable property, the value checked against its QAPI
     * type: apply it to the live object, or refuse with errp.  NULL: the
     * value is only recorded (qom-get reports it), as QEMU does for
     * properties it reads once at creation. */
    int  (*set_prop)(struct object *obj, const char *name, json_t *value, error **errp);
    /* qom-get of a property the object computes (its class gives it no
     * default): a new reference, or NULL for what was last set.  NULL: none. */
    json_t *(*get_prop)(struct object *obj, const char *name);
    /* props: the validated object-add arguments (qom-type and id included). */
    int  (*complete)(struct object *obj, json_t *props, error **errp);
    /* false: object-del refuses ("in use") even when nothing pins the
     * object (the main-loop object); pins are refcnt's.  NULL = true. */
    bool (*can_delete)(struct object *obj);
    void (*finalize)(struct object *obj);
    /* Reread the object's files (SIGHUP, __org.bexd_reload-tls-creds); on
     * failure the object keeps what it had.  NULL: nothing to reload. */
    int  (*reload)(struct object *obj, error **errp);
};

struct object {
    char *id;
    const struct object_type *type;
    int refcnt;                       /* users that pin it: object_ref/unref only */
    json_t *props;                    /* its properties as last set (object-add, qom-set) */
    struct object *next;
};

void object_type_register(const struct object_type *t);
int  object_add(json_t *props, error **errp);
int  object_del(const char *id, error **errp);
struct object *object_find(const char *id);
/* Pin an object in use (object-del refuses it until unpinned), from any
 * thread. */
void object_ref(struct object *o);
void object_unref(struct object *o);
void objects_delete_all(void);
/* Reload object id (NULL: every object that can); each result is logged.
 * Returns -1 with errp set if one failed (the first failure). */
int  objects_reload(const char *id, error **errp);

#define OBJECT_TYPE_REGISTER(t) \
    __attribute__((constructor)) static void object_type_register_##t(void) { object_type_register(&t); }
/* Iterate every object (newest first) with ->next. */
struct object *object_first(void);
