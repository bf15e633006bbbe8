"""Helpers for the qcow2 tests: images made by qemu-img/qemu-io 7.2, and a
generator of small hand-made (possibly hostile) qcow2 files."""
import os
import random
import zlib
import shutil
import struct
import subprocess
import tempfile

import pytest
from conftest import tool_text, tool_json

MiB = 1 << 20


@pytest.fixture
def shm():
    """A scratch directory in RAM (test images are small)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = tempfile.mkdtemp(prefix="bxq", dir=base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def first_difference(a, b):
    """The first 512-byte sector where a and b differ, or None."""
    for i in range(0, min(len(a), len(b)), 512):
        if a[i:i + 512] != b[i:i + 512]:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def assert_clean(img):
    """qemu-img check finds neither corruption nor leak."""
    r = subprocess.run(["qemu-img", "check", "--output=json", img], stdout=subprocess.PIPE)
    info = tool_json(r.stdout)
    assert info.get("corruptions", 0) == 0, info
    assert info.get("leaks", 0) == 0, info
    assert r.returncode == 0, info


def nbd_random_ops(uri, mirror_path, seed, nops=100):
    """Writes (some FUA), zeroes (with and without holes), trims, flushes
    and checked reads through NBD, partial and whole clusters, unaligned
    to them; the raw mirror gets the same bytes (a trim's result is read
    back, as a trim may or may not zero)."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    rnd = random.Random(seed)
    with open(mirror_path, "r+b") as f:
        for _ in range(nops):
            op = rnd.random()
            off = rnd.randrange(0, size // 512) * 512
            ln = min(rnd.choice([512, 4096, 65536, 70 * 1024, 100 * 1024, MiB]), size - off)
            if op < 0.6:
                data = bytes([rnd.randrange(1, 255)]) * ln
                h.pwrite(data, off, nbd.CMD_FLAG_FUA if rnd.random() < 0.1 else 0)
                f.seek(off)
                f.write(data)
            elif op < 0.75:
                h.zero(ln, off, nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0)
                f.seek(off)
                f.write(b"\0" * ln)
            elif op < 0.85:
                h.trim(ln, off)
                f.seek(off)
                f.write(h.pread(ln, off))
            elif op < 0.9:
                h.flush()
            else:
                f.seek(off)
                assert h.pread(ln, off) == f.read(ln), "read at %d" % off
    h.flush()
    h.shutdown()


def run(*args):
    r = subprocess.run(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert r.returncode == 0, (args, tool_text(r.stderr))
    return tool_text(r.stdout)


def qemu_img(*args):
    return run("qemu-img", *args)


def qemu_io(img, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    out = run(*(args + [img]))
    assert "failed" not in out, out
    return out


def pattern_writes(img, size, seed, count=10, fmt="qcow2"):
    """Scattered writes of distinct patterns, some unaligned, some zero."""
    rnd = random.Random(seed)
    cmds = []
    for _ in range(count):
        off = rnd.randrange(0, size // 512) * 512
        ln = min(rnd.choice([512, 4096, 65536, 300 * 1024]), size - off)
        if rnd.random() < 0.2:
            cmds.append("write -z %d %d" % (off, ln))
        else:
            cmds.append("write -P 0x%02x %d %d" % (rnd.randrange(1, 255), off, ln))
    qemu_io(img, *cmds, fmt=fmt)


def stable_seed(name):
    """A seed of its own for each case, the same in every run (hash() of a
    str is not: Python salts it per process)."""
    return zlib.crc32(name.encode()) & 0xffff


def to_raw(img, out):
    qemu_img("convert", "-O", "raw", img, out)
    with open(out, "rb") as f:
        return f.read()


def build_case(d, case, size=4 * MiB):
    """Make the image of one test case in directory d; returns its path."""
    top = os.path.join(d, "top.qcow2")
    base = os.path.join(d, "base.qcow2")
    opts = {
        "v2": ["-o", "compat=0.10"],
        "c512": ["-o", "cluster_size=512"],
        "c2m": ["-o", "cluster_size=2M"],
        "rc1": ["-o", "refcount_bits=1"],
        "rc64": ["-o", "refcount_bits=64"],
        "extl2": ["-o", "extended_l2=on,cluster_size=64k"],
        "lazy": ["-o", "lazy_refcounts=on"],
        "prealloc-metadata": ["-o", "preallocation=metadata"],
        "prealloc-falloc": ["-o", "preallocation=falloc"],
        "prealloc-full": ["-o", "preallocation=full"],
    }
    if case in opts or case == "plain":
        qemu_img("create", "-f", "qcow2", *opts.get(case, []), top, str(size))
        pattern_writes(top, size, seed=stable_seed(case))
        return top
    if case in ("zlib", "zstd"):
        src = os.path.join(d, "src.raw")
        with open(src, "wb") as f:
            f.truncate(size)
        pattern_writes(src, size, seed=5, fmt="raw")
        extra = ["-o", "compression_type=zstd"] if case == "zstd" else []
        qemu_img("convert", "-c", "-O", "qcow2", *extra, src, top)
        os.unlink(src)
        return top
    if case in ("chain2", "chain10", "extl2-chain"):
        n = 10 if case == "chain10" else 2
        prev, prev_fmt = None, None
        for i in range(n):
            img = os.path.join(d, "layer%d.qcow2" % i)
            args = ["create", "-f", "qcow2"]
            if case == "extl2-chain":
                args += ["-o", "extended_l2=on"]
            if prev:
                args += ["-b", os.path.basename(prev), "-F", prev_fmt]
            qemu_img(*args, img, str(size))
            pattern_writes(img, size, seed=100 + i, count=6)
            prev, prev_fmt = img, "qcow2"
        return prev
    if case == "raw-backing":
        with open(base.replace(".qcow2", ".raw"), "wb") as f:
            f.truncate(size // 2)                  # shorter than the overlay: zeros past it
        pattern_writes(base.replace(".qcow2", ".raw"), size // 2, seed=7, fmt="raw")
        qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, str(size))
        pattern_writes(top, size, seed=8, count=5)
        return top
    if case in ("data-file", "data-file-raw"):
        o = "data_file=%s" % os.path.join(d, "data.raw") + \
            (",data_file_raw=on" if case == "data-file-raw" else "")
        qemu_img("create", "-f", "qcow2", "-o", o, top, str(size))
        pattern_writes(top, size, seed=9)
        return top
    raise ValueError(case)


READ_CASES = ["plain", "v2", "c512", "c2m", "rc1", "rc64", "extl2", "lazy", "zlib", "zstd",
              "prealloc-metadata", "prealloc-falloc", "prealloc-full", "raw-backing",
              "chain2", "chain10", "extl2-chain", "data-file", "data-file-raw"]


# ---- hand-made images ----

def make_qcow2(path, size=1 * MiB, cluster_bits=16, version=3, l2=None, backing=None,
               backing_fmt=None, incompat=0, ext=b"", l1_size=None, reftable_clusters=1,
               nb_snapshots=0, snapshots_offset=0, data=None, l1_entry=None, magic=0x514649fb):
    """A minimal qcow2 file: header (cluster 0), L1 (1), refcount table (2),
    refcount block (3), one L2 table (4), data clusters from 5 on."""
    cs = 1 << cluster_bits
    hdr_len = 112 if version == 3 else 72
    l2_cover = (cs // 8) * cs
    n_l1 = l1_size if l1_size is not None else max(1, (size + l2_cover - 1) // l2_cover)
    nclusters = 5 + (len(data) // cs if data else 0)
    extb = b""
    if backing_fmt:
        f = backing_fmt.encode()
        extb += struct.pack(">II", 0xe2792aca, len(f)) + f + b"\0" * ((8 - len(f) % 8) % 8)
    extb += ext + struct.pack(">II", 0, 0)
    bname = backing.encode() if backing else b""
    boff = hdr_len + len(extb) if backing else 0
    h = struct.pack(">IIQIIQIIQQIIQ", magic, version, boff, len(bname), cluster_bits, size,
                    0, n_l1, cs, 2 * cs, reftable_clusters, nb_snapshots, snapshots_offset)
    if version == 3:
        h += struct.pack(">QQQII", incompat, 0, 0, 4, hdr_len) + b"\0" * 8
    img = bytearray(cs * nclusters)
    img[0:len(h)] = h
    img[hdr_len:hdr_len + len(extb)] = extb
    if backing:
        img[boff:boff + len(bname)] = bname
    if l2 is not None:
        e = l1_entry if l1_entry is not None else (4 * cs) | (1 << 63)
        img[cs:cs + 8] = struct.pack(">Q", e)
        for i, v in enumerate(l2):
            img[4 * cs + 8 * i:4 * cs + 8 * i + 8] = struct.pack(">Q", v)
    img[2 * cs:2 * cs + 8] = struct.pack(">Q", 3 * cs)
    for c in range(nclusters):
        img[3 * cs + 2 * c:3 * cs + 2 * c + 2] = struct.pack(">H", 1)
    if data:
        img[5 * cs:5 * cs + len(data)] = data
    with open(path, "wb") as f:
        f.write(img)
