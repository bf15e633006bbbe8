"""blockdev-backup and the block-job-* commands, as qemu-storage-daemon 7.2.

Against bexd and qsd (impl): every argument error in qsd's words; the verbs
on a running job (a null-co source with speed 1 stays running after its
first piece); the events of a job's life in QEMU's order; transactions
with bitmap actions and backups, all or nothing; guest writes during a
push backup reach the target as old data (copy-before-write); and the two
incremental backup flows with real clients: push (sync=incremental into
qcow2 images, checked with qemu-img compare) and pull (fleecing with
sync=none, a snapshot-access export publishing the bitmap, a libnbd client
copying only the dirty extents), three generations each.

QEMU pauses and resumes every job around each drained section (any
blockdev-backup, transaction, blockdev-add...): its JOB_STATUS_CHANGE
stream has extra paused/running pairs that say nothing about the job.
Event comparisons drop such pairs (logical()).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile

import pytest
from conftest import tool_text, tool_json

MiB = 1 << 20


def logical(events, ids=None):
    """JOB_STATUS_CHANGE and BLOCK_JOB_* events as (event, id, status),
    without QEMU's drain pairs (a job's paused followed by its running)."""
    out = []
    for e in events:
        name, d = e["event"], e.get("data", {})
        if name == "JOB_STATUS_CHANGE":
            item = (name, d["id"], d["status"])
        elif name.startswith("BLOCK_JOB_"):
            item = (name, d.get("device", d.get("id")), d.get("action", d.get("error")))
        else:
            continue
        if ids and item[1] not in ids:
            continue
        mine = [i for i, x in enumerate(out) if x[1] == item[1]]
        if (item[0] == "JOB_STATUS_CHANGE" and item[2] == "running" and mine and
                out[mine[-1]] == ("JOB_STATUS_CHANGE", item[1], "paused")):
            del out[mine[-1]]
            continue
        out.append(item)
    return out


def drain_events(qmp, until, job, status=None):
    """Every event (kept or new) up to and including the event `until` of
    job (with that status, for JOB_STATUS_CHANGE); they leave qmp.events."""
    i = 0
    while True:
        while i >= len(qmp.events):
            qmp.events.append(qmp.recv())
        e = qmp.events[i]
        d = e.get("data", {})
        if (e["event"] == until and job in (d.get("device"), d.get("id")) and
                (status is None or d.get("status") == status)):
            got = qmp.events[:i + 1]
            del qmp.events[:i + 1]
            return got
        i += 1


def null_daemon(start_daemon, impl, size=1 * MiB, *extra):
    d = start_daemon(impl, "--blockdev", "null-co,node-name=src,size=%d" % size,
                     "--blockdev", "null-co,node-name=tgt,size=%d" % size,
                     "--blockdev", "null-co,node-name=t2,size=%d" % (2 * size),
                     "--blockdev", "null-co,node-name=s3,size=%d" % size, *extra)
    qmp = d.qmp()
    qmp.execute("block-dirty-bitmap-add", node="src", name="b")
    return qmp


B = dict(device="src", target="tgt")
ERRORS = [
    (dict(device="nosuch", target="tgt", sync="full"),
     "Cannot find device='nosuch' nor node-name='nosuch'"),
    (dict(device="src", target="nosuch", sync="full"),
     "Cannot find device='nosuch' nor node-name='nosuch'"),
    (dict(device="src", target="src", sync="full"), "Source and target cannot be the same"),
    (dict(sync="incremental", **B), "must provide a valid bitmap name for 'incremental' sync mode"),
    (dict(sync="bitmap", **B), "must provide a valid bitmap name for 'bitmap' sync mode"),
    (dict(sync="full", bitmap="nosuch", bitmap_mode="on-success", **B),
     "Bitmap 'nosuch' could not be found"),
    (dict(sync="full", bitmap="b", **B), "Bitmap sync mode must be given when providing a bitmap"),
    (dict(sync="full", bitmap_mode="always", **B),
     "Cannot specify bitmap sync mode without a bitmap"),
    (dict(sync="none", bitmap="b", bitmap_mode="always", **B),
     "sync mode 'none' does not produce meaningful bitmap outputs"),
    (dict(sync="full", bitmap="b", bitmap_mode="never", **B),
     "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'"),
    (dict(sync="incremental", bitmap="b", bitmap_mode="always", **B),
     "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
    (dict(sync="incremental", bitmap="nosuch", **B), "Bitmap 'nosuch' could not be found"),
    (dict(device="src", target="t2", sync="full"), "Source and target image have different sizes"),
    (dict(sync="full", compress=True, **B), "Compression is not supported for this drive "),
    (dict(sync="full", speed=-1, **B), "Parameter 'speed' expects a non-negative value"),
    (dict(job_id=None, sync="full", **B), "Invalid job ID ''"),
    (dict(job_id="1bad", sync="full", **B), "Invalid job ID '1bad'"),
    (dict(sync="full", x_perf={"max-workers": 0}, **B),
     "max-workers must be between 1 and 2147483647"),
    (dict(sync="full", x_perf={"max-chunk": -1}, **B),
     "max-chunk must be zero (which means no limit) or positive"),
    (dict(sync="full", x_perf={"max-chunk": 512}, **B),
     "Required max-chunk (512) is less than backup cluster size (65536)"),
    (dict(sync="full", filter_node_name="src", **B),
     "Could not create node: Duplicate nodes with node-name='src'"),
    (dict(sync="full", filter_node_name="1x", **B),
     "Could not create node: Invalid node-name: '1x'"),
]


def args_of(c):
    a = {"job-id": "j"}
    for k, v in c.items():
        k = k.replace("_", "-")
        if v is None:
            a.pop(k, None)
        else:
            a[k] = v
    return a


def test_argument_errors(impl, start_daemon):
    qmp = null_daemon(start_daemon, impl)
    for c, desc in ERRORS:
        r = qmp.request("blockdev-backup", args_of(c))
        assert r.get("error") == {"class": "GenericError", "desc": desc}, (c, r)
        # the same through a transaction, and nothing was left behind
        r = qmp.request("transaction", {"actions": [{"type": "blockdev-backup",
                                                     "data": args_of(c)}]})
        assert r.get("error") == {"class": "GenericError", "desc": desc}, (c, r)
    assert qmp.execute("query-block-jobs") == []
    assert sorted(n["node-name"] for n in qmp.execute("query-named-block-nodes")) == \
        ["s3", "src", "t2", "tgt"]
    bm = [b for n in qmp.execute("query-named-block-nodes") for b in n.get("dirty-bitmaps", [])]
    assert [b.get("name") for b in bm] == ["b"] and not bm[0]["busy"]
    # a failed speed made the job and dropped it, as QEMU's job_early_fail
    assert logical(qmp.events) == [("JOB_STATUS_CHANGE", "j", "created"),
                                   ("JOB_STATUS_CHANGE", "j", "null")] * 2


def test_block_job_not_found(impl, start_daemon):
    qmp = null_daemon(start_daemon, impl)
    for cmd, a in (("block-job-cancel", {"device": "x"}), ("block-job-pause", {"device": "x"}),
                   ("block-job-resume", {"device": "x"}), ("block-job-complete", {"device": "x"}),
                   ("block-job-set-speed", {"device": "x", "speed": 1}),
                   ("block-job-finalize", {"id": "x"}), ("block-job-dismiss", {"id": "x"})):
        assert qmp.request(cmd, a)["error"] == {"class": "DeviceNotActive",
                                                "desc": "Block job 'x' not found"}
    assert qmp.execute("query-block-jobs") == []


def job_info(qmp, job):
    [info] = [j for j in qmp.execute("query-block-jobs") if j["device"] == job]
    return info


def test_running_job_verbs_and_events(impl, start_daemon):
    qmp = null_daemon(start_daemon, impl, 64 * MiB,
                      "--blockdev", "null-co,node-name=t4,size=%d" % (64 * MiB))
    qmp.execute("blockdev-backup", job_id="r", device="src", target="tgt", sync="full",
                speed=1, filter_node_name="f", bitmap="b", bitmap_mode="on-success")
    info = job_info(qmp, "r")
    assert info == {"type": "backup", "device": "r", "len": 64 * MiB, "offset": MiB,
                    "busy": False, "paused": False, "speed": 1, "io-status": "ok",
                    "ready": False, "status": "running", "auto-finalize": True,
                    "auto-dismiss": True}
    assert [j["id"] for j in qmp.execute("query-jobs")] == ["r"]
    busy = "Node '%s' is busy: block device is in use by block job: backup"
    assert qmp.error("blockdev-del", node_name="f")["desc"] == busy % "f"
    assert qmp.error("blockdev-del", node_name="tgt")["desc"] == busy % "tgt"
    assert qmp.error("blockdev-backup", job_id="r2", device="s3", target="tgt",
                     sync="full")["desc"] == busy % "tgt"
    assert qmp.error("blockdev-backup", job_id="r2", device="src", target="t2", sync="full",
                     bitmap="b", bitmap_mode="always")["desc"] == \
        "Bitmap 'b' is currently in use by another operation and cannot be used"
    assert qmp.error("block-dirty-bitmap-clear", node="src", name="b")["desc"] == \
        "Bitmap 'b' is currently in use by another operation and cannot be used"
    assert qmp.error("blockdev-backup", job_id="r", device="s3", target="t4",
                     sync="full")["desc"] == "Job ID 'r' already in use"
    assert qmp.error("block-job-set-speed", device="r", speed=-1)["desc"] == \
        "Parameter 'speed' expects a non-negative value"
    assert qmp.error("block-job-complete", device="r")["desc"] == \
        "Job 'r' in state 'running' cannot accept command verb 'complete'"
    assert qmp.error("block-job-resume", device="r")["desc"] == \
        "Can't resume a job that was not paused"
    assert qmp.error("block-job-finalize", id="r")["desc"] == \
        "Job 'r' in state 'running' cannot accept command verb 'finalize'"
    assert qmp.error("block-job-dismiss", id="r")["desc"] == \
        "Job 'r' in state 'running' cannot accept command verb 'dismiss'"
    qmp.execute("block-job-pause", device="r")
    assert qmp.error("block-job-pause", device="r")["desc"] == "Job is already paused"
    info = job_info(qmp, "r")
    assert (info["status"], info["paused"], info["offset"]) == ("paused", True, MiB)
    assert qmp.error("block-job-cancel", device="r")["desc"] == \
        "The block job for device 'r' is currently paused"
    qmp.execute("block-job-resume", device="r")
    qmp.execute("block-job-cancel", device="r", force=True)
    ev = drain_events(qmp, "JOB_STATUS_CHANGE", "r", "null")
    [c] = [e for e in ev if e["event"] == "BLOCK_JOB_CANCELLED"]
    assert c["data"] == {"type": "backup", "device": "r", "len": 64 * MiB, "offset": MiB,
                         "speed": 1}
    assert logical(ev, ["r"]) == [
        # (the user's pause and resume look like a drain's: dropped)
        ("JOB_STATUS_CHANGE", "r", "created"), ("JOB_STATUS_CHANGE", "r", "running"),
        ("JOB_STATUS_CHANGE", "r", "aborting"), ("BLOCK_JOB_CANCELLED", "r", None),
        ("JOB_STATUS_CHANGE", "r", "concluded"), ("JOB_STATUS_CHANGE", "r", "null")]
    assert qmp.execute("query-block-jobs") == []
    nodes = {n["node-name"]: n for n in qmp.execute("query-named-block-nodes")}
    assert sorted(nodes) == ["s3", "src", "t2", "t4", "tgt"]
    # cancelled: bitmap-mode on-success gave the bitmap back, recording
    [b] = [b for b in nodes["src"]["dirty-bitmaps"] if b.get("name") == "b"]
    assert (b["busy"], b["recording"]) == (False, True)
    qmp.execute("blockdev-del", node_name="tgt")


def test_set_speed_lets_the_job_finish(impl, start_daemon):
    qmp = null_daemon(start_daemon, impl, 64 * MiB)
    qmp.execute("blockdev-backup", job_id="r", device="src", target="tgt", sync="full", speed=1)
    while job_info(qmp, "r")["offset"] < MiB:     # the first piece, then the limit
        pass
    qmp.execute("block-job-set-speed", device="r", speed=0)
    e = qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert e["data"] == {"type": "backup", "device": "r", "len": 64 * MiB,
                         "offset": 64 * MiB, "speed": 0}


def test_manual_finalize_and_dismiss(impl, start_daemon):
    qmp = null_daemon(start_daemon, impl, 4 * MiB)
    qmp.execute("blockdev-backup", job_id="m", device="src", target="tgt", sync="full",
                auto_finalize=False, auto_dismiss=False)
    ev = drain_events(qmp, "BLOCK_JOB_PENDING", "m")
    info = job_info(qmp, "m")
    assert (info["status"], info["offset"], info["len"]) == ("pending", 4 * MiB, 4 * MiB)
    assert qmp.error("block-job-dismiss", id="m")["desc"] == \
        "Job 'm' in state 'pending' cannot accept command verb 'dismiss'"
    qmp.execute("block-job-finalize", id="m")
    assert job_info(qmp, "m")["status"] == "concluded"
    qmp.execute("block-job-dismiss", id="m")
    ev += drain_events(qmp, "JOB_STATUS_CHANGE", "m", "null")
    assert logical(ev, ["m"]) == [
        ("JOB_STATUS_CHANGE", "m", "created"), ("JOB_STATUS_CHANGE", "m", "running"),
        ("JOB_STATUS_CHANGE", "m", "waiting"), ("JOB_STATUS_CHANGE", "m", "pending"),
        ("BLOCK_JOB_PENDING", "m", None), ("BLOCK_JOB_COMPLETED", "m", None),
        ("JOB_STATUS_CHANGE", "m", "concluded"), ("JOB_STATUS_CHANGE", "m", "null")]
    assert qmp.execute("query-block-jobs") == []


def test_transaction_all_or_nothing(impl, start_daemon):
    qmp = null_daemon(start_daemon, impl, 64 * MiB)
    # a backup that fails takes the bitmap added before it away
    r = qmp.request("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "n"}},
        {"type": "blockdev-backup", "data": {"job-id": "j", "device": "src", "target": "t2",
                                             "sync": "full"}}]})
    assert r["error"]["desc"] == "Source and target image have different sizes"
    names = [b.get("name") for n in qmp.execute("query-named-block-nodes")
             for b in n.get("dirty-bitmaps", [])]
    assert names == ["b"]
    # a backup prepared before a failing action is cancelled before it runs
    r = qmp.request("transaction", {"actions": [
        {"type": "blockdev-backup", "data": {"job-id": "j", "device": "src", "target": "tgt",
                                             "sync": "full", "bitmap": "b",
                                             "bitmap-mode": "on-success"}},
        {"type": "abort", "data": {}}]})
    assert r["error"]["desc"] == "Transaction aborted using Abort action"
    assert qmp.execute("query-block-jobs") == []
    assert logical(qmp.events) == [
        ("JOB_STATUS_CHANGE", "j", "created"), ("JOB_STATUS_CHANGE", "j", "aborting"),
        ("JOB_STATUS_CHANGE", "j", "concluded"), ("JOB_STATUS_CHANGE", "j", "null")]
    qmp.events.clear()
    nodes = {n["node-name"]: n for n in qmp.execute("query-named-block-nodes")}
    assert sorted(nodes) == ["s3", "src", "t2", "tgt"]
    assert [(b.get("name"), b["busy"]) for b in nodes["src"]["dirty-bitmaps"]] == [("b", False)]
    # bitmap actions do not take completion-mode grouped
    r = qmp.request("transaction", {"properties": {"completion-mode": "grouped"}, "actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "n"}}]})
    assert r["error"]["desc"] == ("Action 'block-dirty-bitmap-add' does not support "
                                  "Transaction property completion-mode = grouped")


def test_grouped_jobs_fail_together(impl, start_daemon):
    qmp = null_daemon(start_daemon, impl, 64 * MiB,
                      "--blockdev", "null-co,node-name=t3,size=%d" % (64 * MiB))
    qmp.execute("transaction", properties={"completion-mode": "grouped"}, actions=[
        {"type": "blockdev-backup", "data": {"job-id": "g1", "device": "src", "target": "tgt",
                                             "sync": "full", "speed": 1}},
        {"type": "blockdev-backup", "data": {"job-id": "g2", "device": "s3", "target": "t3",
                                             "sync": "full", "speed": 1}}])
    assert logical(qmp.events) == [
        ("JOB_STATUS_CHANGE", "g1", "created"), ("JOB_STATUS_CHANGE", "g2", "created"),
        ("JOB_STATUS_CHANGE", "g1", "running"), ("JOB_STATUS_CHANGE", "g2", "running")]
    qmp.events.clear()
    qmp.execute("block-job-cancel", device="g1")
    got = set()
    while len(got) < 2:
        e = qmp.wait_event("BLOCK_JOB_CANCELLED")
        got.add(e["data"]["device"])
    assert got == {"g1", "g2"}


def write_random(path, size, seed):
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(0, size, 2 * MiB):
            f.seek(i)
            f.write(rnd.randbytes(MiB))


def qemu_io(uri, *cmds):
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv + [uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=120)
    out = tool_text(r.stdout)
    assert r.returncode == 0 and "failed" not in out and "error" not in out.lower(), out
    return out


def img_compare(a, b, fmt_b="raw", fmt_a="raw"):
    return subprocess.run(["qemu-img", "compare", "-U", "-f", fmt_a, "-F", fmt_b, a, b],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)


def test_guest_writes_copy_old_data_first(impl, start_daemon, tmpdir_short):
    """A write during a push backup reaches the target as the old data."""
    size = 16 * MiB
    img = os.path.join(tmpdir_short, "src.img")
    tgt = os.path.join(tmpdir_short, "tgt.img")
    ref = os.path.join(tmpdir_short, "ref.img")
    write_random(img, size, 1)
    shutil.copyfile(img, ref)
    with open(tgt, "wb") as f:
        f.truncate(size)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s" % img,
                     "--blockdev", "driver=raw,node-name=disk,file=f0",
                     "--blockdev", "driver=file,node-name=tgt,filename=%s" % tgt,
                     "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                     "--export", "nbd,id=w,node-name=disk,name=w,writable=on")
    qmp = d.qmp()
    uri = "nbd+unix:///w?socket=" + sock
    qmp.execute("block-dirty-bitmap-add", node="tgt", name="t")
    qmp.execute("blockdev-backup", job_id="p", device="disk", target="tgt", sync="full",
                speed=1)
    while job_info(qmp, "p")["offset"] < MiB:     # the first piece, then the limit
        pass
    # overwrite data the job has not copied yet, and some it has
    qemu_io(uri, "write -P 0x61 8M 100k", "write -z 12M 1M", "write -P 0x62 4k 4k")
    qmp.execute("block-job-set-speed", device="p", speed=0)
    e = qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in e["data"] and e["data"]["offset"] == size
    assert img_compare(ref, tgt).returncode == 0
    assert img_compare(img, tgt).returncode == 1      # the live image moved on
    # the job's writes marked the target's bitmap
    [t] = [b for n in qmp.execute("query-named-block-nodes") if n["node-name"] == "tgt"
           for b in n["dirty-bitmaps"]]
    assert t["count"] == size


def new_generation(qmp, d, img, gen, size, prev):
    """Generation gen of a push backup chain: a copy of the image as it is
    now (ref<gen>.img, what the backup must hold) and a qcow2 target
    gen<gen>.qcow2 over the previous one, added as node t<gen>."""
    ref = os.path.join(d, "ref%d.img" % gen)
    shutil.copyfile(img, ref)
    path = os.path.join(d, "gen%d.qcow2" % gen)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)]
    if prev:
        argv[5:5] = ["-b", prev, "-F", "qcow2"]
    subprocess.run(argv, check=True)
    qmp.execute("blockdev-add", node_name="t%d" % gen, driver="qcow2",
                file={"driver": "file", "filename": path})
    return ref, path


def test_push_incremental_three_generations(impl, start_daemon, tmpdir_short):
    """sync=full into a qcow2 image, then twice sync=incremental into qcow2
    overlays of the previous one: each chain equals the image at its
    backup's start, and holds only the clusters written since."""
    size = 16 * MiB
    img = os.path.join(tmpdir_short, "src.img")
    write_random(img, size, 2)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s" % img,
                     "--blockdev", "driver=raw,node-name=disk,file=f0",
                     "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                     "--export", "nbd,id=w,node-name=disk,name=w,writable=on")
    qmp = d.qmp()
    uri = "nbd+unix:///w?socket=" + sock
    prev = None
    writes = [None, ("write -P 0x11 1M 64k", "write -P 0x12 5M 200k"),
              ("write -P 0x21 1M 4k", "write -z 9M 1M", "write -P 0x22 15M 64k")]
    for gen in range(3):
        if writes[gen]:
            qemu_io(uri, *writes[gen])
        ref, path = new_generation(qmp, tmpdir_short, img, gen, size, prev)
        if gen == 0:
            qmp.execute("transaction", actions=[
                {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "inc"}},
                {"type": "blockdev-backup", "data": {"job-id": "b0", "device": "disk",
                                                     "target": "t0", "sync": "full"}}])
        else:
            qmp.execute("blockdev-backup", job_id="b%d" % gen, device="disk",
                        target="t%d" % gen, sync="incremental", bitmap="inc")
        # a write after the start is not in this generation
        qemu_io(uri, "write -P 0x7%d 3M 64k" % gen)
        e = qmp.wait_event("BLOCK_JOB_COMPLETED")
        assert e["data"]["device"] == "b%d" % gen and "error" not in e["data"], e
        qmp.execute("blockdev-del", node_name="t%d" % gen)
        r = img_compare(ref, path, "qcow2")
        assert r.returncode == 0, r.stdout
        if gen:
            # only the clusters written since the previous backup were copied
            m = json.loads(subprocess.run(["qemu-img", "map", "-U", "--output=json", path],
                                          check=True, stdout=subprocess.PIPE).stdout)
            own = sum(x["length"] for x in m if x["depth"] == 0 and x["data"])
            dirty = {1: 64 * 1024 + 4 * 64 * 1024 + 64 * 1024,   # 5M+200k spans 4 clusters
                     2: 64 * 1024 + MiB + 64 * 1024 + 64 * 1024}[gen]
            assert own <= dirty, (own, m)
        # the bitmap now holds the write made after the start
        [b] = [b for n in qmp.execute("query-named-block-nodes") if n["node-name"] == "disk"
               for b in n["dirty-bitmaps"]]
        assert (b["name"], b["count"], b["busy"]) == ("inc", 64 * 1024, False)
        prev = path


