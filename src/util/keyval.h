/*
 * QEMU's keyval syntax: "key=val,a.b=c,list.0=x" with ",," as an escaped
 * comma.  An implied key names the first member when its "key=" is omitted
 * (e.g. "socket,path=x" for --chardev with implied key "backend").
 * The result is a JSON object whose leaves are all strings; dotted keys make
 * nested objects.  Objects whose keys are all list indexes ("0","1",..) are
 * turned into arrays, as QEMU's keyval_parse does (the schema checker also
 * accepts such objects where a list is expected).
 */
#pragma once
#include <jansson.h>
#include "util/error.h"

json_t *keyval_parse(const char *params, const char *implied_key, error **errp);
/* --object/--blockdev etc. accept JSON when the argument starts with '{'. */
json_t *keyval_or_json_parse(const char *arg, const char *implied_key,
                             bool *is_json, error **errp);
/* The other way, QEMU's qdict_flatten: a new object where nested objects
 * and lists have become dotted keys ("a.b", "a.0"); empty ones stay as
 * values, as in QEMU; leaves are shared with obj. */
json_t *keyval_flatten(json_t *obj);
/* A copy of obj (members in insertion order) whose members come in the
 * order QEMU iterates a QDict built by inserting them so (its hash
 * buckets); nested objects too.  Where QEMU checks options by walking a
 * QDict, the first error it reports is the first in this order. */
json_t *qdict_ordered(json_t *obj);
