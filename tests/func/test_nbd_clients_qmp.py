"""NBD server and export lifecycle through QMP, with clients connected.

nbd-server-start/stop, block-export-add/del (nbd), the deprecated
nbd-server-add/remove, max-connections, query-block-exports, and the
BLOCK_EXPORT_DELETED event.  Error classes and messages are qemu-storage-
daemon 7.2's, recorded verbatim.  The removal modes hide and soft are not in
qsd 7.2 (its schema rejects them): the tests assert that rejection for qsd
and bexd's behaviour otherwise.
"""
import os
import socket

import pytest

from conftest import QMPError
from nbdwire import (OPT_LIST, REP_ACK, REP_ERR_UNKNOWN, REP_SERVER, Closed, Conn,
                     ESHUTDOWN, HEAD)

import nbd  # noqa: E402 (python3-libnbd, which scripts/deps.sh installs)


class Env:
    """A daemon with node "disk0" (writable, 1 MiB, HEAD at 0) and "ro0"
    (read-only), a QMP monitor, and no NBD server yet."""

    def __init__(self, impl, start_daemon, tmpdir):
        self.tmpdir = tmpdir
        self.img = os.path.join(tmpdir, "disk.img")
        with open(self.img, "wb") as f:
            f.truncate(1 << 20)
            f.write(HEAD)
        ro = os.path.join(tmpdir, "ro.img")
        with open(ro, "wb") as f:
            f.truncate(1 << 20)
        self.sock = os.path.join(tmpdir, "nbd.sock")
        self.d = start_daemon(impl,
                              "--blockdev", "driver=file,node-name=disk0,filename=" + self.img,
                              "--blockdev", "driver=file,node-name=ro0,filename=%s,read-only=on" % ro)
        self.q = self.d.qmp()

    def addr(self, path=None):
        return {"type": "unix", "data": {"path": path or self.sock}}

    def start(self, **kw):
        self.q.execute("nbd-server-start", addr=self.addr(), **kw)

    def add(self, id="e0", name="disk0", **kw):
        self.q.execute("block-export-add", type="nbd", id=id, node_name="disk0",
                       name=name, writable=True, **kw)

    def exports(self):
        return sorted((e["id"], e["node-name"], e["shutting-down"])
                      for e in self.q.execute("query-block-exports"))

    def list_names(self):
        c = Conn(self.sock).start()
        c.opt(OPT_LIST)
        names = []
        for _, t, data in c.opt_replies():
            if t == REP_SERVER:
                n = int.from_bytes(data[:4], "big")
                names.append(data[4:4 + n].decode())
        c.close()
        return sorted(names)


@pytest.fixture
def env(impl, start_daemon, tmpdir_short):
    return Env(impl, start_daemon, tmpdir_short)


def err(q, cmd, **args):
    e = q.error(cmd, **args)
    return e["class"], e["desc"]


# -- nbd-server-start / stop ------------------------------------------------------

def test_server_start_stop_twice(env):
    env.start()
    env.add()
    assert Conn(env.sock).connect("disk0").read(0, 16).data == HEAD[:16]
    env.q.execute("nbd-server-stop")
    assert not os.path.exists(env.sock) or _refused(env.sock)
    env.start()
    env.add()
    assert Conn(env.sock).connect("disk0").read(0, 16).data == HEAD[:16]
    env.q.execute("nbd-server-stop")


def _refused(path):
    try:
        Conn(path, timeout=2).greeting()
    except (ConnectionRefusedError, FileNotFoundError, Closed):
        return True
    return False


def test_server_start_already_running(env):
    env.start()
    assert err(env.q, "nbd-server-start", addr=env.addr()) == \
        ("GenericError", "NBD server already running")
    assert err(env.q, "nbd-server-start", addr=env.addr(env.tmpdir + "/other.sock")) == \
        ("GenericError", "NBD server already running")


def test_server_start_unknown_tls_creds(env):
    assert err(env.q, "nbd-server-start", addr=env.addr(), tls_creds="nope") == \
        ("GenericError", "No TLS credentials with id 'nope'")
    env.start()                     # nothing was left half-started


def test_server_start_missing_addr(env):
    assert err(env.q, "nbd-server-start") == ("GenericError", "Parameter 'addr' is missing")


def test_server_start_flat_addr_rejected(env):
    # nbd-server-start takes the legacy (non-flat) SocketAddress
    assert err(env.q, "nbd-server-start", addr={"type": "unix", "path": env.sock}) == \
        ("GenericError", "Parameter 'addr.data' is missing")


def test_server_start_bind_failure(env):
    cls, desc = err(env.q, "nbd-server-start", addr=env.addr("/nonexistent/dir/nbd.sock"))
    assert cls == "GenericError"
    assert desc.startswith("Failed to bind socket to /nonexistent/dir/nbd.sock")
    env.start()


