/* keyval and the QEMU-compatible JSON reader: good input and every error
 * message, each checked against qemu-storage-daemon 7.2's wording. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "util/cleanup.h"
#include "util/json-stream.h"
#include "util/keyval.h"

/* Parse and compare with the expected JSON (NULL = must fail with msg). */
static void check_kv(const char *in, const char *implied, const char *json, const char *msg)
{
    error *err = NULL;
    json_t *v = keyval_parse(in, implied, &err);
    if (json) {
        if (!v)
            fail_msg("%s: unexpected error %s", in, err->msg);
        json_t *want = json_loads(json, 0, NULL);
        assert_non_null(want);
        if (!json_equal(v, want)) {
            char *got = json_dumps(v, JSON_COMPACT);
            fail_msg("%s: got %s want %s", in, got, json);
        }
        json_decref(want);
        json_decref(v);
    } else {
        if (v)
            fail_msg("%s: unexpectedly parsed", in);
        assert_non_null(err);
        assert_string_equal(err->msg, msg);
        error_free(err);
    }
}

static void test_keyval_good(void **state)
{
    check_kv("", NULL, "{}", NULL);
    check_kv("a=1", NULL, "{\"a\":\"1\"}", NULL);
    check_kv("a=1,b=x", NULL, "{\"a\":\"1\",\"b\":\"x\"}", NULL);
    check_kv("a=1,", NULL, "{\"a\":\"1\"}", NULL);
    check_kv("a=x,,y,b=", NULL, "{\"a\":\"x,y\",\"b\":\"\"}", NULL);
    check_kv("a.b.c=1,a.d=2", NULL, "{\"a\":{\"b\":{\"c\":\"1\"},\"d\":\"2\"}}", NULL);
    check_kv("a=1,a=2", NULL, "{\"a\":\"2\"}", NULL);          /* last wins */
    check_kv("file,node-name=n", "driver", "{\"driver\":\"file\",\"node-name\":\"n\"}", NULL);
    check_kv("null-co,,x=1", "driver", "{\"driver\":\"null-co,x=1\"}", NULL);
    check_kv("driver", "driver", "{\"driver\":\"driver\"}", NULL);
    check_kv("l.0=a,l.1=b", NULL, "{\"l\":[\"a\",\"b\"]}", NULL);
    check_kv("r.0.m=x,r.0.p=y,r.1.m=z", NULL,
             "{\"r\":[{\"m\":\"x\",\"p\":\"y\"},{\"m\":\"z\"}]}", NULL);
    check_kv("x_y-z=1", NULL, "{\"x_y-z\":\"1\"}", NULL);
    /* QAPI downstream names (__RFQDN_name), whose prefix holds dots */
    check_kv("__org.bexd_io-uring=on", NULL, "{\"__org.bexd_io-uring\":\"on\"}", NULL);
    check_kv("a.__org.bexd_x.y=1", NULL, "{\"a\":{\"__org.bexd_x\":{\"y\":\"1\"}}}", NULL);
}

static void test_keyval_errors(void **state)
{
    check_kv("a", NULL, NULL, "Expected '=' after parameter 'a'");
    check_kv("driver=null-co,a", "driver", NULL, "Expected '=' after parameter 'a'");
    check_kv("addr.numeric", NULL, NULL, "Expected '=' after parameter 'addr.numeric'");
    check_kv("a.b=1,a=2", NULL, NULL, "Parameters 'a.*' used inconsistently");
    check_kv("a=2,a.b=1", NULL, NULL, "Parameters 'a.*' used inconsistently");
    check_kv("a.0=1,a.b=1", NULL, NULL, "Parameters 'a.*' used inconsistently");
    check_kv("a.1=1", NULL, NULL, "Parameter 'a.0' missing");
    check_kv("x.a.0=1,x.a.2=1", NULL, NULL, "Parameter 'x.a.1' missing");
    check_kv("1=1", NULL, NULL, "Invalid parameter '1'");
    check_kv("a..b=1", NULL, NULL, "Invalid parameter 'a..b'");
    check_kv(",driver=x", "driver", NULL, "Invalid parameter ''");
    check_kv("=x", "driver", NULL, "Invalid parameter ''");
    check_kv("a=1,help", NULL, NULL, "Help is not available for this option");
    check_kv("__org=1", NULL, NULL, "Invalid parameter '__org'");
    check_kv("__org.bexd_=1", NULL, NULL, "Invalid parameter '__org.bexd_'");
    check_kv("__org.bexd_1=1", NULL, NULL, "Invalid parameter '__org.bexd_1'");
    char longkey[200];
    memset(longkey, 'k', 130);
    strcpy(longkey + 130, "=1");
    check_kv(longkey, NULL, NULL,
             "Parameter 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
             "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk' is too long");
}

