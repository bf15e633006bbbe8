"""block_resize, against bexd and qemu-storage-daemon 7.2: errors, file and
raw nodes growing and shrinking, and what the exports on the node show.

As qsd, a node under an NBD export is not resized (the NBD server does
not share the resize permission); after the export is gone, the next one
gets the new size.  bexd does better than qsd 7.2 on purpose for FUSE:
qsd's file keeps its old size for up to a second (the kernel's attribute
cache) where bexd's changes at once.  The vhost-user-blk front-end is told of the new capacity, as QEMU
8.1 does (7.2 does not): a real guest sees it without rebooting.
"""
import os
import subprocess
import sys

import pytest

from conftest import QSD, xfail_if_reference_died

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "vhost"))
import guest  # noqa: E402

MiB = 1 << 20


def sizes(q):
    return {n["node-name"]: n["image"]["virtual-size"] for n in q.execute("query-named-block-nodes")}


@pytest.fixture
def nodes(impl, start_daemon, image, tmpdir_short):
    """A daemon with f (file), r (raw over f), ro (read-only file), n
    (null-co), fixed (raw with size), off (raw at offset 64 KiB)."""
    img = image(MiB, name="f.img")
    d = start_daemon(impl,
                     "--blockdev", "driver=file,node-name=f,filename=" + img,
                     "--blockdev", "driver=raw,node-name=r,file=f",
                     "--blockdev", "driver=file,node-name=ro,read-only=on,filename="
                     + image(MiB, name="ro.img"),
                     "--blockdev", "driver=null-co,node-name=n",
                     "--blockdev", "driver=raw,node-name=fixed,size=65536,file.driver=file,"
                     "file.filename=" + image(MiB, name="fixed.img"),
                     "--blockdev", "driver=raw,node-name=off,offset=65536,file.driver=file,"
                     "file.filename=" + image(MiB, name="off.img"))
    return d.qmp(), img, tmpdir_short


@pytest.mark.parametrize("args,error", [
    ({"size": MiB}, "Cannot find device='' nor node-name=''"),
    ({"device": "f", "size": MiB}, "Cannot find device='f' nor node-name=''"),
    ({"node-name": "zz", "size": MiB}, "Cannot find device='' nor node-name='zz'"),
    ({"node-name": "f", "size": -1}, "Parameter 'size' expects a >0 size"),
    ({"node-name": "f", "size": (1 << 63) - 512},
     "offset(9223372036854775296) exceeds maximum(9223372035781033984)"),
    ({"node-name": "ro", "size": (1 << 63) - 512},
     "offset(9223372036854775296) exceeds maximum(9223372035781033984)"),
    ({"node-name": "off", "size": (1 << 63) - 65536},
     "offset(9223372036854710272) exceeds maximum(9223372035781033984)"),
    ({"node-name": "ro", "size": 2 * MiB}, "Image is read-only"),
    ({"node-name": "n", "size": 2 * MiB}, "Image format driver does not support resize"),
    ({"node-name": "fixed", "size": 2 * MiB}, "Cannot resize fixed-size raw disks"),
    ({"node-name": "f"}, "Parameter 'size' is missing"),
    ({"node-name": "f", "size": "1M"}, "Invalid parameter type for 'size', expected: integer"),
    ({"node-name": "f", "size": MiB, "x": 1}, "Parameter 'x' is unexpected"),
], ids=["nothing", "device", "unknown", "negative", "huge", "huge-ro", "huge-offset", "ro",
        "null", "fixed", "nosize", "sizetype", "extra"])
def test_resize_errors(nodes, args, error):
    q, img, _ = nodes
    assert q.error("block_resize", **{k.replace("-", "_"): v for k, v in args.items()}) == \
        {"class": "GenericError", "desc": error}
    assert os.stat(img).st_size == MiB


