/* Scope-bound cleanup helpers (attribute cleanup), so error paths need no goto ladders. */
#pragma once
#include <stddef.h>
#include <stdlib.h>
#include <unistd.h>
#include <jansson.h>

static inline void cleanup_free(void *p) { free(*(void **)p); }
static inline void cleanup_close(int *fd) { if (*fd >= 0) close(*fd); }
static inline void cleanup_json(json_t **j) { json_decref(*j); }

#define CLEANUP_FREE __attribute__((cleanup(cleanup_free)))
#define CLEANUP_CLOSE __attribute__((cleanup(cleanup_close)))
#define CLEANUP_JSON __attribute__((cleanup(cleanup_json)))

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define container_of(ptr, type, member) \
    ((type *)((char *)(ptr) - offsetof(type, member)))
#define UNUSED __attribute__((unused))
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
