/* The schema checker in QMP (strict JSON) and keyval (command line) modes:
 * accepted input, conversions, and every error message, each checked
 * against qemu-storage-daemon 7.2's wording. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "qmp/qmp.h"
#include "qmp/schema.h"
#include "util/cleanup.h"
#include "util/keyval.h"

static json_t *parse(const char *json)
{
    json_error_t e;
    json_t *v = json_loads(json, 0, &e);
    if (!v)
        fail_msg("bad test JSON %s: %s", json, e.text);
    return v;
}

/* QMP mode: want = expected checked JSON, or NULL and msg. */
static void qmp(const char *type, const char *in, const char *want, const char *msg)
{
    error *err = NULL;
    json_t *v = parse(in);
    json_t *r = schema_check_type(type, v, false, "", &err);
    json_decref(v);
    if (want) {
        if (!r)
            fail_msg("%s %s: unexpected error: %s", type, in, err->msg);
        json_t *w = parse(want);
        if (!json_equal(r, w))
            fail_msg("%s %s: got %s", type, in, json_dumps(r, JSON_COMPACT));
        json_decref(w);
        json_decref(r);
        return;
    }
    if (r)
        fail_msg("%s %s: accepted, want '%s'", type, in, msg);
    assert_string_equal(err->msg, msg);
    error_free(err);
}

/* Keyval mode, from command-line text. */
static void kv(const char *type, const char *implied, const char *in,
               const char *want, const char *msg)
{
    error *err = NULL;
    json_t *v = keyval_parse(in, implied, &err);
    if (!v)
        fail_msg("keyval %s: %s", in, err->msg);
    json_t *r = schema_check_type(type, v, true, "", &err);
    json_decref(v);
    if (want) {
        if (!r)
            fail_msg("%s %s: unexpected error: %s", type, in, err->msg);
        json_t *w = parse(want);
        if (!json_equal(r, w))
            fail_msg("%s %s: got %s", type, in, json_dumps(r, JSON_COMPACT));
        json_decref(w);
        json_decref(r);
        return;
    }
    if (r)
        fail_msg("%s %s: accepted, want '%s'", type, in, msg);
    assert_string_equal(err->msg, msg);
    error_free(err);
}

static void test_qmp_good(void **state)
{
    qmp("BlockExportOptions",
        "{\"type\":\"nbd\",\"id\":\"e\",\"node-name\":\"n\",\"writable\":true,\"bitmaps\":[\"b\"]}",
        "{\"type\":\"nbd\",\"id\":\"e\",\"node-name\":\"n\",\"writable\":true,\"bitmaps\":[\"b\"]}", NULL);
    qmp("BlockdevOptions",
        "{\"driver\":\"raw\",\"node-name\":\"r\",\"file\":{\"driver\":\"file\",\"filename\":\"/x\"}}",
        "{\"driver\":\"raw\",\"node-name\":\"r\",\"file\":{\"driver\":\"file\",\"filename\":\"/x\"}}", NULL);
    qmp("BlockdevOptions", "{\"driver\":\"raw\",\"file\":\"f\"}",
        "{\"driver\":\"raw\",\"file\":\"f\"}", NULL);
    qmp("SocketAddressLegacy", "{\"type\":\"unix\",\"data\":{\"path\":\"/s\"}}",
        "{\"type\":\"unix\",\"data\":{\"path\":\"/s\"}}", NULL);
    qmp("NbdServerOptions", "{\"addr\":{\"type\":\"inet\",\"host\":\"h\",\"port\":\"1\",\"to\":5}}",
        "{\"addr\":{\"type\":\"inet\",\"host\":\"h\",\"port\":\"1\",\"to\":5}}", NULL);
    qmp("ObjectOptions",
        "{\"qom-type\":\"authz-list\",\"id\":\"a\",\"rules\":[{\"match\":\"m\",\"policy\":\"allow\"}]}",
        "{\"qom-type\":\"authz-list\",\"id\":\"a\",\"rules\":[{\"match\":\"m\",\"policy\":\"allow\"}]}", NULL);
    /* QEMU accepts a negative number for uint64 (it wraps) */
    qmp("BlockdevOptions", "{\"driver\":\"null-co\",\"latency-ns\":-1}",
        "{\"driver\":\"null-co\",\"latency-ns\":-1}", NULL);
}

