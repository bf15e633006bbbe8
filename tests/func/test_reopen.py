"""blockdev-reopen, against bexd and qemu-storage-daemon 7.2 (the same steps,
the same answers): read-only and the other options QEMU lets change on
file, raw, null-co and qcow2 nodes, inline children, the file and backing
children, the errors for options that cannot change, unknown nodes and
permission conflicts, all or nothing over the list, and what exports and
their clients see afterwards.
"""
import json
import os
import subprocess

import nbd
import pytest

from conftest import IMPLS


def nbd_client(sock, name, writable=False):
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///%s?socket=%s" % (name, sock))
    return h


def nodes(m):
    return {n["node-name"]: n for n in m.execute("query-named-block-nodes")}


def gen_name(m, filename):
    """The generated name of the node whose own image is `filename`."""
    return [n["node-name"] for n in m.execute("query-named-block-nodes")
            if n["node-name"].startswith("#") and n["image"]["filename"] == filename
            and n["drv"] == "file"][0]


@pytest.fixture
def setup(impl, start_daemon, image, tmpdir_short):
    """A daemon with f0 (file) under r0 (raw), f1 (file), n0 (null-co, 1 MiB)."""
    a = image(1 << 20, "a.img", data=b"A" * 4096 + b"B" * 4096)
    b = image(1 << 20, "b.img")
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    m = d.qmp()
    m.execute("blockdev-add", driver="file", node_name="f0", filename=a)
    m.execute("blockdev-add", driver="raw", node_name="r0", file="f0")
    m.execute("blockdev-add", driver="file", node_name="f1", filename=b)
    m.execute("blockdev-add", driver="null-co", node_name="n0", size=1 << 20)
    return m, a, b, sock


def reopen(m, *opts):
    return m.execute("blockdev-reopen", options=list(opts))


def reopen_error(m, *opts):
    e = m.error("blockdev-reopen", options=list(opts))
    assert e["class"] == "GenericError"
    return e["desc"]


def F0(a, **kw):
    return dict({"driver": "file", "node-name": "f0", "filename": a}, **kw)


def R0(**kw):
    return dict({"driver": "raw", "node-name": "r0", "file": "f0"}, **kw)


def N0(**kw):
    return dict({"driver": "null-co", "node-name": "n0", "size": 1 << 20}, **kw)


