"""Argument checking through QMP, against bexd and qsd: missing and
unexpected members, wrong JSON types, refused enum values, integer ranges,
unions, alternates and lists, with nested paths, in qsd's exact words.
"""
import pytest

from conftest import IMPLS

CASES = [
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "writable": "x"},
     "Invalid parameter type for 'writable', expected: boolean"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "writable": True, "foo": 1},
     "Parameter 'foo' is unexpected"),
    ("block-export-add", {"type": "nbdx", "id": "e", "node-name": "n"},
     "Parameter 'type' does not accept value 'nbdx'"),
    ("block-export-add", {"id": "e", "node-name": "n"}, "Parameter 'type' is missing"),
    ("block-export-add", {"type": 1, "id": "e", "node-name": "n"},
     "Invalid parameter type for 'type', expected: string"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": "b"},
     "Invalid parameter type for 'bitmaps', expected: array"),
    ("block-export-add", {"type": "vhost-user-blk", "id": "e", "node-name": "n",
                          "addr": {"type": "unix", "path": "/x"}, "num-queues": 65536},
     "Parameter 'num-queues' expects uint16_t"),
    ("block-export-add", {"type": "vhost-user-blk", "id": "e", "node-name": "n",
                          "addr": {"type": "unix", "path": "/x"}, "logical-block-size": "4k"},
     "Parameter 'logical-block-size' expects uint64"),
    ("block-export-del", {"id": "e", "mode": "bogus"},
     "Parameter 'mode' does not accept value 'bogus'"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {}}}, "Parameter 'addr.data.path' is missing"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": 1}}},
     "Invalid parameter type for 'addr.data.path', expected: string"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": []}},
     "Invalid parameter type for 'addr.data', expected: object"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "x", "port": "1", "numeric": "a"}}},
     "Invalid parameter type for 'addr.data.numeric', expected: boolean"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "x", "port": 1}}},
     "Invalid parameter type for 'addr.data.port', expected: string"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "x", "port": "1", "to": -1}}},
     "Parameter 'to' expects uint16_t"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "x", "port": "1", "to": 65536000000000}}},
     "Parameter 'to' expects uint16_t"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "x", "port": "1", "to": 1.5}}},
     "Parameter 'addr.data.to' expects uint64"),
    ("nbd-server-start", {"max-connections": -1, "addr": {"type": "inet", "data": {"host": "x", "port": "1"}}},
     "Parameter 'max-connections' expects uint32_t"),
    ("nbd-server-start", {"max-connections": None, "addr": {"type": "inet", "data": {"host": "x", "port": "1"}}},
     "Parameter 'max-connections' expects uint64"),
    ("nbd-server-start", {"addr": {"type": "bogus"}}, "Parameter 'type' does not accept value 'bogus'"),
    ("nbd-server-start", {}, "Parameter 'addr' is missing"),
    ("nbd-server-add", {"device": "d", "writable": 1}, "Invalid parameter type for 'writable', expected: boolean"),
    ("blockdev-add", {"driver": "file", "node-name": "n", "filename": "/x", "cache": {"direct": 1}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ("blockdev-add", {"driver": "file", "node-name": "n", "filename": "/x", "discard": "on"},
     "Parameter 'discard' does not accept value 'on'"),
    ("blockdev-add", {"driver": "raw", "node-name": "n", "file": 1},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "raw", "node-name": "n", "file": None},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    # an alternate names the member alone, not its path
    ("blockdev-add", {"driver": "raw", "node-name": "n",
                      "file": {"driver": "raw", "file": 5}},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "raw", "node-name": "n", "file": {"driver": "file"}},
     "Parameter 'file.filename' is missing"),
    ("blockdev-add", {"driver": "raw", "node-name": "n", "file": {"driver": "null-co", "size": "1"}},
     "Invalid parameter type for 'file.size', expected: integer"),
    ("blockdev-add", {"driver": "bogus"}, "Parameter 'driver' does not accept value 'bogus'"),
    ("blockdev-add", {"node-name": "n"}, "Parameter 'driver' is missing"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "latency-ns": "5"},
     "Parameter 'latency-ns' expects uint64"),
    ("blockdev-del", {}, "Parameter 'node-name' is missing"),
    ("object-add", {"qom-type": "iothreadx", "id": "x"},
     "Parameter 'qom-type' does not accept value 'iothreadx'"),
    ("object-add", {"qom-type": "iothread", "id": "x", "poll-max-ns": "1"},
     "Invalid parameter type for 'poll-max-ns', expected: integer"),
    ("object-add", {"qom-type": "authz-list", "id": "x", "rules": [{"match": "a", "policy": "x"}]},
     "Parameter 'policy' does not accept value 'x'"),
    ("object-add", {"qom-type": "authz-list", "id": "x", "rules": [{"policy": "deny"}]},
     "Parameter 'rules[0].match' is missing"),
    ("object-add", {"qom-type": "authz-list", "id": "x", "rules": {}},
     "Invalid parameter type for 'rules', expected: array"),
    ("object-add", {"qom-type": "secret", "id": "x", "format": "hex"},
     "Parameter 'format' does not accept value 'hex'"),
    ("object-add", {"qom-type": "tls-creds-x509", "id": "x", "endpoint": "both"},
     "Parameter 'endpoint' does not accept value 'both'"),
    ("object-add", {"id": "x"}, "Parameter 'qom-type' is missing"),
    ("object-del", {"id": 1}, "Invalid parameter type for 'id', expected: string"),
    ("query-named-block-nodes", {"flat": "yes"}, "Invalid parameter type for 'flat', expected: boolean"),
    ("query-block-exports", {"x": 1}, "Parameter 'x' is unexpected"),
]


