"""The nbd block driver (an NBD client node), as QEMU 7.2's.

blockdev-add driver=nbd with BlockdevOptionsNbd (server, export,
tls-creds, tls-hostname, x-dirty-bitmap, reconnect-delay, open-timeout)
connects a node of the daemon under test to an NBD server.  The server is a
second daemon of the same kind (`impl`), so every scenario runs daemon to
daemon: bexd to bexd, and qemu-storage-daemon to qemu-storage-daemon (the
reference).  The node is seen through what the daemon does with it:

  - blockdev-add errors, in QEMU 7.2's class and words;
  - query-named-block-nodes: drv "nbd", the pseudo-filename QEMU makes
    (nbd+unix:///EXP?socket=PATH, nbd://HOST:PORT/EXP, and the forms
    without an export name), the export's size, read-only;
  - the node exported again over NBD by the client daemon (block-export-add
    type=nbd): libnbd writes, reads, zeroes, trims and flushes through both
    hops, block status and x-dirty-bitmap's bitmap pass through, and the
    server's image holds the data once both daemons stop;
  - the server going away (EIO, the client daemon stays up) and coming
    back (reconnect-delay);
  - blockdev-mirror and blockdev-backup onto an nbd node (storage
    migration and push backup, as libvirt runs them);
  - TLS with x509 certificates and PSK, and the handshake errors;
  - blockdev-del closes the connection (the server's export is free again).

Clients of the re-export that must see an I/O error use simple replies:
qemu-storage-daemon's NBD server (7.2) drops a structured-reply client
whose READ fails after its hole check passed (nbd_co_send_sparse_read
returns the read error to nbd_trip, which disconnects) instead of sending
an error chunk; that is the re-export's server, not the nbd node, and not
what these tests are about.
"""
import json
import os
import socket
import subprocess
import time

import pytest

import nbd  # noqa: E402 (python3-libnbd, which scripts/deps.sh installs)

import needs
import tlscerts
from conftest import LATE, TIMER_EARLY, tool_json
from nbdwire import free_tcp_port, pattern

MiB = 1 << 20
SIZE = 8 * MiB
G = "GenericError"


# -- helpers ------------------------------------------------------------------

