"""Unaligned NBD requests on an O_DIRECT node (cache.direct=on).

The node takes only requests aligned to 512 bytes; the block layer serves
the others (bounce buffers, read-modify-write), as QEMU's does for qsd.  The
export advertises a minimum block size of 512, which libnbd enforces only in
strict mode: the tests switch STRICT_ALIGN off, so the raw unaligned requests
reach the server.  Every write is mirrored in a model, and the image file is
compared with it byte for byte once the daemon has stopped.

Each scenario runs against bexd and qemu-storage-daemon (`impl`).
"""
import os
import subprocess

import pytest

import needs

import nbd  # noqa: E402 (python3-libnbd, which scripts/deps.sh installs)
from conftest import tool_text, xfail_if_reference_died

MiB = 1 << 20
SIZE = 4 * MiB
ENV = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))


def random_bytes(n, seed):
    x = seed * 2654435761 % (1 << 32) or 1
    out = bytearray(n)
    for i in range(n):
        x = (x * 1103515245 + 12345) & 0xffffffff
        out[i] = x >> 16 & 0xff
    return bytes(out)


class Setup:
    """bexd/qsd exporting a 4 MiB image on a cache.direct=on node as disk0;
    pre: extra options before the export, post: after it."""

    def __init__(self, start_daemon, impl, tmpdir, pre=(), post=(), export_opts=""):
        self.impl = impl
        self.img = os.path.join(tmpdir, "disk.img")
        self.base = random_bytes(SIZE // 16, seed=5) * 16
        with open(self.img, "wb") as f:
            f.write(self.base)
        if not needs.o_direct_works(self.img):
            pytest.skip("no O_DIRECT on %s" % tmpdir)
        self.model = bytearray(self.base)
        self.sock = os.path.join(tmpdir, "nbd.sock")
        self.uri = "nbd+unix:///disk0?socket=%s" % self.sock
        self.daemon = start_daemon(
            impl, *pre,
            "--blockdev", "driver=file,node-name=disk0,filename=%s,"
                          "cache.direct=on,discard=unmap" % self.img,
            "--nbd-server", "addr.type=unix,addr.path=%s" % self.sock,
            "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on" + export_opts,
            *post)

    def handle(self, name="disk0"):
        h = nbd.NBD()
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
        h.set_export_name(name)
        h.connect_unix(self.sock)
        return h

    def write(self, h, off, data, flags=0):
        h.pwrite(data, off, flags)
        self.model[off:off + len(data)] = data

    def check_image(self):
        """Stop the daemon (flushes), then the file must equal the model."""
        self.daemon.stop()
        with open(self.img, "rb") as f:
            got = f.read()
        assert len(got) == SIZE
        if got != bytes(self.model):
            first = next(i for i in range(SIZE) if got[i] != self.model[i])
            pytest.fail("image differs from the model first at byte %d" % first)


@pytest.fixture
def setup(impl, start_daemon, tmpdir_short):
    return Setup(start_daemon, impl, tmpdir_short)


# head only, tail only, both, inside one block, spanning, image end, start
RANGES = [(100, 924), (4096, 100), (8192 + 7, 1536), (20010, 20),
          (65536 - 300, 70000), (SIZE - 3, 3), (0, 1), (777, 300000)]


def test_block_size_advertised(setup):
    h = setup.handle()
    try:
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
    finally:
        h.shutdown()


def test_unaligned_reads(setup):
    h = setup.handle()
    try:
        for off, n in RANGES:
            assert h.pread(n, off) == setup.base[off:off + n], (off, n)
    finally:
        h.shutdown()


def test_unaligned_writes(setup):
    h = setup.handle()
    try:
        for i, (off, n) in enumerate(RANGES):
            setup.write(h, off, random_bytes(n, seed=100 + i),
                        nbd.CMD_FLAG_FUA if i % 2 else 0)
            lo = max(off - 10, 0)
            hi = min(off + n + 10, SIZE)
            assert h.pread(hi - lo, lo) == bytes(setup.model[lo:hi])
    finally:
        h.shutdown()
    setup.check_image()


def test_write_zeroes_and_trim_unaligned(setup):
    h = setup.handle()
    try:
        for off, n, flags in ((300000 + 100, 5000, 0), (320000 + 10, 20, nbd.CMD_FLAG_FUA),
                              (344064, 1543, nbd.CMD_FLAG_NO_HOLE)):
            h.zero(n, off, flags)
            setup.model[off:off + n] = bytes(n)
        # trim is advisory: the bytes around it keep their data; bexd only
        # discards the aligned middle (qsd punches the edges too: zeros)
        off, n = 512 * 1000 + 100, 8 * 512
        h.trim(n, off)
        got = h.pread(n, off)
        for edge in (slice(0, 412), slice(n - 100, n)):
            old = bytes(setup.model[off:off + n][edge])
            assert got[edge] == old or (setup.impl == "qsd" and got[edge] == bytes(len(old)))
        setup.model[off:off + n] = got
    finally:
        h.shutdown()
    setup.check_image()


def wait_aio(h, cmds):
    """Wait for commands issued with aio_*; each must succeed."""
    left = set(cmds)
    while left:
        # aio_command_completed retires a command the first time it says True
        left = {c for c in left if not h.aio_command_completed(c)}
        if left:
            h.poll(-1)


def test_overlapping_rmw_in_flight(setup):
    # many small writes to distinct bytes of a few shared blocks, all in
    # flight at once, from two connections: every one must land
    h1, h2 = setup.handle(), setup.handle()
    try:
        c1, c2 = [], []
        for i in range(48):
            off = 2 * MiB + 3 + i * 37
            data = random_bytes(17, seed=500 + i)
            h = h1 if i % 2 else h2
            (c1 if i % 2 else c2).append(h.aio_pwrite(data, off))
            setup.model[off:off + 17] = data
        wait_aio(h1, c1)
        wait_aio(h2, c2)
        assert h1.pread(2048, 2 * MiB) == bytes(setup.model[2 * MiB:2 * MiB + 2048])
    finally:
        h1.shutdown()
        h2.shutdown()
    setup.check_image()


def test_nbdsh_unaligned(setup):
    data = random_bytes(333, seed=7)
    script = ("h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)\n"
              "h.connect_uri(%r)\n"
              "h.pwrite(%r, 1000001)\n"
              "print(h.pread(400, 1000000).hex())\n" % (setup.uri, data))
    r = subprocess.run(["nbdsh", "-c", script], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60, env=ENV)
    assert r.returncode == 0, tool_text(r.stderr)
    setup.model[1000001:1000001 + 333] = data
    assert bytes.fromhex(tool_text(r.stdout).strip()) == bytes(setup.model[1000000:1000400])
    setup.check_image()


def test_qemu_io_unaligned(setup):
    cmds = ["write -P 0x5a 1000 3000", "write -z 70001 9000", "read -P 0x5a 1000 3000",
            "read -P 0 70001 9000", "read -P 0x5a 3999 1"]
    argv = ["qemu-io", "-f", "raw", setup.uri]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60, env=ENV)
    out = tool_text(r.stdout)
    assert r.returncode == 0, tool_text(r.stderr)
    assert "Pattern verification failed" not in out, out
    assert out.count("read ") == 3, out
    setup.model[1000:4000] = b"\x5a" * 3000
    setup.model[70001:79001] = bytes(9000)
    setup.check_image()


