/*
 * QAPI schema interpreter: definitions, checking, introspection.
 *
 * Theory of operation: schema_init() reads every registered source (QAPI
 * syntax, which QEMU's JSON reader accepts as is) into a table of
 * definitions keyed by name.  Checking walks a value against a type the way
 * QEMU's QObject input visitor does, so errors come out in the same order
 * and with the same words: members are visited in schema order (base
 * first, then the union branch chosen by the discriminator), a missing
 * required member fails at once, and members nobody visited are reported
 * at the end of the object.  Keyval mode (the command line) differs only
 * at the leaves: scalars arrive as strings and are converted per type.
 * The checked value is a fresh object holding only schema members.
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "config.h"
#include "qmp/schema-int.h"
#include "qmp/schema.h"
#include "util/cleanup.h"
#include "util/json-stream.h"
#include "util/log.h"
#include "util/xalloc.h"

/* meson's conf.set(X, true) emits an empty "#define X": test it with #ifdef */
#ifdef CONFIG_FUSE
#define SCHEMA_HAVE_FUSE true
#else
#define SCHEMA_HAVE_FUSE false
#endif

static struct schema_source *sources;
static json_t *defs;        /* name -> definition */
static json_t *order;       /* definitions in source order */

void schema_source_register(struct schema_source *src)
{
    struct schema_source **p = &sources;
    while (*p)
        p = &(*p)->next;
    *p = src;
}

/* ------------------------------------------------------------------ */
/* Conditions ('if') */

static bool cond_true(json_t *cond)
{
    static const struct { const char *name; bool on; } conds[] = {
        { "CONFIG_LINUX", true }, { "CONFIG_POSIX", true },
        { "HAVE_IPPROTO_MPTCP", true },
        { "CONFIG_VHOST_USER_BLK_SERVER", true },
        { "CONFIG_FUSE", SCHEMA_HAVE_FUSE }, { "CONFIG_VDUSE_BLK_EXPORT", false },
        { "CONFIG_BLKIO", false }, { "CONFIG_REPLICATION", false },
    };
    if (!cond)
        return true;
    if (json_is_object(cond)) {
        json_t *l;
        size_t i;
        json_t *e;
        if ((l = json_object_get(cond, "all"))) {
            json_array_foreach(l, i, e) if (!cond_true(e)) return false;
            return true;
        }
        if ((l = json_object_get(cond, "any"))) {
            json_array_foreach(l, i, e) if (cond_true(e)) return true;
            return false;
        }
        if ((l = json_object_get(cond, "not")))
            return !cond_true(l);
        return true;
    }
    const char *s = json_string_value(cond);
    if (!s)
        return true;
    char name[64];
    if (sscanf(s, "defined(%63[A-Za-z0-9_])", name) != 1)
        snprintf(name, sizeof(name), "%s", s);
    for (size_t i = 0; i < ARRAY_SIZE(conds); i++)
        if (!strcmp(conds[i].name, name))
            return conds[i].on;
    return false;
}

static const char *meta_of(json_t *def)
{
    static const char *metas[] = { "struct", "union", "enum", "alternate",
                                   "command", "event" };
    for (size_t i = 0; i < ARRAY_SIZE(metas); i++)
        if (json_object_get(def, metas[i]))
            return metas[i];
    return NULL;
}

static void add_def(json_t *def)
{
    const char *meta = meta_of(def);
    if (!meta || !cond_true(json_object_get(def, "if"))) {
        return;
    }
    const char *name = json_string_value(json_object_get(def, meta));
    json_object_set_new(def, "meta", json_string(meta));
    json_object_set(defs, name, def);
    json_array_append(order, def);
}

static void source_cb(void *opaque, json_t *value, error *err)
{
    const char *src = opaque;
    if (err) {
        log_error("schema %s: %s", src, err->msg);
        error_free(err);
        return;
    }
    if (json_is_object(value) && !json_object_get(value, "include"))
        add_def(value);
    json_decref(value);
}

void schema_init(void)
{
    if (defs)
        return;
    defs = json_object();
    order = json_array();
    for (struct schema_source *s = sources; s; s = s->next) {
        struct json_stream *js = json_stream_new(source_cb, (void *)s->name);
        json_stream_feed(js, s->text, strlen(s->text));
        json_stream_flush(js);
        json_stream_free(js);
    }
}

