/* QAPI definitions of the job framework (QEMU 7.2 qapi/job.json) and of
 * blockdev-create (qapi/block-core.json: the drivers bexd can create). */
#include "qmp/schema-int.h"

static const char text[] =
    "{ 'enum': 'JobType',\n"
    "  'data': [ 'commit', 'stream', 'mirror', 'backup', 'create', 'amend',\n"
    "            'snapshot-load', 'snapshot-save', 'snapshot-delete' ] }\n"
    "{ 'enum': 'JobStatus',\n"
    "  'data': [ 'undefined', 'created', 'running', 'paused', 'ready', 'standby',\n"
    "            'waiting', 'pending', 'aborting', 'concluded', 'null' ] }\n"
    "{ 'event': 'JOB_STATUS_CHANGE',\n"
    "  'data': { 'id': 'str', 'status': 'JobStatus' } }\n"
    "{ 'command': 'job-pause', 'data': { 'id': 'str' } }\n"
    "{ 'command': 'job-resume', 'data': { 'id': 'str' } }\n"
    "{ 'command': 'job-cancel', 'data': { 'id': 'str' } }\n"
    "{ 'command': 'job-complete', 'data': { 'id': 'str' } }\n"
    "{ 'command': 'job-dismiss', 'data': { 'id': 'str' } }\n"
    "{ 'command': 'job-finalize', 'data': { 'id': 'str' } }\n"
    "{ 'struct': 'JobInfo',\n"
    "  'data': { 'id': 'str', 'type': 'JobType', 'status': 'JobStatus',\n"
    "            'current-progress': 'int', 'total-progress': 'int',\n"
    "            '*error': 'str' } }\n"
    "{ 'command': 'query-jobs', 'returns': ['JobInfo'] }\n"
    /* blockdev-create */
    "{ 'enum': 'PreallocMode', 'data': [ 'off', 'metadata', 'falloc', 'full' ] }\n"
    "{ 'struct': 'BlockdevCreateOptionsFile',\n"
    "  'data': { 'filename': 'str', 'size': 'size', '*preallocation': 'PreallocMode',\n"
    "            '*nocow': 'bool', '*extent-size-hint': 'size' } }\n"
    "{ 'union': 'BlockdevCreateOptions',\n"
    "  'base': { 'driver': 'BlockdevDriver' },\n"
    "  'discriminator': 'driver',\n"
    "  'data': { 'file': 'BlockdevCreateOptionsFile' } }\n"
    "{ 'command': 'blockdev-create',\n"
    "  'data': { 'job-id': 'str', 'options': 'BlockdevCreateOptions' } }\n";
SCHEMA_SOURCE(job, text)
