"""blockdev-snapshot: an overlay takes a node's place under its exports.

The overlay is a qcow2 node opened with blockdev-add and no backing file.
After the command the exports serve the overlay, whose backing file is the
old node; the old node is read-only and keeps the point in time.  Checked
against qemu-storage-daemon: the errors, the graph and the node list after
it, and the data, read through the export, from the old image file and from
the overlay's image; writes in flight across the command must all land.
"""
import json
import os
import subprocess
import threading

import nbd
import pytest

MiB = 1 << 20
SIZE = 4 * MiB


def qcow2(path, size=SIZE):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)


def overlay(d, name, **kw):
    return dict(driver="qcow2", node_name=name, backing=None,
                file={"driver": "file", "filename": os.path.join(d, name + ".qcow2")}, **kw)


def serve(impl, start_daemon, d, iothread=False):
    """A raw image of 0x11 bytes, exported writable over NBD as node 'base'
    (run by an iothread, or by the main loop), and qcow2 images for
    overlays."""
    base = os.path.join(d, "base.raw")
    with open(base, "wb") as f:
        f.write(b"\x11" * SIZE)
    for n in ("ov", "ov2", "ro"):
        qcow2(os.path.join(d, n + ".qcow2"))
    sock = os.path.join(d, "nbd.sock")
    extra = ["--object", "iothread,id=io0"] if iothread else []
    daemon = start_daemon(impl, *extra,
                          "--blockdev", "driver=file,node-name=bf,filename=%s" % base,
                          "--blockdev", "driver=raw,node-name=base,file=bf",
                          "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                          "--export", "type=nbd,id=e,node-name=base,name=e,writable=on,"
                          "allocation-depth=on" + (",iothread=io0" if iothread else ""))
    return daemon, d, "nbd+unix:///e?socket=%s" % sock


@pytest.fixture
def served(impl, start_daemon, tmpdir_short):
    return serve(impl, start_daemon, tmpdir_short)


def err(m, cmd, **args):
    return m.error(cmd, **args)["desc"]


def graph(m):
    """x-debug-query-block-graph as (parent, edge, child, perm, shared) by name."""
    g = m.execute("x-debug-query-block-graph")
    names = {n["id"]: n["name"] if not n["name"].startswith("#") else "#" for n in g["nodes"]}
    return sorted((names[e["parent"]], e["name"], names[e["child"]], sorted(e["perm"]),
                   sorted(e["shared-perm"])) for e in g["edges"])


def test_errors_match_qemu(served):
    daemon, d, uri = served
    m = daemon.qmp()
    assert err(m, "blockdev-snapshot", node="nope", overlay="x") == \
        "Cannot find device='nope' nor node-name='nope'"
    assert err(m, "blockdev-snapshot", node="base", overlay="x") == \
        "Cannot find device='x' nor node-name='x'"
    # used by an export, itself or through a node above it
    assert err(m, "blockdev-snapshot", node="base", overlay="base") == \
        "The overlay is already in use"
    assert err(m, "blockdev-snapshot", node="base", overlay="bf") == \
        "The overlay is already in use"
    m.execute("blockdev-add", driver="raw", node_name="r2",
              file={"driver": "file", "filename": os.path.join(d, "ro.qcow2")})
    assert err(m, "blockdev-snapshot", node="base", overlay="r2") == \
        "The overlay does not support backing images"
    m.execute("blockdev-del", node_name="r2")
    # a read-only overlay cannot take a writable export
    m.execute("blockdev-add", **overlay(d, "ro", read_only=True))
    assert err(m, "blockdev-snapshot", node="base", overlay="ro") == "Block node is read-only"
    m.execute("blockdev-del", node_name="ro")
    m.execute("blockdev-add", **overlay(d, "ov"))
    assert err(m, "blockdev-snapshot", node="ov", overlay="ov") == \
        "Making 'ov' a backing child of 'ov' would create a cycle"
    assert err(m, "transaction",
               actions=[{"type": "blockdev-snapshot", "data": {"node": "base", "overlay": "ov"}}],
               properties={"completion-mode": "grouped"}) == \
        "Action 'blockdev-snapshot' does not support Transaction property completion-mode = grouped"
    # a failed transaction undoes it: the export stays on base, ov has no backing
    assert err(m, "transaction",
               actions=[{"type": "blockdev-snapshot", "data": {"node": "base", "overlay": "ov"}},
                        {"type": "abort", "data": {}}]) == "Transaction aborted using Abort action"
    assert [e["node-name"] for e in m.execute("query-block-exports")] == ["base"]
    nodes = {n["node-name"]: n for n in m.execute("query-named-block-nodes")}
    assert nodes["ov"]["backing_file_depth"] == 0 and not nodes["base"]["ro"]
    assert m.execute("blockdev-snapshot", node="base", overlay="ov") == {}
    # the old node is a backing node now: busy for what QEMU blocks there
    busy = "Node 'base' is busy: node is used as backing hd of 'ov'"
    m.execute("blockdev-add", **overlay(d, "ov2"))
    assert err(m, "blockdev-snapshot", node="base", overlay="ov2") == busy
    assert err(m, "blockdev-del", node_name="base") == busy
    assert err(m, "block_resize", node_name="base", size=SIZE) == "Device '(null)' is in use"
    assert err(m, "blockdev-snapshot", node="ov", overlay="base") == \
        "The overlay is already in use"
    assert err(m, "blockdev-del", node_name="ov") == "Node ov is in use"


