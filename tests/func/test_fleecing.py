"""Fleecing nodes: copy-before-write and snapshot-access (QEMU 7.2).

A copy-before-write filter over a disk copies old data to a target before
a write through the filter changes it; a snapshot-access node over the
filter reads the disk as it was when the filter was added.  Against bexd
and qemu-storage-daemon (impl): the frozen view's bytes, the live view's
bytes, errors, and a concurrent stress (writers through the filter while
readers copy the snapshot) whose copy must equal the image before the
writes.
"""
import os
import random
import shutil
import subprocess

import pytest
from conftest import tool_text

MiB = 1 << 20
SIZE = 32 * MiB


@pytest.fixture
def fleece(start_daemon, tmpdir_short):
    """fleece(impl, cbw_opts={}) -> (QMP, uri of the filter export, uri of the
    snapshot export, path of a copy of the image before any write)."""
    def start(impl, cbw_opts=None, bitmap_writes=None, writable_snapshot=False):
        img = os.path.join(tmpdir_short, "disk-%s.img" % impl)
        tmp = os.path.join(tmpdir_short, "tmp-%s.img" % impl)
        orig = os.path.join(tmpdir_short, "orig-%s.img" % impl)
        rnd = random.Random(7)
        with open(img, "wb") as f:
            f.truncate(SIZE)
            for i in range(0, SIZE, 2 * MiB):      # data in every other MiB
                f.seek(i)
                f.write(rnd.randbytes(MiB))
        with open(tmp, "wb") as f:
            f.truncate(SIZE)
        shutil.copyfile(img, orig)
        sock = os.path.join(tmpdir_short, "nbd-%s.sock" % impl)
        d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s" % img,
                         "--blockdev", "driver=raw,node-name=disk,file=f0",
                         "--blockdev", "driver=file,node-name=tmp,filename=%s" % tmp,
                         "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
        qmp = d.qmp()
        qmp.execute("blockdev-add", driver="copy-before-write", node_name="c0", file="disk",
                    target="tmp", **(cbw_opts or {}))
        qmp.execute("blockdev-add", driver="snapshot-access", node_name="s0", file="c0",
                    discard="unmap")
        qmp.execute("block-export-add", type="nbd", id="w", node_name="c0", name="w",
                    writable=True)
        qmp.execute("block-export-add", type="nbd", id="s", node_name="s0", name="s",
                    writable=writable_snapshot)
        u = "nbd+unix:///%s?socket=" + sock
        return qmp, u % "w", u % "s", orig
    return start


def qemu_io(uri, *cmds, ro=False, check=True):
    argv = ["qemu-io"] + (["-r"] if ro else []) + ["-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv + [uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=120)
    out = tool_text(r.stdout)
    if check:
        assert r.returncode == 0 and "failed" not in out and "error" not in out.lower(), out
    return out


def read_all(uri, tmpdir, name):
    path = os.path.join(tmpdir, name)
    subprocess.run(["nbdcopy", uri, path], check=True, timeout=120)
    with open(path, "rb") as f:
        return f.read()


def test_frozen_view(impl, fleece, tmpdir_short):
    qmp, w, s, orig = fleece(impl)
    qemu_io(w, "write -P 0x22 1M 4k", "write -z 2M 64k", "discard 4M 64k",
            "write -P 0x33 31M 1k", "write -P 0x44 100000 300000")
    with open(orig, "rb") as f:
        before = f.read()
    snap = read_all(s, tmpdir_short, "snap")
    if impl == "qsd":
        # qemu-storage-daemon 7.2 loses the old data of a cluster that a
        # write-zeroes through the filter overwrote: its snapshot reads zeros
        # there.  bexd keeps it.
        assert snap[2 * MiB:2 * MiB + 65536] == bytes(65536) != before[2 * MiB:2 * MiB + 65536]
        before = before[:2 * MiB] + bytes(65536) + before[2 * MiB + 65536:]
    assert snap == before
    live = read_all(w, tmpdir_short, "live")
    assert live[MiB:MiB + 4096] == b"\x22" * 4096
    assert live[2 * MiB:2 * MiB + 65536] == bytes(65536)
    assert live[31 * MiB:31 * MiB + 1024] == b"\x33" * 1024
    assert live[100000:400000] == b"\x44" * 300000
    assert live[:100000] == before[:100000]


def test_snapshot_is_read_only_and_discard_drops(impl, fleece):
    qmp, w, s, orig = fleece(impl, writable_snapshot=True)
    out = qemu_io(s, "write 0 4k", check=False)
    assert "Operation not supported" in out
    qemu_io(s, "discard 1M 64k")
    out = qemu_io(s, "read 1M 4k", check=False)     # no longer readable: EACCES
    assert "read failed: Invalid argument" in out
    qemu_io(s, "read 1088k 4k")                      # the next cluster still is


def test_bitmap_limits_the_snapshot(impl, start_daemon, image, tmpdir_short):
    """With `bitmap`, only the clusters dirty in it are copied and readable."""
    img = image(SIZE, name="d-%s.img" % impl)
    tmp = image(SIZE, name="t-%s.img" % impl)
    sock = os.path.join(tmpdir_short, "nbd-%s.sock" % impl)
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=disk,filename=%s" % img,
                     "--blockdev", "driver=file,node-name=tmp,filename=%s" % tmp,
                     "--nbd-server", "addr.type=unix,addr.path=%s" % sock)
    qmp = d.qmp()
    u = "nbd+unix:///%s?socket=" + sock
    qmp.execute("block-dirty-bitmap-add", node="disk", name="b", granularity=4096)
    qmp.execute("block-export-add", type="nbd", id="e", node_name="disk", name="e",
                writable=True)
    qemu_io(u % "e", "write -P 0x55 1M 4k")
    qmp.execute("block-export-del", id="e")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    qmp.execute("blockdev-add", driver="copy-before-write", node_name="c0", file="disk",
                target="tmp", bitmap={"node": "disk", "name": "b"})
    qmp.execute("blockdev-add", driver="snapshot-access", node_name="s0", file="c0")
    qmp.execute("block-export-add", type="nbd", id="w", node_name="c0", name="w",
                writable=True)
    qmp.execute("block-export-add", type="nbd", id="s", node_name="s0", name="s")
    qemu_io(u % "w", "write -P 0x66 1M 64k", "write -P 0x66 5M 4k")
    # the dirty cluster (64 KiB around the 4 KiB granule) was copied first
    qemu_io(u % "s", "read -P 0x55 1M 4k", "read -P 0 1028k 60k", ro=True)
    out = qemu_io(u % "s", "read 5M 4k", ro=True, check=False)
    assert "read failed: Invalid argument" in out


