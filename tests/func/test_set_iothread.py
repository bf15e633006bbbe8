"""x-blockdev-set-iothread with live exports: clients connected, I/O running.

QEMU drains a node before it changes its AioContext: requests in flight
complete, then the export's clients (NBD connections, vhost-user-blk
queues, the FUSE session) are served by the new iothread.  These tests
move exports between iothreads and the main loop with real clients
connected, checking every byte they wrote, against both daemons where
qemu-storage-daemon 7.2 can:

- qsd 7.2 moves an NBD export whose clients are idle, and one with a request
  in flight (its reply waits for the request), but aborts when a client
  sends requests while the export moves ("blk_aio_attached: Assertion
  `client->recv_coroutine == NULL' failed", within a few moves), and when
  a client leaves an export that is in an iothread.  The scenarios with
  I/O running during the moves, nbdcopy and the thread check (qsd has no
  query-iothreads) run against bexd only; with qsd the clients leave after
  the export is back in the main loop.
- Which thread serves a client is measured, not assumed: the read system
  calls each iothread makes (/proc/PID/task/TID/io) while a client runs
  requests after a move.
"""
import json
import os
import signal
import subprocess
import threading

import pytest

import needs
from conftest import BUILD, QMPError
from nbdwire import CMD_BLOCK_STATUS, CMD_READ, Conn

import nbd  # noqa: E402 (python3-libnbd, which scripts/deps.sh installs)

MiB = 1 << 20
BLK = 64 << 10
IOTHREADS = ["--object", "iothread,id=io0", "--object", "iothread,id=io1"]


def move(q, node, iothread, force=True):
    return q.execute("x-blockdev-set-iothread", node_name=node, iothread=iothread,
                     force=force)


def stop_clean(d):
    """SIGTERM now: the harness's stop() checks that bexd exits 0 (a test
    that stops it while clients run needs it gone at this point)."""
    if hasattr(d, "expect_exit"):
        d.stop()
        return
    for m in d.monitors:
        m.close()
    d.monitors = []
    os.kill(d.pid, signal.SIGTERM)
    d.wait_exit()
    d.pid = None


def thread_reads(pid, tid):
    with open("/proc/%d/task/%d/io" % (pid, tid)) as f:
        for line in f:
            if line.startswith("syscr:"):
                return int(line.split()[1])
    raise AssertionError("no syscr for thread %d" % tid)


def reads_grow(pid, tid, n, timeout=30):
    """Wait until thread tid made n more read system calls."""
    start = thread_reads(pid, tid)
    ev = threading.Event()
    for _ in range(int(timeout * 100)):
        if thread_reads(pid, tid) - start >= n:
            return
        ev.wait(0.01)
    raise AssertionError("thread %d did not read" % tid)


def iothread_tids(q):
    return {t["id"]: t["thread-id"] for t in q.execute("query-iothreads")}