/* keyval_flatten is QEMU's qdict_flatten: the inverse of keyval's nesting,
 * empty objects and lists kept as values, leaves kept with their types. */
static void test_keyval_flatten(void **state)
{
    CLEANUP_JSON json_t *in = json_loads(
        "{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"a\","
        " \"aio\": {}}, \"l\": [1, {\"x\": true}, []], \"n\": null}", 0, NULL);
    CLEANUP_JSON json_t *want = json_loads(
        "{\"driver\": \"qcow2\", \"file.driver\": \"file\", \"file.filename\": \"a\","
        " \"file.aio\": {}, \"l.0\": 1, \"l.1.x\": true, \"l.2\": [], \"n\": null}", 0, NULL);
    assert_non_null(in);
    CLEANUP_JSON json_t *flat = keyval_flatten(in);
    assert_true(json_equal(flat, want));

    /* and back: keyval's dotted keys give the nested object again */
    CLEANUP_JSON json_t *kv = keyval_parse("a.b=1,a.c.0=x,a.c.1=y,d=z", NULL, NULL);
    CLEANUP_JSON json_t *kvflat = keyval_flatten(kv);
    CLEANUP_JSON json_t *kvwant = json_loads(
        "{\"a.b\": \"1\", \"a.c.0\": \"x\", \"a.c.1\": \"y\", \"d\": \"z\"}", 0, NULL);
    assert_true(json_equal(kvflat, kvwant));
}

static void test_keyval_or_json(void **state)
{
    error *err = NULL;
    bool is_json = false;
    json_t *v = keyval_or_json_parse("{'driver': \"file\", 'size': 5}", "driver", &is_json, &err);
    assert_non_null(v);
    assert_true(is_json);
    assert_int_equal(json_integer_value(json_object_get(v, "size")), 5);
    json_decref(v);

    v = keyval_or_json_parse("{\"driver\":\"file\"", "driver", &is_json, &err);
    assert_null(v);
    assert_string_equal(err->msg, "JSON parse error, premature EOI");
    error_free(err);
    err = NULL;

    v = keyval_or_json_parse("{}x", "driver", &is_json, &err);
    assert_null(v);
    assert_string_equal(err->msg, "Expecting at most one JSON value");
    error_free(err);
    err = NULL;

    v = keyval_or_json_parse("{'driver':raw}", "driver", &is_json, &err);
    assert_null(v);
    assert_string_equal(err->msg, "JSON parse error, invalid keyword 'raw'");
    error_free(err);
    err = NULL;

    v = keyval_or_json_parse("[]", "driver", &is_json, &err);   /* keyval, implied */
    assert_false(is_json);
    assert_string_equal(json_string_value(json_object_get(v, "driver")), "[]");
    json_decref(v);
}

/* ---- JSON stream ---- */

struct collect { char out[4096]; };

static void collect_cb(void *opaque, json_t *value, error *err)
{
    struct collect *c = opaque;
    char *s = err ? strdup(err->msg) : json_dumps(value, JSON_COMPACT | JSON_ENCODE_ANY);
    strcat(c->out, s);
    strcat(c->out, "|");
    free(s);
    json_decref(value);
    error_free(err);
}

