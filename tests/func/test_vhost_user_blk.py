"""vhost-user-blk export: options, data path, hostile front-ends, lifecycle.

Most scenarios run against bexd and qemu-storage-daemon (impl) through the
in-tree front-end tests/vhost/vub-client (it maps shared memory and drives
the rings itself, no guest needed).  Hostile rings and malformed vhost-user
messages run against bexd only: QEMU's libvhost-user handles some of them
by panicking the device, which is not a behaviour to match.  Real-guest
scenarios are in test_vhost_guest.py.
"""
import json
import os
import signal
import subprocess

import pytest

import needs
from conftest import BUILD, QMP, run_daemon_expect_fail, tool_text
from pagecache import unsynced_pages
from vubpattern import vub_pattern

VUB = os.environ.get("VUB_CLIENT", os.path.join(BUILD, "tests", "vhost", "vub-client"))
SIZE = 64 << 20
MiB = 1 << 20


def need_client():
    needs.built(VUB, "vub-client")


def file_range(img, off, length):
    with open(img, "rb") as f:
        f.seek(off)
        return f.read(length)


def vub(sock, *args, opts=(), check=True, env=None, binary=False):
    r = subprocess.run([VUB] + list(opts) + [sock] + [str(a) for a in args],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, env=env)
    if binary:
        return r
    out = tool_text(r.stdout).strip().splitlines()
    if check:
        assert r.returncode == 0, (r.returncode, out, tool_text(r.stderr))
    return json.loads(out[-1]) if out else None


def export_args(img, sock, extra="", ro=False, node_extra=""):
    node = "driver=file,node-name=disk,filename=%s%s" % (img, node_extra)
    if ro:
        node += ",read-only=on"
    exp = "type=vhost-user-blk,id=vub0,node-name=disk,addr.type=unix,addr.path=%s" % sock
    exp += ",writable=%s%s" % ("off" if ro else "on", extra)
    return ["--blockdev", node, "--export", exp]


@pytest.fixture
def served(start_daemon, image, tmpdir_short):
    """served(impl, extra='', ro=False) -> (daemon, sock, img)."""
    need_client()

    def start(impl, extra="", ro=False, data=None):
        img = image(SIZE, name="%s.img" % impl, data=data)
        sock = os.path.join(tmpdir_short, "%s.sock" % impl)
        d = start_daemon(impl, *export_args(img, sock, extra, ro))
        return d, sock, img
    return start


# ---- options ----------------------------------------------------------------------

BAD_OPTIONS = [
    ("addr.type=inet,addr.host=127.0.0.1,addr.port=1234",
     "Only socket address types 'unix' and 'fd' are supported"),
    ("addr.type=vsock,addr.cid=1,addr.port=2",
     "Only socket address types 'unix' and 'fd' are supported"),
    ("addr.type=unix,addr.path=@S@,num-queues=0", "num-queues must be greater than 0"),
    ("addr.type=unix,addr.path=@S@,logical-block-size=1000",
     "Property vub0.logical-block-size doesn't take value '1000', it's not a power of 2"),
    ("addr.type=unix,addr.path=@S@,logical-block-size=256",
     "Property vub0.logical-block-size doesn't take value 256 (minimum: 512, maximum: 2097152)"),
    ("addr.type=unix,addr.path=@S@,logical-block-size=4194304",
     "Property vub0.logical-block-size doesn't take value 4194304 (minimum: 512, maximum: 2097152)"),
    # checked before the address, as QEMU does
    ("addr.type=inet,addr.host=127.0.0.1,addr.port=1234,num-queues=0",
     "num-queues must be greater than 0"),
    ("addr.type=unix,addr.path=@S@,num-queues=0,logical-block-size=1000",
     "Property vub0.logical-block-size doesn't take value '1000', it's not a power of 2"),
]