static void test_qmp_errors(void **state)
{
    qmp("BlockExportOptions", "{\"type\":\"nbd\",\"id\":\"e\",\"node-name\":\"n\",\"writable\":\"x\"}",
        NULL, "Invalid parameter type for 'writable', expected: boolean");
    qmp("BlockExportOptions", "{\"type\":\"nbd\",\"id\":\"e\",\"node-name\":\"n\",\"foo\":1}",
        NULL, "Parameter 'foo' is unexpected");
    qmp("BlockExportOptions", "{\"type\":\"nbdx\",\"id\":\"e\",\"node-name\":\"n\"}",
        NULL, "Parameter 'type' does not accept value 'nbdx'");
    qmp("BlockExportOptions", "{\"id\":\"e\",\"node-name\":\"n\"}", NULL, "Parameter 'type' is missing");
    qmp("BlockExportOptions", "{\"type\":1,\"id\":\"e\"}", NULL,
        "Invalid parameter type for 'type', expected: string");
    qmp("SocketAddressLegacy", "{\"type\":\"unix\",\"data\":{}}", NULL, "Parameter 'data.path' is missing");
    qmp("SocketAddressLegacy", "{\"type\":\"unix\",\"data\":{\"path\":1}}", NULL,
        "Invalid parameter type for 'data.path', expected: string");
    qmp("SocketAddressLegacy", "{\"type\":\"unix\",\"data\":[]}", NULL,
        "Invalid parameter type for 'data', expected: object");
    qmp("SocketAddressLegacy", "{\"type\":\"inet\",\"data\":{\"host\":\"x\",\"port\":\"1\",\"numeric\":\"a\"}}",
        NULL, "Invalid parameter type for 'data.numeric', expected: boolean");
    /* sized integers name only the member, as QEMU does */
    qmp("SocketAddressLegacy", "{\"type\":\"inet\",\"data\":{\"host\":\"x\",\"port\":\"1\",\"to\":-1}}",
        NULL, "Parameter 'to' expects uint16_t");
    qmp("SocketAddressLegacy", "{\"type\":\"inet\",\"data\":{\"host\":\"x\",\"port\":\"1\",\"to\":1.5}}",
        NULL, "Parameter 'data.to' expects uint64");
    qmp("NbdServerOptions", "{\"addr\":{\"type\":\"unix\",\"path\":\"/s\"},\"max-connections\":4294967296}",
        NULL, "Parameter 'max-connections' expects uint32_t");
    qmp("NbdServerOptions", "{\"addr\":{\"type\":\"unix\",\"path\":\"/s\"},\"max-connections\":null}",
        NULL, "Parameter 'max-connections' expects uint64");
    qmp("BlockdevOptions", "{\"driver\":\"file\",\"filename\":\"/x\",\"cache\":{\"direct\":1}}",
        NULL, "Invalid parameter type for 'cache.direct', expected: boolean");
    qmp("BlockdevOptions", "{\"driver\":\"raw\",\"file\":1}", NULL,
        "Invalid parameter type for 'file', expected: BlockdevRef");
    qmp("BlockdevOptions", "{\"driver\":\"raw\",\"file\":null}", NULL,
        "Invalid parameter type for 'file', expected: BlockdevRef");
    qmp("BlockdevOptions", "{\"driver\":\"raw\",\"file\":{\"driver\":\"file\"}}", NULL,
        "Parameter 'file.filename' is missing");
    qmp("BlockdevOptions", "{\"driver\":\"vmdk\"}", NULL,
        "Parameter 'driver' does not accept value 'vmdk'");
    qmp("BlockdevOptions", "{\"driver\":\"null-co\",\"size\":\"1\"}", NULL,
        "Invalid parameter type for 'size', expected: integer");
    /* members are visited in schema order: a missing one beats an unexpected one */
    qmp("BlockdevOptions", "{\"driver\":\"file\",\"x\":1}", NULL, "Parameter 'filename' is missing");
    qmp("ObjectOptions", "{\"qom-type\":\"iothreadx\",\"id\":\"x\"}", NULL,
        "Parameter 'qom-type' does not accept value 'iothreadx'");
    qmp("ObjectOptions", "{\"qom-type\":\"authz-list\",\"id\":\"x\",\"rules\":[{\"match\":\"a\",\"policy\":\"x\"}]}",
        NULL, "Parameter 'policy' does not accept value 'x'");
    qmp("ObjectOptions", "{\"qom-type\":\"authz-list\",\"id\":\"x\",\"rules\":[{\"policy\":\"deny\"}]}",
        NULL, "Parameter 'rules[0].match' is missing");
    qmp("ObjectOptions", "{\"qom-type\":\"authz-list\",\"id\":\"x\",\"rules\":{}}", NULL,
        "Invalid parameter type for 'rules', expected: array");
}

