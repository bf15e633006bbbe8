"""block_resize on qcow2 nodes, shrinking and growing, beside
qemu-storage-daemon 7.2.

QEMU 7.2 shrinks a qcow2 image (v2 and v3; with internal snapshots only
v3): the clusters past the new end are discarded, the L2 tables past the
new L1 size freed, the file cut after its last used cluster.  For the same
image and the same block_resize, bexd must leave an image that `qemu-img
check` finds clean, that holds the same data, maps the same (`qemu-img
map`), is as long as qsd's file, and whose internal snapshots still hold
their data.  Errors are qsd's words.  A client connecting after the resize
sees the new size.
"""
import json
import os
import shutil

import nbd
import pytest

from conftest import QSD
from qcow2img import MiB, assert_clean, first_difference, qemu_img, qemu_io, shm, to_raw  # noqa: F401


def resize(start_daemon, impl, img, *sizes, extra=""):
    """block_resize the qcow2 node to each size in turn; the answers."""
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f,filename=%s%s" % (img, extra),
                     "--blockdev", "driver=qcow2,node-name=q,file=f")
    q = d.qmp()
    out = []
    for size in sizes:
        r = q.request("block_resize", {"node-name": "q", "size": size}).get("error")
        out.append(r)
        if r is None:
            assert q.execute("query-named-block-nodes")[0]["image"]["virtual-size"] in \
                (size, size), size
    d.stop()
    return out


CASES = {
    # name: (create options, qemu-io commands, new size)
    "plain": ([], ["write -P 0x11 0 8M"], 3 * MiB + 512),
    "partial": ([], ["write -P 0x11 1M 2M", "write -P 0x22 6M 64k"], 5 * MiB),
    "l1-shrinks": (["-o", "cluster_size=4k"], ["write -P 0x33 0 8M"], 3 * MiB),
    "c512": (["-o", "cluster_size=512"], ["write -P 0x44 0 1M", "write -P 0x45 7M 1M"],
             2 * MiB),
    "extl2": (["-o", "extended_l2=on"], ["write -P 0x55 0 5M", "write -P 0x56 7M 4k"],
              4 * MiB + 4096),
    "v2": (["-o", "compat=0.10"], ["write -P 0x66 0 8M"], MiB),
    "zeroes": ([], ["write -P 0x77 0 4M", "write -z 4M 4M"], 2 * MiB),
    "to-zero": ([], ["write -P 0x88 0 8M"], 0),
}


@pytest.mark.skipif(not QSD, reason="qemu-storage-daemon not installed")
@pytest.mark.parametrize("case", sorted(CASES))
def test_shrink_as_qsd(start_daemon, shm, case):
    opts, cmds, size = CASES[case]
    orig = os.path.join(shm, "orig.qcow2")
    qemu_img("create", "-f", "qcow2", *opts, orig, str(8 * MiB))
    qemu_io(orig, *cmds)
    want = to_raw(orig, os.path.join(shm, "orig.raw"))[:size]
    got = {}
    for impl in ("bexd", "qsd"):
        img = os.path.join(shm, impl + ".qcow2")
        shutil.copyfile(orig, img)
        assert resize(start_daemon, impl, img, size) == [None]
        assert_clean(img)
        data = to_raw(img, os.path.join(shm, impl + ".raw"))
        assert len(data) == size and first_difference(data, want) is None, impl
        mp = json.loads(qemu_img("map", "--output=json", img))
        got[impl] = (os.stat(img).st_size,
                     [(m["start"], m["length"], m["data"], m["zero"]) for m in mp])
    assert got["bexd"] == got["qsd"]


def test_shrink_then_grow_reads_zeros(impl, start_daemon, shm):
    img = os.path.join(shm, "a.qcow2")
    qemu_img("create", "-f", "qcow2", img, str(8 * MiB))
    qemu_io(img, "write -P 0x5a 0 8M")
    assert resize(start_daemon, impl, img, 2 * MiB, 8 * MiB) == [None, None]
    assert_clean(img)
    qemu_io(img, "read -P 0x5a 0 2M", "read -P 0 2M 6M")


