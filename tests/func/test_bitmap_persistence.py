"""Persistent dirty bitmaps of raw images, kept by bexd in a sidecar file
next to the image (IMAGE.bitmaps, docs/bitmaps.md).  qemu-storage-daemon
7.2 cannot store bitmaps of raw images at all (the test of that error is
in test_dirty_bitmaps.py), so these run against bexd only.

The sidecar is parsed here independently of bexd's code, to check the
in-use rule on disk: a bitmap held by a writer is stored IN_USE, a clean
shutdown or blockdev-del stores its bits, and a bitmap found IN_USE at
start-up (kill -9) comes back inconsistent, usable only for removal.
"""
import hashlib
import os
import signal
import struct
import subprocess

import pytest

MiB = 1 << 20
IN_USE, ENABLED, LAYER_RAW = 1, 2, 4


def read_sidecar(path):
    """name -> (flags, granularity, size, sha256 of the flat bits or None)."""
    with open(path, "rb") as f:
        data = f.read()
    magic, version, n, doff, dsize = struct.unpack_from("<8sIIQQ", data, 0)
    assert magic == b"BEXDBMAP" and version == 1
    dir_ = data[doff:doff + dsize]
    assert hashlib.sha256(dir_).digest() == data[32:64]
    out, at = {}, 0
    for _ in range(n):
        off, size_, size, gran, flags, nlen = struct.unpack_from("<QQQIIH", dir_, at)
        at += 40
        name = dir_[at:at + nlen].decode()
        at += (nlen + 7) // 8 * 8
        bits = None
        if not flags & IN_USE:
            nbits = (size + gran - 1) // gran
            flat = max(1, (nbits + 63) // 64) * 8
            raw = data[off:off + size_] if off else b""
            raw = raw + b"\0" * (flat - len(raw))
            bits = hashlib.sha256(raw).hexdigest()
        out[name] = (flags, gran, size, bits)
    return out


@pytest.fixture
def bexd(start_daemon, image, tmpdir_short):
    """bexd(img=None, ro=False, raw_opts='') -> (Daemon, QMP, nbd uri, image path)."""
    sock = os.path.join(tmpdir_short, "nbd.sock")

    def start(img=None, ro=False, raw_opts=""):
        img = img or image(64 * MiB)
        f = "driver=file,node-name=f0,filename=%s" % img + (",read-only=on" if ro else "")
        r = "driver=raw,node-name=r0,file=f0" + ("," + raw_opts if raw_opts else "")
        d = start_daemon("bexd", "--blockdev", f, "--blockdev", r,
                         "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                         "--export", "type=nbd,id=e0,node-name=r0,name=x,writable=%s" %
                         ("off" if ro else "on"))
        return d, d.qmp(), "nbd+unix:///x?socket=%s" % sock, img
    return start


def write(uri, *cmds):
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run(argv + [uri], check=True, stdout=subprocess.DEVNULL, timeout=60)


def bitmaps(qmp, node):
    for n in qmp.execute("query-named-block-nodes"):
        if n["node-name"] == node:
            return {b["name"]: b for b in n.get("dirty-bitmaps", [])}
    raise KeyError(node)


def sha(qmp, node, name):
    return qmp.execute("x-debug-block-dirty-bitmap-sha256", node=node, name=name)["sha256"]


def test_survives_restart(bexd):
    d, qmp, uri, img = bexd()
    qmp.execute("block-dirty-bitmap-add", node="r0", name="p", persistent=True)
    qmp.execute("block-dirty-bitmap-add", node="f0", name="pf", persistent=True,
                granularity=4096, disabled=True)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="t")          # not persistent
    write(uri, "write 1M 100k", "write 60M 1")
    qmp.execute("block-dirty-bitmap-merge", node="f0", target="pf",
                bitmaps=[{"node": "r0", "name": "p"}])
    # while open for writing, both are on disk, in use, without bits
    sc = read_sidecar(img + ".bitmaps")
    assert sc == {"p": (IN_USE | ENABLED | LAYER_RAW, 65536, 64 * MiB, None),
                  "pf": (IN_USE, 4096, 64 * MiB, None)}
    before = {n: (b["count"], b["recording"]) for n, b in bitmaps(qmp, "r0").items()}
    hp, hpf = sha(qmp, "r0", "p"), sha(qmp, "f0", "pf")
    d.stop()
    # a clean shutdown stores the bits, not in use
    sc = read_sidecar(img + ".bitmaps")
    assert sc["p"] == (ENABLED | LAYER_RAW, 65536, 64 * MiB, hp)
    assert sc["pf"] == (0, 4096, 64 * MiB, hpf)
    d, qmp, uri, img = bexd(img)
    got = bitmaps(qmp, "r0")
    assert sorted(got) == ["p"]
    assert (got["p"]["count"], got["p"]["recording"]) == before["p"]
    assert got["p"]["persistent"] and "inconsistent" not in got["p"]
    assert sha(qmp, "r0", "p") == hp and sha(qmp, "f0", "pf") == hpf
    assert bitmaps(qmp, "f0")["pf"]["recording"] is False
    # in use again now that a writer holds them, and they record
    assert read_sidecar(img + ".bitmaps")["p"][0] & IN_USE
    write(uri, "write 30M 1")
    assert bitmaps(qmp, "r0")["p"]["count"] == before["p"][0] + 65536


