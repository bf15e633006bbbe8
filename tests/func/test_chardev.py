"""Character devices: chardev-add, chardev-change, chardev-remove,
chardev-send-break, query-chardev, query-chardev-backends, ringbuf-read,
ringbuf-write, and monitors on socket (server and client), ringbuf and
logged chardevs, against bexd and qemu-storage-daemon.

Differences on purpose, tested on bexd only: bexd has the socket, ringbuf,
memory and stdio backends (others are refused by the schema, as QEMU
refuses a backend it was built without); telnet, tn3270, websocket and TLS
on socket chardevs are refused; ringbuf size 0 means the default over QMP
too (qsd 7.2 makes a ring of no bytes and writes outside it); a bad option
given to chardev-change does not lose the chardev it would replace.
"""
import base64
import json
import os
import socket
import time

import pytest

from conftest import QMP, QSD, run_daemon_expect_fail


@pytest.fixture
def q(impl, start_daemon, tmpdir_short):
    d = start_daemon(impl)
    m = d.qmp()
    m.tmp = tmpdir_short
    m.daemon = d
    return m


def err(m, cmd, **args):
    e = m.error(cmd, **args)
    return e["class"], e["desc"]


def unix(path, **kw):
    return {"type": "unix", "data": dict(path=path, **kw)}


def inet(host, port, **kw):
    return {"type": "inet", "data": dict(host=host, port=str(port), **kw)}


def sock_backend(addr, **kw):
    return {"type": "socket", "data": dict(addr=addr, **kw)}


def chardevs(m):
    return {c["label"]: (c["filename"], c["frontend-open"]) for c in m.execute("query-chardev")}


# ---- backends and the list -------------------------------------------------------

def test_backends(impl, q):
    names = sorted(b["name"] for b in q.execute("query-chardev-backends"))
    if impl == "bexd":
        assert names == ["memory", "ringbuf", "socket", "stdio"]
    else:
        assert {"memory", "ringbuf", "socket", "stdio"} <= set(names)


def test_monitor_chardev_listed(q):
    path = q.daemon.qmp_path
    assert chardevs(q) == {"qmp0": ("unix:%s,server=on" % path, True)}
    assert q.execute("qom-get", path="/chardevs/qmp0", property="connected") is True


def test_add_remove_socket_server(impl, q):
    p1, p2 = os.path.join(q.tmp, "s1.sock"), os.path.join(q.tmp, "s2.sock")
    assert q.execute("chardev-add", id="s1", backend=sock_backend(unix(p1), wait=False)) == {}
    assert q.execute("chardev-add", id="s2", backend=sock_backend(unix(p2))) == {}   # server, no wait
    q.execute("chardev-add", id="t1", backend=sock_backend(inet("127.0.0.1", 0), server=True,
                                                           wait=False, nodelay=True))
    q.execute("chardev-add", id="ab", backend=sock_backend(
        unix("bx-abstract-%d" % os.getpid(), abstract=True), wait=False))
    c = chardevs(q)
    assert c["s1"] == ("disconnected:unix:%s,server=on" % p1, False)
    assert c["s2"] == ("disconnected:unix:%s,server=on" % p2, False)
    assert c["ab"] == ("disconnected:unix:bx-abstract-%d,abstract=on,tight=on,server=on"
                       % os.getpid(), False)
    addr = q.execute("qom-get", path="/chardevs/t1", property="addr")
    port = int(addr["port"])
    assert addr == {"type": "inet", "host": "127.0.0.1", "port": str(port), "ipv4": True}
    assert c["t1"] == ("disconnected:tcp:127.0.0.1:%d,server=on" % port, False)
    assert q.execute("qom-get", path="/chardevs/ab", property="addr") == \
        {"type": "unix", "path": "bx-abstract-%d" % os.getpid(), "abstract": True, "tight": True}
    # a client of a chardev nobody uses is accepted all the same
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    deadline = time.monotonic() + 10
    while not q.execute("qom-get", path="t1", property="connected"):
        assert time.monotonic() < deadline
    ours = s.getsockname()[1]
    assert chardevs(q)["t1"] == ("tcp:127.0.0.1:%d,server=on <-> 127.0.0.1:%d" % (port, ours), False)
    s.close()
    if impl == "bexd":
        # bexd notices that it left and takes the next one (qsd 7.2 does not
        # read a chardev without a frontend, and stays "connected")
        while q.execute("qom-get", path="t1", property="connected"):
            assert time.monotonic() < deadline
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        while not q.execute("qom-get", path="t1", property="connected"):
            assert time.monotonic() < deadline
        s.close()
    for cid in ("s1", "s2", "t1", "ab"):
        assert q.execute("chardev-remove", id=cid) == {}
    assert not os.path.exists(p1)
    assert set(chardevs(q)) == {"qmp0"}
    assert err(q, "chardev-remove", id="s1") == ("GenericError", "Chardev 's1' not found")
    assert err(q, "chardev-remove", id="qmp0") == ("GenericError", "Chardev 'qmp0' is busy")


