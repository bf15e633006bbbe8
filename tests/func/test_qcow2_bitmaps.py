"""Persistent dirty bitmaps inside qcow2 images (the bitmaps extension of
QEMU's docs/interop/qcow2.txt), as qemu-storage-daemon 7.2 keeps them.

Scenarios run against bexd and qemu-storage-daemon (impl) and assert the
same answers; images go back and forth between bexd, qsd and qemu-img 7.2
(`qemu-img bitmap`, `qemu-img info`, `qemu-img check`) and the bits are
compared with x-debug-block-dirty-bitmap-sha256 on both daemons.  The image
is also parsed here, independently of both, to check the in-use rule on
disk and that a FLUSH writes the bits while bexd holds the image.
"""
import json
import os
import signal
import struct
import subprocess

import pytest
from conftest import tool_text

MiB = 1 << 20
GiB = 1 << 30
IN_USE, AUTO = 1, 2


# ---- helpers -------------------------------------------------------------------------

def run(*args, check=True):
    r = subprocess.run(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    if check:
        assert r.returncode == 0, (args, tool_text(r.stdout))
    return tool_text(r.stdout)


def qemu_img(*args, check=True):
    return run("qemu-img", *args, check=check)


def make_image(path, size="64M", *opts):
    qemu_img("create", "-q", "-f", "qcow2", *opts, path, size)
    return path


def info_bitmaps(img):
    """qemu-img info's bitmaps list (forced share: a daemon may hold it)."""
    out = json.loads(qemu_img("info", "-U", "--output=json", img))
    return out["format-specific"]["data"].get("bitmaps")


def check(img):
    """qemu-img check: (exit status, output without the end offset line)."""
    r = subprocess.run(["qemu-img", "check", img], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=120)
    lines = [l for l in tool_text(r.stdout).splitlines() if not l.startswith("Image end offset")]
    return r.returncode, "\n".join(lines)


def read_image_bitmaps(path):
    """Parse the bitmaps extension: name -> (flags, granularity, bytes of bits)."""
    with open(path, "rb") as f:
        data = f.read()
    cluster_bits, size = struct.unpack_from(">IQ", data, 20)
    cs = 1 << cluster_bits
    autoclear, = struct.unpack_from(">Q", data, 88)
    hlen, = struct.unpack_from(">I", data, 100)
    at, ext = hlen, None
    while at + 8 <= cs:
        typ, ln = struct.unpack_from(">II", data, at)
        if typ == 0:
            break
        if typ == 0x23852875:
            ext = struct.unpack_from(">IIQQ", data, at + 8)
        at += 8 + (ln + 7) // 8 * 8
    if not ext or not autoclear & 1:
        return {}
    nb, _, dsize, doff = ext
    out, p = {}, doff
    for _ in range(nb):
        toff, tsize, flags, typ, gbits, nlen, extra = struct.unpack_from(">QIIBBHI", data, p)
        name = data[p + 24 + extra:p + 24 + extra + nlen].decode()
        p += (24 + extra + nlen + 7) // 8 * 8
        nbytes = ((size + (1 << gbits) - 1) >> gbits) // 8 + 1
        bits = bytearray()
        for i in range(tsize):
            e, = struct.unpack_from(">Q", data, toff + 8 * i)
            off = e & 0x00fffffffffffe00
            if off:
                bits += data[off:off + cs]
            else:
                bits += (b"\xff" if e & 1 else b"\0") * cs
        out[name] = (flags, 1 << gbits, bytes(bits[:nbytes]))
    return out


@pytest.fixture
def daemon(start_daemon, tmpdir_short):
    """daemon(impl, img, ro=False) -> (Daemon, QMP, nbd uri): q0 (qcow2) over f0,
    exported writable as 'x' unless ro."""
    n = [0]

    def start(impl, img, ro=False):
        n[0] += 1
        sock = os.path.join(tmpdir_short, "nbd%d.sock" % n[0])
        f = "driver=file,node-name=f0,filename=%s" % img + (",read-only=on" if ro else "")
        q = "driver=qcow2,node-name=q0,file=f0" + (",read-only=on" if ro else "")
        d = start_daemon(impl, "--blockdev", f, "--blockdev", q,
                         "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                         "--export", "type=nbd,id=e0,node-name=q0,name=x,writable=%s" %
                         ("off" if ro else "on"))
        return d, d.qmp(), "nbd+unix:///x?socket=%s" % sock
    return start


def write(uri, *cmds):
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    out = run(*(argv + [uri]))
    assert "failed" not in out, out


def node_bitmaps(qmp, node="q0"):
    for n in qmp.execute("query-named-block-nodes"):
        if n["node-name"] == node:
            return ({b["name"]: b for b in n.get("dirty-bitmaps", [])},
                    n["image"].get("format-specific", {}).get("data", {}).get("bitmaps"))
    raise KeyError(node)


def sha(qmp, name, node="q0"):
    return qmp.execute("x-debug-block-dirty-bitmap-sha256", node=node, name=name)["sha256"]


def state(impl, daemon, img):
    """Open img in impl and return {name: (query entry, sha256 or None)}."""
    d, qmp, _ = daemon(impl, img)
    got = {}
    for name, b in node_bitmaps(qmp)[0].items():
        got[name] = (b, None if b.get("inconsistent") else sha(qmp, name))
    d.stop()
    return got


def expect_error(qmp, cmd, desc, **args):
    e = qmp.error(cmd, **args)
    assert (e["class"], e["desc"]) == ("GenericError", desc)


WRITES = ("write 1M 100k", "write 10M 1M", "write -z 20M 64k", "write 63M 1M")


# ---- QMP: adding persistent bitmaps ---------------------------------------------------

def test_add_errors(impl, daemon, tmpdir_short):
    img = make_image(os.path.join(tmpdir_short, "a.qcow2"))
    d, qmp, uri = daemon(impl, img)
    qmp.execute("block-dirty-bitmap-add", node="q0", name="b", persistent=True)
    expect_error(qmp, "block-dirty-bitmap-add", "Bitmap already exists: b",
                 node="q0", name="b", persistent=True)
    expect_error(qmp, "block-dirty-bitmap-add",
                 "Can't make bitmap '%s' persistent in 'q0': Name length exceeds maximum "
                 "(1023 characters)" % ("n" * 1024), node="q0", name="n" * 1024, persistent=True)
    qmp.execute("block-dirty-bitmap-add", node="q0", name="huge", persistent=True,
                granularity=1 << 31)
    # the other misuse of bitmaps (busy, inconsistent) is the same for
    # persistent ones: test_dirty_bitmaps.py
    d.stop()

    v2 = make_image(os.path.join(tmpdir_short, "v2.qcow2"), "64M", "-o", "compat=0.10")
    d, qmp, uri = daemon(impl, v2)
    expect_error(qmp, "block-dirty-bitmap-add",
                 "Can't make bitmap 'b' persistent in 'q0': Cannot store dirty bitmaps in "
                 "qcow2 v2 files", node="q0", name="b", persistent=True)
    qmp.execute("block-dirty-bitmap-add", node="q0", name="b")     # not persistent: fine
    d.stop()

    big = make_image(os.path.join(tmpdir_short, "big.qcow2"), "4T")
    d, qmp, uri = daemon(impl, big)
    expect_error(qmp, "block-dirty-bitmap-add",
                 "Can't make bitmap 'b' persistent in 'q0': Too much space will be occupied "
                 "by the bitmap. Use larger granularity",
                 node="q0", name="b", persistent=True, granularity=512)
    d.stop()


def test_add_on_read_only_image_refused(daemon, tmpdir_short):
    """qsd 7.2 accepts a persistent bitmap on a read-only image and loses it
    at close ("No write access"); bexd says so at once."""
    img = make_image(os.path.join(tmpdir_short, "a.qcow2"))
    d, qmp, uri = daemon("bexd", img, ro=True)
    expect_error(qmp, "block-dirty-bitmap-add",
                 "Can't make bitmap 'b' persistent in 'q0': Cannot store dirty bitmaps in a "
                 "read-only image", node="q0", name="b", persistent=True)


# ---- the in-use rule on disk ---------------------------------------------------------

def test_round_trip_and_in_use(impl, daemon, tmpdir_short):
    img = make_image(os.path.join(tmpdir_short, "a.qcow2"))
    d, qmp, uri = daemon(impl, img)
    qmp.execute("block-dirty-bitmap-add", node="q0", name="b0", persistent=True)
    qmp.execute("block-dirty-bitmap-add", node="q0", name="b1", persistent=True,
                granularity=4096, disabled=True)
    qmp.execute("block-dirty-bitmap-add", node="q0", name="t")       # not persistent
    write(uri, *WRITES)
    qmp.execute("block-dirty-bitmap-enable", node="q0", name="b1")
    write(uri, "write 5M 10k")
    want = {n: sha(qmp, n) for n in ("b0", "b1")}
    live, _ = node_bitmaps(qmp)
    counts = {n: live[n]["count"] for n in ("b0", "b1")}
    assert counts == {"b0": 36 * 65536, "b1": 3 * 4096}
    assert live["b0"]["persistent"] and live["b1"]["persistent"] and not live["t"]["persistent"]
    d.stop()

    # as qemu-img sees the closed image: QEMU's order (newest first), flags
    assert info_bitmaps(img) == [
        {"flags": ["auto"], "name": "b1", "granularity": 4096},
        {"flags": ["auto"], "name": "b0", "granularity": 65536}]
    assert check(img)[0] == 0
    on_disk = read_image_bitmaps(img)
    assert set(on_disk) == {"b0", "b1"}

    # open again: bits back, in use on disk while open, the same in both daemons
    d, qmp, uri = daemon(impl, img)
    live, fmt = node_bitmaps(qmp)
    assert set(live) == {"b0", "b1"}
    assert {n: sha(qmp, n) for n in ("b0", "b1")} == want
    assert {n: live[n]["count"] for n in ("b0", "b1")} == counts
    assert live["b0"]["recording"] and live["b1"]["recording"]
    assert fmt == [{"flags": ["in-use", "auto"], "name": "b1", "granularity": 4096},
                   {"flags": ["in-use", "auto"], "name": "b0", "granularity": 65536}]
    assert info_bitmaps(img) == fmt
    assert all(f & IN_USE for f, _, _ in read_image_bitmaps(img).values())
    d.stop()
    assert [b["flags"] for b in info_bitmaps(img)] == [["auto"], ["auto"]]


def test_images_move_between_daemons_and_qemu_img(daemon, tmpdir_short):
    """Bitmaps made by qemu-img load in both daemons with equal bits; bitmaps
    stored by bexd are read and changed by qemu-img and qsd, and back."""
    img = make_image(os.path.join(tmpdir_short, "a.qcow2"))
    qemu_img("bitmap", "--add", img, "a")
    qemu_img("bitmap", "--add", "-g", "16384", img, "g16")
    qemu_img("bitmap", "--add", "--disable", img, "off")
    run("qemu-io", "-f", "qcow2", "-c", "write 2M 3M", "-c", "write 40M 4k", img)
    qemu_img("bitmap", "--enable", img, "off")
    qemu_img("bitmap", "--disable", img, "g16")
    run("qemu-io", "-f", "qcow2", "-c", "write 50M 512", img)
    qemu_img("bitmap", "--add", img, "m")
    qemu_img("bitmap", "--merge", "g16", img, "m")
    a = state("bexd", daemon, img)
    b = state("qsd", daemon, img)
    assert a == b
    assert a["a"][0]["count"] == 48 * 65536 + 2 * 65536
    assert not a["g16"][0]["recording"] and a["off"][0]["recording"]

    # bexd changes them; qemu-img and qsd see the result
    d, qmp, uri = daemon("bexd", img)
    write(uri, "write 30M 64k")                       # a, off, m record
    qmp.execute("block-dirty-bitmap-clear", node="q0", name="off")
    qmp.execute("block-dirty-bitmap-merge", node="q0", target="m", bitmaps=["a"])
    qmp.execute("block-dirty-bitmap-disable", node="q0", name="a")
    qmp.execute("block-dirty-bitmap-enable", node="q0", name="g16")
    qmp.execute("block-dirty-bitmap-remove", node="q0", name="off")
    assert [x["name"] for x in info_bitmaps(img)] == ["a", "g16", "m"]   # removed at once
    qmp.execute("block-dirty-bitmap-add", node="q0", name="new", persistent=True)
    write(uri, "write 0 4k")
    a = {n: sha(qmp, n) for n in ("a", "g16", "m", "new")}
    d.stop()
    assert check(img)[0] == 0
    assert {x["name"]: x["flags"] for x in info_bitmaps(img)} == {
        "a": [], "g16": ["auto"], "m": ["auto"], "new": ["auto"]}
    d, qmp, uri = daemon("qsd", img)
    assert {n: sha(qmp, n) for n in ("a", "g16", "m", "new")} == a
    d.stop()

    # qemu-img works on what bexd stored; bexd reads the result
    qemu_img("bitmap", "--merge", "new", img, "a")
    qemu_img("bitmap", "--remove", img, "g16")
    assert check(img)[0] == 0
    assert state("bexd", daemon, img) == state("qsd", daemon, img)


def test_kill_leaves_inconsistent(impl, daemon, tmpdir_short):
    img = make_image(os.path.join(tmpdir_short, "a.qcow2"))
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", img, "b1")
    d, qmp, uri = daemon(impl, img)
    write(uri, "write 0 1M", "flush")
    d.stop(signal.SIGKILL)
    assert info_bitmaps(img) == [{"flags": ["in-use", "auto"], "name": n, "granularity": 65536}
                                 for n in ("b0", "b1")]
    code, out = check(img)
    assert (code, out.splitlines()[0]) == (0, "No errors were found on the image.")

    d, qmp, uri = daemon(impl, img)
    live, fmt = node_bitmaps(qmp)
    assert live["b0"] == {"name": "b0", "recording": False, "persistent": True, "busy": False,
                          "granularity": 65536, "count": 0, "inconsistent": True}
    msg = "Bitmap 'b0' is inconsistent and cannot be used"
    expect_error(qmp, "block-dirty-bitmap-clear", msg, node="q0", name="b0")
    expect_error(qmp, "block-dirty-bitmap-enable", msg, node="q0", name="b0")
    expect_error(qmp, "block-dirty-bitmap-merge", msg, node="q0", target="b0", bitmaps=["b1"])
    expect_error(qmp, "block-dirty-bitmap-merge", "Bitmap 'b1' is inconsistent and cannot be used",
                 node="q0", target="b1", bitmaps=["b0"])
    write(uri, "write 0 64k", "flush")
    # resizing would lose them: refused as QEMU
    qmp.execute("block-export-del", id="e0")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    expect_error(qmp, "block_resize", msg, node_name="q0", size=128 * MiB)
    qmp.execute("block-dirty-bitmap-remove", node="q0", name="b0")
    assert [b["name"] for b in info_bitmaps(img)] == ["b1"]
    d.stop()
    assert check(img)[0] == 0
    assert info_bitmaps(img) == [{"flags": ["in-use", "auto"], "name": "b1",
                                  "granularity": 65536}]
    d, qmp, uri = daemon(impl, img)
    qmp.execute("block-dirty-bitmap-remove", node="q0", name="b1")
    d.stop()
    assert info_bitmaps(img) is None
    assert check(img)[0] == 0


def test_new_bitmap_survives_kill_as_inconsistent(daemon, tmpdir_short):
    """bexd stores a new persistent bitmap at once (in use): after kill -9
    it comes back inconsistent.  qsd stores it only at close, so it is gone."""
    img = make_image(os.path.join(tmpdir_short, "a.qcow2"))
    d, qmp, uri = daemon("bexd", img)
    qmp.execute("block-dirty-bitmap-add", node="q0", name="b", persistent=True)
    write(uri, "write 0 64k")
    d.stop(signal.SIGKILL)
    assert check(img)[0] == 0
    d, qmp, uri = daemon("bexd", img)
    assert node_bitmaps(qmp)[0]["b"]["inconsistent"]


def test_blockdev_del_stores(impl, start_daemon, tmpdir_short):
    img = make_image(os.path.join(tmpdir_short, "a.qcow2"))
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    qmp = d.qmp()
    qmp.execute("blockdev-add", driver="qcow2", node_name="q0",
                file={"driver": "file", "filename": img})
    qmp.execute("block-dirty-bitmap-add", node="q0", name="b", persistent=True)
    qmp.execute("block-export-add", type="nbd", id="e0", node_name="q0", name="x", writable=True)
    write("nbd+unix:///x?socket=%s" % sock, "write 3M 1M")
    want = sha(qmp, "b")
    qmp.execute("block-export-del", id="e0")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    qmp.execute("blockdev-del", node_name="q0")
    assert info_bitmaps(img) == [{"flags": ["auto"], "name": "b", "granularity": 65536}]
    assert check(img)[0] == 0
    qmp.execute("blockdev-add", driver="qcow2", node_name="q1",
                file={"driver": "file", "filename": img})
    assert sha(qmp, "b", node="q1") == want
    assert info_bitmaps(img)[0]["flags"] == ["in-use", "auto"]


def test_read_only_open(impl, daemon, tmpdir_short):
    img = make_image(os.path.join(tmpdir_short, "a.qcow2"))
    qemu_img("bitmap", "--add", img, "b")
    run("qemu-io", "-f", "qcow2", "-c", "write 0 1M", img)
    d, qmp, uri = daemon(impl, img, ro=True)
    live, fmt = node_bitmaps(qmp)
    assert live["b"]["count"] == 1 * MiB and not live["b"].get("inconsistent")
    assert fmt == [{"flags": ["auto"], "name": "b", "granularity": 65536}]
    expect_error(qmp, "block-dirty-bitmap-clear", "Bitmap 'b' is readonly and cannot be modified",
                 node="q0", name="b")
    d.stop()
    assert info_bitmaps(img)[0]["flags"] == ["auto"]


# ---- bexd: a FLUSH writes the bits ---------------------------------------------------

def test_flush_writes_bits_in_place(daemon, tmpdir_short):
    """While bexd holds the image, a FLUSH writes the bitmap clusters that
    changed (the entries stay in use); the clean close only clears in-use."""
    img = make_image(os.path.join(tmpdir_short, "a.qcow2"))
    d, qmp, uri = daemon("bexd", img)
    qmp.execute("block-dirty-bitmap-add", node="q0", name="b", persistent=True,
                granularity=512)
    write(uri, "write 0 4k", "write 1M 512", "flush")
    flags, gran, bits = read_image_bitmaps(img)["b"]
    assert flags == IN_USE | AUTO and gran == 512
    assert bits[:1] == b"\xff" and bits[2048 // 8] == 1
    assert sum(bin(x).count("1") for x in bits) == 9
    size_before = os.path.getsize(img)
    write(uri, "write 4k 512", "flush")            # the same bitmap cluster, in place
    assert os.path.getsize(img) == size_before
    assert sum(bin(x).count("1") for x in read_image_bitmaps(img)["b"][2]) == 10
    qmp.execute("block-dirty-bitmap-clear", node="q0", name="b")
    write(uri, "flush")
    assert not any(read_image_bitmaps(img)["b"][2])
    write(uri, "write 8M 512")
    d.stop()
    flags, gran, bits = read_image_bitmaps(img)["b"]
    assert flags == AUTO and sum(bin(x).count("1") for x in bits) == 1
    assert check(img)[0] == 0


def test_many_cycles_keep_refcounts_right(daemon, tmpdir_short):
    img = make_image(os.path.join(tmpdir_short, "a.qcow2"), "64M", "-o", "cluster_size=4096")
    for cycle in range(4):
        d, qmp, uri = daemon("bexd", img)
        qmp.execute("block-dirty-bitmap-add", node="q0", name="c%d" % cycle, persistent=True,
                    granularity=512)
        write(uri, "write %dM 3M" % (cycle * 7), "flush", "write 60M 4k", "flush")
        if cycle >= 2:
            qmp.execute("block-dirty-bitmap-remove", node="q0", name="c%d" % (cycle - 2))
        qmp.execute("block-dirty-bitmap-clear", node="q0", name="c%d" % cycle)
        write(uri, "write 1M 1M", "flush")
        d.stop()
        code, out = check(img)
        assert (code, out.splitlines()[0]) == (0, "No errors were found on the image."), out
    assert [b["name"] for b in info_bitmaps(img)] == ["c2", "c3"]
    assert state("bexd", daemon, img) == state("qsd", daemon, img)


def test_terabyte_image_map_is_exact(daemon):
    """A 1 TiB qcow2 (sparse, on /var/tmp) with a persistent bitmap:
    nbdinfo --map over it gives exactly the dirty areas after the bitmap
    went to disk and came back.  (The walk's speed: test-pbitmap's
    test_terabyte_walk; nbdinfo's start-up made a wall-clock bound here
    say nothing about bexd.)"""
    d0 = "/var/tmp/bexd-qbitmaps-%d" % os.getpid()
    os.makedirs(d0, exist_ok=True)
    img = make_image(os.path.join(d0, "tb.qcow2"), "1T")
    try:
        d, qmp, uri = daemon("bexd", img)
        qmp.execute("block-dirty-bitmap-add", node="q0", name="b", persistent=True)
        offsets = [(i * 7919 * MiB) % (1 << 40) for i in range(1, 100)]
        write(uri, *["write %d 512" % o for o in offsets])
        d.stop()
        d, qmp, uri = daemon("bexd", img)
        qmp.execute("block-export-del", id="e0")
        qmp.wait_event("BLOCK_EXPORT_DELETED")
        qmp.execute("block-export-add", type="nbd", id="e1", node_name="q0", name="x",
                    bitmaps=["b"], writable=True)
        out = run("nbdinfo", "--map=qemu:dirty-bitmap:b", uri)
        dirty = sorted(int(l.split()[0]) for l in out.splitlines() if l.split()[2] == "1")
        assert dirty == sorted(o - o % 65536 for o in offsets)
        d.stop()
        assert check(img)[0] == 0
    finally:
        os.unlink(img)
        os.rmdir(d0)


@pytest.mark.parametrize("cluster,gran", [("512", 4096), ("16k", 16384), ("2M", 65536)])
def test_default_granularity_follows_cluster_size(impl, daemon, tmpdir_short, cluster, gran):
    img = make_image(os.path.join(tmpdir_short, "a.qcow2"), "64M", "-o",
                     "cluster_size=" + cluster)
    d, qmp, uri = daemon(impl, img)
    qmp.execute("block-dirty-bitmap-add", node="q0", name="b", persistent=True)
    assert node_bitmaps(qmp)[0]["b"]["granularity"] == gran
    write(uri, "write 0 100k")
    d.stop()
    assert info_bitmaps(img) == [{"flags": ["auto"], "name": "b", "granularity": gran}]
    assert check(img)[0] == 0


def patch_first_entry(img, offset_in_entry, fmt, value):
    """Change a field of the first bitmap directory entry."""
    with open(img, "r+b") as f:
        data = f.read(65536)
        hlen, = struct.unpack_from(">I", data, 100)
        at = hlen
        while True:
            typ, ln = struct.unpack_from(">II", data, at)
            if typ == 0x23852875:
                break
            at += 8 + (ln + 7) // 8 * 8
        doff, = struct.unpack_from(">Q", data, at + 8 + 16)
        f.seek(doff + offset_in_entry)
        f.write(struct.pack(fmt, value))


@pytest.mark.parametrize("field,fmt,value", [
    (16, ">B", 2),              # type: not a dirty tracking bitmap
    (17, ">B", 40),             # granularity bits
    (12, ">I", 0x10),           # reserved flag
    (8, ">I", 0),               # table size
    (18, ">H", 2000),           # name size past the directory
])
def test_damaged_directory_refused_as_qemu(start_daemon, tmpdir_short, field, fmt, value):
    """An image whose bitmap directory breaks the format's rules does not
    open, with qsd's message, in bexd too."""
    img = make_image(os.path.join(tmpdir_short, "a.qcow2"))
    qemu_img("bitmap", "--add", img, "b")
    patch_first_entry(img, field, fmt, value)
    errs = {}
    for impl in ("bexd", "qsd"):
        d = start_daemon(impl)
        qmp = d.qmp()
        e = qmp.error("blockdev-add", driver="qcow2", node_name="q0", read_only=True,
                      file={"driver": "file", "filename": img})
        errs[impl] = (e["class"], e["desc"])
        d.stop()
    assert errs["bexd"] == errs["qsd"]


def test_resize_carries_bitmaps(impl, start_daemon, daemon, tmpdir_short):
    """Growing a node with persistent bitmaps: they follow (new bytes clean)
    and go to disk at the new size."""
    img = make_image(os.path.join(tmpdir_short, "a.qcow2"))
    qemu_img("bitmap", "--add", img, "b")
    qemu_img("bitmap", "--add", "-g", "512", img, "fine")
    run("qemu-io", "-f", "qcow2", "-c", "write 63M 1M", "-c", "write 0 4k", img)
    d = start_daemon(impl)
    qmp = d.qmp()
    qmp.execute("blockdev-add", driver="qcow2", node_name="q0",
                file={"driver": "file", "filename": img})
    qmp.execute("block_resize", node_name="q0", size=200 * MiB)
    want = {n: sha(qmp, n) for n in ("b", "fine")}
    qmp.execute("blockdev-del", node_name="q0")
    assert check(img)[0] == 0
    assert [b["flags"] for b in info_bitmaps(img)] == [["auto"], ["auto"]]
    qmp.execute("blockdev-add", driver="qcow2", node_name="q1",
                file={"driver": "file", "filename": img})
    assert {n: sha(qmp, n, node="q1") for n in ("b", "fine")} == want
    d.stop()
    other = state("qsd" if impl == "bexd" else "bexd", daemon, img)
    assert {n: other[n][1] for n in ("b", "fine")} == want
    assert other["fine"][0]["count"] == 1 * MiB + 4096


def test_reopen_read_only_and_back(impl, start_daemon, tmpdir_short):
    """blockdev-reopen read-only stores the bitmaps (in-use clear) and makes
    them readonly; read-write again marks them in use and lets them change."""
    img = make_image(os.path.join(tmpdir_short, "a.qcow2"))
    qemu_img("bitmap", "--add", img, "b")
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    qmp = d.qmp()
    f = {"driver": "file", "filename": img}
    qmp.execute("blockdev-add", driver="qcow2", node_name="q0", file=f)
    uri = "nbd+unix:///x?socket=%s" % sock
    qmp.execute("block-export-add", type="nbd", id="e0", node_name="q0", name="x", writable=True)
    write(uri, "write 0 1M")
    qmp.execute("block-export-del", id="e0")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    qmp.execute("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "q0", "file": f,
                                             "read-only": True}])
    assert info_bitmaps(img) == [{"flags": ["auto"], "name": "b", "granularity": 65536}]
    assert check(img)[0] == 0
    expect_error(qmp, "block-dirty-bitmap-clear", "Bitmap 'b' is readonly and cannot be modified",
                 node="q0", name="b")
    qmp.execute("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "q0", "file": f}])
    assert info_bitmaps(img) == [{"flags": ["in-use", "auto"], "name": "b", "granularity": 65536}]
    qmp.execute("block-dirty-bitmap-clear", node="q0", name="b")
    qmp.execute("block-export-add", type="nbd", id="e1", node_name="q0", name="x", writable=True)
    write(uri, "write 2M 64k")
    assert node_bitmaps(qmp)[0]["b"]["count"] == 65536
    want = sha(qmp, "b")
    d.stop()
    assert info_bitmaps(img) == [{"flags": ["auto"], "name": "b", "granularity": 65536}]
    assert check(img)[0] == 0
    d = start_daemon(impl)
    qmp = d.qmp()
    qmp.execute("blockdev-add", driver="qcow2", node_name="q0",
                file={"driver": "file", "filename": img})
    assert sha(qmp, "b") == want
