"""The NBD server's own guarantees, beyond what qsd 7.2 promises.

Lifetime under stress (removal, nbd-server-stop and quit with clients
attached and requests in flight), the handshake time limit, max-connections
refusing cleanly, hostile and vanishing clients, iothread exports, and
nbd-server-start's address and TLS checks.  Where qemu-storage-daemon can
run the same scenario the `impl` fixture runs both; bexd-only behaviour is
marked so in each test.
"""
import os
import random
import select
import socket
import struct
import subprocess
import time

import pytest

from conftest import (BUF_SLACK, BUILD, LATE, TIMER_EARLY, QMPError, bexd_define,
                      run_daemon_expect_fail)
from nbdwire import (CMD_FLAG_FUA, CMD_READ, CMD_WRITE, Closed, Conn, HEAD, OPT_GO,
                     OPT_LIST, REP_ACK, REP_ERR_TLS_REQD, REQUEST_MAGIC, free_tcp_port,
                     pattern)

import nbd  # noqa: E402 (python3-libnbd, which scripts/deps.sh installs)

MiB = 1 << 20


def make_img(tmpdir, size=64 * MiB, name="disk.img"):
    path = os.path.join(tmpdir, name)
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(HEAD)
    return path


def serve(start_daemon, impl, tmpdir, img, export_opts="", server_opts="", args=(), env=None):
    sock = os.path.join(tmpdir, "nbd.sock")
    kw = {"env": env} if env else {}
    d = start_daemon(impl,
                     "--blockdev", "driver=file,node-name=disk0,filename=" + img,
                     *args,
                     "--nbd-server", "addr.type=unix,addr.path=%s%s" % (sock, server_opts),
                     "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on%s"
                     % export_opts, **kw)
    return d, sock


def serving(sock, name="disk0"):
    c = Conn(sock).connect(name)
    try:
        return c.read(0, 512).data == HEAD[:512]
    finally:
        c.close()


def wait_readable(sock, timeout):
    r, _, _ = select.select([sock], [], [], timeout)
    return bool(r)


# -- handshake time limit: QEMU 10.0's handshake-max-seconds (qsd 7.2 has none) --------

HANDSHAKE_S = bexd_define("NBD_HANDSHAKE_MS", "export/nbd/nbd-internal.h") / 1000


def dropped_at_limit(conn, t0, limit):
    """conn is dropped by the handshake limit: not before `limit` seconds
    (t0 was taken before it connected) and at most LATE after."""
    assert conn.eof()
    took = time.monotonic() - t0
    assert limit - TIMER_EARLY <= took <= limit + LATE, took


def test_handshake_time_limit_drops_idle_client(start_daemon, tmpdir_short):
    img = make_img(tmpdir_short)
    d, sock = serve(start_daemon, "bexd", tmpdir_short, img, server_opts=",handshake-max-seconds=1")
    t0 = time.monotonic()
    idle = Conn(sock)
    idle.greeting()                       # then say nothing
    half = Conn(sock).start()             # flags sent, no option
    # a client that completes the handshake in time is not affected ...
    c = Conn(sock).connect("disk0")
    assert c.read(0, 16).data == HEAD[:16]
    late = Conn(sock)                     # ... and connected before this one
    late.greeting()
    dropped_at_limit(idle, t0, 1)
    dropped_at_limit(half, t0, 1)
    assert late.eof()
    # bexd runs due timers in deadline order: had c's limit stayed armed, it
    # ran out (and c was dropped) before late's
    assert wait_readable(c.sock, 0) is False
    assert c.read(0, 16).data == HEAD[:16]