def poll(cond, what, timeout=10):
    """cond() until it is true (returned), failing after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        r = cond()
        if r:
            return r
        if time.monotonic() > deadline:
            pytest.fail("no %s within %g s" % (what, timeout))
        time.sleep(0.02)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def write_image(path, data=None, size=SIZE, extents=()):
    """A raw image: `data` from offset 0, or sparse with pattern data at
    the (offset, length) extents."""
    with open(path, "wb") as f:
        f.truncate(size)
        if data is not None:
            f.write(data)
        for off, ln in extents:
            f.seek(off)
            f.write(pattern(ln, seed=off % 97))
    return path


class Server:
    """A daemon of `impl` serving `img` over NBD: export `name` of node
    disk0 (writable or not).  restart() starts the same daemon again on
    the same socket (after stop())."""

    def __init__(self, start_daemon, impl, d, img, name="disk0", writable=True,
                 objects=(), server_opts="", node_opts="", tcp=False, exports=True, tag="s"):
        self.start_daemon, self.impl, self.img, self.name = start_daemon, impl, img, name
        if tcp:
            self.port = free_tcp_port()
            addr = "addr.type=inet,addr.host=127.0.0.1,addr.port=%d" % self.port
            self.addr = {"type": "inet", "host": "127.0.0.1", "port": str(self.port)}
        else:
            self.sock = os.path.join(d, "%s.sock" % tag)
            addr = "addr.type=unix,addr.path=%s" % self.sock
            self.addr = {"type": "unix", "path": self.sock}
        self.args = []
        for o in objects:
            self.args += ["--object", o]
        self.args += ["--blockdev", "driver=file,node-name=disk0,filename=%s%s" % (img, node_opts),
                      "--nbd-server", addr + server_opts]
        if exports:
            self.args += ["--export", "type=nbd,id=exp0,node-name=disk0,name=%s,writable=%s"
                          % (name, "on" if writable else "off")]
        self.start()

    def start(self):
        self.daemon = self.start_daemon(self.impl, *self.args)
        self.q = self.daemon.qmp()

    def stop(self):
        self.daemon.stop()

    def restart(self):
        self.start()

    def filename(self, export="disk0"):
        if self.addr["type"] == "unix":
            return "nbd+unix:///%s?socket=%s" % (export, self.sock)
        return "nbd://127.0.0.1:%d/%s" % (self.port, export)


class Client:
    """A daemon of `impl` (no nodes) with an NBD server of its own on a
    UNIX socket, to export its nbd nodes again."""

    def __init__(self, start_daemon, impl, d, objects=()):
        self.sock = os.path.join(d, "c.sock")
        args = []
        for o in objects:
            args += ["--object", o]
        self.daemon = start_daemon(impl, *args,
                                   "--nbd-server", "addr.type=unix,addr.path=%s" % self.sock)
        self.q = self.daemon.qmp()

    def add(self, server, node="n", **opts):
        self.q.execute("blockdev-add", driver="nbd", node_name=node, server=server.addr, **opts)

    def add_error(self, addr, node="n", **opts):
        """blockdev-add that must fail -> (class, desc)."""
        e = self.q.error("blockdev-add", driver="nbd", node_name=node, server=addr, **opts)
        return e["class"], e["desc"]

    def reexport(self, node="n", name="re", writable=True):
        self.q.execute("block-export-add", type="nbd", id=name, node_name=node, name=name,
                       writable=writable)
        return self.uri(name)

    def uri(self, name="re"):
        return "nbd+unix:///%s?socket=%s" % (name, self.sock)

    def nodes(self):
        return {n["node-name"]: n for n in self.q.execute("query-named-block-nodes", flat=True)}


def handle(uri, structured=True):
    h = nbd.NBD()
    if not structured:
        h.set_request_structured_replies(False)
    h.connect_uri(uri)
    return h


def extents(uri):
    """base:allocation of the whole export: merged (offset, length, flags)."""
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    size = h.get_size()
    out = []
    off = 0
    while off < size:
        got = []

        def cb(ctx, start, ents, err):
            if ctx == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(ents)
            return 0
        h.block_status(size - off, off, cb)
        assert got, "no extent at %d" % off
        for i in range(0, len(got), 2):
            ln, fl = min(got[i], size - off), got[i + 1]
            if out and out[-1][2] == fl:
                out[-1] = (out[-1][0], out[-1][1] + ln, fl)
            else:
                out.append((off, ln, fl))
            off += ln
            if off >= size:
                break
    h.shutdown()
    return out


def qemu_img_map(uri):
    r = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", uri],
                       stdout=subprocess.PIPE, check=True)
    return [(e["start"], e["length"], e["present"], e["zero"], e["data"])
            for e in tool_json(r.stdout)]


def eio(fn, *args):
    with pytest.raises(nbd.Error) as e:
        fn(*args)
    assert e.value.errno == "EIO", e.value
    return e.value


def node_view(n):
    return {k: n[k] for k in ("drv", "file", "ro", "image", "backing_file_depth", "encrypted")}


def node_of(filename, size, ro=False):
    return {"drv": "nbd", "file": filename, "ro": ro, "backing_file_depth": 0,
            "encrypted": False,
            "image": {"virtual-size": size, "filename": filename, "format": "nbd"}}


# -- blockdev-add errors -------------------------------------------------------

def test_open_errors(impl, start_daemon, tmpdir_short):
    img = write_image(os.path.join(tmpdir_short, "s.img"), pattern(SIZE))
    srv = Server(start_daemon, impl, tmpdir_short, img, name="rw")
    srv.q.execute("block-export-add", type="nbd", id="ro", node_name="disk0", name="ro")
    c = Client(start_daemon, impl, tmpdir_short,
               objects=["secret,id=sec0,data=x"])
    nosock = os.path.join(tmpdir_short, "nosuch.sock")
    u = {"type": "unix", "path": nosock}
    assert c.add_error(u, export="rw") == \
        (G, "Failed to connect to '%s': No such file or directory" % nosock)
    assert c.add_error({"type": "inet", "host": "127.0.0.1", "port": "1"}, export="rw") == \
        (G, "Failed to connect to '127.0.0.1:1': Connection refused")
    assert c.add_error({"type": "inet", "host": "127.0.0.1", "port": "nosuchservice"},
                       export="rw") == \
        (G, "address resolution failed for 127.0.0.1:nosuchservice: "
            "Servname not supported for ai_socktype")
    assert c.add_error(srv.addr, export="nope") == (G, "Requested export not available")
    assert c.add_error(srv.addr) == (G, "Requested export not available")
    assert c.add_error(srv.addr, export="x" * 4097) == \
        (G, "export name too long to send to server")
    assert c.add_error(srv.addr, export="ro") == (G, "Could not open image: Permission denied")
    for bitmap in ("qemu:dirty-bitmap:nosuch", "qemu:allocation-depth", ""):
        assert c.add_error(srv.addr, export="rw", read_only=True, x_dirty_bitmap=bitmap) == \
            (G, "Could not open image: Invalid argument"), bitmap
    # credentials are looked up before connecting
    assert c.add_error(u, export="rw", tls_creds="nosuch") == \
        (G, "No TLS credentials with id 'nosuch'")
    assert c.add_error(u, export="rw", tls_creds="sec0") == \
        (G, "Object with id 'sec0' is not TLS credentials")
    # schema
    e = c.q.error("blockdev-add", driver="nbd", node_name="n", export="rw")
    assert (e["class"], e["desc"]) == (G, "Parameter 'server' is missing")
    assert c.add_error({"type": "inet", "host": "127.0.0.1"}, export="rw") == \
        (G, "Parameter 'server.port' is missing")
    assert c.add_error(srv.addr, export="rw", reconnect_delay=-1) == \
        (G, "Parameter 'reconnect-delay' expects uint32_t")
    assert c.nodes() == {}
    # a node name taken
    c.add(srv, node="n", export="rw")
    assert c.add_error(srv.addr, node="n", export="rw") == \
        (G, "Duplicate nodes with node-name='n'")
    assert list(c.nodes()) == ["n"]


def test_open_timeout(impl, start_daemon, tmpdir_short):
    """open-timeout: blockdev-add keeps trying to connect for that long; a
    server that appears meanwhile is taken, none at all fails the command
    with the last attempt's error once the time is up."""
    c = Client(start_daemon, impl, tmpdir_short)
    nosock = os.path.join(tmpdir_short, "nosuch.sock")
    t0 = time.monotonic()
    assert c.add_error({"type": "unix", "path": nosock}, export="disk0", open_timeout=1) == \
        (G, "Failed to connect to '%s': No such file or directory" % nosock)
    took = time.monotonic() - t0
    assert 1 - TIMER_EARLY <= took <= 1 + LATE, took
    # the server starts while blockdev-add waits
    img = write_image(os.path.join(tmpdir_short, "s.img"), pattern(SIZE))
    sock = os.path.join(tmpdir_short, "s.sock")
    c.q.send_raw(json.dumps({"execute": "blockdev-add", "arguments": {
        "driver": "nbd", "node-name": "n", "export": "disk0", "open-timeout": 10,
        "server": {"type": "unix", "path": sock}}}) + "\n")
    srv = Server(start_daemon, impl, tmpdir_short, img)
    assert srv.sock == sock
    assert c.q.recv_response() == {"return": {}}
    assert node_view(c.nodes()["n"]) == node_of(srv.filename(), SIZE)
    h = handle(c.reexport("n"))
    assert h.pread(4096, 0) == pattern(4096)
    h.shutdown()
    c.daemon.stop()


