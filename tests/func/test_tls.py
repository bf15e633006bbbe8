"""NBD over TLS: credentials objects, authorization, forced STARTTLS.

Credentials are made once per module with certtool/psktool (tlscerts.py).
Where qemu-storage-daemon 7.2 can run the scenario, `impl` runs it against
both.  Clients: libnbd (in-process, as nbdsh would), qemu-io with a client
tls-creds object, and a raw socket wrapped in Python's ssl after STARTTLS
for protocol-level cases.

Known qsd 7.2 differences, tested on bexd only:
  - qsd cannot create authz-listfile (its QOM type is "authz-list-file",
    so object-add of the QAPI name fails with "invalid object type");
  - qsd lets object-del remove credentials a running server uses; bexd
    refuses ("object 'x' is in use, can not be deleted");
  - qsd never asks tls-authz about PSK usernames; bexd does.
"""
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time

import pytest

import nbd  # noqa: E402 (python3-libnbd, which scripts/deps.sh installs)

import needs
import tlscerts
from conftest import QMPError, require_localhost, tool_text, tool_json
from nbdwire import (OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_STARTTLS,
                     OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY,
                     REP_ERR_TLS_REQD, Closed, Conn, free_tcp_port, info_data, pattern)



@pytest.fixture(autouse=True)
def gnutls_tools():
    needs.tool("certtool", "gnutls-bin")
    needs.tool("psktool", "gnutls-bin")

SIZE = 8 << 20


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    return tlscerts.make_credentials(str(tmp_path_factory.mktemp("tls")))


def x509_server(creds, extra=""):
    return "tls-creds-x509,id=tls0,endpoint=server,dir=%s%s" % (creds.server, extra)


def psk_server(creds):
    return "tls-creds-psk,id=tls0,endpoint=server,dir=%s" % creds.psk


class Server:
    def __init__(self, daemon, sock, img):
        self.daemon, self.sock, self.img = daemon, sock, img

    def qmp(self):
        if not hasattr(self, "_q"):
            self._q = self.daemon.qmp()
        return self._q


def start_tls(start_daemon, impl, tmpdir, objects, server_opts=",tls-creds=tls0",
              export_opts="", tcp=False, extra=()):
    img = os.path.join(tmpdir, "disk.img")
    with open(img, "wb") as f:
        f.write(pattern(SIZE))
    if tcp:
        port = free_tcp_port()
        addr = "addr.type=inet,addr.host=127.0.0.1,addr.port=%d" % port
        sock = ("127.0.0.1", port)
    else:
        sock = os.path.join(tmpdir, "nbd.sock")
        addr = "addr.type=unix,addr.path=%s" % sock
    args = []
    for o in objects:
        args += ["--object", o]
    args += list(extra)
    args += ["--blockdev", "driver=file,node-name=disk0,filename=%s" % img,
             "--nbd-server", addr + server_opts,
             "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on" + export_opts]
    return Server(start_daemon(impl, *args), sock, img)


def client(srv, certs=None, psk=None, user="alice", tls=None):
    """A libnbd handle connected to srv; raises nbd.Error if refused."""
    h = nbd.NBD()
    h.set_export_name("disk0")
    h.set_tls(nbd.TLS_REQUIRE if tls is None else tls)
    if certs:
        h.set_tls_certificates(certs)
    if psk:
        h.set_tls_psk_file(psk)
        h.set_tls_username(user)
    if isinstance(srv.sock, tuple):
        require_localhost()
        h.connect_tcp("localhost", str(srv.sock[1]))   # the name the certificate has
    else:
        h.connect_unix(srv.sock)
    return h


def refused(srv, **kw):
    with pytest.raises(nbd.Error):
        h = client(srv, **kw)
        h.pread(512, 0)   # a server that accepted would answer this


def read_ok(h, off=0, length=65536):
    assert h.pread(length, off) == pattern(SIZE)[off:off + length]


# -- credentials objects ------------------------------------------------------