def test_handshake_slow_option_stream_dropped(start_daemon, tmpdir_short):
    # options trickling in do not extend the limit
    img = make_img(tmpdir_short)
    d, sock = serve(start_daemon, "bexd", tmpdir_short, img, server_opts=",handshake-max-seconds=1")
    t0 = time.monotonic()
    c = Conn(sock, timeout=1 + LATE).start()
    sent = 0
    with pytest.raises(Closed):
        while time.monotonic() - t0 <= 1 + LATE:
            c.opt(OPT_LIST)
            sent += 1
            c.opt_replies()
            # trickle: as fast as this loop goes, a client reaches bexd's
            # option count limit (NBD_MAX_OPTIONS) before the time limit
            wait_readable(c.sock, 0.05)
    took = time.monotonic() - t0
    assert 1 - TIMER_EARLY <= took <= 1 + LATE, took
    assert sent < bexd_define("NBD_MAX_OPTIONS", "export/nbd/nbd-internal.h")
    assert serving(sock)


def test_handshake_limit_default_and_none(start_daemon, tmpdir_short):
    """Default NBD_HANDSHAKE_MS (10 s); nbd-server-start
    handshake-max-seconds=0: no limit."""
    img = make_img(tmpdir_short)
    d10, sock10 = serve(start_daemon, "bexd", tmpdir_short, img)
    d0 = start_daemon("bexd", "--blockdev", "driver=file,node-name=disk0,filename=" + img)
    sock0 = os.path.join(tmpdir_short, "nbd0.sock")
    d0.qmp().execute("nbd-server-start", handshake_max_seconds=0,
                     addr={"type": "unix", "data": {"path": sock0}})
    t0 = time.monotonic()
    idle0 = Conn(sock0, timeout=HANDSHAKE_S + 2 * LATE)
    idle0.greeting()
    idle10 = Conn(sock10, timeout=HANDSHAKE_S + 2 * LATE)
    idle10.greeting()
    dropped_at_limit(idle10, t0, HANDSHAKE_S)
    # idle0 connected first: a default limit would have dropped it by now,
    # give or take LATE (another daemon's scheduling)
    assert wait_readable(idle0.sock, LATE) is False
    idle0.client_flags()                               # and can go on
    idle0.opt(OPT_LIST)
    assert idle0.opt_replies() == [(OPT_LIST, REP_ACK, b"")]


def test_handshake_max_seconds_qmp(start_daemon, tmpdir_short, impl):
    d = start_daemon(impl)
    q = d.qmp()
    sock = os.path.join(tmpdir_short, "q.sock")
    addr = {"type": "unix", "data": {"path": sock}}
    if impl == "qsd":
        # a QEMU 10.0 argument: 7.2 does not know it
        e = q.error("nbd-server-start", addr=addr, handshake_max_seconds=1)
        assert e["desc"] == "Parameter 'handshake-max-seconds' is unexpected"
        return
    for bad, msg in [(-1, "Parameter 'handshake-max-seconds' expects uint32_t"),
                     (1 << 32, "Parameter 'handshake-max-seconds' expects uint32_t"),
                     ("1", "Parameter 'handshake-max-seconds' expects uint64"),
                     (1.5, "Parameter 'handshake-max-seconds' expects uint64")]:
        e = q.error("nbd-server-start", addr=addr, handshake_max_seconds=bad)
        assert (e["class"], e["desc"]) == ("GenericError", msg)
    q.execute("nbd-server-start", addr=addr, handshake_max_seconds=1)
    t0 = time.monotonic()
    idle = Conn(sock)
    idle.greeting()
    dropped_at_limit(idle, t0, 1)


@pytest.mark.parametrize("value,msg", [
    ("-1", "Parameter 'handshake-max-seconds' expects uint32_t"),
    ("x", "Parameter 'handshake-max-seconds' expects integer"),
    ("4294967296", "Parameter 'handshake-max-seconds' expects uint32_t"),
])
def test_handshake_max_seconds_cli_errors(tmpdir_short, value, msg):
    arg = "addr.type=unix,addr.path=%s/s.sock,handshake-max-seconds=%s" % (tmpdir_short, value)
    rc, err = run_daemon_expect_fail("bexd", ["--nbd-server", arg])
    assert rc == 1
    assert err.strip() == "bexd: --nbd-server %s: %s" % (arg, msg), err


