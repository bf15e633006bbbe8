"""query-blockstats (QEMU 7.2's shape, against qsd too), latency histograms
and the downstream __org.bexd_query-export-clients command."""
import json
import mmap
import os
import subprocess
import time

import nbd
import pytest

import needs
from conftest import BUILD, QMPError, tool_text, tool_json

VUB = os.environ.get("VUB_CLIENT", os.path.join(BUILD, "tests", "vhost", "vub-client"))

STATS_KEYS = {
    "rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations",
    "flush_operations", "unmap_operations", "rd_total_time_ns", "wr_total_time_ns",
    "flush_total_time_ns", "unmap_total_time_ns", "wr_highest_offset", "rd_merged",
    "wr_merged", "unmap_merged", "failed_rd_operations", "failed_wr_operations",
    "failed_flush_operations", "failed_unmap_operations", "invalid_rd_operations",
    "invalid_wr_operations", "invalid_flush_operations", "invalid_unmap_operations",
    "account_invalid", "account_failed", "timed_stats",
}


def serve(start_daemon, impl, image, tmpdir, extra=()):
    img = image(16 << 20)
    sock = os.path.join(tmpdir, "nbd.sock")
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=" + img,
                     "--blockdev", "driver=raw,node-name=r0,file=f0",
                     "--nbd-server", "addr.type=unix,addr.path=" + sock,
                     "--export", "type=nbd,id=e0,node-name=r0,name=disk,writable=on", *extra)
    return d, sock


def qemu_io(sock, *cmds):
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv + ["nbd+unix:///disk?socket=" + sock], capture_output=True,
                       timeout=60)
    assert r.returncode == 0, tool_text(r.stderr)


def test_blockstats_shape(impl, start_daemon, image, tmpdir_short):
    d, sock = serve(start_daemon, impl, image, tmpdir_short)
    q = d.qmp()
    qemu_io(sock, "write 0 64k")
    assert q.execute("query-blockstats") == []     # no named BlockBackends
    nodes = q.execute("query-blockstats", query_nodes=True)
    by_name = {n["node-name"]: n for n in nodes}
    assert [n["node-name"] for n in nodes] == ["f0", "r0"]
    for n in nodes:
        assert set(n["stats"]) - {"idle_time_ns"} == STATS_KEYS
    assert set(by_name["f0"]) == {"node-name", "stats", "driver-specific"}
    assert by_name["f0"]["driver-specific"] == {
        "driver": "file", "discard-nb-ok": 0, "discard-nb-failed": 0, "discard-bytes-ok": 0}
    assert set(by_name["r0"]) == {"node-name", "stats", "parent"}
    assert by_name["r0"]["parent"]["node-name"] == "f0"
    assert by_name["r0"]["stats"]["wr_highest_offset"] == 65536


def test_blockstats_counts(start_daemon, image, tmpdir_short):
    """bexd counts on nodes (qsd reports zeros there)."""
    d, sock = serve(start_daemon, "bexd", image, tmpdir_short)
    q = d.qmp()
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///disk?socket=" + sock)
    h.pwrite(b"a" * 65536, 0)
    h.pwrite(b"b" * 4096, 1 << 20)
    for off, n in ((0, 4096), (4096, 8192), (8 << 20, 512)):
        h.pread(n, off)
    h.flush()
    h.trim(65536, 0)
    with pytest.raises(nbd.Error):
        h.pread(4096, 16 << 20)                  # past the end: refused by the server
    h.shutdown()
    for node in q.execute("query-blockstats", query_nodes=True):
        s = node["stats"]
        assert (s["wr_operations"], s["wr_bytes"]) == (2, 65536 + 4096), node["node-name"]
        assert (s["rd_operations"], s["rd_bytes"]) == (3, 4096 + 8192 + 512)
        assert s["flush_operations"] == 1
        # r0 has discard=ignore: it answers the TRIM, nothing reaches f0
        unmap = (1, 65536) if node["node-name"] == "r0" else (0, 0)
        assert (s["unmap_operations"], s["unmap_bytes"]) == unmap
        assert s["wr_highest_offset"] == (1 << 20) + 4096
        assert s["rd_total_time_ns"] > 0 and s["wr_total_time_ns"] > 0
        assert s["idle_time_ns"] >= 0
        assert s["failed_wr_operations"] == s["invalid_wr_operations"] == 0


