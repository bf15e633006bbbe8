/* QEMU-shaped JSON text for monitor output (see json-out.c). */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <jansson.h>

/* One message, "\r\n"-terminated; caller frees. */
char *qmp_json_line(json_t *v, bool pretty, size_t *len);
