/*
 * The QAPI schema bexd implements, written in QAPI syntax (single-quoted
 * JSON-like definitions: struct, union, enum, alternate, command, event)
 * and interpreted at run time.  One checker serves QMP (JSON input) and the
 * command line (keyval input: every scalar arrives as a string and is
 * converted per the schema type: bool on/off/yes/no/true/false, integers,
 * sizes with suffixes, lists from numeric keys).
 *
 * The checker reports errors with QEMU's messages, e.g.
 *   "Parameter 'addr.path' is missing"
 *   "Parameter 'foo' is unexpected"
 *   "Invalid parameter type for 'writable', expected: boolean"
 *   "Parameter 'mode' does not accept value 'x'"
 */
#pragma once
#include <stdbool.h>
#include <jansson.h>
#include "util/error.h"

void schema_init(void);
/* Check (and, for keyval input, convert) a value of a named type ("[T]"
 * for a list of T).  Returns a
 * new reference to the checked value, or NULL with *errp set.  prefix is the
 * member path used in messages ("" or e.g. "addr"). */
json_t *schema_check_type(const char *type, json_t *value, bool keyval,
                          const char *prefix, error **errp);
/* Check a command's arguments (args may be NULL = {}). */
json_t *schema_check_command(const char *command, json_t *args, error **errp);
bool schema_command_exists(const char *command);
/* Members of a struct, or of a flat union's base and branch for tag (NULL:
 * base only): an object member name -> type name ("[T]" for lists), in
 * schema order.  NULL if type is unknown. */
json_t *schema_members(const char *type, const char *tag);
/* query-qmp-schema result (SchemaInfo list, QEMU's introspection format). */
json_t *schema_introspect(void);
