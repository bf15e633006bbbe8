"""NBD exports of an O_DIRECT node (cache.direct=on) on a real file system.

Requests of every size the data path treats differently (4 KiB, 64 KiB,
1 MiB, more than the 4 MiB a connection keeps per slot), many in flight on
one connection and over more connections than a ring registers buffers
for, with aio=io_uring, native and threads.  Every write is mirrored in a
model; reads over NBD and the image file after the daemon stops must equal
it.  bexd registers its O_DIRECT buffers with its io_uring ring (fixed
buffers); the pages it pins for them must be given back when the client
leaves (VmPin in /proc).

Each scenario runs against bexd and qemu-storage-daemon (`impl`).
"""
import os
import random
import time

import pytest

import needs

import nbd  # noqa: E402 (python3-libnbd, which scripts/deps.sh installs)

MiB = 1 << 20
SIZE = 24 * MiB


class Setup:
    def __init__(self, start_daemon, impl, tmpdir, aio):
        self.img = os.path.join(tmpdir, "disk.img")
        self.rng = random.Random(16)
        self.model = bytearray(self.rng.randbytes(SIZE))
        with open(self.img, "wb") as f:
            f.write(self.model)
        if not needs.o_direct_works(self.img):
            pytest.skip("no O_DIRECT on %s" % tmpdir)
        self.sock = os.path.join(tmpdir, "nbd.sock")
        self.daemon = start_daemon(
            impl,
            "--blockdev", "driver=file,node-name=disk0,filename=%s,cache.direct=on,aio=%s"
                          % (self.img, aio),
            "--nbd-server", "addr.type=unix,addr.path=%s" % self.sock,
            "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on")

    def handle(self):
        h = nbd.NBD()
        h.set_export_name("disk0")
        h.connect_unix(self.sock)
        return h

    def writes(self, h, reqs):
        """Issue every (offset, length) write at once, then wait for all."""
        cookies = []
        for off, n in reqs:
            data = self.rng.randbytes(n)
            self.model[off:off + n] = data
            cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off))
        wait_all(h, cookies)

    def reads_match(self, h, reqs):
        bufs = [(off, n, nbd.Buffer(n)) for off, n in reqs]
        cookies = [h.aio_pread(b, off) for off, n, b in bufs]
        wait_all(h, cookies)
        for off, n, b in bufs:
            assert bytes(b.to_bytearray()) == bytes(self.model[off:off + n]), \
                "read of %d bytes at %d differs" % (n, off)

    def check_file(self):
        self.daemon.stop()
        with open(self.img, "rb") as f:
            assert f.read() == bytes(self.model)


def wait_all(h, cookies):
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)


def mixed_requests(rng):
    """Non-overlapping requests of every size class, in random order."""
    sizes = [4096] * 24 + [65536] * 8 + [MiB] * 6 + [5 * MiB]
    reqs, off = [], 0
    for n in sizes:
        reqs.append((off, n))
        off += n + 4096 * rng.randrange(0, 4)
    assert off <= SIZE
    rng.shuffle(reqs)
    return reqs


@pytest.mark.parametrize("aio", ["io_uring", "native", "threads"])
def test_mixed_sizes_in_flight(start_daemon, impl, tmpdir_short, aio):
    s = Setup(start_daemon, impl, tmpdir_short, aio)
    h = s.handle()
    reqs = mixed_requests(s.rng)
    s.writes(h, reqs)
    s.reads_match(h, reqs)
    # the same slots again, now with buffers grown, shrunk and reused
    reqs2 = mixed_requests(s.rng)
    s.writes(h, reqs2[:20])
    s.reads_match(h, reqs2)
    s.writes(h, reqs2[20:])
    s.reads_match(h, [(0, SIZE // 2), (SIZE // 2, SIZE // 2)])
    h.shutdown()
    s.check_file()


def test_more_connections_than_registered_buffers(start_daemon, impl, tmpdir_short):
    """20 connections x 64 requests in flight: more buffers than one ring
    registers (1024), so some requests take the ordinary path."""
    s = Setup(start_daemon, impl, tmpdir_short, "io_uring")
    handles = [s.handle() for _ in range(20)]
    span = SIZE // len(handles) // 4096 * 4096
    cookies = []
    for i, h in enumerate(handles):
        for k in range(64):
            off = i * span + k * 16384          # slot buffers are 64 KiB at least
            data = s.rng.randbytes(16384 if k % 2 else 4096)
            s.model[off:off + len(data)] = data
            cookies.append((h, h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)))
    for h in handles:
        wait_all(h, [c for hh, c in cookies if hh is h])
    for i, h in enumerate(handles):
        s.reads_match(h, [(i * span, span)])
    for h in handles:
        h.shutdown()
    s.check_file()


def vm_pin_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmPin:"):
                return int(line.split()[1])
    return 0


def test_registered_buffers_released(start_daemon, tmpdir_short):
    """bexd pins its O_DIRECT slot buffers once (io_uring fixed buffers) and
    unpins them when the connection goes: no pinned memory is left behind."""
    s = Setup(start_daemon, "bexd", tmpdir_short, "io_uring")
    assert vm_pin_kb(s.daemon.pid) == 0
    h = s.handle()
    s.writes(h, [(i * MiB, MiB) for i in range(8)])
    s.reads_match(h, [(i * MiB, MiB) for i in range(8)])
    assert vm_pin_kb(s.daemon.pid) >= 1024, "no buffer was registered"
    h.shutdown()
    del h
    deadline = time.monotonic() + 10
    while vm_pin_kb(s.daemon.pid) and time.monotonic() < deadline:
        time.sleep(0.05)        # the server tears the connection down on its own
    assert vm_pin_kb(s.daemon.pid) == 0
    s.check_file()
