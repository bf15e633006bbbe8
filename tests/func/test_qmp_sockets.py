"""Listening sockets from SocketAddress / SocketAddressLegacy, through
nbd-server-start (QMP, legacy form) and --nbd-server (flat form), against
bexd and qsd: UNIX paths (stale file replaced, abstract), TCP (numeric and
port ranges), inherited descriptors, and qsd's error messages.
"""
import os
import re
import socket
import subprocess

import pytest

from conftest import IMPLS, adopting, run_daemon_expect_fail, stop_daemonized

PREFIX = re.compile(r"^(\S*/)?(bexd|qemu-storage-daemon): ")
NBD_MAGIC = b"NBDMAGIC"


def nbd_hello(family, addr):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(addr)
    data = b""
    while len(data) < 8:
        chunk = s.recv(8 - len(data))
        if not chunk:
            break
        data += chunk
    s.close()
    return data


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unix_replaces_stale_socket_file(impl, start_daemon, tmpdir_short):
    path = os.path.join(tmpdir_short, "nbd.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()                       # leaves the file behind
    d = start_daemon(impl)
    m = d.qmp()
    m.execute("nbd-server-start", addr={"type": "unix", "data": {"path": path}})
    assert nbd_hello(socket.AF_UNIX, path) == NBD_MAGIC


def test_unix_abstract(impl, start_daemon, tmpdir_short):
    name = "bexd-test-%d-%s" % (os.getpid(), impl)
    d = start_daemon(impl)
    m = d.qmp()
    m.execute("nbd-server-start", addr={"type": "unix", "data": {"path": name, "abstract": True}})
    assert nbd_hello(socket.AF_UNIX, "\0" + name) == NBD_MAGIC
    assert not os.path.exists(name)


def test_inet_numeric_and_range(impl, start_daemon):
    port = free_port()
    d = start_daemon(impl, "--nbd-server",
                     "addr.type=inet,addr.host=127.0.0.1,addr.port=%d,addr.numeric=on,addr.to=%d"
                     % (port, port + 5))
    assert nbd_hello(socket.AF_INET, ("127.0.0.1", port)) == NBD_MAGIC


def test_inet_port_in_use(impl):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    arg = "addr.type=inet,addr.host=127.0.0.1,addr.port=%d" % port
    rc, err = run_daemon_expect_fail(impl, ["--nbd-server", arg])
    s.close()
    assert rc == 1
    assert PREFIX.sub("", err.strip()) == \
        "--nbd-server %s: Failed to find an available port: Address already in use" % arg


@pytest.mark.parametrize("arg,msg", [
    ("addr.type=inet,addr.host=127.0.0.1,addr.port=1,addr.ipv4=off,addr.ipv6=off",
     "Cannot disable IPv4 and IPv6 at same time"),
    ("addr.type=inet,addr.host=127.0.0.1,addr.port=1,addr.ipv4=off",
     "address resolution failed for 127.0.0.1:1: Address family for hostname not supported"),
    ("addr.type=vsock,addr.cid=x,addr.port=1", "Failed to parse cid 'x'"),
])
def test_address_errors(impl, arg, msg):
    rc, err = run_daemon_expect_fail(impl, ["--nbd-server", arg])
    assert rc == 1
    assert PREFIX.sub("", err.strip()) == "--nbd-server %s: %s" % (arg, msg)


def test_qmp_address_errors(impl, start_daemon, tmpdir_short):
    d = start_daemon(impl)
    m = d.qmp()
    e = m.error("nbd-server-start", addr={"type": "unix", "data": {
        "path": os.path.join(tmpdir_short, "no", "such", "dir")}})
    assert e["class"] == "GenericError"
    assert e["desc"] == "Failed to bind socket to %s: No such file or directory" % \
        os.path.join(tmpdir_short, "no", "such", "dir")
    # qsd refuses descriptors over QMP, numeric or named
    for fd in ("x", "0"):
        e = m.error("nbd-server-start", addr={"type": "fd", "data": {"str": fd}})
        assert e["desc"] == "only QEMU supports file descriptor passing"


def test_inherited_fd(impl, tmpdir_short):
    path = os.path.join(tmpdir_short, "fd.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    fd = lsock.fileno()
    pidfile = os.path.join(tmpdir_short, "pid")
    with adopting():
        r = subprocess.run([IMPLS[impl], "--nbd-server", "addr.type=fd,addr.str=%d" % fd,
                            "--daemonize", "--pidfile", pidfile],
                           pass_fds=[fd], stderr=subprocess.PIPE, timeout=60)
    lsock.close()
    assert r.returncode == 0, r.stderr
    with open(pidfile) as f:
        pid = int(f.read())
    try:
        assert nbd_hello(socket.AF_UNIX, path) == NBD_MAGIC
    finally:
        stop_daemonized(impl, pid)
