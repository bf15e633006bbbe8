/*
 * A JSON reader that behaves like QEMU's (qobject/json-lexer.c,
 * json-streamer.c, json-parser.c), so that a QMP client sees the same
 * answers from bexd as from qemu-storage-daemon:
 *   - single-quoted strings are accepted as well as double-quoted ones;
 *   - a stream of bytes is split into top-level values by counting braces
 *     and brackets over tokens, each value is parsed when they balance;
 *   - a lexical error yields "JSON parse error, stray '...'" and the lexer
 *     skips to the next structural or control character (resynchronising);
 *   - the same limits: 64 MiB of tokens, 2 Mi tokens, nesting depth 1024.
 * Memory held for one value is bounded by those limits.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <jansson.h>
#include "util/error.h"

#define JSON_MAX_TOKEN_SIZE  (64u << 20)
#define JSON_MAX_TOKEN_COUNT (2u << 20)
#define JSON_MAX_NESTING     1024

/* Called once per top-level value: value (stolen) or err (stolen). */
typedef void json_stream_fn(void *opaque, json_t *value, error *err);

struct json_stream;
struct json_stream *json_stream_new(json_stream_fn *fn, void *opaque);
void json_stream_free(struct json_stream *js);
/* Feed bytes; fn may run several times.  fn must not free js.  Returns the
 * number of bytes taken: all of them, unless fn called json_stream_stop(),
 * in which case feeding stops right after the value that fn received. */
size_t json_stream_feed(struct json_stream *js, const char *buf, size_t len);
/* From fn: take no more bytes in the current json_stream_feed(). */
void json_stream_stop(struct json_stream *js);
/* End of input: flush a pending token/value. */
void json_stream_flush(struct json_stream *js);

/* Parse exactly one value from a string, as QEMU's qobject_from_json():
 * "JSON parse error, ..." or "Expecting at most one JSON value". */
json_t *json_parse_one(const char *s, error **errp);