# -- max-connections (bexd refuses at once; qsd stops accepting) ---------------------

@pytest.mark.parametrize("how", ["cli", "qmp"])
def test_max_connections_next_client_waits_then_is_served(impl, start_daemon, tmpdir_short, how):
    """At the limit the server stops accepting, as qsd does: the next client
    waits in the backlog and is served as soon as a slot frees (bexd used
    to accept and drop it).  With max-connections=1, multi-conn is not
    advertised (one connection cannot be several)."""
    import threading
    import nbd
    img = make_img(tmpdir_short)
    sock = os.path.join(tmpdir_short, "mc.sock")
    node = ["--blockdev", "driver=file,node-name=disk0,filename=%s" % img]
    if how == "cli":
        d = start_daemon(impl, *node, "--nbd-server",
                         "addr.type=unix,addr.path=%s,max-connections=1" % sock,
                         "--export", "type=nbd,id=e0,node-name=disk0,name=disk0")
    else:
        d = start_daemon(impl, *node)
        q = d.qmp()
        q.execute("nbd-server-start", addr={"type": "unix", "data": {"path": sock}},
                  max_connections=1)
        q.execute("block-export-add", type="nbd", id="e0", node_name="disk0", name="disk0")
    uri = "nbd+unix:///disk0?socket=%s" % sock
    a = nbd.NBD()
    a.connect_uri(uri)
    assert a.can_multi_conn() is False
    got = {}

    def second():
        b = nbd.NBD()
        b.connect_uri(uri)                 # waits in the backlog
        got["data"] = b.pread(16, 0)
        got["multi"] = b.can_multi_conn()
        b.shutdown()
    t = threading.Thread(target=second)
    t.start()
    t.join(1.0)
    assert t.is_alive(), "the second client was not made to wait"
    assert a.pread(16, 0) == HEAD[:16]
    a.shutdown()
    t.join(30)
    assert not t.is_alive()
    assert got == {"data": HEAD[:16], "multi": False}


def test_multi_conn_advertised_without_limit(impl, start_daemon, tmpdir_short):
    import nbd
    img = make_img(tmpdir_short)
    d, sock = serve(start_daemon, impl, tmpdir_short, img, server_opts=",max-connections=2")
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///disk0?socket=%s" % sock)
    assert h.can_multi_conn() is True
    h.shutdown()


@pytest.mark.parametrize("value,msg", [
    ("-1", "Parameter 'max-connections' expects uint32_t"),
    ("x", "Parameter 'max-connections' expects integer"),
])
def test_max_connections_bad_value(impl, tmpdir_short, value, msg):
    rc, err = run_daemon_expect_fail(impl, [
        "--nbd-server", "addr.type=unix,addr.path=%s/s,max-connections=%s" % (tmpdir_short, value)])
    assert rc == 1 and err.rstrip().endswith(": " + msg)


# -- removal and stop with requests in flight -----------------------------------------

def _pipeline_writes(c, base, count, size):
    cookies = []
    for i in range(count):
        cookies.append(c.request(CMD_WRITE, base + i * size, size, CMD_FLAG_FUA,
                                 pattern(size, seed=i + 1)))
    return cookies


def test_hard_delete_with_writes_in_flight_keeps_acknowledged_data(start_daemon, tmpdir_short):
    img = make_img(tmpdir_short)
    d, sock = serve(start_daemon, "bexd", tmpdir_short, img)
    q = d.qmp()
    c = Conn(sock).connect("disk0")
    n, size = 24, MiB
    _pipeline_writes(c, 8 * MiB, n, size)
    acked = set()
    for _ in range(4):                    # some are answered ...
        r = c.reply()
        assert r.err == 0
        acked.add(r.cookie)
    # ... then the export goes with the rest in flight
    q.execute("block-export-del", id="exp0", mode="hard")
    assert q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "exp0"}
    try:
        while True:
            r = c.reply()
            assert r.err == 0
            acked.add(r.cookie)
    except Closed:
        pass
    assert d.alive()
    with open(img, "rb") as f:
        for cookie in acked:
            i = (cookie & 0xffffffff) - 1
            f.seek(8 * MiB + i * size)
            assert f.read(size) == pattern(size, seed=i + 1), "acknowledged write %d lost" % i
    # the id and the name are free again
    q.execute("block-export-add", type="nbd", id="exp0", node_name="disk0", name="disk0")
    assert serving(sock)


