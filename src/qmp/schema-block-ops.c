/* QAPI definitions of operations on live nodes (QEMU 7.2
 * qapi/block-core.json): block_resize. */
#include "qmp/schema-int.h"

static const char text[] =
    "{ 'command': 'block_resize',\n"
    "  'data': { '*device': 'str', '*node-name': 'str', 'size': 'int' },\n"
    "  'allow-preconfig': true }\n";
SCHEMA_SOURCE(block_ops, text)
