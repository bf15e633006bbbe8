/*
 * QEMU's KEY=VALUE,... syntax (util/keyval.c semantics, own code).
 *
 * Theory of operation: the input is cut into KEY=VALUE items at single
 * commas (",," is a literal comma inside a value).  A key is a dotted path
 * of fragments; the first fragment is a QAPI name, later ones may be list
 * indexes.  Each item is stored into nested objects created on demand; a
 * path used both as a value and as a prefix is refused ("used
 * inconsistently"); a repeated key replaces the earlier value, as in QEMU.
 * The first item may omit "KEY=" when an implied key is given.  At the end
 * objects whose keys are all indexes become arrays ("listify"), which must
 * be dense from 0.
 */
#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "util/cleanup.h"
#include "util/json-stream.h"
#include "util/keyval.h"
#include "util/xalloc.h"

#define KEY_FRAGMENT_MAX 127

/* Length of a list index at s (digits), or -1. */
static int index_len(const char *s)
{
    int n = 0;
    while (isdigit((unsigned char)s[n]))
        n++;
    return n ? n : -1;
}

/* Length of a QAPI name at s, or 0. */
static int name_len(const char *s)
{
    int n = 0;
    if (s[0] == '_' && s[1] == '_') {
        /* QAPI downstream name: __RFQDN_name (QEMU's parse_qapi_name) */
        const char *u = strchr(s + 2, '_');
        if (!u || u[1] == '\0' || strcspn(s + 2, ",=") < (size_t)(u - s - 2))
            return 0;
        n = u + 1 - s;
    }
    if (!isalpha((unsigned char)s[n]))
        return 0;
    while (isalnum((unsigned char)s[n]) || s[n] == '-' || s[n] == '_')
        n++;
    return n;
}

static bool all_digits(const char *s)
{
    return *s && index_len(s) == (int)strlen(s);
}

/* Put value (NULL = need an object) at cur[key]; key_so_far names the path
 * for messages.  Returns the object or value stored, or NULL. */
static json_t *put(json_t *cur, const char *key, json_t *value,
                   const char *path, int path_len, error **errp)
{
    json_t *old = json_object_get(cur, key);
    if (old) {
        if (value ? !json_is_string(old) : !json_is_object(old)) {
            error_setg(errp, "Parameters '%.*s.*' used inconsistently", path_len, path);
            json_decref(value);
            return NULL;
        }
        if (!value)
            return old;
    }
    if (!value)
        value = json_object();
    json_object_set_new(cur, key, value);
    return value;
}

static bool is_help(const char *s, size_t len)
{
    return (len == 4 && !strncmp(s, "help", 4)) || (len == 1 && *s == '?');
}

/* Parse one item at params; returns the next item or NULL on error. */
static const char *parse_one(json_t *root, const char *params,
                             const char *implied_key, bool *help, error **errp)
{
    const char *key = params, *key_end, *s, *val = NULL;
    size_t len = strcspn(params, "=,");
    char frag[KEY_FRAGMENT_MAX + 1] = "";
    json_t *cur = root;

    if (len && key[len] != '=') {
        if (is_help(key, len)) {
            *help = true;
            s = key + len;
            return *s == ',' ? s + 1 : s;
        }
        if (implied_key) {
            key = implied_key;
            val = params;
            len = strlen(implied_key);
        }
    }
    key_end = key + len;

    for (s = key;;) {
        int n = s != key ? index_len(s) : -1;
        if (n < 0)
            n = name_len(s);
        if (n <= 0 || s + n > key_end || (s + n < key_end && s[n] != '.')) {
            error_setg(errp, "Invalid parameter '%.*s'", (int)(key_end - key), key);
            return NULL;
        }
        if (n > KEY_FRAGMENT_MAX) {
            error_setg(errp, "Parameter%s '%.*s' is too long",
                       s != key || s + n != key_end ? " fragment" : "", n, s);
            return NULL;
        }
        if (s != key) {
            cur = put(cur, frag, NULL, key, (int)(s - 1 - key), errp);
            if (!cur)
                return NULL;
        }
        memcpy(frag, s, n);
        frag[n] = 0;
        s += n;
        if (*s != '.')
            break;
        s++;
    }

    if (val) {
        s = val;
    } else {
        if (*s != '=') {
            error_setg(errp, "Expected '=' after parameter '%.*s'", (int)(s - key), key);
            return NULL;
        }
        s++;
    }

    size_t cap = strlen(s) + 1, n = 0;
    CLEANUP_FREE char *buf = xmalloc(cap);
    while (*s) {
        if (*s == ',') {
            s++;
            if (*s != ',')
                break;
        }
        buf[n++] = *s++;
    }
    if (!put(cur, frag, json_stringn(buf, n), key, (int)(key_end - key), errp))
        return NULL;
    return s;
}

/* Path prefix "a.b." for messages. */
static char *path_join(const char *prefix, const char *key)
{
    return xasprintf("%s%s.", prefix, key);
}

