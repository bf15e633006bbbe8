"""qcow2 images and backing chains, against bexd and qemu-storage-daemon.

Images are made by qemu-img/qemu-io 7.2 (every combination the format
offers that changes how data is found: versions, cluster sizes, refcount
widths, extended L2, compression, preallocation, raw and qcow2 backing
files, chains of 2 and 10, external data files), read through the exports
and compared byte for byte with `qemu-img convert -O raw`.  Writes go
through a random mix of NBD writes, zeroes, trims and flushes mirrored into
a raw file; afterwards `qemu-img check` must find no error and no leak and
`qemu-img compare` must find the images identical.  Block status maps and
allocation depths must be the lines qemu-storage-daemon prints.  Images live
in /dev/shm and stay a few MiB.
"""
import errno
import os
import random
import shutil
import signal
import subprocess
import tempfile

import nbd
import pytest

import needs
from conftest import run_daemon_expect_fail, tool_text, tool_json, xfail_if_reference_died
from qcow2img import (MiB, READ_CASES, assert_clean, build_case, first_difference,  # noqa: F401
                      make_qcow2, nbd_random_ops, qemu_img, qemu_io, shm, stable_seed,
                      to_raw)


def blockdev(img, node="q0", extra=""):
    return ["--blockdev", "driver=file,node-name=%s-file,filename=%s%s" % (node, img, extra),
            "--blockdev", "driver=qcow2,node-name=%s,file=%s-file%s" % (node, node, extra)]


