/*
 * QOM as a management tool sees it: qom-list, qom-get, qom-set,
 * qom-list-types, qom-list-properties over QEMU's paths.
 *
 * A class (QEMU's type) has a parent, may be abstract, may implement the
 * user-creatable interface, and declares its own properties; an instance
 * has the properties of its class and of every ancestor, "type" first.
 * Classes register next to their code with QOM_CLASS_REGISTER.
 *
 * The tree is the one qemu-storage-daemon has: "/" holds the containers
 * "objects" (user-created objects) and "chardevs".  A container's children
 * come from the module that owns them through a struct qom_container, which
 * also reads and writes their properties.
 */
#pragma once
#include <stdbool.h>
#include <jansson.h>
#include "util/error.h"

struct qom_prop {
    const char *name;
    const char *type;        /* as QOM reports it: "int", "string", "bool", a QAPI type */
    const char *schema;      /* QAPI type a qom-set value must match; NULL: read-only */
    const char *dflt;        /* JSON text of the value nobody set; NULL: computed */
};

struct qom_class {
    const char *name;        /* "iothread", "authz-list-file" */
    const char *parent;      /* NULL for "object" and "interface" */
    bool abstract;
    bool user_creatable;     /* implements the "user-creatable" interface */
    const struct qom_prop *props;   /* its own, ending with { NULL } */
    struct qom_class *next;
};

void qom_class_register(struct qom_class *c);
const struct qom_class *qom_class_find(const char *name);
/* The property name of cls or an ancestor, or NULL. */
const struct qom_prop *qom_class_prop(const struct qom_class *cls, const char *name);

#define QOM_CLASS_REGISTER(c) \
    __attribute__((constructor)) static void qom_class_register_##c(void) { qom_class_register(&c); }

/* The children of one container and access to their properties. */
struct qom_container {
    const char *name;                               /* "objects", "chardevs" */
    void *(*first)(void);                           /* iterate: first, next */
    void *(*next)(void *child);
    const char *(*id)(void *child);
    const struct qom_class *(*cls)(void *child);
    /* Value of p (a property with dflt == NULL, or one never set). */
    json_t *(*get)(void *child, const struct qom_prop *p);
    /* Set writable p to value, already checked against p->schema. */
    int (*set)(void *child, const struct qom_prop *p, json_t *value, error **errp);
};

/* The value of p when it holds nothing else: its default. */
json_t *qom_prop_default(const struct qom_prop *p);
