/*
 * libFuzzer target: a QMP monitor's input.  The bytes go through the
 * QEMU-compatible JSON stream reader in pieces (the first byte sets the
 * piece size, as a socket would cut them); every value is checked by the
 * schema checker for the command it names and dispatched by the real
 * dispatcher (negotiation, id echo, errors) when the command has no side
 * effect outside the process (queries, and nodes of the null-co driver).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "block/block.h"
#include "qmp/qmp.h"
#include "qmp/qmp-int.h"
#include "qmp/schema.h"
#include "util/json-stream.h"
#include "util/loop.h"

static const char *const safe[] = {
    "qmp_capabilities", "query-version", "query-commands", "query-block-exports",
    "query-named-block-nodes", "query-iothreads", "query-block", "blockdev-del",
    "qom-list", "qom-get", "qom-list-types", "qom-list-properties",
    "x-debug-query-block-graph", "query-chardev", "query-chardev-backends",
    NULL,
};

static bool is_safe(const char *cmd, json_t *args)
{
    for (int i = 0; safe[i]; i++)
        if (!strcmp(cmd, safe[i]))
            return true;
    if (!strcmp(cmd, "blockdev-add")) {
        const char *drv = json_string_value(json_object_get(args, "driver"));
        return drv && !strcmp(drv, "null-co");
    }
    return false;
}

static void on_value(void *opaque, json_t *value, error *err)
{
    struct qmp_session *s = opaque;
    error *e = NULL;

    error_free(err);
    if (!value)
        return;
    const char *cmd = json_string_value(json_object_get(value, "execute"));
    json_t *args = json_object_get(value, "arguments");
    if (cmd && schema_command_exists(cmd)) {
        json_t *checked = schema_check_command(cmd, args, &e);
        json_decref(checked);
        error_free(e);
    }
    if (!cmd || is_safe(cmd, args)) {
        json_t *rsp = qmp_dispatch_session(value, s, NULL, NULL, NULL);
        json_decref(rsp);
    }
    json_decref(value);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int init;
    struct qmp_session s = { .oob_offered = true };

    if (!init) {
        loop_main_init();
        schema_init();
        init = 1;
    }
    if (size < 1)
        return 0;
    size_t piece = 1 + data[0] % 64;
    struct json_stream *js = json_stream_new(on_value, &s);
    for (size_t off = 1; off < size; off += piece)
        json_stream_feed(js, (const char *)data + off, size - off < piece ? size - off : piece);
    json_stream_flush(js);
    json_stream_free(js);
    block_close_all();            /* forget the nodes this input made */
    return 0;
}