SOCKET_ERRORS = [
    (dict(reconnect=1), "'reconnect' option is incompatible with socket in server listen mode"),
    (dict(server=False, wait=False), "'wait' option is incompatible with socket in client connect mode"),
    (dict(tls_authz="a"), "'tls_authz' option requires 'tls_creds' option"),
    (dict(tls_creds="nope"), "No TLS credentials with id 'nope'"),
    (dict(tls_creds="s0"), "Object with id 's0' is not TLS credentials"),
    (dict(tls_creds="tls0"), "'tls_creds' option is incompatible with 'unix' address type"),
]


def test_socket_errors(q):
    bad = os.path.join(q.tmp, "bad.sock")
    q.execute("object-add", qom_type="tls-creds-anon", id="tls0", endpoint="server")
    q.execute("object-add", qom_type="secret", id="s0", data="x")
    for opts, msg in SOCKET_ERRORS:
        opts = {k.replace("_", "-"): v for k, v in opts.items()}
        assert err(q, "chardev-add", id="x", backend=sock_backend(unix(bad), **opts)) == \
            ("GenericError", "Failed to add chardev 'x': " + msg), opts
    assert err(q, "chardev-add", id="x", backend=sock_backend(unix("/nonexistent/x.sock"))) == \
        ("GenericError", "Failed to add chardev 'x': "
         "Failed to bind socket to /nonexistent/x.sock: No such file or directory")
    none = os.path.join(q.tmp, "none.sock")
    assert err(q, "chardev-add", id="x", backend=sock_backend(unix(none), server=False)) == \
        ("GenericError", "Failed to add chardev 'x': "
         "Failed to connect to '%s': No such file or directory" % none)
    assert err(q, "chardev-add", id="x", backend=sock_backend(inet("127.0.0.1", 1), server=False)) == \
        ("GenericError", "Failed to add chardev 'x': "
         "Failed to connect to '127.0.0.1:1': Connection refused")
    assert err(q, "chardev-add", id="x", backend=sock_backend({"type": "fd", "data": {"str": "9"}})) == \
        ("GenericError", "Failed to add chardev 'x': only QEMU supports file descriptor passing")
    assert err(q, "chardev-add", id="x", backend={"type": "bogus", "data": {}}) == \
        ("GenericError", "Parameter 'type' does not accept value 'bogus'")
    assert err(q, "chardev-add", id="x", backend=sock_backend(unix(bad), server="yes")) == \
        ("GenericError", "Invalid parameter type for 'backend.data.server', expected: boolean")
    assert err(q, "chardev-add", id="x") == ("GenericError", "Parameter 'backend' is missing")
    assert err(q, "chardev-add", id="qmp0", backend={"type": "ringbuf", "data": {}}) == \
        ("GenericError", "Chardev with id 'qmp0' already exists")
    assert set(chardevs(q)) == {"qmp0"}


def test_tcp_monitor_names_both_ends(impl, start_daemon, tmpdir_short):
    d = start_daemon(impl, "--chardev", "socket,id=tm,host=127.0.0.1,port=0,server=on,wait=off",
                     "--monitor", "tm")
    q = d.qmp()
    port = int(q.execute("qom-get", path="tm", property="addr")["port"])
    assert chardevs(q)["tm"] == ("disconnected:tcp:127.0.0.1:%d,server=on" % port, True)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")
    assert "QMP" in json.loads(f.readline())      # accepted and greeted
    ours = s.getsockname()[1]
    assert chardevs(q)["tm"] == ("tcp:127.0.0.1:%d,server=on <-> 127.0.0.1:%d" % (port, ours), True)
    assert q.execute("qom-get", path="tm", property="connected") is True
    f.close()
    s.close()


