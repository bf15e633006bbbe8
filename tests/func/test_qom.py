"""QOM: qom-list, qom-get, qom-set, qom-list-types, qom-list-properties.

The same objects in bexd and qemu-storage-daemon give the same tree
("/objects/ID", "/chardevs/ID"), the same property names, types, values and
errors, and qom-set changes what QEMU changes at once: iothread polling,
authz identities and rules, TLS verify-peer and priority.  Children of a
container (and the type list) come in QEMU's hash order there, so only
those lists are compared as sets.

Differences on purpose, tested on bexd only: qsd 7.2 cannot create
authz-listfile (QOM "authz-list-file") and has no authz-pam; bexd lists
only the types it has (no qio-channel-*, no other chardev backends).
"""
import json
import os

import pytest

import tlscerts
from conftest import QSD
from test_tls import client, creds, read_ok, refused, start_tls, x509_server  # noqa: F401

ACL = {"policy": "deny", "rules": [{"match": "bob", "policy": "allow"}]}


def objects_args(tmp, certs):
    acl = os.path.join(tmp, "acl.json")
    with open(acl, "w") as f:
        json.dump(ACL, f)
    return ["--object", "iothread,id=io0",
            "--object", "secret,id=s0,data=abc",
            "--object", "secret,id=s1,file=%s,format=raw" % acl,
            "--object", "authz-simple,id=a0,identity=bob",
            "--object", "authz-list,id=al,policy=allow",
            "--object", "tls-creds-x509,id=tx,dir=%s,endpoint=server" % certs.server,
            "--object", "tls-creds-anon,id=tan,endpoint=server",
            "--object", "tls-creds-psk,id=tp,dir=%s,endpoint=server" % certs.psk]


@pytest.fixture
def qom(impl, start_daemon, tmpdir_short, creds):
    d = start_daemon(impl, *objects_args(tmpdir_short, creds))
    q = d.qmp()
    q.tmp = tmpdir_short
    return q


def err(q, cmd, **args):
    e = q.error(cmd, **args)
    return e["class"], e["desc"]


def split(props):
    """qom-list -> (own properties in order, children as a sorted list)."""
    own = [p for p in props if not p["type"].startswith("child<")]
    kids = sorted((p["name"], p["type"]) for p in props if p["type"].startswith("child<"))
    return own, kids


def walk(q, path):
    own, kids = split(q.execute("qom-list", path=path))
    out = {"own": [(p["name"], p["type"], q.execute("qom-get", path=path, property=p["name"]))
                   for p in own]}
    for name, t in kids:
        child = path.rstrip("/") + "/" + name
        assert q.execute("qom-get", path=path, property=name) == child
        out[name] = (t, walk(q, child))
    return out


# ---- the tree ----------------------------------------------------------------------

def test_tree(qom):
    own, kids = split(qom.execute("qom-list", path="/"))
    assert own == [{"name": "type", "type": "string"}]
    assert kids == [("chardevs", "child<container>"), ("objects", "child<container>")]
    _, objs = split(qom.execute("qom-list", path="/objects"))
    assert objs == sorted([("io0", "child<iothread>"), ("s0", "child<secret>"),
                           ("s1", "child<secret>"), ("a0", "child<authz-simple>"),
                           ("al", "child<authz-list>"), ("tx", "child<tls-creds-x509>"),
                           ("tan", "child<tls-creds-anon>"), ("tp", "child<tls-creds-psk>")])
    _, chr_ = split(qom.execute("qom-list", path="/chardevs"))
    assert chr_ == [("qmp0", "child<chardev-socket>")]
    io0 = walk(qom, "/objects/io0")
    assert io0["own"] == [("type", "string", "iothread"), ("thread-pool-min", "int", 0),
                          ("aio-max-batch", "int", 0), ("thread-pool-max", "int", 64),
                          ("poll-max-ns", "int", 32768), ("poll-grow", "int", 0),
                          ("poll-shrink", "int", 0)]
    s1 = walk(qom, "/objects/s1")["own"]
    assert s1 == [("type", "string", "secret"), ("iv", "string", ""), ("keyid", "string", ""),
                  ("loaded", "bool", True), ("format", "QCryptoSecretFormat", "raw"),
                  ("file", "string", os.path.join(qom.tmp, "acl.json")), ("data", "string", "")]
    tx = walk(qom, "/objects/tx")["own"]
    assert [x[0] for x in tx] == ["type", "endpoint", "dir", "verify-peer", "priority",
                                  "sanity-check", "passwordid", "loaded"]
    assert tx[1][2] == "server" and tx[3][2] is True and tx[4][2] == ""
    m = walk(qom, "/chardevs/qmp0")["own"]
    assert m[:2] == [("type", "string", "chardev-socket"), ("connected", "bool", True)]
    assert m[2][:2] == ("addr", "SocketAddress")
    assert m[2][2]["type"] == "unix" and m[2][2]["path"].endswith(".sock")