def test_errors(impl, start_daemon, image):
    img = image(SIZE, name="d-%s.img" % impl)
    tmp = image(SIZE, name="t-%s.img" % impl)
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=disk,filename=%s" % img,
                     "--blockdev", "driver=file,node-name=tmp,filename=%s" % tmp,
                     "--blockdev", "driver=null-co,node-name=other,size=%d" % SIZE)
    qmp = d.qmp()
    e = qmp.error("blockdev-add", driver="copy-before-write", node_name="c0", file="disk",
                  target="tmp", bitmap={"node": "disk", "name": "zz"})
    assert e["desc"] == "Dirty bitmap 'zz' not found"
    e = qmp.error("blockdev-add", driver="copy-before-write", node_name="c0", file="disk",
                  target="tmp", bitmap={"node": "zz", "name": "zz"})
    assert e["desc"] == "Node 'zz' not found"
    e = qmp.error("blockdev-add", driver="copy-before-write", node_name="c0", file="disk",
                  target="nope")
    assert e["desc"] == "Cannot find device='nope' nor node-name='nope'"
    qmp.execute("blockdev-add", driver="copy-before-write", node_name="c0", file="disk",
                target="tmp", on_cbw_error="break-snapshot", cbw_timeout=5)
    assert qmp.error("blockdev-del", node_name="tmp")["desc"] == "Block device tmp is in use"
    # once the filter has a user, nobody else may write the disk behind it
    qmp.execute("block-export-add", type="vhost-user-blk", id="v", node_name="c0",
                writable=True, addr={"type": "unix", "path": img + ".vub"})
    e = qmp.error("block-export-add", type="vhost-user-blk", id="v2", node_name="disk",
                  writable=True, addr={"type": "unix", "path": img + ".vub2"})
    assert e["desc"] == (
        "Permission conflict on node 'disk': permissions 'write' are both required by an "
        "unnamed block device (uses node 'disk' as 'root' child) and unshared by node 'c0' "
        "(uses node 'disk' as 'file' child).")
    qmp.execute("block-export-del", id="v")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    qmp.execute("blockdev-del", node_name="c0")
    qmp.execute("blockdev-del", node_name="tmp")


def test_concurrent_writes_and_snapshot_reads(impl, fleece, tmpdir_short):
    """fio writes through the filter while the snapshot is copied out three
    times at once: every copy equals the image before the writes."""
    qmp, w, s, orig = fleece(impl)
    fio = subprocess.Popen(
        ["fio", "--name=w", "--ioengine=nbd", "--uri=" + w, "--rw=randwrite", "--bs=4k",
         "--iodepth=16", "--size=%d" % SIZE, "--io_size=%d" % (12 * MiB),
         "--randseed=5", "--output=/dev/null"])
    readers = [subprocess.Popen(["nbdcopy", "--connections=2", s,
                                 os.path.join(tmpdir_short, "snap%d" % i)])
               for i in range(3)]
    for r in readers:
        assert r.wait(timeout=300) == 0
    assert fio.wait(timeout=300) == 0
    with open(orig, "rb") as f:
        before = f.read()
    for i in range(3):
        with open(os.path.join(tmpdir_short, "snap%d" % i), "rb") as f:
            assert f.read() == before, "snapshot copy %d differs" % i
    # and once more after the writes are over
    assert read_all(s, tmpdir_short, "after") == before
