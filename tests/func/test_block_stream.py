"""block-stream and change-backing-file: a backing chain gets shorter.

A chain base <- mid <- top of qcow2 images (made by qemu-img/qemu-io) is
opened with blockdev-add of top; streaming copies into top what the layers
above the base hold, then the base becomes top's backing node and the image
header names it (or nothing).  Checked against qemu-storage-daemon: the
errors, the events, the node list and header after the job, the data read
through an NBD export, and writes made through the export while the job
copies, which must all be in the result.
"""
import json
import os
import random
import subprocess
import threading

import nbd
import pytest

MiB = 1 << 20
SIZE = 4 * MiB


def qemu_img(*args):
    return subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.PIPE).stdout.decode()


def qemu_io(img, *cmds):
    subprocess.run(["qemu-io", "-f", "qcow2"] + sum([["-c", c] for c in cmds], []) + [img],
                   check=True, stdout=subprocess.DEVNULL)


def make_chain(d, size=SIZE):
    """base (0x01 in [0, 1M)) <- mid (0x02 in [512k, 1.5M), zeros at 3M)
    <- top (0x03 in [1M, 1.5M)); returns the images' paths and the data."""
    paths = [os.path.join(d, n + ".qcow2") for n in ("base", "mid", "top")]
    qemu_img("create", "-q", "-f", "qcow2", paths[0], str(size))
    qemu_io(paths[0], "write -P 1 0 1M", "write -P 9 3M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", paths[1], str(size))
    qemu_io(paths[1], "write -P 2 512k 1M", "write -z 3M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", paths[2], str(size))
    qemu_io(paths[2], "write -P 3 1M 512k")
    raw = os.path.join(d, "want.raw")
    qemu_img("convert", "-O", "raw", paths[2], raw)
    with open(raw, "rb") as f:
        return paths, f.read()