def test_client_reconnect_waits(q):
    # a client that cannot connect yet, but will try again: added, disconnected
    none = os.path.join(q.tmp, "later.sock")
    q.execute("chardev-add", id="c", backend=sock_backend(unix(none), server=False, reconnect=60))
    assert chardevs(q)["c"] == ("disconnected:unix:%s" % none, False)
    assert q.execute("qom-get", path="c", property="addr") == {"type": "unix", "path": none}
    assert q.execute("qom-get", path="c", property="connected") is False
    q.execute("chardev-remove", id="c")


def test_client_connects(q):
    path = os.path.join(q.tmp, "lis.sock")
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen(1)
    q.execute("chardev-add", id="c", backend=sock_backend(unix(path), server=False))
    peer, _ = ls.accept()
    assert chardevs(q)["c"] == ("unix:", False)
    assert q.execute("qom-get", path="c", property="connected") is True
    assert q.execute("qom-get", path="c", property="addr") == {"type": "unix", "path": path}
    peer.close()
    ls.close()
    q.execute("chardev-remove", id="c")


def test_ids(q):
    # over QMP any string is an id (the command line wants an identifier)
    for cid in ("1bad", "a b", ""):
        assert q.execute("chardev-add", id=cid, backend={"type": "ringbuf", "data": {}}) == {}
        assert chardevs(q)[cid] == ("ringbuf", False)


# ---- ringbuf ----------------------------------------------------------------------

RINGBUF_SESSION = [
    ("ringbuf-write", dict(device="rb", data="hello world 12345678")),
    ("ringbuf-read", dict(device="rb", size=100)),
    ("ringbuf-write", dict(device="rb", data="aGVsbG8=", format="base64")),
    ("ringbuf-read", dict(device="rb", size=3)),
    ("ringbuf-read", dict(device="rb", size=100, format="base64")),
    ("ringbuf-read", dict(device="rb", size=100)),
    ("ringbuf-write", dict(device="rb", data="\u00e9z")),
    ("ringbuf-read", dict(device="rb", size=1)),
    ("ringbuf-read", dict(device="rb", size=1)),
    ("ringbuf-read", dict(device="rb", size=100)),
    ("ringbuf-write", dict(device="rb", data="/w==", format="base64")),
    ("ringbuf-read", dict(device="rb", size=100)),
    ("ringbuf-write", dict(device="rb", data="YQBi", format="base64")),    # "a\0b"
    ("ringbuf-read", dict(device="rb", size=100)),
    ("ringbuf-write", dict(device="rb", data="\u20ac\U0001f600")),
    ("ringbuf-read", dict(device="rb", size=100)),
    ("ringbuf-write", dict(device="rb", data="")),
    ("ringbuf-read", dict(device="rb", size=100)),
    ("ringbuf-read", dict(device="rb", size=0)),
    ("ringbuf-read", dict(device="rb", size=-1)),
    ("ringbuf-read", dict(device="nope", size=1)),
    ("ringbuf-read", dict(device="qmp0", size=1)),
    ("ringbuf-write", dict(device="qmp0", data="x")),
    ("ringbuf-write", dict(device="rb", data="!!!", format="base64")),
    ("ringbuf-write", dict(device="rb", data="a", format="hex")),
    ("ringbuf-read", dict(device="rb")),
    ("ringbuf-read", dict(device="m8", size=100)),
    ("ringbuf-write", dict(device="m8", data="0123456789")),
    ("ringbuf-read", dict(device="m8", size=100)),
]

RINGBUF_ANSWERS = [
    {}, "o world 12345678", {}, "hel", "bG8=", "", {}, "\ufffd", "\ufffd", "z", {}, "\ufffd",
    {}, "a", {}, "\u20ac\U0001f600", {}, "",
    ("GenericError", "size must be greater than zero"),
    ("GenericError", "size must be greater than zero"),
    ("GenericError", "Device 'nope' not found"),
    ("GenericError", "qmp0 is not a ringbuf device"),
    ("GenericError", "qmp0 is not a ringbuf device"),
    ("GenericError", "Base64 data contains invalid characters"),
    ("GenericError", "Parameter 'format' does not accept value 'hex'"),
    ("GenericError", "Parameter 'size' is missing"),
    "", {}, "23456789",
]


