"""Fault-injection matrix (issue 13): every export type under EIO and
ENOSPC on reads, writes, flushes and discards, and under latency.

One daemon per export type and implementation serves one node per
(operation, errno): raw over blkdebug over its own image file, with the
blkdebug rule that fails that operation (QEMU 7.2's driver, so the same
graph runs on qemu-storage-daemon), plus a healthy node and a slow null-co
node (latency-ns).  Each client asks each node and must get the error in
its protocol's terms -- NBD error reply with the errno, virtio-blk
VIRTIO_BLK_S_IOERR, the errno from the FUSE syscall -- never a success
for a failed request, while the healthy node keeps being served, during
the slow requests too; the daemon stays up throughout.

Rules: read_aio arms a read rule, write_aio a write rule, flush_to_disk a
flush rule; discards raise no event in QEMU, so the discard rule is armed
by a read (read_aio) first.  NBD clients use simple replies: under
structured replies qemu-storage-daemon 7.2 drops the connection on a read
error (test_blkdebug.py checks that bexd does not).
"""
import ctypes
import errno
import json
import mmap
import os
import subprocess
import threading
import time

import pytest

import needs
from conftest import BUILD, TIMER_EARLY, tool_text

import nbd  # noqa: E402 (python3-libnbd, which scripts/deps.sh installs)

KiB = 1 << 10
MiB = 1 << 20
SIZE = 1 * MiB
LATENCY_NS = 2 * 1000 * 1000 * 1000  # 2 s per slow request: the healthy node is served meanwhile, even on a loaded machine
OPS = ["read", "write", "flush", "discard"]
ERRNOS = [errno.EIO, errno.ENOSPC]
VUB = os.environ.get("VUB_CLIENT", os.path.join(BUILD, "tests", "vhost", "vub-client"))
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR = 0, 1
T_IN, T_OUT, T_FLUSH, T_DISCARD = 0, 1, 4, 11

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


def rules(op, err):
    if op == "discard":
        # bexd's FUSE punches holes with write-zeroes (MAY_UNMAP), so that
        # they read as zeros even under discard=ignore; QEMU's discards
        return [{"event": "read_aio", "iotype": t, "errno": err}
                for t in ("discard", "write-zeroes")]
    event = {"read": "read_aio", "write": "write_aio", "flush": "flush_to_disk"}[op]
    return [{"event": event, "iotype": op, "errno": err}]


def node_names():
    return ["%s%d" % (op, err) for op in OPS for err in ERRNOS]