def serve(impl, start_daemon, d, read_only=False):
    paths, want = make_chain(d)
    sock = os.path.join(d, "nbd.sock")
    daemon = start_daemon(impl, "--object", "iothread,id=io0",
                          "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    m = daemon.qmp()
    m.execute("blockdev-add", driver="qcow2", node_name="top", read_only=read_only,
              file={"driver": "file", "filename": paths[2]})
    return daemon, m, paths, want, "nbd+unix:///e?socket=%s" % sock


def export(m, writable=False, iothread=False):
    extra = {"iothread": "io0"} if iothread else {}
    m.execute("block-export-add", type="nbd", id="e", node_name="top", name="e",
              writable=writable, **extra)


def read_all(uri, size=SIZE):
    h = nbd.NBD()
    h.connect_uri(uri)
    data = h.pread(size, 0)
    h.shutdown()
    return data


def chain_names(m):
    """Each named node's file and its backing file, generated names as '#'."""
    return sorted(((n["node-name"] if not n["node-name"].startswith("#") else "#",
                    os.path.basename(n["file"]), n.get("backing_file"))
                   for n in m.execute("query-named-block-nodes")), key=str)


def job_events(m, job):
    """Events of the job up to its end (null), in order, as (event, status
    or data)."""
    out = []
    while True:
        e = m.events.pop(0) if m.events else m.recv()
        if e.get("event") == "JOB_STATUS_CHANGE" and e["data"]["id"] == job:
            out.append(("JOB_STATUS_CHANGE", e["data"]["status"]))
            if e["data"]["status"] == "null":
                return out
        elif e.get("event", "").startswith("BLOCK_JOB"):
            out.append((e["event"], e["data"]))


def header(path):
    info = json.loads(qemu_img("info", "--output=json", "-U", path))
    return info.get("backing-filename"), info.get("backing-filename-format")


def test_errors_match_qemu(impl, start_daemon, tmpdir_short):
    daemon, m, paths, want, uri = serve(impl, start_daemon, tmpdir_short)

    def err(**a):
        return m.error("block-stream", **a)["desc"]
    assert err(device="nope", job_id="j") == "Cannot find device='nope' nor node-name='nope'"
    assert err(device="top") == "Invalid job ID ''"
    assert err(device="top", job_id="1j") == "Invalid job ID '1j'"
    assert err(device="top", job_id="j", base="x", base_node="y") == \
        "'base' and 'base-node' cannot be specified at the same time"
    assert err(device="top", job_id="j", base="x", bottom="y") == \
        "'base' and 'bottom' cannot be specified at the same time"
    assert err(device="top", job_id="j", bottom="x", base_node="y") == \
        "'bottom' and 'base-node' cannot be specified at the same time"
    assert err(device="top", job_id="j", base="nothere") == \
        "Can't find 'nothere' in the backing chain"
    assert err(device="top", job_id="j", base_node="nothere") == \
        "Cannot find device='' nor node-name='nothere'"
    assert err(device="top", job_id="j", base_node="top") == \
        "Node 'top' is not a backing image of 'top'"
    assert err(device="top", job_id="j", bottom="nothere") == \
        "Cannot find device='' nor node-name='nothere'"
    assert err(device="top", job_id="j", backing_file="foo") == \
        "backing file specified, but streaming the entire chain"
    assert err(device="top", job_id="j", speed=-1) == \
        "Parameter 'speed' expects a non-negative value"
    # a node of another chain
    m.execute("blockdev-add", driver="qcow2", node_name="other",
              file={"driver": "file", "filename": paths[0], "locking": "off"},
              read_only=True)
    assert err(device="top", job_id="j", base_node="other") == \
        "Node 'other' is not a backing image of 'top'"
    assert err(device="top", job_id="j", bottom="other") == \
        "Node 'other' is not in a chain starting from 'top'"
    # busy while a job runs
    m.execute("block-stream", device="top", job_id="j", speed=1)
    assert err(device="top", job_id="j2") == \
        "Node 'top' is busy: block device is in use by block job: stream"
    assert m.error("blockdev-del", node_name="top")["desc"] == \
        "Node 'top' is busy: block device is in use by block job: stream"
    m.execute("block-job-cancel", device="j")
    m.wait_event("BLOCK_JOB_CANCELLED")


def test_whole_chain(impl, start_daemon, tmpdir_short):
    daemon, m, paths, want, uri = serve(impl, start_daemon, tmpdir_short)
    export(m)
    m.execute("block-stream", device="top", job_id="s")
    assert job_events(m, "s") == [
        ("JOB_STATUS_CHANGE", "created"), ("JOB_STATUS_CHANGE", "running"),
        ("JOB_STATUS_CHANGE", "waiting"), ("JOB_STATUS_CHANGE", "pending"),
        ("BLOCK_JOB_COMPLETED", {"type": "stream", "device": "s", "len": SIZE,
                                 "offset": SIZE, "speed": 0}),
        ("JOB_STATUS_CHANGE", "concluded"), ("JOB_STATUS_CHANGE", "null")]
    assert read_all(uri) == want
    assert chain_names(m) == [("#", "top.qcow2", None), ("top", "top.qcow2", None)]
    assert header(paths[2]) == (None, None)
    daemon.stop()
    qemu_img("check", "-q", paths[2])
    with open(os.path.join(tmpdir_short, "want.raw"), "rb") as f:
        assert f.read() == want
    subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", paths[2],
                    os.path.join(tmpdir_short, "want.raw")], check=True)
    # top allocates what mid and base held; the zeros mid wrote stay zeros
    mapped = json.loads(qemu_img("map", "--output=json", paths[2]))
    assert [(e["start"], e["length"], e["data"], e["zero"]) for e in mapped
            if e["start"] >= 3 * MiB and e["start"] < 3 * MiB + 65536] == \
        [(3 * MiB, 65536, False, True)]
    assert all(e["depth"] == 0 for e in mapped if e["data"])