def test_server_stop_with_clients_everywhere(start_daemon, tmpdir_short):
    # bexd only: qsd 7.2 blocks in nbd-server-stop until replies that a
    # client does not read have been sent, and leaves clients that are still
    # negotiating connected (CVE-2024-7409)
    img = make_img(tmpdir_short)
    d, sock = serve(start_daemon, "bexd", tmpdir_short, img)
    q = d.qmp()
    greeted = Conn(sock)
    greeted.greeting()                                    # in the handshake
    busy = Conn(sock).connect("disk0")
    for i in range(16):                                   # reads in flight
        busy.request(CMD_READ, (i % 8) * 4 * MiB, 4 * MiB)
    idle = Conn(sock).connect("disk0", structured=True)
    q.execute("nbd-server-stop")
    assert q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "exp0"}
    for c in (greeted, busy, idle):
        assert c.eof()
    assert q.execute("query-block-exports") == []
    q.execute("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    q.execute("block-export-add", type="nbd", id="exp0", node_name="disk0", name="disk0")
    assert serving(sock)


def test_quit_with_requests_in_flight(start_daemon, tmpdir_short):
    # bexd only: qsd 7.2 does not exit while a client leaves replies unread
    img = make_img(tmpdir_short)
    d, sock = serve(start_daemon, "bexd", tmpdir_short, img)
    q = d.qmp()
    clients = [Conn(sock).connect("disk0") for _ in range(4)]
    for c in clients:
        _pipeline_writes(c, 0, 8, 256 << 10)
        c.request(CMD_READ, 0, 32 * MiB)
    half = Conn(sock)
    half.greeting()
    q.execute("quit")
    d.wait_exit()
    for c in clients + [half]:
        assert c.eof()


def test_soft_delete_then_client_leaves(start_daemon, tmpdir_short):
    # bexd only (qsd 7.2 has no soft mode): in-flight requests still get
    # their answers, later ones ESHUTDOWN, and the export goes when the
    # client leaves
    img = make_img(tmpdir_short)
    d, sock = serve(start_daemon, "bexd", tmpdir_short, img)
    q = d.qmp()
    h = nbd.NBD()
    h.set_export_name("disk0")
    h.connect_unix(sock)
    h.pwrite(b"s" * 4096, MiB, nbd.CMD_FLAG_FUA)
    q.execute("block-export-del", id="exp0", mode="soft")
    assert q.execute("query-block-exports")[0]["shutting-down"] is True
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"t" * 4096, MiB)
    assert e.value.errno == "ESHUTDOWN"
    with pytest.raises(nbd.Error):
        h.flush()
    h.shutdown()
    assert q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "exp0"}
    with open(img, "rb") as f:
        f.seek(MiB)
        assert f.read(4096) == b"s" * 4096


# -- hostile and vanishing clients ------------------------------------------------------

def test_client_vanishes_with_large_replies_pending(start_daemon, tmpdir_short, impl):
    # the server's replies hit a closed socket: no SIGPIPE, no stall
    img = make_img(tmpdir_short)
    d, sock = serve(start_daemon, impl, tmpdir_short, img)
    for _ in range(3):
        c = Conn(sock).connect("disk0")
        for i in range(32):
            c.request(CMD_READ, (i % 16) * MiB, 8 * MiB)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()                                          # RST
    assert d.alive()
    assert serving(sock)