def test_graph_and_nodes_after_two_snapshots(impl, served):
    daemon, d, uri = served
    m = daemon.qmp()
    m.execute("blockdev-add", **overlay(d, "ov"))
    m.execute("blockdev-snapshot", node="base", overlay="ov")
    m.execute("blockdev-add", **overlay(d, "ov2"))
    m.execute("blockdev-snapshot", node="ov", overlay="ov2")
    assert [e["node-name"] for e in m.execute("query-block-exports")] == ["ov2"]
    nodes = {n["node-name"]: n for n in m.execute("query-named-block-nodes")}
    # the old nodes are read-only now (QEMU reopens them so), the chain is base <- ov <- ov2
    assert (nodes["base"]["ro"], nodes["ov"]["ro"], nodes["ov2"]["ro"]) == (True, True, False)
    assert nodes["ov2"]["backing_file_depth"] == 2
    assert nodes["ov2"]["image"]["backing-image"]["backing-image"]["filename"] == \
        os.path.join(d, "base.raw")
    # QEMU's file name for an overlay whose header names no backing file
    assert nodes["ov"]["file"] == "json:" + json.dumps(
        {"backing": {"driver": "raw", "file": {"driver": "file",
                                               "filename": os.path.join(d, "base.raw")}},
         "driver": "qcow2",
         "file": {"driver": "file", "filename": os.path.join(d, "ov.qcow2")}})
    assert graph(m) == sorted([
        ("", "root", "ov2", ["consistent-read", "write"],
         ["consistent-read", "write", "write-unchanged"]),
        ("ov2", "file", "#", ["consistent-read", "resize", "write"],
         ["consistent-read", "write-unchanged"]),
        ("ov2", "backing", "ov", ["consistent-read"],
         ["consistent-read", "resize", "write", "write-unchanged"]),
        ("ov", "file", "#", ["consistent-read"], ["consistent-read", "write-unchanged"]),
        ("ov", "backing", "base", ["consistent-read"],
         ["consistent-read", "resize", "write", "write-unchanged"]),
        ("base", "file", "bf", ["consistent-read"],
         ["consistent-read", "resize", "write", "write-unchanged"]),
    ])


def test_data_through_the_export_and_in_the_images(impl, served):
    daemon, d, uri = served
    m = daemon.qmp()
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x22" * 65536, 0)                  # before: into base
    m.execute("blockdev-add", **overlay(d, "ov"))
    m.execute("blockdev-snapshot", node="base", overlay="ov")
    # the same connection goes on, now on the overlay
    h.pwrite(b"\x33" * 4096, 4096)                # part of a cluster: copy-on-write
    h.pwrite(b"\x44" * 65536, 2 * MiB)
    h.flush()
    assert h.pread(8192, 0) == b"\x22" * 4096 + b"\x33" * 4096
    assert h.pread(65536, 2 * MiB) == b"\x44" * 65536
    assert h.pread(4096, 3 * MiB) == b"\x11" * 4096
    # the old image holds the point in time, and no longer changes
    with open(os.path.join(d, "base.raw"), "rb") as f:
        old = f.read()
    assert old[:65536] == b"\x22" * 65536 and old[65536:] == b"\x11" * (SIZE - 65536)
    # a new client sees the overlay; its block status shows the layers
    h2 = nbd.NBD()
    h2.add_meta_context("qemu:allocation-depth")
    h2.connect_uri(uri)
    depths = []
    h2.block_status(SIZE, 0, lambda ctx, off, ents, err: depths.extend(ents[1::2]) or 0)
    assert depths[0] == 1 and 2 in depths        # the overlay, then base
    h.shutdown()
    h2.shutdown()
    daemon.stop()
    # the overlay's image, read with its backing file given as QEMU names it
    spec = {"driver": "qcow2", "file": {"driver": "file",
                                        "filename": os.path.join(d, "ov.qcow2")},
            "backing": {"driver": "raw", "file": {"driver": "file",
                                                  "filename": os.path.join(d, "base.raw")}}}
    out = os.path.join(d, "flat.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", "json:" + json.dumps(spec), out],
                   check=True)
    with open(out, "rb") as f:
        flat = f.read()
    assert flat[:8192] == b"\x22" * 4096 + b"\x33" * 4096
    assert flat[8192:65536] == b"\x22" * (65536 - 8192)
    assert flat[2 * MiB:2 * MiB + 65536] == b"\x44" * 65536
    assert flat[3 * MiB:] == b"\x11" * MiB


