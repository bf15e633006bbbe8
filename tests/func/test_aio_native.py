"""aio=native is Linux AIO (io_setup/io_submit), as in QEMU.

An image on a real file system is served with cache.direct=on,aio=native
over NBD; a libnbd client writes and reads it back.  The proof that Linux
AIO did the I/O is the daemon's own AIO context: io_setup maps the
context's completion ring into the process ("[aio]" in /proc/PID/maps), and
the ring's header counts completions (tail) and what user space reaped
(head).  Every NBD read and write must move the tail by one, and bexd
must have reaped them all (head == tail) when the replies arrive.  An engine that served
aio=native by io_uring or threads has no such mapping, and an io_uring
export (checked too) must not make one.

Each scenario runs against bexd and qemu-storage-daemon (`impl`).
"""
import os
import random
import struct

import pytest

import nbd  # noqa: E402 (python3-libnbd, which scripts/deps.sh installs)

from conftest import QMPError, xfail_if_reference_died

MiB = 1 << 20
SIZE = 8 * MiB
RING_MAGIC = 0xa10a10a1


def aio_rings(pid):
    """[(start, end)] of the Linux AIO rings mapped in process pid."""
    rings = []
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            if line.rstrip().endswith("[aio] (deleted)") or line.rstrip().endswith("/[aio]"):
                start, end = line.split()[0].split("-")
                rings.append((int(start, 16), int(end, 16)))
    return rings


def ring_header(pid, start):
    """(nr, head, tail) of the AIO ring mapped at start in process pid."""
    with open("/proc/%d/mem" % pid, "rb") as f:
        f.seek(start)
        _id, nr, head, tail, magic = struct.unpack("5I", f.read(20))
    assert magic == RING_MAGIC, "not an AIO ring at %#x" % start
    return nr, head, tail


class Setup:
    def __init__(self, start_daemon, impl, tmpdir, aio):
        self.img = os.path.join(tmpdir, "disk.img")
        with open(self.img, "wb") as f:
            f.truncate(SIZE)
        try:
            os.close(os.open(self.img, os.O_RDONLY | os.O_DIRECT))
        except OSError:
            pytest.skip("no O_DIRECT on %s" % tmpdir)
        self.sock = os.path.join(tmpdir, "nbd.sock")
        self.d = start_daemon(impl)
        self.qmp = self.d.qmp()
        self.aio = aio

    def add(self, iothread=None):
        self.qmp.execute("blockdev-add", driver="file", node_name="disk0", filename=self.img,
                         aio=self.aio, cache={"direct": True})
        self.qmp.execute("nbd-server-start",
                         addr={"type": "unix", "data": {"path": self.sock}})
        extra = {}
        if iothread:
            self.qmp.execute("object-add", qom_type="iothread", id=iothread)
            extra["iothread"] = iothread
        self.qmp.execute("block-export-add", type="nbd", id="exp0", node_name="disk0",
                         name="disk0", writable=True, **extra)

    def handle(self):
        h = nbd.NBD()
        h.set_export_name("disk0")
        h.connect_unix(self.sock)
        return h


@pytest.mark.parametrize("iothread", [None, "io0"])
def test_native_io_goes_through_linux_aio(start_daemon, impl, tmpdir_short, iothread):
    s = Setup(start_daemon, impl, tmpdir_short, "native")
    pid = s.d.pid
    assert aio_rings(pid) == [], "an AIO context before any aio=native node"
    s.add(iothread)
    h = s.handle()
    rng = random.Random(25)
    first = rng.randbytes(4096)
    h.pwrite(first, 0)                  # the loop's context exists by now (bexd: lazily)
    rings = aio_rings(pid)
    if impl == "bexd":
        # only the loop that serves the export makes one (QEMU also makes
        # one for the main context, where the node was opened)
        assert len(rings) == 1, "one AIO context for the export's loop, not %r" % rings
    assert rings, "no AIO context"
    before = [ring_header(pid, r[0]) for r in rings]
    # 64 writes in flight at once (one loop turn: batched), then read back
    n = 64
    model = {}
    cookies = []
    for i in range(n):
        off = (1 + i) * 65536
        model[off] = rng.randbytes(4096)
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(model[off])), off))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    for off, data in model.items():
        assert h.pread(4096, off) == data
    assert h.pread(4096, 0) == first
    after = [ring_header(pid, r[0]) for r in rings]
    done = sum((a[2] - b[2]) % b[0] for a, b in zip(after, before))
    assert done == 2 * n + 1, "%d Linux AIO completions for %d NBD requests" % (done, 2 * n + 1)
    if impl == "bexd":
        # bexd moves the head before it calls the request's completion; QEMU
        # wakes the request's coroutine (which replies) before, so its head
        # may lag by the last batch
        assert all(x[1] == x[2] for x in before + after), "completions left in the ring"
    h.shutdown()
    # what the daemon wrote reached the file (O_DIRECT: no cache to flush)
    with open(s.img, "rb") as f:
        for off, data in model.items():
            f.seek(off)
            assert f.read(4096) == data
    # the node goes while its loop's context stays (as QEMU's AioContext's)
    try:
        s.qmp.execute("block-export-del", id="exp0")
        s.qmp.execute("blockdev-del", node_name="disk0")
    except OSError:
        xfail_if_reference_died(s.d, "qsd 7.2 aborted deleting the export")
        raise
    assert len(aio_rings(pid)) == len(rings)


def test_io_uring_makes_no_aio_context(start_daemon, impl, tmpdir_short):
    """The control: the proof above cannot pass without Linux AIO."""
    s = Setup(start_daemon, impl, tmpdir_short, "io_uring")
    s.add()
    h = s.handle()
    data = random.Random(7).randbytes(4096)
    h.pwrite(data, 4096)
    assert h.pread(4096, 4096) == data
    assert aio_rings(s.d.pid) == []
    h.shutdown()


def test_native_needs_direct(start_daemon, impl, tmpdir_short):
    s = Setup(start_daemon, impl, tmpdir_short, "native")
    with pytest.raises(QMPError) as e:
        s.qmp.execute("blockdev-add", driver="file", node_name="disk0", filename=s.img,
                      aio="native")
    assert e.value.cls == "GenericError"
    assert str(e.value).endswith("aio=native was specified, but it requires cache.direct=on, "
                                 "which was not specified.")
