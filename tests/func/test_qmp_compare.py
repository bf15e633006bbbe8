"""The same QMP session against bexd and qemu-storage-daemon, answer by answer.

Each scenario is a list of commands run in order on a fresh daemon of each
kind; the replies (return values or error class and message) and the events
that arrive with them must be the same.  Paths and event timestamps are the
only things normalised.
"""
import json
import os

import pytest

from conftest import QSD

pytestmark = pytest.mark.skipif(not QSD, reason="qemu-storage-daemon not installed")


def session(start_daemon, impl, tmp, commands):
    d = start_daemon(impl)
    q = d.qmp()
    out = []
    for cmd in commands:
        cmd = json.loads(json.dumps(cmd).replace("@TMP@", tmp))
        resp = q.request(cmd["execute"], cmd.get("arguments"))
        # events emitted while the command ran come before its reply
        evs = [(e["event"], e.get("data")) for e in q.events]
        q.events.clear()
        resp.pop("id", None)
        out.append((cmd["execute"], resp, evs))
    d.stop()
    return out


def compare(start_daemon, tmpdir_short, commands):
    res = {}
    for impl in ("bexd", "qsd"):
        tmp = os.path.join(tmpdir_short, impl)
        os.mkdir(tmp)
        with open(os.path.join(tmp, "img"), "wb") as f:
            f.truncate(64 << 20)
        open(os.path.join(tmp, "mnt"), "w").close()
        res[impl] = json.loads(json.dumps(session(start_daemon, impl, tmp, commands))
                               .replace(tmp, "@TMP@"))
    for b, q in zip(res["bexd"], res["qsd"]):
        assert b == q


BLOCK = [
    {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f0",
                                               "filename": "@TMP@/img"}},
    {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r0", "file": "f0",
                                               "offset": 1048576}},
    {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r1", "file": "f0",
                                               "offset": 1048576, "size": 67108864}},
    {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f1",
                                               "filename": "@TMP@/img", "aio": "native"}},
    {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f2",
                                               "filename": "@TMP@/img", "detect-zeroes": "unmap"}},
    {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f3",
                                               "filename": "@TMP@/nonexistent"}},
    {"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "@TMP@/img"}},
    {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "1x",
                                               "filename": "@TMP@/img"}},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0", "size": "x"}},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0", "bogus": 1}},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0",
                                               "read-zeroes": True}},
    {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r2", "file": "zz"}},
    {"execute": "blockdev-del", "arguments": {"node-name": "r0"}},
    {"execute": "blockdev-del", "arguments": {"node-name": "f0"}},
    {"execute": "blockdev-del", "arguments": {"node-name": "zz"}},
    {"execute": "blockdev-del", "arguments": {}},
]

