"""Large READs of RAM-backed images, which bexd splices from the page cache.

bexd answers a READ of 64 KiB or more from a file on tmpfs without copying
it: the reply names the file range and the flush splices it to the socket.
These cases put images in /dev/shm (the other NBD tests use /tmp, a disk),
and check what a client must not be able to tell apart: the bytes, the
chunk shapes where holes are involved, pipelined replies of mixed sizes to
a client that reads late, writes and trims seen by later reads, and a file
cut short underneath the daemon.  They run against qemu-storage-daemon too.
"""
import os
import shutil
import tempfile

import pytest

from nbdwire import (CMD_FLAG_DF, CMD_READ, CMD_TRIM, Conn, pattern, serve,
                     REPLY_TYPE_OFFSET_DATA)

MiB = 1 << 20


@pytest.fixture
def shm_image():
    """shm_image(size, data_at=((offset, bytes), ...)) -> path in /dev/shm."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = tempfile.mkdtemp(prefix="bxsp", dir="/dev/shm")

    def make(size, data_at=()):
        path = os.path.join(d, "disk.img")
        with open(path, "wb") as f:
            f.truncate(size)
            for off, data in data_at:
                f.seek(off)
                f.write(data)
        return path
    yield make
    shutil.rmtree(d, ignore_errors=True)


def start(start_daemon, impl, img, tmpdir_short, node_opts=""):
    sock = os.path.join(tmpdir_short, "nbd.sock")
    return serve(start_daemon, impl, img, sock, node_opts=node_opts), sock


def spliced(d):
    """Bytes of READ replies bexd sent by splice(2) instead of copying (its
    read-spliced-bytes counter, counted when a reply is queued, so before
    the client has it); None for qemu-storage-daemon, which copies."""
    if d.impl != "bexd":
        return None
    if not hasattr(d, "stats_qmp"):      # a monitor serves one client at a time
        d.stats_qmp = d.qmp()
    (e,) = d.stats_qmp.execute("__org.bexd_query-export-clients")
    return e["totals"]["read-spliced-bytes"]


def file_bytes(img, off, length):
    with open(img, "rb") as f:
        f.seek(off)
        got = f.read(length)
    return got + bytes(length - len(got))


@pytest.mark.parametrize("structured", [False, True])
def test_large_reads_return_the_file(impl, start_daemon, shm_image, tmpdir_short, structured):
    data = os.urandom(40 * MiB)
    img = shm_image(len(data), [(0, data)])
    d, sock = start(start_daemon, impl, img, tmpdir_short)
    c = Conn(sock).connect("disk0", structured=structured)
    reads = [(0, 64 << 10), (4096 + 512, MiB + 512), (3 * MiB - 1, 4 * MiB),
             (8 * MiB, 32 * MiB), (len(data) - MiB, MiB)]
    for off, ln in reads:
        r = c.read(off, ln)
        assert r.err == 0
        got = r.data if r.simple else r.assemble(off, ln)
        assert got == data[off:off + ln], (off, ln)
    # all of them went out by splice (the file holds no hole to show); a
    # READ below 64 KiB is copied
    assert spliced(d) in (None, sum(ln for _, ln in reads))
    assert c.read(0, (64 << 10) - 512).err == 0
    assert spliced(d) in (None, sum(ln for _, ln in reads))
    c.disc()


def test_df_read_is_one_data_chunk(impl, start_daemon, shm_image, tmpdir_short):
    data = os.urandom(4 * MiB)
    img = shm_image(8 * MiB, [(0, data)])     # the second half is a hole
    d, sock = start(start_daemon, impl, img, tmpdir_short)
    c = Conn(sock).connect("disk0", structured=True)
    r = c.read(2 * MiB, 4 * MiB, flags=CMD_FLAG_DF)
    assert [t for t, _, _ in r.chunks] == [REPLY_TYPE_OFFSET_DATA]
    assert r.assemble(2 * MiB, 4 * MiB) == data[2 * MiB:] + bytes(2 * MiB)
    assert spliced(d) in (None, 4 * MiB)       # DF: one chunk, holes and all, spliced


def test_holes_still_show_as_holes(impl, start_daemon, shm_image, tmpdir_short):
    a, b = pattern(MiB, seed=4), pattern(MiB, seed=5)
    img = shm_image(8 * MiB, [(0, a), (3 * MiB, b)])   # data, 2 MiB hole, data, hole
    d, sock = start(start_daemon, impl, img, tmpdir_short)
    c = Conn(sock).connect("disk0", structured=True)
    for i in range(2):     # the second time, what was learnt about the file is used
        r = c.read(0, 4 * MiB)
        assert r.assemble(0, 4 * MiB) == a + bytes(2 * MiB) + b
        holes = sum(ln for off, ln in r.holes if MiB <= off and off + ln <= 3 * MiB)
        assert holes == 2 * MiB, r.holes
        assert c.read(3 * MiB, MiB).assemble(3 * MiB, MiB) == b
        # a range with holes is read and sent as chunks; one of data only
        # is spliced
        assert spliced(d) in (None, (i + 1) * MiB)


def test_writes_and_trims_are_seen(impl, start_daemon, shm_image, tmpdir_short):
    data = bytearray(os.urandom(8 * MiB))
    img = shm_image(len(data), [(0, bytes(data))])
    d, sock = start(start_daemon, impl, img, tmpdir_short, node_opts=",discard=unmap")
    c = Conn(sock).connect("disk0", structured=True)
    assert c.read(0, 8 * MiB).assemble(0, 8 * MiB) == data
    new = pattern(MiB + 4096, seed=8)
    assert c.write(3 * MiB - 4096, new).err == 0
    data[3 * MiB - 4096:4 * MiB] = new
    assert c.read(2 * MiB, 4 * MiB).assemble(2 * MiB, 4 * MiB) == data[2 * MiB:6 * MiB]
    # a trim punches a hole: a later read must not claim data there
    assert c.cmd(CMD_TRIM, 5 * MiB, MiB).err == 0
    r = c.read(4 * MiB, 4 * MiB)
    data[5 * MiB:6 * MiB] = bytes(MiB)
    assert r.assemble(4 * MiB, 4 * MiB) == data[4 * MiB:]
    assert (5 * MiB, MiB) in r.holes, r.holes


def test_pipelined_replies_to_a_late_reader(impl, start_daemon, shm_image, tmpdir_short):
    """64 MiB of large and small READs sent before reading any reply: the
    socket fills, so spliced replies go out in pieces between others."""
    data = os.urandom(64 * MiB)
    img = shm_image(len(data), [(0, data)])
    d, sock = start(start_daemon, impl, img, tmpdir_short)
    c = Conn(sock, timeout=30).connect("disk0", structured=True)
    want = {}
    for i in range(48):
        off, ln = (i * 1337 * 4096) % (63 * MiB), MiB if i % 3 else 4096
        cookie = c.request(CMD_READ, off, ln)
        want[cookie] = (off, ln)
    while want:
        r = c.reply()
        off, ln = want.pop(r.cookie)
        assert r.err == 0 and r.assemble(off, ln) == data[off:off + ln], (off, ln)
    assert spliced(d) in (None, 32 * MiB)      # the 32 READs of 1 MiB; 4 KiB ones are copied
    c.disc()


def test_file_cut_short_underneath(impl, start_daemon, shm_image, tmpdir_short):
    """Someone else truncates the image: what is gone reads as zeros, the
    connection goes on, the daemon too."""
    data = os.urandom(8 * MiB)
    img = shm_image(len(data), [(0, data)])
    d, sock = start(start_daemon, impl, img, tmpdir_short)
    c = Conn(sock).connect("disk0", structured=True)
    assert c.read(0, 8 * MiB).assemble(0, 8 * MiB) == data
    os.truncate(img, 2 * MiB)
    r = c.read(MiB, 4 * MiB)
    assert r.err == 0
    assert r.assemble(MiB, 4 * MiB) == data[MiB:2 * MiB] + bytes(3 * MiB)
    assert c.read(0, 4096).assemble(0, 4096) == data[:4096]
    c.disc()


def test_many_clients_in_parallel(impl, start_daemon, shm_image, tmpdir_short):
    """Four connections (spread over loops), each with its own pipe."""
    data = os.urandom(16 * MiB)
    img = shm_image(len(data), [(0, data)])
    d, sock = start(start_daemon, impl, img, tmpdir_short)
    conns = [Conn(sock).connect("disk0", structured=bool(i % 2)) for i in range(4)]
    want = {}
    for i, c in enumerate(conns):
        for j in range(4):
            off = ((i * 4 + j) * MiB) % (15 * MiB)
            want[(c, c.request(CMD_READ, off, 2 * MiB))] = off
    for c in conns:
        for _ in range(4):        # replies come in completion order
            r = c.reply(read_len=2 * MiB)
            off = want.pop((c, r.cookie))
            got = r.data if r.simple else r.assemble(off, 2 * MiB)
            assert got == data[off:off + 2 * MiB]
        c.disc()
    assert not want
    assert spliced(d) in (None, 16 * 2 * MiB)