# ---- pull mode: fleecing, a snapshot export with the bitmap, a libnbd client ----

def dirty_extents(h, ctx, size):
    """(offset, length) of the dirty extents of meta context ctx."""
    out = []
    off = 0
    while off < size:
        got = []

        def cb(meta, o, entries, err):
            if meta == ctx:
                got.append((o, list(entries)))
            return 0
        h.block_status(min(size - off, 1 << 30), off, cb)
        [(o, entries)] = got
        for i in range(0, len(entries), 2):
            if entries[i + 1] & 1:
                if out and out[-1][0] + out[-1][1] == o:
                    out[-1] = (out[-1][0], out[-1][1] + entries[i])
                else:
                    out.append((o, entries[i]))
            o += entries[i]
        off = o
    return out


def copy_dirty(uri, bitmap, path):
    """The backup client: read only the extents dirty in qemu:dirty-bitmap:
    bitmap from the export into the previous copy at path.  Returns bytes copied."""
    import nbd
    ctx = "qemu:dirty-bitmap:" + bitmap
    h = nbd.NBD()
    h.add_meta_context(ctx)
    h.connect_uri(uri)
    assert h.can_meta_context(ctx)
    size = h.get_size()
    done = 0
    with open(path, "r+b") as f:
        for o, n in dirty_extents(h, ctx, size):
            done += n
            while n:
                k = min(n, 4 * MiB)
                f.seek(o)
                f.write(h.pread(k, o))
                o += k
                n -= k
    h.shutdown()
    return done