static void test_commands(void **state)
{
    error *err = NULL;
    json_t *a = parse("{\"a\":1}");
    assert_null(schema_check_command("query-version", a, &err));
    assert_string_equal(err->msg, "Parameter 'a' is unexpected");
    error_free(err);
    err = NULL;
    json_decref(a);

    a = parse("{\"enable\":[\"oob\",\"x\"]}");
    assert_null(schema_check_command("qmp_capabilities", a, &err));
    assert_string_equal(err->msg, "Parameter 'null' does not accept value 'x'");
    error_free(err);
    err = NULL;
    json_decref(a);

    assert_null(schema_check_command("no-such", NULL, &err));
    assert_int_equal(err->cls, ERR_COMMAND_NOT_FOUND);
    assert_string_equal(err->msg, "The command no-such has not been found");
    error_free(err);
    err = NULL;

    json_t *r = schema_check_command("query-version", NULL, &err);
    assert_non_null(r);
    json_decref(r);
    assert_true(schema_command_exists("block-export-add"));
    assert_true(schema_command_exists("nbd-server-add"));
    assert_false(schema_command_exists("BlockExportOptions"));
}

static void test_keyval_mode(void **state)
{
    kv("BlockdevOptions", "driver", "null-co,node-name=n,size=0x10,read-only=on,latency-ns=5",
       "{\"driver\":\"null-co\",\"node-name\":\"n\",\"read-only\":true,\"size\":16,\"latency-ns\":5}", NULL);
    kv("BlockdevOptions", "driver", "file,filename=/x,cache.direct=yes,cache.no-flush=off",
       "{\"driver\":\"file\",\"filename\":\"/x\",\"cache\":{\"direct\":true,\"no-flush\":false}}", NULL);
    kv("BlockdevOptions", "driver", "raw,file=f",
       "{\"driver\":\"raw\",\"file\":\"f\"}", NULL);
    kv("BlockdevOptions", "driver", "raw,file.driver=null-co",
       "{\"driver\":\"raw\",\"file\":{\"driver\":\"null-co\"}}", NULL);
    kv("BlockExportOptions", "type", "vhost-user-blk,id=v,node-name=n,addr.type=unix,addr.path=/s,logical-block-size=4k",
       "{\"type\":\"vhost-user-blk\",\"id\":\"v\",\"node-name\":\"n\","
       "\"addr\":{\"type\":\"unix\",\"path\":\"/s\"},\"logical-block-size\":4096}", NULL);
    kv("ObjectOptions", "qom-type", "authz-list,id=a,rules.0.match=x,rules.0.policy=deny",
       "{\"qom-type\":\"authz-list\",\"id\":\"a\",\"rules\":[{\"match\":\"x\",\"policy\":\"deny\"}]}", NULL);
    kv("MonitorOptions", "chardev", "m,pretty=on", "{\"chardev\":\"m\",\"pretty\":true}", NULL);
}

