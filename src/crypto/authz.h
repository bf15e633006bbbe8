/*
 * Authorization objects (authz-simple, authz-list, authz-listfile,
 * authz-pam): each answers "may this identity (an x509 distinguished name
 * or a PSK username) connect?".  Users hold only the id and look the
 * object up at the moment of each check, so an authz object can be
 * deleted and re-created while a server runs; a missing one denies.
 */
#pragma once
#include <stdbool.h>
#include "object/object.h"
#include "util/error.h"

struct authz;

struct authz_type {
    struct object_type base;          /* first */
    /* 1 allowed, 0 denied, -1 error (*errp set) */
    int (*is_allowed)(struct authz *a, const char *identity, error **errp);
};

struct authz {
    struct object obj;                /* first */
};

#define AUTHZ_TYPE_REGISTER(t) \
    __attribute__((constructor)) static void authz_type_register_##t(void) \
    { object_type_register(&(t).base); }

/* 1 allowed, 0 denied, -1 no such object / not an authz / check failed. */
int authz_is_allowed_by_id(const char *id, const char *identity, error **errp);

/* authz-list rules, shared by authz-list and authz-listfile */
struct authz_rule {
    char *match;
    bool allow;
    bool glob;
};
struct authz_rules {
    bool allow;                       /* default policy */
    size_t n;
    struct authz_rule *v;
};
/* From checked AuthZListProperties (policy, rules). */
int  authz_rules_parse(struct authz_rules *r, json_t *props, error **errp);
bool authz_rules_allow(const struct authz_rules *r, const char *identity);
void authz_rules_clear(struct authz_rules *r);