class Pull:
    """A daemon serving a raw image over NBD (export w), and the pull-mode
    backup flow of docs/backup.md around it."""

    def __init__(self, impl, start_daemon, tmp, size, img=None, persistent=False):
        self.impl, self.tmp, self.size = impl, tmp, size
        self.img = img or os.path.join(tmp, "disk.img")
        if not img:
            write_random(self.img, size, 5)
        self.sock = os.path.join(tmp, "nbd.sock")
        self.start_daemon = start_daemon
        self.persistent = persistent
        self.start()

    def start(self):
        self.d = self.start_daemon(
            self.impl, "--blockdev", "driver=file,node-name=f0,filename=%s" % self.img,
            "--blockdev", "driver=raw,node-name=disk,file=f0",
            "--nbd-server", "addr.type=unix,addr.path=%s" % self.sock,
            "--export", "nbd,id=w,node-name=disk,name=w,writable=on")
        self.qmp = self.d.qmp()

    def uri(self, name):
        return "nbd+unix:///%s?socket=%s" % (name, self.sock)

    def fio(self, seed):
        subprocess.run(["fio", "--name=w", "--ioengine=nbd", "--uri=" + self.uri("w"),
                        "--rw=randwrite", "--bs=4k", "--size=%d" % self.size,
                        "--io_size=1M", "--iodepth=8", "--randseed=%d" % seed,
                        "--output=/dev/null"], check=True, timeout=300)

    def bitmaps(self):
        return {b["name"]: b for n in self.qmp.execute("query-named-block-nodes")
                if n["node-name"] == "disk" for b in n.get("dirty-bitmaps", []) if "name" in b}

    def generation(self, gen, since, new, copy):
        """Freeze (a new bitmap `new`; the bitmap `since`, if any, stops),
        write after the freeze, copy the frozen view into copy: everything,
        or what `since` says changed.  Returns (bytes copied, reference)."""
        ref = os.path.join(self.tmp, "ref%d.img" % gen)
        shutil.copyfile(self.img, ref)       # nothing writes now: the frozen view
        tmp = os.path.join(self.tmp, "fleece%d.img" % gen)
        with open(tmp, "wb") as f:
            f.truncate(self.size)
        q = self.qmp
        q.execute("blockdev-add", driver="file", node_name="tmp%d" % gen, filename=tmp)
        add = {"node": "disk", "name": new}
        if self.persistent:
            add["persistent"] = True
        actions = [{"type": "block-dirty-bitmap-add", "data": add}]
        if since:
            actions.append({"type": "block-dirty-bitmap-disable",
                            "data": {"node": "disk", "name": since}})
        actions.append({"type": "blockdev-backup", "data": {
            "job-id": "fleece%d" % gen, "device": "disk", "target": "tmp%d" % gen,
            "sync": "none", "filter-node-name": "cbw%d" % gen}})
        q.execute("transaction", actions=actions)
        q.execute("blockdev-add", driver="snapshot-access", node_name="snap%d" % gen,
                  file="cbw%d" % gen)
        exp = {"type": "nbd", "id": "s%d" % gen, "node-name": "snap%d" % gen,
               "name": "s%d" % gen}
        if since:
            exp["bitmaps"] = [{"node": "disk", "name": since}]
        q.execute("block-export-add", **exp)
        # a write after the freeze is absent from the copy
        qemu_io(self.uri("w"), "write -P 0x%02x %d 64k" % (0x40 + gen, (gen * 5 + 1) * MiB))
        if since:
            copied = copy_dirty(self.uri("s%d" % gen), since, copy)
        else:
            subprocess.run(["nbdcopy", self.uri("s%d" % gen), copy], check=True, timeout=300)
            copied = self.size
        q.execute("block-export-del", id="s%d" % gen)
        q.wait_event("BLOCK_EXPORT_DELETED")
        q.execute("blockdev-del", node_name="snap%d" % gen)
        q.execute("block-job-cancel", device="fleece%d" % gen)
        e = q.wait_event("BLOCK_JOB_CANCELLED")
        assert e["data"]["device"] == "fleece%d" % gen
        q.execute("blockdev-del", node_name="tmp%d" % gen)
        if since:
            q.execute("block-dirty-bitmap-remove", node="disk", name=since)
        os.unlink(tmp)
        return copied, ref