static void test_keyval_mode_errors(void **state)
{
    kv("BlockdevOptions", "driver", "file", NULL, "Parameter 'filename' is missing");
    kv("BlockdevOptions", "driver", "driver", NULL, "Parameter 'driver' does not accept value 'driver'");
    kv("BlockdevOptions", "driver", "null-co,x_y=1", NULL, "Parameter 'x_y' is unexpected");
    kv("BlockdevOptions", "driver", "null-co,size=1Q", NULL, "Parameter 'size' expects integer");
    kv("BlockdevOptions", "driver", "null-co,size=", NULL, "Parameter 'size' expects integer");
    kv("BlockdevOptions", "driver", "null-co,read-only=maybe", NULL,
       "Parameter 'read-only' expects 'on' or 'off'");
    kv("BlockdevOptions", "driver", "null-co,cache.direct.x=1", NULL,
       "Parameters 'cache.direct.*' are unexpected");
    kv("BlockdevOptions", "driver", "null-co,latency-ns.0=1", NULL,
       "Parameters 'latency-ns.*' are unexpected");
    kv("BlockdevOptions", "driver", "null-co,cache=1", NULL,
       "Invalid parameter type for 'cache', expected: object");
    kv("BlockdevOptions", "driver", "raw,file.driver=xx", NULL,
       "Parameter 'driver' does not accept value 'xx'");
    kv("BlockdevOptions", "driver", "raw,file.driver=file", NULL, "Parameter 'file.filename' is missing");
    kv("ObjectOptions", "qom-type", "iothread", NULL, "Parameter 'id' is missing");
    kv("ObjectOptions", "qom-type", "iothread,id=x,aio-max-batch=a", NULL,
       "Parameter 'aio-max-batch' expects integer");
    kv("ObjectOptions", "qom-type", "authz-list,id=a,rules.0.policy=deny", NULL,
       "Parameter 'rules.0.match' is missing");
    kv("ObjectOptions", "qom-type", "authz-list,id=a,rules.0.match=x,rules.0.policy=y", NULL,
       "Parameter 'policy' does not accept value 'y'");
    kv("NbdServerOptions", NULL, "addr.type=unix", NULL, "Parameter 'addr.path' is missing");
    kv("NbdServerOptions", NULL, "addr.type=inet,addr.host=x,addr.port=1,addr.to=70000", NULL,
       "Parameter 'to' expects uint16_t");
    kv("NbdServerOptions", NULL, "addr.type=inet,addr.host=x,addr.port=1,max-connections=-1", NULL,
       "Parameter 'max-connections' expects uint32_t");
    kv("BlockExportOptions", "type", "vhost-user-blk,id=v,node-name=n,addr.type=unix,addr.path=/s,"
       "logical-block-size=1X", NULL, "Parameter 'logical-block-size' expects size");
    kv("MonitorOptions", "chardev", "m,foo=1", NULL, "Parameter 'foo' is unexpected");
    kv("MonitorOptions", "chardev", "m,mode=x", NULL, "Parameter 'mode' does not accept value 'x'");
}

static void test_introspect(void **state)
{
    json_t *s = schema_introspect();
    size_t i;
    json_t *e;
    bool saw_add = false, saw_deprecated = false, saw_event = false;
    json_array_foreach(s, i, e) {
        const char *name = json_string_value(json_object_get(e, "name"));
        const char *meta = json_string_value(json_object_get(e, "meta-type"));
        assert_non_null(name);
        assert_non_null(meta);
        if (!strcmp(name, "block-export-add") && !strcmp(meta, "command"))
            saw_add = true;
        if (!strcmp(name, "nbd-server-add")) {
            json_t *f = json_object_get(e, "features");
            saw_deprecated = f && !strcmp(json_string_value(json_array_get(f, 0)), "deprecated");
        }
        if (!strcmp(name, "BLOCK_EXPORT_DELETED") && !strcmp(meta, "event"))
            saw_event = true;
    }
    assert_true(saw_add);
    assert_true(saw_deprecated);
    assert_true(saw_event);
    json_decref(s);
}

/* Every command in the schema has a handler and every handler a schema
 * entry: introspection describes exactly what bexd runs, whatever is added. */