def test_server_stop_not_running(env):
    assert err(env.q, "nbd-server-stop") == ("GenericError", "NBD server not running")


def test_server_stop_removes_exports_with_events(env):
    env.start()
    env.add()
    env.add(id="e1", name="second")
    c = Conn(env.sock).connect("disk0")
    env.q.execute("nbd-server-stop")
    ids = sorted(env.q.wait_event("BLOCK_EXPORT_DELETED")["data"]["id"] for _ in range(2))
    assert ids == ["e0", "e1"]
    assert env.exports() == []
    assert c.eof()


# -- block-export-add ----------------------------------------------------------------

def test_export_add_without_server(env):
    assert err(env.q, "block-export-add", type="nbd", id="e0", node_name="disk0") == \
        ("GenericError", "NBD server not running")


@pytest.mark.parametrize("args,expect", [
    ({}, "Parameter 'node-name' is missing"),
    ({"node-name": "nonode"}, "Cannot find device='' nor node-name='nonode'"),
    ({"node-name": "disk0", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ({"node-name": "disk0", "writable": "yes"},
     "Invalid parameter type for 'writable', expected: boolean"),
    ({"node-name": "disk0", "bitmaps": ["nobm"]}, "Bitmap 'nobm' is not found"),
    ({"node-name": "disk0", "iothread": "nope"}, 'iothread "nope" not found'),
    ({"node-name": "ro0", "writable": True}, "Cannot export read-only node as writable"),
    ({"node-name": "disk0", "description": "x" * 4097},
     "description '%s' too long" % ("x" * 4097)),
    ({"node-name": "disk0", "name": "y" * 4097}, "export name '%s' too long" % ("y" * 4097)),
])
def test_export_add_bad_args(env, args, expect):
    env.start()
    r = env.q.request("block-export-add", dict(type="nbd", id="e9", **args))
    assert r["error"] == {"class": "GenericError", "desc": expect}
    assert env.exports() == []


def test_export_add_bad_type_and_id(env):
    env.start()
    assert err(env.q, "block-export-add", type="bogus", id="e0", node_name="disk0") == \
        ("GenericError", "Parameter 'type' does not accept value 'bogus'")
    assert err(env.q, "block-export-add", type="nbd", id="", node_name="disk0") == \
        ("GenericError", "Invalid block export id")
    assert err(env.q, "block-export-add", type="nbd", node_name="disk0") == \
        ("GenericError", "Parameter 'id' is missing")


def test_export_add_limits_accepted(env):
    env.start()
    env.add(id="e1", name="n" * 4096, description="d" * 4096)
    assert env.list_names() == ["n" * 4096]


def test_export_add_duplicate_id(env):
    env.start()
    env.add()
    assert err(env.q, "block-export-add", type="nbd", id="e0", node_name="disk0",
               name="other") == ("GenericError", "Block export id 'e0' is already in use")


def test_export_add_duplicate_name(env):
    env.start()
    env.add()
    assert err(env.q, "block-export-add", type="nbd", id="e1", node_name="disk0",
               name="disk0") == ("GenericError", "NBD server already has export named 'disk0'")
    assert env.exports() == [("e0", "disk0", False)]


def test_export_add_name_defaults_to_node_name(env):
    env.start()
    env.q.execute("block-export-add", type="nbd", id="e0", node_name="disk0")
    assert env.list_names() == ["disk0"]


def test_export_add_options(env):
    env.start()
    env.q.execute("block-export-add", type="nbd", id="e0", node_name="disk0", name="n",
                  allocation_depth=True, writethrough=True, fixed_iothread=False)
    h = nbd.NBD()
    h.add_meta_context("qemu:allocation-depth")
    h.set_export_name("n")
    h.connect_unix(env.sock)
    assert h.can_meta_context("qemu:allocation-depth")
    assert h.is_read_only()           # writable defaults to false


def test_read_only_node_exported_read_only(env):
    env.start()
    env.q.execute("block-export-add", type="nbd", id="e0", node_name="ro0", name="ro")
    h = nbd.NBD()
    h.set_export_name("ro")
    h.connect_unix(env.sock)
    assert h.is_read_only()


# -- block-export-del ---------------------------------------------------------------

def test_export_del_unknown(env):
    env.start()
    assert err(env.q, "block-export-del", id="nope") == \
        ("GenericError", "Export 'nope' is not found")
    assert err(env.q, "block-export-del") == ("GenericError", "Parameter 'id' is missing")
    assert err(env.q, "block-export-del", id="nope", mode="bogus") == \
        ("GenericError", "Parameter 'mode' does not accept value 'bogus'")


def test_export_del_safe_idle(env):
    env.start()
    env.add()
    env.q.execute("block-export-del", id="e0")
    assert env.q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e0"}
    assert env.exports() == []
    c = Conn(env.sock).start()
    assert c.go("disk0")[-1][1] == REP_ERR_UNKNOWN


@pytest.mark.parametrize("mode", [None, "safe"])
def test_export_del_safe_while_connected(env, mode):
    env.start()
    env.add()
    c = Conn(env.sock).connect("disk0")
    args = {"mode": mode} if mode else {}
    assert err(env.q, "block-export-del", id="e0", **args) == \
        ("GenericError", "export 'e0' still in use")
    assert env.exports() == [("e0", "disk0", False)]
    assert c.read(0, 16).data == HEAD[:16]          # untouched


def test_export_del_hard_disconnects(env):
    env.start()
    env.add()
    c = Conn(env.sock).connect("disk0")
    assert env.exports() == [("e0", "disk0", False)]
    env.q.execute("block-export-del", id="e0", mode="hard")
    assert env.q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e0"}
    assert c.eof()
    assert env.exports() == []
    assert env.list_names() == []


def test_export_del_hard_libnbd_sees_disconnect(env):
    env.start()
    env.add()
    h = nbd.NBD()
    h.set_export_name("disk0")
    h.connect_unix(env.sock)
    env.q.execute("block-export-del", id="e0", mode="hard")
    env.q.wait_event("BLOCK_EXPORT_DELETED")
    with pytest.raises(nbd.Error):
        h.pread(512, 0)


def test_export_readd_after_delete(env):
    env.start()
    env.add()
    env.q.execute("block-export-del", id="e0", mode="hard")
    env.q.wait_event("BLOCK_EXPORT_DELETED")
    env.add()
    assert Conn(env.sock).connect("disk0").read(0, 16).data == HEAD[:16]


def test_export_del_hide(env, impl):
    env.start()
    env.add()
    c = Conn(env.sock).connect("disk0")
    if impl == "qsd":
        assert err(env.q, "block-export-del", id="e0", mode="hide") == \
            ("GenericError", "Parameter 'mode' does not accept value 'hide'")
        pytest.skip("qsd 7.2 lacks block-export-del mode=hide")
    env.q.execute("block-export-del", id="e0", mode="hide")
    # hidden from new clients ...
    assert env.list_names() == []
    n = Conn(env.sock).start()
    assert n.go("disk0")[-1][1] == REP_ERR_UNKNOWN
    # ... the existing connection keeps working, reads and writes ...
    assert c.read(0, 16).data == HEAD[:16]
    assert c.write(4096, b"w" * 512).err == 0
    assert env.exports() == [("e0", "disk0", True)]
    assert not [e for e in env.q.events if e["event"] == "BLOCK_EXPORT_DELETED"]
    # ... and the export goes when it disconnects
    c.disc()
    assert c.eof()
    assert env.q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e0"}
    assert env.exports() == []


def test_export_del_soft(env, impl):
    env.start()
    env.add()
    h = nbd.NBD()
    h.set_export_name("disk0")
    h.connect_unix(env.sock)
    assert h.pread(16, 0) == HEAD[:16]
    if impl == "qsd":
        assert err(env.q, "block-export-del", id="e0", mode="soft") == \
            ("GenericError", "Parameter 'mode' does not accept value 'soft'")
        pytest.skip("qsd 7.2 lacks block-export-del mode=soft")
    env.q.execute("block-export-del", id="e0", mode="soft")
    # existing client: every further request fails with ESHUTDOWN
    with pytest.raises(nbd.Error) as e:
        h.pread(16, 0)
    assert e.value.errno == "ESHUTDOWN"
    # new clients are refused
    n = Conn(env.sock).start()
    assert n.go("disk0")[-1][1] == REP_ERR_UNKNOWN
    assert env.list_names() == []
    h.shutdown()
    assert env.q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e0"}
    assert env.exports() == []


def test_export_del_soft_wire(env, impl):
    if impl == "qsd":
        pytest.skip("qsd 7.2 lacks block-export-del mode=soft")
    env.start()
    env.add()
    c = Conn(env.sock).connect("disk0")
    env.q.execute("block-export-del", id="e0", mode="soft")
    assert c.read(0, 512).err == ESHUTDOWN
    assert c.write(0, b"x" * 512).err == ESHUTDOWN     # payload consumed
    assert c.read(0, 512).err == ESHUTDOWN


# -- query-block-exports --------------------------------------------------------------

def test_query_block_exports_lifecycle(env):
    env.start()
    assert env.exports() == []
    env.add()
    env.q.execute("block-export-add", type="nbd", id="e1", node_name="ro0", name="ro")
    assert env.q.execute("query-block-exports")[0].keys() == \
        {"id", "type", "node-name", "shutting-down"}
    assert env.exports() == [("e0", "disk0", False), ("e1", "ro0", False)]
    assert {e["type"] for e in env.q.execute("query-block-exports")} == {"nbd"}
    c = Conn(env.sock).connect("disk0")
    assert env.exports() == [("e0", "disk0", False), ("e1", "ro0", False)]
    env.q.execute("block-export-del", id="e0", mode="hard")
    env.q.wait_event("BLOCK_EXPORT_DELETED")
    assert c.eof()
    assert env.exports() == [("e1", "ro0", False)]


# -- nbd-server-add / remove (deprecated) ----------------------------------------------

def test_nbd_server_add_remove(env):
    env.start()
    env.q.execute("nbd-server-add", device="disk0", name="old", writable=True,
                  description="legacy")
    env.q.execute("nbd-server-add", device="disk0")          # name = device
    # the export id is the name
    assert env.exports() == [("disk0", "disk0", False), ("old", "disk0", False)]
    assert env.list_names() == ["disk0", "old"]
    h = nbd.NBD()
    h.set_export_name("old")
    h.connect_unix(env.sock)
    assert not h.is_read_only()
    h.shutdown()
    env.q.execute("nbd-server-remove", name="old")
    assert env.q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "old"}
    env.q.execute("nbd-server-remove", name="disk0", mode="hard")
    assert env.q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "disk0"}
    assert env.exports() == []