@pytest.mark.skipif(not QSD, reason="qemu-storage-daemon not installed")
def test_tree_same_as_qsd(start_daemon, tmpdir_short, creds):
    trees = {}
    for impl in ("bexd", "qsd"):
        d = start_daemon(impl, *objects_args(tmpdir_short, creds))
        q = d.qmp()
        trees[impl] = json.loads(json.dumps(walk(q, "/")).replace(d.qmp_path, "@QMP@"))
        d.stop()
    assert trees["bexd"] == trees["qsd"]


# ---- paths -------------------------------------------------------------------------

NOT_FOUND = "DeviceNotFound"


def test_paths(qom):
    io0 = qom.execute("qom-list", path="/objects/io0")
    for p in ["/objects/io0/", "//objects//io0", "objects/io0", "io0", "io0/"]:
        assert qom.execute("qom-list", path=p) == io0, p
    assert qom.execute("qom-get", path="io0", property="type") == "iothread"
    assert qom.execute("qom-get", path="/", property="objects") == "/objects"
    assert qom.execute("qom-get", path="objects", property="io0") == "/objects/io0"
    for p in ["/objects/io0/type", "/objects/../objects", "type", "/nope", "nope", "/objects/nope"]:
        assert err(qom, "qom-list", path=p) == (NOT_FOUND, "Device '%s' not found" % p)
        assert err(qom, "qom-get", path=p, property="type") == (NOT_FOUND, "Device '%s' not found" % p)
    # "" matches every object: ambiguous for qom-list, not found for qom-get
    assert err(qom, "qom-list", path="") == ("GenericError", "Path '' is ambiguous")
    assert err(qom, "qom-get", path="", property="type") == (NOT_FOUND, "Device '' not found")
    assert err(qom, "qom-set", path="", property="type", value=1) == (NOT_FOUND, "Device '' not found")


def test_ambiguous_partial_path(impl, start_daemon, tmpdir_short):
    sock = os.path.join(tmpdir_short, "dup.sock")
    d = start_daemon(impl, "--object", "iothread,id=dup",
                     "--chardev", "socket,id=dup,path=%s,server=on,wait=off" % sock)
    q = d.qmp()
    assert err(q, "qom-list", path="dup") == ("GenericError", "Path 'dup' is ambiguous")
    assert err(q, "qom-get", path="dup", property="type") == (NOT_FOUND, "Device 'dup' not found")
    assert q.execute("qom-get", path="objects/dup", property="type") == "iothread"
    assert q.execute("qom-get", path="chardevs/dup", property="type") == "chardev-socket"
    assert q.execute("qom-get", path="chardevs/dup", property="connected") is False


# ---- get and set -------------------------------------------------------------------

def test_get_errors(qom):
    assert err(qom, "qom-get", path="/objects/io0", property="nope") == \
        ("GenericError", "Property 'iothread.nope' not found")
    assert err(qom, "qom-get", path="/objects", property="nope") == \
        ("GenericError", "Property 'container.nope' not found")
    assert err(qom, "qom-get", path="/objects/io0") == \
        ("GenericError", "Parameter 'property' is missing")
    assert err(qom, "qom-get", path=1, property="type") == \
        ("GenericError", "Invalid parameter type for 'path', expected: string")
    assert err(qom, "qom-get", path="io0", property="type", x=1) == \
        ("GenericError", "Parameter 'x' is unexpected")