class Verifier:
    """Clients each writing a pattern to their own range and reading it back,
    in threads, until stopped.  Every mismatch or error is kept."""

    def __init__(self, sock, name, nclients=3, region=MiB):
        self.stop = threading.Event()
        self.errors = []
        self.ops = [0] * nclients
        self.last = {}                       # offset -> pattern byte last written
        self.lock = threading.Lock()
        self.handles = []
        for i in range(nclients):
            h = nbd.NBD()
            h.set_export_name(name)
            h.connect_unix(sock)
            self.handles.append(h)
        self.threads = [threading.Thread(target=self.run, args=(i, region))
                        for i in range(nclients)]

    def run(self, i, region):
        h = self.handles[i]
        k = 0
        while not self.stop.is_set():
            off = i * region + (k % (region // BLK)) * BLK
            byte = (i * 37 + k) % 251 + 1
            buf = bytes([byte]) * BLK
            try:
                h.pwrite(buf, off)
                with self.lock:
                    self.last[off] = byte
                back = h.pread(BLK, off)
                if back != buf:
                    self.errors.append("client %d: offset %d read back wrong" % (i, off))
                    return
                if k % 7 == 0:
                    h.flush()
            except nbd.Error as e:
                self.errors.append("client %d: %s" % (i, e))
                return
            k += 1
            self.ops[i] = k

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)
            assert not t.is_alive()

    def __exit__(self, *a):
        self.finish()

    def close(self):
        for h in self.handles:
            h.shutdown()
        self.handles = []

    def check_file(self, path):
        with open(path, "rb") as f:
            for off, byte in sorted(self.last.items()):
                f.seek(off)
                assert f.read(BLK) == bytes([byte]) * BLK, off


def nbd_daemon(impl, start_daemon, image, tmpdir_short, iothread="io0", extra=()):
    img = image(8 * MiB)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    args = IOTHREADS + ["--blockdev", "driver=file,node-name=f,filename=" + img,
                        "--blockdev", "driver=raw,node-name=r,file=f",
                        "--nbd-server", "addr.type=unix,addr.path=" + sock]
    exp = "type=nbd,id=e,node-name=r,name=d,writable=on"
    if iothread:
        exp += ",iothread=" + iothread
    d = start_daemon(impl, *(args + ["--export", exp] + list(extra)))
    return d, img, sock


def check_graph(q):
    nodes = {n["node-name"]: n for n in q.execute("query-named-block-nodes")}
    assert set(nodes) == {"f", "r"}
    assert nodes["r"]["drv"] == "raw" and nodes["f"]["drv"] == "file"
    g = q.execute("x-debug-query-block-graph")
    ids = {n["id"]: (n["type"], n["name"]) for n in g["nodes"]}
    edges = sorted((ids[e["parent"]], ids[e["child"]]) for e in g["edges"])
    assert edges == [(("block-backend", ""), ("block-driver", "r")),
                     (("block-driver", "r"), ("block-driver", "f"))]
    objs = {o["name"]: o["type"] for o in q.execute("qom-list", path="/objects")}
    assert objs["io0"] == objs["io1"] == "child<iothread>"
    assert q.execute("query-block-exports") == [
        {"type": "nbd", "id": "e", "node-name": "r", "shutting-down": False}]


def test_nbd_moves_between_requests(impl, start_daemon, image, tmpdir_short):
    """Two clients stay connected through moves between the iothreads and
    the main loop, writing and reading back between them."""
    d, img, sock = nbd_daemon(impl, start_daemon, image, tmpdir_short)
    q = d.qmp()
    hs = []
    for i in range(2):
        h = nbd.NBD()
        h.set_export_name("d")
        h.connect_unix(sock)
        hs.append(h)
    for k, t in enumerate(["io1", None, "io0", "io1", "io0", None, "io1", None]):
        try:
            assert move(q, "r" if k % 3 else "f", t) == {}
            for i, h in enumerate(hs):
                data = bytes([k * 2 + i + 1]) * BLK
                h.pwrite(data, i * MiB + k * BLK)
                assert h.pread(BLK, i * MiB + k * BLK) == data
        except (ConnectionResetError, BrokenPipeError, nbd.Error):
            if impl != "qsd" or d.wait_exit() != -signal.SIGABRT:
                raise
            # qsd 7.2 aborts in some runs here although the clients are idle
            # while it moves (seen once in a full run of this file)
            d.expect_exit(-signal.SIGABRT)
            pytest.xfail("qemu-storage-daemon 7.2 aborted on x-blockdev-set-iothread")
    for h in hs:
        h.flush()
        h.shutdown()
    with open(img, "rb") as f:
        for k in range(8):
            for i in range(2):
                f.seek(i * MiB + k * BLK)
                assert f.read(BLK) == bytes([k * 2 + i + 1]) * BLK
    check_graph(q)
    if impl == "bexd":
        stop_clean(d)


def test_nbd_move_under_io(start_daemon, image, tmpdir_short):
    """50 moves back and forth (io0, io1, main) while three clients write and
    verify: every move succeeds, no request fails or reads back wrong."""
    impl = "bexd"
    d, img, sock = nbd_daemon(impl, start_daemon, image, tmpdir_short)
    q = d.qmp()
    targets = ["io1", "io0", None, "io1", None, "io0"]
    with Verifier(sock, "d") as v:
        for k in range(50):
            assert move(q, "r", targets[k % len(targets)]) == {}
            if v.errors:
                break
        assert move(q, "f", None) == {}        # a child moves the export too
        before = list(v.ops)
        # the clients keep going after the last move
        while min(a - b for a, b in zip(v.ops, before)) < 5 and not v.errors:
            threading.Event().wait(0.01)
    assert v.errors == []
    assert min(v.ops) > 5
    v.close()
    v.check_file(img)
    check_graph(q)
    stop_clean(d)


def test_nbd_served_by_target_iothread(start_daemon, image, tmpdir_short):
    """After a move the client's requests are read by the target iothread,
    not the old one (system call counts per thread)."""
    impl = "bexd"
    d, img, sock = nbd_daemon(impl, start_daemon, image, tmpdir_short)
    q = d.qmp()
    tids = iothread_tids(q)
    h = nbd.NBD()
    h.set_export_name("d")
    h.connect_unix(sock)
    h.pwrite(b"\x5a" * 4096, 0)
    for src, dst in (("io0", "io1"), ("io1", "io0")):
        assert move(q, "r", dst) == {}
        h.pread(4096, 0)                       # the first may still be the old loop's
        r0 = {t: thread_reads(d.pid, tids[t]) for t in tids}
        for _ in range(300):
            assert h.pread(4096, 0) == b"\x5a" * 4096
        r1 = {t: thread_reads(d.pid, tids[t]) for t in tids}
        assert r1[dst] - r0[dst] >= 300, (src, dst, r0, r1)
        assert r1[src] - r0[src] < 30, (src, dst, r0, r1)
    assert move(q, "r", None) == {}
    assert h.pread(4096, 0) == b"\x5a" * 4096
    h.shutdown()
    stop_clean(d)


def test_nbd_move_with_request_in_flight(impl, start_daemon, tmpdir_short):
    """A READ in flight on a slow node when the move comes: it completes,
    answered once, and the connection goes on in the new iothread.  (Without
    read-zeroes: QEMU would answer a hole without reading.)"""
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, *IOTHREADS,
                     "--blockdev", "driver=null-co,node-name=n0,size=1048576,read-zeroes=off,"
                     "latency-ns=400000000",
                     "--nbd-server", "addr.type=unix,addr.path=" + sock,
                     "--export", "type=nbd,id=e0,node-name=n0")
    q = d.qmp()
    c = Conn(sock, timeout=30).connect("n0", contexts=["base:allocation"])
    read = c.request(CMD_READ, 0, 4096)
    status = c.request(CMD_BLOCK_STATUS, 0, 4096)
    assert c.reply().cookie == status          # the READ is in the server's hands
    assert move(q, "n0", "io1") == {}
    read2 = c.request(CMD_READ, 4096, 4096)
    r = c.reply(read_len=4096)
    assert (r.cookie, r.err) == (read, 0)
    r = c.reply(read_len=4096)
    assert (r.cookie, r.err) == (read2, 0)
    # nothing else was queued for it: the next reply is the next request's
    status = c.request(CMD_BLOCK_STATUS, 0, 4096)
    assert c.reply().cookie == status
    assert move(q, "n0", None) == {}
    status = c.request(CMD_BLOCK_STATUS, 0, 4096)
    assert c.reply().cookie == status
    c.disc()
    assert c.eof()
    if impl == "bexd":
        stop_clean(d)


