/* QAPI definitions of dirty bitmaps (QEMU 7.2 qapi/block-core.json);
 * BlockDirtyBitmap, BlockDirtyBitmapOrStr and BlockDirtyInfo are in
 * schema-block-core.c with the types that use them. */
#include "qmp/schema-int.h"

static const char text[] =
    "{ 'struct': 'BlockDirtyBitmapAdd',\n"
    "  'data': { 'node': 'str', 'name': 'str', '*granularity': 'uint32',\n"
    "            '*persistent': 'bool', '*disabled': 'bool' } }\n"
    "{ 'struct': 'BlockDirtyBitmapMerge',\n"
    "  'data': { 'node': 'str', 'target': 'str',\n"
    "            'bitmaps': ['BlockDirtyBitmapOrStr'] } }\n"
    "{ 'command': 'block-dirty-bitmap-add', 'data': 'BlockDirtyBitmapAdd',\n"
    "  'allow-preconfig': true }\n"
    "{ 'command': 'block-dirty-bitmap-remove', 'data': 'BlockDirtyBitmap',\n"
    "  'allow-preconfig': true }\n"
    "{ 'command': 'block-dirty-bitmap-clear', 'data': 'BlockDirtyBitmap',\n"
    "  'allow-preconfig': true }\n"
    "{ 'command': 'block-dirty-bitmap-enable', 'data': 'BlockDirtyBitmap',\n"
    "  'allow-preconfig': true }\n"
    "{ 'command': 'block-dirty-bitmap-disable', 'data': 'BlockDirtyBitmap',\n"
    "  'allow-preconfig': true }\n"
    "{ 'command': 'block-dirty-bitmap-merge', 'data': 'BlockDirtyBitmapMerge',\n"
    "  'allow-preconfig': true }\n"
    "{ 'struct': 'BlockDirtyBitmapSha256', 'data': { 'sha256': 'str' } }\n"
    "{ 'command': 'x-debug-block-dirty-bitmap-sha256',\n"
    "  'data': 'BlockDirtyBitmap', 'returns': 'BlockDirtyBitmapSha256',\n"
    "  'features': [ 'unstable' ], 'allow-preconfig': true }\n"
    /* the fleecing filter (block/cbw.c); snapshot-access takes GenericFormat */
    "{ 'enum': 'OnCbwError', 'data': [ 'break-guest-write', 'break-snapshot' ] }\n"
    "{ 'struct': 'BlockdevOptionsCbw',\n"
    "  'base': 'BlockdevOptionsGenericFormat',\n"
    "  'data': { 'target': 'BlockdevRef', '*bitmap': 'BlockDirtyBitmap',\n"
    "            '*on-cbw-error': 'OnCbwError', '*cbw-timeout': 'uint32' } }\n";
SCHEMA_SOURCE(bitmaps, text)