static void test_commands_match_handlers(void **state)
{
    json_t *s = schema_introspect();
    size_t i, n = 0;
    json_t *e;
    json_array_foreach(s, i, e) {
        const char *name = json_string_value(json_object_get(e, "name"));
        if (strcmp(json_string_value(json_object_get(e, "meta-type")), "command"))
            continue;
        n++;
        if (strcmp(name, "qmp_capabilities") && !qmp_find(name))
            fail_msg("schema command %s has no handler", name);
    }
    json_decref(s);
    size_t handlers = 1;           /* qmp_capabilities: the monitor's own */
    for (const struct qmp_cmd *c = qmp_first(); c; c = c->next, handlers++)
        if (!schema_command_exists(c->name))
            fail_msg("handler %s has no schema command", c->name);
    assert_int_equal(n, handlers);
}

static void test_dispatch(void **state)
{
    json_t *req = parse("{\"execute\":\"query-version\",\"id\":[1]}");
    json_t *rsp = qmp_dispatch(req, false);
    json_t *err = json_object_get(rsp, "error");
    assert_string_equal(json_string_value(json_object_get(err, "class")), "CommandNotFound");
    assert_string_equal(json_string_value(json_object_get(err, "desc")),
                        "Expecting capabilities negotiation with 'qmp_capabilities'");
    assert_true(json_equal(json_object_get(rsp, "id"), json_object_get(req, "id")));
    json_decref(rsp);
    rsp = qmp_dispatch(req, true);
    assert_string_equal(json_string_value(json_object_get(json_object_get(rsp, "return"), "package")),
                        "bexd");
    json_decref(rsp);
    json_decref(req);

    req = parse("{\"execute\":\"x\",\"bar\":1}");
    rsp = qmp_dispatch(req, true);
    assert_string_equal(json_string_value(json_object_get(json_object_get(rsp, "error"), "desc")),
                        "QMP input member 'bar' is unexpected");
    json_decref(rsp);
    json_decref(req);

    req = parse("{\"id\":5}");
    rsp = qmp_dispatch(req, true);
    assert_string_equal(json_string_value(json_object_get(json_object_get(rsp, "error"), "desc")),
                        "QMP input lacks member 'execute'");
    json_decref(rsp);
    json_decref(req);
}

/* Random JSON values against every type the commands use, in both modes:
 * an answer (value or error) every time, never a crash. */
static json_t *random_json(unsigned *seed, int depth)
{
    static const char *keys[] = { "driver", "node-name", "file", "type", "id", "addr",
                                  "path", "data", "host", "port", "to", "rules", "0",
                                  "match", "policy", "cache", "direct", "qom-type", "x" };
    static const char *strs[] = { "file", "raw", "null-co", "nbd", "unix", "inet", "fd",
                                  "authz-list", "iothread", "allow", "on", "1", "-1", "" };
    *seed = *seed * 1103515245 + 12345;
    unsigned r = (*seed >> 16) % (depth > 4 ? 5 : 8);
    switch (r) {
    case 0: return json_null();
    case 1: return json_boolean(*seed & 1);
    case 2: return json_integer((json_int_t)(*seed % 100000) - 50000);
    case 3: return json_real(1.5);
    case 4: return json_string(strs[(*seed >> 8) % ARRAY_SIZE(strs)]);
    case 5: {
        json_t *a = json_array();
        for (int i = (*seed >> 4) % 3; i > 0; i--)
            json_array_append_new(a, random_json(seed, depth + 1));
        return a;
    }
    default: {
        json_t *o = json_object();
        for (int i = (*seed >> 4) % 5; i > 0; i--)
            json_object_set_new(o, keys[(*seed >> 7) % ARRAY_SIZE(keys)],
                                random_json(seed, depth + 1));
        return o;
    }
    }
}

