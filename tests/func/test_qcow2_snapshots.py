"""Internal snapshots made by `qemu-img snapshot -c` stay intact while the
daemon writes the active layer.

Clusters shared with a snapshot have a refcount above 1 and no COPIED flag,
so a write to them must copy (allocate a new cluster, keep the old one for
the snapshot), write-zeroes and trims must drop only the active layer's
reference, and L2 tables shared with a snapshot must be copied before they
change.  Afterwards `qemu-img snapshot -l` lists the snapshots, `qemu-img
check` finds no error and no leak, the active layer holds what was written,
and `qemu-img snapshot -a` brings back each snapshot's data unchanged.  The
same scenario runs against qemu-storage-daemon.
"""
import json
import os
import shutil
import subprocess

import nbd
import pytest

from qcow2img import (MiB, assert_clean, first_difference, nbd_random_ops, qemu_img,  # noqa: F401
                      qemu_io, shm, to_raw)
from test_qcow2 import serve
from conftest import tool_text


def snapshot_names(img):
    out = json.loads(qemu_img("info", "--output=json", "-U", img))
    return [s["name"] for s in out.get("snapshots", [])]


def check_snapshot_data(img, d, snaps):
    """Apply each snapshot in a copy of the image; its data is what it was."""
    for name, want in snaps.items():
        cp = os.path.join(d, "apply.qcow2")
        shutil.copyfile(img, cp)
        qemu_img("snapshot", "-a", name, cp)
        got = to_raw(cp, os.path.join(d, "apply.raw"))
        assert first_difference(got, want) is None, name
        assert_clean(cp)


# image layouts whose shared clusters behave differently (qemu-img create -o)
LAYOUTS = pytest.mark.parametrize(
    "opts", [[], ["-o", "cluster_size=4k"], ["-o", "compat=0.10"], ["-o", "extended_l2=on"],
             ["-o", "refcount_bits=4"], ["-o", "lazy_refcounts=on"]],
    ids=["plain", "c4k", "v2", "extl2", "rc4", "lazy"])


@LAYOUTS
def test_writes_keep_snapshots(impl, start_daemon, shm, opts):
    size = 8 * MiB
    img = os.path.join(shm, "s.qcow2")
    qemu_img("create", "-f", "qcow2", *opts, img, str(size))
    qemu_io(img, "write -P 0x11 0 3M", "write -P 0x22 5M 1M", "write -z 6M 512k")
    snaps = {}
    qemu_img("snapshot", "-c", "first", img)
    snaps["first"] = to_raw(img, os.path.join(shm, "first.raw"))
    qemu_io(img, "write -P 0x33 1M 1M", "write -P 0x44 7M 64k")
    qemu_img("snapshot", "-c", "second", img)
    snaps["second"] = to_raw(img, os.path.join(shm, "second.raw"))

    mirror = os.path.join(shm, "mirror.raw")
    to_raw(img, mirror)
    d, uri = serve(start_daemon, impl, img, shm, writable=True, node_extra=",discard=unmap")
    nbd_random_ops(uri, mirror, seed=7, nops=80)
    d.stop()

    assert snapshot_names(img) == ["first", "second"]
    listing = qemu_img("snapshot", "-l", img)
    assert "first" in listing and "second" in listing
    assert_clean(img)
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, mirror],
                       stdout=subprocess.PIPE)
    assert r.returncode == 0, tool_text(r.stdout)
    check_snapshot_data(img, shm, snaps)


def test_overwrite_every_shared_cluster(impl, start_daemon, shm):
    """Every cluster of the image is shared with a snapshot; each is
    overwritten in part, so every write copies a cluster and every L2 table
    is copied once."""
    size = 4 * MiB
    img = os.path.join(shm, "s.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16k", img, str(size))
    qemu_io(img, "write -P 0x5a 0 %d" % size)
    qemu_img("snapshot", "-c", "full", img)
    want = to_raw(img, os.path.join(shm, "full.raw"))
    d, uri = serve(start_daemon, impl, img, shm, writable=True)
    h = nbd.NBD()
    h.connect_uri(uri)
    for off in range(0, size, 16384):
        h.pwrite(b"\xa5" * 512, off + 4096)
    h.flush()
    for off in range(0, size, 16384):
        assert h.pread(16384, off) == b"\x5a" * 4096 + b"\xa5" * 512 + b"\x5a" * (16384 - 4608)
    h.shutdown()
    d.stop()
    assert snapshot_names(img) == ["full"]
    assert_clean(img)
    # the snapshot keeps its 256 data clusters, the active layer has 256 copies
    end = json.loads(qemu_img("check", "--output=json", img))["image-end-offset"]
    assert end >= 512 * 16384, end
    check_snapshot_data(img, shm, {"full": want})


def test_snapshot_made_after_daemon_writes(impl, start_daemon, shm):
    """Write, stop, snapshot, write again: the snapshot holds the first
    session's data, the image the second's."""
    size = 4 * MiB
    img = os.path.join(shm, "s.qcow2")
    qemu_img("create", "-f", "qcow2", img, str(size))
    mirror = os.path.join(shm, "mirror.raw")
    to_raw(img, mirror)
    d, uri = serve(start_daemon, impl, img, shm, writable=True)
    nbd_random_ops(uri, mirror, seed=1, nops=40)
    d.stop()
    qemu_img("snapshot", "-c", "mid", img)
    with open(mirror, "rb") as f:
        mid = f.read()
    d, uri = serve(start_daemon, impl, img, shm, writable=True)
    nbd_random_ops(uri, mirror, seed=2, nops=40)
    d.stop()
    assert_clean(img)
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, mirror],
                       stdout=subprocess.PIPE)
    assert r.returncode == 0, tool_text(r.stdout)
    check_snapshot_data(img, shm, {"mid": mid})