def test_nbdcopy_while_moving(start_daemon, image, tmpdir_short):
    """nbdcopy (four connections, many requests in flight each) copies an
    image into the export while it moves; the copy is exact.  bexd only:
    qsd 7.2 aborts when nbdcopy's connections leave an iothread export."""
    d, img, sock = nbd_daemon("bexd", start_daemon, image, tmpdir_short)
    q = d.qmp()
    src = os.path.join(tmpdir_short, "src.img")
    with open(src, "wb") as f:
        f.write(os.urandom(8 * MiB))
    url = "nbd+unix:///d?socket=" + sock
    moves = 0
    for rnd in range(3):
        p = subprocess.Popen(["nbdcopy", "--flush", "--requests=16", "--connections=4",
                              src, url])
        while p.poll() is None:
            assert move(q, "r", ["io1", None, "io0"][moves % 3]) == {}
            moves += 1
        assert p.wait() == 0
        with open(src, "rb") as a, open(img, "rb") as b:
            assert a.read() == b.read()
        with open(src, "r+b") as f:           # something new to copy next round
            f.write(os.urandom(MiB))
    assert moves > 3
    check_graph(q)
    stop_clean(d)


def test_nbd_delete_and_stop_during_moves(start_daemon, image, tmpdir_short):
    """A hard delete, and SIGTERM, right behind moves while clients run:
    they wait for the move and then happen (bexd; qsd 7.2 aborts when its
    iothread export's clients are dropped)."""
    d, img, sock = nbd_daemon("bexd", start_daemon, image, tmpdir_short)
    q = d.qmp()
    v = Verifier(sock, "d", nclients=2)
    with v:
        for t in ("io1", "io0", "io1"):
            move(q, "r", t)
        q.execute("block-export-del", id="e", mode="hard")
        q.wait_event("BLOCK_EXPORT_DELETED")
    assert v.errors and all("client" in e for e in v.errors)   # dropped, not hung
    assert q.execute("query-block-exports") == []
    q.execute("block-export-add", type="nbd", id="e", node_name="r", name="d",
              writable=True, iothread="io0")
    v = Verifier(sock, "d", nclients=2)
    with v:
        for t in ("io1", None, "io0", "io1"):
            move(q, "r", t)
        stop_clean(d)                           # graceful: finishes what was read
    assert v.errors                             # the server went away