def test_ringbuf(q):
    q.execute("chardev-add", id="rb", backend={"type": "ringbuf", "data": {"size": 16}})
    q.execute("chardev-add", id="m8", backend={"type": "memory", "data": {"size": 8}})
    got = []
    for cmd, args in RINGBUF_SESSION:
        r = q.request(cmd, args)
        got.append(r["return"] if "return" in r else (r["error"]["class"], r["error"]["desc"]))
    assert got == RINGBUF_ANSWERS
    assert chardevs(q)["m8"] == ("memory", False)
    assert q.execute("qom-get", path="/chardevs/m8", property="type") == "chardev-memory"
    assert q.execute("qom-get", path="/chardevs/rb", property="type") == "chardev-ringbuf"


def test_ringbuf_size(impl, q):
    assert err(q, "chardev-add", id="r", backend={"type": "ringbuf", "data": {"size": 100}}) == \
        ("GenericError", "Failed to add chardev 'r': size of ringbuf chardev must be power of two")
    assert err(q, "chardev-add", id="r", backend={"type": "ringbuf", "data": {"size": -4}}) == \
        ("GenericError", "Failed to add chardev 'r': size of ringbuf chardev must be power of two")
    if impl == "bexd":
        # a power of two as QEMU's size_t (2^63), whose ring qsd 7.2 tries
        # to allocate and aborts; bexd refuses it (and computes it without
        # a signed overflow, which UBSan would report)
        assert err(q, "chardev-add", id="r",
                   backend={"type": "ringbuf", "data": {"size": -2 ** 63}}) == \
            ("GenericError", "Failed to add chardev 'r': size of ringbuf chardev must be at most "
             "1073741824")
    q.execute("chardev-add", id="r", backend={"type": "ringbuf", "data": {"size": 1}})
    q.execute("ringbuf-write", device="r", data="abc")
    assert q.execute("ringbuf-read", device="r", size=10) == "c"
    if impl == "bexd":
        # 0 is the default size, as on the command line (qsd 7.2 writes out of a 0-byte ring)
        q.execute("chardev-add", id="z", backend={"type": "ringbuf", "data": {"size": 0}})
        q.execute("ringbuf-write", device="z", data="x" * 70000)
        assert len(q.execute("ringbuf-read", device="z", size=100000)) == 65536


# ---- change -----------------------------------------------------------------------

def test_change(impl, q):
    p = os.path.join(q.tmp, "ch.sock")
    q.execute("chardev-add", id="c", backend=sock_backend(unix(p), wait=False))
    assert q.execute("chardev-change", id="c", backend={"type": "ringbuf", "data": {"size": 4}}) == {}
    assert chardevs(q)["c"] == ("ringbuf", False)
    assert not os.path.exists(p)
    q.execute("ringbuf-write", device="c", data="abcdef")
    assert q.execute("ringbuf-read", device="c", size=9) == "cdef"
    q.execute("chardev-change", id="c", backend=sock_backend(unix(p), wait=False))
    assert chardevs(q)["c"] == ("disconnected:unix:%s,server=on" % p, False)
    assert err(q, "chardev-change", id="qmp0", backend={"type": "ringbuf", "data": {}}) == \
        ("GenericError", "Chardev user does not support chardev hotswap")
    assert err(q, "chardev-change", id="nope", backend={"type": "ringbuf", "data": {}}) == \
        ("GenericError", "Chardev 'nope' does not exist")
    assert err(q, "chardev-change", id="c", backend={"type": "ringbuf", "data": {"size": 3}}) == \
        ("GenericError", "Failed to add chardev 'c': size of ringbuf chardev must be power of two")
    if impl == "bexd":
        # the bad option was caught before anything was replaced (qsd 7.2 loses the chardev)
        assert chardevs(q)["c"] == ("disconnected:unix:%s,server=on" % p, False)


def test_send_break(q):
    q.execute("chardev-add", id="rb", backend={"type": "ringbuf", "data": {}})
    assert q.execute("chardev-send-break", id="rb") == {}
    assert q.execute("chardev-send-break", id="qmp0") == {}
    assert err(q, "chardev-send-break", id="nope") == ("GenericError", "Chardev 'nope' not found")