def test_iothread_and_main_loop_exports(impl, start_daemon, tmpdir_short):
    # one node, two exports: one served by an iothread, one by the main
    # loop; RMW cycles on shared blocks from both threads at once
    s = Setup(start_daemon, impl, tmpdir_short, pre=("--object", "iothread,id=io0"),
              export_opts=",iothread=io0",
              post=("--export", "type=nbd,id=exp1,node-name=disk0,name=other,writable=on"))
    h1, h2 = s.handle("disk0"), s.handle("other")
    try:
        cmds1, cmds2 = [], []
        for i in range(64):
            off = 3 * MiB + 1 + i * 23
            data = random_bytes(11, seed=800 + i)
            (cmds1 if i % 2 else cmds2).append((off, data))
            s.model[off:off + 11] = data
        c1 = [h1.aio_pwrite(d, o) for o, d in cmds1]
        c2 = [h2.aio_pwrite(d, o) for o, d in cmds2]
        wait_aio(h1, c1)
        wait_aio(h2, c2)
    finally:
        for h in (h1, h2):
            try:
                h.shutdown()
            except nbd.Error:
                if impl != "qsd":          # the reference may have aborted (below)
                    raise
    xfail_if_reference_died(s.daemon, "aborted when a client left an NBD export on an "
                            "iothread (assertion qemu_in_main_thread() && nbd_server)")
    s.check_image()
