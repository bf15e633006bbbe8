/* QAPI definitions of the monitor itself (QEMU 7.2 qapi/control.json,
 * introspect.json, and query-version from misc.json). */
#include "qmp/schema-int.h"

static const char text[] =
    "{ 'enum': 'QMPCapability', 'data': [ 'oob' ] }\n"
    "{ 'command': 'qmp_capabilities',\n"
    "  'data': { '*enable': [ 'QMPCapability' ] }, 'allow-preconfig': true }\n"
    "{ 'struct': 'VersionTriple',\n"
    "  'data': { 'major': 'int', 'minor': 'int', 'micro': 'int' } }\n"
    "{ 'struct': 'VersionInfo',\n"
    "  'data': { 'qemu': 'VersionTriple', 'package': 'str' } }\n"
    "{ 'command': 'query-version', 'returns': 'VersionInfo',\n"
    "  'allow-preconfig': true }\n"
    "{ 'struct': 'CommandInfo', 'data': { 'name': 'str' } }\n"
    "{ 'command': 'query-commands', 'returns': [ 'CommandInfo' ],\n"
    "  'allow-preconfig': true }\n"
    "{ 'command': 'quit', 'allow-preconfig': true }\n"
    "{ 'enum': 'MonitorMode', 'data': [ 'readline', 'control' ] }\n"
    "{ 'struct': 'MonitorOptions',\n"
    "  'data': { '*id': 'str', '*mode': 'MonitorMode', '*pretty': 'bool',\n"
    "            'chardev': 'str' } }\n"
    "{ 'enum': 'SchemaMetaType',\n"
    "  'data': [ 'builtin', 'enum', 'array', 'object', 'alternate', 'command', 'event' ] }\n"
    "{ 'struct': 'SchemaInfo',\n"
    "  'data': { 'name': 'str', 'meta-type': 'SchemaMetaType', '*features': [ 'str' ] } }\n"
    "{ 'command': 'query-qmp-schema', 'returns': [ 'SchemaInfo' ],\n"
    "  'allow-preconfig': true }\n";
SCHEMA_SOURCE(control, text)