@pytest.mark.parametrize("where", ["main", "iothread"])
def test_writes_in_flight_across_the_snapshot(impl, start_daemon, tmpdir_short, where):
    """Writes of 4 KiB into 64 KiB clusters, many in flight while the
    snapshot is taken: every write acknowledged is read back after it; the
    old image does not change once the command has answered, and holds,
    per block, the old bytes or a whole write."""
    daemon, d, uri = serve(impl, start_daemon, tmpdir_short, iothread=where == "iothread")
    m = daemon.qmp()
    m.execute("blockdev-add", **overlay(d, "ov"))
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = SIZE // 4096
    order = [(i * 37) % blocks for i in range(blocks)]    # every block once, scattered
    bufs = {}
    started = threading.Event()

    def writer():
        inflight = []
        for n, b in enumerate(order):
            buf = nbd.Buffer.from_bytearray(bytearray([b % 251 + 1]) * 4096)
            bufs[b] = buf
            inflight.append(h.aio_pwrite(buf, b * 4096))
            if n == 64:
                started.set()
            while h.aio_in_flight() >= 32:
                h.poll(-1)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in inflight:
            assert h.aio_command_completed(c)

    t = threading.Thread(target=writer)
    t.start()
    started.wait(30)
    m.execute("blockdev-snapshot", node="base", overlay="ov")
    with open(os.path.join(d, "base.raw"), "rb") as f:
        at_reply = f.read()           # the point in time: it must not change now
    t.join(60)
    assert not t.is_alive()
    data = h.pread(SIZE, 0)
    for b in range(blocks):
        assert data[b * 4096:(b + 1) * 4096] == bytes([b % 251 + 1]) * 4096, b
    with open(os.path.join(d, "base.raw"), "rb") as f:
        old = f.read()
    assert old == at_reply
    for b in range(blocks):
        blk = old[b * 4096:(b + 1) * 4096]
        assert blk in (b"\x11" * 4096, bytes([b % 251 + 1]) * 4096), b
    h.shutdown()


def test_snapshot_of_a_qcow2_node_allocating_under_writes(impl, served):
    """The old node is a qcow2 overlay itself, allocating clusters for the
    writes in flight: its metadata writes go on while the peers' writes are
    held (a hold of every write would wait for itself), its caches are
    written back and it turns read-only before the answer, after which its
    image does not change; every write is read back."""
    daemon, d, uri = served
    m = daemon.qmp()
    m.execute("blockdev-add", **overlay(d, "ov"))
    m.execute("blockdev-snapshot", node="base", overlay="ov")
    m.execute("blockdev-add", **overlay(d, "ov2"))
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = SIZE // 4096
    order = [(i * 53) % blocks for i in range(blocks)]
    started = threading.Event()
    bufs = []

    def writer():
        for n, b in enumerate(order):
            buf = nbd.Buffer.from_bytearray(bytearray([b % 249 + 2]) * 4096)
            bufs.append(buf)
            h.aio_pwrite(buf, b * 4096)
            if n == 128:
                started.set()
            while h.aio_in_flight() >= 32:
                h.poll(-1)
        while h.aio_in_flight() > 0:
            h.poll(-1)

    t = threading.Thread(target=writer)
    t.start()
    started.wait(30)
    m.execute("blockdev-snapshot", node="ov", overlay="ov2")
    with open(os.path.join(d, "ov.qcow2"), "rb") as f:
        at_reply = f.read()
    t.join(60)
    assert not t.is_alive()
    data = h.pread(SIZE, 0)
    for b in range(blocks):
        assert data[b * 4096:(b + 1) * 4096] == bytes([b % 249 + 2]) * 4096, b
    with open(os.path.join(d, "ov.qcow2"), "rb") as f:
        assert f.read() == at_reply
    nodes = {n["node-name"]: n for n in m.execute("query-named-block-nodes")}
    assert nodes["ov"]["ro"] and not nodes["ov2"]["ro"]
    h.shutdown()
    daemon.stop()
    subprocess.run(["qemu-img", "check", "-q", os.path.join(d, "ov.qcow2")], check=True)