def serve(start_daemon, impl, img, d, writable=False, extra="", node_extra="", depth=False):
    sock = os.path.join(d, "nbd-%s.sock" % impl)
    exp = "type=nbd,id=e0,node-name=q0,name=q0,writable=%s" % ("on" if writable else "off")
    if depth:
        exp += ",allocation-depth=on"
    daemon = start_daemon(impl, *blockdev(img, extra=node_extra),
                          "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                          "--export", exp + extra)
    return daemon, "nbd+unix:///q0?socket=%s" % sock


def nbd_read_all(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    out = bytearray()
    for off in range(0, size, MiB):
        out += h.pread(min(MiB, size - off), off)
    h.shutdown()
    return bytes(out)


# ---- reads ----

@pytest.mark.parametrize("case", READ_CASES)
def test_read_matches_qemu_img_convert(impl, start_daemon, shm, case):
    img = build_case(shm, case)
    want = to_raw(img, os.path.join(shm, "ref.raw"))
    d, uri = serve(start_daemon, impl, img, shm)
    got = nbd_read_all(uri)
    assert first_difference(got, want) is None


@pytest.mark.parametrize("case", ["v2", "c512", "extl2-chain", "zstd", "prealloc-metadata",
                                  "raw-backing", "chain10", "data-file"])
def test_block_status_matches_qsd(start_daemon, shm, case):
    if not shutil.which("qemu-storage-daemon"):
        pytest.skip("no qemu-storage-daemon")
    img = build_case(shm, case)
    maps = {}
    for impl in ("bexd", "qsd"):
        d, uri = serve(start_daemon, impl, img, shm, depth=True)
        maps[impl] = [merged_map(subprocess.run(["nbdinfo", "--map=" + ctx, uri],
                                                stdout=subprocess.PIPE,
                                                check=True).stdout.decode(errors="replace"))
                      for ctx in ("base:allocation", "qemu:allocation-depth")]
        d.stop()
    assert maps["bexd"] == maps["qsd"]


def merged_map(text):
    """nbdinfo --map lines with adjacent equal extents merged: a server may
    answer block status in parts (bexd bounds the time of one answer)."""
    out = []
    for line in text.splitlines():
        off, length, rest = line.split(None, 2)
        if out and out[-1][2] == rest and out[-1][0] + out[-1][1] == int(off):
            out[-1][1] += int(length)
        else:
            out.append([int(off), int(length), rest])
    return out


def small_cluster_image(d, size=16 * MiB):
    """512-byte clusters (an L2 table per 32 KiB): data, zeros, a discarded
    hole, a second pattern, and tables never allocated."""
    img = os.path.join(d, "c512.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", img, str(size))
    qemu_io(img, "write -P 1 0 %d" % (size * 3 // 4), "write -z 1M 512k",
            "discard 3M 100k", "write -P 2 %d 200k" % (size - MiB), "write -z 5M 1k",
            "write -P 3 6M 1k")
    return img


def maps_of(uri):
    return [merged_map(subprocess.run(["nbdinfo", "--map=" + ctx, uri], stdout=subprocess.PIPE,
                                      check=True).stdout.decode(errors="replace"))
            for ctx in ("base:allocation", "qemu:allocation-depth")]


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_block_status_of_small_clusters_matches_qsd(start_daemon, shm, direct):
    """Block status reads uncached L2 tables in batches (inline from the page
    cache, or one helper thread for many tables with O_DIRECT) and answers
    one run across tables: the map must still be qsd's, cold and warm."""
    if not shutil.which("qemu-storage-daemon"):
        pytest.skip("no qemu-storage-daemon")
    img = small_cluster_image(shm)
    extra = ",cache.direct=on" if direct else ""
    maps = {}
    for impl in ("bexd", "qsd"):
        d, uri = serve(start_daemon, impl, img, shm, depth=True, node_extra=extra)
        cold = maps_of(uri)
        h = nbd.NBD()
        h.connect_uri(uri)
        for off in range(0, 16 * MiB, 3 * MiB):     # some slices cached, some not
            h.pread(4096, off)
        h.shutdown()
        maps[impl] = (cold, maps_of(uri))
        d.stop()
    assert maps["bexd"][0] == maps["qsd"][0]
    assert maps["bexd"][1] == maps["qsd"][0]
    assert maps["qsd"][1] == maps["qsd"][0]


def test_block_status_of_fallocated_pages_matches_qsd(start_daemon, shm):
    """A page fallocated and never written reads as zeros and SEEK_HOLE
    counts it as a hole: QEMU's block status says zero there, and so must
    bexd's, though no page of the file is missing (QEMU's own writes leave
    such pages on tmpfs where they zero the rest of a new qcow2 cluster)."""
    if not shutil.which("qemu-storage-daemon"):
        pytest.skip("no qemu-storage-daemon")
    img = os.path.join(shm, "f.raw")
    fd = os.open(img, os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, b"\x11" * MiB, 0)
    os.pwrite(fd, b"\x22" * 3 * MiB, 2 * MiB)
    os.posix_fallocate(fd, MiB, MiB)                 # no page missing anywhere
    os.close(fd)
    maps = {}
    for impl in ("bexd", "qsd"):
        sock = os.path.join(shm, "nbd-%s.sock" % impl)
        d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=" + img,
                         "--nbd-server", "addr.type=unix,addr.path=" + sock,
                         "--export", "type=nbd,id=e0,node-name=f0,name=f0,allocation-depth=on")
        uri = "nbd+unix:///f0?socket=" + sock
        maps[impl] = (maps_of(uri), maps_of(uri))
        d.stop()
    assert maps["qsd"][0][0] == [[0, MiB, "0  data"], [MiB, MiB, "3  hole,zero"],
                                 [2 * MiB, 3 * MiB, "0  data"]]
    assert maps["bexd"] == maps["qsd"]


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_block_status_with_dirty_slices_matches_qsd(start_daemon, shm, direct):
    """Writes leave changed L2 slices in bexd's cache, not yet on disk; block
    status merges them with tables it reads from the file.  The map bexd
    gives then must be the one qsd gives of the image bexd leaves."""
    if not shutil.which("qemu-storage-daemon"):
        pytest.skip("no qemu-storage-daemon")
    img = small_cluster_image(shm)
    extra = ",cache.direct=on" if direct else ""
    rng = random.Random(11)
    d, uri = serve(start_daemon, "bexd", img, shm, writable=True, depth=True, node_extra=extra)
    h = nbd.NBD()
    h.connect_uri(uri)
    for _ in range(60):
        off = rng.randrange(0, 16 * MiB - 64 * 1024) & ~511
        n = rng.choice([512, 4096, 40 * 1024])
        kind = rng.random()
        if kind < 0.5:
            h.pwrite(bytes([rng.randrange(1, 256)]) * n, off)
        elif kind < 0.75:
            h.zero(n, off)
        else:
            h.trim(n, off)
    got = maps_of(uri)
    h.shutdown()
    d.stop()
    d, uri = serve(start_daemon, "qsd", img, shm, depth=True, node_extra=extra)
    want = maps_of(uri)
    d.stop()
    assert got == want


@pytest.mark.parametrize("case", ["chain2", "zstd", "extl2"])
def test_read_through_fuse(impl, start_daemon, shm, case):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    needs.tool("fusermount3", "fuse3")
    img = build_case(shm, case)
    want = to_raw(img, os.path.join(shm, "ref.raw"))
    mnt = os.path.join(shm, "mnt")
    open(mnt, "w").close()
    d = start_daemon(impl, *blockdev(img),
                     "--export", "type=fuse,id=f0,node-name=q0,mountpoint=%s" % mnt)
    try:
        with open(mnt, "rb") as f:
            got = f.read()
    finally:
        d.stop()
        subprocess.run(["fusermount3", "-u", "-z", mnt], stderr=subprocess.DEVNULL)
    assert first_difference(got, want) is None


@pytest.mark.parametrize("case", ["chain2", "zlib"])
def test_read_through_vhost_user_blk(impl, start_daemon, shm, case):
    from test_vhost_user_blk import VUB, need_client
    need_client()
    img = build_case(shm, case)
    want = to_raw(img, os.path.join(shm, "ref.raw"))
    sock = os.path.join(shm, "vub.sock")
    start_daemon(impl, *blockdev(img), "--export",
                 "type=vhost-user-blk,id=v0,node-name=q0,addr.type=unix,addr.path=%s" % sock)
    got = bytearray()
    for off in range(0, len(want), MiB):
        r = subprocess.run([VUB, sock, "read", str(off), str(MiB)], stdout=subprocess.PIPE,
                           timeout=60)
        assert r.returncode == 0
        got += r.stdout
    assert first_difference(bytes(got), want) is None


# ---- writes ----

WRITE_CASES = {
    "plain": ([], False),
    "c512": (["-o", "cluster_size=512"], False),
    "c2m": (["-o", "cluster_size=2M"], True),
    "rc1": (["-o", "refcount_bits=1"], False),
    "extl2-backing": (["-o", "extended_l2=on"], True),
    "backing": ([], True),
    "v2-backing": (["-o", "compat=0.10"], True),
    "compressed-base": (None, False),
}


@pytest.mark.parametrize("case", list(WRITE_CASES))
def test_writes_check_and_compare(impl, start_daemon, shm, case):
    size = 16 * MiB
    img = os.path.join(shm, "w.qcow2")
    opts, backing = WRITE_CASES[case]
    if opts is None:                              # writes over compressed clusters
        src = os.path.join(shm, "src.raw")
        with open(src, "wb") as f:
            f.write(os.urandom(4 * MiB) * 4)
        qemu_img("convert", "-c", "-O", "qcow2", src, img)
    else:
        args = list(opts)
        if backing:
            base = os.path.join(shm, "base.qcow2")
            qemu_img("create", "-f", "qcow2", base, str(size))
            qemu_io(base, "write -P 0x5a 0 6M", "write -P 0x6b 10M 1M")
            args += ["-b", "base.qcow2", "-F", "qcow2"]
        qemu_img("create", "-f", "qcow2", *args, img, str(size))
        qemu_io(img, "write -P 0x17 1M 200k")
    mirror = os.path.join(shm, "mirror.raw")
    to_raw(img, mirror)
    d, uri = serve(start_daemon, impl, img, shm, writable=True, node_extra=",discard=unmap")
    nbd_random_ops(uri, mirror, seed=stable_seed(case))
    d.stop()
    assert_clean(img)
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, mirror],
                       stdout=subprocess.PIPE)
    assert r.returncode == 0, tool_text(r.stdout)