# -- the node listing ----------------------------------------------------------

def test_node_listing(impl, start_daemon, tmpdir_short):
    img = write_image(os.path.join(tmpdir_short, "s.img"), pattern(64 * 1024), size=6 * MiB)
    unix = Server(start_daemon, impl, tmpdir_short, img, name="disk0", tag="u")
    uq = unix.q
    uq.execute("block-export-add", type="nbd", id="noname", node_name="disk0", name="",
               writable=True)
    uq.execute("block-export-add", type="nbd", id="ro", node_name="disk0", name="ro")
    tcp = Server(start_daemon, impl, tmpdir_short, img, name="disk0", tcp=True,
                 node_opts=",locking=off")
    tcp.q.execute("block-export-add", type="nbd", id="noname", node_name="disk0", name="",
                  writable=True)
    c = Client(start_daemon, impl, tmpdir_short)
    size = 6 * MiB
    c.add(unix, node="a", export="disk0")
    c.add(unix, node="b")                              # no export: the "" export
    c.add(unix, node="c", export="")
    c.add(unix, node="d", export="disk0", read_only=True)
    c.add(unix, node="e", export="ro", auto_read_only=True)   # read-only export
    c.add(unix, node="f", export="disk0", reconnect_delay=3, open_timeout=2,
          tls_hostname="ignored-without-tls-creds")
    c.add(tcp, node="g", export="disk0")
    c.add(tcp, node="h")
    s = unix.sock
    p = tcp.port
    want = {
        "a": node_of("nbd+unix:///disk0?socket=%s" % s, size),
        "b": node_of("nbd+unix://?socket=%s" % s, size),
        "c": node_of("nbd+unix:///?socket=%s" % s, size),
        "d": node_of("nbd+unix:///disk0?socket=%s" % s, size, ro=True),
        "e": node_of("nbd+unix:///ro?socket=%s" % s, size, ro=True),
        "f": node_of("nbd+unix:///disk0?socket=%s" % s, size),
        "g": node_of("nbd://127.0.0.1:%d/disk0" % p, size),
        "h": node_of("nbd://127.0.0.1:%d" % p, size),
    }
    got = c.nodes()
    assert {k: node_view(v) for k, v in got.items()} == want
    for n in got.values():
        assert "actual-size" not in n["image"]
    # the non-flat listing says the same of a root node
    assert {n["node-name"]: node_view(n) for n in c.q.execute("query-named-block-nodes")} == want
    # a read-only node cannot be exported writable; a writable one can
    e = c.q.error("block-export-add", type="nbd", id="x", node_name="d", writable=True)
    assert (e["class"], e["desc"]) == (G, "Cannot export read-only node as writable")
    c.reexport("a")
    assert nbd_size(c.uri()) == size
    # (first: closing node f once its server is gone would wait out its
    # reconnect-delay, 3 s, in QEMU's final flush)
    c.daemon.stop()


def nbd_size(uri):
    h = handle(uri)
    try:
        return h.get_size()
    finally:
        h.shutdown()


def test_node_listing_ipv6(impl, start_daemon, tmpdir_short):
    if not needs.ipv6_loopback():
        pytest.skip("no IPv6 loopback on this host")
    img = write_image(os.path.join(tmpdir_short, "s.img"), size=2 * MiB)
    port = free_tcp_port(socket.AF_INET6, "::1")
    start_daemon(impl, "--blockdev", "driver=file,node-name=disk0,filename=%s" % img,
                 "--nbd-server", "addr.type=inet,addr.host=::1,addr.port=%d" % port,
                 "--export", "type=nbd,id=exp0,node-name=disk0,name=e")
    c = Client(start_daemon, impl, tmpdir_short)
    c.q.execute("blockdev-add", driver="nbd", node_name="n", read_only=True, export="e",
                server={"type": "inet", "host": "::1", "port": str(port)})
    # QEMU 7.2 prints the host as given, without brackets
    assert node_view(c.nodes()["n"]) == node_of("nbd://::1:%d/e" % port, 2 * MiB, ro=True)


# -- data through the node -----------------------------------------------------

