"""blockdev-snapshot-internal-sync and blockdev-snapshot-delete-internal-sync
(the commands and the transaction action) on a daemon serving the image.

Snapshots are taken and deleted over QMP while an NBD client writes; after
the daemon stops, `qemu-img check` finds no error and no leak (which also
checks every COPIED flag against its refcount), `qemu-img snapshot -l`
lists what is left, the active layer holds what the client wrote, and
`qemu-img snapshot -a` brings back each snapshot's data.  Errors are
QEMU 7.2's, in its order.  Every test runs against qemu-storage-daemon too.
"""
import json
import os
import shutil
import struct
import subprocess
import tempfile

import nbd

from qcow2img import MiB, assert_clean, nbd_random_ops, qemu_img, qemu_io, shm, to_raw  # noqa: F401
from test_qcow2 import serve
from test_qcow2_snapshots import LAYOUTS, check_snapshot_data, snapshot_names
from conftest import tool_text


def snap(q, name, device="q0"):
    return q.execute("blockdev-snapshot-internal-sync", device=device, name=name)


def delete(q, device="q0", **which):
    return q.execute("blockdev-snapshot-delete-internal-sync", device=device, **which)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def same_as(img, raw):
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, raw],
                       stdout=subprocess.PIPE)
    assert r.returncode == 0, tool_text(r.stdout)


def test_errors(impl, start_daemon, shm):
    img = os.path.join(shm, "a.qcow2")
    raw = os.path.join(shm, "r.raw")
    qemu_img("create", "-f", "qcow2", img, "4M")
    raw2 = os.path.join(shm, "r2.raw")
    qemu_img("create", "-f", "raw", raw, "4M")
    qemu_img("create", "-f", "raw", raw2, "4M")
    d = start_daemon(impl, "--blockdev", "driver=file,filename=%s,node-name=f0" % img,
                     "--blockdev", "driver=qcow2,file=f0,node-name=q0",
                     "--blockdev", "driver=file,filename=%s,node-name=r0" % raw,
                     "--blockdev", "driver=file,filename=%s,node-name=ro0,read-only=on" % raw,
                     "--blockdev", "driver=raw,file.driver=file,file.filename=%s,"
                     "node-name=raw0" % raw2)
    q = d.qmp()
    create = [
        ("nope", "s", "Cannot find device='nope' nor node-name='nope'"),
        ("f0", "s", "Need a root block node"),
        ("r0", "", "Block format 'file' used by device 'r0' does not support internal "
         "snapshots"),
        ("raw0", "s", "Block format 'raw' used by device 'raw0' does not support internal "
         "snapshots"),
        ("ro0", "", "Device 'ro0' is read only"),
        ("q0", "", "Name is empty"),
    ]
    for device, name, msg in create:
        e = q.error("blockdev-snapshot-internal-sync", device=device, name=name)
        assert (e["class"], e["desc"]) == ("GenericError", msg), (device, name)
    assert snap(q, "s1") == {}
    e = q.error("blockdev-snapshot-internal-sync", device="q0", name="s1")
    assert e["desc"] == "Snapshot with name 's1' already exists on device 'q0'"
    snap(q, "1")
    snap(q, "s2")

    gone = [
        ({"device": "q0"}, "Name or id must be provided"),
        ({"device": "nope", "name": "x"}, "Cannot find device='nope' nor node-name='nope'"),
        ({"device": "f0", "name": "x"}, "Need a root block node"),
        ({"device": "r0", "name": "x"}, "Failed to get a snapshot list: Operation not supported"),
        ({"device": "q0", "name": "x"},
         "Snapshot with id 'null' and name 'x' does not exist on device 'q0'"),
        ({"device": "q0", "id": "9"},
         "Snapshot with id '9' and name 'null' does not exist on device 'q0'"),
        ({"device": "q0", "id": "1", "name": "s2"},
         "Snapshot with id '1' and name 's2' does not exist on device 'q0'"),
    ]
    for args, msg in gone:
        e = q.error("blockdev-snapshot-delete-internal-sync", **args)
        assert (e["class"], e["desc"]) == ("GenericError", msg), args

    info = delete(q, id="1")
    assert (info["id"], info["name"], info["vm-state-size"]) == ("1", "s1", 0)
    assert set(info) == {"id", "name", "vm-state-size", "date-sec", "date-nsec",
                         "vm-clock-sec", "vm-clock-nsec"}
    assert delete(q, name="1")["id"] == "2"
    listed = q.execute("query-named-block-nodes", flat=True)
    node = [n for n in listed if n["node-name"] == "q0"][0]
    assert [(s["id"], s["name"]) for s in node["image"]["snapshots"]] == [("3", "s2")]
    # the next id follows the largest one
    snap(q, "s4")
    e = q.error("transaction", actions=[
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "q0", "name": "t"}}],
        properties={"completion-mode": "grouped"})
    assert e["desc"] == ("Action 'blockdev-snapshot-internal-sync' does not support "
                         "Transaction property completion-mode = grouped")
    d.stop()
    assert [s["id"] for s in json.loads(qemu_img("info", "--output=json", img))["snapshots"]] \
        == ["3", "4"]
    assert_clean(img)