def test_fio_verify_many_jobs(impl, start_daemon, shm):
    needs.tool("fio", "fio")
    base = os.path.join(shm, "base.qcow2")
    img = os.path.join(shm, "w.qcow2")
    qemu_img("create", "-f", "qcow2", base, "32M")
    qemu_io(base, "write -P 0x33 0 16M")           # half allocated below
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", img, "32M")
    d, uri = serve(start_daemon, impl, img, shm, writable=True)
    r = subprocess.run(["fio", "--name=v", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite",
                        "--bs=4k", "--iodepth=16", "--numjobs=4", "--size=8M",
                        "--io_size=4M", "--offset_increment=8M", "--verify=crc32c",
                        "--verify_fatal=1", "--verify_state_save=0", "--group_reporting"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert r.returncode == 0, tool_text(r.stdout)[-2000:]
    d.stop()
    assert_clean(img)


def written_end(img):
    """Where the last host cluster qemu-img knows of ends."""
    r = subprocess.run(["qemu-img", "check", "--output=json", img], stdout=subprocess.PIPE)
    return tool_json(r.stdout)["image-end-offset"]


def test_o_direct_file_grown_ahead_and_cut_back(start_daemon, shm):
    """Allocating writes on an O_DIRECT image grow the file ahead (no write
    extends it); at close it is cut back to what was written, the image is
    clean and holds the writes."""
    img = os.path.join(shm, "g.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1G")
    size0 = os.path.getsize(img)
    mirror = os.path.join(shm, "mirror.raw")
    to_raw(img, mirror)
    d, uri = serve(start_daemon, "bexd", img, shm, writable=True,
                   node_extra=",cache.direct=on")
    rng = random.Random(5)
    h = nbd.NBD()
    h.connect_uri(uri)
    with open(mirror, "r+b") as m:
        for _ in range(200):
            off = rng.randrange(0, 1024 * MiB - 8192) & ~4095
            data = bytes([rng.randrange(1, 256)]) * 4096
            h.pwrite(data, off)
            m.seek(off)
            m.write(data)
    h.flush()
    grown = os.path.getsize(img)
    assert grown >= size0 + 128 * MiB          # ahead of the ~13 MiB of clusters
    h.shutdown()
    d.stop()
    end = os.path.getsize(img)
    assert end < grown
    assert written_end(img) - 64 * 1024 < end <= written_end(img)
    assert_clean(img)
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, mirror],
                       stdout=subprocess.PIPE)
    assert r.returncode == 0, tool_text(r.stdout)