def test_same_as_qsd(start_daemon, tmpdir_short):
    """One session of adds, changes and removes, answer by answer (paths and
    the chardev list's order normalised)."""
    if not QSD:
        pytest.skip("qemu-storage-daemon not installed")
    steps = [
        ("chardev-add", dict(id="a", backend={"type": "ringbuf", "data": {"size": 64}})),
        ("chardev-add", dict(id="a", backend={"type": "memory", "data": {}})),
        ("chardev-add", dict(id="b", backend=sock_backend(unix("@T@/b.sock"), server=True,
                                                           wait=False, nodelay=True))),
        ("chardev-add", dict(id="c", backend=sock_backend(unix("@T@/c.sock"), logfile="@T@/c.log",
                                                           logappend=True))),
        ("chardev-add", dict(id="d", backend={"type": "ringbuf", "data": {"logfile": "/nonexistent/l"}})),
        ("query-chardev", {}),
        ("chardev-change", dict(id="b", backend={"type": "memory", "data": {"size": 2}})),
        ("chardev-remove", dict(id="a")),
        ("query-chardev", {}),
        ("qom-list", dict(path="/chardevs")),
        ("qom-list", dict(path="/chardevs/c")),
        ("qom-get", dict(path="/chardevs/c", property="addr")),
        ("qom-get", dict(path="/chardevs/b", property="type")),
    ]
    res = {}
    for impl in ("bexd", "qsd"):
        tmp = os.path.join(tmpdir_short, impl)
        os.mkdir(tmp)
        d = start_daemon(impl)
        m = d.qmp()
        out = []
        for cmd, args in steps:
            r = m.request(cmd, json.loads(json.dumps(args).replace("@T@", tmp)))
            r = r.get("return", r.get("error"))
            r = json.loads(json.dumps(r).replace(tmp, "@T@").replace(d.qmp_path, "@Q@"))
            if isinstance(r, list):
                r = sorted(r, key=lambda x: json.dumps(x, sort_keys=True))
            out.append(r)
        res[impl] = out
        d.stop()
    assert res["bexd"] == res["qsd"]


# ---- monitors on chardevs ------------------------------------------------------------

def test_two_monitors(impl, start_daemon, tmpdir_short):
    a, b = os.path.join(tmpdir_short, "a.sock"), os.path.join(tmpdir_short, "b.sock")
    d = start_daemon(impl, "--chardev", "socket,id=ma,path=%s,server=on,wait=off" % a,
                     "--monitor", "ma",
                     "--chardev", "socket,id=mb,path=%s,server=on,wait=off" % b,
                     "--monitor", "chardev=mb", monitor=False)
    ma, mb = QMP(a), QMP(b)
    img = os.path.join(tmpdir_short, "img")
    open(img, "wb").truncate(1 << 20)
    ma.execute("blockdev-add", driver="file", node_name="f", filename=img)
    mb.execute("nbd-server-start", addr={"type": "unix", "data": {"path": os.path.join(tmpdir_short, "n.sock")}})
    ma.execute("block-export-add", type="nbd", id="e", node_name="f")
    mb.execute("block-export-del", id="e")
    for m in (ma, mb):
        assert m.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e"}
    c = {x["label"]: x["frontend-open"] for x in ma.execute("query-chardev")}
    assert c == {"ma": True, "mb": True}
    ma.close()
    mb.close()


def test_monitor_on_client_socket(impl, start_daemon, tmpdir_short):
    """A monitor that connects out (server=off), and with reconnect=1 comes
    back after the peer went away."""
    path = os.path.join(tmpdir_short, "mgr.sock")
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen(1)
    ls.settimeout(30)
    d = start_daemon(impl, "--chardev", "socket,id=out,path=%s,reconnect=1" % path,
                     "--monitor", "out")
    for _ in range(2):
        peer, _ = ls.accept()
        peer.settimeout(30)
        f = peer.makefile("rb")
        greeting = json.loads(f.readline())
        assert "QMP" in greeting
        peer.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"query-chardev","id":1}\n')
        assert json.loads(f.readline()) == {"return": {}}
        r = json.loads(f.readline())
        assert r["id"] == 1
        assert {x["label"]: x["filename"] for x in r["return"]}["out"] == "unix:"
        f.close()
        peer.close()            # bexd notices and connects again a second later
    q = d.qmp()
    # the address as the command line filled it in
    assert q.execute("qom-get", path="/chardevs/out", property="addr") == \
        {"type": "unix", "path": path, "abstract": False, "tight": True}
    ls.close()


def test_monitor_on_ringbuf(impl, start_daemon):
    """QEMU greets a monitor on a ring buffer as soon as it is attached: the
    greeting can be read back from another monitor."""
    d = start_daemon(impl, "--chardev", "ringbuf,id=log,size=4096", "--monitor", "log")
    q = d.qmp()
    text = q.execute("ringbuf-read", device="log", size=4096)
    assert json.loads(text.splitlines()[0])["QMP"]["capabilities"] == []   # no oob there
    assert {x["label"]: x["frontend-open"] for x in q.execute("query-chardev")}["log"] is True
    assert err(q, "chardev-remove", id="log") == ("GenericError", "Chardev 'log' is busy")


