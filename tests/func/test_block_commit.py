"""block-commit below the active layer: a backing chain gets shorter the
other way.

The chain base <- mid <- top of test_block_stream.py, opened with
blockdev-add of top; committing mid writes into base what mid holds, then
top's backing node is base and top's header names it.  Checked against
qemu-storage-daemon: the errors, the events, the node list and headers
after the job, the data read through an NBD export of top (with writes
going on), and base's image, which must read as mid did.
"""
import json
import os
import subprocess

import nbd
import pytest

from test_block_stream import SIZE, MiB, export, header, make_chain, qemu_img, read_all


def serve(impl, start_daemon, d):
    paths, want = make_chain(d)
    mid_raw = os.path.join(d, "mid.raw")
    qemu_img("convert", "-O", "raw", paths[1], mid_raw)
    sock = os.path.join(d, "nbd.sock")
    daemon = start_daemon(impl, "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    m = daemon.qmp()
    m.execute("blockdev-add", driver="qcow2", node_name="top",
              file={"driver": "file", "filename": paths[2]})
    nodes = {os.path.basename(n["file"]): n["node-name"]
             for n in m.execute("query-named-block-nodes") if n["drv"] == "qcow2"}
    return daemon, m, paths, want, mid_raw, nodes, "nbd+unix:///e?socket=%s" % sock


def test_errors_match_qemu(impl, start_daemon, tmpdir_short):
    daemon, m, paths, want, mid_raw, nodes, uri = serve(impl, start_daemon, tmpdir_short)
    mid, base = nodes["mid.qcow2"], nodes["base.qcow2"]

    def err(**a):
        e = m.error("block-commit", **a)
        return e["class"], e["desc"]
    assert err(device="nope", job_id="j") == ("DeviceNotFound", "Device 'nope' not found")
    g = "GenericError"
    assert err(device="top", job_id="j", top_node="nope") == \
        (g, "Cannot find device='' nor node-name='nope'")
    assert err(device="top", job_id="j", top_node=mid, base_node="nope") == \
        (g, "Cannot find device='' nor node-name='nope'")
    assert err(device="top", job_id="j", top_node=mid, top="x") == \
        (g, "'top-node' and 'top' are mutually exclusive")
    assert err(device="top", job_id="j", top_node=mid, base_node=base, base="x") == \
        (g, "'base-node' and 'base' are mutually exclusive")
    assert err(device="top", job_id="j", top_node=base, base_node=mid) == \
        (g, "'%s' is not in this backing file chain" % mid)
    assert err(device="top", job_id="j", top_node=mid, base_node=mid) == \
        (g, "cannot commit an image into itself")
    assert err(device="top", job_id="j", top="x") == (g, "Top image file x not found")
    assert err(device="top", job_id="j", top_node=mid, base="x") == \
        (g, "Can't find 'x' in the backing chain")
    assert err(device="top", job_id="j", top_node=base) == \
        (g, "cannot commit an image into itself")
    assert err(device="top", top_node=mid) == (g, "Invalid job ID ''")
    assert err(device="top", job_id="j", top_node=mid, speed=-1) == \
        (g, "Parameter 'speed' expects a non-negative value")
    m.execute("block-commit", device="top", job_id="j", top_node=mid, speed=1)
    # the job uses top: it is no root node now
    assert err(device="top", job_id="k", top_node=mid) == (g, "Need a root block node")
    assert m.error("blockdev-del", node_name="top")["desc"] == \
        "Node 'top' is busy: block device is in use by block job: commit"
    m.execute("block-job-cancel", device="j")
    m.wait_event("BLOCK_JOB_CANCELLED")


def commit_events(m, job, until):
    """The job's statuses and BLOCK_JOB_* event names up to status until."""
    from test_mirror import statuses
    out = statuses(m, job, until)
    for i, x in enumerate(out):
        if isinstance(x, tuple):
            assert x[1]["type"] == "commit"
            out[i] = x[0]
    return out


def test_active_layer(impl, start_daemon, tmpdir_short):
    """Committing the device's own node is a mirror job of type commit:
    ready once the base holds what the layers above it hold, then
    block-job-complete puts the base under the export, which keeps its
    client; writes made meanwhile are all in the base."""
    daemon, m, paths, want, mid_raw, nodes, uri = serve(impl, start_daemon, tmpdir_short)
    export(m, writable=True)
    base = nodes["base.qcow2"]
    assert m.error("block-commit", device="top", job_id="c", backing_file="x")["desc"] == \
        "'backing-file' specified, but 'top' is the active layer"
    h = nbd.NBD()
    h.connect_uri(uri)
    mirror = bytearray(want)
    m.execute("block-commit", device="top", job_id="c", filter_node_name="ct")
    h.pwrite(b"\x21" * 8192, 2 * MiB)
    mirror[2 * MiB:2 * MiB + 8192] = b"\x21" * 8192
    assert commit_events(m, "c", "ready") == ["created", "running", "ready",
                                              "BLOCK_JOB_READY"]
    assert [e["node-name"] for e in m.execute("query-block-exports")] == ["ct"]
    assert m.error("blockdev-del", node_name="top")["desc"] == \
        "Node 'top' is busy: block device is in use by block job: commit"
    assert m.error("block-commit", device="top", job_id="d")["desc"] == \
        "Need a root block node"
    [j] = m.execute("query-block-jobs")
    assert (j["type"], j["ready"], j["status"]) == ("commit", True, "ready")
    h.pwrite(b"\x22" * 4096, 3 * MiB)
    mirror[3 * MiB:3 * MiB + 4096] = b"\x22" * 4096
    m.execute("block-job-complete", device="c")
    assert commit_events(m, "c", "null") == [
        "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert [e["node-name"] for e in m.execute("query-block-exports")] == [base]
    h.pwrite(b"\x23" * 4096, 0)                 # into the base now
    mirror[0:4096] = b"\x23" * 4096
    assert h.pread(SIZE, 0) == bytes(mirror)
    h.shutdown()
    named = {n["node-name"]: n for n in m.execute("query-named-block-nodes")}
    assert named[base]["ro"] is False and "ct" not in named
    assert os.path.basename(named["top"]["backing_file"]) == "mid.qcow2"
    m.execute("block-export-del", id="e")
    m.execute("blockdev-del", node_name="top")
    daemon.stop()
    qemu_img("check", "-q", paths[0])
    with open(os.path.join(tmpdir_short, "mirror.raw"), "wb") as f:
        f.write(mirror)
    subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", paths[0],
                    os.path.join(tmpdir_short, "mirror.raw")], check=True)
    assert header(paths[0]) == (None, None)