def test_o_direct_file_grown_ahead_survives_kill(start_daemon, shm):
    """Killed while the file is grown ahead: the image is clean (the tail is
    unreferenced zeros: qemu-img check reports no leak), flushed writes are
    there, and the next read-write open cuts that tail off (a hole of at
    most one grow step past the last referenced cluster); its writes land
    and the file is cut back to them at close."""
    img = os.path.join(shm, "k.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1G")
    d, uri = serve(start_daemon, "bexd", img, shm, writable=True,
                   node_extra=",cache.direct=on")
    h = nbd.NBD()
    h.connect_uri(uri)
    for i in range(50):
        h.pwrite(bytes([i + 1]) * 4096, i * 7 * MiB)
    h.flush()
    d.stop(signal.SIGKILL)
    killed = os.path.getsize(img)
    assert killed > written_end(img)
    assert_clean(img)
    for i in range(50):
        out = qemu_io(img, "read -P %d %d 4096" % (i + 1, i * 7 * MiB))
        assert "verification failed" not in out.lower(), out
    end = written_end(img)
    d, uri = serve(start_daemon, "bexd", img, shm, writable=True,
                   node_extra=",cache.direct=on")
    assert os.path.getsize(img) == end           # the stale tail is gone
    h = nbd.NBD()
    h.connect_uri(uri)
    for i in range(50):
        h.pwrite(bytes([i + 100]) * 4096, i * 7 * MiB + 3 * MiB)
    h.shutdown()
    d.stop()
    # cut back within the last cluster (a fresh cluster's write skips its
    # zeros past the end of the file)
    assert end < written_end(img) - 65536 < os.path.getsize(img) <= written_end(img)
    assert_clean(img)
    for i in range(50):
        out = qemu_io(img, "read -P %d %d 4096" % (i + 100, i * 7 * MiB + 3 * MiB))
        assert "verification failed" not in out.lower(), out


@pytest.mark.parametrize("tail", ["data", "long-hole"])
def test_unreferenced_tail_not_ours_is_kept(start_daemon, shm, tail):
    """Only a tail bexd could have grown is cut at open: one holding data,
    or a hole longer than one grow step, stays as it was."""
    img = os.path.join(shm, "t.qcow2")
    qemu_img("create", "-f", "qcow2", img, "64M")
    qemu_io(img, "write -P 7 1M 64k")
    size = os.path.getsize(img)
    with open(img, "r+b") as f:
        if tail == "data":
            f.seek(size)
            f.write(b"\x5a" * (2 * MiB))
        else:
            f.truncate(size + 256 * MiB)
    before = os.path.getsize(img)
    d, uri = serve(start_daemon, "bexd", img, shm, writable=True)
    assert os.path.getsize(img) == before
    d.stop()
    res = subprocess.run(["qemu-img", "check", img], capture_output=True,
                         text=True, errors="replace")
    assert res.returncode == 0, res.stdout


def test_flush_persists_metadata_for_a_second_reader(start_daemon, shm):
    """After FLUSH, qemu-img sees what was written, with the daemon still up."""
    img = os.path.join(shm, "w.qcow2")
    qemu_img("create", "-f", "qcow2", img, "8M")
    d, uri = serve(start_daemon, "bexd", img, shm, writable=True)
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x42" * 65536, 3 * MiB)
    h.flush()
    out = subprocess.run(["qemu-io", "-r", "-U", "-c", "read -P 0x42 3M 64k", img],
                         stdout=subprocess.PIPE).stdout.decode(errors="replace")
    assert "read 65536/65536" in out and "Pattern verification failed" not in out
    h.shutdown()


# ---- queries ----

def strip_node(info):
    info = dict(info)
    info.pop("node-name", None)
    img = dict(info["image"])
    img.pop("actual-size", None)
    bi = img.get("backing-image")
    if bi:
        bi = dict(bi)
        bi.pop("actual-size", None)
        img["backing-image"] = bi
    info["image"] = img
    return info


