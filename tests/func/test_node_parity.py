"""Small behaviours of block nodes where bexd used to differ from
qemu-storage-daemon 7.2, each run as the same QMP steps on both daemons
(issue 15): a node's size is its length rounded up to 512 bytes, inline
children inherit cache modes and discard=unmap from their parent, a raw or
blkdebug node over a read-only file stays read-write (writers are refused
by the permissions), a FUSE export mounted over its own image file answers
stat() and queries, and the generated node names and size errors are
QEMU's.
"""
import json
import os
import re
import shutil
import subprocess

import nbd
import pytest

from conftest import IMPLS


def nodes(m):
    return {n["node-name"]: n for n in m.execute("query-named-block-nodes")}


def child_of(m, filename, drv="file"):
    return [n for n in m.execute("query-named-block-nodes")
            if n["node-name"].startswith("#") and n["drv"] == drv
            and n["image"]["filename"] == filename]


def connect(sock, name):
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///%s?socket=%s" % (name, sock))
    return h


def odd_file(tmpdir, name="odd.img", length=1000, byte=b"X"):
    path = os.path.join(tmpdir, name)
    with open(path, "wb") as f:
        f.write(byte * length)
    return path


def test_sizes_are_rounded_up_to_sectors(impl, start_daemon, tmpdir_short):
    path = odd_file(tmpdir_short)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    m = d.qmp()
    m.execute("blockdev-add", driver="file", node_name="f0", filename=path)
    m.execute("blockdev-add", driver="raw", node_name="r0", file="f0")
    m.execute("blockdev-add", driver="null-co", node_name="n1", size=1)
    m.execute("blockdev-add", driver="null-co", node_name="n0", size=1000)
    n = nodes(m)
    assert {k: n[k]["image"]["virtual-size"] for k in n} == \
        {"f0": 1024, "r0": 1024, "n1": 512, "n0": 1024}
    m.execute("block-export-add", type="nbd", id="e0", node_name="f0", writable=True)
    m.execute("block-export-add", type="nbd", id="e1", node_name="n0")
    h = connect(sock, "f0")
    assert h.get_size() == 1024
    assert connect(sock, "n0").get_size() == 1024
    # the rest of the last sector reads as zeros; a write there makes the
    # file longer, up to the sector's end and no further
    assert h.pread(48, 976) == b"X" * 24 + b"\0" * 24
    h.pwrite(b"Y" * 8, 1010)
    assert os.path.getsize(path) == 1018
    h.pwrite(b"Z" * 8, 1016)
    assert os.path.getsize(path) == 1024
    with pytest.raises(nbd.Error):
        h.pwrite(b"Z" * 8, 1020)
    assert h.pread(24, 1000) == b"\0" * 10 + b"Y" * 6 + b"Z" * 8
    h.shutdown()
    m.execute("block-export-del", id="e0")
    m.wait_event("BLOCK_EXPORT_DELETED")
    # a resize to an odd length: the file gets it, the node the next sector
    m.execute("block_resize", node_name="r0", size=1500)
    assert os.path.getsize(path) == 1500
    n = nodes(m)
    assert (n["f0"]["image"]["virtual-size"], n["r0"]["image"]["virtual-size"]) == (1536, 1536)


def test_size_error_is_qemus(impl, start_daemon):
    m = start_daemon(impl).qmp()
    e = m.error("blockdev-add", driver="file", node_name="f0", filename="/proc/version",
                auto_read_only=True)
    assert e == {"class": "GenericError",
                 "desc": "Could not refresh total sector count: Invalid argument"}


def test_generated_node_names(impl, start_daemon, image):
    m = start_daemon(impl).qmp()
    for i in range(12):
        m.execute("blockdev-add", driver="raw", node_name="r%d" % i,
                  file={"driver": "file", "filename": image(1 << 20, "g%d.img" % i)})
    names = sorted((n for n in nodes(m) if n.startswith("#")), key=lambda s: int(s[6:-2]))
    # QEMU's id_generate(): "#block", a counter from 0, two random digits
    assert [int(s[6:-2]) for s in names] == list(range(12))
    assert all(re.fullmatch(r"#block(0|[1-9][0-9]*)[0-9][0-9]", s) for s in names)