@pytest.mark.parametrize("how", ["base", "base-node", "bottom"])
def test_down_to_base(impl, start_daemon, tmpdir_short, how):
    daemon, m, paths, want, uri = serve(impl, start_daemon, tmpdir_short)
    export(m)
    nodes = {os.path.basename(n["file"]): n["node-name"]
             for n in m.execute("query-named-block-nodes") if n["drv"] == "qcow2"}
    arg = {"base": {"base": paths[0]}, "base-node": {"base_node": nodes["base.qcow2"]},
           "bottom": {"bottom": nodes["mid.qcow2"]}}[how]
    m.execute("block-stream", device="top", job_id="s", **arg)
    e = m.wait_event("BLOCK_JOB_COMPLETED")
    assert e["data"]["offset"] == SIZE and "error" not in e["data"]
    assert read_all(uri) == want
    assert ("top", "top.qcow2", paths[0]) in chain_names(m)
    assert not [n for n in chain_names(m) if n[1] == "mid.qcow2"]
    assert header(paths[2]) == (paths[0], "qcow2")
    daemon.stop()
    qemu_img("check", "-q", paths[2])
    mapped = json.loads(qemu_img("map", "--output=json", paths[2]))
    # base's own data stays in base: [0, 512k) is at depth 1
    assert [(e["start"], e["depth"]) for e in mapped if e["start"] == 0] == [(0, 1)]


def test_backing_file_string(impl, start_daemon, tmpdir_short):
    daemon, m, paths, want, uri = serve(impl, start_daemon, tmpdir_short)
    m.execute("block-stream", device="top", job_id="s", base=paths[0],
              backing_file="base.qcow2")
    m.wait_event("BLOCK_JOB_COMPLETED")
    assert header(paths[2]) == ("base.qcow2", "qcow2")
    daemon.stop()
    qemu_img("check", "-q", paths[2])
    subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", paths[2],
                    os.path.join(tmpdir_short, "want.raw")], check=True)


def test_read_only_top_is_read_only_again(impl, start_daemon, tmpdir_short):
    daemon, m, paths, want, uri = serve(impl, start_daemon, tmpdir_short, read_only=True)
    m.execute("block-stream", device="top", job_id="s")
    m.wait_event("BLOCK_JOB_COMPLETED")
    top = [n for n in m.execute("query-named-block-nodes") if n["node-name"] == "top"][0]
    assert top["ro"] is True
    assert header(paths[2]) == (None, None)


def test_cancel_leaves_the_chain(impl, start_daemon, tmpdir_short):
    daemon, m, paths, want, uri = serve(impl, start_daemon, tmpdir_short)
    export(m)
    before = chain_names(m)
    m.execute("block-stream", device="top", job_id="s", speed=1)
    m.execute("block-job-cancel", device="s")
    e = m.wait_event("BLOCK_JOB_CANCELLED")
    assert e["data"]["type"] == "stream" and e["data"]["len"] == SIZE
    assert chain_names(m) == before
    assert read_all(uri) == want
    assert header(paths[2]) == ("mid.qcow2", "qcow2")


@pytest.mark.parametrize("iothread", [False, True], ids=["main-loop", "iothread"])
def test_writes_during_the_job_all_land(impl, start_daemon, tmpdir_short, iothread):
    """Guest writes through the export while the job copies (base holds
    data everywhere, so every range is copied): a write over a range being
    copied waits for the copy or finds it done, and no copy puts old data
    from below over a write.  32 writes in flight at all times."""
    paths, _ = make_chain(tmpdir_short)
    qemu_io(paths[0], "write -P 7 0 %d" % SIZE)
    raw = os.path.join(tmpdir_short, "want.raw")
    qemu_img("convert", "-O", "raw", paths[2], raw)
    with open(raw, "rb") as f:
        mirror = bytearray(f.read())
    sock = os.path.join(tmpdir_short, "nbd.sock")
    daemon = start_daemon(impl, "--object", "iothread,id=io0",
                          "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    m = daemon.qmp()
    m.execute("blockdev-add", driver="qcow2", node_name="top",
              file={"driver": "file", "filename": paths[2]})
    export(m, writable=True, iothread=iothread)
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///e?socket=%s" % sock)
    rng = random.Random(3)
    m.execute("block-stream", device="top", job_id="s", speed=8 * MiB)
    done = []
    n = 0
    busy = set()                          # offsets in flight: never two writes to one

    def finished(off, err):
        busy.discard(off)
        return 1
    while not done or h.aio_in_flight():
        while not done and h.aio_in_flight() < 32:
            off = rng.randrange(0, SIZE // 4096) * 4096
            if off in busy:
                continue
            data = bytes([rng.randrange(16, 256)]) * 4096
            busy.add(off)
            h.aio_pwrite(data, off, completion=lambda err, off=off: finished(off, err))
            mirror[off:off + 4096] = data
            n += 1
        h.poll(-1)
        if not done and n % 64 == 0:
            if [j for j in m.execute("query-block-jobs") if j["status"] != "running"] or \
                    not m.execute("query-block-jobs"):
                done.append(True)
    e = m.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in e["data"]
    got = h.pread(SIZE, 0)
    h.shutdown()
    assert got == bytes(mirror)
    daemon.stop()
    qemu_img("check", "-q", paths[2])
    with open(os.path.join(tmpdir_short, "mirror.raw"), "wb") as f:
        f.write(mirror)
    subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", paths[2],
                    os.path.join(tmpdir_short, "mirror.raw")], check=True)


