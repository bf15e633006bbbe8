/*
 * Reading validated option objects (blockdev-add, object-add, export and
 * socket-address options): the schema checker has already checked every
 * member's type, so a getter only needs the default for an absent member.
 */
#pragma once
#include <stdbool.h>
#include <jansson.h>

static inline const char *opt_str(json_t *opts, const char *key, const char *dflt)
{
    json_t *v = json_object_get(opts, key);
    return json_is_string(v) ? json_string_value(v) : dflt;
}

static inline bool opt_bool(json_t *opts, const char *key, bool dflt)
{
    json_t *v = json_object_get(opts, key);
    return json_is_boolean(v) ? json_is_true(v) : dflt;
}

static inline long long opt_int(json_t *opts, const char *key, long long dflt)
{
    json_t *v = json_object_get(opts, key);
    return json_is_integer(v) ? json_integer_value(v) : dflt;
}

static inline bool opt_has(json_t *opts, const char *key)
{
    return json_object_get(opts, key) != NULL;
}