def test_data_through_reexport(impl, start_daemon, tmpdir_short):
    """Writes of every shape, zeroes, trims and flushes through a
    re-export of the nbd node reach the server's image."""
    model = bytearray(pattern(SIZE, seed=2))
    img = write_image(os.path.join(tmpdir_short, "s.img"), bytes(model))
    srv = Server(start_daemon, impl, tmpdir_short, img, node_opts=",discard=unmap")
    c = Client(start_daemon, impl, tmpdir_short)
    c.add(srv, node="n", export="disk0", discard="unmap")
    c.add(srv, node="keep", export="disk0")          # discard=ignore (the default)
    uri = c.reexport("n")
    uri_keep = c.reexport("keep", name="keep")
    h = handle(uri)
    assert h.get_size() == SIZE
    assert h.pread(SIZE, 0) == model
    assert h.can_trim() and h.can_zero() and h.can_flush() and h.can_fua()

    def write(off, data, flags=0):
        h.pwrite(data, off, flags)
        model[off:off + len(data)] = data
    write(1000, b"\x5a")                                  # one byte, unaligned
    write(4095, b"ab")                                   # across a 4k boundary
    write(2 * MiB + 17, pattern(4 * MiB, seed=9))        # 4 MiB, unaligned
    write(SIZE - 3, b"end")                              # the last bytes
    write(513, b"fua" * 100, nbd.CMD_FLAG_FUA)
    h.zero(64 * 1024, 6 * MiB + 64 * 1024)
    model[6 * MiB + 64 * 1024:6 * MiB + 128 * 1024] = bytes(64 * 1024)
    h.zero(5000, 6 * MiB + 300 * 1024 + 7, nbd.CMD_FLAG_NO_HOLE)
    model[6 * MiB + 300 * 1024 + 7:6 * MiB + 300 * 1024 + 5007] = bytes(5000)
    trimmed = (7 * MiB, 128 * 1024)
    h.trim(trimmed[1], trimmed[0])
    model[trimmed[0]:trimmed[0] + trimmed[1]] = bytes(trimmed[1])   # a hole on the server
    h.flush()
    assert h.pread(SIZE, 0) == model
    assert h.pread(1, 1000) == b"\x5a"
    # discard=ignore on the nbd node: the trim stops there
    k = handle(uri_keep)
    k.trim(64 * 1024, 7 * MiB + 512 * 1024)
    k.flush()
    assert k.pread(64 * 1024, 7 * MiB + 512 * 1024) == model[7 * MiB + 512 * 1024:
                                                             7 * MiB + 576 * 1024]
    k.shutdown()
    h.shutdown()
    c.daemon.stop()
    srv.stop()
    assert read_file(img) == model
    # the trim reached the file (discard=unmap on both nodes)
    with open(img, "rb") as f:
        fd = f.fileno()
        assert os.lseek(fd, trimmed[0], os.SEEK_HOLE) == trimmed[0]
        assert os.lseek(fd, trimmed[0], os.SEEK_DATA) == trimmed[0] + trimmed[1]


def test_block_status_passes_through(impl, start_daemon, tmpdir_short):
    img = write_image(os.path.join(tmpdir_short, "s.img"),
                      extents=[(1 * MiB, 64 * 1024), (4 * MiB, 1 * MiB)])
    srv = Server(start_daemon, impl, tmpdir_short, img)
    c = Client(start_daemon, impl, tmpdir_short)
    c.add(srv, node="n", export="disk0", read_only=True)
    uri = c.reexport("n", writable=False)
    HZ = nbd.STATE_HOLE | nbd.STATE_ZERO
    assert extents(uri) == [
        (0, 1 * MiB, HZ),
        (1 * MiB, 64 * 1024, 0),
        (1 * MiB + 64 * 1024, 3 * MiB - 64 * 1024, HZ),
        (4 * MiB, 1 * MiB, 0),
        (5 * MiB, 3 * MiB, HZ)]
    assert qemu_img_map(uri) == [
        (0, 1048576, True, True, False),
        (1048576, 65536, True, False, True),
        (1114112, 3080192, True, True, False),
        (4194304, 1048576, True, False, True),
        (5242880, 3145728, True, True, False)]
    h = handle(uri)
    assert h.pread(64 * 1024, 1 * MiB) == pattern(64 * 1024, seed=(1 * MiB) % 97)
    assert h.pread(4096, 2 * MiB) == bytes(4096)
    h.shutdown()


def test_x_dirty_bitmap(impl, start_daemon, tmpdir_short):
    """x-dirty-bitmap: the node's block status is the bitmap's, in QEMU's
    sense: a dirty area is reported as a hole that is not zero (flags 1;
    qemu-img map: present, data and zero all false), a clean one as data.
    Reads still return the image's data."""
    img = write_image(os.path.join(tmpdir_short, "s.img"), pattern(2 * MiB))
    srv = Server(start_daemon, impl, tmpdir_short, img, exports=False)
    sq = srv.q
    sq.execute("block-dirty-bitmap-add", node="disk0", name="b", granularity=65536)
    sq.execute("block-export-add", type="nbd", id="w", node_name="disk0", name="w",
               writable=True)
    w = handle("nbd+unix:///w?socket=%s" % srv.sock)
    w.pwrite(b"a" * 100, 3 * MiB + 10)
    w.pwrite(b"b" * (128 * 1024), 5 * MiB)
    w.shutdown()
    sq.execute("block-export-add", type="nbd", id="exp0", node_name="disk0", name="disk0",
               writable=True, bitmaps=["b"])
    c = Client(start_daemon, impl, tmpdir_short)
    c.add(srv, node="n", export="disk0", read_only=True, x_dirty_bitmap="qemu:dirty-bitmap:b")
    assert node_view(c.nodes()["n"]) == \
        node_of("nbd+unix:///disk0?socket=%s" % srv.sock, SIZE, ro=True)
    uri = c.reexport("n", writable=False)
    assert extents(uri) == [
        (0, 3 * MiB, 0),
        (3 * MiB, 64 * 1024, nbd.STATE_HOLE),
        (3 * MiB + 64 * 1024, 2 * MiB - 64 * 1024, 0),
        (5 * MiB, 128 * 1024, nbd.STATE_HOLE),
        (5 * MiB + 128 * 1024, 3 * MiB - 128 * 1024, 0)]
    assert qemu_img_map(uri) == [
        (0, 3145728, True, False, True),
        (3145728, 65536, False, False, False),
        (3211264, 2031616, True, False, True),
        (5242880, 131072, False, False, False),
        (5373952, 3014656, True, False, True)]
    h = handle(uri)
    assert h.pread(100, 3 * MiB + 10) == b"a" * 100
    assert h.pread(16, 0) == pattern(16)
    h.shutdown()
    # base:allocation named as x-dirty-bitmap: the server's own status
    c.add(srv, node="m", export="disk0", read_only=True, x_dirty_bitmap="base:allocation")
    uri = c.reexport("m", name="m", writable=False)
    assert [(o, n, f & nbd.STATE_HOLE) for o, n, f in extents(uri)] == \
        [(0, 2 * MiB, 0), (2 * MiB, 1 * MiB, nbd.STATE_HOLE), (3 * MiB, 4096, 0),
         (3 * MiB + 4096, 2 * MiB - 4096, nbd.STATE_HOLE), (5 * MiB, 128 * 1024, 0),
         (5 * MiB + 128 * 1024, 3 * MiB - 128 * 1024, nbd.STATE_HOLE)]


