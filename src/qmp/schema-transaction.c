/* QAPI definitions of `transaction` (QEMU 7.2 qapi/transaction.json), with
 * the action kinds bexd implements; their data types are defined with
 * their commands. */
#include "qmp/schema-int.h"

static const char text[] =
    "{ 'struct': 'Abort', 'data': { } }\n"
    "{ 'enum': 'ActionCompletionMode', 'data': [ 'individual', 'grouped' ] }\n"
    "{ 'enum': 'TransactionActionKind',\n"
    "  'data': [ 'abort', 'block-dirty-bitmap-add', 'block-dirty-bitmap-remove',\n"
    "            'block-dirty-bitmap-clear', 'block-dirty-bitmap-enable',\n"
    "            'block-dirty-bitmap-disable', 'block-dirty-bitmap-merge',\n"
    "            'blockdev-backup', 'blockdev-snapshot' ] }\n"
    "{ 'struct': 'AbortWrapper', 'data': { 'data': 'Abort' } }\n"
    "{ 'struct': 'BlockDirtyBitmapAddWrapper', 'data': { 'data': 'BlockDirtyBitmapAdd' } }\n"
    "{ 'struct': 'BlockDirtyBitmapWrapper', 'data': { 'data': 'BlockDirtyBitmap' } }\n"
    "{ 'struct': 'BlockDirtyBitmapMergeWrapper',\n"
    "  'data': { 'data': 'BlockDirtyBitmapMerge' } }\n"
    "{ 'struct': 'BlockdevBackupWrapper', 'data': { 'data': 'BlockdevBackup' } }\n"
    "{ 'struct': 'BlockdevSnapshotWrapper', 'data': { 'data': 'BlockdevSnapshot' } }\n"
    "{ 'union': 'TransactionAction',\n"
    "  'base': { 'type': 'TransactionActionKind' },\n"
    "  'discriminator': 'type',\n"
    "  'data': { 'abort': 'AbortWrapper',\n"
    "            'block-dirty-bitmap-add': 'BlockDirtyBitmapAddWrapper',\n"
    "            'block-dirty-bitmap-remove': 'BlockDirtyBitmapWrapper',\n"
    "            'block-dirty-bitmap-clear': 'BlockDirtyBitmapWrapper',\n"
    "            'block-dirty-bitmap-enable': 'BlockDirtyBitmapWrapper',\n"
    "            'block-dirty-bitmap-disable': 'BlockDirtyBitmapWrapper',\n"
    "            'block-dirty-bitmap-merge': 'BlockDirtyBitmapMergeWrapper',\n"
    "            'blockdev-backup': 'BlockdevBackupWrapper',\n"
    "            'blockdev-snapshot': 'BlockdevSnapshotWrapper' } }\n"
    "{ 'struct': 'TransactionProperties',\n"
    "  'data': { '*completion-mode': 'ActionCompletionMode' } }\n"
    "{ 'command': 'transaction',\n"
    "  'data': { 'actions': [ 'TransactionAction' ],\n"
    "            '*properties': 'TransactionProperties' } }\n";
SCHEMA_SOURCE(transaction, text)