def blocks_of(path):
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("raw_discard, file_discard, punched", [
    ("unmap", None, True),          # the inline file inherits discard=unmap
    (None, None, False),            # raw ignores the trim itself
    ("unmap", "ignore", False),     # the file's own setting wins
])
def test_inline_file_child_discards(impl, start_daemon, tmpdir_short, raw_discard,
                                    file_discard, punched):
    path = os.path.join(tmpdir_short, "d.img")
    with open(path, "wb") as f:
        f.write(b"D" * (1 << 20))
    sock = os.path.join(tmpdir_short, "nbd.sock")
    m = start_daemon(impl, "--nbd-server", "addr.type=unix,addr.path=%s" % sock).qmp()
    fopts = {"driver": "file", "filename": path}
    if file_discard:
        fopts["discard"] = file_discard
    opts = {"driver": "raw", "node-name": "r0", "file": fopts}
    if raw_discard:
        opts["discard"] = raw_discard
    m.execute("blockdev-add", **opts)
    m.execute("block-export-add", type="nbd", id="e", node_name="r0", writable=True)
    h = connect(sock, "r0")
    h.trim(512 << 10, 0)
    h.flush()
    assert h.pread(4, 600 << 10) == b"DDDD"
    h.shutdown()
    assert blocks_of(path) == (512 << 10 if punched else 1 << 20)


def test_qcow2_inline_file_inherits_discard(impl, start_daemon, tmpdir_short):
    # qcow2 passes a discard of its clusters down (pass-discard-request,
    # on with the node's discard=unmap): the inline file punches it
    path = os.path.join(tmpdir_short, "q.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 2M", path], check=True,
                   stdout=subprocess.DEVNULL)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    m = start_daemon(impl, "--nbd-server", "addr.type=unix,addr.path=%s" % sock).qmp()
    m.execute("blockdev-add", driver="qcow2", node_name="q", discard="unmap",
              file={"driver": "file", "filename": path})
    m.execute("block-export-add", type="nbd", id="e", node_name="q", writable=True)
    before = blocks_of(path)
    h = connect(sock, "q")
    h.trim(2 << 20, 0)
    h.flush()
    h.shutdown()
    assert before - blocks_of(path) >= 2 << 20


def test_inline_children_inherit_cache_modes(impl, start_daemon, image):
    a, b = image(1 << 20, "a.img"), image(1 << 20, "b.img")
    m = start_daemon(impl).qmp()
    m.execute("blockdev-add", driver="raw", node_name="r0", read_only=True,
              cache={"direct": True, "no-flush": True},
              file={"driver": "file", "filename": a})
    m.execute("blockdev-add", driver="raw", node_name="r1", cache={"direct": True},
              file={"driver": "file", "filename": b, "cache": {"direct": False}})
    c0, = child_of(m, a)
    c1, = child_of(m, b)
    assert c0["cache"] == {"direct": True, "no-flush": True, "writeback": True}
    assert c0["ro"] is True
    assert c1["cache"] == {"direct": False, "no-flush": False, "writeback": True}