static json_t *lookup(const char *name)
{
    if (!defs)
        schema_init();
    return json_object_get(defs, name);
}

/* ------------------------------------------------------------------ */
/* Checking */

struct ck {
    bool keyval;
    error **errp;
};

/* Member spec: 'type' | ['type'] | { 'type': ..., 'if': ... } */
static json_t *member_type(json_t *spec)
{
    return json_is_object(spec) ? json_object_get(spec, "type") : spec;
}

static bool member_enabled(json_t *spec)
{
    return !json_is_object(spec) || cond_true(json_object_get(spec, "if"));
}

static char *child_path(const char *path, const char *name)
{
    char *p;
    p = xasprintf("%s%s%s", path, *path ? "." : "", name);
    return p;
}

static char *elem_path(struct ck *c, const char *path, size_t i)
{
    char *p;
    p = xasprintf(c->keyval ? "%s.%zu" : "%s[%zu]", path, i);
    return p;
}

static json_t *check(struct ck *c, json_t *type, json_t *v,
                     const char *path, const char *name);

static void err_type(struct ck *c, const char *path, const char *what)
{
    error_setg(c->errp, "Invalid parameter type for '%s', expected: %s",
               *path ? path : "null", what);
}

/* Keyval scalar: returns the string or NULL with an error. */
static const char *kv_scalar(struct ck *c, json_t *v, const char *path)
{
    if (json_is_object(v) || json_is_array(v)) {
        error_setg(c->errp, "Parameters '%s.*' are unexpected", path);
        return NULL;
    }
    if (!json_is_string(v)) {
        err_type(c, path, "string");
        return NULL;
    }
    return json_string_value(v);
}

struct int_type {
    const char *name;
    bool is_signed;
    long long min;
    unsigned long long max;
    const char *cname;
};

static const struct int_type int_types[] = {
    { "int",    true, LLONG_MIN, LLONG_MAX, NULL },
    { "int64",  true, LLONG_MIN, LLONG_MAX, NULL },
    { "int8",   true, INT8_MIN, INT8_MAX, "int8_t" },
    { "int16",  true, INT16_MIN, INT16_MAX, "int16_t" },
    { "int32",  true, INT32_MIN, INT32_MAX, "int32_t" },
    { "uint8",  false, 0, UINT8_MAX, "uint8_t" },
    { "uint16", false, 0, UINT16_MAX, "uint16_t" },
    { "uint32", false, 0, UINT32_MAX, "uint32_t" },
    { "uint64", false, 0, ULLONG_MAX, NULL },
    { "size",   false, 0, ULLONG_MAX, NULL },
};

static const struct int_type *find_int_type(const char *t)
{
    for (size_t i = 0; i < ARRAY_SIZE(int_types); i++)
        if (!strcmp(int_types[i].name, t))
            return &int_types[i];
    return NULL;
}

/* QEMU's qemu_strtosz: digits, optional fraction, optional unit suffix. */
static int parse_size(const char *s, unsigned long long *out)
{
    static const char units[] = "BKMGTPE";
    char *end;
    const char *p = s;

    while (isspace((unsigned char)*p))
        p++;
    if (*p == '-' || !*p)
        return -EINVAL;
    errno = 0;
    unsigned long long val = strtoull(p, &end, 10);
    if (end == p || errno)
        return -EINVAL;
    double frac = 0;
    if (*end == '.') {
        char *fend;
        frac = strtod(end, &fend);
        if (fend == end + 1)
            return -EINVAL;
        end = fend;
    }
    unsigned long long mul = 1;
    if (*end) {
        const char *u = strchr(units, toupper((unsigned char)*end));
        if (!u || end[1])
            return -EINVAL;
        mul = 1ULL << (10 * (u - units));
    } else if (frac != 0) {
        return -EINVAL;
    }
    if (val > (ULLONG_MAX - (unsigned long long)(frac * mul)) / mul)
        return -ERANGE;
    *out = val * mul + (unsigned long long)(frac * mul);
    return 0;
}

