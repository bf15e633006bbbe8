"""Dirty bitmaps: QMP commands, write tracking on every export type, and
bitmaps published over NBD as qemu:dirty-bitmap:NAME.

Most scenarios run against bexd and qemu-storage-daemon (impl) and assert
the same answers: error classes and messages, counts, SHA-256 of the bits
(the hashes below are qemu-storage-daemon 7.2's), `nbdinfo --map` and
`qemu-img map` output.  Where bexd deliberately does better the test runs
against bexd only and says why.
"""
import json
import os
import subprocess

import pytest

import needs
from conftest import BUILD, tool_text, tool_json

MiB = 1 << 20
SIZE = 64 * MiB
VUB = os.environ.get("VUB_CLIENT", os.path.join(BUILD, "tests", "vhost", "vub-client"))

# SHA-256 of a clean bitmap of 64 MiB at 64 KiB granularity (16 zero words)
CLEAN_64M = "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca"


@pytest.fixture
def daemon(start_daemon, image, tmpdir_short):
    """daemon(impl, raw_opts='', extra=()) -> (Daemon, QMP, nbd socket, image)."""
    def start(impl, raw_opts="", extra=(), size=SIZE):
        img = image(size, name="%s.img" % impl)
        sock = os.path.join(tmpdir_short, "nbd-%s.sock" % impl)
        raw = "driver=raw,node-name=r0,file=f0" + ("," + raw_opts if raw_opts else "")
        d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s" % img,
                         "--blockdev", raw,
                         "--nbd-server", "addr.type=unix,addr.path=%s" % sock, *extra)
        return d, d.qmp(), sock, img
    return start


def uri(sock, name):
    return "nbd+unix:///%s?socket=%s" % (name, sock)


def bitmaps_of(qmp, node):
    for n in qmp.execute("query-named-block-nodes"):
        if n["node-name"] == node:
            return n.get("dirty-bitmaps")
    raise KeyError(node)


def bitmap(qmp, node, name):
    for b in bitmaps_of(qmp, node) or []:
        if b.get("name") == name:
            return b
    raise KeyError(name)


def sha(qmp, node, name):
    return qmp.execute("x-debug-block-dirty-bitmap-sha256", node=node, name=name)["sha256"]


def qemu_io(target, *cmds, fmt="raw"):
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv + [target], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60)
    assert r.returncode == 0 and b"failed" not in r.stdout + r.stderr, (r.stdout, r.stderr)


def nbdinfo_map(sock, name, ctx):
    r = subprocess.run(["nbdinfo", "--map=" + ctx, uri(sock, name)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0, r.stderr
    return [l.split() for l in tool_text(r.stdout).splitlines()]


def expect_error(qmp, cmd, desc, cls="GenericError", **args):
    e = qmp.error(cmd, **args)
    assert (e["class"], e["desc"]) == (cls, desc)


# ---- QMP: arguments and misuse ------------------------------------------------------

def test_add_errors(impl, daemon):
    d, qmp, sock, img = daemon(impl)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="b0")
    expect_error(qmp, "block-dirty-bitmap-add", "Bitmap already exists: b0", node="r0", name="b0")
    expect_error(qmp, "block-dirty-bitmap-add", "Bitmap name cannot be empty", node="r0", name="")
    expect_error(qmp, "block-dirty-bitmap-add", "Cannot find device='nope' nor node-name='nope'",
                 node="nope", name="x")
    for g in (0, 256, 1000, 65535):
        expect_error(qmp, "block-dirty-bitmap-add",
                     "Granularity must be power of 2 and at least 512",
                     node="r0", name="g", granularity=g)
    expect_error(qmp, "block-dirty-bitmap-add", "Bitmap name too long: " + "x" * 1024,
                 node="r0", name="x" * 1024)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="x" * 1023)
    qmp.execute("blockdev-add", driver="null-co", node_name="n0")
    expect_error(qmp, "block-dirty-bitmap-add",
                 "Can't store persistent bitmaps to n0: Operation not supported",
                 node="n0", name="p", persistent=True)
    if impl == "qsd":       # bexd stores raw images' bitmaps: test_bitmap_persistence.py
        expect_error(qmp, "block-dirty-bitmap-add",
                     "Can't store persistent bitmaps to f0: Operation not supported",
                     node="f0", name="p", persistent=True)
    # the schema bounds granularity to uint32
    e = qmp.error("block-dirty-bitmap-add", node="r0", name="g", granularity=1 << 32)
    assert e["class"] == "GenericError" and "granularity" in e["desc"]
    qmp.execute("block-dirty-bitmap-add", node="r0", name="huge", granularity=1 << 31)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="fine", granularity=512,
                disabled=True)
    got = {b["name"]: b for b in bitmaps_of(qmp, "r0")}
    assert got["huge"]["granularity"] == 1 << 31
    assert got["fine"] == {"name": "fine", "recording": False, "persistent": False,
                           "busy": False, "granularity": 512, "count": 0}
    assert got["b0"] == {"name": "b0", "recording": True, "persistent": False,
                         "busy": False, "granularity": 65536, "count": 0}
    # listed newest first, as QEMU does; nodes without bitmaps have no list
    assert [b["name"] for b in bitmaps_of(qmp, "r0")] == ["fine", "huge", "x" * 1023, "b0"]
    assert bitmaps_of(qmp, "f0") is None


