/*
 * The "secret" object (QEMU's crypto/secret.c): a named piece of sensitive
 * data given inline (data=) or read from a file (file=), raw or base64,
 * optionally AES-256-CBC encrypted with another secret (keyid= + iv=).
 * Users (the rbd driver's key-secret=, TLS PSK...) look it up by id.
 */
#pragma once
#include <stddef.h>
#include <stdint.h>
#include "util/error.h"

/* The decoded secret bytes (NUL-terminated copy, caller frees); *len
 * excludes the terminator.  Errors as QEMU: "No secret with id 'X'",
 * "Object with id 'X' is not a secret".  Returns 0 or -1. */
int secret_lookup(const char *id, uint8_t **data, size_t *len, error **errp);

/* The secret as a NUL-terminated UTF-8 string (caller frees), or NULL. */
char *secret_lookup_as_utf8(const char *id, error **errp);

/* The secret's bytes base64-encoded (caller frees), or NULL: the form
 * librados wants for its "key" option. */
char *secret_lookup_as_base64(const char *id, error **errp);

/* Base64 helpers shared with the lookup (QEMU/glib semantics: decoding
 * accepts only the alphabet, '=' and '\n', and skips newlines).  Both
 * return a malloc'ed NUL-terminated buffer, decode NULL on error. */
char *secret_base64_encode(const uint8_t *data, size_t len);
uint8_t *secret_base64_decode(const char *in, size_t in_len, size_t *out_len, error **errp);