def test_change_backing_file(impl, start_daemon, tmpdir_short):
    daemon, m, paths, want, uri = serve(impl, start_daemon, tmpdir_short)
    nodes = {os.path.basename(n["file"]): n["node-name"]
             for n in m.execute("query-named-block-nodes") if n["drv"] == "qcow2"}

    def err(**a):
        return m.error("change-backing-file", **a)["desc"]
    assert err(device="nope", image_node_name="top", backing_file="x") == \
        "Cannot find device='nope' nor node-name='nope'"
    assert err(device=nodes["mid.qcow2"], image_node_name="top", backing_file="x") == \
        "Need a root block node"
    assert err(device="top", image_node_name="nope", backing_file="x") == \
        "Cannot find device='' nor node-name='nope'"
    assert err(device="top", image_node_name=nodes["base.qcow2"], backing_file="x") == \
        "not allowing backing file change on an image without a backing file"
    m.execute("blockdev-add", driver="qcow2", node_name="other", read_only=True,
              file={"driver": "file", "filename": paths[1], "locking": "off"})
    assert err(device="top", image_node_name="other", backing_file="x") == \
        "'top' and image file are not in the same chain"
    m.execute("blockdev-del", node_name="other")
    m.execute("change-backing-file", device="top", image_node_name=nodes["mid.qcow2"],
              backing_file=paths[0])
    m.execute("change-backing-file", device="top", image_node_name="top",
              backing_file="./mid.qcow2")
    assert header(paths[1]) == (paths[0], "qcow2")
    assert header(paths[2]) == ("./mid.qcow2", "qcow2")
    mid = [n for n in m.execute("query-named-block-nodes") if n["node-name"] == nodes["mid.qcow2"]]
    assert mid[0]["ro"] is True            # read-write only for the change
    daemon.stop()
    for p in paths:
        qemu_img("check", "-q", p)


def test_filter_node(impl, start_daemon, tmpdir_short):
    """The job's copy-on-read node: named by filter-node-name (or
    generated), listed, busy and in use while the job runs, gone after."""
    daemon, m, paths, want, uri = serve(impl, start_daemon, tmpdir_short)

    def err(**a):
        return m.error("block-stream", device="top", job_id="s", **a)["desc"]
    assert err(filter_node_name="top") == \
        "Could not create node: Duplicate nodes with node-name='top'"
    assert err(filter_node_name="#x") == "Could not create node: Invalid node-name: '#x'"
    m.execute("block-stream", device="top", job_id="s", speed=1, filter_node_name="cor")
    drv = {n["node-name"]: n["drv"] for n in m.execute("query-named-block-nodes")}
    assert drv["cor"] == "copy-on-read"
    assert m.error("blockdev-del", node_name="cor")["desc"] == "Node cor is in use"
    assert m.error("block-stream", device="cor", job_id="t")["desc"] == \
        "Node 'cor' is busy: block device is in use by block job: stream"
    m.execute("block-job-cancel", device="s")
    m.wait_event("BLOCK_JOB_CANCELLED")
    assert "cor" not in {n["node-name"] for n in m.execute("query-named-block-nodes")}
    m.execute("block-stream", device="top", job_id="s2", speed=1)
    assert sorted(n["drv"] for n in m.execute("query-named-block-nodes")
                  if n["drv"] == "copy-on-read") == ["copy-on-read"]
    m.execute("block-job-set-speed", device="s2", speed=0)
    m.wait_event("BLOCK_JOB_COMPLETED")
    assert not [n for n in m.execute("query-named-block-nodes") if n["drv"] == "copy-on-read"]