def test_transaction_with_a_bitmap_on_the_overlay(served):
    daemon, d, uri = served
    m = daemon.qmp()
    m.execute("blockdev-add", **overlay(d, "ov"))
    m.execute("transaction", actions=[
        {"type": "blockdev-snapshot", "data": {"node": "base", "overlay": "ov"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "ov", "name": "b0"}}])
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x55" * 4096, MiB)
    h.flush()
    nodes = {n["node-name"]: n for n in m.execute("query-named-block-nodes")}
    assert [(b["name"], b["count"]) for b in nodes["ov"]["dirty-bitmaps"]] == [("b0", 65536)]
    h.shutdown()


def test_under_a_vhost_user_blk_export(impl, start_daemon, tmpdir_short):
    """The device keeps its front-end; what it writes after goes to the overlay."""
    import test_vhost_user_blk as vt
    vt.need_client()
    d = tmpdir_short
    img = os.path.join(d, "disk.img")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    qcow2(os.path.join(d, "ov.qcow2"))
    sock = os.path.join(d, "vub.sock")
    daemon = start_daemon(impl, *vt.export_args(img, sock, ",num-queues=2"))
    m = daemon.qmp()
    a, b = vt.vub_pattern(65536, 1), vt.vub_pattern(65536, 2)
    assert vt.vub(sock, "write", 0, 65536, 1) == {"status": 0}
    m.execute("blockdev-add", **overlay(d, "ov"))
    m.execute("blockdev-snapshot", node="disk", overlay="ov")
    assert vt.vub(sock, "write", 32768, 65536, 2) == {"status": 0}
    back = vt.vub(sock, "read", 0, 98304, binary=True).stdout
    assert back == a[:32768] + b
    assert vt.file_range(img, 0, 98304) == a + b"\0" * 32768   # the old image: A only


def test_under_a_fuse_export(impl, start_daemon, tmpdir_short):
    import test_fuse as ft
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    d = tmpdir_short
    img = os.path.join(d, "disk.img")
    with open(img, "wb") as f:
        f.write(b"\x11" * SIZE)
    qcow2(os.path.join(d, "ov.qcow2"))
    fx = ft.Fuse(start_daemon, impl, d, img)
    try:
        m = fx.qmp()
        fd = fx.open()
        os.pwrite(fd, b"\x22" * 4096, 0)
        os.fsync(fd)
        m.execute("blockdev-add", **overlay(d, "ov"))
        m.execute("blockdev-snapshot", node="d", overlay="ov")
        os.pwrite(fd, b"\x33" * 4096, 8192)
        os.fsync(fd)
        assert os.pread(fd, 12288, 0) == b"\x22" * 4096 + b"\x11" * 4096 + b"\x33" * 4096
        os.close(fd)
        with open(img, "rb") as f:
            assert f.read(12288) == b"\x22" * 4096 + b"\x11" * 8192
    finally:
        fx.daemon.stop()
        ft.unmount_all(fx.mnt)


def test_pipelined_requests_wait_for_the_reply(served):
    """The reply comes after the writes have settled; requests sent behind
    it in the same write are answered after it, in order."""
    daemon, d, uri = served
    m = daemon.qmp()
    m.execute("blockdev-add", **overlay(d, "ov"))
    reqs = [{"execute": "blockdev-snapshot", "arguments": {"node": "base", "overlay": "ov"},
             "id": 1},
            {"execute": "query-block-exports", "id": 2},
            {"execute": "blockdev-snapshot", "arguments": {"node": "base", "overlay": "ov"},
             "id": 3}]
    m.send_raw("".join(json.dumps(r) for r in reqs))
    r1, r2, r3 = (m.recv_response() for _ in range(3))
    assert (r1["id"], r1["return"]) == (1, {})
    assert (r2["id"], [e["node-name"] for e in r2["return"]]) == (2, ["ov"])
    assert (r3["id"], r3["error"]["desc"]) == \
        (3, "Node 'base' is busy: node is used as backing hd of 'ov'")