def test_moving_refusals(impl, start_daemon, image, tmpdir_short):
    """fixed-iothread refuses, and nothing moved: a client goes on (bexd;
    with qsd 7.2 there is no client, since it would abort when the client
    leaves the iothread export)."""
    d, img, sock = nbd_daemon(impl, start_daemon, image, tmpdir_short,
                              extra=["--blockdev", "driver=null-co,node-name=n,read-zeroes=on"])
    q = d.qmp()
    q.execute("block-export-add", type="nbd", id="x", node_name="n", name="n",
              iothread="io0", fixed_iothread=True)
    h = None
    if impl == "bexd":
        h = nbd.NBD()
        h.set_export_name("n")
        h.connect_unix(sock)
    for t in ("io1", None):
        with pytest.raises(QMPError) as e:
            move(q, "n", t)
        assert (e.value.cls, e.value.desc) == ("GenericError",
                                               "Cannot change iothread of active block backend")
        if h:
            assert h.pread(512, 0) == b"\0" * 512
    if h:
        h.shutdown()
        stop_clean(d)


def test_multi_iothread_export_stays(start_daemon, image, tmpdir_short):
    """An export whose iothread is a list (QEMU 10.1's multi-threaded form,
    bexd's extension to 7.2) keeps its iothreads when its node moves, as
    QEMU 10.1's multi-threaded exports do: the command succeeds, clients go
    on, and the export still holds io0 (object-del refuses it)."""
    d, img, sock = nbd_daemon("bexd", start_daemon, image, tmpdir_short, iothread=None)
    q = d.qmp()
    q.execute("block-export-del", id="e")
    q.wait_event("BLOCK_EXPORT_DELETED")
    q.execute("block-export-add", type="nbd", id="e", node_name="r", name="d",
              writable=True, iothread=["io0", "io1"])
    with Verifier(sock, "d", nclients=2) as v:
        for t in ("io1", None, "io0", None):
            assert move(q, "r", t) == {}
            before = list(v.ops)
            while min(a - b for a, b in zip(v.ops, before)) < 5 and not v.errors:
                threading.Event().wait(0.01)
        e = q.error("object-del", id="io0")
        assert (e["class"], e["desc"]) == ("GenericError",
                                           "object 'io0' is in use, can not be deleted")
    assert v.errors == []
    v.close()
    v.check_file(img)
    stop_clean(d)


# ---- vhost-user-blk ----

VUB = os.environ.get("VUB_CLIENT", os.path.join(BUILD, "tests", "vhost", "vub-client"))


def vub_fill(n, seed):
    """vub-client's fill(): xorshift64 bytes."""
    x = (seed * 0x9e3779b97f4a7c15 + 1) & 0xFFFFFFFFFFFFFFFF
    out = bytearray(n)
    for i in range(n):
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        out[i] = x & 0xFF
    return bytes(out)


def vub_daemon(impl, start_daemon, image, tmpdir_short, iothread="io0"):
    needs.built(VUB, "vub-client")
    img = image(8 * MiB)
    sock = os.path.join(tmpdir_short, "vub.sock")
    exp = "type=vhost-user-blk,id=v,node-name=f,writable=on,addr.type=unix,addr.path=" + sock
    if iothread:
        exp += ",iothread=" + iothread
    d = start_daemon(impl, *(IOTHREADS + ["--blockdev", "driver=file,node-name=f,filename=" + img,
                                          "--export", exp]))
    return d, img, sock