def test_query_named_block_nodes_matches_qsd(start_daemon, shm):
    if not shutil.which("qemu-storage-daemon"):
        pytest.skip("no qemu-storage-daemon")
    img = build_case(shm, "chain2")
    got = {}
    for impl in ("bexd", "qsd"):
        d = start_daemon(impl, *blockdev(img))
        nodes = d.qmp().execute("query-named-block-nodes")
        got[impl] = sorted((strip_node(n) for n in nodes if n["drv"] == "qcow2"),
                           key=lambda n: n["image"]["filename"])
        d.stop()
    assert got["bexd"] == got["qsd"]


@pytest.mark.parametrize("opts,msg", [
    ("cache-size=1000,l2-cache-size=1000,refcount-cache-size=1000",
     "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"),
    ("l2-cache-entry-size=1000",
     "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"),
    ("cache-size=100000,l2-cache-size=200000", "l2-cache-size may not exceed cache-size"),
    ("cache-clean-interval=-1", "Cache clean interval too big"),
    ("overlap-check=foo", "Parameter 'overlap-check' does not accept value 'foo'"),
    ("encrypt.format=luks", "No encryption in image header, but options specified format 'luks'"),
])
def test_bad_options(impl, shm, opts, msg):
    img = os.path.join(shm, "a.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1M")
    args = ["--blockdev", "driver=file,node-name=f0,filename=%s" % img,
            "--blockdev", "driver=qcow2,node-name=q0,file=f0," + opts]
    rc, err = run_daemon_expect_fail(impl, args)
    assert rc != 0
    assert msg in err


def test_lazy_refcounts_need_v3(impl, shm):
    img = os.path.join(shm, "a.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", img, "1M")
    rc, err = run_daemon_expect_fail(impl, ["--blockdev", "driver=file,node-name=f0,filename=" + img,
                                            "--blockdev", "driver=qcow2,node-name=q0,file=f0,"
                                            "lazy-refcounts=on"])
    assert rc != 0
    assert ("Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
            in err)


def test_backing_null_and_by_name(impl, start_daemon, shm):
    img = build_case(shm, "chain2")
    base = os.path.join(shm, "layer0.qcow2")
    d = start_daemon(impl)
    q = d.qmp()
    q.execute("blockdev-add", driver="file", node_name="bf", filename=base, read_only=True)
    q.execute("blockdev-add", driver="qcow2", node_name="b", file="bf", read_only=True)
    q.execute("blockdev-add", driver="file", node_name="tf", filename=img, read_only=True)
    q.execute("blockdev-add", driver="qcow2", node_name="t", file="tf", backing="b",
              read_only=True)
    q.execute("blockdev-add", driver="file", node_name="nf", filename=img, read_only=True)
    q.execute("blockdev-add", driver="qcow2", node_name="n", file="nf", backing=None,
              read_only=True)
    nodes = {n["node-name"]: n for n in q.execute("query-named-block-nodes")}
    assert nodes["t"]["backing_file_depth"] == 1
    assert nodes["n"]["backing_file_depth"] == 0
    e = q.error("blockdev-del", node_name="b")
    assert e["class"] == "GenericError"


# ---- hostile images ----

CS = 65536

HOSTILE_OPEN = [
    ("magic", dict(magic=0x12345678), "Image is not in qcow2 format"),
    ("version", dict(version=4), "Unsupported qcow2 version 4"),
    ("incompat", dict(incompat=1 << 20),
     "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000"),
    ("l1-huge", dict(l1_size=0x10000000), "Active L1 table too large"),
    ("reftable-huge", dict(reftable_clusters=0x1000000), "Reference count table too large"),
    ("ext-long", dict(ext=b"\x12\x34\x56\x78\x00\x10\x00\x00"), "Header extension too large"),
    # the end marker's length is checked too (found by test-qcow2-open's model)
    ("ext-end-long", dict(ext=b"\x00\x00\x00\x00\x00\x10\x00\x00"),
     "Header extension too large"),
    # with no snapshots too (qcow2_validate_table)
    ("snapshot-offset", dict(snapshots_offset=512), "Snapshot table offset invalid"),
    ("snapshot-bomb", dict(nb_snapshots=1000000, snapshots_offset=CS),
     "Snapshot table too large"),
]