static void check_stream(const char *in, size_t len, const char *want)
{
    struct collect c = { "" };
    struct json_stream *js = json_stream_new(collect_cb, &c);
    json_stream_feed(js, in, len);
    json_stream_free(js);
    assert_string_equal(c.out, want);
}
#define STREAM(in, want) check_stream(in, sizeof(in) - 1, want)

static void test_json_stream(void **state)
{
    STREAM("{\"a\":1} {'b':[true,null,-1.5e1]}\n", "{\"a\":1}|{\"b\":[true,null,-15.0]}|");
    STREAM("{\"exec\n}\n", "JSON parse error, stray '\"exec\n'|JSON parse error, expecting value|");
    STREAM("nul ", "JSON parse error, invalid keyword 'nul'|");
    STREAM("{\"a\" 1}", "JSON parse error, missing : in object pair|");
    STREAM("{\"a\":1,}", "JSON parse error, expecting value|");
    STREAM("{1:2}", "JSON parse error, key is not a string in object|");
    STREAM("{\"a\":1 \"b\":2}", "JSON parse error, expected separator in dict|");
    STREAM("[1 2]", "JSON parse error, expected separator in list|");
    STREAM("{\"a\":1,\"a\":2}", "JSON parse error, duplicate key|");
    STREAM("[1,2\n]", "[1,2]|");
    STREAM("}", "JSON parse error, expecting value|");
    STREAM("\0{\"x\":1}", "JSON parse error, stray ''|{\"x\":1}|");
    STREAM("{\"s\":\"\\u00e9\\ud83d\\ude00\\n\"}", "{\"s\":\"\xc3\xa9\xf0\x9f\x98\x80\\n\"}|");
    STREAM("{\"s\":\"\\q\"}", "JSON parse error, stray '\"\\q'|JSON parse error, expecting value|");
    STREAM("01 ", "JSON parse error, stray '01'|");
    /* after a stray byte the lexer skips to the next structural character */
    STREAM("@abc{\"ok\":1}", "JSON parse error, stray '@'|{\"ok\":1}|");
}

static void test_json_nesting_limit(void **state)
{
    char in[JSON_MAX_NESTING + 2];
    memset(in, '[', sizeof(in) - 1);
    in[sizeof(in) - 1] = 0;
    struct collect c = { "" };
    struct json_stream *js = json_stream_new(collect_cb, &c);
    json_stream_feed(js, in, JSON_MAX_NESTING + 1);
    json_stream_free(js);
    assert_string_equal(c.out, "JSON nesting depth limit exceeded|");
}

static void test_json_token_size_limit(void **state)
{
    size_t n = JSON_MAX_TOKEN_SIZE + 16;
    char *in = malloc(n);
    in[0] = '"';
    memset(in + 1, 'x', n - 2);
    in[n - 1] = '"';
    struct collect c = { "" };
    struct json_stream *js = json_stream_new(collect_cb, &c);
    json_stream_feed(js, in, n);
    json_stream_feed(js, "{\"ok\":1}", 8);
    json_stream_free(js);
    free(in);
    assert_string_equal(c.out, "JSON token size limit exceeded|{\"ok\":1}|");
}

/* Regression (issue 13, 3): a 16 MiB number, keyword or broken string was
 * copied into a stack array (16 MiB > the 8 MiB stack: SEGV).  Now they
 * are parsed from the heap and errors quote at most 256 bytes. */
static void feed_big(char first, char fill, char last, const char *want_prefix)
{
    size_t n = 16u << 20;
    char *in = malloc(n + 1);
    memset(in, fill, n);
    in[0] = first;
    in[n - 1] = last;
    struct collect c = { "" };
    struct json_stream *js = json_stream_new(collect_cb, &c);
    json_stream_feed(js, in, n);
    json_stream_feed(js, " {\"ok\":1}", 9);
    json_stream_free(js);
    free(in);
    assert_true(strlen(c.out) < 400);
    assert_memory_equal(c.out, want_prefix, strlen(want_prefix));
    assert_non_null(strstr(c.out, "|{\"ok\":1}|"));
}

