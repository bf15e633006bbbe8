/*
 * QEMU's keyval syntax: "key=val,a.b=c,list.0=x" with ",," as an escaped
 * comma.  An implied key names the first member when its "key=" is omitted
 * (e.g. "socket,path=x" for --chardev with implied key "backend").
 * The result is a JSON object whose leaves are all strings; dotted keys make
 * nested objects.  Lists (numeric keys) stay as objects with keys "0","1",..
 * and are turned into arrays by the schema checker.
 */
#pragma once
#include <jansson.h>
#include "util/error.h"

json_t *keyval_parse(const char *params, const char *implied_key, error **errp);
/* --object/--blockdev etc. accept JSON when the argument starts with '{'. */
json_t *keyval_or_json_parse(const char *arg, const char *implied_key,
                             bool *is_json, error **errp);