@pytest.mark.parametrize("cmd", ["block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
                                 "block-dirty-bitmap-enable", "block-dirty-bitmap-disable",
                                 "x-debug-block-dirty-bitmap-sha256"])
def test_lookup_errors(impl, daemon, cmd):
    d, qmp, sock, img = daemon(impl)
    expect_error(qmp, cmd, "Dirty bitmap 'zz' not found", node="r0", name="zz")
    expect_error(qmp, cmd, "Node 'zz' not found", node="zz", name="b0")
    e = qmp.error(cmd, node="r0")
    assert e["class"] == "GenericError" and "'name'" in e["desc"]


def test_merge_errors(impl, daemon, start_daemon):
    d, qmp, sock, img = daemon(impl, extra=["--blockdev", "driver=null-co,node-name=n0,size=4096"])
    qmp.execute("block-dirty-bitmap-add", node="r0", name="b0")
    qmp.execute("block-dirty-bitmap-add", node="f0", name="fb")
    qmp.execute("block-dirty-bitmap-add", node="n0", name="small")
    merge = lambda target, bitmaps, node="r0": qmp.error(
        "block-dirty-bitmap-merge", node=node, target=target, bitmaps=bitmaps)
    assert merge("zz", ["b0"])["desc"] == "Dirty bitmap 'zz' not found"
    assert merge("b0", ["b0"], node="zz")["desc"] == "Node 'zz' not found"
    assert merge("b0", ["zz"])["desc"] == "Dirty bitmap 'zz' not found"
    # a name alone is looked up on the target's node only
    assert merge("b0", ["fb"])["desc"] == "Dirty bitmap 'fb' not found"
    assert merge("b0", [{"node": "zz", "name": "b0"}])["desc"] == "Node 'zz' not found"
    assert merge("b0", [{"node": "f0", "name": "zz"}])["desc"] == "Dirty bitmap 'zz' not found"
    assert merge("b0", [{"node": "n0", "name": "small"}])["desc"] == (
        "Bitmaps are of different sizes (destination size is 67108864, source size is 4096) "
        "and can't be merged")
    qmp.execute("block-dirty-bitmap-merge", node="r0", target="b0",
                bitmaps=["b0", {"node": "f0", "name": "fb"}])