def test_kill9_leaves_inconsistent(bexd):
    d, qmp, uri, img = bexd()
    qmp.execute("block-dirty-bitmap-add", node="r0", name="p", persistent=True)
    write(uri, "write 0 1")
    d.stop(signal.SIGKILL)
    d, qmp, uri, img = bexd(img)
    b = bitmaps(qmp, "r0")["p"]
    assert b == {"name": "p", "recording": False, "persistent": True, "busy": False,
                 "granularity": 65536, "count": 0, "inconsistent": True}
    msg = "Bitmap 'p' is inconsistent and cannot be used"
    for cmd in ("block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
                "block-dirty-bitmap-disable"):
        e = qmp.error(cmd, node="r0", name="p")
        assert e["desc"] == msg
    qmp.execute("block-dirty-bitmap-add", node="r0", name="q")
    assert qmp.error("block-dirty-bitmap-merge", node="r0", target="q",
                     bitmaps=["p"])["desc"] == msg
    assert qmp.error("block-export-add", type="nbd", id="e1", node_name="r0", name="y",
                     bitmaps=["p"], writable=True)["desc"] == msg
    # still inconsistent after another restart, until removed
    d.stop()
    assert read_sidecar(img + ".bitmaps")["p"][0] & IN_USE
    d, qmp, uri, img = bexd(img)
    assert bitmaps(qmp, "r0")["p"]["inconsistent"]
    qmp.execute("block-dirty-bitmap-remove", node="r0", name="p")
    assert not os.path.exists(img + ".bitmaps")


def test_blockdev_del_stores_and_add_loads(start_daemon, image):
    img = image(16 * MiB)
    d = start_daemon("bexd")
    qmp = d.qmp()
    qmp.execute("blockdev-add", driver="raw", node_name="r0",
                file={"driver": "file", "filename": img})
    qmp.execute("block-dirty-bitmap-add", node="r0", name="p", persistent=True,
                granularity=512)
    qmp.execute("block-dirty-bitmap-add", node="r0", name="gone")
    h = sha(qmp, "r0", "p")
    qmp.execute("blockdev-del", node_name="r0")
    assert read_sidecar(img + ".bitmaps") == {"p": (ENABLED | LAYER_RAW, 512, 16 * MiB, h)}
    qmp.execute("blockdev-add", driver="raw", node_name="r1",
                file={"driver": "file", "filename": img})
    assert sorted(bitmaps(qmp, "r1")) == ["p"]
    assert bitmaps(qmp, "r1")["p"]["granularity"] == 512
    # a file node alone keeps the raw layer's bitmaps waiting, untouched
    qmp.execute("blockdev-del", node_name="r1")
    qmp.execute("blockdev-add", driver="file", node_name="f9", filename=img)
    assert bitmaps(qmp, "f9") == {}
    qmp.execute("blockdev-del", node_name="f9")
    assert read_sidecar(img + ".bitmaps")["p"][0] == ENABLED | LAYER_RAW


