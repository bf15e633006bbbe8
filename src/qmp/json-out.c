/*
 * JSON output shaped like QEMU's qobject_to_json(): ", " and ": "
 * separators, non-ASCII escaped as \uXXXX, and in pretty mode 4-space
 * indentation with an empty object written as "{" newline indent "}".
 * Lines end in "\r\n", as QEMU's monitor writes them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "qmp/json-out.h"
#include "util/xalloc.h"

struct sbuf { char *p; size_t len, cap; };

static void put(struct sbuf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t c = b->cap ? b->cap : 256;
        while (c < b->len + n + 1)
            c *= 2;
        char *np = xrealloc(b->p, c);
        b->p = np;
        b->cap = c;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void puts_(struct sbuf *b, const char *s) { put(b, s, strlen(s)); }

static void newline(struct sbuf *b, bool pretty, int level)
{
    if (!pretty)
        return;
    puts_(b, "\r\n");
    for (int i = 0; i < level; i++)
        puts_(b, "    ");
}

static void scalar(struct sbuf *b, json_t *v)
{
    char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_ENSURE_ASCII);
    if (s) {
        puts_(b, s);
        free(s);
    }
}

static void emit(struct sbuf *b, json_t *v, bool pretty, int level)
{
    if (json_is_object(v)) {
        const char *k;
        json_t *e;
        bool first = true;
        puts_(b, "{");
        json_object_foreach(v, k, e) {
            if (!first)
                puts_(b, pretty ? "," : ", ");
            first = false;
            newline(b, pretty, level + 1);
            json_t *ks = json_string(k);
            scalar(b, ks);
            json_decref(ks);
            puts_(b, ": ");
            emit(b, e, pretty, level + 1);
        }
        newline(b, pretty, level);
        puts_(b, "}");
    } else if (json_is_array(v)) {
        size_t i;
        json_t *e;
        puts_(b, "[");
        json_array_foreach(v, i, e) {
            if (i)
                puts_(b, pretty ? "," : ", ");
            newline(b, pretty, level + 1);
            emit(b, e, pretty, level + 1);
        }
        newline(b, pretty, level);
        puts_(b, "]");
    } else {
        scalar(b, v);
    }
}

char *qmp_json_line(json_t *v, bool pretty, size_t *len)
{
    struct sbuf b = { 0 };
    emit(&b, v, pretty, 0);
    puts_(&b, "\r\n");
    *len = b.len;
    return b.p;
}