EXPORTS = [
    {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f0",
                                               "filename": "@TMP@/img"}},
    {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "ro",
                                               "filename": "@TMP@/img", "read-only": True}},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "n0", "node-name": "f0"}},
    {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix",
                                                           "data": {"path": "@TMP@/nbd.sock"}}}},
    {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix",
                                                           "data": {"path": "@TMP@/nbd.sock"}}}},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "n0", "node-name": "f0",
                                                   "name": "x", "description": "d",
                                                   "writable": True}},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "n1", "node-name": "ro",
                                                   "writable": True}},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "n1", "node-name": "ro"}},
    {"execute": "query-block-exports"},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "b0", "node-name": "f0",
                                                   "bitmaps": [{"node": "zz", "name": "b"}]}},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "b0", "node-name": "f0",
                                                   "bitmaps": [{"node": "f0", "name": "b"}]}},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "b0", "node-name": "f0",
                                                   "bitmaps": ["b"]}},
    {"execute": "nbd-server-add", "arguments": {"device": "f0", "name": "b0", "bitmap": "b"}},
    {"execute": "block-export-add", "arguments": {"type": "vhost-user-blk", "id": "v0",
                                                   "node-name": "f0",
                                                   "addr": {"type": "unix",
                                                            "path": "@TMP@/vu.sock"}}},
    {"execute": "block-export-add", "arguments": {"type": "vhost-user-blk", "id": "v1",
                                                   "node-name": "f0", "num-queues": 0,
                                                   "addr": {"type": "unix",
                                                            "path": "@TMP@/vu1.sock"}}},
    {"execute": "block-export-add", "arguments": {"type": "vhost-user-blk", "id": "v1",
                                                   "node-name": "f0", "logical-block-size": 1000,
                                                   "addr": {"type": "unix",
                                                            "path": "@TMP@/vu1.sock"}}},
    {"execute": "block-export-add", "arguments": {"type": "fuse", "id": "u0", "node-name": "f0",
                                                   "mountpoint": "@TMP@/mnt", "writable": True}},
    {"execute": "block-export-add", "arguments": {"type": "fuse", "id": "u1", "node-name": "f0",
                                                   "mountpoint": "@TMP@"}},
    {"execute": "query-block-exports"},
    {"execute": "blockdev-del", "arguments": {"node-name": "f0"}},
    {"execute": "block-export-del", "arguments": {"id": "u0"}},
    {"execute": "block-export-del", "arguments": {"id": "u0"}},
    {"execute": "block-export-del", "arguments": {"id": "v0", "mode": "hard"}},
    {"execute": "block-export-del", "arguments": {"id": "n0", "mode": "bogus"}},
    {"execute": "nbd-server-remove", "arguments": {"name": "n1"}},
    {"execute": "nbd-server-add", "arguments": {"device": "f0", "name": "legacy"}},
    {"execute": "nbd-server-stop"},
    {"execute": "nbd-server-stop"},
    {"execute": "query-block-exports"},
    {"execute": "blockdev-del", "arguments": {"node-name": "f0"}},
]

OBJECTS = [
    {"execute": "object-add", "arguments": {"qom-type": "iothread", "id": "io0",
                                             "poll-max-ns": -1}},
    {"execute": "object-add", "arguments": {"qom-type": "iothread", "id": "io1"}},
    {"execute": "object-add", "arguments": {"qom-type": "iothread", "id": "io1"}},
    {"execute": "object-add", "arguments": {"qom-type": "iothread", "id": "1bad"}},
    {"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s0", "data": "abc"}},
    {"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", "id": "t0",
                                             "dir": "@TMP@/nonexistent"}},
    {"execute": "object-add", "arguments": {"qom-type": "nope", "id": "x"}},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0"}},
    {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix",
                                                           "data": {"path": "@TMP@/nbd.sock"}},
                                                  "tls-creds": "s0"}},
    {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix",
                                                           "data": {"path": "@TMP@/nbd.sock"}},
                                                  "tls-creds": "none"}},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "n0",
                                                   "iothread": "nope"}},
    {"execute": "object-del", "arguments": {"id": "s0"}},
    {"execute": "object-del", "arguments": {"id": "s0"}},
    {"execute": "object-del", "arguments": {"id": "io1"}},
]