BAD = [
    # (options list, error) with a = the file of f0, b = the file of f1
    (lambda a, b: [{"driver": "raw", "file": "f0"}], "node-name not specified"),
    (lambda a, b: [R0(**{"node-name": "nope"})], "Failed to find node with node-name='nope'"),
    (lambda a, b: [F0(b)], "Cannot change the option 'filename'"),
    (lambda a, b: [F0(a, aio="native")], "Cannot change the option 'aio'"),
    (lambda a, b: [F0(a, aio="threads")], "Cannot change the option 'aio'"),
    (lambda a, b: [F0(a, locking="off")], "Cannot change the option 'locking'"),
    (lambda a, b: [R0(**{"force-share": True})], "Cannot change the option 'force-share'"),
    (lambda a, b: [N0(size=2 << 20)], "Cannot change the option 'size'"),
    (lambda a, b: [N0(**{"read-zeroes": True})], "Cannot change the option 'read-zeroes'"),
    (lambda a, b: [N0(**{"latency-ns": 0})], "Cannot change the option 'latency-ns'"),
    (lambda a, b: [{"driver": "null-co", "node-name": "n0"}],
     "Option 'size' cannot be reset to its default value"),
    (lambda a, b: [{"driver": "null-co", "node-name": "f0"}],
     "Option 'filename' cannot be reset to its default value"),
    (lambda a, b: [{"driver": "raw", "node-name": "n0", "file": "f0", "size": 1 << 20}],
     "Cannot set file child to format node without file child"),
    (lambda a, b: [R0(file={"driver": "file", "filename": a})],
     "Cannot change the option 'file.driver'"),
    (lambda a, b: [R0(file="nope")], "Cannot find device='' nor node-name='nope'"),
    (lambda a, b: [R0(file="r0")], "Making 'r0' a file child of 'r0' would create a cycle"),
    (lambda a, b: [R0(**{"detect-zeroes": "unmap"})],
     "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"),
    (lambda a, b: [R0(offset=2 << 20)],
     "Offset (2097152) cannot be greater than size of the containing file (1048576)"),
    (lambda a, b: [R0(size=2 << 20)],
     "The sum of offset (0) and size (2097152) has to be smaller or equal to the  actual "
     "size of the containing file (1048576)"),
    (lambda a, b: [R0(size=1000)], "Specified size is not multiple of 512"),
    # all or nothing: the error of a later entry, the earlier not applied
    (lambda a, b: [R0(**{"read-only": True}), R0(**{"node-name": "zz"})],
     "Failed to find node with node-name='zz'"),
    (lambda a, b: [R0(**{"read-only": True}), F0(b)], "Cannot change the option 'filename'"),
    (lambda a, b: [N0(), F0(a, **{"detect-zeroes": "unmap"})],
     "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_reopen_refused(setup, case):
    m, a, b, sock = setup
    opts, desc = BAD[case]
    assert reopen_error(m, *opts(a, b)) == desc
    # nothing changed
    n = nodes(m)
    assert [n[x]["ro"] for x in ("f0", "r0", "f1", "n0")] == [False] * 4
    assert n["r0"]["detect_zeroes"] == "off"
    assert n["r0"]["image"]["virtual-size"] == 1 << 20


def test_reopen_arguments(setup):
    m, a, b, sock = setup
    e = m.error("blockdev-reopen")
    assert e == {"class": "GenericError", "desc": "Parameter 'options' is missing"}
    e = m.error("blockdev-reopen", options=[{"driver": "bogus", "node-name": "f0"}])
    assert e["desc"] == "Parameter 'driver' does not accept value 'bogus'"


def test_reopen_generic_options(setup):
    """read-only, cache, discard and detect-zeroes change; left out they go
    back to their default (discard stays as it is)."""
    m, a, b, sock = setup
    reopen(m, F0(a, **{"read-only": True}))
    assert nodes(m)["f0"]["ro"] is True
    reopen(m, F0(a, cache={"no-flush": True}, discard="unmap", **{"detect-zeroes": "unmap"}))
    n = nodes(m)["f0"]
    assert (n["ro"], n["detect_zeroes"], n["cache"]["no-flush"]) == (False, "unmap", True)
    reopen(m, F0(a))
    n = nodes(m)["f0"]
    assert (n["ro"], n["detect_zeroes"], n["cache"]["no-flush"]) == (False, "off", False)
    # discard stayed unmap: detect-zeroes unmap is allowed without saying it again
    reopen(m, F0(a, **{"detect-zeroes": "unmap"}))
    reopen(m, F0(a, discard="ignore"))
    assert reopen_error(m, F0(a, **{"detect-zeroes": "unmap"})) == (
        "setting detect-zeroes to unmap is not allowed without setting discard operation "
        "to unmap")
    # auto-read-only is taken
    reopen(m, R0(**{"auto-read-only": True}))


def test_reopen_resettable_options(setup):
    """drop-cache may change but, once given, not be left out again."""
    m, a, b, sock = setup
    reopen(m, F0(a, **{"drop-cache": True}))
    assert reopen_error(m, F0(a)) == "Option 'drop-cache' cannot be reset to its default value"
    assert reopen_error(m, F0(a, **{"aio-max-batch": 0})) == (
        "Option 'drop-cache' cannot be reset to its default value")
    reopen(m, F0(a, **{"drop-cache": False}))


def test_reopen_same_node_twice(setup):
    """A node named twice gets both sets of options, the later winning."""
    m, a, b, sock = setup
    reopen(m, R0(**{"read-only": True}), R0(**{"detect-zeroes": "on"}))
    n = nodes(m)["r0"]
    assert (n["ro"], n["detect_zeroes"]) == (True, "on")
    reopen(m, R0(**{"detect-zeroes": "on"}), R0(**{"detect-zeroes": "off", "read-only": True}))
    n = nodes(m)["r0"]
    assert (n["ro"], n["detect_zeroes"]) == (True, "off")


def test_reopen_read_only_under_exports(setup):
    """A node under a writable export cannot turn read-only (nor its file);
    a read-only node refuses a writable export until it is reopened
    read-write, and the export's clients then write."""
    m, a, b, sock = setup
    m.execute("block-export-add", type="nbd", id="e0", node_name="r0", writable=True)
    assert reopen_error(m, R0(**{"read-only": True})) == (
        "Read-only block node 'r0' cannot support read-write users")
    assert reopen_error(m, F0(a, **{"read-only": True})) == (
        "Read-only block node 'f0' cannot support read-write users")
    assert nodes(m)["r0"]["ro"] is False
    m.execute("block-export-del", id="e0")
    m.wait_event("BLOCK_EXPORT_DELETED")

    reopen(m, R0(**{"read-only": True}))
    e = m.error("block-export-add", type="nbd", id="e1", node_name="r0", writable=True)
    assert e["desc"] == "Cannot export read-only node as writable"
    m.execute("block-export-add", type="nbd", id="e1", node_name="r0")
    h = nbd_client(sock, "r0")
    assert h.is_read_only()
    assert h.pread(4, 0) == b"AAAA"
    h.shutdown()
    # the read-only export stays on; reopen read-write and add a writer
    reopen(m, R0())
    m.execute("block-export-add", type="nbd", id="e2", node_name="r0", name="w", writable=True)
    h = nbd_client(sock, "w")
    assert not h.is_read_only()
    h.pwrite(b"C" * 512, 0)
    h.flush()
    h.shutdown()
    with open(a, "rb") as f:
        assert f.read(513) == b"C" * 512 + b"A"


def test_reopen_file_read_write_writes_the_file(setup):
    """A file node opened read-only writes its file after reopening
    read-write (the file is opened again), and reads after reopening
    read-only again."""
    m, a, b, sock = setup
    m.execute("blockdev-add", driver="file", node_name="ro0", filename=b, read_only=True)
    reopen(m, {"driver": "file", "node-name": "ro0", "filename": b})
    m.execute("block-export-add", type="nbd", id="e0", node_name="ro0", writable=True)
    h = nbd_client(sock, "ro0")
    h.pwrite(b"D" * 4096, 8192)
    h.flush()
    h.shutdown()
    m.execute("block-export-del", id="e0")
    m.wait_event("BLOCK_EXPORT_DELETED")
    reopen(m, {"driver": "file", "node-name": "ro0", "filename": b, "read-only": True})
    m.execute("block-export-add", type="nbd", id="e1", node_name="ro0")
    h = nbd_client(sock, "ro0")
    assert h.pread(4096, 8192) == b"D" * 4096
    h.shutdown()
    with open(b, "rb") as f:
        f.seek(8192)
        assert f.read(4096) == b"D" * 4096


def test_reopen_raw_window(impl, setup):
    """raw offset and size change: a new client reads the new window.  Its
    size is the new one in bexd; qsd keeps telling new clients the size the
    node had when the export was added."""
    m, a, b, sock = setup
    m.execute("block-export-add", type="nbd", id="e0", node_name="r0")
    reopen(m, R0(offset=4096))
    h = nbd_client(sock, "r0")
    assert h.get_size() == ((1 << 20) - 4096 if impl == "bexd" else 1 << 20)
    assert h.pread(4, 0) == b"BBBB"
    h.shutdown()
    reopen(m, R0(offset=4096, size=8192))
    assert nodes(m)["r0"]["image"]["virtual-size"] == 8192
    h = nbd_client(sock, "r0")
    assert h.get_size() == (8192 if impl == "bexd" else 1 << 20)
    h.shutdown()
    # size and offset may be left out again
    reopen(m, R0())
    assert nodes(m)["r0"]["image"]["virtual-size"] == 1 << 20


def test_reopen_raw_new_file_child(setup):
    """The file child may be replaced by another node; exports read it."""
    m, a, b, sock = setup
    m.execute("block-export-add", type="nbd", id="e0", node_name="r0", writable=True)
    with open(b, "r+b") as f:
        f.write(b"E" * 512)
    reopen(m, R0(file="f1"))
    h = nbd_client(sock, "r0")
    assert h.pread(512, 0) == b"E" * 512
    h.pwrite(b"F" * 512, 512)
    h.flush()
    h.shutdown()
    with open(b, "rb") as f:
        assert f.read(1024) == b"E" * 512 + b"F" * 512
    # the old child is free again: it can go read-only, and be deleted
    reopen(m, F0(a, **{"read-only": True}))
    m.execute("blockdev-del", node_name="f0")
    # the new one is in use for writing
    assert reopen_error(m, {"driver": "file", "node-name": "f1", "filename": b,
                            "read-only": True}) == (
        "Read-only block node 'f1' cannot support read-write users")


def test_reopen_inline_children(setup, start_daemon):
    """A child opened inline is reopened with its parent: given inline again
    it takes those options (its own left out may not be reset), named by
    its node name it keeps them, and it takes read-only from the parent
    when the parent says read-only and it does not."""
    m, a, b, sock = setup
    m.execute("blockdev-add", driver="raw", node_name="r1",
              file={"driver": "file", "filename": b, "locking": "off"})
    g = gen_name(m, b)
    assert reopen_error(m, {"driver": "raw", "node-name": "r1",
                            "file": {"driver": "file", "filename": b}}) == (
        "Option 'locking' cannot be reset to its default value")
    reopen(m, {"driver": "raw", "node-name": "r1", "read-only": True,
               "file": {"driver": "file", "filename": b, "locking": "off"}})
    n = nodes(m)
    assert (n["r1"]["ro"], n[g]["ro"]) == (True, True)
    reopen(m, {"driver": "raw", "node-name": "r1", "read-only": False,
               "file": {"driver": "file", "filename": b, "locking": "off", "read-only": True}})
    n = nodes(m)
    assert (n["r1"]["ro"], n[g]["ro"]) == (False, True)
    reopen(m, {"driver": "raw", "node-name": "r1", "file": g})
    n = nodes(m)
    assert (n["r1"]["ro"], n[g]["ro"]) == (False, True)
    # the child said read-only itself: the parent's read-only no longer reaches it
    reopen(m, {"driver": "raw", "node-name": "r1", "read-only": False, "file": g})
    n = nodes(m)
    assert (n["r1"]["ro"], n[g]["ro"]) == (False, True)
    reopen(m, {"driver": "raw", "node-name": "r1",
               "file": {"driver": "file", "filename": b, "locking": "off"}})
    n = nodes(m)
    assert (n["r1"]["ro"], n[g]["ro"]) == (False, False)
    # reopened directly, a generated node has no node-name option to give
    assert reopen_error(m, {"driver": "file", "node-name": g, "filename": b,
                            "locking": "off"}) == "Cannot change the option 'node-name'"
    # replaced, the inline child goes away
    reopen(m, {"driver": "raw", "node-name": "r1", "file": "f1"})
    assert g not in nodes(m)


def qcow2(tmpdir, name, backing=None, size="1M"):
    path = os.path.join(tmpdir, name)
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    subprocess.run(cmd + [path, size], check=True)
    return path


def image_info(path):
    return json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                                     check=True, stdout=subprocess.PIPE).stdout)