static json_t *check_int(struct ck *c, const struct int_type *it, json_t *v,
                         const char *path, const char *name)
{
    long long sv = 0;
    unsigned long long uv = 0;
    const char *nm = name ? name : "null";

    if (c->keyval) {
        const char *s = kv_scalar(c, v, path);
        char *end;
        if (!s)
            return NULL;
        errno = 0;
        if (!strcmp(it->name, "size")) {
            if (parse_size(s, &uv) < 0) {
                error_setg(c->errp, "Parameter '%s' expects size", path);
                return NULL;
            }
        } else if (it->is_signed) {
            sv = strtoll(s, &end, 0);
            if (!*s || *end || errno) {
                error_setg(c->errp, "Parameter '%s' expects integer", path);
                return NULL;
            }
        } else {
            /* like qemu_strtou64: a negative number wraps around */
            uv = strtoull(s, &end, 0);
            if (!*s || *end || errno) {
                error_setg(c->errp, "Parameter '%s' expects integer", path);
                return NULL;
            }
        }
    } else if (it->is_signed) {
        if (!json_is_integer(v)) {
            err_type(c, path, "integer");
            return NULL;
        }
        sv = json_integer_value(v);
    } else {
        if (!json_is_integer(v)) {
            error_setg(c->errp, "Parameter '%s' expects uint64", path);
            return NULL;
        }
        uv = (unsigned long long)json_integer_value(v);  /* QEMU wraps negatives */
    }
    if (it->is_signed) {
        if (sv < it->min || sv > (long long)it->max) {
            error_setg(c->errp, "Parameter '%s' expects %s", nm, it->cname);
            return NULL;
        }
        return json_integer(sv);
    }
    if (uv > it->max) {
        error_setg(c->errp, "Parameter '%s' expects %s", nm, it->cname);
        return NULL;
    }
    if (!c->keyval)
        return json_incref(v);
    return json_integer((json_int_t)uv);
}

static json_t *check_builtin(struct ck *c, const char *t, json_t *v,
                             const char *path, const char *name, bool *found)
{
    const struct int_type *it = find_int_type(t);
    *found = true;
    if (it)
        return check_int(c, it, v, path, name);
    if (!strcmp(t, "str")) {
        if (c->keyval) {
            const char *s = kv_scalar(c, v, path);
            return s ? json_string(s) : NULL;
        }
        if (!json_is_string(v)) {
            err_type(c, path, "string");
            return NULL;
        }
        return json_incref(v);
    }
    if (!strcmp(t, "bool")) {
        if (c->keyval) {
            const char *s = kv_scalar(c, v, path);
            if (!s)
                return NULL;
            if (!strcmp(s, "on") || !strcmp(s, "yes") || !strcmp(s, "true") || !strcmp(s, "y"))
                return json_true();
            if (!strcmp(s, "off") || !strcmp(s, "no") || !strcmp(s, "false") || !strcmp(s, "n"))
                return json_false();
            error_setg(c->errp, "Parameter '%s' expects 'on' or 'off'", name ? name : "null");
            return NULL;
        }
        if (!json_is_boolean(v)) {
            err_type(c, path, "boolean");
            return NULL;
        }
        return json_incref(v);
    }
    if (!strcmp(t, "number")) {
        if (c->keyval) {
            const char *s = kv_scalar(c, v, path);
            char *end;
            if (!s)
                return NULL;
            errno = 0;
            double d = strtod(s, &end);
            if (!*s || *end || errno || !isfinite(d)) {
                error_setg(c->errp, "Parameter '%s' expects number", path);
                return NULL;
            }
            return json_real(d);
        }
        if (!json_is_number(v)) {
            err_type(c, path, "number");
            return NULL;
        }
        return json_incref(v);
    }
    if (!strcmp(t, "null")) {
        if (c->keyval ? !(json_is_string(v) && !*json_string_value(v)) : !json_is_null(v)) {
            err_type(c, path, "null");
            return NULL;
        }
        return json_null();
    }
    if (!strcmp(t, "any"))
        return json_deep_copy(v);
    *found = false;
    return NULL;
}

