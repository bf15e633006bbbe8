"""qcow2 node options: each one QEMU 7.2 accepts does what it says, against
bexd and qemu-storage-daemon (nothing accepted is silently ignored)."""
import os
import shutil
import time

import nbd
import pytest

from qcow2img import MiB, qemu_img, qemu_io, shm  # noqa: F401  (fixture)


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_for(cond, timeout, what):
    """Poll cond() until it is true (the condition is the daemon's own
    timer firing: there is nothing else to wait on)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.1)


def test_cache_clean_interval_frees_unused_entries(start_daemon, shm):
    """128 L2 tables (8 MiB) are loaded by reads; with cache-clean-interval=1
    the entries nobody touches leave the cache and the daemon's memory goes
    back down.  bexd only: qemu-storage-daemon 7.2 arms this timer on the
    virtual clock, which never runs without a guest, so it never cleans."""
    impl = "bexd"
    img = os.path.join(shm, "cc.qcow2")
    qemu_img("create", "-f", "qcow2", img, "64G")
    qemu_io(img, *["write -z %dM 64k" % (i * 512) for i in range(128)])
    sock = os.path.join(shm, "nbd.sock")
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=" + img,
                     "--blockdev", "driver=qcow2,node-name=q0,file=f0,l2-cache-size=16777216,"
                     "cache-clean-interval=1",
                     "--nbd-server", "addr.type=unix,addr.path=" + sock,
                     "--export", "type=nbd,id=e0,node-name=q0,name=q0")
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///q0?socket=" + sock)
    base = rss_kib(d.pid)
    for i in range(128):
        assert h.pread(512, i * 512 * MiB) == b"\0" * 512
    loaded = rss_kib(d.pid)
    assert loaded - base > 6 * 1024, (base, loaded)       # the L2 slices are cached
    wait_for(lambda: rss_kib(d.pid) < loaded - 6 * 1024, 30, "the cache to be cleaned")
    # what was dropped is read again from the image
    assert h.pread(512, 77 * 512 * MiB) == b"\0" * 512
    h.shutdown()


def header_incompat(img):
    with open(img, "rb") as f:
        f.seek(72)
        return int.from_bytes(f.read(8), "big")


def node_info(q, name):
    return [n for n in q.execute("query-named-block-nodes") if n["node-name"] == name][0]


@pytest.mark.parametrize("how", ["image", "option", "off"])
def test_lazy_refcounts_dirty_bit(impl, start_daemon, shm, how):
    """With lazy refcounts (from the image or the option) the first
    allocating write sets the dirty bit on disk and a clean stop clears it;
    without, the bit is never set."""
    img = os.path.join(shm, "lz.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=%s" % ("on" if how == "image" else "off"),
             img, "16M")
    opt = {"image": "", "option": ",lazy-refcounts=on", "off": ""}[how]
    sock = os.path.join(shm, "nbd.sock")
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=" + img,
                     "--blockdev", "driver=qcow2,node-name=q0,file=f0" + opt,
                     "--nbd-server", "addr.type=unix,addr.path=" + sock,
                     "--export", "type=nbd,id=e0,node-name=q0,name=q0,writable=on")
    q = d.qmp()
    assert header_incompat(img) & 1 == 0                  # opening alone writes nothing
    assert node_info(q, "q0")["image"]["dirty-flag"] is False
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///q0?socket=" + sock)
    h.pwrite(b"\x5a" * 65536, 3 * MiB)
    h.flush()
    lazy = how != "off"
    assert bool(header_incompat(img) & 1) == lazy
    assert node_info(q, "q0")["image"]["dirty-flag"] is lazy
    h.shutdown()
    d.stop()
    assert header_incompat(img) & 1 == 0                  # a clean stop clears it
    r = qemu_img("check", img)
    assert "No errors were found on the image." in r
    assert "Pattern verification failed" not in qemu_io(img, "read -P 0x5a 3M 64k")


def be64(b, off):
    return int.from_bytes(b[off:off + 8], "big")


OFFSET_MASK = 0x00fffffffffffe00


@pytest.mark.parametrize("check", ["all", "cached"])
def test_overlap_check_inactive_l2(impl, start_daemon, shm, check):
    """An active L2 entry pointing into a snapshot's own L2 table: with
    overlap-check=all the write is refused as QEMU refuses it; with the
    default (cached) neither daemon checks inactive L2 tables."""
    img = os.path.join(shm, "s.qcow2")
    qemu_img("create", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x11 0 64k")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0x22 0 64k")           # the active L2 table is a copy now
    with open(img, "r+b") as f:
        raw = f.read()
        sn_l1 = be64(raw, be64(raw, 64))          # first snapshot header: its L1 offset
        sn_l2 = be64(raw, sn_l1) & OFFSET_MASK
        act_l2 = be64(raw, be64(raw, 40)) & OFFSET_MASK
        assert sn_l2 and act_l2 and sn_l2 != act_l2
        f.seek(act_l2)
        f.write((sn_l2 | (1 << 63)).to_bytes(8, "big"))
    sock = os.path.join(shm, "nbd.sock")
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=" + img,
                     "--blockdev", "driver=qcow2,node-name=q0,file=f0,overlap-check=" + check,
                     "--nbd-server", "addr.type=unix,addr.path=" + sock,
                     "--export", "type=nbd,id=e0,node-name=q0,name=q0,writable=on")
    q = d.qmp()
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///q0?socket=" + sock)
    if check == "all":
        with pytest.raises(nbd.Error):
            h.pwrite(b"\xff" * 4096, 0)
        ev = q.wait_event("BLOCK_IMAGE_CORRUPTED")
        assert ev["data"]["msg"] == ("Preventing invalid write on metadata "
                                     "(overlaps with inactive L2 table)")
        assert ev["data"]["fatal"] is True
    else:
        h.pwrite(b"\xff" * 4096, 0)               # not checked: goes through
        info = node_info(q, "q0")["image"]["format-specific"]["data"]
        assert info["corrupt"] is False
    h.shutdown()


@pytest.mark.parametrize("extra", ["", ",auto-read-only=on"])
def test_read_write_node_on_read_only_file_refused(impl, shm, extra):
    from conftest import run_daemon_expect_fail
    img = os.path.join(shm, "a.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1M")
    rc, err = run_daemon_expect_fail(impl, [
        "--blockdev", "driver=file,node-name=f0,filename=%s,read-only=on" % img,
        "--blockdev", "driver=qcow2,node-name=q0,file=f0" + extra])
    assert rc != 0
    assert "Block node is read-only" in err


def map_states(img):
    """qemu-img map without host offsets, adjacent equal extents merged."""
    import json
    import subprocess
    out = subprocess.run(["qemu-img", "map", "--output=json", img], stdout=subprocess.PIPE,
                         check=True).stdout
    res = []
    for e in json.loads(out):
        key = (e["depth"], e["present"], e["zero"], e["data"])
        if res and res[-1][2] == key and res[-1][0] + res[-1][1] == e["start"]:
            res[-1][1] += e["length"]
        else:
            res.append([e["start"], e["length"], key])
    return res


MAP_CASES = {
    "v3": ([], False),
    "v3-backing": ([], True),
    "v2": (["-o", "compat=0.10"], False),
    "v2-backing": (["-o", "compat=0.10"], True),
    "extl2-backing": (["-o", "extended_l2=on"], True),
}


@pytest.mark.parametrize("case", list(MAP_CASES))
def test_zero_and_discard_leave_the_map_qsd_leaves(start_daemon, shm, case):
    """The same cluster-aligned writes, zeroes (with and without may-unmap)
    and trims through bexd and qemu-storage-daemon on copies of one image
    leave the same allocation map: zero flags, unallocated clusters and data
    where QEMU puts them."""
    import random
    opts, backing = MAP_CASES[case]
    cs = 65536
    size = 8 * MiB
    src = os.path.join(shm, "src.qcow2")
    args = list(opts)
    if backing:
        base = os.path.join(shm, "base.qcow2")
        qemu_img("create", "-f", "qcow2", base, str(size))
        qemu_io(base, "write -P 0x5a 0 4M")
        args += ["-b", "base.qcow2", "-F", "qcow2"]
    qemu_img("create", "-f", "qcow2", *args, src, str(size))
    qemu_io(src, "write -P 0x17 1M 2M", "write -c -P 0x18 6M 64k" if not backing
            else "write -P 0x18 6M 64k")
    rnd = random.Random(case)
    ops = []
    for _ in range(60):
        off = rnd.randrange(0, size // cs) * cs
        ln = min(rnd.choice([1, 2, 5]) * cs, size - off)
        ops.append((rnd.choice(["write", "zero", "zero-unmap", "trim"]), off, ln))
    maps = {}
    for impl in ("bexd", "qsd"):
        img = os.path.join(shm, "%s.qcow2" % impl)
        shutil.copy(src, img)
        sock = os.path.join(shm, "%s.sock" % impl)
        d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s,discard=unmap" % img,
                         "--blockdev", "driver=qcow2,node-name=q0,file=f0,discard=unmap",
                         "--nbd-server", "addr.type=unix,addr.path=" + sock,
                         "--export", "type=nbd,id=e0,node-name=q0,name=q0,writable=on")
        h = nbd.NBD()
        h.connect_uri("nbd+unix:///q0?socket=" + sock)
        for op, off, ln in ops:
            if op == "write":
                h.pwrite(bytes([off // cs % 250 + 1]) * ln, off)
            elif op == "zero":
                h.zero(ln, off, nbd.CMD_FLAG_NO_HOLE)
            elif op == "zero-unmap":
                h.zero(ln, off)
            else:
                h.trim(ln, off)
        h.flush()
        h.shutdown()
        d.stop()
        maps[impl] = map_states(img)
        r = qemu_img("check", img)
        assert "No errors were found on the image." in r
    if maps["bexd"] != maps["qsd"]:
        for k in maps:
            print(k, maps[k])
    assert maps["bexd"] == maps["qsd"]


def allocated_kib(path):
    return os.stat(path).st_blocks // 2


@pytest.mark.parametrize("opt,punched", [("", True), (",pass-discard-request=off", False),
                                         (",pass-discard-request=on", True)])
def test_pass_discard_request(impl, start_daemon, shm, opt, punched):
    """A trim frees the clusters; the file's blocks go only if
    pass-discard-request (by default: the node's discard=unmap) says so."""
    img = os.path.join(shm, "pd.qcow2")
    qemu_img("create", "-f", "qcow2", img, "16M")
    qemu_io(img, "write -P 0x33 0 8M")
    sock = os.path.join(shm, "nbd.sock")
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s,discard=unmap" % img,
                     "--blockdev", "driver=qcow2,node-name=q0,file=f0,discard=unmap" + opt,
                     "--nbd-server", "addr.type=unix,addr.path=" + sock,
                     "--export", "type=nbd,id=e0,node-name=q0,name=q0,writable=on")
    before = allocated_kib(img)
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///q0?socket=" + sock)
    h.trim(6 * MiB, MiB)
    h.flush()
    after = allocated_kib(img)
    assert h.pread(4096, 2 * MiB) == b"\0" * 4096
    h.shutdown()
    d.stop()
    if punched:
        assert before - after > 5 * 1024, (before, after)
    else:
        assert before - after < 512, (before, after)
    assert "No errors were found on the image." in qemu_img("check", img)