def test_garbage_from_many_clients_does_not_disturb_a_good_one(start_daemon, tmpdir_short, impl):
    img = make_img(tmpdir_short)
    d, sock = serve(start_daemon, impl, tmpdir_short, img)
    good = Conn(sock).connect("disk0", structured=True)
    rnd = random.Random(1234)
    for i in range(40):
        bad = Conn(sock, timeout=5)
        if i % 2:
            bad.start()
            if i % 4 == 1:                     # garbage options
                blob = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 300)))
                bad.send(struct.pack(">QII", 0x49484156454F5054, rnd.randrange(0, 20),
                                     len(blob)) + blob)
            else:                              # garbage after a good GO
                assert bad.go("disk0")[-1][1] == REP_ACK
                hdr = struct.pack(">IHHQQI", REQUEST_MAGIC, rnd.getrandbits(16),
                                  rnd.randrange(0, 12), i, rnd.getrandbits(40),
                                  rnd.getrandbits(32))
                bad.send(hdr + bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 200))))
        else:
            bad.send(bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 100))))
        bad.close()
        r = good.read((i % 8) * 512, 512)
        assert r.err == 0 and r.assemble((i % 8) * 512, 512) == (HEAD + bytes(4096))[
            (i % 8) * 512:(i % 8) * 512 + 512]
    assert d.alive()


def test_block_status_of_fragmented_file_is_bounded(start_daemon, tmpdir_short, impl):
    # 8192 alternating data/hole extents: the largest possible request is
    # answered quickly with a bounded number of descriptors
    img = make_img(tmpdir_short, size=128 * MiB)
    with open(img, "r+b") as f:
        for i in range(0, 16384, 2):
            f.seek(i * 4096)
            f.write(b"d" * 4096)
    d, sock = serve(start_daemon, impl, tmpdir_short, img)
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.set_export_name("disk0")
    h.connect_unix(sock)
    got = []

    def cb(metacontext, offset, entries, err):
        got.append((offset, list(entries)))
        return 0
    h.block_status(128 * MiB, 0, cb)
    # The file has exactly 16384 extents: 8192 data blocks, each followed by
    # a hole (the last hole runs to the end).  A reply may stop early, but
    # what it describes must be that layout: never more descriptors than
    # the file has extents, each one exact.
    ((offset, entries),) = got
    assert offset == 0
    lengths, flags = entries[0::2], entries[1::2]
    n = len(lengths)
    assert 1 <= n <= 16384
    hole = nbd.STATE_HOLE | nbd.STATE_ZERO
    want = [(4096, 0 if i % 2 == 0 else hole) for i in range(min(n, 16383))]
    if n == 16384:
        want.append((64 * MiB + 4096, hole))
    assert list(zip(lengths, flags)) == want


# -- iothread exports ----------------------------------------------------------------------

def test_iothread_export_serves_and_goes_hard(impl, start_daemon, tmpdir_short):
    img = make_img(tmpdir_short)
    d, sock = serve(start_daemon, impl, tmpdir_short, img, export_opts=",iothread=io0",
                    args=("--object", "iothread,id=io0"))
    q = d.qmp()
    if impl == "qsd":
        # qsd 7.2 aborts (SIGABRT) once a client of an export in an iothread
        # leaves after the checks below have passed: its bug, not the test's
        d.expect_exit()
    hs = []
    for i in range(4):
        h = nbd.NBD()
        h.set_export_name("disk0")
        h.connect_unix(sock)
        h.pwrite(pattern(65536, seed=i), (i + 1) * MiB, nbd.CMD_FLAG_FUA)
        hs.append(h)
    for i, h in enumerate(hs):
        assert h.pread(65536, (i + 1) * MiB) == pattern(65536, seed=i)
    busy = Conn(sock).connect("disk0")
    # qsd 7.2 would wait for replies nobody reads: keep them small for it
    size = 4 * MiB if impl == "bexd" else 4096
    for i in range(8):
        busy.request(CMD_READ, i * MiB, size)
    q.execute("block-export-del", id="exp0", mode="hard")
    assert q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "exp0"}
    assert busy.eof()
    for h in hs:
        with pytest.raises(nbd.Error):
            h.pread(512, 0)
    q.execute("block-export-add", type="nbd", id="exp1", node_name="disk0", name="disk0",
              iothread="io0")
    assert serving(sock)