static json_t *check_enum(struct ck *c, json_t *def, json_t *v,
                          const char *path, const char *name)
{
    const char *s;
    if (c->keyval) {
        if (!(s = kv_scalar(c, v, path)))
            return NULL;
    } else {
        if (!json_is_string(v)) {
            err_type(c, path, "string");
            return NULL;
        }
        s = json_string_value(v);
    }
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(def, "data"), i, e) {
        if (json_is_object(e)) {
            if (!cond_true(json_object_get(e, "if")))
                continue;
            e = json_object_get(e, "name");
        }
        if (!strcmp(json_string_value(e), s))
            return json_string(s);
    }
    error_setg(c->errp, "Parameter '%s' does not accept value '%s'", name ? name : "null", s);
    return NULL;
}

static json_t *check_list(struct ck *c, json_t *elt, json_t *v, const char *path)
{
    json_t *arr = v;
    CLEANUP_JSON json_t *conv = NULL;

    if (c->keyval && json_is_object(v)) {
        /* numeric keys "0".."n-1" from keyval */
        conv = json_array();
        for (size_t i = 0; i < json_object_size(v); i++) {
            char k[24];
            snprintf(k, sizeof(k), "%zu", i);
            json_t *e = json_object_get(v, k);
            if (!e) {
                err_type(c, path, "array");
                return NULL;
            }
            json_array_append(conv, e);
        }
        arr = conv;
    }
    if (!json_is_array(arr)) {
        err_type(c, path, "array");
        return NULL;
    }
    json_t *out = json_array();
    size_t i;
    json_t *e;
    json_array_foreach(arr, i, e) {
        CLEANUP_FREE char *p = elem_path(c, path, i);
        json_t *ce = check(c, elt, e, p, NULL);
        if (!ce) {
            json_decref(out);
            return NULL;
        }
        json_array_append_new(out, ce);
    }
    return out;
}

/* Visit the members of a dict of member specs. */
static int check_members(struct ck *c, json_t *members, json_t *v, json_t *out,
                         const char *path)
{
    const char *key;
    json_t *spec;

    json_object_foreach(members, key, spec) {
        if (!member_enabled(spec))
            continue;
        bool optional = key[0] == '*';
        const char *mname = optional ? key + 1 : key;
        json_t *mv = json_object_get(v, mname);
        CLEANUP_FREE char *p = child_path(path, mname);
        if (!mv) {
            if (!optional) {
                error_setg(c->errp, "Parameter '%s' is missing", p);
                return -1;
            }
            continue;
        }
        json_t *cv = check(c, member_type(spec), mv, p, mname);
        if (!cv)
            return -1;
        json_object_set_new(out, mname, cv);
    }
    return 0;
}

static int check_struct_members(struct ck *c, json_t *def, json_t *v, json_t *out,
                                const char *path);

/* base: a struct name or an inline dict of members */
static int check_base(struct ck *c, json_t *base, json_t *v, json_t *out, const char *path)
{
    if (!base)
        return 0;
    if (json_is_object(base))
        return check_members(c, base, v, out, path);
    json_t *bdef = lookup(json_string_value(base));
    return bdef ? check_struct_members(c, bdef, v, out, path) : 0;
}

/* Members of a struct or union (everything but the final unexpected check). */
static int check_struct_members(struct ck *c, json_t *def, json_t *v, json_t *out,
                                const char *path)
{
    if (check_base(c, json_object_get(def, "base"), v, out, path) < 0)
        return -1;
    const char *meta = json_string_value(json_object_get(def, "meta"));
    if (!meta || strcmp(meta, "union")) {
        json_t *data = json_object_get(def, "data");
        return json_is_object(data) ? check_members(c, data, v, out, path) : 0;
    }
    const char *disc = json_string_value(json_object_get(def, "discriminator"));
    const char *tag = json_string_value(json_object_get(out, disc));
    json_t *branch = tag ? json_object_get(json_object_get(def, "data"), tag) : NULL;
    if (!branch || !member_enabled(branch))
        return 0;
    json_t *bdef = lookup(json_string_value(member_type(branch)));
    return bdef ? check_struct_members(c, bdef, v, out, path) : 0;
}

static int check_unexpected(struct ck *c, json_t *v, json_t *out, const char *path)
{
    const char *key;
    json_t *val;
    json_object_foreach(v, key, val) {
        if (!json_object_get(out, key)) {
            CLEANUP_FREE char *p = child_path(path, key);
            error_setg(c->errp, "Parameter '%s' is unexpected", p);
            return -1;
        }
    }
    return 0;
}