def test_latency_histogram(start_daemon, image, tmpdir_short):
    d, sock = serve(start_daemon, "bexd", image, tmpdir_short)
    q = d.qmp()
    q.execute("block-latency-histogram-set", id="r0", boundaries=[1000, 1000000],
              boundaries_write=[10, 20, 30])
    qemu_io(sock, *["read %d 4k" % (i * 4096) for i in range(10)], "write 0 4k")
    s = [n for n in q.execute("query-blockstats", query_nodes=True)
         if n["node-name"] == "r0"][0]["stats"]
    rd = s["rd_latency_histogram"]
    assert rd["boundaries"] == [1000, 1000000] and len(rd["bins"]) == 3
    assert sum(rd["bins"]) == s["rd_operations"] == 10
    wr = s["wr_latency_histogram"]
    assert wr["boundaries"] == [10, 20, 30] and sum(wr["bins"]) == 1
    assert "flush_latency_histogram" in s
    # an export id names its node; no boundaries at all removes them
    q.execute("block-latency-histogram-set", id="e0")
    s = [n for n in q.execute("query-blockstats", query_nodes=True)
         if n["node-name"] == "r0"][0]["stats"]
    assert "rd_latency_histogram" not in s and "wr_latency_histogram" not in s


def test_latency_histogram_errors(start_daemon, image, tmpdir_short):
    d, sock = serve(start_daemon, "bexd", image, tmpdir_short)
    q = d.qmp()
    e = q.error("block-latency-histogram-set", id="nope", boundaries=[10])
    assert (e["class"], e["desc"]) == ("DeviceNotFound", "Device 'nope' not found")
    e = q.error("block-latency-histogram-set", id="r0", boundaries=[10, 10])
    assert e["desc"] == ("Device 'r0' set read boundaries fail: they must be positive "
                         "and strictly increasing")
    e = q.error("block-latency-histogram-set", id="r0", boundaries_flush=[0])
    assert e["desc"].startswith("Device 'r0' set flush boundaries fail")
    e = q.error("block-latency-histogram-set", id="r0", boundaries=list(range(1, 100)))
    assert e["desc"] == "Device 'r0' set read boundaries fail: at most 64 boundaries"
    # nothing was half-applied
    s = q.execute("query-blockstats", query_nodes=True)[1]["stats"]
    assert "rd_latency_histogram" not in s


def test_histogram_not_in_qsd(impl, start_daemon, image, tmpdir_short):
    d, sock = serve(start_daemon, impl, image, tmpdir_short)
    q = d.qmp()
    if impl == "qsd":
        assert q.error("block-latency-histogram-set", id="r0")["class"] == "CommandNotFound"
    else:
        q.execute("block-latency-histogram-set", id="r0")


def test_export_clients(start_daemon, image, tmpdir_short):
    d, sock = serve(start_daemon, "bexd", image, tmpdir_short)
    q = d.qmp()
    [e] = q.execute("__org.bexd_query-export-clients")
    assert e["id"] == "e0" and e["type"] == "nbd" and e["node-name"] == "r0"
    assert e["clients"] == [] and e["shutting-down"] is False
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///disk?socket=" + sock)
    h.pwrite(b"x" * 8192, 0)
    h.pread(4096, 0)
    h.flush()
    [e] = q.execute("__org.bexd_query-export-clients", id="e0")
    [c] = e["clients"]
    assert c["transport"] == "unix" and c["peer"] == "unix:pid=%d" % os.getpid()
    assert c["tls"] is False and "tls-identity" not in c
    assert c["requests-in-flight"] == 0
    assert (c["write-operations"], c["write-bytes"]) == (1, 8192)
    assert (c["read-operations"], c["read-bytes"]) == (1, 4096)
    assert c["flush-operations"] == 1 and c["failed-operations"] == 0
    assert abs(c["connected-since"] - __import__("time").time()) < 60
    h.shutdown()
    del h
    # totals keep what departed clients did
    d2 = q.execute("__org.bexd_query-export-clients")[0]
    assert d2["totals"]["write-bytes"] == 8192
    e = q.error("__org.bexd_query-export-clients", id="nope")
    assert e["desc"] == "Export 'nope' is not found"