static void test_json_huge_tokens(void **state)
{
    feed_big('1', '7', '7', "JSON parse error, expecting value");  /* inf: no JSON real */
    feed_big('x', 'x', 'x', "JSON parse error, invalid keyword 'xxxx");
    feed_big('"', 'x', '\x01', "JSON parse error, stray '\"xxxx");
    struct collect c = { "" };
    struct json_stream *js = json_stream_new(collect_cb, &c);
    json_stream_feed(js, "nul ", 4);
    json_stream_free(js);
    assert_string_equal(c.out, "JSON parse error, invalid keyword 'nul'|");
}

/* What a stream made of one input: values (compact JSON, keys sorted) and
 * errors, in order, '|'-separated. */
struct record { char *out; size_t len, cap; };

static void record_cb(void *opaque, json_t *value, error *err)
{
    struct record *r = opaque;
    char *s = err ? strdup(err->msg)
                  : json_dumps(value, JSON_COMPACT | JSON_ENCODE_ANY | JSON_SORT_KEYS);
    size_t n = strlen(s);
    if (r->len + n + 2 > r->cap) {
        r->cap = (r->len + n + 2) * 2;
        r->out = realloc(r->out, r->cap);
    }
    memcpy(r->out + r->len, s, n);
    r->len += n;
    r->out[r->len++] = '|';
    r->out[r->len] = 0;
    free(s);
    json_decref(value);
    error_free(err);
}

static unsigned lcg(unsigned *seed)
{
    *seed = *seed * 1103515245 + 12345;
    return *seed >> 16;
}

/* Feed buf whole, or in random pieces of 1..64 bytes; then end the input. */
static char *stream_of(const char *buf, size_t n, unsigned *seed)
{
    struct record r = { NULL, 0, 0 };
    struct json_stream *js = json_stream_new(record_cb, &r);
    size_t off = 0;
    while (off < n) {
        size_t piece = seed ? 1 + lcg(seed) % 64 : n;     /* MIN() evaluates twice */
        size_t len = MIN(n - off, piece);
        assert_int_equal(json_stream_feed(js, buf + off, len), len);
        off += len;
    }
    json_stream_flush(js);
    json_stream_free(js);
    return r.out ? r.out : strdup("");
}

/* Hostile input: random bytes from a JSON-ish alphabet.  The reader must
 * not crash, and what comes out must not depend on how the bytes were cut
 * into pieces (a lexer that loses state at a piece boundary answers
 * differently); after a control character (a lexical error wherever the
 * lexer is: it resets the value being read) a fresh value comes out. */
static void test_json_stream_random(void **state)
{
    static const char alphabet[] = "{}[]:,\"'\\ \n\tabntrulfe0123456789.-+eE\x01\xff\xc3\xa9u";
    static const char tail[] = "\x01{\"ok\":1}";
    unsigned seed = 12345;
    int values = 0, errors = 0;
    for (int round = 0; round < 200; round++) {
        char buf[4096 + sizeof(tail)];
        size_t n = 1 + lcg(&seed) % 4096;
        for (size_t i = 0; i < n; i++)
            buf[i] = alphabet[lcg(&seed) % (sizeof(alphabet) - 1)];
        char *whole = stream_of(buf, n, NULL);
        char *pieces = stream_of(buf, n, &seed);
        assert_string_equal(pieces, whole);
        for (char *p = whole; (p = strchr(p, '|')); p++)
            values++;
        errors += strstr(whole, "JSON parse error") != NULL;
        free(whole);
        free(pieces);
        memcpy(buf + n, tail, sizeof(tail) - 1);
        whole = stream_of(buf, n + sizeof(tail) - 1, &seed);
        size_t wl = strlen(whole);
        assert_true(wl >= 9);
        assert_string_equal(whole + wl - 9, "{\"ok\":1}|");
        free(whole);
    }
    assert_true(values > 200 && errors > 100);     /* the inputs did reach the parser */
}