static void test_random_values(void **state)
{
    static const char *types[] = { "BlockdevOptions", "BlockExportOptions", "ObjectOptions",
                                   "SocketAddress", "SocketAddressLegacy", "NbdServerOptions",
                                   "MonitorOptions" };
    unsigned seed = 4242;
    int accepted = 0, refused = 0;
    for (int i = 0; i < 20000; i++) {
        json_t *v = random_json(&seed, 0);
        const char *type = types[i % ARRAY_SIZE(types)];
        for (int keyval = 0; keyval < 2; keyval++) {
            error *err = NULL;
            json_t *r = schema_check_type(type, v, keyval, "", &err);
            assert_true((r != NULL) != (err != NULL));
            if (r) {
                /* what was accepted is a value of the type: checked again
                 * (as JSON) it is accepted unchanged */
                error *err2 = NULL;
                json_t *again = schema_check_type(type, r, false, "", &err2);
                if (!again)
                    fail_msg("%s: %s accepted as %s, which is refused: %s", type,
                             json_dumps(v, JSON_COMPACT), json_dumps(r, JSON_COMPACT),
                             err2->msg);
                assert_true(json_equal(again, r));
                json_decref(again);
                accepted++;
            } else {
                assert_true(err->msg && err->msg[0]);
                refused++;
            }
            json_decref(r);
            error_free(err);
        }
        json_decref(v);
    }
    assert_true(accepted > 0 && refused > 0);
    /* most random values are refused at once: valid values with a random
     * change reach deeper, and more of them are accepted */
    static const char *const valid[][2] = {
        { "SocketAddress", "{\"type\":\"unix\",\"path\":\"/x\"}" },
        { "SocketAddress", "{\"type\":\"inet\",\"host\":\"h\",\"port\":\"1\"}" },
        { "BlockdevOptions", "{\"driver\":\"null-co\",\"node-name\":\"n\"}" },
        { "BlockdevOptions", "{\"driver\":\"raw\",\"node-name\":\"r\",\"file\":\"f\"}" },
        { "BlockExportOptions", "{\"type\":\"nbd\",\"id\":\"e\",\"node-name\":\"n\"}" },
        { "ObjectOptions", "{\"qom-type\":\"iothread\",\"id\":\"io\"}" },
        { "NbdServerOptions", "{\"addr\":{\"type\":\"unix\",\"path\":\"/x\"}}" },
    };
    int mutated_ok = 0;
    for (int i = 0; i < 5000; i++) {
        const char *type = valid[i % ARRAY_SIZE(valid)][0];
        json_t *v = json_loads(valid[i % ARRAY_SIZE(valid)][1], 0, NULL);
        error *err = NULL;
        json_t *r = schema_check_type(type, v, false, "", &err);
        assert_non_null(r);                 /* the unchanged value is valid */
        json_decref(r);
        seed = seed * 1103515245 + 12345;
        const char *keys[] = { "path", "host", "port", "node-name", "id", "file", "x",
                               "read-only", "cache", "writable", "tls-creds", "size" };
        const char *k = keys[(seed >> 16) % ARRAY_SIZE(keys)];
        if (seed & 1)
            json_object_del(v, k);
        else
            json_object_set_new(v, k, random_json(&seed, 3));
        r = schema_check_type(type, v, false, "", &err);
        assert_true((r != NULL) != (err != NULL));
        if (r) {
            json_t *again = schema_check_type(type, r, false, "", NULL);
            assert_non_null(again);
            assert_true(json_equal(again, r));
            json_decref(again);
            mutated_ok++;
        }
        json_decref(r);
        error_free(err);
        json_decref(v);
    }
    assert_true(mutated_ok > 500);
    print_message("schema: %d random values accepted, %d refused; %d of 5000 changed valid "
                  "values accepted\n", accepted, refused, mutated_ok);
}

static int setup(void **state)
{
    schema_init();
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_qmp_good),
        cmocka_unit_test(test_qmp_errors),
        cmocka_unit_test(test_commands),
        cmocka_unit_test(test_keyval_mode),
        cmocka_unit_test(test_keyval_mode_errors),
        cmocka_unit_test(test_introspect),
        cmocka_unit_test(test_commands_match_handlers),
        cmocka_unit_test(test_dispatch),
        cmocka_unit_test(test_random_values),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