SET_ERRORS = [
    ("/objects/io0", "type", "x", "Property 'iothread.type' is not writable"),
    ("/objects", "io0", "x", "Property 'container.io0' is not writable"),
    ("/objects", "nope", "x", "Property 'container.nope' not found"),
    ("/", "type", "x", "Property 'container.type' is not writable"),
    ("/objects/io0", "nope", 1, "Property 'iothread.nope' not found"),
    ("/objects/io0", "poll-max-ns", "x", "Invalid parameter type for 'poll-max-ns', expected: integer"),
    ("/objects/io0", "poll-max-ns", 1.5, "Invalid parameter type for 'poll-max-ns', expected: integer"),
    ("/objects/io0", "poll-max-ns", True, "Invalid parameter type for 'poll-max-ns', expected: integer"),
    ("/objects/io0", "poll-max-ns", None, "Invalid parameter type for 'poll-max-ns', expected: integer"),
    ("/objects/io0", "poll-max-ns", 18446744073709551615,
     "Invalid parameter type for 'poll-max-ns', expected: integer"),
    ("/objects/io0", "poll-max-ns", -5, "poll-max-ns value must be in range [0, 9223372036854775807]"),
    ("/objects/io0", "thread-pool-min", -1,
     "thread-pool-min value must be in range [0, 9223372036854775807]"),
    ("/objects/io0", "thread-pool-max", 0, "bad thread-pool-min/thread-pool-max values"),
    ("/objects/io0", "thread-pool-min", 65, "bad thread-pool-min/thread-pool-max values"),
    ("/objects/s0", "loaded", False, "Property 'secret.loaded' is not writable"),
    ("/objects/s0", "format", "bogus", "Parameter 'format' does not accept value 'bogus'"),
    ("/objects/s0", "format", 3, "Invalid parameter type for 'format', expected: string"),
    ("/objects/tx", "endpoint", "both", "Parameter 'endpoint' does not accept value 'both'"),
    ("/objects/tx", "verify-peer", 1, "Invalid parameter type for 'verify-peer', expected: boolean"),
    ("/objects/tx", "loaded", True, "Property 'tls-creds-x509.loaded' is not writable"),
    ("/objects/tan", "loaded", True, "Property 'tls-creds-anon.loaded' is not writable"),
    ("/objects/al", "policy", "x", "Parameter 'policy' does not accept value 'x'"),
    ("/objects/al", "rules", {"match": "a"}, "Invalid parameter type for 'rules', expected: array"),
    ("/objects/al", "rules", [{"match": "a"}], "Parameter 'rules[0].policy' is missing"),
    ("/objects/al", "rules", [{"match": "a", "policy": "allow", "x": 1}],
     "Parameter 'rules[0].x' is unexpected"),
    ("/objects/a0", "identity", 5, "Invalid parameter type for 'identity', expected: string"),
    ("/chardevs/qmp0", "connected", False, "Property 'chardev-socket.connected' is not writable"),
    ("/chardevs/qmp0", "addr", {}, "Property 'chardev-socket.addr' is not writable"),
]


def test_set_errors(impl, qom):
    for path, prop, value, msg in SET_ERRORS:
        assert err(qom, "qom-set", path=path, property=prop, value=value) == \
            ("GenericError", msg), (path, prop, value)
    assert err(qom, "qom-set", path="/nope", property="x", value=1) == \
        (NOT_FOUND, "Device '/nope' not found")
    assert err(qom, "qom-set", path="io0", property="poll-max-ns") == \
        ("GenericError", "Parameter 'value' is missing")
    # nothing changed (qsd 7.2 keeps a refused thread-pool value although it
    # says it is bad; bexd keeps the last good one)
    assert qom.execute("qom-get", path="io0", property="poll-max-ns") == 32768
    if impl == "bexd":
        assert qom.execute("qom-get", path="io0", property="thread-pool-min") == 0
        assert qom.execute("qom-get", path="io0", property="thread-pool-max") == 64
    assert qom.execute("qom-get", path="s0", property="format") == "raw"