def test_active_layer_cancelled_when_ready(impl, start_daemon, tmpdir_short):
    """A cancel once ready completes the job without the switch: the export
    stays on top, and the base stays read-write (QEMU reopens it read-only
    only when the job fails or is cancelled before it is ready)."""
    daemon, m, paths, want, mid_raw, nodes, uri = serve(impl, start_daemon, tmpdir_short)
    export(m, writable=True)
    base = nodes["base.qcow2"]
    m.execute("block-commit", device="top", job_id="c")
    assert commit_events(m, "c", "ready") == ["created", "running", "ready",
                                              "BLOCK_JOB_READY"]
    m.execute("block-job-cancel", device="c")
    assert commit_events(m, "c", "null") == [
        "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert [e["node-name"] for e in m.execute("query-block-exports")] == ["top"]
    named = {n["node-name"]: n for n in m.execute("query-named-block-nodes")}
    assert named[base]["ro"] is False
    assert read_all(uri) == want
    # cancelled before it is ready: read-only again
    m.execute("block-commit", device="top", job_id="c", speed=1)
    m.execute("block-job-cancel", device="c")
    assert commit_events(m, "c", "null")[-3:] == ["BLOCK_JOB_CANCELLED", "concluded", "null"]


@pytest.mark.parametrize("how", ["node", "file"])
def test_commit_mid_into_base(impl, start_daemon, tmpdir_short, how):
    daemon, m, paths, want, mid_raw, nodes, uri = serve(impl, start_daemon, tmpdir_short)
    export(m, writable=True)
    arg = {"top_node": nodes["mid.qcow2"], "base_node": nodes["base.qcow2"]} \
        if how == "node" else {"top": paths[1], "base": paths[0]}
    m.execute("block-commit", device="top", job_id="c", filter_node_name="ct", **arg)
    ev = []
    while True:
        e = m.events.pop(0) if m.events else m.recv()
        if e.get("event") == "JOB_STATUS_CHANGE":
            ev.append(e["data"]["status"])
            if e["data"]["status"] == "null":
                break
        elif e.get("event") == "BLOCK_JOB_COMPLETED":
            ev.append(e["data"])
    assert ev == ["created", "running", "waiting", "pending",
                  {"type": "commit", "device": "c", "len": SIZE, "offset": SIZE, "speed": 0},
                  "concluded", "null"]
    assert read_all(uri) == want
    named = {(os.path.basename(n["file"]), n["drv"]): n for n in m.execute("query-named-block-nodes")}
    assert ("mid.qcow2", "qcow2") not in named and ("top.qcow2", "commit_top") not in named
    assert named[("top.qcow2", "qcow2")]["backing_file"] == paths[0]
    assert named[("base.qcow2", "qcow2")]["ro"] is True
    # writes to top go on after the job
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x44" * 4096, 2 * MiB)
    h.shutdown()
    daemon.stop()
    assert header(paths[2]) == (paths[0], "qcow2")
    for p in (paths[0], paths[2]):
        qemu_img("check", "-q", p)
    # base reads as mid did
    r = subprocess.run(["qemu-img", "compare", "-F", "raw", paths[0], mid_raw],
                       stdout=subprocess.PIPE)
    assert r.returncode == 0, r.stdout


def test_backing_file_string_and_cancel(impl, start_daemon, tmpdir_short):
    daemon, m, paths, want, mid_raw, nodes, uri = serve(impl, start_daemon, tmpdir_short)
    m.execute("block-commit", device="top", job_id="c", top_node=nodes["mid.qcow2"], speed=1)
    m.execute("block-job-cancel", device="c")
    e = m.wait_event("BLOCK_JOB_CANCELLED")
    assert e["data"]["type"] == "commit"
    assert header(paths[2]) == ("mid.qcow2", "qcow2")
    assert len([n for n in m.execute("query-named-block-nodes") if n["drv"] == "qcow2"]) == 3
    m.execute("block-commit", device="top", job_id="c", top_node=nodes["mid.qcow2"],
              backing_file="base.qcow2")
    m.wait_event("BLOCK_JOB_COMPLETED")
    assert header(paths[2]) == ("base.qcow2", "qcow2")
    daemon.stop()
    info = json.loads(qemu_img("info", "--output=json", "--backing-chain", paths[2]))
    assert [os.path.basename(i["filename"]) for i in info] == ["top.qcow2", "base.qcow2"]
    subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", paths[2],
                    os.path.join(tmpdir_short, "want.raw")], check=True)


