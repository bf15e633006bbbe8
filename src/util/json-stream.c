/*
 * QEMU-compatible JSON stream reader.
 *
 * Theory of operation: three stages, as in QEMU.
 *  1. The lexer is a byte-at-a-time state machine that cuts the input into
 *     tokens.  A byte that cannot continue the current token either ends it
 *     (and is looked at again from the start state: numbers and keywords)
 *     or makes an error token holding the text so far plus that byte; the
 *     lexer then skips bytes until a structural character or a control
 *     character, where it starts afresh.
 *  2. The streamer collects tokens, counting braces and brackets; when both
 *     counts drop to zero (or either goes negative) the collected tokens
 *     form one value and go to the parser.  It also enforces the limits.
 *  3. The parser is recursive descent over the collected tokens, building
 *     jansson values; the first error it meets is the one reported.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "util/cleanup.h"
#include "util/json-stream.h"
#include "util/xalloc.h"

enum tok {
    T_LCURLY, T_RCURLY, T_LSQUARE, T_RSQUARE, T_COLON, T_COMMA,
    T_INTEGER, T_FLOAT, T_KEYWORD, T_STRING, T_ERROR,
};

enum lstate {
    L_START, L_RECOVERY, L_STRING, L_ESCAPE, L_UCODE,
    L_NEG, L_ZERO, L_INT, L_DOT, L_FRAC, L_EXP, L_EXP_SIGN, L_EXP_DIGITS,
    L_KEYWORD,
};

struct token { enum tok type; size_t off, len; };

struct json_stream {
    json_stream_fn *fn;
    void *opaque;
    /* lexer */
    enum lstate state;
    char quote;
    int ucode_left;
    char *tok;                 /* current token text */
    size_t tok_len, tok_cap;
    bool tok_overflow;         /* longer than JSON_MAX_TOKEN_SIZE: text dropped */
    /* streamer */
    struct token *toks;
    size_t ntoks, toks_cap;
    char *text;                /* all collected token texts, back to back */
    size_t text_len, text_cap;
    long brace, bracket;
    bool stop;                 /* set by the callback: json_stream_stop() */
};

/* ------------------------------------------------------------------ */
/* Parser */

struct pctx {
    const struct token *toks;
    size_t n, pos;
    const char *text;
    char *err;                 /* first error only */
};

static void perr(struct pctx *c, const char *fmt, const char *arg)
{
    if (c->err)
        return;
    if (asprintf(&c->err, fmt, arg) < 0)
        c->err = NULL;
}

static const struct token *peek(struct pctx *c)
{
    return c->pos < c->n ? &c->toks[c->pos] : NULL;
}

static const struct token *pop(struct pctx *c)
{
    return c->pos < c->n ? &c->toks[c->pos++] : NULL;
}

static json_t *parse_value(struct pctx *c);

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

static unsigned read_u4(const char *p)
{
    return (hexval(p[0]) << 12) | (hexval(p[1]) << 8) | (hexval(p[2]) << 4) | hexval(p[3]);
}

static size_t put_utf8(char *o, unsigned cp)
{
    if (cp < 0x80) { o[0] = cp; return 1; }
    if (cp < 0x800) { o[0] = 0xc0 | (cp >> 6); o[1] = 0x80 | (cp & 0x3f); return 2; }
    if (cp < 0x10000) {
        o[0] = 0xe0 | (cp >> 12); o[1] = 0x80 | ((cp >> 6) & 0x3f); o[2] = 0x80 | (cp & 0x3f);
        return 3;
    }
    o[0] = 0xf0 | (cp >> 18); o[1] = 0x80 | ((cp >> 12) & 0x3f);
    o[2] = 0x80 | ((cp >> 6) & 0x3f); o[3] = 0x80 | (cp & 0x3f);
    return 4;
}