SETS = [
    ("/objects/io0", "poll-max-ns", 9223372036854775807),
    ("/objects/io0", "poll-max-ns", 1000),
    ("/objects/io0", "poll-grow", 5),
    ("/objects/io0", "poll-shrink", 3),
    ("/objects/io0", "aio-max-batch", 7),
    ("/objects/io0", "thread-pool-min", 2),
    ("/objects/io0", "thread-pool-max", 8),
    ("/objects/s0", "data", "new"),
    ("/objects/s0", "format", "base64"),
    ("/objects/s0", "file", "/x"),
    ("/objects/s0", "iv", "x"),
    ("/objects/s0", "keyid", "k"),
    ("/objects/tx", "dir", "/x"),
    ("/objects/tx", "sanity-check", False),
    ("/objects/tx", "passwordid", "s0"),
    ("/objects/tp", "username", "u"),
    ("/objects/tan", "endpoint", "client"),
    ("/objects/al", "policy", "deny"),
    ("/objects/al", "rules", [{"match": "a", "policy": "allow"}]),
    ("/objects/al", "rules", [{"match": "a", "policy": "allow", "format": "glob"}]),
    ("/objects/a0", "identity", "carol"),
]


def test_set_then_get(qom):
    for path, prop, value in SETS:
        assert qom.execute("qom-set", path=path, property=prop, value=value) == {}
        assert qom.execute("qom-get", path=path, property=prop) == value, (path, prop)


# ---- types and their properties ------------------------------------------------------

def types(q, **args):
    return sorted((t["name"], t.get("parent"), t.get("abstract", False))
                  for t in q.execute("qom-list-types", **args))


BEXD_TYPES = {
    ("authz", "object", True), ("authz-list", "authz", False),
    ("authz-list-file", "authz", False), ("authz-simple", "authz", False),
    ("chardev", "object", True), ("chardev-fd", "chardev", True),
    ("chardev-socket", "chardev", False), ("chardev-stdio", "chardev-fd", False),
    ("chardev-ringbuf", "chardev", False), ("chardev-memory", "chardev-ringbuf", False),
    ("container", "object", False), ("event-loop-base", "object", True),
    ("interface", None, True), ("iothread", "event-loop-base", False),
    ("main-loop", "event-loop-base", False),
    ("object", None, True), ("secret", "secret_common", False),
    ("secret_common", "object", True), ("tls-creds", "object", True),
    ("tls-creds-anon", "tls-creds", False), ("tls-creds-psk", "tls-creds", False),
    ("tls-creds-x509", "tls-creds", False), ("user-creatable", "interface", True),
    ("throttle-group", "object", False),
}
BEXD_ONLY = {("authz-pam", "authz", False)}


def test_list_types(impl, qom):
    every = set(types(qom, abstract=True))
    if impl == "bexd":
        assert every - BEXD_ONLY == BEXD_TYPES
    else:
        assert BEXD_TYPES <= every          # qsd has more (qio-channel-*, ...)

    def only_ours(lst):
        return sorted(t for t in lst if t in BEXD_TYPES)
    assert only_ours(types(qom)) == sorted(t for t in BEXD_TYPES if not t[2])
    assert only_ours(types(qom, implements="authz")) == [
        ("authz-list", "authz", False), ("authz-list-file", "authz", False),
        ("authz-simple", "authz", False)]
    assert only_ours(types(qom, implements="authz", abstract=True))[0] == ("authz", "object", True)
    assert types(qom, implements="iothread", abstract=True) == [("iothread", "event-loop-base", False)]
    assert only_ours(types(qom, implements="user-creatable")) == sorted([
        ("authz-list", "authz", False), ("authz-list-file", "authz", False),
        ("authz-simple", "authz", False), ("iothread", "event-loop-base", False),
        ("main-loop", "event-loop-base", False),
        ("secret", "secret_common", False), ("throttle-group", "object", False),
        ("tls-creds-anon", "tls-creds", False), ("tls-creds-psk", "tls-creds", False),
        ("tls-creds-x509", "tls-creds", False)])
    ui = only_ours(types(qom, implements="interface", abstract=True))
    assert ("user-creatable", "interface", True) in ui and ("interface", None, True) in ui
    assert ("event-loop-base", "object", True) in ui and ("secret_common", "object", True) in ui
    assert ("authz", "object", True) not in ui and ("tls-creds", "object", True) not in ui
    assert types(qom, implements="nope") == []
    assert err(qom, "qom-list-types", abstract="x") == \
        ("GenericError", "Invalid parameter type for 'abstract', expected: boolean")


