"""Reliability: what a hostile or careless peer must not be able to do to
bexd (issue 13).  Each test is the regression test of one defect or the
check of one limit; most are bexd-only because qemu-storage-daemon has the
defect (a note says so where it matters).
"""
import os
import socket
import subprocess
import time

import pytest

from conftest import QMP

MiB = 1 << 20


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def unix_connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def test_out_of_fds_listeners_back_off_and_qmp_still_gets_in(start_daemon, image, tmpdir_short):
    """Regression (issue 13, 4): with the fd table full, the QMP and
    vhost-user listeners retried accept() at once forever (100% CPU, the
    vhost-user one logging ~10 MB/s).  Now every listener pauses and
    retries later, and the monitor takes a reserved fd so management
    still gets in."""
    img = image(4 * MiB)
    nbd = os.path.join(tmpdir_short, "nbd.sock")
    vub = os.path.join(tmpdir_short, "vub.sock")
    d = start_daemon("bexd",
                     "--blockdev", "driver=file,node-name=disk,filename=%s" % img,
                     "--nbd-server", "addr.type=unix,addr.path=%s,handshake-max-seconds=0" % nbd,
                     "--export", "type=nbd,id=e0,node-name=disk,name=disk",
                     "--export", "type=vhost-user-blk,id=v0,node-name=disk,"
                                 "addr.type=unix,addr.path=%s" % vub)
    subprocess.run(["prlimit", "--pid", str(d.pid),
                    "--nofile=%d:%d" % (open_fds(d.pid) + 2, open_fds(d.pid) + 2)], check=True)
    clients = [unix_connect(nbd) for _ in range(6)]     # two get fds, the rest wait
    clients.append(unix_connect(vub))                   # EMFILE on the vhost-user listener
    t0 = cpu_seconds(d.pid)
    time.sleep(1.0)                                     # measuring, not synchronising
    assert cpu_seconds(d.pid) - t0 < 0.3, "the daemon spins on accept()"
    m = QMP(d.qmp_path, timeout=20)                     # EMFILE too: served from the reserve
    assert "qemu" in m.execute("query-version")
    exports = {e["id"] for e in m.execute("query-block-exports")}
    assert exports == {"e0", "v0"}
    t0 = cpu_seconds(d.pid)
    time.sleep(1.0)
    assert cpu_seconds(d.pid) - t0 < 0.3, "the daemon spins on accept()"
    m.close()
    for c in clients:
        c.close()
    assert d.alive()
    m = QMP(d.qmp_path)
    assert "qemu" in m.execute("query-version")
    m.close()