/* A struct/union given as a definition, or inline members (anonymous). */
static json_t *check_object(struct ck *c, json_t *def, json_t *inline_members,
                            json_t *v, const char *path)
{
    if (!json_is_object(v)) {
        err_type(c, path, "object");
        return NULL;
    }
    json_t *out = json_object();
    int r = def ? check_struct_members(c, def, v, out, path)
                : check_members(c, inline_members, v, out, path);
    if (r < 0 || check_unexpected(c, v, out, path) < 0) {
        json_decref(out);
        return NULL;
    }
    return out;
}

static bool type_is_object(json_t *t)
{
    if (!json_is_string(t))
        return false;
    json_t *d = lookup(json_string_value(t));
    const char *m = d ? json_string_value(json_object_get(d, "meta")) : NULL;
    return m && (!strcmp(m, "struct") || !strcmp(m, "union"));
}

static bool type_accepts_string(json_t *t)
{
    if (!json_is_string(t))
        return false;
    const char *n = json_string_value(t);
    if (!strcmp(n, "str"))
        return true;
    json_t *d = lookup(n);
    return d && !strcmp(json_string_value(json_object_get(d, "meta")), "enum");
}

static json_t *check_alternate(struct ck *c, json_t *def, json_t *v,
                               const char *path, const char *name)
{
    const char *key;
    json_t *spec;
    json_t *pick = NULL;

    json_object_foreach(json_object_get(def, "data"), key, spec) {
        json_t *t = member_type(spec);
        const char *tn = json_string_value(t);
        if (json_is_object(v) ? type_is_object(t) ||
                                (c->keyval && json_is_array(t) && json_object_get(v, "0"))
            : json_is_array(v) ? json_is_array(t)
            : json_is_string(v) ? type_accepts_string(t) || (c->keyval && tn && !type_is_object(t))
            : json_is_integer(v) ? tn && (find_int_type(tn) || !strcmp(tn, "number"))
            : json_is_real(v) ? tn && !strcmp(tn, "number")
            : json_is_boolean(v) ? tn && !strcmp(tn, "bool")
            : json_is_null(v) ? tn && !strcmp(tn, "null") : false) {
            pick = t;
            if (!json_is_string(v) || type_accepts_string(t))
                break;
        }
    }
    if (!pick) {
        /* QEMU names the member alone here, not its path */
        err_type(c, name ? name : "null", json_string_value(json_object_get(def, "alternate")));
        return NULL;
    }
    return check(c, pick, v, path, name);
}

static json_t *check(struct ck *c, json_t *type, json_t *v,
                     const char *path, const char *name)
{
    if (json_is_array(type))
        return check_list(c, json_array_get(type, 0), v, path);
    if (json_is_object(type))
        return check_object(c, NULL, type, v, path);
    const char *t = json_string_value(type);
    bool found;
    json_t *r = check_builtin(c, t, v, path, name, &found);
    if (found)
        return r;
    json_t *def = lookup(t);
    if (!def) {
        error_setg(c->errp, "Internal error: unknown type '%s'", t);
        return NULL;
    }
    const char *meta = json_string_value(json_object_get(def, "meta"));
    if (!strcmp(meta, "enum"))
        return check_enum(c, def, v, path, name);
    if (!strcmp(meta, "alternate"))
        return check_alternate(c, def, v, path, name);
    return check_object(c, def, NULL, v, path);
}

json_t *schema_check_type(const char *type, json_t *value, bool keyval,
                          const char *prefix, error **errp)
{
    struct ck c = { .keyval = keyval, .errp = errp };
    size_t len = strlen(type);
    /* "[T]" names a list of T, as in the schema's own member types */
    CLEANUP_JSON json_t *t = len > 2 && type[0] == '[' && type[len - 1] == ']'
                             ? json_pack("[s#]", type + 1, len - 2) : json_string(type);
    const char *nm = prefix && *prefix ? strrchr(prefix, '.') : NULL;
    nm = nm ? nm + 1 : (prefix && *prefix ? prefix : NULL);
    return check(&c, t, value, prefix ? prefix : "", nm);
}