def test_nbd_server_add_errors(env):
    assert err(env.q, "nbd-server-add", device="disk0") == \
        ("GenericError", "NBD server not running")
    env.start()
    env.q.execute("nbd-server-add", device="disk0", name="old")
    assert err(env.q, "nbd-server-add", device="disk0", name="old") == \
        ("GenericError", "Block export id 'old' is already in use")
    assert err(env.q, "nbd-server-add", device="nonode") == \
        ("GenericError", "Cannot find device='nonode' nor node-name='nonode'")
    assert err(env.q, "nbd-server-add", device="disk0", name="b", bitmap="nobm") == \
        ("GenericError", "Bitmap 'nobm' is not found")
    # unlike block-export-add, the legacy command quietly exports a
    # read-only node read-only even when asked for writable
    env.q.execute("nbd-server-add", device="ro0", name="w", writable=True)
    h = nbd.NBD()
    h.set_export_name("w")
    h.connect_unix(env.sock)
    assert h.is_read_only()


def test_nbd_server_remove_errors(env):
    env.start()
    assert err(env.q, "nbd-server-remove", name="nope") == \
        ("GenericError", "Export 'nope' is not found")
    assert err(env.q, "nbd-server-remove") == ("GenericError", "Parameter 'name' is missing")
    env.q.execute("nbd-server-add", device="disk0", name="old")
    assert err(env.q, "nbd-server-remove", name="old", mode="bogus") == \
        ("GenericError", "Parameter 'mode' does not accept value 'bogus'")
    c = Conn(env.sock).connect("old")
    assert err(env.q, "nbd-server-remove", name="old") == \
        ("GenericError", "export 'old' still in use")
    env.q.execute("nbd-server-remove", name="old", mode="hard")
    assert c.eof()