def test_refused_images(impl, start_daemon, shm):
    """refcount_bits=1 cannot count a second reference; an image with an
    external data file has no snapshots.  bexd gives back the clusters of
    the failed attempt (QEMU leaks one)."""
    rc1 = os.path.join(shm, "rc1.qcow2")
    df = os.path.join(shm, "df.qcow2")
    empty = os.path.join(shm, "empty.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "refcount_bits=1", rc1, "4M")
    qemu_img("create", "-f", "qcow2", "-o", "data_file=%s" % os.path.join(shm, "df.data"),
             df, "4M")
    qemu_img("create", "-f", "qcow2", "-o", "refcount_bits=1", empty, "4M")
    qemu_io(rc1, "write -P 1 0 1M")
    d = start_daemon(impl, *[a for i, p in enumerate((rc1, df, empty)) for a in (
        "--blockdev", "driver=qcow2,file.driver=file,file.filename=%s,node-name=n%d" % (p, i))])
    q = d.qmp()
    e = q.error("blockdev-snapshot-internal-sync", device="n0", name="s")
    assert e["desc"] == "Failed to create snapshot 's' on device 'n0': Invalid argument"
    e = q.error("blockdev-snapshot-internal-sync", device="n1", name="s")
    assert e["desc"] == "Failed to get a snapshot list: Operation not supported"
    # nothing to count twice: an empty image takes one
    snap(q, "s", device="n2")
    assert delete(q, device="n2", name="s")["name"] == "s"
    d.stop()
    assert snapshot_names(rc1) == [] and snapshot_names(empty) == []
    if impl == "bexd":
        assert_clean(rc1)
    assert_clean(empty)


@LAYOUTS
def test_snapshots_while_serving(impl, start_daemon, shm, opts):
    """Snapshots taken and deleted between a client's writes, zeroes and
    trims: each keeps the data of its moment, the active layer the last."""
    size = 8 * MiB
    img = os.path.join(shm, "s.qcow2")
    qemu_img("create", "-f", "qcow2", *opts, img, str(size))
    qemu_io(img, "write -P 0x11 0 3M", "write -c -P 0x22 4M 1M")
    mirror = os.path.join(shm, "mirror.raw")
    to_raw(img, mirror)
    d, uri = serve(start_daemon, impl, img, shm, writable=True, node_extra=",discard=unmap")
    q = d.qmp()
    snaps = {}
    nbd_random_ops(uri, mirror, seed=11, nops=40)
    snap(q, "a")
    snaps["a"] = read_file(mirror)
    nbd_random_ops(uri, mirror, seed=12, nops=40)
    snap(q, "b")
    snaps["b"] = read_file(mirror)
    nbd_random_ops(uri, mirror, seed=13, nops=40)
    snap(q, "c")
    snaps["c"] = read_file(mirror)
    assert delete(q, name="b")["id"] == "2"
    nbd_random_ops(uri, mirror, seed=14, nops=40)
    assert delete(q, name="a")["id"] == "1"
    del snaps["a"], snaps["b"]
    nbd_random_ops(uri, mirror, seed=15, nops=20)
    d.stop()
    assert snapshot_names(img) == ["c"]
    assert_clean(img)
    same_as(img, mirror)
    check_snapshot_data(img, shm, snaps)


def test_snapshot_with_writes_in_flight(impl, start_daemon, shm, request):
    """The snapshot is taken while 64 allocating writes are in flight: once
    it answers, each write is wholly in it or wholly out of it, later
    writes never reach it (a write that linked its new cluster into an L2
    table already shared would put it there), and the image stays
    consistent."""
    size = 8 * MiB
    # on the disk, uncached: a write stays in flight long enough to meet
    # the snapshot
    disk = tempfile.mkdtemp(prefix="bxi", dir="/var/tmp")
    request.addfinalizer(lambda: shutil.rmtree(disk, ignore_errors=True))
    img = os.path.join(disk, "s.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16k", img, str(size))
    d, uri = serve(start_daemon, impl, img, shm, writable=True, node_extra=",cache.direct=on")
    q = d.qmp()
    h = nbd.NBD()
    h.connect_uri(uri)
    chunk = 96 * 1024                 # over cluster boundaries
    offsets = [i * chunk for i in range(size // chunk)][:64]
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([0x20 + i % 200]) * chunk), off)
               for i, off in enumerate(offsets)]
    # the command comes while the writes are under way; the client goes on
    # sending (QEMU's drain waits for the writes it has begun too)
    h.poll(0)
    q.send_raw(json.dumps({"execute": "blockdev-snapshot-internal-sync",
                           "arguments": {"device": "q0", "name": "mid"}}) + "\n")
    pending = set(cookies)
    while pending:
        h.poll(-1)
        pending = {c for c in pending if not h.aio_command_completed(c)}
    assert q.recv_response() == {"return": {}}
    # after the answer: never in the snapshot
    for off in offsets[:16]:
        h.pwrite(b"\xee" * chunk, off)
    h.flush()
    h.shutdown()
    d.stop()
    assert_clean(img)
    cp = os.path.join(shm, "apply.qcow2")
    with open(img, "rb") as src, open(cp, "wb") as dst:
        dst.write(src.read())
    qemu_img("snapshot", "-a", "mid", cp)
    got = to_raw(cp, os.path.join(shm, "mid.raw"))
    for i, off in enumerate(offsets):
        part = got[off:off + chunk]
        assert part in (bytes(chunk), bytes([0x20 + i % 200]) * chunk), off
    assert got[offsets[-1] + chunk:] == bytes(size - offsets[-1] - chunk)