static json_t *command_def(const char *command)
{
    json_t *d = lookup(command);
    if (!d || strcmp(json_string_value(json_object_get(d, "meta")), "command"))
        return NULL;
    return d;
}

bool schema_command_exists(const char *command)
{
    return command_def(command) != NULL;
}

json_t *schema_check_command(const char *command, json_t *args, error **errp)
{
    struct ck c = { .keyval = false, .errp = errp };
    json_t *def = command_def(command);
    CLEANUP_JSON json_t *empty = json_object();
    if (!def) {
        error_set(errp, ERR_COMMAND_NOT_FOUND, "The command %s has not been found", command);
        return NULL;
    }
    if (!args)
        args = empty;
    json_t *data = json_object_get(def, "data");
    if (!data)
        return check_object(&c, NULL, empty, args, "");
    if (json_is_object(data))
        return check_object(&c, NULL, data, args, "");
    json_t *tdef = lookup(json_string_value(data));
    if (!tdef) {
        error_setg(errp, "Internal error: unknown type '%s'", json_string_value(data));
        return NULL;
    }
    return check_object(&c, tdef, NULL, args, "");
}

static void members_into(json_t *members, json_t *out)
{
    const char *key;
    json_t *spec;
    json_object_foreach(members, key, spec) {
        if (!member_enabled(spec))
            continue;
        json_t *t = member_type(spec);
        char *tn;
        if (json_is_array(t)) {
            tn = xasprintf("[%s]", json_string_value(json_array_get(t, 0)));
        } else {
            tn = xstrdup(json_is_string(t) ? json_string_value(t) : "object");
        }
        json_object_set_new(out, key[0] == '*' ? key + 1 : key, json_string(tn));
        free(tn);
    }
}

static void struct_members_into(json_t *def, const char *tag, json_t *out)
{
    json_t *base = json_object_get(def, "base");
    if (json_is_object(base))
        members_into(base, out);
    else if (json_is_string(base) && lookup(json_string_value(base)))
        struct_members_into(lookup(json_string_value(base)), NULL, out);
    json_t *data = json_object_get(def, "data");
    if (strcmp(json_string_value(json_object_get(def, "meta")), "union")) {
        if (json_is_object(data))
            members_into(data, out);
        return;
    }
    json_t *branch = tag ? json_object_get(data, tag) : NULL;
    if (branch && member_enabled(branch) && lookup(json_string_value(member_type(branch))))
        struct_members_into(lookup(json_string_value(member_type(branch))), NULL, out);
}

json_t *schema_members(const char *type, const char *tag)
{
    json_t *def = lookup(type);
    const char *meta = def ? json_string_value(json_object_get(def, "meta")) : NULL;
    if (!meta || (strcmp(meta, "struct") && strcmp(meta, "union")))
        return NULL;
    json_t *out = json_object();
    struct_members_into(def, tag, out);
    return out;
}

/* ------------------------------------------------------------------ */
/* Introspection (query-qmp-schema): SchemaInfo, with real type names. */

static json_t *intro_seen;      /* type names already described */
static json_t *intro_out;

static const char *builtin_json_type(const char *t)
{
    if (find_int_type(t)) return "int";
    if (!strcmp(t, "str")) return "string";
    if (!strcmp(t, "bool")) return "boolean";
    if (!strcmp(t, "number")) return "number";
    if (!strcmp(t, "null")) return "null";
    if (!strcmp(t, "any")) return "value";
    return NULL;
}

static char *intro_type(json_t *t, const char *implicit_name);

static void intro_add(json_t *info)
{
    json_array_append_new(intro_out, info);
}

static json_t *features_of(json_t *def)
{
    json_t *f = json_object_get(def, "features");
    if (!json_is_array(f) || !json_array_size(f))
        return NULL;
    json_t *out = json_array();
    size_t i;
    json_t *e;
    json_array_foreach(f, i, e)
        json_array_append_new(out, json_string(json_is_object(e)
            ? json_string_value(json_object_get(e, "name")) : json_string_value(e)));
    return out;
}