@pytest.mark.parametrize("opts,msg", BAD_OPTIONS)
def test_bad_options_cli(impl, image, tmpdir_short, opts, msg):
    img = image(SIZE)
    opts = opts.replace("@S@", os.path.join(tmpdir_short, "x.sock"))
    arg = "type=vhost-user-blk,id=vub0,node-name=disk," + opts
    rc, err = run_daemon_expect_fail(impl, ["--blockdev", "driver=file,node-name=disk,filename=" + img,
                                            "--export", arg])
    assert rc == 1
    assert err.strip().endswith(": " + msg), err


def test_bad_options_qmp(impl, start_daemon, image, tmpdir_short):
    img = image(SIZE)
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=disk,filename=" + img)
    q = d.qmp()
    sock = os.path.join(tmpdir_short, "q.sock")
    base = {"type": "vhost-user-blk", "id": "vub0", "node-name": "disk"}
    e = q.error("block-export-add", **base, addr={"type": "inet", "host": "127.0.0.1", "port": "1"})
    assert (e["class"], e["desc"]) == ("GenericError", "Only socket address types 'unix' and 'fd' are supported")
    e = q.error("block-export-add", **base, addr={"type": "unix", "path": sock}, num_queues=0)
    assert e["desc"] == "num-queues must be greater than 0"
    e = q.error("block-export-add", **base, addr={"type": "unix", "path": sock}, logical_block_size=3000)
    assert e["desc"] == "Property vub0.logical-block-size doesn't take value '3000', it's not a power of 2"
    e = q.error("block-export-add", **base, addr={"type": "unix", "path": "/nonexistent/dir/s.sock"})
    assert e["desc"] == "Failed to bind socket to /nonexistent/dir/s.sock: No such file or directory"
    assert q.execute("query-block-exports") == []
    # a good one after the failures
    q.execute("block-export-add", **base, addr={"type": "unix", "path": sock})
    assert [x["id"] for x in q.execute("query-block-exports")] == ["vub0"]


def test_logical_block_size_zero_is_unset(impl, start_daemon, image, tmpdir_short):
    """logical-block-size=0 is accepted as "unset", on the command line and
    over QMP.  bexd then serves 512-byte blocks; qsd 7.2 tells the
    front-end 0 and dies of a division by zero on the first request, so
    only bexd's device is driven."""
    need_client()
    img = image(SIZE)
    sock = os.path.join(tmpdir_short, "z.sock")
    d = start_daemon(impl, *export_args(img, sock, ",logical-block-size=0"))
    q = d.qmp()
    sock2 = os.path.join(tmpdir_short, "z2.sock")
    q.execute("block-export-add", type="vhost-user-blk", id="vub1", node_name="disk",
              addr={"type": "unix", "path": sock2}, logical_block_size=0)
    assert sorted(x["id"] for x in q.execute("query-block-exports")) == ["vub0", "vub1"]
    if impl == "qsd":
        return
    for s in (sock, sock2):
        info = vub(s, "info")
        assert info["blk_size"] == 512
        assert info["discard_sector_alignment"] == 1
    assert vub(sock, "write", 512, 4096, 6) == {"status": 0}
    back = vub(sock, "read", 512, 4096, binary=True).stdout
    assert back == file_range(img, 512, 4096) == vub_pattern(4096, 6)


def test_writable_on_read_only_node(impl, image, tmpdir_short):
    img = image(SIZE)
    sock = os.path.join(tmpdir_short, "x.sock")
    rc, err = run_daemon_expect_fail(impl, export_args(img, sock, node_extra=",read-only=on"))
    assert rc == 1
    assert err.strip().endswith("Cannot export read-only node as writable"), err


# ---- device as the front-end sees it --------------------------------------------------

@pytest.mark.parametrize("lbs,nq", [(512, 1), (4096, 4)])
def test_config_space(impl, served, lbs, nq):
    d, sock, img = served(impl, ",logical-block-size=%d,num-queues=%d" % (lbs, nq))
    info = vub(sock, "info")
    assert info["capacity"] == SIZE // 512
    assert info["blk_size"] == lbs
    assert info["num_queues"] == nq
    assert info["seg_max"] == 126
    assert info["ro"] == 0
    assert info["wce"] == 0                      # write-through until the guest says otherwise
    assert info["discard_sector_alignment"] == lbs // 512
    assert info["max_discard_sectors"] == 32768
    assert info["max_write_zeroes_sectors"] == 32768
    feats = info["features"]
    for bit in (32, 28, 29, 12, 9, 13, 14, 11):   # VERSION_1 INDIRECT EVENT_IDX MQ FLUSH DISCARD WZ CONFIG_WCE
        assert feats & (1 << bit), bit