# -- the server goes away --------------------------------------------------------

def test_server_gone(impl, start_daemon, tmpdir_short):
    """Without reconnect-delay: every request fails with EIO at once; the
    client daemon goes on, and its node can be removed."""
    img = write_image(os.path.join(tmpdir_short, "s.img"), pattern(SIZE))
    srv = Server(start_daemon, impl, tmpdir_short, img)
    c = Client(start_daemon, impl, tmpdir_short)
    c.add(srv, node="n", export="disk0")
    uri = c.reexport("n")
    h = handle(uri, structured=False)
    assert h.pread(16, 0) == pattern(16)
    srv.stop()
    eio(h.pread, 16, 0)
    eio(h.pread, 4096, 4 * MiB)
    eio(h.pwrite, b"x" * 512, 0)
    eio(h.flush)
    assert c.daemon.alive()
    assert node_view(c.nodes()["n"]) == node_of(srv.filename(), SIZE)
    assert [e["id"] for e in c.q.execute("query-block-exports")] == ["re"]
    h.shutdown()
    c.q.execute("block-export-del", id="re")
    c.q.wait_event("BLOCK_EXPORT_DELETED")
    c.q.execute("blockdev-del", node_name="n")
    assert c.nodes() == {}
    c.daemon.stop()
    assert read_file(img) == pattern(SIZE)


def test_reconnect_delay(impl, start_daemon, tmpdir_short):
    """reconnect-delay 5: the server stops and starts again on the same
    socket; the next requests go to the new server as if nothing
    happened."""
    img = write_image(os.path.join(tmpdir_short, "s.img"), pattern(SIZE))
    srv = Server(start_daemon, impl, tmpdir_short, img)
    c = Client(start_daemon, impl, tmpdir_short)
    c.add(srv, node="n", export="disk0", reconnect_delay=5)
    h = handle(c.reexport("n"), structured=False)
    assert h.pread(16, 0) == pattern(16)
    srv.stop()
    srv.restart()
    assert h.pread(4096, 4 * MiB) == pattern(SIZE)[4 * MiB:4 * MiB + 4096]
    h.pwrite(b"after", 100)
    h.flush()
    assert h.pread(5, 100) == b"after"
    # and once more, a write first
    srv.stop()
    srv.restart()
    h.pwrite(b"again", 200)
    h.flush()
    h.shutdown()
    c.daemon.stop()
    srv.stop()
    want = bytearray(pattern(SIZE))
    want[100:105] = b"after"
    want[200:205] = b"again"
    assert read_file(img) == want


def test_reconnect_without_delay(impl, start_daemon, tmpdir_short):
    """Without reconnect-delay QEMU still reconnects, but fails the
    requests meanwhile: the request that finds the connection dead fails
    with EIO, and a later one reaches the server again."""
    img = write_image(os.path.join(tmpdir_short, "s.img"), pattern(SIZE))
    srv = Server(start_daemon, impl, tmpdir_short, img)
    c = Client(start_daemon, impl, tmpdir_short)
    c.add(srv, node="n", export="disk0")
    h = handle(c.reexport("n"), structured=False)
    assert h.pread(16, 0) == pattern(16)
    srv.stop()
    srv.restart()
    eio(h.pread, 16, 0)

    def read_ok():
        try:
            return h.pread(16, 0) == pattern(16)
        except nbd.Error as e:
            assert e.errno == "EIO", e
            return False
    poll(read_ok, "read after the server came back")
    h.pwrite(b"back", 0)
    h.flush()
    h.shutdown()
    c.daemon.stop()
    srv.stop()
    assert read_file(img)[:4] == b"back"