@pytest.mark.parametrize("name,kw,msg", HOSTILE_OPEN, ids=[c[0] for c in HOSTILE_OPEN])
def test_hostile_image_refused_at_open(impl, start_daemon, shm, name, kw, msg):
    img = os.path.join(shm, "h.qcow2")
    make_qcow2(img, **kw)
    d = start_daemon(impl)
    q = d.qmp()
    q.execute("blockdev-add", driver="file", node_name="f0", filename=img)
    e = q.error("blockdev-add", driver="qcow2", node_name="q0", file="f0")
    assert e["class"] == "GenericError"
    assert msg in e["desc"]
    assert q.execute("query-named-block-nodes")          # still serving


def test_backing_loop_and_deep_chain_refused(start_daemon, shm):
    a, b = os.path.join(shm, "a.qcow2"), os.path.join(shm, "b.qcow2")
    make_qcow2(a, backing="b.qcow2", backing_fmt="qcow2")
    make_qcow2(b, backing="a.qcow2", backing_fmt="qcow2")
    d = start_daemon("bexd")
    q = d.qmp()
    q.execute("blockdev-add", driver="file", node_name="f0", filename=a)
    e = q.error("blockdev-add", driver="qcow2", node_name="q0", file="f0", read_only=True)
    assert "loops" in e["desc"]
    # 300 images, each the backing file of the previous one
    for i in range(300):
        make_qcow2(os.path.join(shm, "d%d.qcow2" % i),
                   backing=("d%d.qcow2" % (i + 1)) if i < 299 else None,
                   backing_fmt="qcow2" if i < 299 else None)
    q.execute("blockdev-add", driver="file", node_name="f1", filename=os.path.join(shm, "d0.qcow2"))
    e = q.error("blockdev-add", driver="qcow2", node_name="q1", file="f1", read_only=True)
    assert "deeper than 256 images" in e["desc"]
    assert len(q.execute("query-named-block-nodes")) == 2   # nothing of the chains is left


def events(q, name):
    return [e for e in q.events if e["event"] == name]


def test_unaligned_l2_entry_is_eio_and_marks_corrupt(impl, start_daemon, shm):
    img = os.path.join(shm, "h.qcow2")
    make_qcow2(img, l2=[(5 * CS + 512) | (1 << 63)], data=b"\x42" * CS)
    d, uri = serve(start_daemon, impl, img, shm, writable=True)
    q = d.qmp()
    h = nbd.NBD()
    h.connect_uri(uri)
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    ev = q.wait_event("BLOCK_IMAGE_CORRUPTED")
    if impl == "qsd":
        return              # QEMU makes the whole node unusable; bexd goes on reading
    assert h.pread(4096, CS) == b"\0" * 4096           # other clusters still read
    assert ev["data"]["fatal"] is True
    assert ev["data"]["node-name"] == "q0"
    assert "unaligned" in ev["data"]["msg"]
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 4096, 2 * CS)                  # no write after corruption
    h.shutdown()
    d.stop()
    with open(img, "rb") as f:
        f.seek(72)
        incompat = int.from_bytes(f.read(8), "big")
    assert incompat & 2                                 # the corrupt bit is on disk


def test_write_into_metadata_is_prevented(impl, start_daemon, shm):
    img = os.path.join(shm, "h.qcow2")
    make_qcow2(img, l2=[(1 * CS) | (1 << 63)])          # guest cluster 0 -> the L1 table
    with open(img, "rb") as f:
        before = f.read()
    d, uri = serve(start_daemon, impl, img, shm, writable=True)
    q = d.qmp()
    h = nbd.NBD()
    h.connect_uri(uri)
    with pytest.raises(nbd.Error):
        h.pwrite(b"\xff" * 4096, 0)
    ev = q.wait_event("BLOCK_IMAGE_CORRUPTED")
    assert ev["data"]["msg"] == ("Preventing invalid write on metadata "
                                 "(overlaps with active L1 table)")
    assert ev["data"]["fatal"] is True
    h.shutdown()
    d.stop()
    with open(img, "rb") as f:
        after = f.read()
    assert after[CS:2 * CS] == before[CS:2 * CS]       # the L1 table is intact


def test_bad_compressed_cluster_is_eio(impl, start_daemon, shm):
    img = os.path.join(shm, "h.qcow2")
    # a "compressed" cluster of garbage, two sectors long
    make_qcow2(img, l2=[(1 << 62) | (5 * CS) | (1 << 54)], data=b"\x99" * CS)
    d, uri = serve(start_daemon, impl, img, shm)
    h = nbd.NBD()
    h.connect_uri(uri)
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    if impl == "bexd":                  # qemu-storage-daemon drops the connection
        assert h.pread(4096, CS) == b"\0" * 4096
        h.shutdown()