def test_shrink_keeps_snapshots(impl, start_daemon, shm):
    """v3 with an internal snapshot: the cropped clusters lose one
    reference, the snapshot keeps its data and its size."""
    img = os.path.join(shm, "s.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16k", img, str(8 * MiB))
    qemu_io(img, "write -P 0x21 0 8M")
    qemu_img("snapshot", "-c", "before", img)
    want = to_raw(img, os.path.join(shm, "before.raw"))
    assert resize(start_daemon, impl, img, 3 * MiB, 12 * MiB) == [None, None]
    assert_clean(img)
    qemu_io(img, "read -P 0x21 0 3M", "read -P 0 3M 9M")
    qemu_img("snapshot", "-a", "before", img)
    assert_clean(img)
    got = to_raw(img, os.path.join(shm, "after.raw"))
    assert first_difference(got, want) is None


@pytest.mark.parametrize("opts,snap,sizes,errors", [
    (["-o", "compat=0.10"], True, [2 * MiB, 16 * MiB],
     ["Can't resize a v2 image which has snapshots"] * 2),
    ([], False, [MiB + 1000], ["The new size must be a multiple of 512"]),
], ids=["v2-snapshot", "unaligned"])
def test_resize_refused(impl, start_daemon, shm, opts, snap, sizes, errors):
    img = os.path.join(shm, "e.qcow2")
    qemu_img("create", "-f", "qcow2", *opts, img, str(8 * MiB))
    qemu_io(img, "write -P 0x31 0 8M")
    if snap:
        qemu_img("snapshot", "-c", "s", img)
    before = open(img, "rb").read()
    got = resize(start_daemon, impl, img, *sizes)
    assert got == [{"class": "GenericError", "desc": e} for e in errors]
    assert open(img, "rb").read() == before


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_shrink_seen_by_new_nbd_client(impl, start_daemon, shm, fmt):
    img = os.path.join(shm, "n." + fmt)
    qemu_img("create", "-f", fmt, img, str(8 * MiB))
    qemu_io(img, "write -P 0x42 0 8M", fmt=fmt)
    sock = os.path.join(shm, "nbd.sock")
    args = ["--blockdev", "driver=file,node-name=f,filename=" + img]
    node = "f"
    if fmt == "qcow2":
        args += ["--blockdev", "driver=qcow2,node-name=q,file=f"]
        node = "q"
    # As qsd: an NBD export does not share resize; the export made after
    # the resize, and its clients, see the new size.
    d = start_daemon(impl, *args, "--nbd-server", "addr.type=unix,addr.path=" + sock)
    uri = "nbd+unix:///e?socket=" + sock
    q = d.qmp()
    q.execute("block_resize", node_name=node, size=3 * MiB)
    q.execute("block-export-add", type="nbd", id="e", node_name=node, name="e", writable=True)
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.get_size() == 3 * MiB
    assert h.pread(4096, 3 * MiB - 4096) == b"\x42" * 4096
    with pytest.raises(nbd.Error):
        h.pread(4096, 3 * MiB)
    h.pwrite(b"\x43" * 4096, 3 * MiB - 4096)
    h.flush()
    h.shutdown()
    d.stop()
    if fmt == "qcow2":
        assert_clean(img)
    qemu_io(img, "read -P 0x42 0 3068k", "read -P 0x43 3068k 4k", fmt=fmt)
    assert json.loads(qemu_img("info", "--output=json", "-f", fmt, img))["virtual-size"] == \
        3 * MiB


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_grow_over_longer_backing_reads_zeros(impl, start_daemon, shm, compat):
    """As QEMU 7.2: growing over a backing file longer than the old size
    zeroes the new area rather than showing the backing file's bytes."""
    base = os.path.join(shm, "base.qcow2")
    img = os.path.join(shm, "top.qcow2")
    qemu_img("create", "-f", "qcow2", base, str(8 * MiB))
    qemu_io(base, "write -P 0x77 0 8M")
    qemu_img("create", "-f", "qcow2", "-o", "compat=" + compat, "-b", "base.qcow2",
             "-F", "qcow2", img, str(3 * MiB + 512))
    got = resize(start_daemon, impl, img, 8 * MiB)
    assert_clean(img)
    size = json.loads(qemu_img("info", "--output=json", img))["virtual-size"]
    if compat == "0.10":
        # no zero flag: QEMU refuses, and the size stays
        assert got == [{"class": "GenericError",
                        "desc": "Failed to zero out new clusters: Operation not supported"}]
        assert size == 3 * MiB + 512
        return
    assert got == [None] and size == 8 * MiB
    qemu_io(img, "read -P 0x77 0 3146240", "read -P 0 3146240 5242368")