def test_daemon_stops_during_the_job(impl, start_daemon, tmpdir_short):
    """SIGTERM while the job copies: the daemon stops cleanly, the image is
    consistent, its header still names mid, and it reads the same."""
    daemon, m, paths, want, uri = serve(impl, start_daemon, tmpdir_short)
    export(m, writable=True)
    m.execute("block-stream", device="top", job_id="s", speed=512 * 1024)
    daemon.stop()
    qemu_img("check", "-q", paths[2])
    assert header(paths[2]) == ("mid.qcow2", "qcow2")
    subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", paths[2],
                    os.path.join(tmpdir_short, "want.raw")], check=True)


@pytest.mark.parametrize("mode", ["report", "ignore", "stop"])
def test_read_errors_below(impl, start_daemon, tmpdir_short, mode):
    """base reads fail (blkdebug): report ends the job at once with the
    error; ignore goes on to the end and still fails (QEMU keeps the
    backing file after an ignored error); stop pauses it (io-status
    failed) until it is cancelled.  The chain is unchanged in every case."""
    paths, want = make_chain(tmpdir_short)
    daemon = start_daemon(impl)
    m = daemon.qmp()
    m.execute("blockdev-add", driver="qcow2", node_name="base", file={
        "driver": "blkdebug", "node-name": "dbg",
        "inject-error": [{"event": "read_aio", "errno": 5, "once": False}],
        "image": {"driver": "file", "filename": paths[0]}})
    m.execute("blockdev-add", driver="qcow2", node_name="mid", backing="base",
              file={"driver": "file", "filename": paths[1]})
    m.execute("blockdev-add", driver="qcow2", node_name="top", backing="mid",
              file={"driver": "file", "filename": paths[2]})
    m.execute("block-stream", device="top", job_id="s", on_error=mode)
    e = m.wait_event("BLOCK_JOB_ERROR")
    assert e["data"] == {"device": "s", "operation": "read", "action": mode}
    if mode == "stop":
        info = m.execute("query-block-jobs")[0]
        assert (info["status"], info["io-status"], info["offset"]) == ("paused", "failed", 0)
        m.execute("block-job-cancel", device="s", force=True)
        e = m.wait_event("BLOCK_JOB_CANCELLED")
        assert e["data"]["offset"] == 0
    else:
        e = m.wait_event("BLOCK_JOB_COMPLETED")
        assert e["data"]["error"] == "Input/output error"
        assert e["data"]["offset"] == (SIZE if mode == "ignore" else 0)
    top = [n for n in m.execute("query-named-block-nodes") if n["node-name"] == "top"][0]
    assert top["backing_file_depth"] == 2
    daemon.stop()
    assert header(paths[2]) == ("mid.qcow2", "qcow2")
    qemu_img("check", "-q", paths[2])


def bitmap_count(m, node, name):
    [b] = [b for n in m.execute("query-named-block-nodes") if n["node-name"] == node
           for b in n.get("dirty-bitmaps", []) if b.get("name") == name]
    return b["count"]


def test_copies_leave_bitmaps_clean(impl, start_daemon, tmpdir_short):
    """What the job copies into top is what top already read as: a dirty
    bitmap on top (an incremental backup's record of guest writes) stays
    clean, and a guest write during the job marks it."""
    daemon, m, paths, want, uri = serve(impl, start_daemon, tmpdir_short)
    export(m, writable=True)
    m.execute("block-dirty-bitmap-add", node="top", name="b")
    m.execute("block-stream", device="top", job_id="s")
    m.wait_event("BLOCK_JOB_COMPLETED")
    assert bitmap_count(m, "top", "b") == 0
    assert read_all(uri) == want
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x05" * 4096, 2 * MiB)
    h.shutdown()
    assert bitmap_count(m, "top", "b") == 64 * 1024