def check_copy(copy, ref, img, gen):
    r = img_compare(ref, copy)
    assert r.returncode == 0, r.stdout        # the frozen view, whole
    with open(copy, "rb") as f, open(img, "rb") as g:
        at = (gen * 5 + 1) * MiB
        f.seek(at)
        g.seek(at)
        assert f.read(65536) != g.read(65536)  # the later write is not in it


def test_pull_incremental_three_generations(impl, start_daemon, tmpdir_short):
    size = 32 * MiB
    p = Pull(impl, start_daemon, tmpdir_short, size)
    copy = os.path.join(tmpdir_short, "copy.img")
    copied, ref = p.generation(0, None, "b0", copy)
    check_copy(copy, ref, p.img, 0)
    for gen in (1, 2):
        p.fio(gen)
        dirty = p.bitmaps()["b%d" % (gen - 1)]["count"]
        assert 0 < dirty < size // 2
        copied, ref = p.generation(gen, "b%d" % (gen - 1), "b%d" % gen, copy)
        assert copied == dirty                # only what changed since the last one
        check_copy(copy, ref, p.img, gen)
    assert list(p.bitmaps()) == ["b2"]


def test_pull_after_restart_and_after_kill(start_daemon, tmpdir_short):
    """bexd only (persistent bitmaps of raw images, kept in a sidecar): the
    bitmap survives a clean restart and the next backup is incremental;
    after kill -9 it comes back inconsistent and the flow falls back to a
    full copy."""
    size = 16 * MiB
    p = Pull("bexd", start_daemon, tmpdir_short, size, persistent=True)
    copy = os.path.join(tmpdir_short, "copy.img")
    copied, ref = p.generation(0, None, "b0", copy)
    check_copy(copy, ref, p.img, 0)
    p.fio(1)
    dirty = p.bitmaps()["b0"]["count"]
    p.qmp.execute("quit")
    p.d.wait_exit()
    p.start()
    b = p.bitmaps()["b0"]
    assert (b["count"], b["persistent"], b.get("inconsistent", False)) == (dirty, True, False)
    copied, ref = p.generation(1, "b0", "b1", copy)
    assert copied == dirty
    check_copy(copy, ref, p.img, 1)
    p.fio(2)
    p.d.stop(signal.SIGKILL)
    p.start()
    b = p.bitmaps()["b1"]
    assert b["inconsistent"] is True
    assert p.qmp.error("block-dirty-bitmap-disable", node="disk", name="b1")["desc"].startswith(
        "Bitmap 'b1' is inconsistent and cannot be used")
    # fall back: drop it, start over with a full copy and a new bitmap
    p.qmp.execute("block-dirty-bitmap-remove", node="disk", name="b1")
    copied, ref = p.generation(2, None, "b2", copy)
    assert copied == size
    check_copy(copy, ref, p.img, 2)
    assert p.bitmaps()["b2"]["persistent"] is True