# -- nbd-server-start addresses and TLS -------------------------------------------------------

def _start_bare(start_daemon, impl, tmpdir, args=()):
    img = make_img(tmpdir, size=MiB)
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=disk0,filename=" + img, *args)
    return d, d.qmp()


def _add(q):
    q.execute("block-export-add", type="nbd", id="exp0", node_name="disk0", name="disk0")


def test_inet_ipv4_numeric_port(impl, start_daemon, tmpdir_short):
    d, q = _start_bare(start_daemon, impl, tmpdir_short)
    port = free_tcp_port()
    q.execute("nbd-server-start", addr={"type": "inet",
                                        "data": {"host": "127.0.0.1", "port": str(port)}})
    _add(q)
    h = nbd.NBD()
    h.connect_uri("nbd://127.0.0.1:%d/disk0" % port)
    assert h.pread(16, 0) == HEAD[:16]


def test_inet_ipv6(impl, start_daemon, tmpdir_short):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        port = free_tcp_port(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no ::1")
    d, q = _start_bare(start_daemon, impl, tmpdir_short)
    q.execute("nbd-server-start", addr={"type": "inet", "data": {"host": "::1",
                                                                 "port": str(port)}})
    _add(q)
    c = Conn(addr=("::1", port)).connect("disk0")
    assert c.read(0, 16).data == HEAD[:16]


def test_tls_creds_checks(impl, start_daemon, tmpdir_short):
    d, q = _start_bare(start_daemon, impl, tmpdir_short, ("--object", "iothread,id=io0"))
    sock = tmpdir_short + "/nbd.sock"
    addr = {"type": "unix", "data": {"path": sock}}
    e = q.error("nbd-server-start", addr=addr, tls_creds="io0")
    assert (e["class"], e["desc"]) == ("GenericError", "Object with id 'io0' is not TLS credentials")
    e = q.error("nbd-server-start", addr=addr, tls_creds="nope")
    assert e["desc"] == "No TLS credentials with id 'nope'"
    # tls-authz is only resolved when a client uses it
    q.execute("nbd-server-start", addr=addr, tls_authz="nope")
    _add(q)
    assert serving(sock)


def test_tls_required_before_options(impl, start_daemon, tmpdir_short):
    try:
        d, q = _start_bare(start_daemon, impl, tmpdir_short,
                           ("--object", "tls-creds-anon,id=t0,endpoint=server"))
    except RuntimeError as e:
        if impl != "qsd":       # bexd always has TLS (GnuTLS is a build dependency)
            raise
        pytest.skip("this qemu-storage-daemon has no tls-creds-anon: %s" % e)
    sock = tmpdir_short + "/nbd.sock"
    q.execute("nbd-server-start", addr={"type": "unix", "data": {"path": sock}}, tls_creds="t0")
    _add(q)
    c = Conn(sock).start()
    reps = c.go("disk0")
    assert reps[-1][1] == REP_ERR_TLS_REQD
    assert d.alive()


def test_cli_export_without_server(impl, tmpdir_short):
    img = make_img(tmpdir_short, size=MiB)
    arg = "type=nbd,id=e0,node-name=disk0"
    rc, err = run_daemon_expect_fail(impl, [
        "--blockdev", "driver=file,node-name=disk0,filename=" + img, "--export", arg])
    assert rc == 1
    assert err.rstrip().endswith("--export %s: NBD server not running" % arg)


def test_description_and_flags_reported(impl, start_daemon, tmpdir_short):
    img = make_img(tmpdir_short)
    d, sock = serve(start_daemon, impl, tmpdir_short, img,
                    export_opts=",description=a disk,writethrough=on")
    h = nbd.NBD()
    h.set_full_info(True)
    h.set_export_name("disk0")
    h.connect_unix(sock)
    assert h.get_export_description() == "a disk"
    assert (h.can_multi_conn(), h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(),
            h.can_fast_zero(), h.can_cache(), h.can_df()) == (True,) * 8
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB


@pytest.mark.parametrize("iothread", [False, True])
def test_remove_and_readd_under_load(start_daemon, tmpdir_short, iothread):
    # bexd: export churn while clients hammer it; every round ends with the
    # export gone (event), every client disconnected, and the daemon alive
    img = make_img(tmpdir_short)
    args = ("--object", "iothread,id=io0") if iothread else ()
    d, sock = serve(start_daemon, "bexd", tmpdir_short, img, args=args,
                    export_opts=",iothread=io0" if iothread else "")
    q = d.qmp()
    for rnd in range(8):
        if rnd:
            extra = {"iothread": "io0"} if iothread else {}
            q.execute("block-export-add", type="nbd", id="exp0", node_name="disk0",
                      name="disk0", writable=True, **extra)
        clients = [Conn(sock).connect("disk0", structured=bool(i % 2)) for i in range(3)]
        for i, c in enumerate(clients):
            for k in range(16):
                if k % 2:
                    c.request(CMD_WRITE, (8 + k) * MiB, 65536, 0, pattern(65536, seed=k))
                else:
                    c.request(CMD_READ, (k + i) * 65536, 1 << (12 + (k % 8)))
        mode = "hard" if rnd % 2 == 0 else "soft"
        q.execute("block-export-del", id="exp0", mode=mode)
        if mode == "soft":
            for c in clients:
                c.disc()
        assert q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "exp0"}
        for c in clients:
            assert c.eof()
    assert d.alive()