# -- max-connections ------------------------------------------------------------------

def test_max_connections(env):
    env.start(max_connections=1)
    env.add()
    first = Conn(env.sock).connect("disk0")
    # the extra client is either refused (connection refused or closed) or
    # held without a greeting (qsd 7.2 stops accepting) until the first leaves
    try:
        extra = Conn(env.sock, timeout=0.5)
        extra.greeting()
        held = None
    except (Closed, ConnectionRefusedError):
        held = False
    except socket.timeout:
        held = True
    assert held is not None, "the extra client got a greeting"
    assert first.read(0, 16).data == HEAD[:16]
    first.disc()
    assert first.eof()
    if held:
        extra.sock.settimeout(10)
        extra.greeting()
        extra.client_flags()
        assert extra.go("disk0")[-1][1] == REP_ACK
    else:
        assert Conn(env.sock).connect("disk0").read(0, 16).data == HEAD[:16]


# -- introspection --------------------------------------------------------------------

def test_query_commands_lists_nbd(env):
    names = {c["name"] for c in env.q.execute("query-commands")}
    assert {"nbd-server-start", "nbd-server-stop", "nbd-server-add", "nbd-server-remove",
            "block-export-add", "block-export-del", "query-block-exports"} <= names


def test_cli_export_then_qmp_delete(impl, start_daemon, tmpdir_short):
    img = os.path.join(tmpdir_short, "d.img")
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon(impl, "--blockdev", "driver=file,node-name=disk0,filename=" + img,
                     "--nbd-server", "addr.type=unix,addr.path=" + sock,
                     "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0")
    q = d.qmp()
    assert [e["id"] for e in q.execute("query-block-exports")] == ["exp0"]
    q.execute("block-export-del", id="exp0")
    assert q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "exp0"}
    with pytest.raises(QMPError) as e:
        q.execute("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    assert e.value.desc == "NBD server already running"