# ---- I/O errors: a target on a full file system ----

@pytest.fixture
def small_fs(tmpdir_short):
    """A 2 MiB tmpfs (needs the right to mount): writes past it fail with ENOSPC."""
    mnt = os.path.join(tmpdir_short, "mnt")
    os.mkdir(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", mnt],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode:
        pytest.skip("cannot mount a tmpfs: %s" % tool_text(r.stdout).strip())
    yield mnt
    subprocess.run(["umount", "-l", mnt])


def enospc_daemon(impl, start_daemon, mnt):
    size = 8 * MiB
    with open(os.path.join(mnt, "t.img"), "wb") as f:
        f.truncate(size)
    d = start_daemon(impl, "--blockdev", "null-co,node-name=src,size=%d" % size,
                     "--blockdev", "driver=file,node-name=tgt,filename=%s/t.img" % mnt)
    qmp = d.qmp()
    qmp.execute("block-dirty-bitmap-add", node="src", name="b")
    return qmp


def test_target_error_report(impl, start_daemon, small_fs):
    qmp = enospc_daemon(impl, start_daemon, small_fs)
    qmp.execute("blockdev-backup", job_id="r", device="src", target="tgt", sync="full",
                bitmap="b", bitmap_mode="always")
    ev = drain_events(qmp, "JOB_STATUS_CHANGE", "r", "null")
    assert logical(ev) == [
        ("JOB_STATUS_CHANGE", "r", "created"), ("JOB_STATUS_CHANGE", "r", "running"),
        ("BLOCK_JOB_ERROR", "r", "report"), ("JOB_STATUS_CHANGE", "r", "aborting"),
        ("BLOCK_JOB_COMPLETED", "r", "No space left on device"),
        ("JOB_STATUS_CHANGE", "r", "concluded"), ("JOB_STATUS_CHANGE", "r", "null")]
    [done] = [e["data"] for e in ev if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert 0 < done["offset"] < done["len"] == 8 * MiB
    # bitmap-mode always: the bitmap holds what was not copied
    [b] = [b for n in qmp.execute("query-named-block-nodes") if n["node-name"] == "src"
           for b in n["dirty-bitmaps"]]
    assert (b["name"], b["count"], b["busy"]) == ("b", done["len"] - done["offset"], False)


def test_target_error_stop_and_resume(impl, start_daemon, small_fs):
    qmp = enospc_daemon(impl, start_daemon, small_fs)
    qmp.execute("blockdev-backup", job_id="r", device="src", target="tgt", sync="full",
                on_target_error="enospc")
    ev = drain_events(qmp, "BLOCK_JOB_ERROR", "r")
    assert ev[-1]["data"] == {"device": "r", "operation": "write", "action": "stop"}
    info = job_info(qmp, "r")
    assert (info["status"], info["paused"], info["io-status"]) == ("paused", True, "nospace")
    assert qmp.error("block-job-cancel", device="r")["desc"] == \
        "The block job for device 'r' is currently paused"
    # resuming clears the io-status and tries again: the same error stops it again
    qmp.execute("block-job-resume", device="r")
    ev = drain_events(qmp, "BLOCK_JOB_ERROR", "r")
    assert ev[-1]["data"]["action"] == "stop"
    qmp.execute("block-job-cancel", device="r", force=True)
    ev = drain_events(qmp, "JOB_STATUS_CHANGE", "r", "null")
    assert ("BLOCK_JOB_CANCELLED", "r", None) in logical(ev)
    assert qmp.execute("query-block-jobs") == []


def test_sync_top_copies_the_top_layer(impl, start_daemon, tmpdir_short):
    size = 8 * MiB
    base = os.path.join(tmpdir_short, "base.qcow2")
    top = os.path.join(tmpdir_short, "top.qcow2")
    tgt = os.path.join(tmpdir_short, "tgt.img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(size)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", base], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                    top, str(size)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 64k",
                    "-c", "write -P 0x33 5M 128k", top], check=True, stdout=subprocess.DEVNULL)
    with open(tgt, "wb") as f:
        f.truncate(size)
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s" % top,
                     "--blockdev", "driver=qcow2,node-name=disk,file=f0",
                     "--blockdev", "driver=file,node-name=tgt,filename=%s" % tgt)
    qmp = d.qmp()
    qmp.execute("blockdev-backup", job_id="t", device="disk", target="tgt", sync="top")
    e = qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in e["data"]
    assert e["data"]["len"] == e["data"]["offset"] == 192 * 1024
    with open(tgt, "rb") as f:
        data = f.read()
    want = bytearray(size)
    want[MiB:MiB + 65536] = b"\x22" * 65536
    want[5 * MiB:5 * MiB + 131072] = b"\x33" * 131072
    assert data == bytes(want)


def test_quit_with_running_jobs(impl, start_daemon, tmpdir_short):
    """quit cancels a rate-limited push backup and a fleecing job (with a
    snapshot export over its filter) and exits."""
    size = 16 * MiB
    img = os.path.join(tmpdir_short, "src.img")
    write_random(img, size, 3)
    for n in ("t1.img", "t2.img"):
        with open(os.path.join(tmpdir_short, n), "wb") as f:
            f.truncate(size)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s" % img,
                     "--blockdev", "driver=raw,node-name=disk,file=f0",
                     "--blockdev", "driver=file,node-name=t1,filename=%s/t1.img" % tmpdir_short,
                     "--blockdev", "driver=file,node-name=t2,filename=%s/t2.img" % tmpdir_short,
                     "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                     "--export", "nbd,id=w,node-name=disk,name=w,writable=on")
    qmp = d.qmp()
    qmp.execute("block-dirty-bitmap-add", node="disk", name="b")
    qmp.execute("transaction", actions=[
        {"type": "blockdev-backup", "data": {"job-id": "push", "device": "disk",
                                             "target": "t1", "sync": "full", "speed": 1}},
        {"type": "blockdev-backup", "data": {"job-id": "fleece", "device": "disk",
                                             "target": "t2", "sync": "none",
                                             "filter-node-name": "cbw"}}])
    qmp.execute("blockdev-add", driver="snapshot-access", node_name="snap", file="cbw")
    qmp.execute("block-export-add", type="nbd", id="s", node_name="snap", name="s")
    qemu_io("nbd+unix:///w?socket=" + sock, "write -P 0x55 0 2M")
    assert {j["device"]: j["status"] for j in qmp.execute("query-block-jobs")} == \
        {"push": "running", "fleece": "running"}
    qmp.execute("quit")
    d.wait_exit()
    assert not d.alive()