def test_read_only_export(impl, served):
    d, sock, img = served(impl, ro=True, data=b"\xab" * 4096)
    info = vub(sock, "info")
    assert info["ro"] == 1
    assert vub(sock, "write", 0, 4096, 1) == {"status": 1}          # IOERR
    r = vub(sock, "read", 0, 4096, binary=True)
    assert r.stdout == b"\xab" * 4096
    os.environ["VUB_FLAGS"] = "0"
    assert vub(sock, "req", 13, 0, 8) == {"status": 1}               # write zeroes: IOERR
    assert vub(sock, "req", 11, 0, 8) == {"status": 1}               # discard: IOERR


@pytest.mark.parametrize("indirect", [False, True])
def test_data_round_trip(impl, served, indirect):
    d, sock, img = served(impl, ",num-queues=2")
    opts = ["-i"] if indirect else []
    want = vub_pattern(256 << 10, 42)
    assert vub(sock, "write", 1 << 20, 256 << 10, 42, opts=opts) == {"status": 0}
    assert file_range(img, 1 << 20, 256 << 10) == want      # the pattern reached the file
    back = vub(sock, "read", 1 << 20, 256 << 10, opts=opts, binary=True).stdout
    assert back == want
    # and a read returns the file, not a copy of what was written: change
    # the file underneath (the daemon caches nothing: cache.direct=off reads
    # the page cache this write goes to)
    with open(img, "r+b") as f:
        f.seek((1 << 20) + 4096)
        f.write(b"\x5a" * 4096)
    back = vub(sock, "read", 1 << 20, 256 << 10, opts=opts, binary=True).stdout
    assert back == want[:4096] + b"\x5a" * 4096 + want[8192:]