static json_t *parse_string(struct pctx *c, const struct token *t)
{
    const char *p = c->text + t->off + 1, *end = c->text + t->off + t->len - 1;
    CLEANUP_FREE char *out = calloc(1, t->len + 1);
    size_t n = 0;
    bool has_nul = false;

    if (!out) {
        perr(c, "%sout of memory", "");
        return NULL;
    }
    while (p < end) {
        if (*p != '\\') {
            out[n++] = *p++;
            continue;
        }
        p++;
        switch (*p) {
        case '"': case '\'': case '\\': case '/': out[n++] = *p; break;
        case 'b': out[n++] = '\b'; break;
        case 'f': out[n++] = '\f'; break;
        case 'n': out[n++] = '\n'; break;
        case 'r': out[n++] = '\r'; break;
        case 't': out[n++] = '\t'; break;
        case 'u': {
            unsigned cp = read_u4(p + 1);
            p += 4;
            if (cp >= 0xd800 && cp < 0xdc00) {
                if (p + 6 < end + 1 && p[1] == '\\' && p[2] == 'u') {
                    unsigned lo = read_u4(p + 3);
                    if (lo >= 0xdc00 && lo < 0xe000) {
                        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                        p += 6;
                        n += put_utf8(out + n, cp);
                        break;
                    }
                }
                perr(c, "%sinvalid \\u escape (unpaired surrogate)", "");
                return NULL;
            }
            if (cp >= 0xdc00 && cp < 0xe000) {
                perr(c, "%sinvalid \\u escape (unpaired surrogate)", "");
                return NULL;
            }
            if (cp == 0) {
                /* as QEMU's parser: U+0000 becomes the overlong form C0 80,
                 * so the string stays a C string (and is written back as
                 * \u0000); no name or path then matches it */
                out[n++] = (char)0xc0;
                out[n++] = (char)0x80;
                has_nul = true;
                break;
            }
            n += put_utf8(out + n, cp);
            break;
        }
        default:
            perr(c, "%sinvalid escape sequence in string", "");
            return NULL;
        }
        p++;
    }
    json_t *s = json_stringn(out, n);
    if (!s && has_nul) {
        /* valid UTF-8 but for the C0 80 pairs? */
        CLEANUP_FREE char *chk = xstrndup(out, n);
        for (size_t i = 0; i + 1 < n; i++)
            if ((unsigned char)chk[i] == 0xc0 && (unsigned char)chk[i + 1] == 0x80)
                chk[i] = chk[i + 1] = 'x';
        json_t *valid = json_stringn(chk, n);
        if (valid)
            s = json_stringn_nocheck(out, n);
        json_decref(valid);
    }
    if (!s)
        perr(c, "%sinvalid UTF-8 sequence in string", "");
    return s;
}

/* Token text for a message: as QEMU prints it, but at most
 * JSON_ECHO_MAX bytes of it (a 16 MiB token must not come back whole). */
#define JSON_ECHO_MAX 256

static char *token_echo(const char *s, size_t len)
{
    if (len <= JSON_ECHO_MAX)
        return xstrndup(s, len);
    return xasprintf("%.*s... (%zu bytes)", JSON_ECHO_MAX, s, len);
}

static json_t *parse_number(struct pctx *c, const struct token *t)
{
    /* No input length reaches the stack: short numbers use a small buffer,
     * long ones (up to the token limit) a heap copy. */
    char small[64];
    CLEANUP_FREE char *big = NULL;
    char *buf = small;

    if (t->len >= sizeof(small))
        buf = big = xmalloc(t->len + 1);
    memcpy(buf, c->text + t->off, t->len);
    buf[t->len] = 0;
    if (t->type == T_INTEGER) {
        errno = 0;
        long long v = strtoll(buf, NULL, 10);
        if (errno == 0)
            return json_integer(v);
        /* out of int64 range: QEMU keeps uint64 or falls back to double */
    }
    return json_real(strtod(buf, NULL));
}

static json_t *parse_keyword(struct pctx *c, const struct token *t)
{
    const char *p = c->text + t->off;

    if (t->len == 4 && !memcmp(p, "true", 4)) return json_true();
    if (t->len == 5 && !memcmp(p, "false", 5)) return json_false();
    if (t->len == 4 && !memcmp(p, "null", 4)) return json_null();
    CLEANUP_FREE char *echo = token_echo(p, t->len);
    perr(c, "invalid keyword '%s'", echo);
    return NULL;
}

static int parse_pair(struct pctx *c, json_t *obj)
{
    const struct token *t;
    CLEANUP_JSON json_t *key = parse_value(c);
    if (!json_is_string(key)) {
        perr(c, "%skey is not a string in object", "");
        return -1;
    }
    t = pop(c);
    if (!t) {
        perr(c, "%spremature EOI", "");
        return -1;
    }
    if (t->type != T_COLON) {
        perr(c, "%smissing : in object pair", "");
        return -1;
    }
    json_t *val = parse_value(c);
    if (!val) {
        perr(c, "%sMissing value in dict", "");
        return -1;
    }
    const char *k = json_string_value(key);
    if (json_object_get(obj, k)) {
        json_decref(val);
        perr(c, "%sduplicate key", "");
        return -1;
    }
    json_object_set_new_nocheck(obj, k, val);   /* k may hold C0 80 (\u0000) */
    return 0;
}