# ---- blockdev-snapshot-sync: the overlay's image made too ----

def test_sync_errors_match_qemu(served):
    daemon, d, uri = served
    m = daemon.qmp()
    path = os.path.join(d, "s.qcow2")
    assert err(m, "blockdev-snapshot-sync", snapshot_file=path) == \
        "Cannot find device='' nor node-name=''"
    assert err(m, "blockdev-snapshot-sync", device="base", snapshot_file=path) == \
        "Cannot find device='base' nor node-name=''"
    assert err(m, "blockdev-snapshot-sync", node_name="base", snapshot_file=path) == \
        "New overlay node-name missing"
    assert err(m, "blockdev-snapshot-sync", node_name="base", snapshot_file=path,
               snapshot_node_name="bf") == "New overlay node-name already in use"
    nodir = os.path.join(d, "nodir", "s.qcow2")
    assert err(m, "blockdev-snapshot-sync", node_name="base", snapshot_file=nodir,
               snapshot_node_name="s") == \
        "Could not create '%s': No such file or directory" % nodir
    assert err(m, "blockdev-snapshot-sync", node_name="base", snapshot_file=path,
               snapshot_node_name="s", format="nope") == "Unknown file format 'nope'"
    assert err(m, "blockdev-snapshot-sync", node_name="base", snapshot_file=path,
               snapshot_node_name="s", format="raw") == \
        "Backing file not supported for file format 'raw'"
    missing = os.path.join(d, "missing.qcow2")
    assert err(m, "blockdev-snapshot-sync", node_name="base", snapshot_file=missing,
               snapshot_node_name="s", mode="existing") == \
        "Could not open '%s': No such file or directory" % missing
    # nothing was left behind: the node name is free, the export on base
    assert "s" not in {n["node-name"] for n in m.execute("query-named-block-nodes")}
    assert [e["node-name"] for e in m.execute("query-block-exports")] == ["base"]


@pytest.mark.parametrize("mode", ["absolute-paths", "existing"])
def test_sync_makes_qemus_image(impl, served, mode):
    daemon, d, uri = served
    m = daemon.qmp()
    base = os.path.join(d, "base.raw")
    path = os.path.join(d, "s.qcow2")
    ref = os.path.join(d, "ref.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", ref,
                    str(SIZE)], check=True)
    if mode == "existing":
        subprocess.run(["cp", ref, path], check=True)
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x22" * 65536, 0)
    with open(ref, "rb") as f:
        want = f.read()
    args = dict(node_name="base", snapshot_file=path, snapshot_node_name="s")
    if mode == "existing":
        args["mode"] = "existing"
    assert m.execute("blockdev-snapshot-sync", **args) == {}
    with open(path, "rb") as f:
        assert f.read() == want            # byte for byte what qemu-img makes
    h.pwrite(b"\x33" * 4096, 4096)
    h.flush()
    assert h.pread(12288, 0) == b"\x22" * 4096 + b"\x33" * 4096 + b"\x22" * 4096
    nodes = {n["node-name"]: n for n in m.execute("query-named-block-nodes")}
    assert nodes["s"]["file"] == path      # the header names the backing file
    assert nodes["s"]["backing_file"] == base and nodes["base"]["ro"]
    assert [e["node-name"] for e in m.execute("query-block-exports")] == ["s"]
    h.shutdown()
    daemon.stop()
    out = os.path.join(d, "flat.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", path, out], check=True)
    with open(out, "rb") as f:
        assert f.read(12288) == b"\x22" * 4096 + b"\x33" * 4096 + b"\x22" * 4096


def test_sync_in_a_failed_transaction(served):
    """Aborted: the overlay opened for it goes again, the export stays."""
    daemon, d, uri = served
    m = daemon.qmp()
    path = os.path.join(d, "s.qcow2")
    assert err(m, "transaction", actions=[
        {"type": "blockdev-snapshot-sync",
         "data": {"node-name": "base", "snapshot-file": path, "snapshot-node-name": "s"}},
        {"type": "abort", "data": {}}]) == "Transaction aborted using Abort action"
    assert "s" not in {n["node-name"] for n in m.execute("query-named-block-nodes")}
    assert [e["node-name"] for e in m.execute("query-block-exports")] == ["base"]
    assert m.execute("blockdev-snapshot-sync", node_name="base", snapshot_file=path,
                     snapshot_node_name="s") == {}


