/* QAPI definitions of operations on live nodes (QEMU 7.2
 * qapi/block-core.json): block_resize, block-set-write-threshold,
 * x-blockdev-set-iothread, blockdev-snapshot(-sync). */
#include "qmp/schema-int.h"

static const char text[] =
    "{ 'struct': 'BlockdevSnapshot', 'data': { 'node': 'str', 'overlay': 'str' } }\n"
    "{ 'command': 'blockdev-snapshot', 'data': 'BlockdevSnapshot', 'allow-preconfig': true }\n"
    "{ 'enum': 'NewImageMode', 'data': [ 'existing', 'absolute-paths' ] }\n"
    "{ 'struct': 'BlockdevSnapshotSync',\n"
    "  'data': { '*device': 'str', '*node-name': 'str', 'snapshot-file': 'str',\n"
    "            '*snapshot-node-name': 'str', '*format': 'str', '*mode': 'NewImageMode' } }\n"
    "{ 'command': 'blockdev-snapshot-sync', 'data': 'BlockdevSnapshotSync',\n"
    "  'allow-preconfig': true }\n"
    "{ 'command': 'block_resize',\n"
    "  'data': { '*device': 'str', '*node-name': 'str', 'size': 'int' },\n"
    "  'allow-preconfig': true }\n"
    "{ 'command': 'block-set-write-threshold',\n"
    "  'data': { 'node-name': 'str', 'write-threshold': 'uint64' },\n"
    "  'allow-preconfig': true }\n"
    "{ 'alternate': 'StrOrNull', 'data': { 's': 'str', 'n': 'null' } }\n"
    "{ 'command': 'x-blockdev-set-iothread',\n"
    "  'data': { 'node-name': 'str', 'iothread': 'StrOrNull', '*force': 'bool' },\n"
    "  'features': [ 'unstable' ], 'allow-preconfig': true }\n"
    "{ 'event': 'BLOCK_WRITE_THRESHOLD',\n"
    "  'data': { 'node-name': 'str', 'amount-exceeded': 'uint64',\n"
    "            'write-threshold': 'uint64' } }\n";
SCHEMA_SOURCE(block_ops, text)