def test_busy_while_exported(impl, daemon):
    d, qmp, sock, img = daemon(impl)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="dis", disabled=True)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="en")
    qmp.execute("block-dirty-bitmap-add", node="r0", name="t")
    qmp.execute("block-export-add", type="nbd", id="e0", node_name="r0", name="x0",
                bitmaps=["dis", "en"], writable=True)
    busy = "Bitmap '%s' is currently in use by another operation and cannot be used"
    assert bitmap(qmp, "r0", "dis")["busy"] and bitmap(qmp, "r0", "en")["busy"]
    assert not bitmap(qmp, "r0", "t")["busy"]
    for cmd in ("block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
                "block-dirty-bitmap-enable", "block-dirty-bitmap-disable"):
        expect_error(qmp, cmd, busy % "dis", node="r0", name="dis")
    # busy as a merge target, and as a source
    expect_error(qmp, "block-dirty-bitmap-merge", busy % "dis", node="r0", target="dis",
                 bitmaps=["t"])
    expect_error(qmp, "block-dirty-bitmap-merge", busy % "dis", node="r0", target="dis",
                 bitmaps=["en"])
    expect_error(qmp, "block-dirty-bitmap-merge", busy % "en", node="r0", target="t",
                 bitmaps=["en"])
    assert sha(qmp, "r0", "dis") == CLEAN_64M           # reading is allowed
    # a second export cannot take a busy bitmap
    expect_error(qmp, "block-export-add", busy % "dis", type="nbd", id="e1", node_name="r0",
                 name="x1", bitmaps=["dis"], writable=True)
    # the node with an exported bitmap stays
    expect_error(qmp, "blockdev-del", "Node r0 is in use", node_name="r0")
    qmp.execute("block-export-del", id="e0")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    assert not bitmap(qmp, "r0", "dis")["busy"]
    qmp.execute("block-dirty-bitmap-remove", node="r0", name="dis")
    qmp.execute("block-dirty-bitmap-remove", node="r0", name="en")


def test_export_bitmap_errors(impl, daemon):
    d, qmp, sock, img = daemon(impl)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="en")
    qmp.execute("block-dirty-bitmap-add", node="r0", name="dis", disabled=True)
    add = lambda bitmaps, writable=False: qmp.error(
        "block-export-add", type="nbd", id="e0", node_name="r0", name="x",
        bitmaps=bitmaps, writable=writable)
    assert add(["zz"])["desc"] == "Bitmap 'zz' is not found"
    assert add([{"node": "zz", "name": "en"}])["desc"] == "Node 'zz' not found"
    assert add([{"node": "r0", "name": "zz"}])["desc"] == "Dirty bitmap 'zz' not found"
    # a read-only export of a writable node may only publish disabled bitmaps
    assert add(["en"])["desc"] == "Enabled bitmap 'en' incompatible with readonly export"
    assert add(["dis", "en"])["desc"] == "Enabled bitmap 'en' incompatible with readonly export"
    # nothing was left busy by the failures
    assert not bitmap(qmp, "r0", "dis")["busy"]
    qmp.execute("block-export-add", type="nbd", id="e0", node_name="r0", name="x",
                bitmaps=[{"node": "r0", "name": "dis"}])
    e = qmp.error("nbd-server-add", device="r0", name="y", bitmap="en")
    assert e["desc"] == "Enabled bitmap 'en' incompatible with readonly export"
    e = qmp.error("nbd-server-add", device="r0", name="y", bitmap="zz")
    assert e["desc"] == "Bitmap 'zz' is not found"
    qmp.execute("nbd-server-add", device="r0", name="y", bitmap="en", writable=True)
    assert bitmap(qmp, "r0", "en")["busy"]


def test_enable_disable_clear(impl, daemon):
    d, qmp, sock, img = daemon(impl)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="b")
    qmp.execute("block-export-add", type="nbd", id="e0", node_name="r0", name="x",
                writable=True)
    qemu_io(uri(sock, "x"), "write 0 1")
    qmp.execute("block-dirty-bitmap-disable", node="r0", name="b")
    assert bitmap(qmp, "r0", "b")["recording"] is False
    qemu_io(uri(sock, "x"), "write 1M 1")            # not recorded
    qmp.execute("block-dirty-bitmap-enable", node="r0", name="b")
    qemu_io(uri(sock, "x"), "write 2M 1")
    assert bitmap(qmp, "r0", "b")["count"] == 2 * 65536
    qmp.execute("block-dirty-bitmap-clear", node="r0", name="b")
    assert bitmap(qmp, "r0", "b")["count"] == 0
    assert sha(qmp, "r0", "b") == CLEAN_64M


