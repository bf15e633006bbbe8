"""TLS certificate rotation without a restart (bexd only: qsd has no reload
and exits on SIGHUP).

The server directory starts with a certificate from CA1 and is rotated to
one from CA2 (its ca-cert.pem lists both CAs, so client certificates from
CA1 still verify).  A client that trusts CA1 only can connect before the
reload and not after; one that trusts CA2 can after; a session opened
before the reload keeps working; a broken file keeps the old credentials.
"""
import os
import shutil
import signal

import nbd
import pytest

import needs
import tlscerts
from conftest import require_localhost
from nbdwire import free_tcp_port, pattern



@pytest.fixture(autouse=True)
def gnutls_tools():
    needs.tool("certtool", "gnutls-bin")
    needs.tool("psktool", "gnutls-bin")

SIZE = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("rot"))
    ca1 = tlscerts._ca(os.path.join(base, "ca1"), "CA one")
    ca2 = tlscerts._ca(os.path.join(base, "ca2"), "CA two")
    d = {}
    for name, ca in (("srv1", ca1), ("srv2", ca2)):
        tlscerts._leaf(os.path.join(base, name), "server", ca, tlscerts.SERVER_DN, server=True)
        d[name] = os.path.join(base, name)
    # clients: a certificate from CA1, trusting CA1 (old) or CA2 (new)
    for name, trust in (("old", ca1), ("new", ca2)):
        cdir = os.path.join(base, name)
        tlscerts._leaf(cdir, "client", ca1, tlscerts.CLIENT_DN, server=False)
        shutil.copy(trust[1], os.path.join(cdir, "ca-cert.pem"))
        d[name] = cdir
    d["bundle"] = open(ca1[1]).read() + open(ca2[1]).read()
    return d


def install(dst, src, bundle):
    for f in ("server-cert.pem", "server-key.pem"):
        shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    with open(os.path.join(dst, "ca-cert.pem"), "w") as f:
        f.write(bundle)


def connect(sock, certs):
    h = nbd.NBD()
    h.set_export_name("disk")
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(certs)
    require_localhost()
    h.connect_tcp("localhost", str(sock))   # TCP: libnbd checks the name and chain
    return h


def refused(sock, certs):
    with pytest.raises(nbd.Error):
        connect(sock, certs).pread(512, 0)


@pytest.fixture
def server(start_daemon, tmpdir_short, pki):
    sdir = os.path.join(tmpdir_short, "creds")
    os.mkdir(sdir)
    install(sdir, pki["srv1"], pki["bundle"])
    img = os.path.join(tmpdir_short, "disk.img")
    with open(img, "wb") as f:
        f.write(pattern(SIZE))
    sock = free_tcp_port()
    d = start_daemon("bexd", "--object", "tls-creds-x509,id=tls0,endpoint=server,dir=" + sdir,
                     "--blockdev", "driver=file,node-name=n0,filename=" + img,
                     "--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=%d,"
                                     "tls-creds=tls0" % sock,
                     "--export", "type=nbd,id=e0,node-name=n0,name=disk")
    return d, sdir, sock


def test_rotation_by_qmp(server, pki):
    d, sdir, sock = server
    q = d.qmp()
    before = connect(sock, pki["old"])
    assert before.pread(4096, 0) == pattern(SIZE)[:4096]
    refused(sock, pki["new"])                    # the server still shows CA1's certificate
    install(sdir, pki["srv2"], pki["bundle"])
    q.execute("__org.bexd_reload-tls-creds", id="tls0")
    refused(sock, pki["old"])
    after = connect(sock, pki["new"])
    assert after.pread(4096, 4096) == pattern(SIZE)[4096:8192]
    # the session from before the reload is untouched
    assert before.pread(4096, 8192) == pattern(SIZE)[8192:12288]
    # the clients command shows the TLS identity
    clients = q.execute("__org.bexd_query-export-clients")[0]["clients"]
    assert {c["tls-identity"] for c in clients} == {tlscerts.CLIENT_DN}
    assert all(c["tls"] for c in clients)
    before.shutdown()
    after.shutdown()


def test_bad_file_keeps_old_credentials(server, pki):
    d, sdir, sock = server
    q = d.qmp()
    with open(os.path.join(sdir, "server-cert.pem"), "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    e = q.error("__org.bexd_reload-tls-creds")
    assert e["class"] == "GenericError"
    assert "server-cert.pem" in e["desc"]
    h = connect(sock, pki["old"])                # still CA1's certificate
    assert h.pread(512, 0) == pattern(SIZE)[:512]
    h.shutdown()
    # SIGHUP reloads too: with good files again it switches
    install(sdir, pki["srv2"], pki["bundle"])
    os.kill(d.pid, signal.SIGHUP)
    # the signal is pending before the first command arrives, so the loop
    # iteration that reads that command reads the signal too: once a second
    # command is answered the reload is done
    q.execute("query-version")
    q.execute("query-version")
    refused(sock, pki["old"])
    h = connect(sock, pki["new"])
    assert h.pread(512, 0) == pattern(SIZE)[:512]
    h.shutdown()
    assert d.alive()


def test_reload_errors(server):
    d, sdir, sock = server
    q = d.qmp()
    e = q.error("__org.bexd_reload-tls-creds", id="nope")
    assert e["desc"] == "object 'nope' not found"
    q.execute("object-add", qom_type="iothread", id="io0")
    e = q.error("__org.bexd_reload-tls-creds", id="io0")
    assert e["desc"] == "object 'io0' (iothread) has nothing to reload"
