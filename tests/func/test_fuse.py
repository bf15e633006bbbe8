"""FUSE export: the block node as a regular file at a mount point.

Each scenario runs against bexd and qemu-storage-daemon 7.2 (the `impl`
parametrisation) and asserts the same bytes, sizes and errnos from both,
except where bexd deliberately differs (noted in the test).  Every mount is
undone in teardown, even when a test fails or a daemon was killed.
"""
import ctypes
import errno
import json
import os
import signal
import subprocess

import pytest

from conftest import QMPError, run_daemon_expect_fail, IMPLS, tool_text, tool_json

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd, mode, offset, length):
    """fallocate(2); returns 0 or the errno."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno()


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def unmount_all(path):
    # a killed daemon leaves a dead mount; fusermount3 -u removes it
    for _ in range(4):
        if not mounted(path):
            return
        subprocess.run(["fusermount3", "-u", "-z", path],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


class Fuse:
    """A daemon exporting one image file through FUSE at self.mnt."""

    def __init__(self, start_daemon, impl, tmpdir, img, export_opts="writable=on",
                 blockdev_opts="", extra=()):
        self.impl = impl
        self.img = img
        self.mnt = os.path.join(tmpdir, "mnt-%s" % impl)
        if not os.path.exists(self.mnt):
            open(self.mnt, "w").close()
        bd = "driver=file,node-name=d,filename=%s" % img
        if blockdev_opts:
            bd += "," + blockdev_opts
        exp = "type=fuse,id=f,node-name=d,mountpoint=%s" % self.mnt
        if export_opts:
            exp += "," + export_opts
        self.daemon = start_daemon(impl, *extra, "--blockdev", bd, "--export", exp)
        assert mounted(self.mnt)

    def qmp(self):
        return self.daemon.qmp()

    def open(self, flags=os.O_RDWR):
        return os.open(self.mnt, flags)


@pytest.fixture
def fuse(start_daemon, tmpdir_short):
    """fuse(impl, img, export_opts=..., blockdev_opts=...) -> Fuse."""
    made = []

    def make(impl, img, **kw):
        f = Fuse(start_daemon, impl, tmpdir_short, img, **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.daemon.stop()
        unmount_all(f.mnt)


@pytest.fixture
def mountpoint_cleanup():
    paths = []
    yield paths.append
    for p in paths:
        unmount_all(p)


def random_bytes(n, seed=1):
    import random
    return random.Random(seed).randbytes(n)


def read_file(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


# ---- data path ----

def test_cp_cmp(impl, fuse, image, tmpdir_short):
    data = random_bytes(4 * MiB)
    img = image(16 * MiB)
    src = os.path.join(tmpdir_short, "src")
    with open(src, "wb") as f:
        f.write(data)
    fx = fuse(impl, img)
    assert os.stat(fx.mnt).st_size == 16 * MiB
    subprocess.run(["cp", src, fx.mnt], check=True)
    # O_TRUNC does not shrink the export: the file keeps its size
    assert os.stat(fx.mnt).st_size == 16 * MiB
    assert subprocess.run(["cmp", "-n", str(4 * MiB), src, fx.mnt]).returncode == 0
    assert read_file(img, 0, 4 * MiB) == data
    assert read_file(fx.mnt, 4 * MiB) == bytes(12 * MiB)


def test_dd_fsync(impl, fuse, image, tmpdir_short):
    data = random_bytes(2 * MiB, seed=2)
    img = image(8 * MiB)
    src = os.path.join(tmpdir_short, "src")
    with open(src, "wb") as f:
        f.write(data)
    fx = fuse(impl, img)
    subprocess.run(["dd", "if=" + src, "of=" + fx.mnt, "bs=64k", "seek=16",
                    "conv=fsync,notrunc", "status=none"], check=True)
    assert read_file(img, MiB, 2 * MiB) == data
    assert read_file(fx.mnt, MiB, 2 * MiB) == data
    assert read_file(fx.mnt, 0, MiB) == bytes(MiB)


def test_direct_io(impl, fuse, image):
    img = image(4 * MiB, data=random_bytes(4 * MiB, seed=3))
    fx = fuse(impl, img)
    fd = os.open(fx.mnt, os.O_RDWR | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, 65536)
        buf.write(b"\xa5" * 65536)
        assert os.pwritev(fd, [buf], 65536) == 65536
        rbuf = mmap.mmap(-1, 65536)
        assert os.preadv(fd, [rbuf], 65536) == 65536
        assert bytes(rbuf) == b"\xa5" * 65536
    finally:
        os.close(fd)
    assert read_file(img, 65536, 65536) == b"\xa5" * 65536


def test_qemu_img(impl, fuse, image, tmpdir_short):
    img = image(8 * MiB, data=random_bytes(3 * MiB, seed=4))
    fx = fuse(impl, img, export_opts="writable=off")
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", "-f", "raw", "-U", fx.mnt],
        check=True, stdout=subprocess.PIPE).stdout)
    assert info["virtual-size"] == 8 * MiB
    assert info["format"] == "raw"
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", fx.mnt, img],
                       stdout=subprocess.PIPE)
    assert r.returncode == 0, r.stdout
    out = os.path.join(tmpdir_short, "out.img")
    subprocess.run(["qemu-img", "convert", "-U", "-f", "raw", "-O", "raw", fx.mnt, out],
                   check=True)
    assert read_file(out) == read_file(img)


def test_read_at_and_past_eof(impl, fuse, image):
    img = image(MiB, data=random_bytes(MiB, seed=5))
    fx = fuse(impl, img, export_opts="writable=off")
    fd = fx.open(os.O_RDONLY)
    try:
        assert os.pread(fd, 100, MiB - 10) == read_file(img, MiB - 10)
        assert os.pread(fd, 100, MiB) == b""
        assert os.pread(fd, 100, 4 * MiB) == b""
    finally:
        os.close(fd)


def test_unaligned_on_o_direct_node(impl, fuse, image):
    # cache.direct=on: the node takes only aligned requests, the application
    # still reads and writes any byte range (read-modify-write underneath)
    base = random_bytes(MiB, seed=9)
    img = image(MiB, data=base)
    fx = fuse(impl, img, blockdev_opts="cache.direct=on")
    model = bytearray(base)
    fd = fx.open()
    try:
        for off, n in ((10, 100), (4000, 5000), (4095, 1), (65536 - 7, 14),
                       (MiB - 3, 3), (8192, 4096), (12345, 70000)):
            data = random_bytes(n, seed=off)
            assert os.pwrite(fd, data, off) == n
            model[off:off + n] = data
            assert os.pread(fd, n + 20, max(off - 10, 0)) == \
                bytes(model[max(off - 10, 0):off + n + 10])
    finally:
        os.close(fd)
    assert read_file(img) == bytes(model)
    # O_DIRECT on the FUSE file: unaligned reads reach the export as they are
    fd = os.open(fx.mnt, os.O_RDONLY | os.O_DIRECT)
    try:
        for off, n in ((10, 100), (4000, 5000), (MiB - 3, 3), (777, 300000)):
            assert os.pread(fd, n, off) == bytes(model[off:off + n])
    finally:
        os.close(fd)


# ---- size changes ----

def test_write_past_end_not_growable(impl, fuse, image):
    img = image(MiB)
    fx = fuse(impl, img)
    fd = fx.open()
    try:
        assert os.pwrite(fd, b"abcd", MiB - 2) == 2          # cut short at EOF
        assert errno_of(os.pwrite, fd, b"abcd", MiB) == errno.EIO
        assert errno_of(os.pwrite, fd, b"abcd", MiB + 4096) == errno.EIO
        assert errno_of(os.pwrite, fd, b"abcd", (1 << 63) - 2) == errno.EINVAL
        assert os.fstat(fd).st_size == MiB
    finally:
        os.close(fd)
    assert os.path.getsize(img) == MiB
    assert read_file(img, MiB - 2) == b"ab"


def test_growable(impl, fuse, image):
    img = image(MiB)
    fx = fuse(impl, img, export_opts="writable=on,growable=on")
    fd = fx.open()
    block = random_bytes(4096, seed=6)
    try:
        assert os.pwrite(fd, block, 2 * MiB) == 4096
        assert os.fstat(fd).st_size == 2 * MiB + 4096
        assert os.pread(fd, 4096, 2 * MiB) == block
        assert os.pread(fd, 4096, MiB) == bytes(4096)        # the gap reads zeroes
        assert errno_of(os.pwrite, fd, b"abcd", 1 << 62) == errno.EFBIG
    finally:
        os.close(fd)
    assert os.path.getsize(img) == 2 * MiB + 4096
    assert read_file(img, 2 * MiB) == block


def test_truncate(impl, fuse, image):
    # QEMU 7.2 resizes any writable export (growable or not), shrinking too
    img = image(MiB, data=b"x" * MiB)
    fx = fuse(impl, img)
    os.truncate(fx.mnt, 3 * MiB)
    assert os.stat(fx.mnt).st_size == 3 * MiB
    assert os.path.getsize(img) == 3 * MiB
    assert read_file(fx.mnt, MiB - 1, 2) == b"x\0"
    os.truncate(fx.mnt, 512 * 1024)
    assert os.stat(fx.mnt).st_size == 512 * 1024
    assert os.path.getsize(img) == 512 * 1024


def test_read_only(impl, fuse, image):
    img = image(MiB, data=b"r" * MiB)
    fx = fuse(impl, img, export_opts="writable=off")
    st = os.stat(fx.mnt)
    assert st.st_mode & 0o777 == 0o400
    assert st.st_uid == os.getuid()
    fd = fx.open(os.O_RDWR)   # root passes the permission check; the write fails
    try:
        assert errno_of(os.pwrite, fd, b"w", 0) == errno.EACCES
        assert errno_of(os.ftruncate, fd, 4096) == errno.EACCES
        assert fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096) == errno.EACCES
        assert errno_of(os.chmod, fx.mnt, 0o600) == errno.EROFS
    finally:
        os.close(fd)
    assert read_file(img, 0, 1) == b"r"


def test_writable_mode(impl, fuse, image):
    fx = fuse(impl, image(MiB))
    st = os.stat(fx.mnt)
    assert st.st_mode & 0o777 == 0o600
    assert st.st_size == MiB


# ---- fallocate and holes ----

def seek(fd, off, whence):
    try:
        return os.lseek(fd, off, whence)
    except OSError as e:
        return -e.errno


def test_punch_hole(impl, fuse, image):
    img = image(4 * MiB, data=random_bytes(4 * MiB, seed=7))
    fx = fuse(impl, img, blockdev_opts="discard=unmap")
    subprocess.run(["fallocate", "--punch-hole", "-o", str(MiB), "-l", str(MiB), fx.mnt],
                   check=True)
    assert os.stat(fx.mnt).st_size == 4 * MiB
    assert read_file(fx.mnt, MiB, MiB) == bytes(MiB)
    fd = fx.open(os.O_RDONLY)
    try:
        assert seek(fd, 0, os.SEEK_HOLE) == MiB
        assert seek(fd, MiB, os.SEEK_DATA) == 2 * MiB
        assert seek(fd, 3 * MiB, os.SEEK_HOLE) == 4 * MiB   # EOF is a hole
        assert seek(fd, 4 * MiB, os.SEEK_DATA) == -errno.ENXIO
    finally:
        os.close(fd)
    m = json.loads(subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "raw", fx.mnt],
                                  check=True, stdout=subprocess.PIPE).stdout)
    holes = [(e["start"], e["length"]) for e in m if not e["data"]]
    assert holes == [(MiB, MiB)]
    # the hole reached the image file itself
    with open(img, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == MiB


def test_seek_sparse(impl, fuse, image):
    img = image(8 * MiB)
    with open(img, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"d" * 65536)
    fx = fuse(impl, img, export_opts="writable=off")
    fd = fx.open(os.O_RDONLY)
    try:
        got = [seek(fd, 0, os.SEEK_DATA), seek(fd, 2 * MiB, os.SEEK_HOLE),
               seek(fd, 8 * MiB, os.SEEK_HOLE), seek(fd, 8 * MiB + 1, os.SEEK_HOLE),
               seek(fd, 3 * MiB, os.SEEK_DATA)]
    finally:
        os.close(fd)
    assert got == [2 * MiB, 2 * MiB + 65536, 8 * MiB, -errno.ENXIO, -errno.ENXIO]


def test_fallocate_modes(impl, fuse, image):
    img = image(MiB, data=b"z" * MiB)
    fx = fuse(impl, img)
    fd = fx.open()
    try:
        assert fallocate(fd, 0, 4096, 4096) == errno.EOPNOTSUPP       # inside: cannot
        assert fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 4096) == errno.EOPNOTSUPP
        assert fallocate(fd, FALLOC_FL_ZERO_RANGE, 8192, 4096) == 0
        assert os.pread(fd, 4098, 8191) == b"z" + bytes(4096) + b"z"
        assert fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, MiB - 4096, 8192) == 0
        assert os.fstat(fd).st_size == MiB
        assert fallocate(fd, 0, MiB, 65536) == 0                      # at EOF: grows
        assert os.fstat(fd).st_size == MiB + 65536
        assert fallocate(fd, FALLOC_FL_ZERO_RANGE, MiB + 65536, 4096) == 0   # grows too
        assert os.fstat(fd).st_size == MiB + 65536 + 4096
    finally:
        os.close(fd)
    assert os.path.getsize(img) == MiB + 65536 + 4096


def test_statfs(impl, fuse, image):
    fx = fuse(impl, image(MiB))
    st = os.statvfs(fx.mnt)
    assert st.f_namemax == 255


# ---- options ----

@pytest.mark.parametrize("allow_other,expect", [("on", True), ("off", False), ("auto", True)])
def test_allow_other(impl, fuse, image, allow_other, expect):
    fx = fuse(impl, image(MiB), export_opts="allow-other=" + allow_other)
    with open("/proc/self/mountinfo") as f:
        line = [l for l in f if l.split()[4] == fx.mnt][0]
    assert ("allow_other" in line) == expect


def test_iothread(impl, fuse, image):
    img = image(MiB)
    fx = fuse(impl, img, export_opts="writable=on,iothread=io0",
              extra=("--object", "iothread,id=io0"))
    fd = fx.open()
    try:
        assert os.pwrite(fd, b"iothread", 4096) == 8
        os.fsync(fd)
        assert os.pread(fd, 8, 4096) == b"iothread"
    finally:
        os.close(fd)
    assert read_file(img, 4096, 8) == b"iothread"


def test_iothread_growable(impl, fuse, image):
    # resizes run in the main thread: the request hops there and back
    img = image(MiB)
    fx = fuse(impl, img, export_opts="writable=on,growable=on,iothread=io0",
              extra=("--object", "iothread,id=io0"))
    fd = fx.open()
    block = random_bytes(8192, seed=8)
    try:
        assert os.pwrite(fd, block, 3 * MiB) == 8192
        assert os.fstat(fd).st_size == 3 * MiB + 8192
        os.ftruncate(fd, 2 * MiB)
        assert os.fstat(fd).st_size == 2 * MiB
        assert os.pread(fd, 4096, 2 * MiB - 4096) == bytes(4096)
    finally:
        os.close(fd)
    assert os.path.getsize(img) == 2 * MiB


def test_many_in_flight(impl, fuse, image, tmpdir_short):
    # libaio with a deep queue: many requests in flight at once, verified
    img = image(32 * MiB)
    fx = fuse(impl, img)
    r = subprocess.run(["fio", "--name=v", "--filename=" + fx.mnt, "--rw=randwrite",
                        "--bs=16k", "--ioengine=libaio", "--iodepth=32", "--direct=1",
                        "--size=32M", "--verify=crc32c", "--verify_fatal=1",
                        "--do_verify=1", "--verify_state_save=0", "--output-format=json"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmpdir_short)
    if impl == "qsd" and r.returncode != 0:
        # qsd 7.2 serves requests from nested event-loop polls that reuse its
        # one receive buffer: concurrent writes land with the wrong payload.
        pytest.xfail("qsd 7.2 corrupts concurrent FUSE writes: " + tool_text(r.stderr)[:200])
    assert r.returncode == 0, tool_text(r.stderr)
    job = tool_json(r.stdout)["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 32 * MiB


# ---- bad input ----

def add_fuse(qmp, mnt, **kw):
    kw.setdefault("node_name", "d")
    return qmp.error("block-export-add", type="fuse", id="f2", mountpoint=mnt, **kw)


def test_bad_mountpoints(impl, start_daemon, image, tmpdir_short):
    img = image(MiB)
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=d,filename=%s" % img)
    qmp = d.qmp()
    missing = os.path.join(tmpdir_short, "missing")
    dirp = os.path.join(tmpdir_short, "dir")
    os.mkdir(dirp)
    link = os.path.join(tmpdir_short, "link")
    os.symlink(dirp, link)
    e = add_fuse(qmp, missing)
    assert e["class"] == "GenericError"
    assert e["desc"] == "Failed to stat '%s': No such file or directory" % missing
    e = add_fuse(qmp, dirp)
    assert (e["class"], e["desc"]) == ("GenericError", "'%s' is not a regular file" % dirp)
    e = add_fuse(qmp, link)
    assert (e["class"], e["desc"]) == ("GenericError", "'%s' is not a regular file" % link)
    assert qmp.execute("query-block-exports") == []


def test_bad_arguments(impl, start_daemon, image, tmpdir_short):
    img = image(MiB)
    mnt = os.path.join(tmpdir_short, "m")
    open(mnt, "w").close()
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=d,filename=%s" % img)
    qmp = d.qmp()
    e = qmp.error("block-export-add", type="fuse", id="f", node_name="d")
    assert (e["class"], e["desc"]) == ("GenericError", "Parameter 'mountpoint' is missing")
    e = add_fuse(qmp, mnt, allow_other="maybe")
    assert (e["class"], e["desc"]) == (
        "GenericError", "Parameter 'allow-other' does not accept value 'maybe'")
    e = add_fuse(qmp, mnt, growable="yes")
    assert (e["class"], e["desc"]) == (
        "GenericError", "Invalid parameter type for 'growable', expected: boolean")
    e = add_fuse(qmp, mnt, node_name="nope")
    assert e["class"] == "GenericError"
    assert not mounted(mnt)
    assert qmp.execute("query-block-exports") == []


def test_same_mountpoint_twice(impl, fuse, image):
    fx = fuse(impl, image(MiB))
    qmp = fx.qmp()
    e = add_fuse(qmp, fx.mnt)
    assert (e["class"], e["desc"]) == ("GenericError",
                                      "There already is a FUSE export on '%s'" % fx.mnt)


def test_bad_mountpoint_cmdline(impl, image, tmpdir_short):
    img = image(MiB)
    dirp = os.path.join(tmpdir_short, "dir")
    os.mkdir(dirp)
    rc, err = run_daemon_expect_fail(impl, [
        "--blockdev", "driver=file,node-name=d,filename=%s" % img,
        "--export", "type=fuse,id=f,node-name=d,mountpoint=%s" % dirp])
    assert rc == 1
    assert "'%s' is not a regular file" % dirp in err


# ---- lifecycle ----

def test_del_unmounts(impl, fuse, image):
    fx = fuse(impl, image(MiB))
    qmp = fx.qmp()
    assert [e["type"] for e in qmp.execute("query-block-exports")] == ["fuse"]
    qmp.execute("block-export-del", id="f")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    assert not mounted(fx.mnt)
    assert os.stat(fx.mnt).st_size == 0     # the shadowed file is back
    assert qmp.execute("query-block-exports") == []
    # the same mountpoint can be used again
    qmp.execute("block-export-add", type="fuse", id="f", node_name="d", mountpoint=fx.mnt)
    assert mounted(fx.mnt)


def test_sigterm_unmounts(impl, fuse, image):
    fx = fuse(impl, image(MiB))
    fx.daemon.stop(signal.SIGTERM)
    assert not mounted(fx.mnt)


def test_quit_unmounts(impl, fuse, image):
    fx = fuse(impl, image(MiB))
    qmp = fx.qmp()
    qmp.execute("quit")
    fx.daemon.wait_exit()
    assert not mounted(fx.mnt)


def test_safe_del_refused_while_open(fuse, image):
    # bexd only: qemu-storage-daemon 7.2 does not track open handles and
    # unmounts under an open file even in safe mode.
    fx = fuse("bexd", image(MiB))
    qmp = fx.qmp()
    fd = fx.open()
    try:
        e = qmp.error("block-export-del", id="f")
        assert e["class"] == "GenericError"
        assert e["desc"] == "export 'f' still in use"
        assert mounted(fx.mnt)
        assert os.pwrite(fd, b"still", 0) == 5
    finally:
        os.close(fd)


def test_safe_del_after_close(impl, fuse, image):
    # the kernel's RELEASE for a closed file may still be queued when the
    # command arrives: a closed file must not keep the export "in use"
    fx = fuse(impl, image(MiB))
    qmp = fx.qmp()
    for i in range(10):
        fd = fx.open()
        os.pwrite(fd, b"%d" % i, 0)
        os.close(fd)
        qmp.execute("block-export-del", id="f")
        qmp.wait_event("BLOCK_EXPORT_DELETED")
        assert not mounted(fx.mnt)
        qmp.execute("block-export-add", type="fuse", id="f", node_name="d",
                    mountpoint=fx.mnt, writable=True)
    assert read_file(fx.mnt, 0, 1) == b"9"


def test_hard_del_while_open(impl, fuse, image):
    img = image(MiB)
    fx = fuse(impl, img)
    qmp = fx.qmp()
    fd = fx.open()
    try:
        assert os.pwrite(fd, b"before", 0) == 6
        qmp.execute("block-export-del", id="f", mode="hard")
        qmp.wait_event("BLOCK_EXPORT_DELETED")
        assert not mounted(fx.mnt)
        # the lazily detached mount has no server any more
        assert errno_of(os.pread, fd, 4096, 8192) == errno.ENOTCONN
    finally:
        # close() flushes: that fails too once the server is gone
        assert errno_of(os.close, fd) in (0, errno.ENOTCONN)
    assert read_file(img, 0, 6) == b"before"
    assert fx.daemon.alive()


def _writers(path, n, started):
    """n threads writing 64k blocks until the export goes; returns (threads, errnos)."""
    import threading
    errs = []
    count = [0]
    lock = threading.Lock()

    def run(seed):
        fd = os.open(path, os.O_RDWR)
        block = random_bytes(65536, seed=seed)
        off = 0
        try:
            while True:
                os.pwrite(fd, block, off)
                off = (off + 65536) % (4 * MiB)
                with lock:
                    count[0] += 1
                    if count[0] == 200:
                        started.set()
        except OSError as e:
            errs.append(e.errno)
        finally:
            errno_of(os.close, fd)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, errs


@pytest.mark.parametrize("how", ["hard-del", "quit"])
def test_removal_with_io_in_flight(impl, fuse, image, how):
    import threading
    fx = fuse(impl, image(4 * MiB))
    qmp = fx.qmp()
    started = threading.Event()
    threads, errs = _writers(fx.mnt, 4, started)
    assert started.wait(30)
    if how == "hard-del":
        qmp.execute("block-export-del", id="f", mode="hard")
        qmp.wait_event("BLOCK_EXPORT_DELETED")
    else:
        qmp.execute("quit")
        fx.daemon.wait_exit()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert not mounted(fx.mnt)
    # every writer was told the server went away
    assert errs and set(errs) <= {errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV, errno.EIO}
    if how == "hard-del":
        assert fx.daemon.alive()
        assert qmp.execute("query-block-exports") == []


def test_unmounted_behind_our_back(impl, fuse, image):
    # fusermount3 -u while the daemon runs: the export notices, stays listed,
    # and can still be deleted; the daemon keeps serving QMP
    fx = fuse(impl, image(MiB))
    qmp = fx.qmp()
    subprocess.run(["fusermount3", "-u", fx.mnt], check=True)
    assert not mounted(fx.mnt)
    assert [e["id"] for e in qmp.execute("query-block-exports")] == ["f"]
    qmp.execute("block-export-del", id="f")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    assert qmp.execute("query-block-exports") == []
    assert fx.daemon.alive()


def test_stale_mount_after_kill9(impl, fuse, image, tmpdir_short, mountpoint_cleanup):
    img = image(MiB)
    fx = fuse(impl, img)
    mountpoint_cleanup(fx.mnt)
    fx.daemon.stop(signal.SIGKILL)
    assert mounted(fx.mnt)
    assert errno_of(os.stat, fx.mnt) == errno.ENOTCONN
    rc, err = run_daemon_expect_fail(impl, [
        "--blockdev", "driver=file,node-name=d,filename=%s" % img,
        "--export", "type=fuse,id=f,node-name=d,mountpoint=%s" % fx.mnt])
    assert rc == 1
    assert "Failed to stat '%s': Transport endpoint is not connected" % fx.mnt in err
    if impl == "bexd":
        assert "fusermount3 -u %s" % fx.mnt in err
    subprocess.run(["fusermount3", "-u", fx.mnt], check=True)
    assert not mounted(fx.mnt)
    assert os.stat(fx.mnt).st_size == 0