def test_reopen_qcow2_options(impl, start_daemon, tmpdir_short):
    d = start_daemon(impl)
    m = d.qmp()
    q = qcow2(tmpdir_short, "q.qcow2")
    f = {"driver": "file", "filename": q}
    m.execute("blockdev-add", driver="qcow2", node_name="q0", file=f)
    Q = lambda **kw: dict({"driver": "qcow2", "node-name": "q0", "file": f}, **kw)
    reopen(m, Q(**{"cache-size": 1 << 20, "l2-cache-entry-size": 4096,
                   "cache-clean-interval": 5, "pass-discard-other": True,
                   "overlap-check": "all", "lazy-refcounts": True}))
    reopen(m, Q(**{"overlap-check": {"template": "none", "main-header": True}}))
    reopen(m, Q())   # every one may go back to its default
    for opts, desc in [
            ({"l2-cache-entry-size": 100},
             "L2 cache entry size must be a power of two between 512 and the cluster size "
             "(65536)"),
            ({"cache-clean-interval": -1}, "Cache clean interval too big"),
            ({"cache-size": 1 << 20, "l2-cache-size": 1 << 19, "refcount-cache-size": 1 << 19},
             "cache-size, l2-cache-size and refcount-cache-size may not be set at the same "
             "time"),
            ({"encrypt": {"format": "aes"}},
             "No encryption in image header, but options specified format 'aes'"),
            ({"backing": "q0"}, "Making 'q0' a backing child of 'q0' would create a cycle"),
            ({"backing": "nope"}, "Cannot find device='' nor node-name='nope'")]:
        assert reopen_error(m, Q(**opts)) == desc, opts