def test_resize_file_and_raw(nodes):
    q, img, tmp = nodes
    q.execute("block_resize", node_name="f", size=3 * MiB)
    assert os.stat(img).st_size == 3 * MiB
    s = sizes(q)
    assert (s["f"], s["r"]) == (3 * MiB, 3 * MiB)      # raw follows its file
    q.execute("block_resize", node_name="r", size=2 * MiB)
    assert os.stat(img).st_size == 2 * MiB
    s = sizes(q)
    assert (s["f"], s["r"]) == (2 * MiB, 2 * MiB)
    # a raw window at an offset grows its file to offset + size
    q.execute("block_resize", node_name="off", size=MiB)
    assert os.stat(os.path.join(tmp, "off.img")).st_size == MiB + 65536
    assert sizes(q)["off"] == MiB
    # to zero and back; a device name beside the node name is ignored
    q.execute("block_resize", node_name="f", size=0)
    assert os.stat(img).st_size == 0
    assert sizes(q)["r"] == 0
    q.execute("block_resize", device="nope", node_name="f", size=4096)
    assert sizes(q)["r"] == 4096


def test_resize_keeps_data(impl, start_daemon, image):
    data = os.urandom(MiB)
    img = image(MiB, data=data)
    q = start_daemon(impl, "--blockdev", "driver=file,node-name=f,filename=" + img).qmp()
    q.execute("block_resize", node_name="f", size=2 * MiB)
    with open(img, "rb") as f:
        assert f.read() == data + bytes(MiB)
    q.execute("block_resize", node_name="f", size=MiB // 2)
    with open(img, "rb") as f:
        assert f.read() == data[:MiB // 2]


def nbd_size(sock, name):
    r = subprocess.run(["nbdinfo", "--size", "nbd+unix:///%s?socket=%s" % (name, sock)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, errors="replace", check=True)
    return int(r.stdout)


def test_resize_under_nbd_export(impl, start_daemon, image, tmpdir_short):
    """As qsd: refused while the NBD export exists (it does not share
    resize); once it is gone, the node resizes and the next export and its
    clients get the new size."""
    img = image(MiB)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    q = start_daemon(impl, "--blockdev", "driver=file,node-name=f,filename=" + img,
                     "--nbd-server", "addr.type=unix,addr.path=" + sock,
                     "--export", "type=nbd,id=e,node-name=f,name=d,writable=on").qmp()
    assert nbd_size(sock, "d") == MiB
    assert q.error("block_resize", node_name="f", size=2 * MiB)["desc"] == (
        "Permission conflict on node 'f': permissions 'resize' are both required by an "
        "unnamed block device (uses node 'f' as 'root' child) and unshared by an unnamed "
        "block device (uses node 'f' as 'root' child).")
    q.execute("block-export-del", id="e")
    q.wait_event("BLOCK_EXPORT_DELETED")
    q.execute("block_resize", node_name="f", size=2 * MiB)
    q.execute("block-export-add", type="nbd", id="e", node_name="f", name="d", writable=True)
    assert nbd_size(sock, "d") == 2 * MiB
    subprocess.run(["nbdsh", "-u", "nbd+unix:///d?socket=%s" % sock, "-c",
                    "h.pwrite(b'\\x5a' * 4096, 2 * 1048576 - 4096); "
                    "assert h.pread(4096, 2 * 1048576 - 4096) == b'\\x5a' * 4096"], check=True)


def test_resize_under_fuse_export(impl, start_daemon, image, tmpdir_short):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    img = image(MiB, data=b"\x11" * MiB)
    mnt = os.path.join(tmpdir_short, "mnt")
    open(mnt, "w").close()
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f,filename=" + img,
                     "--export", "type=fuse,id=u,node-name=f,mountpoint=%s,writable=on" % mnt)
    try:
        q = d.qmp()
        with open(mnt, "rb") as f:
            assert f.read() == b"\x11" * MiB      # size and pages now cached by the kernel
        q.execute("block_resize", node_name="f", size=3 * MiB)
        if impl == "bexd":
            assert os.stat(mnt).st_size == 3 * MiB
            with open(mnt, "rb") as f:
                assert f.read() == b"\x11" * MiB + bytes(2 * MiB)
            q.execute("block_resize", node_name="f", size=MiB // 2)
            assert os.stat(mnt).st_size == MiB // 2
            q.execute("block_resize", node_name="f", size=MiB)
            with open(mnt, "rb") as f:       # no stale page past the shrink
                assert f.read() == b"\x11" * (MiB // 2) + bytes(MiB // 2)
        else:
            assert os.stat(mnt).st_size in (MiB, 3 * MiB)     # until the cache expires
        assert os.stat(img).st_size == (3 * MiB if impl == "qsd" else MiB)
    finally:
        d.stop()
        subprocess.run(["fusermount3", "-u", "-z", mnt], stderr=subprocess.DEVNULL)


def test_resize_seen_by_vhost_user_guest(start_daemon, image, tmpdir_short):
    if guest.missing():      # every piece comes from a package scripts/deps.sh installs
        pytest.fail("cannot boot a guest: %s (run scripts/deps.sh)" % guest.missing(),
                    pytrace=False)
    img = image(64 * MiB)
    sock = os.path.join(tmpdir_short, "vub.sock")
    d = start_daemon("bexd", "--blockdev", "driver=file,node-name=disk,filename=" + img,
                     "--export", "type=vhost-user-blk,id=v,node-name=disk,writable=on,"
                     "addr.type=unix,addr.path=" + sock)
    q = d.qmp()
    g = guest.Guest(sock, "resize")
    try:
        g.wait_line("BEX: ready_for_resize")
        q.execute("block_resize", node_name="disk", size=96 * MiB)
        rep = g.finish()
    finally:
        g.kill()
    assert rep["result"] == "PASS", rep
    assert rep["size"] == str(64 * MiB)
    assert rep["new_size"] == str(96 * MiB)
    assert rep.get("dmesg_capacity_change") == "yes"
    assert d.alive()


# ---- block-set-write-threshold ----

def nbdsh(sock, name, code):
    subprocess.run(["nbdsh", "-u", "nbd+unix:///%s?socket=%s" % (name, sock), "-c", code],
                   check=True)


def threshold_events(q):
    """BLOCK_WRITE_THRESHOLD events so far (a query flushes what is queued)."""
    q.execute("query-block-exports")
    evs = [e["data"] for e in q.events if e["event"] == "BLOCK_WRITE_THRESHOLD"]
    q.events = [e for e in q.events if e["event"] != "BLOCK_WRITE_THRESHOLD"]
    return evs


def thresholds(q):
    return {n["node-name"]: n["write_threshold"] for n in q.execute("query-named-block-nodes")}


def test_write_threshold(impl, start_daemon, image, tmpdir_short):
    img = image(MiB)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    q = start_daemon(impl, "--blockdev", "driver=file,node-name=f,filename=" + img,
                     "--blockdev", "driver=raw,node-name=r,file=f",
                     "--nbd-server", "addr.type=unix,addr.path=" + sock,
                     "--export", "type=nbd,id=e,node-name=r,name=d,writable=on").qmp()
    assert q.error("block-set-write-threshold", node_name="zz", write_threshold=1) == \
        {"class": "GenericError", "desc": "Device 'zz' not found"}
    q.execute("block-set-write-threshold", node_name="r", write_threshold=65536)
    assert thresholds(q)["r"] == 65536
    nbdsh(sock, "d", "h.pwrite(b'x' * 4096, 0); h.trim(65536, 0)")   # below it; a trim
    assert threshold_events(q) == []
    nbdsh(sock, "d", "h.pwrite(b'x' * 4096, 65536); h.pwrite(b'x' * 4096, 131072)")
    assert threshold_events(q) == [{"node-name": "r", "amount-exceeded": 4096,
                                    "write-threshold": 65536}]     # once, then off
    assert thresholds(q)["r"] == 0
    q.execute("block-set-write-threshold", node_name="r", write_threshold=65536)
    nbdsh(sock, "d", "h.zero(4096 + 65536, 4096)")
    assert threshold_events(q) == [{"node-name": "r", "amount-exceeded": 8192,
                                    "write-threshold": 65536}]
    # set on the file node, crossed by writes through the raw node above it
    q.execute("block-set-write-threshold", node_name="f", write_threshold=512 * 1024)
    nbdsh(sock, "d", "h.pwrite(b'x' * 10, 512 * 1024 - 6)")
    assert threshold_events(q) == [{"node-name": "f", "amount-exceeded": 4,
                                    "write-threshold": 512 * 1024}]
    # 0 turns it off
    q.execute("block-set-write-threshold", node_name="r", write_threshold=65536)
    q.execute("block-set-write-threshold", node_name="r", write_threshold=0)
    nbdsh(sock, "d", "h.pwrite(b'x' * 4096, 65536)")
    assert threshold_events(q) == []


# ---- x-blockdev-set-iothread ----

def test_set_iothread(impl, start_daemon, image, tmpdir_short):
    img = image(MiB, data=b"\x33" * MiB)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, "--object", "iothread,id=io0", "--object", "iothread,id=io1",
                     "--blockdev", "driver=file,node-name=f,filename=" + img,
                     "--blockdev", "driver=raw,node-name=r,file=f",
                     "--blockdev", "driver=null-co,node-name=n",
                     "--nbd-server", "addr.type=unix,addr.path=" + sock)
    q = d.qmp()

    def err(**kw):
        return q.error("x-blockdev-set-iothread", **kw)["desc"]

    assert err(node_name="zz", iothread="io0") == "Failed to find node with node-name='zz'"
    assert err(node_name="n", iothread="zz") == "Cannot find iothread zz"
    assert q.execute("x-blockdev-set-iothread", node_name="n", iothread="io0") == {}
    assert q.execute("x-blockdev-set-iothread", node_name="n", iothread=None) == {}
    q.execute("block-export-add", type="nbd", id="e", node_name="r", name="d")
    assert err(node_name="r", iothread="io1") == (
        "Node r is associated with a BlockBackend and could be in use "
        "(use force=true to override this check)")
    # a child of the exported node moves the whole graph, export included
    assert q.execute("x-blockdev-set-iothread", node_name="f", iothread="io1") == {}
    assert q.execute("x-blockdev-set-iothread", node_name="r", iothread="io0", force=True) == {}
    q.execute("block-export-add", type="nbd", id="e2", node_name="n", name="n",
              iothread="io0", fixed_iothread=True)
    assert err(node_name="n", iothread="io1", force=True) == \
        "Cannot change iothread of active block backend"
    assert q.error("x-blockdev-set-iothread", node_name="n")["desc"] == \
        "Parameter 'iothread' is missing"
    # clients last: qsd 7.2 aborts when a client leaves an iothread NBD
    # export (an xfail for the reference, after the checks above)
    assert nbd_size(sock, "d") == MiB
    xfail_if_reference_died(d, "aborted when a client left an iothread NBD export")
    subprocess.run(["nbdsh", "-u", "nbd+unix:///d?socket=%s" % sock, "-c",
                    "assert h.pread(4096, 0) == b'\\x33' * 4096"], check=True)
    xfail_if_reference_died(d, "aborted when a client left an iothread NBD export")
    # with a client attached the export moves, client included
    # (tests/func/test_set_iothread.py has the clients doing I/O)
    sh = subprocess.Popen(["nbdsh", "-u", "nbd+unix:///d?socket=%s" % sock, "-c",
                           "import sys; print('up', flush=True); sys.stdin.readline(); "
                           "assert h.pread(4096, 0) == b'\\x33' * 4096; print('read')"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, errors="replace")
    try:
        assert sh.stdout.readline() == "up\n"
        assert q.execute("x-blockdev-set-iothread", node_name="r", iothread="io1",
                         force=True) == {}
        sh.stdin.write("go\n")
        sh.stdin.flush()
        assert sh.stdout.readline() == "read\n"
    finally:
        sh.stdin.close()
        sh.wait()
    xfail_if_reference_died(d, "aborted when a client left an iothread NBD export")