PROPS = {
    "object": ["type/string"],
    "container": ["type/string"],
    "authz": ["type/string"],
    "chardev": ["type/string"],
    "chardev-stdio": ["type/string"],
    "chardev-ringbuf": ["type/string"],
    "chardev-memory": ["type/string"],
    "event-loop-base": ["type/string", "thread-pool-min/int", "aio-max-batch/int",
                        "thread-pool-max/int"],
    "iothread": ["type/string", "thread-pool-min/int", "aio-max-batch/int",
                 "thread-pool-max/int", "poll-max-ns/int", "poll-grow/int", "poll-shrink/int"],
    "secret_common": ["type/string", "iv/string", "keyid/string", "loaded/bool",
                      "format/QCryptoSecretFormat"],
    "secret": ["type/string", "iv/string", "keyid/string", "loaded/bool",
               "format/QCryptoSecretFormat", "file/string", "data/string"],
    "authz-simple": ["type/string", "identity/string"],
    "authz-list": ["type/string", "policy/QAuthZListPolicy", "rules/QAuthZListRule"],
    "authz-list-file": ["type/string", "filename/string", "refresh/bool"],
    "tls-creds": ["type/string", "endpoint/QCryptoTLSCredsEndpoint", "dir/string",
                  "verify-peer/bool", "priority/string"],
    "tls-creds-anon": ["type/string", "endpoint/QCryptoTLSCredsEndpoint", "dir/string",
                       "verify-peer/bool", "priority/string", "loaded/bool"],
    "tls-creds-psk": ["type/string", "endpoint/QCryptoTLSCredsEndpoint", "dir/string",
                      "verify-peer/bool", "priority/string", "username/string", "loaded/bool"],
    "tls-creds-x509": ["type/string", "endpoint/QCryptoTLSCredsEndpoint", "dir/string",
                       "verify-peer/bool", "priority/string", "sanity-check/bool",
                       "passwordid/string", "loaded/bool"],
    "chardev-socket": ["type/string", "connected/bool", "addr/SocketAddress"],
}


def test_list_properties(qom):
    for t, want in PROPS.items():
        got = ["%s/%s" % (p["name"], p["type"]) for p in qom.execute("qom-list-properties", typename=t)]
        assert got == want, t
    for t in ("user-creatable", "interface"):
        assert err(qom, "qom-list-properties", typename=t) == \
            ("GenericError", "Parameter 'typename' expects a QOM type")
    assert err(qom, "qom-list-properties", typename="nope") == (NOT_FOUND, "Class 'nope' not found")
    assert err(qom, "qom-list-properties") == ("GenericError", "Parameter 'typename' is missing")


def test_bexd_only_types(start_daemon, tmpdir_short):
    acl = os.path.join(tmpdir_short, "acl.json")
    with open(acl, "w") as f:
        json.dump(ACL, f)
    d = start_daemon("bexd", "--object", "authz-listfile,id=lf,filename=%s,refresh=off" % acl)
    q = d.qmp()
    assert q.execute("qom-get", path="/objects", property="lf") == "/objects/lf"
    assert walk(q, "/objects/lf")["own"] == [("type", "string", "authz-list-file"),
                                             ("filename", "string", acl),
                                             ("refresh", "bool", False)]
    if any(t["name"] == "authz-pam" for t in q.execute("qom-list-types")):
        q.execute("object-add", qom_type="authz-pam", id="pam", service="login")
        assert walk(q, "/objects/pam")["own"] == [("type", "string", "authz-pam"),
                                                  ("service", "string", "login")]
        q.execute("qom-set", path="pam", property="service", value="other")
        assert q.execute("qom-get", path="pam", property="service") == "other"


def test_object_del_removes_child(qom):
    qom.execute("object-del", id="s0")
    assert "s0" not in [p["name"] for p in qom.execute("qom-list", path="/objects")]
    assert err(qom, "qom-get", path="/objects/s0", property="data") == \
        (NOT_FOUND, "Device '/objects/s0' not found")