def test_raw_over_read_only_file(impl, start_daemon, tmpdir_short):
    path = odd_file(tmpdir_short, "ro.img", 1 << 20, b"R")
    sock = os.path.join(tmpdir_short, "nbd.sock")
    m = start_daemon(impl, "--nbd-server", "addr.type=unix,addr.path=%s" % sock).qmp()
    m.execute("blockdev-add", driver="file", node_name="f0", read_only=True, filename=path)
    m.execute("blockdev-add", driver="raw", node_name="r0", file="f0")
    m.execute("blockdev-add", driver="raw", node_name="r1", read_only=True, file="f0")
    m.execute("blockdev-add", driver="blkdebug", node_name="b0", image="f0")
    m.execute("blockdev-add", driver="raw", node_name="rb", file="b0")
    m.execute("blockdev-add", driver="raw", node_name="ri",
              file={"driver": "file", "filename": path, "read-only": True})
    ro = {k: v["ro"] for k, v in nodes(m).items() if not k.startswith("#")}
    assert ro == {"f0": True, "r0": False, "r1": True, "b0": False, "rb": False, "ri": False}
    # a writer is refused by the permissions, a read-only node up front
    for node in ("r0", "b0", "rb", "ri"):
        e = m.error("block-export-add", type="nbd", id="e", node_name=node, writable=True)
        assert e == {"class": "GenericError", "desc": "Block node is read-only"}
    e = m.error("block-export-add", type="nbd", id="e", node_name="r1", writable=True)
    assert e == {"class": "GenericError", "desc": "Cannot export read-only node as writable"}
    e = m.error("blockdev-add", driver="qcow2", node_name="q0", file="f0")
    assert e == {"class": "GenericError", "desc": "Block node is read-only"}
    e = m.error("block_resize", node_name="r0", size=2 << 20)
    assert e == {"class": "GenericError", "desc": "Image is read-only"}
    # readers are served
    m.execute("block-export-add", type="nbd", id="e", node_name="r0")
    h = connect(sock, "r0")
    assert h.is_read_only()
    assert h.pread(4, 0) == b"RRRR"
    h.shutdown()
    # reopened read-only and back: still fine without writers
    m.execute("blockdev-reopen", options=[{"driver": "raw", "node-name": "r0", "file": "f0",
                                           "read-only": True}])
    m.execute("blockdev-reopen", options=[{"driver": "raw", "node-name": "r0", "file": "f0"}])
    assert nodes(m)["r0"]["ro"] is False


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_fuse_mounted_over_its_own_image(impl, start_daemon, tmpdir_short):
    # QEMU's documented use: the export shadows the image file it serves.
    # bexd used to stat() that path for st_blocks and actual-size, which
    # then waited for its own FUSE request (a hang).
    path = odd_file(tmpdir_short, "self.img", 1 << 20, b"S")
    d = start_daemon(impl)
    m = d.qmp()
    m.execute("blockdev-add", driver="raw", node_name="r0",
              file={"driver": "file", "filename": path})
    m.execute("block-export-add", type="fuse", id="fu", node_name="r0", mountpoint=path,
              writable=True)
    try:
        st = os.stat(path)
        assert st.st_size == 1 << 20
        assert st.st_blocks * 512 >= 1 << 20
        actual = {n["image"]["actual-size"] for n in m.execute("query-named-block-nodes")}
        assert actual == {st.st_blocks * 512}
        with open(path, "r+b") as f:
            f.write(b"T" * 4096)
        with open(path, "rb") as f:
            assert f.read(4100) == b"T" * 4096 + b"SSSS"
    finally:
        m.execute("block-export-del", id="fu")
        m.wait_event("BLOCK_EXPORT_DELETED")
    with open(path, "rb") as f:
        assert f.read(4100) == b"T" * 4096 + b"SSSS"


def qcow2_image(path, backing=None):
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    subprocess.run(cmd + [path, "1M"], check=True)
    return path