/* Turn objects whose keys are all indexes into arrays, recursively. */
static json_t *listify(json_t *cur, const char *prefix, error **errp)
{
    bool has_index = false, has_member = false;
    const char *k;
    json_t *v;
    void *tmp;

    json_object_foreach_safe(cur, tmp, k, v) {
        if (all_digits(k))
            has_index = true;
        else
            has_member = true;
        if (!json_is_object(v))
            continue;
        CLEANUP_FREE char *sub = path_join(prefix, k);
        json_t *nv = listify(v, sub ? sub : "", errp);
        if (!nv)
            return NULL;
        if (nv != v)
            json_object_set_new(cur, k, nv);
    }
    if (has_index && has_member) {
        error_setg(errp, "Parameters '%s*' used inconsistently", prefix);
        return NULL;
    }
    if (!has_index)
        return cur;

    size_t n = json_object_size(cur);
    json_t *arr = json_array();
    for (size_t i = 0; i < n; i++) {
        char idx[24];
        snprintf(idx, sizeof(idx), "%zu", i);
        v = json_object_get(cur, idx);
        if (!v) {
            error_setg(errp, "Parameter '%s%zu' missing", prefix, i);
            json_decref(arr);
            return NULL;
        }
        json_array_append(arr, v);
    }
    /* a key like "00" or beyond n leaves a hole before n: caught above */
    return arr;
}

json_t *keyval_parse(const char *params, const char *implied_key, error **errp)
{
    json_t *root = json_object();
    bool help = false;
    const char *s = params;

    while (*s) {
        s = parse_one(root, s, implied_key, &help, errp);
        if (!s) {
            json_decref(root);
            return NULL;
        }
        implied_key = NULL;
    }
    if (help) {
        error_setg(errp, "Help is not available for this option");
        json_decref(root);
        return NULL;
    }
    if (!listify(root, "", errp)) {
        json_decref(root);
        return NULL;
    }
    return root;
}

json_t *keyval_or_json_parse(const char *arg, const char *implied_key,
                             bool *is_json, error **errp)
{
    if (arg[0] == '{') {
        if (is_json)
            *is_json = true;
        json_t *v = json_parse_one(arg, errp);
        if (v && !json_is_object(v)) {
            json_decref(v);
            error_setg(errp, "Expecting a JSON object");
            return NULL;
        }
        return v;
    }
    if (is_json)
        *is_json = false;
    return keyval_parse(arg, implied_key, errp);
}

static void flatten_into(json_t *out, const char *prefix, json_t *v)
{
    if (json_is_object(v) && json_object_size(v)) {
        const char *k;
        json_t *x;
        json_object_foreach(v, k, x) {
            CLEANUP_FREE char *key = prefix ? xasprintf("%s.%s", prefix, k) : xstrdup(k);
            flatten_into(out, key, x);
        }
    } else if (json_is_array(v) && json_array_size(v)) {
        size_t i;
        json_t *x;
        json_array_foreach(v, i, x) {
            CLEANUP_FREE char *key = xasprintf("%s.%zu", prefix, i);
            flatten_into(out, key, x);
        }
    } else if (prefix) {
        json_object_set(out, prefix, v);
    }
}

json_t *keyval_flatten(json_t *obj)
{
    json_t *out = json_object();
    flatten_into(out, NULL, obj);
    return out;
}

/* ---- QEMU's QDict iteration order ---- */

#define QDICT_BUCKET_MAX 512

/* QEMU's qdict bucket of a key (tdb_hash modulo QDICT_BUCKET_MAX). */
static unsigned qdict_bucket(const char *key)
{
    unsigned value = 0x238F13AFu * (unsigned)strlen(key);
    for (unsigned i = 0; key[i]; i++)
        value += (unsigned)(unsigned char)key[i] << (i * 5 % 24);
    return (1103515243u * value + 12345u) % QDICT_BUCKET_MAX;
}

struct member { const char *key; json_t *value; unsigned bucket; size_t seq; };

static int by_qdict_order(const void *a, const void *b)
{
    const struct member *x = a, *y = b;
    if (x->bucket != y->bucket)
        return x->bucket < y->bucket ? -1 : 1;
    return x->seq > y->seq ? -1 : x->seq < y->seq;      /* a bucket lists the newest first */
}

json_t *qdict_ordered(json_t *obj)
{
    size_t n = json_object_size(obj), i = 0;
    struct member *m = xcalloc(n ? n : 1, sizeof(*m));
    const char *k;
    json_t *v;
    json_object_foreach(obj, k, v) {
        m[i] = (struct member){ k, v, qdict_bucket(k), i };
        i++;
    }
    qsort(m, n, sizeof(*m), by_qdict_order);
    json_t *out = json_object();
    for (i = 0; i < n; i++)
        json_object_set_new(out, m[i].key, json_is_object(m[i].value) ?
                            qdict_ordered(m[i].value) : json_incref(m[i].value));
    free(m);
    return out;
}