def test_reopen_qcow2_read_only_and_back(impl, start_daemon, tmpdir_short):
    """Read-only writes the metadata back and leaves the image clean (lazy
    refcounts on); read-write again, clients write and the image checks
    clean at the end."""
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    m = d.qmp()
    q = qcow2(tmpdir_short, "q.qcow2")
    f = {"driver": "file", "filename": q}
    m.execute("blockdev-add", driver="qcow2", node_name="q0", file=f,
              lazy_refcounts=True)
    Q = lambda **kw: dict({"driver": "qcow2", "node-name": "q0", "file": f,
                           "lazy-refcounts": True}, **kw)
    m.execute("block-export-add", type="nbd", id="e0", node_name="q0", writable=True)
    h = nbd_client(sock, "q0")
    h.pwrite(b"G" * 65536, 0)
    h.flush()
    h.shutdown()
    assert image_info(q)["dirty-flag"] is True       # lazy refcounts in use
    m.execute("block-export-del", id="e0")
    m.wait_event("BLOCK_EXPORT_DELETED")
    reopen(m, Q(**{"read-only": True}))
    n = nodes(m)
    assert n["q0"]["ro"] is True
    assert n[gen_name(m, q)]["ro"] is True
    assert image_info(q)["dirty-flag"] is False
    subprocess.run(["qemu-img", "check", "-U", q], check=True, stdout=subprocess.PIPE)
    e = m.error("block-export-add", type="nbd", id="e1", node_name="q0", writable=True)
    assert e["desc"] == "Cannot export read-only node as writable"
    reopen(m, Q())
    m.execute("block-export-add", type="nbd", id="e1", node_name="q0", writable=True)
    h = nbd_client(sock, "q0")
    assert h.pread(4, 0) == b"GGGG"
    h.pwrite(b"H" * 65536, 1 << 19)
    h.flush()
    h.shutdown()
    m.execute("block-export-del", id="e1")
    m.wait_event("BLOCK_EXPORT_DELETED")
    m.execute("blockdev-del", node_name="q0")
    subprocess.run(["qemu-img", "check", q], check=True, stdout=subprocess.PIPE)
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x48 512k 64k", q],
                         check=True, stdout=subprocess.PIPE).stdout
    assert b"read 65536/65536" in out