# ---- what a qom-set changes ----------------------------------------------------------

def test_iothread_poll_live(start_daemon, tmpdir_short):
    # query-iothreads is bexd's (qsd 7.2 has none): the new value is the one in use
    img = os.path.join(tmpdir_short, "disk.img")
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    sock = os.path.join(tmpdir_short, "nbd.sock")
    d = start_daemon("bexd", "--object", "iothread,id=io0",
                     "--blockdev", "driver=file,node-name=disk0,filename=" + img,
                     "--nbd-server", "addr.type=unix,addr.path=" + sock,
                     "--export", "type=nbd,id=e0,node-name=disk0,iothread=io0,writable=on")
    q = d.qmp()
    for ns in (0, 123456, 32768):
        q.execute("qom-set", path="/objects/io0", property="poll-max-ns", value=ns)
        info = q.execute("query-iothreads")[0]
        assert info["poll-max-ns"] == ns
        import nbd
        h = nbd.NBD()
        h.connect_uri("nbd+unix:///disk0?socket=" + sock)
        assert h.pread(4096, 0) == bytes(4096)
        h.shutdown()
    # poll-grow / poll-shrink steer the loop's window as QEMU's; a 1 MiB
    # WRITE (its payload arrives in pieces, which the loop sleeps for
    # instead of polling) and a read of it back, with them in use
    q.execute("qom-set", path="io0", property="poll-grow", value=3)
    q.execute("qom-set", path="io0", property="poll-shrink", value=4)
    info = q.execute("query-iothreads")[0]
    assert (info["poll-grow"], info["poll-shrink"]) == (3, 4)
    import nbd
    data = os.urandom(1 << 20)
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///disk0?socket=" + sock)
    h.pwrite(data, 0)
    assert h.pread(1 << 20, 0) == data
    h.shutdown()


def test_authz_simple_identity_live(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short,
                    [x509_server(creds), "authz-simple,id=auth0,identity=O=x,,CN=nobody"],
                    server_opts=",tls-creds=tls0,tls-authz=auth0")
    q = srv.qmp()
    refused(srv, certs=creds.client)
    q.execute("qom-set", path="/objects/auth0", property="identity", value=tlscerts.CLIENT_DN)
    read_ok(client(srv, certs=creds.client))
    q.execute("qom-set", path="auth0", property="identity", value="O=x,CN=nobody")
    refused(srv, certs=creds.client)


def test_authz_list_live(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short,
                    [x509_server(creds), "authz-list,id=auth0,policy=deny"],
                    server_opts=",tls-creds=tls0,tls-authz=auth0")
    q = srv.qmp()
    refused(srv, certs=creds.client)
    q.execute("qom-set", path="auth0", property="policy", value="allow")
    read_ok(client(srv, certs=creds.client))
    q.execute("qom-set", path="auth0", property="rules",
              value=[{"match": "O=bexd test,CN=*", "policy": "deny", "format": "glob"}])
    refused(srv, certs=creds.client)
    q.execute("qom-set", path="auth0", property="rules", value=[])
    read_ok(client(srv, certs=creds.client))


def test_tls_verify_peer_and_priority_live(impl, start_daemon, creds, tmpdir_short):
    srv = start_tls(start_daemon, impl, tmpdir_short, [x509_server(creds)])
    q = srv.qmp()
    kept = client(srv, certs=creds.client)          # a session made before the changes
    refused(srv, certs=creds.rogue)                 # a client the CA did not sign
    q.execute("qom-set", path="tls0", property="verify-peer", value=False)
    read_ok(client(srv, certs=creds.rogue))
    q.execute("qom-set", path="tls0", property="verify-peer", value=True)
    refused(srv, certs=creds.rogue)
    q.execute("qom-set", path="tls0", property="priority", value="NONE")   # no cipher at all
    refused(srv, certs=creds.client)
    read_ok(kept)
    q.execute("qom-set", path="tls0", property="priority", value="NORMAL:-VERS-TLS1.3")
    h = client(srv, certs=creds.client)
    read_ok(h)
    read_ok(kept)
    kept.shutdown()
    h.shutdown()
