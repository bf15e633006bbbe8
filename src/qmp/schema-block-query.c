/* QAPI definitions of the block queries that describe the graph as a whole
 * (QEMU 7.2 qapi/block-core.json): query-block, x-debug-query-block-graph. */
#include "qmp/schema-int.h"

static const char text[] =
    "{ 'enum': 'BlockDeviceIoStatus', 'data': [ 'ok', 'failed', 'nospace' ] }\n"
    "{ 'struct': 'BlockInfo',\n"
    "  'data': { 'device': 'str', '*qdev': 'str', 'type': 'str', 'removable': 'bool',\n"
    "            'locked': 'bool', '*inserted': 'BlockDeviceInfo',\n"
    "            '*tray_open': 'bool', '*io-status': 'BlockDeviceIoStatus' } }\n"
    "{ 'command': 'query-block', 'returns': ['BlockInfo'], 'allow-preconfig': true }\n"
    "{ 'enum': 'XDbgBlockGraphNodeType',\n"
    "  'data': [ 'block-backend', 'block-job', 'block-driver' ] }\n"
    "{ 'struct': 'XDbgBlockGraphNode',\n"
    "  'data': { 'id': 'uint64', 'type': 'XDbgBlockGraphNodeType', 'name': 'str' } }\n"
    "{ 'enum': 'BlockPermission',\n"
    "  'data': [ 'consistent-read', 'write', 'write-unchanged', 'resize' ] }\n"
    "{ 'struct': 'XDbgBlockGraphEdge',\n"
    "  'data': { 'parent': 'uint64', 'child': 'uint64', 'name': 'str',\n"
    "            'perm': [ 'BlockPermission' ], 'shared-perm': [ 'BlockPermission' ] } }\n"
    "{ 'struct': 'XDbgBlockGraph',\n"
    "  'data': { 'nodes': ['XDbgBlockGraphNode'], 'edges': ['XDbgBlockGraphEdge'] } }\n"
    "{ 'command': 'x-debug-query-block-graph', 'returns': 'XDbgBlockGraph',\n"
    "  'features': [ 'unstable' ], 'allow-preconfig': true }\n";
SCHEMA_SOURCE(block_query, text)
