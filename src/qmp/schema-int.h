/* Schema sources: each src/qmp/schema-*.c holds QAPI definitions as one C
 * string and registers it; schema_init() parses them all in order. */
#pragma once

struct schema_source {
    const char *name;
    const char *text;
    struct schema_source *next;
};

void schema_source_register(struct schema_source *src);

#define SCHEMA_SOURCE(id, str)                                               \
    static struct schema_source schema_src_##id = { .name = #id, .text = str }; \
    __attribute__((constructor)) static void schema_src_register_##id(void) \
    { schema_source_register(&schema_src_##id); }