def obj_error(q, **props):
    props = {k.replace("_", "-"): v for k, v in props.items()}
    resp = q.request("object-add", props)
    assert "error" in resp, resp
    return resp["error"]["class"], resp["error"]["desc"]


def test_creds_errors(impl, start_daemon, creds, tmpdir_short):
    q = start_daemon(impl).qmp()
    x = "tls-creds-x509"
    assert obj_error(q, qom_type=x, id="a", dir="/nonexistent", endpoint="server") == (
        "GenericError", "Unable to access credentials /nonexistent/ca-cert.pem: "
        "No such file or directory")
    assert obj_error(q, qom_type=x, id="a", dir=creds.client, endpoint="server") == (
        "GenericError", "Unable to access credentials %s/server-cert.pem: "
        "No such file or directory" % creds.client)
    m = creds.mismatch
    assert obj_error(q, qom_type=x, id="a", dir=m, endpoint="server") == (
        "GenericError", "Cannot load certificate '%s/server-cert.pem' & key "
        "'%s/server-key.pem': The certificate and the given key do not match." % (m, m))
    assert obj_error(q, qom_type=x, id="a", dir=creds.expired) == (
        "GenericError", "The client certificate %s/client-cert.pem has expired" % creds.expired)
    p = "tls-creds-psk"
    assert obj_error(q, qom_type=p, id="a", dir="/nonexistent", endpoint="server") == (
        "GenericError", "Unable to access credentials /nonexistent/keys.psk: "
        "No such file or directory")
    assert obj_error(q, qom_type=p, id="a", dir=creds.psk, endpoint="server", username="x") == (
        "GenericError", "username should not be set when endpoint=server")
    assert obj_error(q, qom_type=p, id="a", dir=creds.psk, username="carol") == (
        "GenericError", "Username carol not found in PSK file %s/keys.psk" % creds.psk)
    assert obj_error(q, qom_type=x, id="a", endpoint="server") == (
        "GenericError", "Missing 'dir' property value")


def test_creds_errors_command_line(impl, creds):
    from conftest import run_daemon_expect_fail
    rc, err = run_daemon_expect_fail(impl, ["--object", "tls-creds-x509,id=t,dir=/x,endpoint=server"])
    assert rc != 0
    assert err.splitlines()[0].endswith(
        "--object tls-creds-x509,id=t,dir=/x,endpoint=server: "
        "Unable to access credentials /x/ca-cert.pem: No such file or directory")


def test_server_start_creds_checks(impl, start_daemon, creds, tmpdir_short):
    d = start_daemon(impl, "--object", "tls-creds-x509,id=cli,endpoint=client,dir=%s" % creds.client,
                     "--object", "iothread,id=io0")
    q = d.qmp()
    addr = {"type": "unix", "data": {"path": os.path.join(tmpdir_short, "s")}}
    for creds_id, msg in [("nope", "No TLS credentials with id 'nope'"),
                          ("io0", "Object with id 'io0' is not TLS credentials"),
                          ("cli", "Expected TLS credentials for a server endpoint")]:
        e = q.error("nbd-server-start", addr=addr, tls_creds=creds_id)
        assert (e["class"], e["desc"]) == ("GenericError", msg)
        # QEMU listens first, then checks the credentials and closes again
        assert not os.path.exists(addr["data"]["path"])
    # so an address that cannot be listened on is the error reported
    e = q.error("nbd-server-start", addr={"type": "unix", "data": {"path": "/nonexistent/s"}},
                tls_creds="nope")
    assert e["desc"].startswith("Failed to bind socket to /nonexistent/s")


def test_delete_creds_in_use_refused(start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, "bexd", tmpdir_short, [x509_server(creds)])
    q = srv.qmp()
    e = q.error("object-del", id="tls0")
    assert (e["class"], e["desc"]) == ("GenericError", "object 'tls0' is in use, can not be deleted")
    read_ok(client(srv, certs=creds.client))
    q.execute("nbd-server-stop")
    q.execute("object-del", id="tls0")


# -- x509 ---------------------------------------------------------------------