def test_read_only_image(bexd):
    d, qmp, uri, img = bexd()
    qmp.execute("block-dirty-bitmap-add", node="r0", name="p", persistent=True)
    write(uri, "write 0 1")
    d.stop()
    stored = read_sidecar(img + ".bitmaps")
    d, qmp, uri, img = bexd(img, ro=True)
    assert bitmaps(qmp, "r0")["p"]["count"] == 65536
    e = qmp.error("block-dirty-bitmap-clear", node="r0", name="p")
    assert e["desc"] == "Bitmap 'p' is readonly and cannot be modified"
    e = qmp.error("block-dirty-bitmap-remove", node="r0", name="p")
    assert e["desc"] == "Bitmap 'p' is readonly and cannot be modified"
    e = qmp.error("block-dirty-bitmap-add", node="r0", name="q", persistent=True)
    assert e["desc"] == "Can't store persistent bitmaps to r0: Read-only file system"
    d.stop()
    assert read_sidecar(img + ".bitmaps") == stored       # never marked in use


def test_not_supported(bexd, start_daemon):
    d, qmp, uri, img = bexd(raw_opts="offset=4096")
    e = qmp.error("block-dirty-bitmap-add", node="r0", name="p", persistent=True)
    assert e["desc"] == "Can't store persistent bitmaps to r0: Operation not supported"
    qmp.execute("blockdev-add", driver="null-co", node_name="n0")
    e = qmp.error("block-dirty-bitmap-add", node="n0", name="p", persistent=True)
    assert e["desc"] == "Can't store persistent bitmaps to n0: Operation not supported"


@pytest.mark.parametrize("damage,msg", [
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:20], "cannot read its header"),
    (lambda b: b[:64] + bytes([b[64] ^ 1]) + b[65:], "directory checksum mismatch"),
    (lambda b: b[:8] + struct.pack("<I", 9) + b[12:], "unknown version"),
])
def test_damaged_sidecar_is_an_error(bexd, start_daemon, image, damage, msg):
    d, qmp, uri, img = bexd()
    qmp.execute("block-dirty-bitmap-add", node="r0", name="p", persistent=True)
    d.stop()
    with open(img + ".bitmaps", "rb") as f:
        data = f.read()
    with open(img + ".bitmaps", "wb") as f:
        f.write(damage(data))
    d = start_daemon("bexd")
    qmp = d.qmp()
    e = qmp.error("blockdev-add", driver="file", node_name="f0", filename=img)
    assert e["desc"] == "Invalid bitmap sidecar '%s.bitmaps': %s" % (img, msg)
    assert qmp.execute("query-named-block-nodes") == []


def test_resized_image_loads_inconsistent(bexd):
    d, qmp, uri, img = bexd()
    qmp.execute("block-dirty-bitmap-add", node="r0", name="p", persistent=True)
    d.stop()
    os.truncate(img, 80 * MiB)
    d, qmp, uri, img = bexd(img)
    assert bitmaps(qmp, "r0")["p"]["inconsistent"]


def test_transaction_abort_forgets_persistent_add(bexd):
    d, qmp, uri, img = bexd()
    qmp.execute("block-dirty-bitmap-add", node="r0", name="keep", persistent=True)
    e = qmp.error("transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "r0", "name": "p",
                                                    "persistent": True}},
        {"type": "abort", "data": {}}])
    assert e["desc"] == "Transaction aborted using Abort action"
    assert sorted(read_sidecar(img + ".bitmaps")) == ["keep"]
    qmp.execute("transaction", actions=[
        {"type": "block-dirty-bitmap-remove", "data": {"node": "r0", "name": "keep"}}])
    assert not os.path.exists(img + ".bitmaps")