def test_reconnect_delay_expires(impl, start_daemon, tmpdir_short):
    """A request while the server is away waits until reconnect-delay has
    passed since the disconnect, then fails with EIO; later requests fail
    without waiting.  (QEMU 7.2 notices the disconnect only when a request
    finds it, and starts the delay then: its first request waits the whole
    delay.  A client that notices it at once, while idle, waits less; both
    are bounded below by the moment the server went away.)"""
    img = write_image(os.path.join(tmpdir_short, "s.img"), pattern(SIZE))
    srv = Server(start_daemon, impl, tmpdir_short, img)
    c = Client(start_daemon, impl, tmpdir_short)
    c.add(srv, node="n", export="disk0", reconnect_delay=1)
    h = handle(c.reexport("n"), structured=False)
    assert h.pread(16, 0) == pattern(16)
    gone = time.monotonic()          # the disconnect cannot come before this
    srv.stop()
    t0 = time.monotonic()
    eio(h.pread, 16, 0)
    t1 = time.monotonic()
    assert t1 - gone >= 1 - TIMER_EARLY, t1 - gone
    assert t1 - t0 <= 1 + LATE, t1 - t0
    t0 = time.monotonic()
    eio(h.pread, 16, 0)
    assert time.monotonic() - t0 < 1 - TIMER_EARLY
    assert c.q.execute("query-block-exports")[0]["id"] == "re"
    h.shutdown()


# -- jobs onto an nbd node --------------------------------------------------------

def job_pair(start_daemon, impl, d):
    """src: a daemon with a local raw image holding data; tgt: a daemon
    exporting an empty image writable.  src gets node t, an nbd node to
    tgt's export."""
    want = bytearray(SIZE)
    want[0:1 * MiB] = pattern(1 * MiB, seed=4)
    want[5 * MiB:5 * MiB + 512 * 1024] = pattern(512 * 1024, seed=3)
    want[SIZE - 4096:] = pattern(4096, seed=6)
    src = write_image(os.path.join(d, "src.img"))
    with open(src, "r+b") as f:            # sparse: data in three places
        for off, ln in ((0, 1 * MiB), (5 * MiB, 512 * 1024), (SIZE - 4096, 4096)):
            f.seek(off)
            f.write(want[off:off + ln])
    tgt_img = write_image(os.path.join(d, "tgt.img"), size=SIZE)
    with open(tgt_img, "r+b") as f:         # junk where the source has a hole
        f.seek(3 * MiB)
        f.write(b"\xff" * 65536)
    tgt = Server(start_daemon, impl, d, tgt_img, tag="t")
    s = start_daemon(impl, "--blockdev", "driver=file,node-name=src,filename=%s" % src)
    q = s.qmp()
    q.execute("blockdev-add", driver="nbd", node_name="t", server=tgt.addr, export="disk0")
    return s, q, tgt, src, tgt_img, bytes(want)


def compare(a, b):
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                       stdout=subprocess.PIPE)
    assert r.returncode == 0, r.stdout


def test_mirror_onto_nbd(impl, start_daemon, tmpdir_short):
    s, q, tgt, src, tgt_img, want = job_pair(start_daemon, impl, tmpdir_short)
    q.execute("blockdev-mirror", job_id="m", device="src", target="t", sync="full")
    ev = q.wait_event("BLOCK_JOB_READY")["data"]
    assert ev == {"device": "m", "len": SIZE, "offset": SIZE, "speed": 0, "type": "mirror"}
    e = q.error("blockdev-del", node_name="t")
    assert (e["class"], e["desc"]) == (G, "Node t is in use")
    q.execute("block-job-complete", device="m")
    ev = q.wait_event("BLOCK_JOB_COMPLETED")["data"]
    assert ev == {"device": "m", "len": SIZE, "offset": SIZE, "speed": 0, "type": "mirror"}
    q.execute("blockdev-del", node_name="t")
    s.stop()
    tgt.stop()
    compare(src, tgt_img)
    assert read_file(tgt_img) == want


def test_backup_onto_nbd(impl, start_daemon, tmpdir_short):
    s, q, tgt, src, tgt_img, want = job_pair(start_daemon, impl, tmpdir_short)
    q.execute("blockdev-backup", job_id="b", device="src", target="t", sync="full")
    ev = q.wait_event("BLOCK_JOB_COMPLETED")["data"]
    assert ev == {"device": "b", "len": SIZE, "offset": SIZE, "speed": 0, "type": "backup"}
    q.execute("blockdev-del", node_name="t")
    s.stop()
    tgt.stop()
    compare(src, tgt_img)
    assert read_file(tgt_img) == want


# -- TLS ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    needs.tool("certtool", "gnutls-bin")
    needs.tool("psktool", "gnutls-bin")
    return tlscerts.make_credentials(str(tmp_path_factory.mktemp("tls")))


def x509_server(creds):
    return "tls-creds-x509,id=tls0,endpoint=server,dir=%s" % creds.server


def psk_server(creds):
    return "tls-creds-psk,id=tls0,endpoint=server,dir=%s" % creds.psk


def data_passes(c, srv, node_opts):
    """Write and read through node n (opened with node_opts) re-exported;
    the server's image has the write once both daemons stop."""
    c.add(srv, node="n", export="disk0", **node_opts)
    assert node_view(c.nodes()["n"]) == node_of(srv.filename(), SIZE)
    h = handle(c.reexport("n"))
    assert h.pread(65536, 0) == pattern(SIZE)[:65536]
    h.pwrite(pattern(1 * MiB, seed=11), 3 * MiB + 1)
    h.flush()
    assert h.pread(1 * MiB, 3 * MiB + 1) == pattern(1 * MiB, seed=11)
    h.shutdown()
    c.daemon.stop()
    srv.stop()
    want = bytearray(pattern(SIZE))
    want[3 * MiB + 1:4 * MiB + 1] = pattern(1 * MiB, seed=11)
    assert read_file(srv.img) == want