def vub_verify_while(q, sock, targets, img, secs=3):
    """vub-client writes and reads back 64 KiB patterns for secs while the
    export moves through targets (cyclically); returns the number of moves."""
    p = subprocess.Popen([VUB, sock, "verify", str(secs)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, errors="replace")
    assert json.loads(p.stdout.readline()) == {"started": True}
    moves = 0
    while targets and p.poll() is None:
        assert move(q, "f", targets[moves % len(targets)]) == {}
        moves += 1
    out, err = p.communicate()
    res = json.loads(out)
    assert p.returncode == 0 and "error" not in res, (out, err)
    assert res["ios"] > 2
    with open(img, "rb") as f:          # a few blocks as the client left them
        for blk in (0, 1, 63):
            if res["seeds"][blk]:
                f.seek(blk * BLK)
                assert f.read(BLK) == vub_fill(BLK, res["seeds"][blk]), blk
    return moves


def test_vhost_moves_between_sessions(impl, start_daemon, image, tmpdir_short):
    """The export (its listener) moves between the iothreads and the main
    loop; front-ends connect after the moves and verify their I/O.  qsd
    7.2 aborts now and then when a front-end does I/O during a move, even
    between an iothread and the main loop, so with it every session runs
    while the export is in the main loop."""
    d, img, sock = vub_daemon(impl, start_daemon, image, tmpdir_short)
    q = d.qmp()
    for t in ["io1", None, "io0", None, "io1", None]:
        assert move(q, "f", t) == {}
        if t is None or impl == "bexd":
            assert vub_verify_while(q, sock, [], img, secs=0.3) == 0
    assert q.execute("query-block-exports") == [
        {"type": "vhost-user-blk", "id": "v", "node-name": "f", "shutting-down": False}]
    if impl == "bexd":
        stop_clean(d)


def test_vhost_move_under_io(start_daemon, image, tmpdir_short):
    """A front-end does verified I/O on its queue while the export moves
    between an iothread and the main loop, then reconnects and checks
    again (bexd: see above for qsd)."""
    d, img, sock = vub_daemon("bexd", start_daemon, image, tmpdir_short)
    q = d.qmp()
    assert vub_verify_while(q, sock, ["io1", None], img) > 3
    assert q.execute("query-block-exports") == [
        {"type": "vhost-user-blk", "id": "v", "node-name": "f", "shutting-down": False}]
    # the listener moved too: a new front-end is served
    assert vub_verify_while(q, sock, [None], img, secs=0.5) >= 1
    stop_clean(d)


def test_vhost_move_between_iothreads(start_daemon, image, tmpdir_short):
    """Iothread to iothread, back and forth under verified I/O, and a
    request stream that keeps the ring busy (bench) through 20 moves.
    bexd only: qsd 7.2 aborts on the first such move with I/O running."""
    d, img, sock = vub_daemon("bexd", start_daemon, image, tmpdir_short)
    q = d.qmp()
    tids = iothread_tids(q)
    assert vub_verify_while(q, sock, ["io1", "io0", None, "io0"], img) > 3
    p = subprocess.Popen([VUB, sock, "bench", "randwrite", "4096", "16",
                          "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, errors="replace")
    assert json.loads(p.stdout.readline()) == {"started": True}
    for k in range(20):
        assert move(q, "f", ["io1", "io0"][k % 2]) == {}
    # the queue ends up served by io0: its kicks are read there, none by io1
    reads_grow(d.pid, tids["io0"], 10)
    r0 = {t: thread_reads(d.pid, tids[t]) for t in tids}
    reads_grow(d.pid, tids["io0"], 100)
    r1 = {t: thread_reads(d.pid, tids[t]) for t in tids}
    assert r1["io1"] - r0["io1"] < 3, (r0, r1)
    p.kill()
    p.wait()
    stop_clean(d)


# ---- FUSE ----

fuse_only = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")


def is_mounted(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


@pytest.fixture
def fuse_daemon(start_daemon, image, tmpdir_short):
    mnts = []

    def start(impl, iothread="io0", extra=""):
        img = image(8 * MiB)
        mnt = os.path.join(tmpdir_short, "mnt")
        open(mnt, "w").close()
        mnts.append(mnt)
        exp = "type=fuse,id=fu,node-name=f,mountpoint=%s,writable=on%s" % (mnt, extra)
        if iothread:
            exp += ",iothread=" + iothread
        d = start_daemon(impl, *(IOTHREADS + ["--blockdev", "driver=file,node-name=f,filename="
                                              + img, "--export", exp]))
        assert is_mounted(mnt)
        return d, mnt, img

    yield start
    for mnt in mnts:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], stderr=subprocess.DEVNULL)


class FileVerifier(threading.Thread):
    """Writes a pattern through the mount, fsyncs, drops the page cache's
    copy (else the kernel answers the read itself) and reads it back, until
    stopped."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.stop = threading.Event()
        self.errors = []
        self.ops = 0
        self.last = {}

    def run(self):
        fd = os.open(self.path, os.O_RDWR)
        try:
            k = 0
            while not self.stop.is_set():
                off = (k % 32) * BLK
                data = bytes([k % 251 + 1]) * BLK
                try:
                    os.pwrite(fd, data, off)
                    self.last[off] = data
                    os.fsync(fd)
                    os.posix_fadvise(fd, off, BLK, os.POSIX_FADV_DONTNEED)
                    if os.pread(fd, BLK, off) != data:
                        self.errors.append("read back wrong at %d" % off)
                        return
                except OSError as e:
                    self.errors.append(str(e))
                    return
                k += 1
                self.ops = k
        finally:
            os.close(fd)


@fuse_only
def test_fuse_moves_between_requests(impl, fuse_daemon):
    """Moves between the iothreads and the main loop, the file written,
    synced and read back (its cached copy dropped) after each.  qsd 7.2
    aborts when its FUSE export moves with the file open or after it served
    a request in an iothread: with qsd the export only moves, and serves
    once it is back in the main loop."""
    d, mnt, img = fuse_daemon(impl, iothread=None)
    q = d.qmp()
    targets = ["io1", None, "io0", None, "io1", "io0", None]
    for k, t in enumerate(targets):
        assert move(q, "f", t) == {}
        if impl == "qsd" and k < len(targets) - 1:
            continue
        fd = os.open(mnt, os.O_RDWR)
        try:
            data = bytes([k + 1]) * BLK
            assert os.pwrite(fd, data, k * BLK) == BLK
            os.fsync(fd)
            os.posix_fadvise(fd, k * BLK, BLK, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, BLK, k * BLK) == data
        finally:
            os.close(fd)
    with open(img, "rb") as f:
        for k in range(len(targets)):
            f.seek(k * BLK)
            if impl == "bexd" or k == len(targets) - 1:
                assert f.read(BLK) == bytes([k + 1]) * BLK
    if impl == "bexd":
        stop_clean(d)


@fuse_only
def test_fuse_move_under_io(fuse_daemon):
    """A process writes, syncs and reads back through the mount while the
    export moves between the iothreads and the main loop 30 times, and the
    node grows now and then (bexd:
    qsd 7.2 dies on the first move with a request running)."""
    impl = "bexd"
    d, mnt, img = fuse_daemon(impl)
    q = d.qmp()
    v = FileVerifier(mnt)
    v.start()
    try:
        for k in range(30):
            assert move(q, "f", ["io1", None, "io0"][k % 3]) == {}
            if k % 10 == 9:
                # its notice to the kernel (a thread of its own, waiting for
                # page locks the verifier's requests hold) must not stall a move
                q.execute("block_resize", node_name="f", size=8 * MiB + (k + 1) * BLK)
            before = v.ops
            while v.ops == before and not v.errors and v.is_alive():
                threading.Event().wait(0.005)
    finally:
        v.stop.set()
        v.join(60)
    assert v.errors == [] and v.ops >= 30
    with open(img, "rb") as f:
        for off, data in v.last.items():
            f.seek(off)
            assert f.read(BLK) == data
    assert q.execute("query-block-exports") == [
        {"type": "fuse", "id": "fu", "node-name": "f", "shutting-down": False}]
    stop_clean(d)


@fuse_only
def test_fuse_uring_export_refused(fuse_daemon, uring_param):
    """Over io_uring (bexd's __org.bexd_io-uring) the rings stay in their
    loop: refused, nothing moved.  The kernel must allow the rings (with
    enable_uring N the export serves /dev/fuse and may move)."""
    uring_param(True)
    d, mnt, img = fuse_daemon("bexd", extra=",__org.bexd_io-uring=on")
    q = d.qmp()
    with pytest.raises(QMPError) as e:
        move(q, "f", "io1")
    assert (e.value.cls, e.value.desc) == (
        "GenericError", "Cannot move export 'fu': it is served over io_uring "
        "(__org.bexd_io-uring)")
    with open(mnt, "r+b") as f:
        f.write(b"x" * 4096)
    stop_clean(d)