static void intro_members(json_t *members, json_t *out)
{
    const char *key;
    json_t *spec;
    json_object_foreach(members, key, spec) {
        if (!member_enabled(spec))
            continue;
        bool opt = key[0] == '*';
        CLEANUP_FREE char *tn = intro_type(member_type(spec), NULL);
        json_t *m = json_pack("{s:s, s:s}", "name", opt ? key + 1 : key, "type", tn);
        if (opt)
            json_object_set_new(m, "default", json_null());
        json_t *f = json_is_object(spec) ? features_of(spec) : NULL;
        if (f)
            json_object_set_new(m, "features", f);
        json_array_append_new(out, m);
    }
}

static void intro_struct_members(json_t *def, json_t *out)
{
    json_t *base = json_object_get(def, "base");
    if (json_is_object(base))
        intro_members(base, out);
    else if (json_is_string(base))
        intro_struct_members(lookup(json_string_value(base)), out);
    if (strcmp(json_string_value(json_object_get(def, "meta")), "union") &&
        json_is_object(json_object_get(def, "data")))
        intro_members(json_object_get(def, "data"), out);
}

static void intro_def(const char *name, json_t *def)
{
    const char *meta = json_string_value(json_object_get(def, "meta"));
    json_t *info = json_pack("{s:s}", "name", name);
    json_t *f = features_of(def);

    if (!strcmp(meta, "enum")) {
        json_t *vals = json_array(), *mem = json_array();
        size_t i;
        json_t *e;
        json_array_foreach(json_object_get(def, "data"), i, e) {
            if (json_is_object(e)) {
                if (!cond_true(json_object_get(e, "if")))
                    continue;
                e = json_object_get(e, "name");
            }
            json_array_append(vals, e);
            json_array_append_new(mem, json_pack("{s:O}", "name", e));
        }
        json_object_set_new(info, "meta-type", json_string("enum"));
        json_object_set_new(info, "members", mem);
        json_object_set_new(info, "values", vals);
    } else if (!strcmp(meta, "alternate")) {
        json_t *mem = json_array();
        const char *key;
        json_t *spec;
        json_object_set_new(info, "meta-type", json_string("alternate"));
        json_object_foreach(json_object_get(def, "data"), key, spec) {
            CLEANUP_FREE char *tn = intro_type(member_type(spec), NULL);
            json_array_append_new(mem, json_pack("{s:s}", "type", tn));
        }
        json_object_set_new(info, "members", mem);
    } else {
        json_t *mem = json_array();
        json_object_set_new(info, "meta-type", json_string("object"));
        intro_struct_members(def, mem);
        json_object_set_new(info, "members", mem);
        if (!strcmp(meta, "union")) {
            json_t *vars = json_array();
            const char *key;
            json_t *spec;
            json_object_set(info, "tag", json_object_get(def, "discriminator"));
            json_object_foreach(json_object_get(def, "data"), key, spec) {
                if (!member_enabled(spec))
                    continue;
                CLEANUP_FREE char *tn = intro_type(member_type(spec), NULL);
                json_array_append_new(vars, json_pack("{s:s, s:s}", "case", key, "type", tn));
            }
            json_object_set_new(info, "variants", vars);
        }
    }
    if (f)
        json_object_set_new(info, "features", f);
    intro_add(info);
}

/* Describe a type (once) and return its name for references. */
static char *intro_type(json_t *t, const char *implicit_name)
{
    /* QEMU's introspection folds every integer type into "int" */
    if (json_is_string(t) && find_int_type(json_string_value(t)) &&
        strcmp(json_string_value(t), "int")) {
        CLEANUP_JSON json_t *i = json_string("int");
        return intro_type(i, implicit_name);
    }
    if (json_is_array(t)) {
        CLEANUP_FREE char *en = intro_type(json_array_get(t, 0), NULL);
        char *an;
        an = xasprintf("[%s]", en);
        if (!json_object_get(intro_seen, an)) {
            json_object_set_new(intro_seen, an, json_true());
            intro_add(json_pack("{s:s, s:s, s:s}", "name", an, "meta-type", "array",
                                "element-type", en));
        }
        return an;
    }
    if (json_is_object(t)) {
        const char *n = implicit_name ? implicit_name : "q_obj_anon";
        if (!json_object_get(intro_seen, n)) {
            json_object_set_new(intro_seen, n, json_true());
            json_t *mem = json_array();
            intro_members(t, mem);
            intro_add(json_pack("{s:s, s:s, s:o}", "name", n, "meta-type", "object",
                                "members", mem));
        }
        return xstrdup(n);
    }
    const char *n = json_string_value(t);
    if (!json_object_get(intro_seen, n)) {
        json_object_set_new(intro_seen, n, json_true());
        const char *jt = builtin_json_type(n);
        if (jt) {
            intro_add(json_pack("{s:s, s:s, s:s}", "name", n, "meta-type", "builtin",
                                "json-type", jt));
        } else if (lookup(n)) {
            intro_def(n, lookup(n));
        }
    }
    return xstrdup(n);
}