def test_source_not_resized_while_the_job_runs(impl, start_daemon, tmpdir_short):
    for n in ("s.img", "t.img"):
        with open(os.path.join(tmpdir_short, n), "wb") as f:
            f.truncate(64 * MiB)
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=src,filename=%s/s.img" % tmpdir_short,
                     "--blockdev", "driver=file,node-name=tgt,filename=%s/t.img" % tmpdir_short)
    qmp = d.qmp()
    qmp.execute("blockdev-backup", job_id="r", device="src", target="tgt", sync="full", speed=1,
                filter_node_name="f")
    assert qmp.error("block_resize", node_name="src", size=128 * MiB)["desc"] == (
        "Permission conflict on node 'src': permissions 'resize' are both required by an "
        "unnamed block device (uses node 'src' as 'root' child) and unshared by node 'f' "
        "(uses node 'src' as 'file' child).")
    # the target is the job's: QEMU's op blocker, with its "(null)" device name
    assert qmp.error("block_resize", node_name="tgt", size=128 * MiB)["desc"] == \
        "Device '(null)' is in use"
    qmp.execute("block-job-cancel", device="r")
    drain_events(qmp, "JOB_STATUS_CHANGE", "r", "null")
    qmp.execute("block_resize", node_name="src", size=128 * MiB)


@pytest.mark.parametrize("policy", ["report", "ignore"])
def test_source_read_error(impl, start_daemon, tmpdir_short, policy):
    """A read error of the source (blkdebug, once, at 1 MiB): report fails
    the job; ignore retries and the backup completes whole."""
    size = 8 * MiB
    img = os.path.join(tmpdir_short, "src.img")
    tgt = os.path.join(tmpdir_short, "tgt.img")
    write_random(img, size, 9)
    with open(tgt, "wb") as f:
        f.truncate(size)
    src = {"driver": "raw", "node-name": "src",
           "file": {"driver": "blkdebug",
                    "inject-error": [{"event": "read_aio", "errno": 5,
                                      "once": True}],
                    "image": {"driver": "file", "filename": img}}}
    d = start_daemon(impl, "--blockdev", json.dumps(src),
                     "--blockdev", "driver=file,node-name=tgt,filename=%s" % tgt)
    qmp = d.qmp()
    qmp.execute("blockdev-backup", job_id="r", device="src", target="tgt", sync="full",
                on_source_error=policy)
    ev = drain_events(qmp, "JOB_STATUS_CHANGE", "r", "null")
    errs = [e["data"] for e in ev if e["event"] == "BLOCK_JOB_ERROR"]
    assert errs == [{"device": "r", "operation": "read", "action": policy}]
    [done] = [e["data"] for e in ev if e["event"] == "BLOCK_JOB_COMPLETED"]
    if policy == "report":
        assert done["error"] == "Input/output error"
    else:
        assert "error" not in done and done["offset"] == done["len"] == size
        assert img_compare(img, tgt).returncode == 0