def test_export_clients_vhost_user(start_daemon, tmpdir_short):
    """The front-end of a vhost-user-blk export is its client: its pid, the
    request it has in flight, and what it did, kept in the totals after it
    left."""
    needs.built(VUB, "vub-client")
    sock = os.path.join(tmpdir_short, "vu.sock")
    d = start_daemon("bexd", "--blockdev", "driver=null-co,node-name=n0,size=1048576,"
                     "read-zeroes=on,latency-ns=%d" % int(0.5e9), "--export",
                     "type=vhost-user-blk,id=v0,node-name=n0,addr.type=unix,addr.path=" + sock)
    q = d.qmp()
    [e] = q.execute("__org.bexd_query-export-clients")
    assert e["type"] == "vhost-user-blk" and e["clients"] == []
    assert e["totals"]["read-operations"] == 0
    # connected-since is time(NULL): whole seconds, from a clock that may be a
    # tick behind Python's
    before = int(time.time()) - 1
    p = subprocess.Popen([VUB, sock, "inflight", "0", "4096"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        # GET_ID came back; the READ behind it waits on the slow node
        assert json.loads(p.stdout.readline()) == {"submitted": True}
        [c] = q.execute("__org.bexd_query-export-clients", id="v0")[0]["clients"]
        assert c["transport"] == "vhost-user" and c["peer"] == "pid=%d" % p.pid
        assert c["tls"] is False and c["requests-in-flight"] == 1
        assert c["read-operations"] == 0 and c["failed-operations"] == 0
        assert before <= c["connected-since"] <= time.time(), (before, c["connected-since"])
        assert json.loads(p.stdout.readline()) == {"status": 0}
    finally:
        assert p.wait(timeout=30) == 0
    t = q.execute("__org.bexd_query-export-clients", id="v0")[0]["totals"]
    assert (t["read-operations"], t["read-bytes"]) == (1, 4096)
    assert t["read-total-time-ns"] >= 0.4e9
    # a write to a read-only export fails and is counted as failed
    r = subprocess.run([VUB, sock, "write", "0", "4096", "1"], capture_output=True, timeout=30)
    assert tool_json(r.stdout) == {"status": 1}
    t = q.execute("__org.bexd_query-export-clients", id="v0")[0]["totals"]
    assert t["failed-operations"] == 1 and t["write-operations"] == 0


def test_export_clients_fuse(start_daemon, image, tmpdir_short):
    """A FUSE export's one client is the kernel's mount."""
    img = image(4 << 20)
    mnt = os.path.join(tmpdir_short, "mnt")
    open(mnt, "w").close()
    d = start_daemon("bexd", "--blockdev", "driver=file,node-name=f0,filename=" + img,
                     "--export", "type=fuse,id=u0,node-name=f0,writable=on,mountpoint=" + mnt)
    q = d.qmp()
    buf = mmap.mmap(-1, 8192)
    buf.write(b"y" * 8192)
    fd = os.open(mnt, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], 0) == 8192
        os.fsync(fd)
        assert os.preadv(fd, [memoryview(buf)[:4096]], 4096) == 4096
    finally:
        os.close(fd)
    [e] = q.execute("__org.bexd_query-export-clients", id="u0")
    [c] = e["clients"]
    assert c["transport"] == "fuse" and c["peer"] == mnt and c["tls"] is False
    assert c["requests-in-flight"] == 0
    assert (c["write-operations"], c["write-bytes"]) == (1, 8192)
    assert (c["read-operations"], c["read-bytes"]) == (1, 4096)
    assert c["flush-operations"] >= 1 and c["failed-operations"] == 0
    assert e["totals"]["write-bytes"] == 8192
    q.execute("block-export-del", id="u0")
    q.wait_event("BLOCK_EXPORT_DELETED")
    assert q.execute("__org.bexd_query-export-clients") == []


def test_downstream_commands_in_schema(start_daemon):
    d = start_daemon("bexd")
    q = d.qmp()
    names = {i["name"] for i in q.execute("query-qmp-schema")}
    assert {"__org.bexd_query-export-clients", "__org.bexd_reload-tls-creds",
            "query-blockstats", "block-latency-histogram-set"} <= names
    cmds = {c["name"] for c in q.execute("query-commands")}
    assert "__org.bexd_query-export-clients" in cmds