def test_reopen_qcow2_backing(impl, start_daemon, tmpdir_short):
    """backing must be given when there is one; null drops it (reads of
    unallocated clusters then return zeros), a node name puts another."""
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    m = d.qmp()
    base = qcow2(tmpdir_short, "base.qcow2")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x49 0 64k", base], check=True,
                   stdout=subprocess.PIPE)
    other = qcow2(tmpdir_short, "other.qcow2")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x4a 0 64k", other], check=True,
                   stdout=subprocess.PIPE)
    top = qcow2(tmpdir_short, "top.qcow2", backing=base)
    f = {"driver": "file", "filename": top}
    m.execute("blockdev-add", driver="qcow2", node_name="t0", file=f)
    m.execute("blockdev-add", driver="qcow2", node_name="o0", read_only=True,
              file={"driver": "file", "filename": other})
    T = lambda **kw: dict({"driver": "qcow2", "node-name": "t0", "file": f}, **kw)
    m.execute("block-export-add", type="nbd", id="e0", node_name="t0")
    assert reopen_error(m, T()) == "backing is missing for 't0'"
    assert nodes(m)["t0"]["backing_file_depth"] == 1

    def first_bytes():
        h = nbd_client(sock, "t0")
        data = h.pread(4, 0)
        h.shutdown()
        return data

    assert first_bytes() == b"IIII"
    reopen(m, T(backing=None))
    assert nodes(m)["t0"]["backing_file_depth"] == 0
    assert first_bytes() == b"\0\0\0\0"
    reopen(m, T(backing="o0"))
    assert nodes(m)["t0"]["backing_file_depth"] == 1
    assert first_bytes() == b"JJJJ"
    reopen(m, T(backing="o0"))            # the same: nothing changes
    assert reopen_error(m, {"driver": "qcow2", "node-name": "o0", "read-only": True,
                            "file": {"driver": "file", "filename": other},
                            "backing": "t0"}) == (
        "Making 't0' a backing child of 'o0' would create a cycle")
    # o0 is in use as a backing file (QEMU's op blocker): deletable once released
    e = m.error("blockdev-del", node_name="o0")
    assert e["desc"] == "Node 'o0' is busy: node is used as backing hd of 't0'"
    reopen(m, T(backing=None))
    m.execute("blockdev-del", node_name="o0")