def test_l2_entry_past_end_of_file_reads_zeros(impl, start_daemon, shm):
    img = os.path.join(shm, "h.qcow2")
    make_qcow2(img, l2=[(1000 * CS) | (1 << 63)])
    d, uri = serve(start_daemon, impl, img, shm)
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.pread(CS, 0) == b"\0" * CS
    h.shutdown()


def test_encrypted_image_refused(start_daemon, shm):
    img = os.path.join(shm, "e.qcow2")
    # qemu-img times PBKDF by its thread's CPU clock; starved (a fresh-root
    # run at nice 15 beside another suite) it gives up with "Unable to get
    # accurate CPU usage": that one error of qemu-img's is tried again
    args = ["qemu-img", "create", "-f", "qcow2", "--object", "secret,id=s0,data=abc",
            "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", img, "1M"]
    for _ in range(5):
        r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        if r.returncode == 0 or b"Unable to get accurate CPU usage" not in r.stderr:
            break
    assert r.returncode == 0, tool_text(r.stderr)
    rc, err = run_daemon_expect_fail("bexd", ["--blockdev", "driver=file,node-name=f0,filename=" + img,
                                              "--blockdev", "driver=qcow2,node-name=q0,file=f0"])
    assert rc != 0
    assert "Encrypted qcow2 images (luks) are not supported" in err


def test_corrupt_image_opens_read_only_only(impl, start_daemon, shm):
    img = os.path.join(shm, "c.qcow2")
    make_qcow2(img, incompat=2)
    rc, err = run_daemon_expect_fail(impl, ["--blockdev", "driver=file,node-name=f0,filename=" + img,
                                            "--blockdev", "driver=qcow2,node-name=q0,file=f0"])
    assert rc != 0
    assert "qcow2: Image is corrupt; cannot be opened read/write" in err
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=%s,read-only=on" % img,
                     "--blockdev", "driver=qcow2,node-name=q0,file=f0,read-only=on")
    info = [n for n in d.qmp().execute("query-named-block-nodes") if n["node-name"] == "q0"][0]
    assert info["image"]["format-specific"]["data"]["corrupt"] is True


