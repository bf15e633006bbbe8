/*
 * One out-of-memory policy: allocation failure aborts.  Every size that a
 * peer, a client or an image controls is bounded before it reaches these,
 * so running out here means the machine is out of memory, and there is
 * nothing better to do than stop loudly.
 */
#pragma once
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((noreturn, cold)) static inline void xalloc_die(void)
{
    fputs("out of memory\n", stderr);
    abort();
}

static inline void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        xalloc_die();
    return p;
}

static inline void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        xalloc_die();
    return p;
}

/* A buffer for I/O on any node: page-aligned, so that O_DIRECT needs no
 * bounce (malloc's own large blocks are not always page-aligned: its mmap
 * threshold moves).  Freed with free(). */
static inline void *xmalloc_io(size_t n)
{
    void *p;
    if (posix_memalign(&p, 4096, n ? n : 1))
        xalloc_die();
    return p;
}

/* One zeroed object: struct foo *f = xzalloc(sizeof(*f)); */
static inline void *xzalloc(size_t size)
{
    return xcalloc(1, size);
}

static inline void *xrealloc(void *p, size_t n)
{
    void *np = realloc(p, n ? n : 1);
    if (!np)
        xalloc_die();
    return np;
}

static inline char *xstrdup(const char *s)
{
    char *p = strdup(s);
    if (!p)
        xalloc_die();
    return p;
}

/* NULL stays NULL (optional strings). */
static inline char *xstrdup_opt(const char *s)
{
    return s ? xstrdup(s) : NULL;
}

static inline char *xstrndup(const char *s, size_t n)
{
    char *p = strndup(s, n);
    if (!p)
        xalloc_die();
    return p;
}

__attribute__((format(printf, 1, 0)))
static inline char *xvasprintf(const char *fmt, va_list ap)
{
    char *s;
    if (vasprintf(&s, fmt, ap) < 0)
        xalloc_die();
    return s;
}

__attribute__((format(printf, 1, 2)))
static inline char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = xvasprintf(fmt, ap);
    va_end(ap);
    return s;
}