def _vm_kib(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s for %d" % (field, pid))


CONN_BUF_BUDGET = bexd_define("NBD_CONN_BUF_BUDGET", "export/nbd/nbd-internal.h")


def test_unread_huge_reads_bounded_memory(start_daemon, tmpdir_short):
    # bexd: 64 pipelined 32 MiB READs whose replies are never read would be
    # 2 GiB of buffers; the server keeps to its per-connection budget
    # (128 MiB of slot buffers) and stops reading that client instead.  The
    # peak (VmHWM, not one RSS sample) may grow by that budget and a margin
    # for the socket's and the loop's own buffers, never by what was asked.
    # The image holds data and is read through a qcow2 node: its READs are
    # copied into buffers (a RAM-backed raw file would be spliced from the
    # page cache, and a hole answered without a buffer: neither fills it).
    img = os.path.join(tmpdir_short, "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64M", img],
                   check=True, stdout=subprocess.DEVNULL)
    env = dict(os.environ)
    if "asan" in BUILD or "ASAN_OPTIONS" in env:
        # freed buffers wait in ASan's quarantine and count in RSS: measure
        # bexd's memory, not ASan's (as test_reliability does)
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=0"
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon("bexd", "--blockdev", "driver=file,node-name=f0,filename=" + img,
                     "--blockdev", "driver=qcow2,node-name=disk0,file=f0",
                     "--nbd-server", "addr.type=unix,addr.path=" + sock,
                     "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0", env=env)
    greedy = Conn(sock).connect("disk0")
    assert greedy.read(0, 4096).data == b"\x5a" * 4096
    base = _vm_kib(d.pid, "VmHWM")
    for i in range(64):
        greedy.request(CMD_READ, 0, 32 * MiB)
    for k in range(3):            # others are still served meanwhile
        other = Conn(sock).connect("disk0")
        assert other.read(k << 20, 4096).data == b"\x5a" * 4096
        other.close()
    grown = (_vm_kib(d.pid, "VmHWM") - base) * 1024
    print("peak grew by %d MiB" % (grown // MiB))
    assert grown < CONN_BUF_BUDGET + BUF_SLACK, grown // MiB
    greedy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    greedy.close()
    other = Conn(sock).connect("disk0")
    assert other.read(0, 4096).data == b"\x5a" * 4096
    other.close()