@pytest.fixture
def monitor(impl, start_daemon):
    return start_daemon(impl).qmp()


@pytest.mark.parametrize("cmd,args,desc", CASES,
                         ids=["%s-%d" % (c[0], i) for i, c in enumerate(CASES)])
def test_argument_error(monitor, cmd, args, desc):
    r = monitor.request(cmd, args, id="x")
    assert r["id"] == "x"
    assert r["error"] == {"class": "GenericError", "desc": desc}


def _render(schema, t, seen=()):
    """A type as a name-free string, so masked numbers do not matter."""
    e = schema.get(t)
    if e is None or e["meta-type"] == "builtin":
        return t
    if t in seen:
        return "..."
    seen = seen + (t,)
    mt = e["meta-type"]
    if mt == "enum":
        return "enum(%s)" % ",".join(e["values"])
    if mt == "array":
        return "[%s]" % _render(schema, e["element-type"], seen)
    if mt == "alternate":
        return "alt(%s)" % "|".join(_render(schema, m["type"], seen) for m in e["members"])
    r = "{" + ", ".join(("*" if "default" in m else "") + m["name"] + ":" +
                        _render(schema, m["type"], seen) for m in e["members"])
    if "variants" in e:
        r += " | %s: " % e["tag"] + "; ".join(
            v["case"] + "=" + _render(schema, v["type"], seen) for v in e["variants"])
    return r + "}"


# Commands and events whose arguments and returns are the same as qsd's
# (others differ on purpose: fewer block drivers and object types, no
# vduse-blk, extra remove modes hide/soft, QEMU 10.0's handshake-max-seconds
# on nbd-server-start).
SAME_AS_QSD = ["qmp_capabilities", "query-version", "query-commands", "query-qmp-schema",
               "quit", "nbd-server-stop", "nbd-server-add",
               "blockdev-del", "object-del", "BLOCK_EXPORT_DELETED",
               # the job framework
               "query-jobs", "job-pause", "job-resume", "job-cancel", "job-complete",
               "job-finalize", "job-dismiss", "JOB_STATUS_CHANGE",
               # block jobs
               "blockdev-backup", "query-block-jobs", "block-job-set-speed",
               "block-job-cancel", "block-job-pause", "block-job-resume",
               "block-job-complete", "block-job-finalize", "block-job-dismiss",
               "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR",
               "BLOCK_JOB_READY", "BLOCK_JOB_PENDING",
               # QOM, the block graph, chardevs
               "qom-list", "qom-get", "qom-set", "qom-list-types", "qom-list-properties",
               "x-debug-query-block-graph", "query-chardev", "query-chardev-backends",
               "ringbuf-read", "ringbuf-write", "chardev-remove", "chardev-send-break"]


def test_introspection_matches_qsd(start_daemon):
    if not IMPLS.get("qsd"):
        pytest.skip("qemu-storage-daemon not installed")
    schemas = {}
    for impl in ("bexd", "qsd"):
        m = start_daemon(impl).qmp()
        schemas[impl] = {e["name"]: e for e in m.execute("query-qmp-schema")}
    b, q = schemas["bexd"], schemas["qsd"]
    for name in SAME_AS_QSD:
        assert set(b[name]) == set(q[name]), name
        assert b[name].get("features") == q[name].get("features"), name
        for k in ("arg-type", "ret-type"):
            if k in q[name]:
                assert _render(b, b[name][k]) == _render(q, q[name][k]), (name, k)