def test_reopen_keeps_a_backing_chain_opened_from_headers(impl, start_daemon, tmpdir_short):
    """A read-only qcow2 node whose chain its headers opened goes read-write
    with "backing" naming the generated node it has: that node and the one
    below it keep their options and stay read-only, their files too (QEMU's
    backing children are read-only by default)."""
    d = start_daemon(impl)
    m = d.qmp()
    base = qcow2(tmpdir_short, "base.qcow2")
    mid = qcow2(tmpdir_short, "mid.qcow2", backing=base)
    top = qcow2(tmpdir_short, "top.qcow2", backing=mid)
    f = {"driver": "file", "filename": top}
    m.execute("blockdev-add", driver="qcow2", node_name="t0", read_only=True, file=f)
    below = [n["node-name"] for n in m.execute("query-named-block-nodes")
             if n["drv"] == "qcow2" and n["image"]["filename"] == mid][0]
    reopen(m, {"driver": "qcow2", "node-name": "t0", "read-only": False, "file": f,
               "backing": below})
    ro = sorted((os.path.basename(n["image"]["filename"]), n["drv"], n["ro"])
                for n in m.execute("query-named-block-nodes"))
    assert ro == [("base.qcow2", "file", True), ("base.qcow2", "qcow2", True),
                  ("mid.qcow2", "file", True), ("mid.qcow2", "qcow2", True),
                  ("top.qcow2", "file", False), ("top.qcow2", "qcow2", False)]


def test_reopen_empty_list(start_daemon):
    """qemu-storage-daemon 7.2 crashes on an empty list; bexd does nothing."""
    d = start_daemon("bexd")
    m = d.qmp()
    assert m.execute("blockdev-reopen", options=[]) == {}


def test_reopen_qcow2_takes_its_file(impl, start_daemon, tmpdir_short):
    """A read-write qcow2 node writes its file even without users (QEMU's
    metadata child): a second read-write node on the same image cannot get
    the write lock, the file cannot turn read-only under it; reopened
    read-only, the qcow2 node gives the write lock back."""
    d = start_daemon(impl)
    m = d.qmp()
    q = qcow2(tmpdir_short, "q.qcow2")
    m.execute("blockdev-add", driver="file", node_name="f0", filename=q)
    m.execute("blockdev-add", driver="qcow2", node_name="q0", file="f0")
    e = m.error("blockdev-add", driver="qcow2", node_name="q1",
                file={"driver": "file", "filename": q})
    assert e["desc"] == 'Failed to get "write" lock'
    assert reopen_error(m, {"driver": "file", "node-name": "f0", "filename": q,
                            "read-only": True}) == (
        "Read-only block node 'f0' cannot support read-write users")
    # both at once: the qcow2 node stops writing its file
    reopen(m, {"driver": "qcow2", "node-name": "q0", "file": "f0", "read-only": True},
           {"driver": "file", "node-name": "f0", "filename": q, "read-only": True})
    n = nodes(m)
    assert (n["q0"]["ro"], n["f0"]["ro"]) == (True, True)
    m.execute("blockdev-add", driver="qcow2", node_name="q1", read_only=True,
              file={"driver": "file", "filename": q, "read-only": True})
    m.execute("blockdev-del", node_name="q1")
    # read-write again needs the file read-write first, or with it
    assert reopen_error(m, {"driver": "qcow2", "node-name": "q0", "file": "f0"}) == (
        "Block node is read-only")
    reopen(m, {"driver": "qcow2", "node-name": "q0", "file": "f0"},
           {"driver": "file", "node-name": "f0", "filename": q})
    e = m.error("blockdev-add", driver="qcow2", node_name="q1",
                file={"driver": "file", "filename": q})
    assert e["desc"] == 'Failed to get "write" lock'


def test_null_co_image_info_has_no_dirty_flag(impl, start_daemon):
    """query-named-block-nodes: null-co has no image info of its own in QEMU,
    so its image (and a raw node's over it) carries no dirty-flag; a file
    node's does."""
    d = start_daemon(impl)
    m = d.qmp()
    m.execute("blockdev-add", driver="null-co", node_name="n0")
    m.execute("blockdev-add", driver="raw", node_name="r0", file="n0")
    n = nodes(m)
    for name in ("n0", "r0"):
        assert sorted(n[name]["image"]) == ["actual-size", "filename", "format",
                                            "virtual-size"], name