def test_transaction(impl, start_daemon, shm):
    """In a transaction: undone when a later action fails (the snapshot is
    deleted again), and taken with a bitmap at one point in time."""
    img = os.path.join(shm, "s.qcow2")
    qemu_img("create", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x33 0 1M")
    d, uri = serve(start_daemon, impl, img, shm, writable=True)
    q = d.qmp()
    act = {"type": "blockdev-snapshot-internal-sync", "data": {"device": "q0", "name": "t1"}}
    e = q.error("transaction", actions=[act, {"type": "abort", "data": {}}])
    assert e["desc"] == "Transaction aborted using Abort action"
    e = q.error("transaction", actions=[act, act])
    assert e["desc"] == "Snapshot with name 't1' already exists on device 'q0'"
    q.execute("transaction", actions=[
        act, {"type": "block-dirty-bitmap-add", "data": {"node": "q0", "name": "since-t1"}}])
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x44" * 65536, 2 * MiB)
    h.shutdown()
    bm = [b for n in q.execute("query-named-block-nodes", flat=True) if n["node-name"] == "q0"
          for b in n.get("dirty-bitmaps", [])]
    assert [(b["name"], b["count"]) for b in bm] == [("since-t1", 65536)]
    d.stop()
    assert snapshot_names(img) == ["t1"]
    assert_clean(img)
    want = bytearray(b"\x33" * MiB + b"\0" * 3 * MiB)
    check_snapshot_data(img, shm, {"t1": bytes(want)})


def test_node_of_a_job(impl, start_daemon, shm):
    """A node a block job works on refuses both commands: the job's filter
    node stands above it, so it is no root node any more."""
    img = os.path.join(shm, "s.qcow2")
    tgt = os.path.join(shm, "t.qcow2")
    qemu_img("create", "-f", "qcow2", img, "4M")
    qemu_img("create", "-f", "qcow2", tgt, "4M")
    qemu_io(img, "write -P 0x33 0 4M")
    d = start_daemon(impl, "--blockdev",
                     "driver=qcow2,file.driver=file,file.filename=%s,node-name=q0" % img,
                     "--blockdev",
                     "driver=qcow2,file.driver=file,file.filename=%s,node-name=t0" % tgt)
    q = d.qmp()
    snap(q, "before")
    q.execute("blockdev-mirror", job_id="j", device="q0", target="t0", sync="full")
    q.wait_event("BLOCK_JOB_READY")
    for cmd, args in (("blockdev-snapshot-internal-sync", {"name": "x"}),
                      ("blockdev-snapshot-delete-internal-sync", {"name": "before"})):
        e = q.error(cmd, device="q0", **args)
        assert e["desc"] == "Need a root block node", cmd
    q.execute("block-job-cancel", device="j")
    q.wait_event("BLOCK_JOB_COMPLETED")
    delete(q, name="before")
    d.stop()
    assert snapshot_names(img) == []
    assert_clean(img)


def test_hostile_snapshot_table(impl, start_daemon, shm):
    """A snapshot whose L1 table points past the end of the file: deleting
    it is an error with a message, the daemon goes on, and the image is
    not written further (marked corrupt)."""
    img = os.path.join(shm, "h.qcow2")
    qemu_img("create", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x33 0 1M")
    qemu_img("snapshot", "-c", "bad", img)
    with open(img, "r+b") as f:
        f.seek(64)
        table = struct.unpack(">Q", f.read(8))[0]
        f.seek(table)
        l1 = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1)
        f.write(struct.pack(">Q", 1 << 40))      # its L2 table: far past the end
    d = start_daemon(impl, "--blockdev",
                     "driver=qcow2,file.driver=file,file.filename=%s,node-name=q0" % img)
    q = d.qmp()
    resp = q.request("blockdev-snapshot-delete-internal-sync",
                     {"device": "q0", "name": "bad"})
    if impl == "bexd":
        assert resp["error"]["desc"] == ("Failed to free the cluster and L1 table: "
                                         "Input/output error"), resp
        node = [n for n in q.execute("query-named-block-nodes", flat=True)
                if n["node-name"] == "q0"][0]
        assert node["image"]["format-specific"]["data"]["corrupt"] is True
        assert "snapshots" not in node["image"]
        e = q.error("blockdev-snapshot-internal-sync", device="q0", name="more")
        assert e["desc"] == ("Failed to create snapshot 'more' on device 'q0': "
                             "Input/output error")
    assert q.execute("query-version")
    d.stop()


def test_transaction_with_external_snapshot(impl, start_daemon, shm):
    """An internal snapshot of one image and an overlay under another's
    export in one transaction: both done when the reply comes."""
    a = os.path.join(shm, "a.qcow2")
    b = os.path.join(shm, "b.qcow2")
    qemu_img("create", "-f", "qcow2", a, "4M")
    qemu_img("create", "-f", "qcow2", b, "4M")
    sock = os.path.join(shm, "nbd.sock")
    d = start_daemon(impl,
                     "--blockdev", "driver=qcow2,file.driver=file,file.filename=%s,"
                     "node-name=a" % a,
                     "--blockdev", "driver=qcow2,file.driver=file,file.filename=%s,"
                     "node-name=b" % b,
                     "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                     "--export", "type=nbd,id=e0,node-name=b,writable=on")
    q = d.qmp()
    q.execute("transaction", actions=[
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "a", "name": "s"}},
        {"type": "blockdev-snapshot-sync",
         "data": {"node-name": "b", "snapshot-file": os.path.join(shm, "top.qcow2"),
                  "snapshot-node-name": "bt", "format": "qcow2"}}])
    assert [e["node-name"] for e in q.execute("query-block-exports")] == ["bt"]
    ro = {n["node-name"]: n["ro"] for n in q.execute("query-named-block-nodes")}
    assert (ro["b"], ro["bt"]) == (True, False)
    d.stop()
    assert snapshot_names(a) == ["s"]
    assert_clean(a)


def test_long_name(impl, start_daemon, shm):
    """A name keeps its first 255 bytes, as QEMU keeps them.  QEMU then
    looks for the whole name, finds none and takes the same name twice;
    bexd looks for the name it keeps and refuses the second."""
    img = os.path.join(shm, "a.qcow2")
    qemu_img("create", "-f", "qcow2", img, "4M")
    d = start_daemon(impl, "--blockdev",
                     "driver=qcow2,file.driver=file,file.filename=%s,node-name=q0" % img)
    q = d.qmp()
    long = "x" * 300
    snap(q, long)
    again = q.request("blockdev-snapshot-internal-sync", {"device": "q0", "name": long})
    if impl == "bexd":
        assert again["error"]["desc"] == ("Snapshot with name '%s' already exists on device "
                                          "'q0'" % long)
    e = q.error("blockdev-snapshot-delete-internal-sync", device="q0", name=long)
    assert e["desc"] == ("Snapshot with id 'null' and name '%s' does not exist on device "
                         "'q0'" % long)
    assert delete(q, name="x" * 255)["id"] == "1"
    d.stop()
    assert_clean(img)