def test_dirty_image_is_repaired_on_open(impl, start_daemon, shm):
    """A QEMU process using lazy refcounts died: refcounts are stale and the
    dirty bit is set.  Opening read-write repairs them, as QEMU does."""
    img = os.path.join(shm, "lazy.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", img, "16M")
    subprocess.run(["qemu-io", "-c", "write -P 0x77 0 3M", "-c", "write -P 0x78 9M 1M",
                    "-c", "abort", img], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(img, "rb") as f:
        f.seek(72)
        assert int.from_bytes(f.read(8), "big") & 1      # dirty
    d, uri = serve(start_daemon, impl, img, shm, writable=True)
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x79" * MiB, 5 * MiB)
    assert h.pread(4096, 9 * MiB) == b"\x78" * 4096
    h.flush()
    h.shutdown()
    d.stop()
    assert_clean(img)
    out = qemu_io(img, "read -P 0x77 0 3M", "read -P 0x78 9M 1M", "read -P 0x79 5M 1M")
    assert "Pattern verification failed" not in out
    with open(img, "rb") as f:
        f.seek(72)
        assert not int.from_bytes(f.read(8), "big") & 1  # clean again


# ---- image growth on a block device (issue 11) ----

@pytest.fixture
def loop_device():
    """A 16 MiB loop device over a file in /var/tmp (root and the loop
    driver are needed: without them the test skips, a missing kernel
    feature)."""
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control") or not shutil.which("losetup"):
        pytest.skip("no loop devices here (needs root, /dev/loop-control and losetup)")
    fd, backing = tempfile.mkstemp(prefix="bxloop", dir="/var/tmp")
    os.ftruncate(fd, 16 * MiB)
    os.close(fd)
    r = subprocess.run(["losetup", "-f", "--show", backing], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30)
    if r.returncode != 0:
        os.unlink(backing)
        pytest.skip("losetup failed: %s" % tool_text(r.stderr).strip())
    dev = tool_text(r.stdout).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], timeout=30)
        os.unlink(backing)


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_host_device_image_grows_until_the_device_is_full(impl, start_daemon, shm,
                                                          loop_device, direct):
    """qcow2 on a block device (host_device): allocating writes place new
    clusters further into the device, block_resize grows the virtual size,
    and once the device is full an allocating write fails with ENOSPC
    (each of its sectors old or new data), while writes into clusters
    already allocated go on.
    Afterwards `qemu-img check` finds no error and no leak, the image ends
    inside the device, and it holds exactly the writes that succeeded."""
    dev = loop_device
    qemu_img("create", "-f", "qcow2", dev, str(24 * MiB))      # virtual size > device
    extra = ",cache.direct=on" if direct else ""
    sock = os.path.join(shm, "nbd.sock")
    d = start_daemon(impl,
                     "--blockdev", "driver=host_device,node-name=f0,filename=%s%s" % (dev, extra),
                     "--blockdev", "driver=qcow2,node-name=q0,file=f0%s" % extra,
                     "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                     "--export", "type=nbd,id=e0,node-name=q0,name=q0,writable=on")
    uri = "nbd+unix:///q0?socket=%s" % sock
    size = 40 * MiB
    mirror = bytearray(size)
    rnd = random.Random(11)
    slot = 128 * 1024
    slots = list(range(size // slot))
    rnd.shuffle(slots)
    first = [s for s in slots if s * slot < 24 * MiB][:40]

    done = []

    def in_slot(s):
        off = s * slot + rnd.choice([0, 512, 4096, 65536 - 512])
        return off, min(rnd.choice([4096, 65536, 100 * 1024]), (s + 1) * slot - off)

    def write(h, where, n, flags=0):
        off, ln = where
        data = bytes([(n % 254) + 1]) * ln
        try:
            h.pwrite(data, off, flags)
        except nbd.Error as e:
            assert e.errnum == errno.ENOSPC, e
            # a write over several clusters may have placed the ones that
            # fitted (both daemons do): each sector is old or new, never other
            got = h.pread(ln, off)
            for i in range(0, ln, 512):
                assert got[i:i + 512] in (bytes(mirror[off + i:off + i + 512]),
                                          data[i:i + 512]), "sector %d" % (off + i)
            mirror[off:off + ln] = got
            return False
        mirror[off:off + ln] = data
        done.append((off, ln))
        return True

    h = nbd.NBD()
    h.connect_uri(uri)
    for n, s in enumerate(first):                 # 40 slots: fits in the device
        assert write(h, in_slot(s), n, nbd.CMD_FLAG_FUA if n % 7 == 0 else 0)
    h.flush()
    h.shutdown()
    q = d.qmp()                                   # an NBD export does not share resize
    q.execute("block-export-del", id="e0")
    q.wait_event("BLOCK_EXPORT_DELETED")
    q.execute("block_resize", node_name="q0", size=size)
    q.execute("block-export-add", type="nbd", id="e0", node_name="q0", name="q0",
              writable=True)
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.get_size() == size
    rest = [s for s in slots if s not in first]
    results = [write(h, in_slot(s), 100 + n) for n, s in enumerate(rest)]   # 280 slots: no room
    assert results[0] and not results[-1], "the device never filled up"
    for n, where in enumerate(done[:10]):         # allocated clusters stay writable
        assert write(h, where, 200 + n)
    h.flush()
    got = bytearray()
    for off in range(0, size, MiB):
        got += h.pread(MiB, off)
    assert first_difference(bytes(got), bytes(mirror)) is None
    h.shutdown()
    d.stop()
    assert_clean(dev)
    assert written_end(dev) <= 16 * MiB
    ref = os.path.join(shm, "mirror.raw")
    with open(ref, "wb") as f:
        f.write(mirror)
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", dev, ref],
                       stdout=subprocess.PIPE)
    assert r.returncode == 0, tool_text(r.stdout)


def test_allocating_writes_in_an_iothread(impl, start_daemon, shm):
    """Allocating writes (qcow2's slow path: a coroutine and a request
    context per write) from an export in an iothread, 32 at once; the data
    reads back, the image is clean, and the daemon ends cleanly.  The
    iothread pooled its coroutines and request contexts in thread-local
    storage and lost them when it ended at shutdown: LeakSanitizer made
    bexd exit 1."""
    img = os.path.join(shm, "w.qcow2")
    qemu_img("create", "-f", "qcow2", img, str(16 * MiB))
    sock = os.path.join(shm, "nbd.sock")
    d = start_daemon(impl, "--object", "iothread,id=io0", *blockdev(img),
                     "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                     "--export", "type=nbd,id=e0,node-name=q0,name=q0,writable=on,iothread=io0")
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///q0?socket=%s" % sock)
    mirror = bytearray(16 * MiB)
    cookies = []
    for n in range(32):
        off = n * 512 * 1024 + (n % 3) * 4096
        data = bytes([n + 1]) * (100 * 1024)
        mirror[off:off + len(data)] = data
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    h.flush()
    got = b"".join(h.pread(MiB, off) for off in range(0, 16 * MiB, MiB))
    assert first_difference(got, bytes(mirror)) is None
    h.shutdown()                                  # the only client leaves
    xfail_if_reference_died(d, "aborted when a client left an iothread NBD export")
    d.stop()
    assert_clean(img)