def test_request_types(impl, served):
    d, sock, img = served(impl, data=b"\xff" * (1 << 20))
    assert vub(sock, "req", 8, 0, 20) == {"status": 0, "id": "vhost_user_blk"}
    assert vub(sock, "req", 4) == {"status": 0}                      # FLUSH
    assert vub(sock, "req", 0x1234) == {"status": 2}                 # unknown: UNSUPP
    assert vub(sock, "req", 0, SIZE // 512, 512) == {"status": 1}   # read past the end
    env = dict(os.environ, VUB_FLAGS="0")
    assert vub(sock, "req", 13, 8, 8, env=env) == {"status": 0}      # write zeroes sectors 8..15
    with open(img, "rb") as f:
        data = f.read(8192)
    assert data[:4096] == b"\xff" * 4096 and data[4096:] == b"\0" * 4096
    env1 = dict(os.environ, VUB_FLAGS="1")
    assert vub(sock, "req", 13, 0, 8, env=env1) == {"status": 0}     # with UNMAP
    assert vub(sock, "req", 11, 0, 8, env=env1) == {"status": 2}     # discard + UNMAP flag
    env4 = dict(os.environ, VUB_FLAGS="4")
    assert vub(sock, "req", 13, 0, 8, env=env4) == {"status": 2}     # unknown flag
    assert vub(sock, "req", 11, 0, 32769, env=env) == {"status": 1}  # discard too long
    assert vub(sock, "req", 11, 16, 8, env=env) == {"status": 0}


def test_misaligned_request_4k(impl, served):
    d, sock, img = served(impl, ",logical-block-size=4096")
    r = vub(sock, "hostile", "misaligned")
    assert r == {"completed": True, "status": 1, "connected": True}


# ---- hostile front-ends (bexd) ----------------------------------------------------------

# kind -> (head completed?, still connected?)
HOSTILE = {
    "desc-oob": (True, False), "desc-far": (True, False), "loop": (True, False),
    "next-oob": (True, False), "long-chain": (True, False), "read-after-write": (True, False),
    "indirect-bad-len": (True, False), "indirect-oob": (True, False),
    "indirect-nested": (True, False), "indirect-loop": (True, False),
    "head-oob": (False, False), "avail-jump": (False, False),
    "short-header": (True, True), "no-status": (True, True),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_ring(served, tmpdir_short, start_daemon, image, kind):
    d, sock, img = served("bexd")
    # a second export on the same daemon must not notice
    q = d.qmp()
    sock2 = os.path.join(tmpdir_short, "other.sock")
    q.execute("block-export-add", type="vhost-user-blk", id="other", node_name="disk",
              addr={"type": "unix", "path": sock2}, writable=True)
    r = vub(sock, "hostile", kind)
    completed, connected = HOSTILE[kind]
    assert r["completed"] == completed, r
    assert r["connected"] == connected, r
    assert r["status"] == 255                     # nothing was written to the guest
    assert d.alive()
    # the export takes the next front-end, and the other export serves on
    assert vub(sock, "info")["capacity"] == SIZE // 512
    assert vub(sock2, "write", 0, 4096, 3) == {"status": 0}
    assert vub(sock, "req", 0x99) == {"status": 2}


@pytest.mark.parametrize("kind,result,connected", [
    ("unknown", 1, True), ("wrong-size", 1, True), ("missing-fd", 1, True),
    ("mem-no-fds", 1, True), ("mem-too-big", 1, True), ("vring-index", 1, True),
    ("vring-num", 1, True), ("vring-addr-oob", 1, True), ("config-big", 0, True),
    ("oversize", -104, False), ("bad-version", -104, False),
])
def test_bad_message(served, kind, result, connected):
    d, sock, img = served("bexd")
    r = vub(sock, "badmsg", kind)
    assert r == {"result": result, "connected": connected}
    assert d.alive()
    assert vub(sock, "write", 0, 4096, 5) == {"status": 0}


# ---- lifecycle ----------------------------------------------------------------------------

def busy_client(sock):
    """A front-end driving random reads; returns once its first requests are queued."""
    p = subprocess.Popen([VUB, sock, "bench", "randread", "4096", "16", "30"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = p.stdout.readline()
    assert json.loads(line) == {"started": True}, line
    return p


def test_reconnect_after_kill(impl, served):
    """A front-end killed mid-I/O: the export listens again, no re-creation."""
    d, sock, img = served(impl)
    p = busy_client(sock)
    q = d.qmp()
    p.send_signal(signal.SIGKILL)
    p.wait()
    for i in range(3):
        assert vub(sock, "write", i * 4096, 4096, i) == {"status": 0}
    assert [x["id"] for x in q.execute("query-block-exports")] == ["vub0"]


@pytest.mark.parametrize("mode", ["safe", "hard"])
def test_export_del_with_client(impl, served, mode):
    """As qsd 7.2: a connected front-end does not make the export "in use";
    even a safe delete goes through and drops it."""
    d, sock, img = served(impl)
    p = busy_client(sock)
    q = d.qmp()
    q.execute("block-export-del", id="vub0", mode=mode)
    ev = q.wait_event("BLOCK_EXPORT_DELETED")
    assert ev["data"] == {"id": "vub0"}
    p.wait(timeout=30)
    assert q.execute("query-block-exports") == []
    assert not os.path.exists(sock)
    assert d.alive()


def test_export_del_idle_and_readd(impl, served):
    d, sock, img = served(impl)
    assert vub(sock, "write", 0, 4096, 9) == {"status": 0}
    q = d.qmp()
    q.execute("block-export-del", id="vub0")
    assert q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "vub0"}
    q.execute("block-export-add", type="vhost-user-blk", id="vub0", node_name="disk",
              addr={"type": "unix", "path": sock}, writable=True, num_queues=2)
    assert vub(sock, "info")["num_queues"] == 2


def test_iothread(impl, start_daemon, image, tmpdir_short):
    need_client()
    img = image(SIZE)
    sock = os.path.join(tmpdir_short, "io.sock")
    d = start_daemon(impl, "--object", "iothread,id=io0", *export_args(img, sock, ",iothread=io0,num-queues=2"))
    assert vub(sock, "write", 8192, 65536, 4, opts=["-q", "2"]) == {"status": 0}
    r = vub(sock, "read", 8192, 65536, binary=True).stdout
    assert r == file_range(img, 8192, 65536) == vub_pattern(65536, 4)
    r = vub(sock, "bench", "randread", 4096, 8, 0.3, opts=["-q", "2"])
    assert r["ios"] > 0


@pytest.mark.parametrize("writethrough", [True, False])
def test_writethrough(impl, start_daemon, image, tmpdir_short, writethrough):
    """writethrough=on makes every write durable before it completes (QEMU
    turns the export's write cache off: each write is followed by a flush
    below it).  Seen in the page cache: when the reply arrives, the pages
    written are neither dirty nor under writeback.  With the write cache on
    (the default) they stay dirty until the guest's FLUSH.  (QEMU's config
    space says wce=0 either way, so the device's config proves nothing.)"""
    need_client()
    img = image(SIZE, name="%s.img" % impl)
    sock = os.path.join(tmpdir_short, "%s.sock" % impl)
    start_daemon(impl, "--blockdev", "driver=file,node-name=f0,filename=" + img,
                 "--blockdev", "driver=raw,node-name=disk,file=f0",
                 "--export", "type=vhost-user-blk,id=vub0,node-name=disk,writable=on,"
                 "writethrough=%s,addr.type=unix,addr.path=%s" % ("on" if writethrough else "off",
                                                                 sock))
    assert vub(sock, "info")["wce"] == 0
    ln = 256 << 10
    for seed in range(11, 16):
        assert vub(sock, "write", MiB, ln, seed) == {"status": 0}
        assert file_range(img, MiB, ln) == vub_pattern(ln, seed)
        left = unsynced_pages(img, MiB, ln)
        if writethrough or left:
            break           # else the kernel wrote it back on its own: again
    if writethrough:
        assert left == 0, "a writethrough write was answered before it was durable"
    else:
        assert left > 0, "the kernel wrote every unflushed write back at once"
        assert vub(sock, "req", 4) == {"status": 0}                  # FLUSH
        assert unsynced_pages(img, MiB, ln) == 0


def test_fd_address(impl, image, tmpdir_short):
    """addr.type=fd: a listening socket inherited from the parent."""
    import socket
    from conftest import IMPLS, adopting, stop_daemonized
    need_client()
    img = image(SIZE)
    path = os.path.join(tmpdir_short, "fd.sock")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(1)
    fd = ls.fileno()
    pidfile = os.path.join(tmpdir_short, "fd.pid")
    with adopting():
        r = subprocess.run([IMPLS[impl], "--blockdev",
                            "driver=file,node-name=disk,filename=" + img,
                            "--export", "type=vhost-user-blk,id=vub0,node-name=disk,writable=on,"
                            "addr.type=fd,addr.str=%d" % fd, "--daemonize", "--pidfile", pidfile],
                           pass_fds=[fd], capture_output=True, timeout=30)
    ls.close()
    assert r.returncode == 0, r.stderr
    pid = int(open(pidfile).read())
    try:
        assert vub(path, "write", 0, 4096, 8) == {"status": 0}
        assert vub(path, "info")["capacity"] == SIZE // 512      # and again: listens again
    finally:
        stop_daemonized(impl, pid, log=r.stderr)


def test_fd_address_not_a_socket(impl, image):
    img = image(SIZE)
    rc, err = run_daemon_expect_fail(impl, ["--blockdev", "driver=file,node-name=disk,filename=" + img,
                                            "--export", "type=vhost-user-blk,id=vub0,node-name=disk,"
                                            "addr.type=fd,addr.str=99"])
    assert rc == 1
    assert err.strip().endswith(": File descriptor '99' is not a socket"), err