def test_sync_refuses_an_image_in_use(impl, served):
    """The new image's file is locked by a node that has it open: refused,
    and that image keeps its data (QEMU's image locks)."""
    daemon, d, uri = served
    m = daemon.qmp()
    base = os.path.join(d, "base.raw")
    assert err(m, "blockdev-snapshot-sync", node_name="base", snapshot_file=base,
               snapshot_node_name="s") == \
        "Error: Trying to create an image with the same filename as the backing file"
    other = os.path.join(d, "ov.qcow2")
    m.execute("blockdev-add", **overlay(d, "ov"))
    with open(other, "rb") as f:
        before = f.read()
    assert err(m, "blockdev-snapshot-sync", node_name="base", snapshot_file=other,
               snapshot_node_name="s") == 'Failed to get "write" lock'
    with open(other, "rb") as f:
        assert f.read() == before
    with open(base, "rb") as f:
        assert f.read() == b"\x11" * SIZE


def test_sync_overlay_lives_while_used(served):
    """As in QEMU the overlay -sync opens is not the monitor's: under an
    export it stays while the export does; with nothing above the old node
    it is gone at once (the old node is read-only all the same)."""
    daemon, d, uri = served
    m = daemon.qmp()
    m.execute("blockdev-snapshot-sync", node_name="base",
              snapshot_file=os.path.join(d, "s.qcow2"), snapshot_node_name="s")
    assert err(m, "blockdev-del", node_name="s") == "Node s is in use"
    m.execute("block-export-del", id="e")
    m.wait_event("BLOCK_EXPORT_DELETED")
    names = {n["node-name"] for n in m.execute("query-named-block-nodes")}
    assert "s" not in names and "base" in names
    assert err(m, "blockdev-del", node_name="s") == "Failed to find node with node-name='s'"
    m.execute("blockdev-add", driver="qcow2", node_name="q0",
              file={"driver": "file", "filename": os.path.join(d, "ov.qcow2")})
    m.execute("blockdev-snapshot-sync", node_name="q0",
              snapshot_file=os.path.join(d, "n.qcow2"), snapshot_node_name="n0")
    nodes = {n["node-name"]: n for n in m.execute("query-named-block-nodes")}
    assert "n0" not in nodes and nodes["q0"]["ro"]
    m.execute("blockdev-del", node_name="q0")


def test_overlay_from_the_command_line_with_empty_backing(impl, start_daemon, tmpdir_short):
    """`backing=` is how a command line's keyval form opens an overlay
    without its backing file ("backing": "" is QEMU's deprecated spelling
    of null, with a warning); blockdev-snapshot then puts it in place."""
    d = tmpdir_short
    base = os.path.join(d, "base.raw")
    with open(base, "wb") as f:
        f.write(b"\x11" * SIZE)
    ov = os.path.join(d, "ov.qcow2")
    # the image names a backing file that the option must keep closed
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", ov],
                   check=True)
    sock = os.path.join(d, "nbd.sock")
    daemon = start_daemon(impl,
                          "--blockdev", "driver=file,node-name=bf,filename=%s" % base,
                          "--blockdev", "driver=raw,node-name=base,file=bf",
                          "--blockdev", "driver=file,node-name=of,filename=%s" % ov,
                          "--blockdev", "driver=qcow2,node-name=ov,file=of,backing=",
                          "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                          "--export", "type=nbd,id=e,node-name=base,name=e,writable=on")
    m = daemon.qmp()
    nodes = {n["node-name"]: n for n in m.execute("query-named-block-nodes")}
    assert set(nodes) == {"bf", "base", "of", "ov"}     # no backing node opened
    assert "backing-image" not in nodes["ov"]["image"]
    assert 'Use of "backing": "" is deprecated; use "backing": null instead' in daemon.log()
    m.execute("blockdev-snapshot", node="base", overlay="ov")
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///e?socket=%s" % sock)
    h.pwrite(b"\x22" * 4096, 0)
    assert h.pread(8192, 0) == b"\x22" * 4096 + b"\x11" * 4096
    h.shutdown()
