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

/* One code point of s (QEMU's mod_utf8_codepoint: the overlong C0 80 is
 * U+0000); -1 for a bad sequence, *len its bytes. */
static int codepoint(const unsigned char *s, int *len)
{
    unsigned c = s[0];
    int n, cp;
    if (c < 0x80) {
        *len = 1;
        return c;
    }
    if (c == 0xc0 && s[1] == 0x80) {
        *len = 2;
        return 0;
    }
    if ((c & 0xe0) == 0xc0) { n = 2; cp = c & 0x1f; }
    else if ((c & 0xf0) == 0xe0) { n = 3; cp = c & 0x0f; }
    else if ((c & 0xf8) == 0xf0) { n = 4; cp = c & 0x07; }
    else { *len = 1; return -1; }
    for (int i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80) {
            *len = i;
            return -1;
        }
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    *len = n;
    return cp;
}

/* A string as QEMU's qobject_to_json() writes it. */
static void string(struct sbuf *b, const char *str, size_t slen)
{
    const unsigned char *p = (const unsigned char *)str, *end = p + slen;
    char u[16];
    puts_(b, "\"");
    while (p < end) {
        int len, cp = codepoint(p, &len);
        if (p + len > end) {
            cp = -1;
            len = (int)(end - p);
        }
        p += len;
        switch (cp) {
        case '"': puts_(b, "\\\""); break;
        case '\\': puts_(b, "\\\\"); break;
        case '\b': puts_(b, "\\b"); break;
        case '\f': puts_(b, "\\f"); break;
        case '\n': puts_(b, "\\n"); break;
        case '\r': puts_(b, "\\r"); break;
        case '\t': puts_(b, "\\t"); break;
        default:
            if (cp < 0)
                cp = 0xfffd;
            if (cp > 0xffff) {
                snprintf(u, sizeof(u), "\\u%04X\\u%04X", 0xd800 + ((cp - 0x10000) >> 10),
                         0xdc00 + ((cp - 0x10000) & 0x3ff));
                puts_(b, u);
            } else if (cp < 0x20 || cp >= 0x7f) {
                snprintf(u, sizeof(u), "\\u%04X", cp);
                puts_(b, u);
            } else {
                char ch = (char)cp;
                put(b, &ch, 1);
            }
        }
    }
    puts_(b, "\"");
}

static void scalar(struct sbuf *b, json_t *v)
{
    if (json_is_string(v)) {
        string(b, json_string_value(v), json_string_length(v));
        return;
    }
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
            string(b, k, strlen(k));
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