/* A random JSON value: objects, arrays, strings (escapes, UTF-8), integers,
 * true/false/null; depth at most 4. */
static json_t *random_value(unsigned *seed, int depth)
{
    unsigned kind = lcg(seed) % (depth >= 4 ? 5 : 7);
    switch (kind) {
    case 0: return json_integer((json_int_t)lcg(seed) * 40503 - (1 << 30));
    case 1: {
        static const char *const pieces[] = { "a", "\"", "\\", "\n", "\xc3\xa9", "'", " ",
                                              "\xf0\x9f\x98\x80", "{", "]", "\t" };
        char s[64] = "";
        unsigned len = lcg(seed) % 8;
        for (unsigned i = 0; i < len; i++)
            strcat(s, pieces[lcg(seed) % (sizeof(pieces) / sizeof(pieces[0]))]);
        return json_string(s);
    }
    case 2: return json_true();
    case 3: return json_false();
    case 4: return json_null();
    case 5: {
        json_t *a = json_array();
        for (unsigned i = lcg(seed) % 5; i > 0; i--)
            json_array_append_new(a, random_value(seed, depth + 1));
        return a;
    }
    default: {
        json_t *o = json_object();
        for (unsigned i = lcg(seed) % 5; i > 0; i--) {
            char key[16];
            snprintf(key, sizeof(key), "k%u", lcg(seed) % 8);
            json_object_set_new(o, key, random_value(seed, depth + 1));
        }
        return o;
    }
    }
}

/* Random valid values, separated by random whitespace and fed in random
 * pieces: exactly those values come out, in order. */
static void test_json_stream_random_values(void **state)
{
    static const char *const ws[] = { "", " ", "\n", "\t", "\r\n", "  \n " };
    unsigned seed = 777;
    for (int round = 0; round < 100; round++) {
        size_t cap = 1 << 16, len = 0;
        char *buf = malloc(cap);
        char *want = strdup("");
        int count = 1 + lcg(&seed) % 16;
        for (int i = 0; i < count; i++) {
            json_t *v = random_value(&seed, i % 2);   /* top level: objects and arrays too */
            if (i % 2 == 0 && !json_is_object(v) && !json_is_array(v)) {
                json_t *o = json_pack("{s:o}", "v", v);
                v = o;
            }
            char *text = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
            char *sorted = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_SORT_KEYS);
            const char *sep = ws[lcg(&seed) % (sizeof(ws) / sizeof(ws[0]))];
            /* a scalar needs a delimiter after it to end (QEMU's lexer too) */
            if (!json_is_object(v) && !json_is_array(v))
                sep = "\n";
            size_t need = len + strlen(text) + strlen(sep) + 1;
            if (need > cap)
                buf = realloc(buf, cap = need * 2);
            len += sprintf(buf + len, "%s%s", text, sep);
            char *w = malloc(strlen(want) + strlen(sorted) + 2);
            sprintf(w, "%s%s|", want, sorted);
            free(want);
            want = w;
            free(text);
            free(sorted);
            json_decref(v);
        }
        char *got = stream_of(buf, len, &seed);
        assert_string_equal(got, want);
        free(got);
        free(want);
        free(buf);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keyval_good),
        cmocka_unit_test(test_keyval_errors),
        cmocka_unit_test(test_keyval_or_json),
        cmocka_unit_test(test_keyval_flatten),
        cmocka_unit_test(test_json_stream),
        cmocka_unit_test(test_json_nesting_limit),
        cmocka_unit_test(test_json_token_size_limit),
        cmocka_unit_test(test_json_huge_tokens),
        cmocka_unit_test(test_json_stream_random),
        cmocka_unit_test(test_json_stream_random_values),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