static json_t *parse_object(struct pctx *c)
{
    json_t *obj = json_object();
    const struct token *t;

    pop(c);
    t = peek(c);
    if (!t)
        goto eoi;
    if (t->type == T_RCURLY) {
        pop(c);
        return obj;
    }
    if (parse_pair(c, obj) < 0)
        goto fail;
    while ((t = pop(c)) && t->type != T_RCURLY) {
        if (t->type != T_COMMA) {
            perr(c, "%sexpected separator in dict", "");
            goto fail;
        }
        if (parse_pair(c, obj) < 0)
            goto fail;
    }
    if (t)
        return obj;
eoi:
    perr(c, "%spremature EOI", "");
fail:
    json_decref(obj);
    return NULL;
}

static json_t *parse_array(struct pctx *c)
{
    json_t *arr = json_array(), *v;
    const struct token *t;

    pop(c);
    t = peek(c);
    if (!t)
        goto eoi;
    if (t->type == T_RSQUARE) {
        pop(c);
        return arr;
    }
    if (!(v = parse_value(c))) {
        perr(c, "%sexpecting value", "");
        goto fail;
    }
    json_array_append_new(arr, v);
    while ((t = pop(c)) && t->type != T_RSQUARE) {
        if (t->type != T_COMMA) {
            perr(c, "%sexpected separator in list", "");
            goto fail;
        }
        if (!(v = parse_value(c))) {
            perr(c, "%sexpecting value", "");
            goto fail;
        }
        json_array_append_new(arr, v);
    }
    if (t)
        return arr;
eoi:
    perr(c, "%spremature EOI", "");
fail:
    json_decref(arr);
    return NULL;
}

static json_t *parse_value(struct pctx *c)
{
    const struct token *t = peek(c);
    if (!t) {
        perr(c, "%spremature EOI", "");
        return NULL;
    }
    switch (t->type) {
    case T_LCURLY: return parse_object(c);
    case T_LSQUARE: return parse_array(c);
    case T_STRING: return parse_string(c, pop(c));
    case T_INTEGER: case T_FLOAT: return parse_number(c, pop(c));
    case T_KEYWORD: return parse_keyword(c, pop(c));
    default:
        perr(c, "%sexpecting value", "");
        return NULL;
    }
}

/* ------------------------------------------------------------------ */
/* Streamer */

static void stream_reset(struct json_stream *js)
{
    js->ntoks = 0;
    js->text_len = 0;
    js->brace = js->bracket = 0;
    /* give back memory a huge value took */
    if (js->text_cap > 65536) {
        free(js->text);
        js->text = NULL;
        js->text_cap = 0;
    }
    if (js->toks_cap > 4096) {
        free(js->toks);
        js->toks = NULL;
        js->toks_cap = 0;
    }
}

static void emit_error(struct json_stream *js, const char *fmt, const char *arg)
{
    error *err = NULL;
    error_setg(&err, fmt, arg);
    stream_reset(js);
    js->fn(js->opaque, NULL, err);
}

static void emit_parse(struct json_stream *js)
{
    struct pctx c = { .toks = js->toks, .n = js->ntoks, .text = js->text };
    json_t *v = parse_value(&c);
    error *err = NULL;

    if (!v && !c.err)
        c.err = strdup("expecting value");
    if (c.err) {
        json_decref(v);
        v = NULL;
        error_setg(&err, "JSON parse error, %s", c.err);
        free(c.err);
    }
    stream_reset(js);
    js->fn(js->opaque, v, err);
}

static bool grow(void **p, size_t *cap, size_t need, size_t elt)
{
    if (need <= *cap)
        return true;
    size_t n = *cap ? *cap : 64;
    while (n < need)
        n *= 2;
    void *np = realloc(*p, n * elt);
    if (!np)
        return false;
    *p = np;
    *cap = n;
    return true;
}