def test_commit_marks_the_base_bitmaps(impl, start_daemon, tmpdir_short):
    """Writing mid's data into base changes base: a bitmap on base records
    every range mid held (data in [512k, 1.5M), zeros at 3M), 64k grains."""
    daemon, m, paths, want, mid_raw, nodes, uri = serve(impl, start_daemon, tmpdir_short)
    base = nodes["base.qcow2"]
    m.execute("block-dirty-bitmap-add", node=base, name="b")
    m.execute("block-commit", device="top", job_id="c", top_node=nodes["mid.qcow2"])
    m.wait_event("BLOCK_JOB_COMPLETED")
    from test_block_stream import bitmap_count
    assert bitmap_count(m, base, "b") == MiB + 64 * 1024


def test_writes_during_the_job_land(impl, start_daemon, tmpdir_short):
    """Guest writes to top while mid is committed below it: top keeps
    every write, and base ends up reading as mid did."""
    daemon, m, paths, want, mid_raw, nodes, uri = serve(impl, start_daemon, tmpdir_short)
    export(m, writable=True)
    mirror = bytearray(want)
    h = nbd.NBD()
    h.connect_uri(uri)
    m.execute("block-commit", device="top", job_id="c", top_node=nodes["mid.qcow2"],
              speed=4 * MiB)
    off = n = 0
    while True:
        n += 1
        data = bytes([16 + off // 65536 % 200]) * 4096
        h.pwrite(data, off)
        mirror[off:off + 4096] = data
        off = (off + 65536 + 4096) % SIZE
        jobs = m.execute("query-block-jobs")
        if not jobs or jobs[0]["status"] != "running":
            break
    assert n > 8                          # the writes did overlap the job
    e = m.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in e["data"]
    assert h.pread(SIZE, 0) == bytes(mirror)
    h.shutdown()
    daemon.stop()
    for p in (paths[0], paths[2]):
        qemu_img("check", "-q", p)
    r = subprocess.run(["qemu-img", "compare", "-F", "raw", paths[0], mid_raw],
                       stdout=subprocess.PIPE)
    assert r.returncode == 0, r.stdout
