"""bexctl, the QMP command-line client, against bexd and qsd.

Output (indented JSON, or one line with --json), keyval and JSON
arguments, error reporting (exit 1, "Class: message" on stderr),
connection and usage errors (exit 2), and following events.
"""
import json
import os
import signal
import subprocess

import pytest

import needs
from conftest import BEXCTL, tool_text


@pytest.fixture(autouse=True)
def bexctl_built():
    needs.built(BEXCTL, "bexctl")


def ctl(sock, *args):
    r = subprocess.run([BEXCTL, "-s", sock] + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30)
    return r.returncode, tool_text(r.stdout), tool_text(r.stderr)


def test_query_pretty_and_one_line(impl, start_daemon):
    d = start_daemon(impl)
    rc, out, err = ctl(d.qmp_path, "query-version")
    assert rc == 0 and err == ""
    v = json.loads(out)
    assert sorted(v) == ["package", "qemu"]
    assert out.count("\n") > 3                  # indented
    rc, out, err = ctl(d.qmp_path, "--json", "query-version")
    assert rc == 0 and out.count("\n") == 1
    assert json.loads(out) == v


def test_pretty_monitor(impl, start_daemon, tmpdir_short):
    """Replies that span lines (pretty=on) are read whole."""
    path = os.path.join(tmpdir_short, "p.sock")
    start_daemon(impl, "--chardev", "socket,id=p,path=%s,server=on,wait=off" % path,
                 "--monitor", "p,pretty=on")
    rc, out, err = ctl(path, "--json", "query-version")
    assert rc == 0 and err == ""
    assert sorted(json.loads(out)) == ["package", "qemu"]
    assert ctl(path, "no-such") == \
        (1, "", "CommandNotFound: The command no-such has not been found\n")


def test_tcp_monitor(impl, start_daemon):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    start_daemon(impl, "--chardev", "socket,id=t,host=127.0.0.1,port=%d,server=on,wait=off" % port,
                 "--monitor", "t")
    rc, out, err = ctl("127.0.0.1:%d" % port, "--json", "query-block-exports")
    assert (rc, out, err) == (0, "[]\n", "")


def test_keyval_arguments(impl, start_daemon, tmpdir_short):
    d = start_daemon(impl)
    s = d.qmp_path
    assert ctl(s, "blockdev-add", "driver=null-co", "node-name=n0", "size=65536",
               "read-zeroes=true") == (0, "{}\n", "")
    nbd = os.path.join(tmpdir_short, "nbd.sock")
    # dotted keys nest
    assert ctl(s, "nbd-server-start", "addr.type=unix", "addr.data.path=" + nbd)[0] == 0
    # key:=JSON gives a raw value
    assert ctl(s, "block-export-add", "type=nbd", "id=e0", "node-name=n0",
               "writable:=false", 'name:="disk"')[0] == 0
    rc, out, _ = ctl(s, "--json", "query-block-exports")
    assert rc == 0
    assert json.loads(out) == [{"id": "e0", "type": "nbd", "node-name": "n0",
                                "shutting-down": False}]
    rc, out, _ = ctl(s, "--json", "query-named-block-nodes")
    node = [n for n in json.loads(out) if n["node-name"] == "n0"][0]
    assert node["image"]["virtual-size"] == 65536


def test_json_arguments(impl, start_daemon):
    d = start_daemon(impl)
    rc, out, err = ctl(d.qmp_path, "blockdev-add",
                       json.dumps({"driver": "null-co", "node-name": "j0"}))
    assert (rc, out, err) == (0, "{}\n", "")
    rc, out, _ = ctl(d.qmp_path, "--json", "query-named-block-nodes", '{"flat": true}')
    assert any(n["node-name"] == "j0" for n in json.loads(out))


def test_list_arguments(impl, start_daemon):
    """Numeric key parts make a JSON list: the checker's path shows [0]."""
    d = start_daemon(impl)
    assert ctl(d.qmp_path, "object-add", "qom-type=authz-list", "id=a0",
               "rules.0.policy=allow") == \
        (1, "", "GenericError: Parameter 'rules[0].match' is missing\n")
    assert ctl(d.qmp_path, "object-add", "qom-type=authz-list", "id=a0",
               "rules.0.match=x", "rules.0.policy=maybe") == \
        (1, "", "GenericError: Parameter 'policy' does not accept value 'maybe'\n")


def test_qmp_errors(impl, start_daemon):
    d = start_daemon(impl)
    assert ctl(d.qmp_path, "blockdev-add", "driver=file", "node-name=x") == \
        (1, "", "GenericError: Parameter 'filename' is missing\n")
    assert ctl(d.qmp_path, "no-such") == \
        (1, "", "CommandNotFound: The command no-such has not been found\n")
    assert ctl(d.qmp_path, "blockdev-add", "driver=null-co", "read-only=1") == \
        (1, "", "GenericError: Invalid parameter type for 'read-only', expected: boolean\n")


def test_connection_and_usage_errors(tmpdir_short):
    rc, out, err = ctl(os.path.join(tmpdir_short, "nothing.sock"), "query-version")
    assert rc == 2 and out == "" and "cannot connect" in err
    r = subprocess.run([BEXCTL], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert r.returncode == 2 and b"Usage:" in r.stderr
    r = subprocess.run([BEXCTL, "-h"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert r.returncode == 0 and b"Usage:" in r.stdout
    r = subprocess.run([BEXCTL, "-s", "/x", "cmd", "novalue"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    assert r.returncode == 2 and b"expected key=value" in r.stderr


@pytest.mark.parametrize("form", [["events"], ["--events"]])
def test_events(impl, start_daemon, tmpdir_short, form):
    # a socket monitor serves one client at a time: bexctl gets its own
    ev_sock = os.path.join(tmpdir_short, "ev.sock")
    d = start_daemon(impl, "--blockdev", "driver=null-co,node-name=n0",
                     "--chardev", "socket,id=ev,path=%s,server=on,wait=off" % ev_sock,
                     "--monitor", "ev")
    p = subprocess.Popen([BEXCTL, "-s", ev_sock, "--json"] + form,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # bexctl says so once it has negotiated: from then on it gets events
        assert p.stderr.readline().startswith(b"Waiting for events")
        m = d.qmp()
        m.execute("nbd-server-start",
                  addr={"type": "unix", "data": {"path": os.path.join(tmpdir_short, "n.sock")}})
        m.execute("block-export-add", type="nbd", id="e0", node_name="n0")
        m.execute("block-export-del", id="e0")
        ev = json.loads(p.stdout.readline())
        assert ev["event"] == "BLOCK_EXPORT_DELETED" and ev["data"] == {"id": "e0"}
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 0