def test_tls_x509_unix(impl, start_daemon, tmpdir_short, creds):
    img = write_image(os.path.join(tmpdir_short, "s.img"), pattern(SIZE))
    srv = Server(start_daemon, impl, tmpdir_short, img, objects=[x509_server(creds)],
                 server_opts=",tls-creds=tls0")
    c = Client(start_daemon, impl, tmpdir_short,
               objects=["tls-creds-x509,id=tc,endpoint=client,dir=%s" % creds.client])
    data_passes(c, srv, {"tls_creds": "tc", "tls_hostname": "localhost"})


def test_tls_x509_tcp(impl, start_daemon, tmpdir_short, creds):
    """Over TCP the host is the name checked (the certificate has IP
    address 127.0.0.1): no tls-hostname needed."""
    img = write_image(os.path.join(tmpdir_short, "s.img"), pattern(SIZE))
    srv = Server(start_daemon, impl, tmpdir_short, img, objects=[x509_server(creds)],
                 server_opts=",tls-creds=tls0", tcp=True)
    c = Client(start_daemon, impl, tmpdir_short,
               objects=["tls-creds-x509,id=tc,endpoint=client,dir=%s" % creds.client])
    data_passes(c, srv, {"tls_creds": "tc"})


def test_tls_psk(impl, start_daemon, tmpdir_short, creds):
    img = write_image(os.path.join(tmpdir_short, "s.img"), pattern(SIZE))
    srv = Server(start_daemon, impl, tmpdir_short, img, objects=[psk_server(creds)],
                 server_opts=",tls-creds=tls0")
    c = Client(start_daemon, impl, tmpdir_short,
               objects=["tls-creds-psk,id=tp,endpoint=client,dir=%s,username=alice"
                        % creds.psk_alice])
    data_passes(c, srv, {"tls_creds": "tp"})


def test_tls_errors(impl, start_daemon, tmpdir_short, creds):
    img = write_image(os.path.join(tmpdir_short, "s.img"), pattern(SIZE))
    x509 = Server(start_daemon, impl, tmpdir_short, img, objects=[x509_server(creds)],
                  server_opts=",tls-creds=tls0", tag="x")
    psk = Server(start_daemon, impl, tmpdir_short, img, objects=[psk_server(creds)],
                 server_opts=",tls-creds=tls0", node_opts=",locking=off", tag="p")
    plain = Server(start_daemon, impl, tmpdir_short, img, node_opts=",locking=off", tag="q")
    c = Client(start_daemon, impl, tmpdir_short, objects=[
        "tls-creds-x509,id=tc,endpoint=client,dir=%s" % creds.client,
        "tls-creds-x509,id=rogue,endpoint=client,dir=%s" % creds.rogue,
        "tls-creds-x509,id=sx,endpoint=server,dir=%s" % creds.server,
        "tls-creds-psk,id=sp,endpoint=server,dir=%s" % creds.psk,
        "tls-creds-psk,id=tp,endpoint=client,dir=%s,username=alice" % creds.psk_alice,
        "tls-creds-psk,id=wrong,endpoint=client,dir=%s,username=alice" % creds.psk_wrong])
    for sx in ("sx", "sp"):
        assert c.add_error(plain.addr, export="disk0", tls_creds=sx) == \
            (G, "Expected TLS credentials for a client endpoint")
    # no credentials against a server that requires TLS
    for srv in (x509, psk):
        assert c.add_error(srv.addr, export="disk0") == \
            (G, "TLS negotiation required before option 7 (go)")
    # credentials against a server without TLS
    assert c.add_error(plain.addr, export="disk0", tls_creds="tc", tls_hostname="localhost") == \
        (G, "Denied by server for option 5 (starttls)")
    # certificates over a UNIX socket need a name to check
    assert c.add_error(x509.addr, export="disk0", tls_creds="tc") == \
        (G, "No hostname for certificate validation")
    assert c.add_error(x509.addr, export="disk0", tls_creds="tc", tls_hostname="other") == \
        (G, "Certificate does not match the hostname other")
    assert c.add_error(x509.addr, export="disk0", tls_creds="rogue",
                       tls_hostname="localhost") == \
        (G, "The certificate hasn't got a known issuer")
    # handshakes that fail: GnuTLS's words depend on how the server ends them
    for srv, tc in ((x509, "tp"), (psk, "wrong")):
        cls, desc = c.add_error(srv.addr, export="disk0", tls_creds=tc)
        assert cls == G and desc.startswith("TLS handshake failed: "), desc
    assert c.nodes() == {}
    # and right ones
    c.add(x509, node="a", export="disk0", tls_creds="tc", tls_hostname="localhost")
    c.add(psk, node="b", export="disk0", tls_creds="tp")
    assert sorted(c.nodes()) == ["a", "b"]


# -- blockdev-del ------------------------------------------------------------------