def test_file_names_as_qemu(impl, start_daemon, tmpdir_short):
    """query-named-block-nodes' "file" and image "filename": the plain file
    name where it opens the same data, else QEMU's json: name (its key
    order, separators and rules for each driver)."""
    t = tmpdir_short
    r, r2 = os.path.join(t, "r.img"), os.path.join(t, "r2.img")
    for p in (r, r2):
        with open(p, "wb") as f:
            f.truncate(1 << 20)
    base = qcow2_image(os.path.join(t, "base.qcow2"))
    top = qcow2_image(os.path.join(t, "top.qcow2"), backing=base)
    plain = qcow2_image(os.path.join(t, "plain.qcow2"))
    m = start_daemon(impl).qmp()

    def add(**o):
        m.execute("blockdev-add", **o)

    add(driver="file", node_name="f0", filename=r)
    add(driver="file", node_name="f1", filename=r, locking="off", aio="threads",
        discard="unmap", cache={"direct": False})
    add(driver="raw", node_name="r0", file="f0")
    add(driver="raw", node_name="r1", file={"driver": "file", "filename": r2})
    add(driver="raw", node_name="r2", file="f1", offset=0)
    add(driver="raw", node_name="r3", file="f1", size=512, offset=512)
    add(driver="raw", node_name="r4", file="f1", discard="unmap", read_only=True)
    add(driver="null-co", node_name="n0")
    add(driver="null-co", node_name="n1", size=1 << 20)
    add(driver="null-co", node_name="n2", read_zeroes=True)
    add(driver="null-co", node_name="n3", latency_ns=5)
    add(driver="null-aio", node_name="na0")
    add(driver="null-aio", node_name="na1", size=1 << 20, read_zeroes=True)
    add(driver="raw", node_name="rn", file="n1")
    add(driver="raw", node_name="rn0", file="n0")
    add(driver="raw", node_name="rr", file="r0")
    add(driver="qcow2", node_name="q0", file={"driver": "file", "filename": plain})
    add(driver="qcow2", node_name="q1", read_only=True, file={"driver": "file", "filename": top})
    add(driver="file", node_name="tf", filename=top, read_only=True)
    add(driver="qcow2", node_name="q2", file="tf", backing=None, read_only=True)
    add(driver="qcow2", node_name="q3", file="tf", backing="q0", read_only=True)
    add(driver="qcow2", node_name="q4", file="tf", read_only=True, cache_size=1 << 20,
        lazy_refcounts=True)
    add(driver="blkdebug", node_name="b0", image="f1")
    add(driver="blkdebug", node_name="b1", image="f1", align=4096)
    add(driver="blkdebug", node_name="b2", image="f1", inject_error=[
        {"event": "read_aio", "errno": 5, "once": True}])
    add(driver="raw", node_name="rb", file="b0")
    add(driver="raw", node_name="rb1", file="b1")
    n = nodes(m)
    for name, info in n.items():
        assert info["image"]["filename"] == info["file"], name

    def fj(path):
        return '{"driver": "file", "filename": "%s"}' % path

    want = {
        "f0": r, "f1": r, "r0": r, "r1": r2, "r4": r,
        "r2": 'json:{"offset": 0, "driver": "raw", "file": %s}' % fj(r),
        "r3": 'json:{"offset": 512, "driver": "raw", "size": 512, "file": %s}' % fj(r),
        "n0": "null-co://", "n3": "null-co://", "rn0": "null-co://",
        "n1": 'json:{"driver": "null-co", "size": 1048576}',
        "n2": 'json:{"read-zeroes": true, "driver": "null-co"}',
        "rn": 'json:{"driver": "raw", "file": {"driver": "null-co", "size": 1048576}}',
        "na0": "null-aio://",
        "na1": 'json:{"read-zeroes": true, "driver": "null-aio", "size": 1048576}',
        "rr": 'json:{"driver": "raw", "file": {"driver": "raw", "file": %s}}' % fj(r),
        "q0": plain, "q1": top, "q4": top, "tf": top,
        "q2": 'json:{"backing": null, "driver": "qcow2", "file": %s}' % fj(top),
        "q3": 'json:{"backing": {"driver": "qcow2", "file": %s}, "driver": "qcow2", '
              '"file": %s}' % (fj(plain), fj(top)),
        "b0": "blkdebug::" + r, "rb": "blkdebug::" + r,
        "b1": 'json:{"image": %s, "driver": "blkdebug", "align": 4096}' % fj(r),
        "b2": 'json:{"inject-error.0.once": true, "image": %s, "driver": "blkdebug", '
              '"inject-error.0.event": "read_aio", "inject-error.0.errno": 5}' % fj(r),
        "rb1": 'json:{"driver": "raw", "file": {"image": %s, "driver": "blkdebug", '
               '"align": 4096}}' % fj(r),
    }
    assert {k: n[k]["file"] for k in want} == want
    # BlockDeviceInfo's backing_file: the backing node's name, none without
    assert n["q1"]["backing_file"] == base
    assert "backing_file" not in n["q2"]
    assert n["q3"]["backing_file"] == plain
    # the header's backing file still shows in the image info
    assert [n[q]["image"].get("backing-filename") for q in ("q1", "q2", "q3")] == [base] * 3
    # a reopen that changes the backing node: no longer the header's
    m.execute("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "q4", "file": "tf",
                                           "read-only": True, "backing": "q0"}])
    assert nodes(m)["q4"]["file"] == n["q3"]["file"]