# ---- tracking writes, and what NBD clients see ---------------------------------------

MAP_64K = [
    ["0", "65536", "0", "clean"],
    ["65536", "65536", "1", "dirty"],
    ["131072", "917504", "0", "clean"],
    ["1048576", "65536", "1", "dirty"],
    ["1114112", "19857408", "0", "clean"],
    ["20971520", "65536", "1", "dirty"],
    ["21037056", "46071808", "0", "clean"],
]
MAP_512 = [
    ["0", "99840", "0", "clean"],
    ["99840", "5632", "1", "dirty"],
    ["105472", "943104", "0", "clean"],
    ["1048576", "65536", "1", "dirty"],
    ["1114112", "19857408", "0", "clean"],
    ["20971520", "512", "1", "dirty"],
    ["20972032", "46136832", "0", "clean"],
]


def test_nbd_writes_and_maps(impl, daemon):
    d, qmp, sock, img = daemon(impl)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="dis", disabled=True)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="en")
    qmp.execute("block-dirty-bitmap-add", node="r0", name="en512", granularity=512)
    qmp.execute("block-export-add", type="nbd", id="e0", node_name="r0", name="x",
                bitmaps=["dis", "en", "en512"], writable=True)
    # a write, write-zeroes, a discard (discard=ignore: not a change) and a 1-byte write
    qemu_io(uri(sock, "x"), "write -P 1 100000 5000", "write -z 1M 64k", "discard 4M 64k",
            "write 20M 1")
    assert nbdinfo_map(sock, "x", "qemu:dirty-bitmap:en") == MAP_64K
    assert nbdinfo_map(sock, "x", "qemu:dirty-bitmap:en512") == MAP_512
    assert nbdinfo_map(sock, "x", "qemu:dirty-bitmap:dis") == [
        ["0", "67108864", "0", "clean"]]
    assert bitmap(qmp, "r0", "en")["count"] == 196608
    assert bitmap(qmp, "r0", "en512")["count"] == 71680
    assert sha(qmp, "r0", "en") == \
        "bac9c5527239b77afa5b2de69a83a4bf167a6d12c94b160e029d869317bb7770"
    # qemu-img map shows dirty areas as "data": false (x-dirty-bitmap)
    r = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts",
                        "driver=nbd,export=x,server.type=unix,server.path=%s,"
                        "x-dirty-bitmap=qemu:dirty-bitmap:en" % sock],
                       stdout=subprocess.PIPE, check=True, timeout=60)
    got = [(m["start"], m["length"], m["data"]) for m in tool_json(r.stdout)]
    assert got == [(int(a), int(b), c == "clean") for a, b, _, c in MAP_64K]
    # the contexts listed, in QEMU's order
    r = subprocess.run(["nbdinfo", "--list", "--json", uri(sock, "x")],
                       stdout=subprocess.PIPE, check=True, timeout=60)
    ctx = tool_json(r.stdout)["exports"][0]["contexts"]
    assert ctx == ["base:allocation", "qemu:dirty-bitmap:dis", "qemu:dirty-bitmap:en",
                   "qemu:dirty-bitmap:en512"]


