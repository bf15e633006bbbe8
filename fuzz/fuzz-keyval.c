/*
 * libFuzzer target: the command line's option parsing.  An input is one
 * option argument (keyval "a=b,c.d=e" or JSON "{...}"); its first byte
 * picks which option it is given to, and it goes through the same steps
 * as bexd's --blockdev / --export / --nbd-server / --object / --chardev:
 * keyval_or_json_parse(), then the schema checker in keyval mode.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "qmp/schema.h"
#include "util/keyval.h"

static const struct { const char *implied, *type; } opts[] = {
    { "driver", "BlockdevOptions" },
    { "type", "BlockExportOptions" },
    { NULL, "NbdServerOptions" },
    { "qom-type", "ObjectOptions" },
    { "backend", NULL },
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int init;
    error *err = NULL;

    if (!init) {
        schema_init();
        init = 1;
    }
    if (size < 1)
        return 0;
    unsigned which = data[0] % (sizeof(opts) / sizeof(opts[0]));
    char *arg = strndup((const char *)data + 1, size - 1);
    bool is_json = false;
    json_t *v = keyval_or_json_parse(arg, opts[which].implied, &is_json, &err);
    if (v && opts[which].type) {
        json_t *checked = schema_check_type(opts[which].type, v, !is_json, "", &err);
        json_decref(checked);
    }
    json_decref(v);
    error_free(err);
    free(arg);
    return 0;
}