static void stream_token(struct json_stream *js, enum tok type,
                         const char *s, size_t len, bool overflow)
{
    switch (type) {
    case T_LCURLY: js->brace++; break;
    case T_RCURLY: js->brace--; break;
    case T_LSQUARE: js->bracket++; break;
    case T_RSQUARE: js->bracket--; break;
    case T_ERROR: {
        CLEANUP_FREE char *echo = token_echo(s, len);
        emit_error(js, "JSON parse error, stray '%s'", echo);
        return;
    }
    default: break;
    }
    if (overflow || js->text_len + len + 1 > JSON_MAX_TOKEN_SIZE) {
        emit_error(js, "%sJSON token size limit exceeded", "");
        return;
    }
    if (js->ntoks + 1 > JSON_MAX_TOKEN_COUNT) {
        emit_error(js, "%sJSON token count limit exceeded", "");
        return;
    }
    if (js->brace + js->bracket > JSON_MAX_NESTING) {
        emit_error(js, "%sJSON nesting depth limit exceeded", "");
        return;
    }
    if (!grow((void **)&js->toks, &js->toks_cap, js->ntoks + 1, sizeof(*js->toks)) ||
        !grow((void **)&js->text, &js->text_cap, js->text_len + len + 1, 1)) {
        emit_error(js, "%sout of memory", "");
        return;
    }
    js->toks[js->ntoks++] = (struct token){ type, js->text_len, len };
    memcpy(js->text + js->text_len, s, len);
    js->text_len += len;
    if ((js->brace > 0 || js->bracket > 0) && js->brace >= 0 && js->bracket >= 0)
        return;
    emit_parse(js);
}

/* ------------------------------------------------------------------ */
/* Lexer */

static void tok_add(struct json_stream *js, char ch)
{
    if (js->tok_overflow)
        return;
    if (js->tok_len + 1 > JSON_MAX_TOKEN_SIZE ||
        !grow((void **)&js->tok, &js->tok_cap, js->tok_len + 1, 1)) {
        js->tok_overflow = true;
        return;
    }
    js->tok[js->tok_len++] = ch;
}

static void tok_emit(struct json_stream *js, enum tok type)
{
    bool ovf = js->tok_overflow;
    size_t len = js->tok_len;
    js->tok_len = 0;
    js->tok_overflow = false;
    js->state = L_START;
    stream_token(js, type, js->tok, len, ovf);
    if (js->tok_cap > 65536) {
        free(js->tok);
        js->tok = NULL;
        js->tok_cap = 0;
    }
}

static void lex_error(struct json_stream *js, char ch)
{
    tok_add(js, ch);
    tok_emit(js, T_ERROR);
    js->state = L_RECOVERY;
}

static bool is_digit(unsigned char ch) { return ch >= '0' && ch <= '9'; }

/* Returns true if ch was consumed, false to look at it again. */
static bool lex_char(struct json_stream *js, unsigned char ch)
{
    switch (js->state) {
    case L_RECOVERY:
        if (ch < 0x20 ? ch != '\t' : (ch >= 0xfe || ch == '[' || ch == ']' ||
                                      ch == '{' || ch == '}')) {
            js->state = L_START;
            return false;
        }
        return true;
    case L_START:
        switch (ch) {
        case ' ': case '\t': case '\r': case '\n': return true;
        case '{': tok_add(js, ch); tok_emit(js, T_LCURLY); return true;
        case '}': tok_add(js, ch); tok_emit(js, T_RCURLY); return true;
        case '[': tok_add(js, ch); tok_emit(js, T_LSQUARE); return true;
        case ']': tok_add(js, ch); tok_emit(js, T_RSQUARE); return true;
        case ':': tok_add(js, ch); tok_emit(js, T_COLON); return true;
        case ',': tok_add(js, ch); tok_emit(js, T_COMMA); return true;
        case '"': case '\'':
            js->quote = ch;
            js->state = L_STRING;
            tok_add(js, ch);
            return true;
        case '-': js->state = L_NEG; tok_add(js, ch); return true;
        case '0': js->state = L_ZERO; tok_add(js, ch); return true;
        default:
            if (ch >= '1' && ch <= '9') {
                js->state = L_INT;
                tok_add(js, ch);
                return true;
            }
            if (ch >= 'a' && ch <= 'z') {
                js->state = L_KEYWORD;
                tok_add(js, ch);
                return true;
            }
            lex_error(js, ch);
            return true;
        }
    case L_STRING:
        if (ch == js->quote) {
            tok_add(js, ch);
            tok_emit(js, T_STRING);
        } else if (ch == '\\') {
            tok_add(js, ch);
            js->state = L_ESCAPE;
        } else if (ch < 0x20 || ch >= 0xfe) {
            lex_error(js, ch);
        } else {
            tok_add(js, ch);
        }
        return true;
    case L_ESCAPE:
        if (strchr("\"'\\/bfnrt", ch) && ch) {
            tok_add(js, ch);
            js->state = L_STRING;
        } else if (ch == 'u') {
            tok_add(js, ch);
            js->state = L_UCODE;
            js->ucode_left = 4;
        } else {
            lex_error(js, ch);
        }
        return true;
    case L_UCODE:
        if (hexval(ch) < 0) {
            lex_error(js, ch);
            return true;
        }
        tok_add(js, ch);
        if (--js->ucode_left == 0)
            js->state = L_STRING;
        return true;
    case L_NEG:
        if (ch == '0') { js->state = L_ZERO; tok_add(js, ch); return true; }
        if (ch >= '1' && ch <= '9') { js->state = L_INT; tok_add(js, ch); return true; }
        lex_error(js, ch);
        return true;
    case L_ZERO:
    case L_INT:
        if (is_digit(ch)) {
            if (js->state == L_ZERO) {
                lex_error(js, ch);
                return true;
            }
            tok_add(js, ch);
            return true;
        }
        if (ch == '.') { js->state = L_DOT; tok_add(js, ch); return true; }
        if (ch == 'e' || ch == 'E') { js->state = L_EXP; tok_add(js, ch); return true; }
        tok_emit(js, T_INTEGER);
        return false;
    case L_DOT:
        if (is_digit(ch)) { js->state = L_FRAC; tok_add(js, ch); return true; }
        lex_error(js, ch);
        return true;
    case L_FRAC:
        if (is_digit(ch)) { tok_add(js, ch); return true; }
        if (ch == 'e' || ch == 'E') { js->state = L_EXP; tok_add(js, ch); return true; }
        tok_emit(js, T_FLOAT);
        return false;
    case L_EXP:
        if (ch == '+' || ch == '-') { js->state = L_EXP_SIGN; tok_add(js, ch); return true; }
        /* fall through */
    case L_EXP_SIGN:
        if (is_digit(ch)) { js->state = L_EXP_DIGITS; tok_add(js, ch); return true; }
        lex_error(js, ch);
        return true;
    case L_EXP_DIGITS:
        if (is_digit(ch)) { tok_add(js, ch); return true; }
        tok_emit(js, T_FLOAT);
        return false;
    case L_KEYWORD:
        if (ch >= 'a' && ch <= 'z') { tok_add(js, ch); return true; }
        tok_emit(js, T_KEYWORD);
        return false;
    }
    return true;
}

