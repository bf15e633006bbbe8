"""blockdev-mirror: a target kept equal to an exported source while clients
write, then put in its place.

A qcow2 source (some data, some zeros, holes) is exported over NBD and
mirrored into a qcow2 target node.  Checked against qemu-storage-daemon:
the errors, the events and job states, the node list while the job runs,
where the export is after block-job-complete (the target) or after a cancel
once ready (the source), the data read through the export (with writes
going on, in both copy modes), and the target image, which must read as
the source did at the switch (qemu-img compare) and hold what sync=top or
sync=none leaves out.
"""
import os
import random
import subprocess

import nbd
import pytest

from test_block_stream import MiB, SIZE, make_chain, qemu_img, qemu_io, read_all


def serve(impl, start_daemon, d, chain=False, iothread=False):
    """src exported writable as 'e', tgt an empty qcow2 image of the same
    size (with chain: src is the top of make_chain's chain)."""
    if chain:
        paths, _ = make_chain(d)
        src = paths[2]
    else:
        src = os.path.join(d, "src.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", src, str(SIZE))
        qemu_io(src, "write -P 1 0 1M", "write -z 2M 64k", "write -P 2 3M 64k")
    tgt = os.path.join(d, "tgt.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", tgt, str(SIZE))
    sock = os.path.join(d, "nbd.sock")
    daemon = start_daemon(impl, "--object", "iothread,id=io0",
                          "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    m = daemon.qmp()
    m.execute("blockdev-add", driver="qcow2", node_name="src",
              file={"driver": "file", "filename": src})
    m.execute("blockdev-add", driver="qcow2", node_name="tgt",
              file={"driver": "file", "filename": tgt})
    extra = {"iothread": "io0"} if iothread else {}
    m.execute("block-export-add", type="nbd", id="e", node_name="src", name="e",
              writable=True, **extra)
    return daemon, m, src, tgt, "nbd+unix:///e?socket=%s" % sock


def statuses(m, job, until):
    """JOB_STATUS_CHANGE statuses and BLOCK_JOB_* events of the job, in
    order, up to status `until` (and the BLOCK_JOB_READY that follows
    'ready')."""
    out = []
    while True:
        e = m.events.pop(0) if m.events else m.recv()
        name, data = e.get("event"), e.get("data", {})
        if name == "JOB_STATUS_CHANGE" and data["id"] == job:
            out.append(data["status"])
            if data["status"] == until and until != "ready":
                return out
        elif name and name.startswith("BLOCK_JOB"):
            out.append((name, {k: v for k, v in data.items() if k not in ("len", "offset")}))
            if name == "BLOCK_JOB_READY" and until == "ready":
                return out


READY = ("BLOCK_JOB_READY", {"type": "mirror", "device": "m", "speed": 0})
COMPLETED = ("BLOCK_JOB_COMPLETED", {"type": "mirror", "device": "m", "speed": 0})


def exported_node(m):
    [e] = m.execute("query-block-exports")
    return e["node-name"]


def compare(a, b):
    r = subprocess.run(["qemu-img", "compare", "-U", a, b], stdout=subprocess.PIPE)
    assert r.returncode == 0, r.stdout


def test_errors_match_qemu(impl, start_daemon, tmpdir_short):
    daemon, m, src, tgt, uri = serve(impl, start_daemon, tmpdir_short, chain=True)
    small = os.path.join(tmpdir_short, "small.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", small, "1M")
    m.execute("blockdev-add", driver="qcow2", node_name="small",
              file={"driver": "file", "filename": small})
    m.execute("blockdev-add", driver="qcow2", node_name="ro", read_only=True,
              file={"driver": "file", "filename": tgt, "locking": "off"})
    mid = [n["node-name"] for n in m.execute("query-named-block-nodes")
           if n["drv"] == "qcow2" and n["file"].endswith("mid.qcow2")][0]

    def err(**a):
        a.setdefault("job_id", "j")
        a.setdefault("sync", "full")
        e = m.error("blockdev-mirror", **a)
        return e["class"], e["desc"]
    g = "GenericError"
    assert err(device="nope", target="tgt") == \
        (g, "Cannot find device='nope' nor node-name='nope'")
    assert err(device="src", target="nope") == \
        (g, "Cannot find device='nope' nor node-name='nope'")
    assert err(device=mid, target="tgt") == (g, "Need a root block node")
    for gran in (256, 1 << 27):
        assert err(device="src", target="tgt", granularity=gran) == \
            (g, "Parameter 'granularity' expects a value in range [512B, 64MB]")
    assert err(device="src", target="tgt", granularity=3000) == \
        (g, "Parameter 'granularity' expects a power of 2")
    assert err(device="src", target=mid) == \
        (g, "Node '%s' is busy: node is used as backing hd of 'src'" % mid)
    for sync in ("incremental", "bitmap"):
        assert err(device="src", target="tgt", sync=sync) == \
            (g, "Sync mode '%s' not supported" % sync)
    assert err(device="src", target="tgt", buf_size=-1) == (g, "Invalid parameter 'buf-size'")
    assert err(device="src", target="src") == (g, "Can't mirror node into itself")
    assert err(device="src", target="tgt", job_id="") == (g, "Invalid job ID ''")
    assert err(device="src", target="tgt", speed=-1) == \
        (g, "Parameter 'speed' expects a non-negative value")
    assert err(device="src", target="ro") == (g, "Block node is read-only")
    assert err(device="src", target="tgt", replaces="nope") == \
        (g, "Failed to find node with node-name='nope'")
    assert err(device="src", target="tgt", replaces="tgt") == \
        (g, "Cannot replace 'tgt' by a node mirrored from 'src', because it cannot be "
            "guaranteed that doing so would not lead to an abrupt change of visible data")
    assert err(device="src", target="tgt", filter_node_name="src") == \
        (g, "Duplicate nodes with node-name='src'")
    assert err(device="src", target="tgt", filter_node_name="#x") == \
        (g, "Invalid node-name: '#x'")
    # a target of another size fails the job at once
    m.events.clear()                    # jobs the errors above made and failed
    m.execute("blockdev-mirror", job_id="j", device="src", target="small", sync="full")
    assert statuses(m, "j", "null") == [
        "created", "running", "aborting",
        ("BLOCK_JOB_COMPLETED", {"type": "mirror", "device": "j", "speed": 0,
                                 "error": "Source and target image have different sizes"}),
        "concluded", "null"]
    # while a job runs: its nodes are busy, its filter node is listed
    m.execute("blockdev-mirror", job_id="j", device="src", target="tgt", sync="full",
              speed=1, filter_node_name="mt")
    busy = "block device is in use by block job: mirror"
    # (QEMU's filter node takes the source's place under the export)
    assert m.error("blockdev-del", node_name="src")["desc"] == "Node 'src' is busy: " + busy
    assert m.error("blockdev-del", node_name="tgt")["desc"] == "Node tgt is in use"
    assert m.error("blockdev-mirror", job_id="k", device="src", target="small",
                   sync="full")["desc"] == "Need a root block node"
    nodes = {n["node-name"]: n for n in m.execute("query-named-block-nodes")}
    assert nodes["mt"]["drv"] == "mirror_top" and nodes["mt"]["file"] == src
    assert [(b.get("name"), b["recording"], b["granularity"])
            for b in nodes["src"]["dirty-bitmaps"]] == [(None, True, 65536)]
    assert exported_node(m) == "mt"         # QEMU's filter takes the source's place
    assert m.error("block-job-complete", device="j")["desc"] == \
        "Job 'j' in state 'running' cannot accept command verb 'complete'"
    m.execute("block-job-cancel", device="j")
    assert statuses(m, "j", "null")[-3:] == [
        ("BLOCK_JOB_CANCELLED", {"type": "mirror", "device": "j", "speed": 1}),
        "concluded", "null"]
    assert "mt" not in [n["node-name"] for n in m.execute("query-named-block-nodes")]
    assert exported_node(m) == "src"


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
@pytest.mark.parametrize("iothread", [False, True], ids=["main-loop", "iothread"])
def test_complete_under_writes(impl, start_daemon, tmpdir_short, mode, iothread):
    """Clients write all along, 32 writes in flight, while the job copies,
    once it is ready (into a few granules, which the job copies again as
    they are written), and as it completes: the export then serves the
    target, which holds every write."""
    daemon, m, src, tgt, uri = serve(impl, start_daemon, tmpdir_short, iothread=iothread)
    h = nbd.NBD()
    h.connect_uri(uri)
    mirror = bytearray(h.pread(SIZE, 0))
    rng = random.Random(5)
    busy = set()

    def finished(off, err):
        busy.discard(off)
        return 1

    def write_some(count, span=SIZE):
        for _ in range(count):
            while h.aio_in_flight() >= 32:
                h.poll(-1)
            off = rng.randrange(0, span // 4096) * 4096
            while off in busy:
                h.poll(-1)
            data = bytes([rng.randrange(16, 256)]) * 4096
            busy.add(off)
            h.aio_pwrite(data, off, completion=lambda err, off=off: finished(off, err))
            mirror[off:off + 4096] = data
    m.execute("blockdev-mirror", job_id="m", device="src", target="tgt", sync="full",
              copy_mode=mode, speed=16 * MiB, granularity=4096, buf_size=4096)
    write_some(200)
    assert statuses(m, "m", "ready") == [
        "created", "running", "ready",
        ("BLOCK_JOB_READY", {"type": "mirror", "device": "m", "speed": 16 * MiB})]
    m.execute("block-job-set-speed", device="m", speed=0)
    write_some(2000, span=64 * 4096)      # the job copies granules being written
    m.execute("block-job-complete", device="m")
    write_some(200)
    while h.aio_in_flight():
        h.poll(-1)
    assert statuses(m, "m", "null") == ["waiting", "pending", COMPLETED, "concluded", "null"]
    assert exported_node(m) == "tgt"
    assert h.pread(SIZE, 0) == bytes(mirror)
    h.pwrite(b"\x05" * 4096, 0)                  # lands in the target only
    mirror[0:4096] = b"\x05" * 4096
    if impl == "qsd" and iothread:
        # qsd 7.2 aborts when a client leaves an iothread NBD export: its
        # bug, after the checks above have passed
        daemon.expect_exit()
        h.shutdown()
        return
    h.shutdown()
    daemon.stop()
    for p in (src, tgt):
        qemu_img("check", "-q", p)
    with open(os.path.join(tmpdir_short, "want.raw"), "wb") as f:
        f.write(mirror)
    compare(tgt, os.path.join(tmpdir_short, "want.raw"))


def test_cancel_when_ready_leaves_the_source(impl, start_daemon, tmpdir_short):
    """block-job-cancel of a ready job completes it without the switch:
    the export stays on the source and the target is a copy of it."""
    daemon, m, src, tgt, uri = serve(impl, start_daemon, tmpdir_short)
    m.execute("blockdev-mirror", job_id="m", device="src", target="tgt", sync="full",
              auto_dismiss=False)
    assert statuses(m, "m", "ready") == ["created", "running", "ready", READY]
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x06" * 65536, 5 * 65536)
    m.execute("block-job-cancel", device="m")
    assert statuses(m, "m", "concluded") == ["waiting", "pending", COMPLETED, "concluded"]
    assert exported_node(m) == "src"
    h.pwrite(b"\x09" * 4096, 0)                  # the source only
    h.shutdown()
    m.execute("job-dismiss", id="m")
    daemon.stop()
    qemu_img("check", "-q", tgt)
    r = subprocess.run(["qemu-img", "compare", "-U", src, tgt], stdout=subprocess.PIPE)
    assert r.returncode == 1 and b"offset 0" in r.stdout, r.stdout
    qemu_io(src, "write -P 1 0 4k")
    compare(src, tgt)


def test_manual_finalize_switches_at_finalize(impl, start_daemon, tmpdir_short):
    daemon, m, src, tgt, uri = serve(impl, start_daemon, tmpdir_short)
    m.execute("blockdev-mirror", job_id="m", device="src", target="tgt", sync="full",
              auto_finalize=False, filter_node_name="mt")
    assert statuses(m, "m", "ready") == ["created", "running", "ready", READY]
    m.execute("block-job-complete", device="m")
    assert statuses(m, "m", "pending") == ["waiting", "pending"]
    assert exported_node(m) == "mt"
    m.execute("job-finalize", id="m")
    assert statuses(m, "m", "null")[-2:] == ["concluded", "null"]
    assert exported_node(m) == "tgt"
    assert read_all(uri) == read_all(uri)


@pytest.mark.parametrize("sync", ["top", "none"])
def test_sync_top_and_none(impl, start_daemon, tmpdir_short, sync):
    """sync=top copies what the source itself allocates, sync=none only
    what clients write during the job, into a target backed by the source's
    backing file (as a user sets it up): it then reads as the source (top),
    or as that backing file with the client's write (none)."""
    d = tmpdir_short
    daemon, m, src, tgt, uri = serve(impl, start_daemon, d, chain=True)
    m.execute("blockdev-del", node_name="tgt")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", tgt, str(SIZE))
    m.execute("blockdev-add", driver="qcow2", node_name="tgt", backing=None,
              file={"driver": "file", "filename": tgt})
    before = read_all(uri)
    m.execute("blockdev-mirror", job_id="m", device="src", target="tgt", sync=sync)
    assert statuses(m, "m", "ready") == ["created", "running", "ready", READY]
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x0a" * 4096, 3 * MiB + 8192)
    h.shutdown()
    m.execute("block-job-complete", device="m")
    assert statuses(m, "m", "null")[-2:] == ["concluded", "null"]
    daemon.stop()
    mapped = [(e["start"], e["length"]) for e in
              __import__("json").loads(qemu_img("map", "--output=json", tgt))
              if e["depth"] == 0 and e["data"]]
    # top holds [1M, 1.5M); the client wrote one 4k block, in a 64k granule
    want = [(1 * MiB, MiB // 2)] if sync == "top" else []
    assert [x for x in mapped if x[0] != 3 * MiB] == want
    assert (3 * MiB, 65536) in mapped
    if sync == "none":          # nothing of top's own: the target reads as mid does
        qemu_img("convert", "-O", "raw", os.path.join(d, "mid.qcow2"), os.path.join(d, "m.raw"))
        with open(os.path.join(d, "m.raw"), "rb") as f:
            before = f.read()
    after = bytearray(before)
    after[3 * MiB + 8192:3 * MiB + 12288] = b"\x0a" * 4096
    with open(os.path.join(d, "after.raw"), "wb") as f:
        f.write(after)
    compare(tgt, os.path.join(d, "after.raw"))


def drive_nodes(m):
    return sorted((n["node-name"] if not n["node-name"].startswith("#") else "#", n["drv"],
                   n["ro"], os.path.basename(n["file"]).split('"')[0],
                   os.path.basename(n.get("backing_file") or ""))
                  for n in m.execute("query-named-block-nodes"))


def test_drive_mirror_errors(impl, start_daemon, tmpdir_short):
    d = tmpdir_short
    daemon, m, src, tgt, uri = serve(impl, start_daemon, d, chain=True)

    def err(**a):
        a.setdefault("device", "src")
        a.setdefault("sync", "full")
        return m.error("drive-mirror", **a)["desc"]
    assert err(target=os.path.join(d, "x.qcow2"), replaces="src") == \
        "a node-name must be provided when replacing a named node of the graph"
    assert err(target=os.path.join(d, "x.raw"), sync="top", format="raw") == \
        "Backing file not supported for file format 'raw'"
    assert err(target="/nonexistent/x.qcow2") == \
        "Could not create '/nonexistent/x.qcow2': No such file or directory"
    missing = os.path.join(d, "missing.qcow2")
    assert err(target=missing, mode="existing") == \
        "Could not open '%s': No such file or directory" % missing
    # the image is made before the job's own checks, as QEMU makes it
    assert err(target=os.path.join(d, "g.qcow2"), granularity=3000) == \
        "Parameter 'granularity' expects a power of 2"
    assert os.path.exists(os.path.join(d, "g.qcow2"))
    assert not os.path.exists(os.path.join(d, "x.qcow2"))
    assert "g.qcow2" not in [r[3] for r in drive_nodes(m)]


@pytest.mark.parametrize("sync, mode, name", [
    ("full", "absolute-paths", "f.qcow2"), ("top", "absolute-paths", "t2.qcow2"),
    ("none", "absolute-paths", "n.qcow2"), ("top", "existing", "ex.qcow2"),
    ("full", "absolute-paths", "r.raw")])
def test_drive_mirror(impl, start_daemon, tmpdir_short, sync, mode, name):
    """drive-mirror makes (or finds) the target image and opens it without
    its backing file; once complete, the export serves it and its backing
    node is what sync left below (the source itself for none, the file its
    header names for an existing image)."""
    d = tmpdir_short
    daemon, m, src, tgt, uri = serve(impl, start_daemon, d, chain=True)
    if mode == "existing":
        qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
                 os.path.join(d, name), str(SIZE))
    want = read_all(uri)
    a = {"format": "raw"} if name.endswith(".raw") else {}
    m.execute("drive-mirror", device="src", target=os.path.join(d, name), sync=sync,
              mode=mode, job_id="m", node_name="dm", **a)
    assert statuses(m, "m", "ready") == ["created", "running", "ready", READY]
    during = drive_nodes(m)
    m.execute("block-job-complete", device="m")
    assert statuses(m, "m", "null")[-2:] == ["concluded", "null"]
    assert exported_node(m) == "dm"
    assert read_all(uri) == want
    after = drive_nodes(m)
    daemon.stop()
    info = __import__("json").loads(qemu_img("info", "--output=json", os.path.join(d, name)))
    backing = {"full": None, "top": "mid.qcow2", "none": "top.qcow2"}[sync]
    assert os.path.basename(info.get("backing-filename") or "") == (backing or "")
    assert (name, "mirror_top") not in [(r[3], r[1]) for r in during]
    assert [r for r in after if r[0] == "dm"] == \
        [("dm", info["format"], False, name, backing or "")]
    qemu_img("check", "-q", os.path.join(d, name)) if info["format"] == "qcow2" else None
    with open(os.path.join(d, "want.raw"), "wb") as f:
        f.write(want)
    compare(os.path.join(d, name), os.path.join(d, "want.raw"))


@pytest.mark.parametrize("mode", ["report", "ignore", "stop"])
def test_target_write_errors(impl, start_daemon, tmpdir_short, mode):
    """The target's first write fails (blkdebug, once): report ends the job
    with the error; ignore copies the range again later and the job becomes
    ready; stop pauses it (io-status failed) until block-job-resume, then it
    becomes ready.  Completed, the target holds the source's data."""
    d = tmpdir_short
    daemon, m, src, tgt, uri = serve(impl, start_daemon, d)
    m.execute("blockdev-del", node_name="tgt")
    m.execute("blockdev-add", driver="qcow2", node_name="tgt", file={
        "driver": "blkdebug", "inject-error": [{"event": "pwritev", "errno": 5, "once": True}],
        "image": {"driver": "file", "filename": tgt}})
    want = read_all(uri)
    m.execute("blockdev-mirror", job_id="m", device="src", target="tgt", sync="full",
              on_target_error=mode)
    e = m.wait_event("BLOCK_JOB_ERROR")
    assert e["data"] == {"device": "m", "operation": "write", "action": mode}
    if mode == "report":
        e = m.wait_event("BLOCK_JOB_COMPLETED")
        assert e["data"]["error"] == "Input/output error"
        assert exported_node(m) == "src"
        return
    if mode == "stop":
        while m.wait_event("JOB_STATUS_CHANGE")["data"]["status"] != "paused":
            pass                        # qsd pauses once the copies in flight are done
        info = m.execute("query-block-jobs")[0]
        assert (info["status"], info["io-status"]) == ("paused", "failed")
        m.execute("block-job-resume", device="m")
    m.wait_event("BLOCK_JOB_READY")
    m.execute("block-job-complete", device="m")
    e = m.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in e["data"]
    assert exported_node(m) == "tgt"
    assert read_all(uri) == want
    daemon.stop()
    with open(os.path.join(d, "want.raw"), "wb") as f:
        f.write(want)
    compare(tgt, os.path.join(d, "want.raw"))
