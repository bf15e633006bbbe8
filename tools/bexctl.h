/* bexctl internals shared between its files. */
#pragma once
#include <stdbool.h>
#include <jansson.h>

/* Run a QMP command on the connected monitor; its "return", or exit 1 with
 * "Class: message" on stderr. */
json_t *bexctl_execute(const char *cmd, json_t *args, json_int_t id);
/* Print ret as a table if cmd has one; false if not. */
bool bexctl_print_table(const char *cmd, json_t *ret);
/* `bexctl top`: iterations 0 = until 'q' (terminal) or interrupted. */
int bexctl_top(int iterations);