def test_blockdev_del_disconnects(impl, start_daemon, tmpdir_short):
    img = write_image(os.path.join(tmpdir_short, "s.img"), pattern(SIZE))
    srv = Server(start_daemon, impl, tmpdir_short, img)
    c = Client(start_daemon, impl, tmpdir_short)
    c.add(srv, node="n", export="disk0")
    e = srv.q.error("block-export-del", id="exp0")
    assert (e["class"], e["desc"]) == (G, "export 'exp0' still in use")
    h = handle(c.reexport("n"))
    e = c.q.error("blockdev-del", node_name="n")
    assert (e["class"], e["desc"]) == (G, "Node n is in use")
    h.shutdown()
    c.q.execute("block-export-del", id="re")
    c.q.wait_event("BLOCK_EXPORT_DELETED")
    c.q.execute("blockdev-del", node_name="n")
    assert c.nodes() == {}
    e = c.q.error("blockdev-del", node_name="n")
    assert (e["class"], e["desc"]) == (G, "Failed to find node with node-name='n'")

    # the server saw the client go: a new node works, and once it is
    # deleted too the export has no client left
    c.add(srv, node="n2", export="disk0", read_only=True)
    assert c.nodes()["n2"]["ro"] is True
    h = handle(c.reexport("n2", name="re2", writable=False))
    assert h.pread(4096, 4096) == pattern(SIZE)[4096:8192]
    h.shutdown()
    c.q.execute("block-export-del", id="re2")
    c.q.wait_event("BLOCK_EXPORT_DELETED")
    c.q.execute("blockdev-del", node_name="n2")

    def export_deleted():
        r = srv.q.request("block-export-del", {"id": "exp0"})
        if "error" in r:
            assert r["error"]["desc"] == "export 'exp0' still in use", r
            return False
        return True
    poll(export_deleted, "disconnect seen by the server")
    assert srv.q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "exp0"}
    assert srv.q.execute("query-block-exports") == []


def test_resize_and_reopen(impl, start_daemon, tmpdir_short):
    """block_resize: an export cannot grow, a smaller size is ignored (the
    node keeps the export's size); blockdev-reopen changes read-only only,
    and not to read-write over a read-only export."""
    img = write_image(os.path.join(tmpdir_short, "s.img"))
    srv = Server(start_daemon, impl, tmpdir_short, img)
    ro_img = write_image(os.path.join(tmpdir_short, "r.img"))
    ro_srv = Server(start_daemon, impl, tmpdir_short, ro_img, writable=False, tag="r")
    c = Client(start_daemon, impl, tmpdir_short)
    c.add(srv, export="disk0")
    q = c.q
    e = q.error("block_resize", node_name="n", size=2 * SIZE)
    assert (e["class"], e["desc"]) == (G, "Cannot grow NBD nodes")
    assert q.execute("block_resize", node_name="n", size=SIZE) == {}
    assert q.execute("block_resize", node_name="n", size=SIZE // 2) == {}
    assert c.nodes()["n"]["image"]["virtual-size"] == SIZE

    def reopen(node, addr, **opts):
        return {"driver": "nbd", "node-name": node, "server": addr, "export": "disk0",
                **{k.replace("_", "-"): v for k, v in opts.items()}}
    assert q.execute("blockdev-reopen", options=[reopen("n", srv.addr, read_only=True)]) == {}
    assert c.nodes()["n"]["ro"] is True
    assert q.execute("blockdev-reopen", options=[reopen("n", srv.addr)]) == {}
    assert c.nodes()["n"]["ro"] is False
    e = q.error("blockdev-reopen", options=[dict(reopen("n", srv.addr), export="other")])
    assert (e["class"], e["desc"]) == (G, "Cannot change the option 'export'")
    c.add(ro_srv, node="r", export="disk0", read_only=True)
    e = q.error("blockdev-reopen", options=[reopen("r", ro_srv.addr, read_only=False)])
    assert (e["class"], e["desc"]) == (G, "Can't reopen read-only NBD mount as read/write")
    # the writable node still writes
    uri = c.reexport("n")
    h = handle(uri)
    h.pwrite(b"\x5a" * 4096, 4096)
    h.shutdown()
    c.daemon.stop()
    srv.stop()
    assert read_file(img)[4096:8192] == b"\x5a" * 4096


def test_own_export(impl, start_daemon, tmpdir_short):
    """A node on an export of the same daemon (its own NBD server, over
    UNIX and TCP): blockdev-add does not hang on the daemon's own
    handshake, data passes both ways, and block status answers (bexd
    reports data there rather than ask itself).  qemu-storage-daemon 7.2
    hangs in that blockdev-add for ever, over UNIX and TCP alike (its
    main loop waits for the handshake only the main loop can serve)."""
    if impl == "qsd":
        pytest.skip("qemu-storage-daemon 7.2 hangs in blockdev-add of its own export")
    img = write_image(os.path.join(tmpdir_short, "s.img"), extents=[(MiB, 64 * 1024)])
    sock = os.path.join(tmpdir_short, "own.sock")
    port = free_tcp_port()
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=disk0,filename=%s" % img,
                     "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                     "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on")
    q = d.qmp()
    q.execute("blockdev-add", driver="nbd", node_name="u", export="disk0",
              server={"type": "unix", "path": sock})
    q.execute("nbd-server-stop")
    q.execute("nbd-server-start",
              addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}})
    q.execute("block-export-add", type="nbd", id="exp1", node_name="disk0", name="disk0",
              writable=True)
    q.execute("blockdev-add", driver="nbd", node_name="t", export="disk0",
              server={"type": "inet", "host": "127.0.0.1", "port": str(port)})
    q.execute("block-export-add", type="nbd", id="re", node_name="t", name="re",
              writable=True)
    uri = "nbd://127.0.0.1:%d/re" % port
    h = handle(uri)
    assert h.pread(64 * 1024, MiB) == pattern(64 * 1024, seed=MiB % 97)
    h.pwrite(b"\xa5" * 512, 3 * MiB)
    h.flush()
    h.shutdown()
    ext = extents(uri)
    assert sum(ln for _, ln, _ in ext) == SIZE
    assert all(fl & 1 == 0 for off, ln, fl in ext if off < MiB + 64 * 1024 and off + ln > MiB)
    d.stop()
    assert read_file(img)[3 * MiB:3 * MiB + 512] == b"\xa5" * 512