def test_nbd_block_status_req_one(impl, daemon):
    """Several contexts in one reply, and REQ_ONE, through libnbd."""
    d, qmp, sock, img = daemon(impl)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="a")
    qmp.execute("block-dirty-bitmap-add", node="r0", name="b", granularity=512)
    qmp.execute("block-export-add", type="nbd", id="e0", node_name="r0", name="x",
                bitmaps=["a", "b"], writable=True)
    qemu_io(uri(sock, "x"), "write 70000 10", "write 3M 1M")
    script = r"""
import nbd, json
h = nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:a")
h.add_meta_context("qemu:dirty-bitmap:b")
h.connect_uri(URI)
out = {}
def cb(meta, offset, entries, err):
    out.setdefault(meta, []).append(list(entries))
    return 0
h.block_status(8 << 20, 0, cb)
h.block_status(8 << 20, 65536, cb, nbd.CMD_FLAG_REQ_ONE)
print(json.dumps(out))
"""
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    r = subprocess.run(["/usr/bin/python3", "-c", script.replace("URI", repr(uri(sock, "x")))],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    out = tool_json(r.stdout)
    assert out["qemu:dirty-bitmap:a"] == [
        [65536, 0, 65536, 1, 3 * MiB - 131072, 0, MiB, 1, 4 * MiB, 0],
        [65536, 1]]
    assert out["qemu:dirty-bitmap:b"] == [
        [69632, 0, 512, 1, 3 * MiB - 70144, 0, MiB, 1, 4 * MiB, 0],
        [4096, 0]]


def test_discard_marks_with_unmap(impl, daemon):
    d, qmp, sock, img = daemon(impl, raw_opts="discard=unmap")
    qmp.execute("block-dirty-bitmap-add", node="r0", name="b")
    qmp.execute("block-export-add", type="nbd", id="e0", node_name="r0", name="x",
                writable=True)
    qemu_io(uri(sock, "x"), "discard 4M 64k")
    assert bitmap(qmp, "r0", "b")["count"] == 65536


def test_vhost_user_blk_writes_mark(impl, start_daemon, image, tmpdir_short):
    needs.built(VUB, "vub-client")
    img = image(SIZE, name="%s.img" % impl)
    sock = os.path.join(tmpdir_short, "vub-%s.sock" % impl)
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=disk,filename=%s" % img,
                     "--export", "type=vhost-user-blk,id=v0,node-name=disk,writable=on,"
                     "addr.type=unix,addr.path=%s" % sock)
    qmp = d.qmp()
    qmp.execute("block-dirty-bitmap-add", node="disk", name="b", granularity=4096)
    r = subprocess.run([VUB, sock, "write", str(5 * MiB), "8192", "7"],
                       stdout=subprocess.PIPE, timeout=60)
    assert json.loads(tool_text(r.stdout).splitlines()[-1])["status"] == 0
    # write zeroes (type 13) of 8 sectors at sector 100
    r = subprocess.run([VUB, sock, "req", "13", "100", "8"], stdout=subprocess.PIPE, timeout=60)
    assert json.loads(tool_text(r.stdout).splitlines()[-1])["status"] == 0
    assert bitmap(qmp, "disk", "b")["count"] == 8192 + 2 * 4096   # 51200..55296: 2 granules


def test_fuse_writes_mark(impl, start_daemon, image, tmpdir_short):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    img = image(SIZE, name="%s.img" % impl)
    mnt = os.path.join(tmpdir_short, "mnt-%s" % impl)
    open(mnt, "w").close()
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=disk,filename=%s" % img,
                     "--export", "type=fuse,id=f0,node-name=disk,writable=on,mountpoint=%s" % mnt)
    try:
        qmp = d.qmp()
        qmp.execute("block-dirty-bitmap-add", node="disk", name="b")
        fd = os.open(mnt, os.O_RDWR)
        try:
            os.pwrite(fd, b"x" * 10, 3 * MiB + 5)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert bitmap(qmp, "disk", "b")["count"] == 65536
    finally:
        d.stop()
        subprocess.run(["fusermount3", "-u", "-z", mnt], stderr=subprocess.DEVNULL)