# Found by a random differential run (commands drawn from the schema, the
# same ones sent to both daemons): the order QEMU checks things in, the
# deprecated read-only "loaded", and the main-loop object.
ORDER = [
    # the node is looked up and its permissions taken before the server is
    # asked for
    {"execute": "nbd-server-add", "arguments": {"device": "nope"}},
    {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f0",
                                               "filename": "@TMP@/img"}},
    {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r0", "file": "f0"}},
    {"execute": "nbd-server-add", "arguments": {"device": "f0", "writable": True}},
    {"execute": "nbd-server-add", "arguments": {"device": "r0", "writable": True}},
    # QEMU listens, then looks the credentials up (and closes the socket)
    {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix",
                                                           "data": {"path": "@TMP@/n.sock"}},
                                                  "tls-creds": "nope"}},
    {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix",
                                                           "data": {"path": "/nonexistent/n"}},
                                                  "tls-creds": "nope"}},
    {"execute": "object-add", "arguments": {"qom-type": "tls-creds-anon", "id": "a0",
                                             "loaded": True}},
    {"execute": "object-add", "arguments": {"qom-type": "tls-creds-psk", "id": "p0",
                                             "loaded": False, "dir": "@TMP@/nonexistent"}},
    {"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s0", "data": "x",
                                             "loaded": True}},
    {"execute": "object-add", "arguments": {"qom-type": "main-loop", "id": "m0",
                                             "aio-max-batch": -1}},
    {"execute": "object-add", "arguments": {"qom-type": "main-loop", "id": "m0",
                                             "thread-pool-min": 3, "thread-pool-max": 2}},
    {"execute": "object-add", "arguments": {"qom-type": "main-loop", "id": "m0",
                                             "thread-pool-max": 8, "aio-max-batch": 4}},
    {"execute": "qom-get", "arguments": {"path": "/objects/m0", "property": "thread-pool-max"}},
    {"execute": "qom-get", "arguments": {"path": "/objects/m0", "property": "thread-pool-min"}},
    {"execute": "qom-list", "arguments": {"path": "/objects/m0"}},
    {"execute": "qom-set", "arguments": {"path": "/objects/m0", "property": "aio-max-batch",
                                          "value": 16}},
    {"execute": "qom-get", "arguments": {"path": "/objects/m0", "property": "aio-max-batch"}},
    {"execute": "object-add", "arguments": {"qom-type": "main-loop", "id": "m1"}},
    {"execute": "object-add", "arguments": {"qom-type": "main-loop", "id": "m0"}},
    {"execute": "object-del", "arguments": {"id": "m0"}},
    {"execute": "qom-list-properties", "arguments": {"typename": "main-loop"}},
    # the file is opened before aio=native is checked; a pr-manager must exist
    {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "n1",
                                               "filename": "@TMP@/nonexistent", "aio": "native"}},
    {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "n1",
                                               "filename": "@TMP@/img", "aio": "native"}},
    {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "n1",
                                               "filename": "@TMP@/nonexistent", "pr-manager": "x"}},
    {"execute": "blockdev-add", "arguments": {"driver": "host_device", "node-name": "n1",
                                               "filename": "@TMP@/img", "pr-manager": "x"}},
    # blkdebug reads its options' types, its config file and its rules
    # before it opens its image (the types in QEMU's walk of the options)
    {"execute": "blockdev-add", "arguments": {"driver": "blkdebug", "node-name": "d0",
                                               "image": "nope", "config": "/nonexistent"}},
    {"execute": "blockdev-add", "arguments": {"driver": "blkdebug", "node-name": "d0",
                                               "image": "nope", "max-discard": -1,
                                               "align": -1, "max-transfer": -1}},
    {"execute": "blockdev-add", "arguments": {"driver": "blkdebug", "node-name": "d0",
                                               "image": "nope", "align": 3}},
    # a PSK server looks for its dh-params.pem before its keys.psk
    {"execute": "object-add", "arguments": {"qom-type": "tls-creds-psk", "id": "k0",
                                             "dir": "@TMP@/img", "endpoint": "server"}},
    # a file name is required before the node's name is looked at
    {"execute": "blockdev-add", "arguments": {"driver": "host_device", "node-name": "f0",
                                               "filename": ""}},
    # a chardev's log file is created before its backend's checks
    {"execute": "chardev-add", "arguments": {"id": "c0", "backend": {
        "type": "ringbuf", "data": {"logfile": "", "size": 7}}}},
    {"execute": "chardev-add", "arguments": {"id": "c0", "backend": {
        "type": "ringbuf", "data": {"logfile": "@TMP@/c0.log", "size": 7}}}},
    # an empty object is an option no driver takes, found once the node is open
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n1",
                                               "cache": {}}},
    {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "n1", "file": "f0",
                                               "cache": {}}},
    {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "f0", "file": "f0",
                                               "cache": {}}},
    # the port is cut to 32 characters; no host and no port resolve to nothing
    {"execute": "nbd-server-start", "arguments": {"addr": {"type": "inet", "data": {
        "host": "localhost", "port": "p" * 40}}}},
    {"execute": "nbd-server-start", "arguments": {"addr": {"type": "inet", "data": {
        "host": "", "port": ""}}, "tls-creds": "nope"}},
]


@pytest.mark.parametrize("commands", [BLOCK, EXPORTS, OBJECTS, ORDER],
                         ids=["block", "exports", "objects", "order"])
def test_same_session(start_daemon, tmpdir_short, commands):
    compare(start_daemon, tmpdir_short, commands)