struct json_stream *json_stream_new(json_stream_fn *fn, void *opaque)
{
    struct json_stream *js = calloc(1, sizeof(*js));
    if (js) {
        js->fn = fn;
        js->opaque = opaque;
    }
    return js;
}

void json_stream_free(struct json_stream *js)
{
    if (!js)
        return;
    free(js->tok);
    free(js->toks);
    free(js->text);
    free(js);
}

size_t json_stream_feed(struct json_stream *js, const char *buf, size_t len)
{
    js->stop = false;
    for (size_t i = 0; i < len; i++) {
        while (!lex_char(js, (unsigned char)buf[i]))
            ;
        if (js->stop) {
            js->stop = false;
            return i + 1;
        }
    }
    return len;
}

void json_stream_stop(struct json_stream *js)
{
    js->stop = true;
}

void json_stream_flush(struct json_stream *js)
{
    switch (js->state) {
    case L_ZERO: case L_INT: tok_emit(js, T_INTEGER); break;
    case L_FRAC: case L_EXP_DIGITS: tok_emit(js, T_FLOAT); break;
    case L_KEYWORD: tok_emit(js, T_KEYWORD); break;
    case L_START: case L_RECOVERY: break;
    default:
        tok_emit(js, T_ERROR);
        break;
    }
    js->state = L_START;
    if (js->ntoks)
        emit_parse(js);
}

/* ------------------------------------------------------------------ */

struct one_ctx {
    json_t *value;
    error *err;
    int count;
};

static void one_cb(void *opaque, json_t *value, error *err)
{
    struct one_ctx *c = opaque;
    c->count++;
    if (c->count == 1) {
        c->value = value;
        c->err = err;
        return;
    }
    json_decref(value);
    error_free(err);
}

json_t *json_parse_one(const char *s, error **errp)
{
    struct one_ctx c = { 0 };
    struct json_stream *js = json_stream_new(one_cb, &c);
    if (!js) {
        error_setg(errp, "out of memory");
        return NULL;
    }
    json_stream_feed(js, s, strlen(s));
    json_stream_flush(js);
    json_stream_free(js);
    if (c.err) {
        json_decref(c.value);
        error_propagate(errp, c.err);
        return NULL;
    }
    if (c.count > 1) {
        json_decref(c.value);
        error_setg(errp, "Expecting at most one JSON value");
        return NULL;
    }
    if (!c.value) {
        error_setg(errp, "JSON parse error, premature EOI");   /* empty input */
        return NULL;
    }
    return c.value;
}