def whole_replies(start_daemon, impl, t, snapshotted):
    """query-named-block-nodes (flat and not) and the block graph after
    blockdev-adds that open implicit nodes: backing chains from the image
    headers, inline files and targets, filters."""
    base = qcow2_image(os.path.join(t, "base.qcow2"))
    mid = qcow2_image(os.path.join(t, "mid.qcow2"), backing=base)
    top = qcow2_image(os.path.join(t, "top.qcow2"), backing=mid)
    r = os.path.join(t, "r.img")
    with open(r, "wb") as f:
        f.truncate(1 << 20)
    snap = os.path.join(t, "snap.qcow2")
    shutil.copy(snapshotted, snap)
    m = start_daemon(impl).qmp()

    def add(**o):
        m.execute("blockdev-add", **o)

    add(driver="file", node_name="x0", filename=base)
    add(driver="qcow2", node_name="top", file={"driver": "file", "filename": top})
    add(driver="file", node_name="x1", filename=base)
    add(driver="qcow2", node_name="top2", read_only=True,
        file={"driver": "file", "filename": mid})
    add(driver="qcow2", node_name="top3", read_only=True, file="x1", backing=None)
    add(driver="file", node_name="f1", filename=r)
    add(driver="blkdebug", node_name="b0", image="f1")
    add(driver="raw", node_name="rb", file="b0")
    add(driver="blkdebug", node_name="b1", align=4096,
        image={"driver": "raw", "file": {"driver": "file", "filename": r}})
    add(driver="null-co", node_name="n0", size=1 << 20)
    add(driver="raw", node_name="rn", file={"driver": "null-co"})
    add(driver="raw", node_name="rq", file="top")
    # internal snapshots (made once, copied: the same dates in both runs)
    add(driver="qcow2", node_name="qs", read_only=True,
        file={"driver": "file", "filename": snap})
    add(driver="raw", node_name="rs", file="qs")
    add(driver="copy-before-write", node_name="cbw", file="rq",
        target={"driver": "null-co", "size": 1 << 20})
    add(driver="snapshot-access", node_name="sa", file="cbw")
    sock = os.path.join(t, "nbd.sock")
    m.execute("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    m.execute("block-export-add", type="nbd", id="e0", node_name="sa")
    m.execute("block-export-add", type="nbd", id="e1", node_name="top")
    m.execute("block-export-add", type="nbd", id="e2", node_name="top2")
    m.execute("block-export-add", type="nbd", id="e3", node_name="cbw", writable=True)
    # the permissions the graph shows refuse the same writers
    errs = [m.request("block-export-add", {"type": "nbd", "id": "w", "node-name": n,
                                           "writable": True})
            for n in ("top", "x0", "rq")]
    out = {"errs": errs,"flat": m.execute("query-named-block-nodes", flat=True),
           "nested": m.execute("query-named-block-nodes"),
           "default": m.execute("query-named-block-nodes", flat=False),
           "graph": m.execute("x-debug-query-block-graph")}
    s = json.dumps(out).replace(t, "@T@")
    return json.loads(re.sub(r"#block(\d+)\d\d", r"#block\1XX", s))


@pytest.mark.skipif(not IMPLS["qsd"], reason="qemu-storage-daemon not installed")
def test_named_block_nodes_same_as_qsd(start_daemon, tmpdir_short):
    """Whole replies, node by node in the list's order: the implicit nodes
    a blockdev-add opens come where QEMU puts them (a node after its file
    child, before its backing chain, newest first) with QEMU's generated
    names; flat leaves out backing-image; actual-size, cluster-size and
    dirty-flag as QEMU's drivers give them (none for blkdebug, through raw
    and filters), internal snapshots (also on a raw node over the qcow2),
    copy-before-write's anonymous bitmaps; the graph's
    permissions (backing links, copy-before-write, snapshot-access)."""
    snapshotted = qcow2_image(os.path.join(tmpdir_short, "snapshotted.qcow2"))
    for name in ("s1", "s2"):
        subprocess.run(["qemu-img", "snapshot", "-q", "-c", name, snapshotted], check=True)
    res = {}
    for impl in ("bexd", "qsd"):
        t = os.path.join(tmpdir_short, impl)
        os.mkdir(t)
        res[impl] = whole_replies(start_daemon, impl, t, snapshotted)
    assert res["bexd"]["errs"] == res["qsd"]["errs"]
    assert all("error" in e for e in res["bexd"]["errs"])
    for k in ("flat", "nested", "default"):
        assert [n["node-name"] for n in res["bexd"][k]] == \
            [n["node-name"] for n in res["qsd"][k]], k
        for b, q in zip(res["bexd"][k], res["qsd"][k]):
            assert b == q, (k, b["node-name"])
    assert res["bexd"]["graph"] == res["qsd"]["graph"]