class Graph:
    """The daemon and its nodes; exports are added by the front-end class."""

    def __init__(self, start_daemon, impl, tmpdir, extra=()):
        self.impl = impl
        self.tmpdir = tmpdir
        self.daemon = start_daemon(impl, *extra)
        self.qmp = self.daemon.qmp()
        self.pattern = bytes(range(256)) * (SIZE // 256)
        for op in OPS:
            for err in ERRNOS:
                self.add_faulty("%s%d" % (op, err), rules(op, err))
        self.add_faulty("ok", [])
        self.qmp.execute("blockdev-add", driver="null-co", size=SIZE,
                         **{"node-name": "slow", "read-zeroes": True, "latency-ns": LATENCY_NS})

    def add_faulty(self, name, rules):
        img = os.path.join(self.tmpdir, "%s.img" % name)
        with open(img, "wb") as f:
            f.write(self.pattern)
        bd = {"driver": "blkdebug", "discard": "unmap",
              "image": {"driver": "file", "filename": img, "discard": "unmap"}}
        if rules:
            bd["inject-error"] = rules
        self.qmp.execute("blockdev-add", driver="raw", discard="unmap", file=bd,
                         **{"node-name": name})


# ---- the three front-ends: each op returns 0 or the error in its own terms ----

class NbdFront:
    expect = staticmethod(lambda err: err)

    def __init__(self, g):
        self.g = g
        self.sock = os.path.join(g.tmpdir, "nbd.sock")
        g.qmp.execute("nbd-server-start", addr={"type": "unix", "data": {"path": self.sock}})
        for n in node_names() + ["ok", "slow"]:
            g.qmp.execute("block-export-add", type="nbd", id=n, name=n, writable=True,
                          **{"node-name": n})
        self.handles = {}

    def h(self, n):
        if n not in self.handles:
            h = nbd.NBD()
            h.set_request_structured_replies(False)
            h.set_export_name(n)
            h.connect_unix(self.sock)
            self.handles[n] = h
        return self.handles[n]

    def _err(self, fn, *a):
        try:
            fn(*a)
            return 0
        except nbd.Error as e:
            return e.errnum

    def read(self, n, off=0, ln=4096):
        h = self.h(n)
        try:
            data = h.pread(ln, off)
        except nbd.Error as e:
            return e.errnum, None
        return 0, data

    def write(self, n, data, off=0):
        return self._err(self.h(n).pwrite, data, off)

    def flush(self, n):
        return self._err(self.h(n).flush)

    def discard(self, n, off=0, ln=64 * KiB):
        return self._err(self.h(n).trim, ln, off)

    def close(self):
        for h in self.handles.values():
            try:
                h.shutdown()
            except nbd.Error:
                pass


class VubFront:
    expect = staticmethod(lambda err: VIRTIO_BLK_S_IOERR)

    def __init__(self, g):
        needs.built(VUB, "vub-client")
        self.g = g
        for n in node_names() + ["ok", "slow"]:
            g.qmp.execute("block-export-add", type="vhost-user-blk", id=n, writable=True,
                          addr={"type": "unix", "path": self.path(n)}, **{"node-name": n})

    def path(self, n):
        return os.path.join(self.g.tmpdir, "v-%s.sock" % n)

    def run(self, n, *args, binary=False):
        r = subprocess.run([VUB, self.path(n)] + [str(a) for a in args],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                           env=dict(os.environ, VUB_FLAGS="0"))
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        return r

    def status(self, n, *args):
        return json.loads(tool_text(self.run(n, *args).stdout).strip().splitlines()[-1])["status"]

    def read(self, n, off=0, ln=4096):
        r = self.run(n, "read", off, ln)
        if len(r.stdout) == ln:
            return 0, r.stdout
        return json.loads(tool_text(r.stderr).strip().splitlines()[-1])["status"], None

    def write(self, n, data, off=0):
        # vub-client writes its own pattern: the data check reads it back
        return self.status(n, "write", off, len(data), 7)

    def flush(self, n):
        return self.status(n, "req", T_FLUSH, 0, 0)

    def discard(self, n, off=0, ln=64 * KiB):
        return self.status(n, "req", T_DISCARD, off // 512, ln // 512)

    def close(self):
        pass


class FuseFront:
    expect = staticmethod(lambda err: err)

    def __init__(self, g):
        self.g = g
        self.fds = {}
        self.mounts = []
        for n in node_names() + ["ok", "slow"]:
            mnt = os.path.join(g.tmpdir, "m-%s" % n)
            open(mnt, "w").close()
            g.qmp.execute("block-export-add", type="fuse", id=n, mountpoint=mnt, writable=True,
                          **{"node-name": n})
            self.mounts.append(mnt)
        self.buf = mmap.mmap(-1, 1 * MiB)

    def fd(self, n):
        if n not in self.fds:
            self.fds[n] = os.open(os.path.join(self.g.tmpdir, "m-%s" % n),
                                  os.O_RDWR | os.O_DIRECT)
        return self.fds[n]

    def read(self, n, off=0, ln=4096):
        try:
            got = os.preadv(self.fd(n), [memoryview(self.buf)[:ln]], off)
        except OSError as e:
            return e.errno, None
        return 0, bytes(self.buf[:got])

    def write(self, n, data, off=0):
        self.buf[:len(data)] = data
        try:
            os.pwritev(self.fd(n), [memoryview(self.buf)[:len(data)]], off)
        except OSError as e:
            return e.errno
        return 0

    def flush(self, n):
        try:
            os.fsync(self.fd(n))
        except OSError as e:
            return e.errno
        return 0

    def discard(self, n, off=0, ln=64 * KiB):
        if _libc.fallocate(self.fd(n), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, ln):
            return ctypes.get_errno()
        return 0

    def close(self):
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}
        for mnt in self.mounts:
            subprocess.run(["fusermount3", "-u", "-z", mnt], stderr=subprocess.DEVNULL)


FRONTS = {"nbd": NbdFront, "vhost-user-blk": VubFront, "fuse": FuseFront}


@pytest.fixture
def front(request, start_daemon, impl, tmpdir_short):
    made = []

    def make(kind):
        g = Graph(start_daemon, impl, tmpdir_short)
        f = FRONTS[kind](g)
        made.append(f)
        return g, f
    yield make
    for f in made:
        f.close()
        f.g.daemon.stop()


def check_ok_served(g, f, seed):
    """The healthy node answers reads and writes, data intact."""
    data = bytes((seed + i) % 251 for i in range(4096))
    assert f.write("ok", data, 8192) == 0
    err, back = f.read("ok", 8192, 4096)
    assert err == 0
    if not isinstance(f, VubFront):
        assert back == data
    err, back = f.read("ok", 0, 4096)
    assert (err, back) == (0, g.pattern[:4096])


@pytest.mark.parametrize("kind", ["nbd", "vhost-user-blk", "fuse"])
def test_errors_reach_the_client(front, kind):
    g, f = front(kind)
    check_ok_served(g, f, 1)
    for err in ERRNOS:
        want = f.expect(err)
        n = "read%d" % err
        assert f.read(n)[0] == want, (n, f.read(n))
        assert f.read(n, 64 * KiB, 4096)[0] == want
        check_ok_served(g, f, err)

        n = "write%d" % err
        assert f.read(n)[0] == 0                       # reads are fine here
        assert f.write(n, b"\xee" * 4096, 0) == want   # never a success
        assert f.write(n, b"\xee" * 4096, 0) == want
        check_ok_served(g, f, err + 1)

        n = "flush%d" % err
        assert f.write(n, b"\xdd" * 4096, 0) == 0
        assert f.flush(n) == want
        assert f.read(n)[0] == 0
        check_ok_served(g, f, err + 2)

        n = "discard%d" % err
        assert f.read(n)[0] == 0                       # read_aio arms the discard rule
        assert f.discard(n) == want
        assert f.write(n, b"\xcc" * 4096, 0) == 0
        check_ok_served(g, f, err + 3)
    # the failed writes left the images as they were
    for err in ERRNOS:
        with open(os.path.join(g.tmpdir, "write%d.img" % err), "rb") as img:
            assert img.read(4096) == g.pattern[:4096]
    assert g.daemon.alive()
    ids = {e["id"] for e in g.qmp.execute("query-block-exports")}
    assert ids == set(node_names()) | {"ok", "slow"}


@pytest.mark.parametrize("kind", ["nbd", "vhost-user-blk", "fuse"])
def test_latency_delays_only_its_node(front, kind):
    """Slow reads, writes and flushes complete successfully, each no sooner
    than latency-ns; meanwhile the healthy node is served."""
    g, f = front(kind)
    if kind == "nbd":
        f.h("slow"), f.h("ok")                         # connected before timing
    result = {}

    def slow():
        t0 = time.monotonic()
        result["read"] = f.read("slow", 0, 4096)[0]
        result["write"] = f.write("slow", b"\x11" * 4096, 4096)
        result["flush"] = f.flush("slow")
        result["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=slow)
    t.start()
    check_ok_served(g, f, 9)
    served_while_slow = t.is_alive()
    t.join(60)
    assert not t.is_alive()
    assert result["read"] == result["write"] == result["flush"] == 0
    # three requests one after the other, each delayed by a timer (bexd's
    # fires up to TIMER_EARLY before its time)
    assert result["elapsed"] >= 3 * (LATENCY_NS / 1e9 - TIMER_EARLY), result["elapsed"]
    assert served_while_slow, "the healthy node waited for the slow one"
    assert g.daemon.alive()