def test_x509_read_write(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [x509_server(creds)])
    h = client(srv, certs=creds.client)
    assert h.get_size() == SIZE
    read_ok(h)
    # large transfers cross many TLS records and fill the socket buffers
    data = os.urandom(3 << 20)
    h.pwrite(data, 1 << 20)
    assert h.pread(3 << 20, 1 << 20) == data
    h.flush()
    h.shutdown()
    with open(srv.img, "rb") as f:
        f.seek(1 << 20)
        assert f.read(3 << 20) == data


def test_x509_tcp_hostname(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [x509_server(creds)], tcp=True)
    read_ok(client(srv, certs=creds.client))


def test_x509_pipelined_iothread(impl, start_daemon, creds, tmpdir_short):
    # the session moves with the connection to the export's iothread
    srv = start_tls(start_daemon, impl, tmpdir_short, ["iothread,id=io0", x509_server(creds)],
                    export_opts=",iothread=io0")
    h = client(srv, certs=creds.client)
    bufs = [nbd.Buffer(4096) for _ in range(64)]
    cookies = [h.aio_pread(b, (i * 7919 % 2048) * 4096) for i, b in enumerate(bufs)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i, (b, c) in enumerate(zip(bufs, cookies)):
        assert h.aio_command_completed(c)
        off = (i * 7919 % 2048) * 4096
        assert b.to_bytearray() == pattern(SIZE)[off:off + 4096]
    # large pipelined writes and reads fill the socket both ways
    data = os.urandom(1 << 20)
    wc = [h.aio_pwrite(data, k << 20) for k in range(4)]
    rb = [nbd.Buffer(1 << 20) for _ in range(4)]
    rc = [h.aio_pread(b, k << 20) for k, b in enumerate(rb)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in wc + rc)
    h.flush()
    assert h.pread(4 << 20, 0) == data * 4
    # the client leaves; the session ends in the export's iothread
    h.shutdown()
    del h
    if impl == "qsd":
        # qsd 7.2 asserts in nbd_blockdev_client_closed (blockdev-nbd.c:62,
        # "qemu_in_main_thread() && nbd_server") when a TLS client of an
        # iothread export disconnects; bexd serves on (checked below)
        try:
            rc = srv.daemon.wait_exit(timeout=5)
        except TimeoutError:
            srv.daemon.waited = False
        else:
            srv.daemon.expect_exit()
            pytest.xfail("qemu-storage-daemon 7.2 aborted when the TLS client "
                         "of an iothread export disconnected (status %r)" % rc)
    read_ok(client(srv, certs=creds.client), off=SIZE - 65536)


def test_x509_wrong_ca_refused(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [x509_server(creds)])
    refused(srv, certs=creds.rogue)
    read_ok(client(srv, certs=creds.client))


def test_x509_expired_client_refused(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [x509_server(creds)])
    refused(srv, certs=creds.expired)


def test_x509_no_client_cert_refused(impl, start_daemon, creds, tmpdir_short, tmp_path):
    only_ca = tmp_path / "ca-only"
    only_ca.mkdir()
    shutil.copy(os.path.join(creds.client, "ca-cert.pem"), only_ca / "ca-cert.pem")
    srv = start_tls(start_daemon, impl, tmpdir_short, [x509_server(creds)])
    refused(srv, certs=str(only_ca))


def test_x509_verify_peer_off_accepts_any_client(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short,
                    [x509_server(creds, ",verify-peer=off")])
    read_ok(client(srv, certs=creds.rogue))


def test_qemu_io_client(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [x509_server(creds)])
    opts = ("driver=nbd,server.type=unix,server.path=%s,export=disk0,tls-creds=tc,"
            "tls-hostname=localhost" % srv.sock)
    obj = "tls-creds-x509,id=tc,endpoint=client,dir=%s" % creds.client
    r = subprocess.run(["qemu-io", "--object", obj, "--image-opts", opts,
                        "-c", "write -P 0x5a 65536 4096", "-c", "read -P 0x5a 65536 4096"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    out = tool_text(r.stdout)
    assert r.returncode == 0 and "Pattern verification failed" not in out, out
    with open(srv.img, "rb") as f:
        f.seek(65536)
        assert f.read(4096) == b"\x5a" * 4096


@pytest.mark.parametrize("kind", ["anon", "psk"])
def test_qemu_img_client_anon_psk(impl, start_daemon, creds, tmpdir_short, kind):
    if kind == "anon":
        server = "tls-creds-anon,id=tls0,endpoint=server"
        cli = "tls-creds-anon,id=tc,endpoint=client"
    else:
        server = psk_server(creds)
        cli = "tls-creds-psk,id=tc,endpoint=client,username=alice,dir=%s" % creds.psk_alice
    srv = start_tls(start_daemon, impl, tmpdir_short, [server])
    opts = "driver=nbd,server.type=unix,server.path=%s,export=disk0,tls-creds=tc" % srv.sock
    r = subprocess.run(["qemu-img", "info", "--output=json", "--object", cli, "--image-opts", opts],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert r.returncode == 0, tool_text(r.stdout)
    assert tool_json(r.stdout)["virtual-size"] == SIZE


# -- authorization --------------------------------------------------------------

def test_authz_simple(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short,
                    [x509_server(creds), "authz-simple,id=auth0,identity=%s" % tlscerts.CLIENT_DN.replace(",", ",,")],
                    server_opts=",tls-creds=tls0,tls-authz=auth0")
    read_ok(client(srv, certs=creds.client))
    q = srv.qmp()
    q.execute("object-del", id="auth0")
    q.execute("object-add", qom_type="authz-simple", id="auth0", identity="O=x,CN=someone")
    refused(srv, certs=creds.client)


def test_authz_missing_object_denies(impl, start_daemon, creds, tmpdir_short):
    # tls-authz is looked up by id at each connection
    srv = start_tls(start_daemon, impl, tmpdir_short, [x509_server(creds)],
                    server_opts=",tls-creds=tls0,tls-authz=later")
    refused(srv, certs=creds.client)
    srv.qmp().execute("object-add", qom_type="authz-simple", id="later",
                      identity=tlscerts.CLIENT_DN)
    read_ok(client(srv, certs=creds.client))


def test_authz_list_glob(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [x509_server(creds)],
                    server_opts=",tls-creds=tls0,tls-authz=auth0")
    q = srv.qmp()
    q.execute("object-add", qom_type="authz-list", id="auth0", policy="deny",
              rules=[{"match": "*,CN=expired", "policy": "deny", "format": "glob"},
                     {"match": "O=bexd test,CN=*", "policy": "allow", "format": "glob"}])
    read_ok(client(srv, certs=creds.client))
    q.execute("object-del", id="auth0")
    q.execute("object-add", qom_type="authz-list", id="auth0", policy="allow",
              rules=[{"match": tlscerts.CLIENT_DN, "policy": "deny"}])
    refused(srv, certs=creds.client)


def write_rules(path, rules, policy="deny"):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"policy": policy, "rules": rules}, f)
    os.rename(tmp, path)


def test_authz_listfile_refresh(start_daemon, creds, tmpdir_short):
    rules = os.path.join(tmpdir_short, "rules.json")
    write_rules(rules, [{"match": "CN=nobody", "policy": "allow"}])
    srv = start_tls(start_daemon, "bexd", tmpdir_short,
                    [x509_server(creds), "authz-listfile,id=auth0,filename=%s" % rules],
                    server_opts=",tls-creds=tls0,tls-authz=auth0")
    refused(srv, certs=creds.client)
    # renamed into place: inotify reports it before rename() returns, so the
    # reload happens before the loop handles the next connection
    write_rules(rules, [{"match": tlscerts.CLIENT_DN, "policy": "allow"}])
    srv.qmp().execute("query-version")
    read_ok(client(srv, certs=creds.client))
    # rewritten in place (close after write) works as well
    with open(rules, "w") as f:
        json.dump({"policy": "deny"}, f)
    srv.qmp().execute("query-version")
    refused(srv, certs=creds.client)


def test_authz_listfile_errors(start_daemon, tmpdir_short):
    q = start_daemon("bexd").qmp()
    bad = os.path.join(tmpdir_short, "bad.json")
    with open(bad, "w") as f:
        f.write("[1]")
    assert obj_error(q, qom_type="authz-listfile", id="a", filename="/nonexistent.json") == (
        "GenericError", "Unable to read '/nonexistent.json': Failed to open file "
        "\u201c/nonexistent.json\u201d: No such file or directory")
    assert obj_error(q, qom_type="authz-listfile", id="a", filename=bad) == (
        "GenericError", "File '%s' must contain a JSON object" % bad)
    with open(bad, "w") as f:
        f.write('{"policy": "maybe"}')
    assert obj_error(q, qom_type="authz-listfile", id="a", filename=bad) == (
        "GenericError", "Parameter 'policy' does not accept value 'maybe'")


def test_authz_listfile_not_in_qsd(start_daemon, tmpdir_short):
    # documents why the listfile tests are bexd-only
    if not shutil.which("qemu-storage-daemon"):
        pytest.skip("no qsd")
    q = start_daemon("qsd").qmp()
    assert obj_error(q, qom_type="authz-listfile", id="a", filename="/x") == (
        "GenericError", "invalid object type: authz-listfile")


# -- PSK ------------------------------------------------------------------------

def test_psk_read(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [psk_server(creds)])
    read_ok(client(srv, psk=creds.psk_file("psk-alice")))


def test_psk_wrong_key_refused(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [psk_server(creds)])
    refused(srv, psk=creds.psk_file("psk-wrong"))
    refused(srv, psk=creds.psk_file("psk-alice"), user="mallory")


def test_psk_username_authz(start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, "bexd", tmpdir_short,
                    [psk_server(creds), "authz-simple,id=auth0,identity=alice"],
                    server_opts=",tls-creds=tls0,tls-authz=auth0")
    read_ok(client(srv, psk=creds.psk_file("psk-alice")))
    refused(srv, psk=creds.psk_file("psk"), user="bob")


# -- protocol level -----------------------------------------------------------

def test_plaintext_client_gets_tls_reqd(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [x509_server(creds)])
    c = Conn(srv.sock).start()
    for opt, data in [(OPT_LIST, b""), (OPT_STRUCTURED_REPLY, b""),
                      (OPT_INFO, info_data("disk0")), (OPT_GO, info_data("disk0"))]:
        c.opt(opt, data)
        assert c.opt_replies() == [(opt, REP_ERR_TLS_REQD,
                                    b"Option 0x%x not permitted before TLS" % opt)]
    c.opt(OPT_EXPORT_NAME, b"disk0")
    assert c.eof()
    # libnbd's view: the server requires TLS
    with pytest.raises(nbd.Error):
        client(srv, tls=nbd.TLS_DISABLE)


def test_plaintext_abort(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [x509_server(creds)])
    c = Conn(srv.sock).start()
    c.opt(OPT_ABORT)
    if impl == "qsd":
        # qsd 7.2 refuses ABORT too before TLS; the NBD spec (and bexd) ack it
        assert c.opt_reply() == (OPT_ABORT, REP_ERR_TLS_REQD,
                                 b"Option 0x2 not permitted before TLS")
    else:
        assert c.opt_reply() == (OPT_ABORT, REP_ACK, b"")
    assert c.eof()


def test_starttls_with_payload_is_fatal(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [x509_server(creds)])
    c = Conn(srv.sock).start()
    c.opt(OPT_STARTTLS, b"x")
    opt, rtype, _ = c.opt_reply()
    assert (opt, rtype) == (OPT_STARTTLS, REP_ERR_INVALID)
    assert c.eof()


def ssl_context(creds, certs=None):
    ctx = ssl.create_default_context(cafile=os.path.join(creds.server, "ca-cert.pem"))
    d = certs or creds.client
    ctx.load_cert_chain(os.path.join(d, "client-cert.pem"), os.path.join(d, "client-key.pem"))
    return ctx


def starttls(c, ctx):
    c.opt(OPT_STARTTLS)
    assert c.opt_reply() == (OPT_STARTTLS, REP_ACK, b"")
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
    return c


def test_raw_starttls_then_options(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [x509_server(creds)])
    c = starttls(Conn(srv.sock).start(), ssl_context(creds))
    c.opt(OPT_STARTTLS)
    assert c.opt_replies() == [(OPT_STARTTLS, REP_ERR_INVALID, b"TLS already enabled")]
    c.structured_reply()
    reps = c.go("disk0")
    assert reps[-1][1] == REP_ACK
    r = c.read(4096, 8192)
    assert r.err == 0 and r.assemble(4096, 8192) == pattern(SIZE)[4096:4096 + 8192]
    c.disc()
    c.close()


def test_tls_client_against_plain_server(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [], server_opts="")
    with pytest.raises(nbd.Error):
        client(srv, certs=creds.client)
    c = Conn(srv.sock).start()
    c.opt(OPT_STARTTLS)
    assert c.opt_replies() == [(OPT_STARTTLS, REP_ERR_POLICY, b"TLS not configured")]


def test_client_drops_mid_handshake(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [x509_server(creds)])
    # a client silent after STARTTLS must not hold up others
    idle = Conn(srv.sock).start()
    idle.opt(OPT_STARTTLS)
    assert idle.opt_reply() == (OPT_STARTTLS, REP_ACK, b"")
    read_ok(client(srv, certs=creds.client))
    # a partial ClientHello, then gone
    c = Conn(srv.sock).start()
    c.opt(OPT_STARTTLS)
    assert c.opt_reply() == (OPT_STARTTLS, REP_ACK, b"")
    c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    c.close()
    # garbage instead of a ClientHello
    c = Conn(srv.sock).start()
    c.opt(OPT_STARTTLS)
    assert c.opt_reply() == (OPT_STARTTLS, REP_ACK, b"")
    c.send(b"GET / HTTP/1.0\r\n\r\n" * 10)
    assert c.eof()
    idle.close()
    read_ok(client(srv, certs=creds.client))
    assert srv.daemon.alive()


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def wait_no_clients(q):
    """Until every export reports no client: a connection leaves the list
    only after its worker loop closed its fd (nbd_conn_finalize), so this,
    not a QMP round trip through the main loop, says they are all gone."""
    deadline = time.monotonic() + 60
    while any(e["clients"] for e in q.execute("__org.bexd_query-export-clients")):
        assert time.monotonic() < deadline, "clients never went away"


def test_many_handshakes_no_leak(start_daemon, creds, tmpdir_short):
    """Connections are spread over the worker loops, and a loop makes its
    I/O engine (io_uring and eventfd) at its first request: the baseline
    is taken once every loop has served one, and the counts are compared
    once every connection is gone from every loop (it was flaky under
    ASan when a slow teardown sent a later client to a loop not used yet,
    or when a worker loop had not yet closed the last socket)."""
    srv = start_tls(start_daemon, "bexd", tmpdir_short, [x509_server(creds)])
    ctx = ssl_context(creds)
    bad = ssl_context(creds, creds.rogue)

    def one(context):
        c = starttls(Conn(srv.sock).start(), context)
        try:
            c.go("disk0")
            c.read(0, 4096)
            c.disc()
        finally:
            c.close()

    # warm every worker loop: open at the same time, each goes to the
    # least used loop
    warm = []
    for _ in range((os.cpu_count() or 1) + 1):
        c = starttls(Conn(srv.sock).start(), ctx)
        c.go("disk0")
        c.read(0, 4096)
        warm.append(c)
    for c in warm:
        c.disc()
        c.close()
    q = srv.qmp()
    wait_no_clients(q)
    base = fd_count(srv.daemon.pid)
    for i in range(60):
        try:
            one(bad if i % 3 == 0 else ctx)
        except (Closed, ssl.SSLError, ConnectionError, AssertionError, struct.error):
            assert i % 3 == 0
    q.execute("query-version")   # refused handshakes ended in the main loop
    wait_no_clients(q)
    assert fd_count(srv.daemon.pid) <= base
    assert srv.daemon.alive()