def test_monitor_logfile(impl, start_daemon, tmpdir_short):
    path, log = os.path.join(tmpdir_short, "m.sock"), os.path.join(tmpdir_short, "m.log")
    with open(log, "w") as f:
        f.write("before\n")
    d = start_daemon(impl, "--chardev", "socket,id=lg,path=%s,server=on,wait=off,logfile=%s,"
                     "logappend=on" % (path, log), "--monitor", "lg")
    m = QMP(path)
    m.execute("query-version")
    # the log is written just after the socket: a round trip on the other
    # monitor (the same loop) comes after it
    d.qmp().execute("query-version")
    m.close()
    with open(log) as f:
        lines = f.read().splitlines()
    assert lines[0] == "before"
    assert "QMP" in json.loads(lines[1])
    assert json.loads(lines[2]) == {"return": {}}
    assert "qemu" in json.loads(lines[3])["return"]


# ---- the command line -------------------------------------------------------------------

@pytest.mark.parametrize("arg,msg", [
    ("ringbuf,id=r,size=3", "size of ringbuf chardev must be power of two"),
    ("ringbuf,id=r,size=x", "Parameter 'size' expects a non-negative number below 2^64"),
    ("ringbuf,id=r,bogus=1", "Invalid parameter 'bogus'"),
    ("ringbuf,id=r,logfile=/nonexistent/l", "Could not create '/nonexistent/l': No such file or directory"),
    ("socket,id=s,path=@T@/none.sock", "Failed to connect to '@T@/none.sock': No such file or directory"),
    ("socket,id=s,path=@T@/x.sock,server=on,reconnect=1",
     "'reconnect' option is incompatible with socket in server listen mode"),
    ("socket,id=s,host=127.0.0.1,port=1,server=off,wait=off",
     "'wait' option is incompatible with socket in client connect mode"),
    ("socket,id=s,path=@T@/x.sock,server=on,wait=off,tls-authz=x",
     "'tls_authz' option requires 'tls_creds' option"),
    ("stdio,id=s", "cannot use stdio with -daemonize"),
])
def test_cli_errors(impl, tmpdir_short, arg, msg):
    arg = arg.replace("@T@", tmpdir_short)
    msg = msg.replace("@T@", tmpdir_short)
    rc, stderr = run_daemon_expect_fail(impl, ["--chardev", arg, "--daemonize"])
    assert rc == 1
    assert stderr.splitlines()[0].endswith("--chardev %s: %s" % (arg, msg)), stderr


def test_cli_ringbuf_and_client(impl, start_daemon, tmpdir_short):
    path = os.path.join(tmpdir_short, "later.sock")
    d = start_daemon(impl, "--chardev", "ringbuf,id=r,size=1k", "--chardev", "memory,id=z,size=0",
                     "--chardev", "socket,id=c,path=%s,reconnect=5" % path)
    q = d.qmp()
    q.execute("ringbuf-write", device="r", data="y" * 2000)
    assert len(q.execute("ringbuf-read", device="r", size=4096)) == 1024
    q.execute("ringbuf-write", device="z", data="y" * 70000)
    assert len(q.execute("ringbuf-read", device="z", size=100000)) == 65536
    assert {x["label"]: x["filename"] for x in q.execute("query-chardev")}["c"] == \
        "disconnected:unix:%s" % path


# ---- bexd only --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["file", "null", "pty", "pipe", "udp", "mux"])
def test_other_backends_refused(start_daemon, backend):
    q = start_daemon("bexd").qmp()
    assert err(q, "chardev-add", id="x", backend={"type": backend, "data": {}}) == \
        ("GenericError", "Parameter 'type' does not accept value '%s'" % backend)


@pytest.mark.parametrize("opt", ["telnet", "tn3270", "websocket"])
def test_unsupported_socket_options(start_daemon, tmpdir_short, opt):
    q = start_daemon("bexd").qmp()
    p = os.path.join(tmpdir_short, "x.sock")
    assert err(q, "chardev-add", id="x", backend=sock_backend(unix(p), wait=False, **{opt: True})) == \
        ("GenericError", "Failed to add chardev 'x': "
         "socket chardev option '%s' is not supported by bexd" % opt)
    assert q.execute("chardev-add", id="x", backend=sock_backend(unix(p), wait=False,
                                                                 **{opt: False})) == {}