def test_merge_sha256_like_qemu(impl, daemon):
    """Merges across granularities give QEMU's bits, by their hash."""
    d, qmp, sock, img = daemon(impl)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="fine", granularity=512)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="coarse", granularity=1 << 20,
                disabled=True)
    qmp.execute("block-dirty-bitmap-add", node="f0", name="onfile", disabled=True)
    qmp.execute("block-export-add", type="nbd", id="e0", node_name="r0", name="x",
                writable=True)
    qemu_io(uri(sock, "x"), "write 1000 1", "write 7M 3M", "write 63M 1M")
    qmp.execute("block-dirty-bitmap-merge", node="r0", target="coarse",
                bitmaps=["fine"])
    qmp.execute("block-dirty-bitmap-merge", node="f0", target="onfile",
                bitmaps=[{"node": "r0", "name": "coarse"}])
    assert bitmap(qmp, "r0", "coarse")["count"] == 5 * MiB
    assert bitmap(qmp, "f0", "onfile")["count"] == 5 * 16 * 65536
    assert sha(qmp, "r0", "fine") == \
        "c533428a5221936bd5a9f1e779423bb242c78f54697b500db52b0d6163178a3d"
    assert sha(qmp, "r0", "coarse") == \
        "2cbf80e33d4487cd133e4a8f203c22dd55072f137ccd27bb71f4b0e24590994b"


# ---- bexd only --------------------------------------------------------------------

def test_export_finds_bitmap_below_format_node(daemon):
    """bexd looks for an exported bitmap on every node below the export;
    qemu-storage-daemon 7.2 only follows filters and backing files, so a
    bitmap on the file node under a raw node is not found there."""
    d, qmp, sock, img = daemon("bexd")
    qmp.execute("block-dirty-bitmap-add", node="f0", name="fb")
    qmp.execute("block-export-add", type="nbd", id="e0", node_name="r0", name="x",
                bitmaps=["fb"], writable=True)
    qemu_io(uri(sock, "x"), "write 2M 1")
    assert nbdinfo_map(sock, "x", "qemu:dirty-bitmap:fb") == [
        ["0", "2097152", "0", "clean"], ["2097152", "65536", "1", "dirty"],
        ["2162688", str(SIZE - 2162688), "0", "clean"]]
    assert bitmap(qmp, "f0", "fb")["busy"]


def test_merge_empty_list(daemon):
    """qemu-storage-daemon 7.2 aborts on an empty source list; bexd merges
    nothing (after checking the target)."""
    d, qmp, sock, img = daemon("bexd")
    qmp.execute("block-dirty-bitmap-add", node="r0", name="b")
    qmp.execute("block-dirty-bitmap-merge", node="r0", target="b", bitmaps=[])
    assert bitmap(qmp, "r0", "b")["count"] == 0


def test_terabyte_map_is_exact(start_daemon, tmpdir_short):
    """A 1 TiB export's bitmap with scattered dirty areas: nbdinfo --map
    gives exactly those areas, and the whole size.  (How fast the walk
    over 1 TiB is, is test-pbitmap's test_terabyte_walk: nbdinfo's own
    start-up on a loaded machine made a wall-clock bound here say nothing
    about bexd.)"""
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon("bexd", "--blockdev", "driver=null-co,node-name=n0,size=%d" % (1 << 40),
                     "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    qmp = d.qmp()
    qmp.execute("block-dirty-bitmap-add", node="n0", name="b")
    qmp.execute("block-export-add", type="nbd", id="e0", node_name="n0", name="x",
                bitmaps=["b"], writable=True)
    offsets = [(i * 7919 * MiB) % (1 << 40) for i in range(1, 200)]
    script = "import nbd\nh = nbd.NBD()\nh.connect_uri(%r)\n" % uri(sock, "x")
    script += "for o in %r:\n    h.pwrite(b'x', o)\n" % offsets
    subprocess.run(["/usr/bin/python3", "-c", script], check=True, timeout=60)
    m = nbdinfo_map(sock, "x", "qemu:dirty-bitmap:b")
    dirty = sorted(int(a) for a, _, f, _ in m if f == "1")
    assert dirty == sorted(o - o % 65536 for o in offsets)
    assert sum(int(b) for _, b, _, _ in m) == 1 << 40