def x_perf_daemon(impl, start_daemon, tmpdir, size, fail_at=None):
    """A random source (1 MiB of data every 2 MiB) and a raw target whose
    writes covering byte fail_at fail with EIO (blkdebug)."""
    img = os.path.join(tmpdir, "src.img")
    tgt = os.path.join(tmpdir, "tgt.img")
    write_random(img, size, 21)
    with open(tgt, "wb") as f:
        f.truncate(size)
    target = {"driver": "raw", "node-name": "tgt",
              "file": {"driver": "file", "filename": tgt}}
    if fail_at is not None:
        target["file"] = {"driver": "blkdebug", "image": target["file"],
                          "inject-error": [{"event": "write_aio", "errno": 5,
                                            "sector": fail_at // 512}]}
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=src,filename=%s" % img,
                     "--blockdev", json.dumps(target))
    return d.qmp(), img, tgt


@pytest.mark.parametrize("chunk", [None, 65536])
def test_x_perf_one_worker_copies_in_order(impl, start_daemon, tmpdir_short, chunk):
    """x-perf max-workers=1: one copy at a time, in order, so a target write
    failing at 4 MiB + 68 KiB ends the job with exactly what precedes its
    copy copied: the whole 1 MiB data extent at 4 MiB is one copy, or with
    max-chunk=64 KiB one cluster is.  (With more workers the copies after
    it run too and the offset is larger.)"""
    size = 8 * MiB
    qmp, img, tgt = x_perf_daemon(impl, start_daemon, tmpdir_short, size,
                                  fail_at=4 * MiB + 68 * 1024)
    perf = {"max-workers": 1}
    if chunk:
        perf["max-chunk"] = chunk
    qmp.execute("blockdev-backup", job_id="r", device="src", target="tgt", sync="full",
                x_perf=perf)
    ev = drain_events(qmp, "JOB_STATUS_CHANGE", "r", "null")
    [done] = [e["data"] for e in ev if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert done["error"] == "Input/output error"
    assert (done["offset"], done["len"]) == (4 * MiB + (chunk or 0), size)
    with open(img, "rb") as a, open(tgt, "rb") as b:
        assert a.read(done["offset"]) == b.read(done["offset"])


@pytest.mark.parametrize("perf", [{"max-workers": 3, "max-chunk": 131072},
                                  {"max-workers": 64}, {"use-copy-range": False}])
def test_x_perf_backup_is_whole(impl, start_daemon, tmpdir_short, perf):
    """Any x-perf setting gives the same backup, with the progress whole."""
    size = 8 * MiB
    qmp, img, tgt = x_perf_daemon(impl, start_daemon, tmpdir_short, size)
    qmp.execute("blockdev-backup", job_id="r", device="src", target="tgt", sync="full",
                x_perf=perf)
    ev = drain_events(qmp, "JOB_STATUS_CHANGE", "r", "null")
    [done] = [e["data"] for e in ev if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert "error" not in done and done["offset"] == done["len"] == size
    qmp.execute("blockdev-del", node_name="tgt")
    assert img_compare(img, tgt).returncode == 0


# ---- what the target receives: zero writes for zeros, compressed clusters ----

K64 = 64 * 1024


def sparse_source(path, size=4 * MiB):
    """A raw image of 64 KiB pieces whose kind is known: R random (does not
    compress), H half random half zeros, T text, Z zeros written as data,
    a hole, and a hole with one random 4 KiB block in it (I)."""
    rnd = random.Random(12)
    layout = "RHTTZZZZ" + "." * 8 + "I" + "." * 47
    assert len(layout) * K64 == size
    with open(path, "wb") as f:
        f.truncate(size)
        for i, k in enumerate(layout):
            f.seek(i * K64)
            if k == "R":
                f.write(rnd.randbytes(K64))
            elif k == "H":
                f.write(rnd.randbytes(K64 // 2) + bytes(K64 // 2))
            elif k == "T":
                f.write((b"backup %d " % i) * (K64 // 10) + b"x" * (K64 % 10))
            elif k == "Z":
                f.write(bytes(K64))
            elif k == "I":
                f.seek(i * K64 + 4096)
                f.write(rnd.randbytes(4096))
    return layout


def expected_kinds(layout, cs, compress):
    """Per target cluster of cs bytes: d data, c compressed, z zero cluster.
    The copy unit is max(64 KiB, cs); a unit all hole is written as zeroes;
    a compressed cluster that does not shrink (all random) stays data."""
    unit = max(K64, cs)
    per = unit // K64
    out = []
    for u in range(len(layout) // per):
        pieces = layout[u * per:(u + 1) * per]
        for c in range(unit // cs):
            if set(pieces) == {"."}:
                out.append("z")
                continue
            if not compress:
                out.append("d")
                continue
            if cs < K64:
                k = pieces[0]
                off = c * cs                  # inside the 64 KiB piece
                random_part = {"R": K64, "H": K64 // 2, "I": 0}.get(k, 0)
                if k == "I":
                    rnd_here = off == 4096
                else:
                    rnd_here = off + cs <= random_part
                out.append("d" if rnd_here else "c")
            else:
                out.append("d" if set(pieces) == {"R"} else "c")
    return "".join(out)


def cluster_kinds(path, cs):
    """What qemu-img map says of each cluster: d data at an offset,
    c data without one (compressed), z zeros, - unallocated."""
    m = json.loads(subprocess.run(["qemu-img", "map", "-U", "--output=json", path],
                                  check=True, stdout=subprocess.PIPE).stdout)
    out = []
    for x in m:
        if x["data"]:
            k = "d" if "offset" in x else "c"
        else:
            k = "z" if x["present"] else "-"
        assert x["start"] % cs == 0 and x["length"] % cs == 0, x
        out.append(k * (x["length"] // cs))
    return "".join(out)


def img_check(path):
    r = subprocess.run(["qemu-img", "check", "-U", "--output=json", path],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert r.returncode == 0, r.stdout
    c = tool_json(r.stdout)
    assert (c["check-errors"], c.get("corruptions", 0), c.get("leaks", 0)) == (0, 0, 0), c
    return c


TARGETS = [  # (qemu-img create -o options, cluster size, compress)
    ("", K64, False),
    ("", K64, True),
    ("compression_type=zstd", K64, True),
    ("cluster_size=4096", 4096, True),
    ("cluster_size=131072", 131072, True),
    ("cluster_size=2097152", 2 * MiB, True),    # a copy unit above the 1 MiB run
]


def test_target_allocation(impl, start_daemon, tmpdir_short):
    """A full backup of a sparse raw image into fresh qcow2 images: holes
    become zero clusters (no data), the rest data; with compress=true every
    cluster that shrinks is stored compressed (zlib or zstd, per the
    image), whatever the cluster size.  qemu-img check finds no error and
    compare no difference; the map is the same for bexd and qsd."""
    img = os.path.join(tmpdir_short, "src.img")
    layout = sparse_source(img)
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s" % img,
                     "--blockdev", "driver=raw,node-name=disk,file=f0")
    qmp = d.qmp()
    for n, (opts, cs, compress) in enumerate(TARGETS):
        path = os.path.join(tmpdir_short, "t%d.qcow2" % n)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else [])
                       + [path, str(4 * MiB)], check=True)
        qmp.execute("blockdev-add", node_name="t", driver="qcow2",
                    file={"driver": "file", "filename": path})
        qmp.execute("blockdev-backup", job_id="j", device="disk", target="t", sync="full",
                    compress=compress)
        e = qmp.wait_event("BLOCK_JOB_COMPLETED")
        assert "error" not in e["data"] and e["data"]["offset"] == 4 * MiB, e
        qmp.execute("blockdev-del", node_name="t")
        want = expected_kinds(layout, cs, compress)
        assert cluster_kinds(path, cs) == want, (opts, compress)
        c = img_check(path)
        stats = c.get("image-end-offset"), c.get("compressed-clusters", 0)
        assert stats[1] == want.count("c"), (opts, c)
        assert img_compare(img, path, "qcow2").returncode == 0
        if "zstd" in opts:
            info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                                             check=True, stdout=subprocess.PIPE).stdout)
            assert info["format-specific"]["data"]["compression-type"] == "zstd"


def test_zero_clusters_of_a_qcow2_source(impl, start_daemon, tmpdir_short):
    """Zero clusters and unallocated clusters of a qcow2 source are zero
    writes; only the data cluster is copied as data (raw target: a hole)."""
    size = 2 * MiB
    src = os.path.join(tmpdir_short, "s.qcow2")
    tgt = os.path.join(tmpdir_short, "t.qcow2")
    raw = os.path.join(tmpdir_short, "t.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", src, str(size)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 64k",
                    "-c", "write -P 0x42 1M 128k", "-c", "write -z 1M 128k", src],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, str(size)], check=True)
    with open(raw, "wb") as f:
        f.truncate(size)
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s" % src,
                     "--blockdev", "driver=qcow2,node-name=disk,file=f0",
                     "--blockdev", "driver=file,node-name=f1,filename=%s" % tgt,
                     "--blockdev", "driver=qcow2,node-name=t,file=f1",
                     "--blockdev", "driver=file,node-name=r,filename=%s" % raw)
    qmp = d.qmp()
    for job, target in (("j", "t"), ("k", "r")):
        qmp.execute("blockdev-backup", job_id=job, device="disk", target=target, sync="full")
        e = qmp.wait_event("BLOCK_JOB_COMPLETED")
        assert "error" not in e["data"], e
    qmp.execute("blockdev-del", node_name="t")
    qmp.execute("blockdev-del", node_name="f1")
    assert cluster_kinds(tgt, K64) == "d" + "z" * 31
    img_check(tgt)
    assert img_compare(src, tgt, "qcow2", "qcow2").returncode == 0
    assert img_compare(src, raw, "raw", "qcow2").returncode == 0
    m = json.loads(subprocess.run(["qemu-img", "map", "-U", "-f", "raw", "--output=json", raw],
                                  check=True, stdout=subprocess.PIPE).stdout)
    assert sum(x["length"] for x in m if x["data"]) == K64, m


def test_compress_refused_and_failing(impl, start_daemon, tmpdir_short):
    """compress=true: refused for a raw (or file) target in QEMU's words; a
    qcow2 target whose cluster is allocated already fails the job with EIO
    (compression cannot overwrite), one with a data file with ENOTSUP."""
    size = 2 * MiB
    img = os.path.join(tmpdir_short, "src.img")
    with open(img, "wb") as f:
        f.truncate(size)
        f.write(b"abc" * 100000)
    raw = os.path.join(tmpdir_short, "t.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
    full = os.path.join(tmpdir_short, "full.qcow2")
    ext = os.path.join(tmpdir_short, "ext.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", full, str(size)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 64k 64k", full], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=%s.data" % ext,
                    ext, str(size)], check=True)
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s" % img,
                     "--blockdev", "driver=raw,node-name=disk,file=f0",
                     "--blockdev", "driver=file,node-name=rf,filename=%s" % raw,
                     "--blockdev", "driver=raw,node-name=rr,file=rf")
    qmp = d.qmp()
    for t in ("rf", "rr"):
        err = qmp.error("blockdev-backup", job_id="j", device="disk", target=t, sync="full",
                        compress=True)
        assert (err["class"], err["desc"]) == ("GenericError",
                                               "Compression is not supported for this drive ")
    for node, path, msg in (("full", full, "Input/output error"),
                            ("ext", ext, "Operation not supported")):
        qmp.execute("blockdev-add", node_name=node, driver="qcow2",
                    file={"driver": "file", "filename": path})
        qmp.events.clear()
        qmp.execute("blockdev-backup", job_id="j", device="disk", target=node, sync="full",
                    compress=True)
        ev = drain_events(qmp, "JOB_STATUS_CHANGE", "j", "null")
        assert [e["data"] for e in ev if e["event"] == "BLOCK_JOB_ERROR"] == [
            {"device": "j", "operation": "write", "action": "report"}]
        [done] = [e["data"] for e in ev if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert done["error"] == msg
        qmp.execute("blockdev-del", node_name=node)
    img_check(full)
    assert qmp.execute("query-block-jobs") == []


def test_compressed_incremental_with_guest_writes(impl, start_daemon, tmpdir_short):
    """Push mode with compress=true: a full backup, then an incremental one
    into an overlay, while a client writes (its copies are compressed too):
    each chain equals the image at its backup's start."""
    size = 4 * MiB
    img = os.path.join(tmpdir_short, "src.img")
    sparse_source(img)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s" % img,
                     "--blockdev", "driver=raw,node-name=disk,file=f0",
                     "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                     "--export", "nbd,id=w,node-name=disk,name=w,writable=on")
    qmp = d.qmp()
    uri = "nbd+unix:///w?socket=" + sock
    prev = None
    for gen in range(2):
        if gen:
            qemu_io(uri, "write -P 0x31 2M 192k", "write -z 0 64k")
        ref, path = new_generation(qmp, tmpdir_short, img, gen, size, prev)
        a = dict(job_id="b%d" % gen, device="disk", target="t%d" % gen, compress=True,
                 speed=1)
        if gen == 0:
            qmp.execute("transaction", actions=[
                {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "inc"}},
                {"type": "blockdev-backup", "data": {k.replace("_", "-"): v for k, v in
                                                     dict(a, sync="full").items()}}])
        else:
            qmp.execute("blockdev-backup", sync="incremental", bitmap="inc", **a)
        # overwrite what the job has not copied yet: the old data is copied first
        qemu_io(uri, "write -P 0x7%d 128k 256k" % gen, "write -P 0x6%d 3M 64k" % gen)
        qmp.execute("block-job-set-speed", device="b%d" % gen, speed=0)
        e = qmp.wait_event("BLOCK_JOB_COMPLETED")
        assert e["data"]["device"] == "b%d" % gen and "error" not in e["data"], e
        qmp.execute("blockdev-del", node_name="t%d" % gen)
        img_check(path)
        r = img_compare(ref, path, "qcow2")
        assert r.returncode == 0, r.stdout
        c = img_check(path)
        assert c.get("compressed-clusters", 0) > 0, c
        prev = path


def test_compressed_clusters_rewritten_and_discarded(impl, start_daemon, tmpdir_short):
    """The packed compressed clusters a backup wrote are counted right: the
    same daemon then overwrites some (they become normal clusters), zeroes
    and discards others, and qemu-img check finds no leak and no error."""
    img = os.path.join(tmpdir_short, "src.img")
    tgt = os.path.join(tmpdir_short, "t.qcow2")
    layout = sparse_source(img)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, str(4 * MiB)], check=True)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s" % img,
                     "--blockdev", "driver=raw,node-name=disk,file=f0",
                     "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    qmp = d.qmp()
    qmp.execute("blockdev-add", node_name="t", driver="qcow2", discard="unmap",
                file={"driver": "file", "filename": tgt, "discard": "unmap"})
    qmp.execute("blockdev-backup", job_id="j", device="disk", target="t", sync="full",
                compress=True)
    e = qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in e["data"], e
    want_kinds = expected_kinds(layout, K64, True)
    assert want_kinds[:8] == "dccccccc" and want_kinds.count("c") == 8
    qmp.execute("blockdev-del", node_name="t")
    assert img_check(tgt).get("compressed-clusters", 0) == 8
    qmp.execute("blockdev-add", node_name="t", driver="qcow2", discard="unmap",
                file={"driver": "file", "filename": tgt, "discard": "unmap"})
    qmp.execute("block-export-add", type="nbd", id="e", node_name="t", name="e",
                writable=True)
    qemu_io("nbd+unix:///e?socket=" + sock, "write -P 0x55 64k 64k", "write -P 0x56 160k 4k",
            "write -z -u 256k 128k", "discard 384k 64k", "write -z 448k 64k")
    qmp.execute("block-export-del", id="e")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    qmp.execute("blockdev-del", node_name="t")
    # clusters 3 and 16 are left compressed; 1, 2 rewritten, 4-7 zeroed or discarded
    c = img_check(tgt)
    assert c.get("compressed-clusters", 0) == 2, c
    assert cluster_kinds(tgt, K64)[:17] == "dddczzzz" + "z" * 8 + "c"
    want = bytearray(open(img, "rb").read())
    want[64 * 1024:128 * 1024] = b"\x55" * 65536
    want[160 * 1024:164 * 1024] = b"\x56" * 4096
    want[256 * 1024:512 * 1024] = bytes(256 * 1024)
    ref = os.path.join(tmpdir_short, "ref.img")
    with open(ref, "wb") as f:
        f.write(want)
    r = img_compare(ref, tgt, "qcow2")
    assert r.returncode == 0, r.stdout


def thread_cpu(pid):
    """CPU seconds (utime + stime) of each thread of pid, by thread id."""
    out = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def backup_cpu_split(start_daemon, img, tgt, size, **opts):
    """A full blockdev-backup of img into the qcow2 tgt; returns the CPU
    seconds the main thread (the job's loop) spent meanwhile and those of
    each other thread.  The backup must be whole; tgt's node is deleted."""
    d = start_daemon("bexd", "--blockdev", "driver=file,node-name=src,filename=%s" % img,
                     "--blockdev", "driver=qcow2,node-name=tgt,file.driver=file,"
                     "file.filename=%s" % tgt)
    qmp = d.qmp()
    before = thread_cpu(d.pid)
    qmp.execute("blockdev-backup", job_id="r", device="src", target="tgt", sync="full", **opts)
    e = qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in e["data"] and e["data"]["offset"] == size, e
    after = thread_cpu(d.pid)
    spent = {t: c - before.get(t, 0) for t, c in after.items()}
    main = spent.pop(d.pid)
    qmp.execute("blockdev-del", node_name="tgt")
    return main, spent


def test_compression_runs_off_the_loop(start_daemon, tmpdir_short):
    """A compressed backup's deflate runs in worker threads, not in the
    loop that runs the job (the main thread): the main thread's CPU during
    a backup of 16 MiB of text is a fraction of the workers'.  The backup is
    whole and the image clean."""
    size = 16 * MiB
    img = os.path.join(tmpdir_short, "src.img")
    tgt = os.path.join(tmpdir_short, "tgt.qcow2")
    with open(img, "wb") as f:
        rnd = random.Random(5)
        words = [b"%x" % rnd.getrandbits(24) for _ in range(4096)]
        while f.tell() < size:
            f.write(b" ".join(rnd.choice(words) for _ in range(8192))[:size - f.tell()])
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, str(size)], check=True)
    main, spent = backup_cpu_split(start_daemon, img, tgt, size, compress=True)
    workers = sum(spent.values())
    assert main < workers / 2, (main, spent)
    c = img_check(tgt)
    assert c["compressed-clusters"] == size // K64, c
    assert img_compare(img, tgt, "qcow2").returncode == 0


def test_ram_backed_copies_run_in_the_loop(start_daemon):
    """A backup job's copies between RAM-backed images (/dev/shm) run in
    the job's loop (the main thread), as an NBD client's copies run in its
    own: handing each 64 KiB read and write to the worker pool and back cost
    two thread switches per copy, slow on a loaded machine.  The copies
    include the qcow2 target's allocating writes.  The main thread's CPU
    during a full backup of 64 MiB of random data is more than twice the
    other threads'; the backup is whole."""
    size = 64 * MiB
    d = tempfile.mkdtemp(prefix="bxram", dir="/dev/shm")
    try:
        img = os.path.join(d, "src.img")
        tgt = os.path.join(d, "tgt.qcow2")
        with open(img, "wb") as f:
            f.write(random.Random(7).randbytes(size))
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, str(size)], check=True)
        main, spent = backup_cpu_split(start_daemon, img, tgt, size)
        others = sum(spent.values())
        assert main > 2 * others, (main, spent)
        assert img_compare(img, tgt, "qcow2").returncode == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)