static json_t *intro_entity(json_t *def, const char *meta)
{
    const char *name = json_string_value(json_object_get(def, meta));
    json_t *info = json_pack("{s:s, s:s}", "name", name, "meta-type", meta);
    json_t *data = json_object_get(def, "data");
    char *an = NULL;

    an = xasprintf("q_obj_%s-arg", name);
    CLEANUP_JSON json_t *empty = json_object();
    CLEANUP_FREE char *arg = intro_type(data ? data : empty, data ? an : "q_empty");
    free(an);
    json_object_set_new(info, "arg-type", json_string(arg));
    if (!strcmp(meta, "command")) {
        json_t *ret = json_object_get(def, "returns");
        CLEANUP_FREE char *rt = intro_type(ret ? ret : empty, ret ? NULL : "q_empty");
        json_object_set_new(info, "ret-type", json_string(rt));
    }
    json_t *f = features_of(def);
    if (f)
        json_object_set_new(info, "features", f);
    return info;
}

/* QEMU hides the names of types (not of builtins, commands and events)
 * behind numbers; "0" is the empty object. */
static const char *masked(json_t *map, const char *name)
{
    char buf[32];
    if (builtin_json_type(name))
        return name;
    if (name[0] == '[') {
        char inner[256];
        snprintf(inner, sizeof(inner), "%.*s", (int)strlen(name) - 2, name + 1);
        const char *mi = masked(map, inner);
        json_t *v = json_object_get(map, name);
        if (!v) {
            char *an;
            an = xasprintf("[%s]", mi);
            json_object_set_new(map, name, json_string(an));
            free(an);
            v = json_object_get(map, name);
        }
        return json_string_value(v);
    }
    json_t *v = json_object_get(map, name);
    if (!v) {
        snprintf(buf, sizeof(buf), "%zu", strcmp(name, "q_empty") ? json_object_size(map) + 1 : 0);
        json_object_set_new(map, name, json_string(buf));
        v = json_object_get(map, name);
    }
    return json_string_value(v);
}

static void mask_key(json_t *map, json_t *obj, const char *key)
{
    const char *n = json_string_value(json_object_get(obj, key));
    if (n)
        json_object_set_new(obj, key, json_string(masked(map, n)));
}

static void mask_names(json_t *entities)
{
    CLEANUP_JSON json_t *map = json_object();
    size_t i, j;
    json_t *e, *m;

    json_object_set_new(map, "q_empty", json_string("0"));
    json_array_foreach(entities, i, e) {
        const char *meta = json_string_value(json_object_get(e, "meta-type"));
        if (strcmp(meta, "command") && strcmp(meta, "event"))
            mask_key(map, e, "name");
        mask_key(map, e, "arg-type");
        mask_key(map, e, "ret-type");
        mask_key(map, e, "element-type");
        json_array_foreach(json_object_get(e, "members"), j, m)
            mask_key(map, m, "type");
        json_array_foreach(json_object_get(e, "variants"), j, m)
            mask_key(map, m, "type");
    }
}

json_t *schema_introspect(void)
{
    size_t i;
    json_t *def;
    json_t *entities = json_array();

    intro_seen = json_object();
    intro_out = json_array();
    json_array_foreach(order, i, def) {
        const char *meta = json_string_value(json_object_get(def, "meta"));
        if (!strcmp(meta, "command") || !strcmp(meta, "event"))
            json_array_append_new(entities, intro_entity(def, meta));
    }
    json_array_extend(entities, intro_out);
    mask_names(entities);
    json_decref(intro_out);
    json_decref(intro_seen);
    intro_out = intro_seen = NULL;
    return entities;
}
