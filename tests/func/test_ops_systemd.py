"""bexd under systemd: socket activation, readiness notification, journald.

Sockets are passed the way systemd passes them, by systemd's own
systemd-socket-activate (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES), and real
clients (nbdinfo, qemu-io, the QMP client, the vhost-user front-end
vub-client) connect to them.  Notifications go to a real AF_UNIX datagram
socket named by NOTIFY_SOCKET, read here as systemd would.  bexd only:
qemu-storage-daemon takes no passed socket by name and does not notify.
"""
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

import needs
from conftest import BEXD, LATE, QMP, BUILD, adopting, stop_daemonized, stop_process, tool_text

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
VUB = os.path.join(BUILD, "tests", "vhost", "vub-client")


def nbd_read(sock, name, length=512):
    r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -v 0 %d" % length,
                        "nbd+unix:///%s?socket=%s" % (name, sock)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, tool_text(r.stderr)
    return tool_text(r.stdout)


class Activated:
    """bexd started by systemd-socket-activate on named sockets.  The tool
    execs bexd when the first client connects; that client waits in the
    listen backlog meanwhile, as under systemd."""

    def __init__(self, tmpdir, names, args, env=None):
        self.paths = {n: os.path.join(tmpdir, n + ".sock") for n in names}
        argv = [SOCKET_ACTIVATE]
        for n in names:
            argv += ["-l", self.paths[n]]
        argv += ["--fdname=" + ":".join(names), BEXD] + list(args)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env)
        # the listening sockets exist once the tool says so on stderr
        for n in names:
            line = tool_text(self.proc.stderr.readline())
            assert "Listening on" in line, line

    def stop(self):
        """bexd (the tool execs it at the first connection) must exit 0 on
        SIGTERM within the harness's bound; the tool itself just goes."""
        try:
            with open("/proc/%d/comm" % self.proc.pid) as f:
                is_bexd = f.read().strip() == "bexd"
        except OSError:
            is_bexd = False
        if is_bexd:
            stop_process(self.proc)
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


@pytest.fixture
def activated(tmpdir_short):
    needs.tool("systemd-socket-activate", "systemd")
    started = []

    def start(names, args, env=None):
        a = Activated(tmpdir_short, names, args, env)
        started.append(a)
        return a
    yield start
    for a in started:
        a.stop()


def test_nbd_and_monitor_by_name(activated, image):
    img = image(4 << 20, data=b"activated!" * 10)
    a = activated(["nbd", "qmp"], [
        "--blockdev", "driver=file,node-name=disk,filename=" + img,
        "--nbd-server", "addr.type=fd,addr.str=nbd",
        "--export", "type=nbd,id=e0,node-name=disk,name=disk",
        "--chardev", "socket,id=mon,fd=qmp,server=on,wait=off",
        "--monitor", "chardev=mon"])
    out = nbd_read(a.paths["nbd"], "disk", 16)
    assert "activated.activa" in out
    m = QMP(a.paths["qmp"])
    assert [e["id"] for e in m.execute("query-block-exports")] == ["e0"]
    # the named socket outlives its user: the server restarts on it over QMP
    m.execute("nbd-server-stop")
    m.execute("nbd-server-start", addr={"type": "fd", "data": {"str": "nbd"}})
    m.execute("block-export-add", type="nbd", id="e1", node_name="disk", name="again")
    assert "activated.activa" in nbd_read(a.paths["nbd"], "again", 16)
    m.close()


def test_vhost_user_blk_by_name(activated, image):
    needs.built(VUB, "vub-client")
    img = image(8 << 20)
    a = activated(["vhost", "qmp"], [
        "--blockdev", "driver=file,node-name=disk,filename=" + img,
        "--export", "type=vhost-user-blk,id=v0,node-name=disk,writable=on,"
                    "addr.type=fd,addr.str=vhost",
        "--chardev", "socket,id=mon,fd=qmp,server=on,wait=off", "--monitor", "mon"])
    r = subprocess.run([VUB, a.paths["vhost"], "write", "0", "4096", "7"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, tool_text(r.stderr)
    assert tool_text(r.stdout).strip().endswith('{"status": 0}')
    from vubpattern import vub_pattern
    with open(img, "rb") as f:
        assert f.read(4096) == vub_pattern(4096, 7)     # the pattern reached the image


def test_unknown_name_is_refused(activated, image):
    img = image(1 << 20)
    a = activated(["nbd"], [
        "--blockdev", "driver=file,node-name=disk,filename=" + img,
        "--nbd-server", "addr.type=fd,addr.str=other"])
    s = socket.socket(socket.AF_UNIX)
    s.connect(a.paths["nbd"])        # triggers the start
    assert a.proc.wait(timeout=30) == 1
    err = tool_text(a.proc.stderr.read())
    assert "--nbd-server addr.type=fd,addr.str=other: Unable to parse FD number other" in err
    s.close()


def test_sockets_for_another_process_are_ignored(image, tmpdir_short):
    """LISTEN_PID names someone else: the descriptors are not ours."""
    img = image(1 << 20)
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(os.path.join(tmpdir_short, "n.sock"))
    ls.listen(1)
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID="1", LISTEN_FDNAMES="nbd")
    # the socket as fd 3, where systemd puts the first one
    r = subprocess.run(["bash", "-c", 'exec 3<&%d; exec "$@"' % ls.fileno(), "sh", BEXD,
                        "--blockdev", "driver=file,node-name=disk,filename=" + img,
                        "--nbd-server", "addr.type=fd,addr.str=nbd"],
                       capture_output=True, env=env, pass_fds=[ls.fileno()], timeout=30)
    assert r.returncode == 1
    assert b"Unable to parse FD number nbd" in r.stderr
    ls.close()


# ---- readiness (NOTIFY_SOCKET) ----

class Notify:
    """A systemd-style notification socket."""

    def __init__(self, tmpdir):
        self.path = os.path.join(tmpdir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(30)

    def next(self):
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.strip().split("\n"))

    def wait_for(self, key, pred=lambda v: True):
        while True:
            msg = self.next()
            if key in msg and pred(msg[key]):
                return msg


@pytest.fixture
def notify(tmpdir_short):
    n = Notify(tmpdir_short)
    yield n
    n.sock.close()


def start_foreground(args, env, stderr=subprocess.DEVNULL):
    return subprocess.Popen([BEXD] + list(args), stdout=subprocess.DEVNULL,
                            stderr=stderr, env=env)


def test_ready_status_stopping(notify, image, tmpdir_short):
    img = image(4 << 20)
    nsock = os.path.join(tmpdir_short, "nbd.sock")
    env = dict(os.environ, NOTIFY_SOCKET=notify.path)
    p = start_foreground(["--blockdev", "driver=file,node-name=disk,filename=" + img,
                          "--nbd-server", "addr.type=unix,addr.path=" + nsock,
                          "--export", "type=nbd,id=e0,node-name=disk"], env)
    try:
        msg = notify.next()
        assert msg["READY"] == "1"
        assert msg["MAINPID"] == str(p.pid)
        assert msg["STATUS"] == "serving 1 export, 0 clients"
        # READY=1 means serving: a client succeeds right away
        assert nbd_read(nsock, "disk", 512)
        # a connected client shows in STATUS
        h = subprocess.Popen(["nbdsh", "-u", "nbd+unix:///disk?socket=" + nsock, "-c",
                              "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             env=dict(os.environ, PATH="/usr/bin:" + os.environ["PATH"]))
        notify.wait_for("STATUS", lambda v: v == "serving 1 export, 1 client")
        h.stdin.close()
        h.wait(timeout=30)
        notify.wait_for("STATUS", lambda v: v == "serving 1 export, 0 clients")
        p.send_signal(signal.SIGTERM)
        msg = notify.wait_for("STOPPING")
        assert msg["STOPPING"] == "1"
        assert msg["STATUS"].startswith("shutting down (Terminated)")
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_watchdog(notify, image):
    usec = 200000
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC=str(usec))
    # bexd kicks at once when ready, then every half interval (src/ops/service.c)
    every = usec / 2 / 1e6
    p = start_foreground(["--blockdev", "driver=null-co,node-name=n0"], env)
    try:
        assert notify.next()["READY"] == "1"
        t0 = time.monotonic()
        seen = []
        for _ in range(7):
            notify.wait_for("WATCHDOG")
            seen.append(time.monotonic())
        # six intervals after the first kick, late by at most LATE in all
        assert seen[-1] - t0 <= 6 * every + LATE, seen[-1] - t0
        # the service manager's own limit, on the median of six gaps (one
        # sample could be any scheduling hiccup)
        gaps = sorted(b - a for a, b in zip(seen, seen[1:]))
        assert (gaps[2] + gaps[3]) / 2 < usec / 1e6, gaps
    finally:
        p.kill()
        p.wait()


def test_watchdog_for_another_pid_is_ignored(notify, image):
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="100000",
               WATCHDOG_PID="1")
    p = start_foreground(["--blockdev", "driver=null-co,node-name=n0"], env)
    try:
        assert notify.next()["READY"] == "1"
        p.send_signal(signal.SIGTERM)
        # nothing but STATUS/STOPPING: no WATCHDOG=1 in between
        msg = notify.next()
        assert "WATCHDOG" not in msg and msg.get("STOPPING") == "1"
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ---- journald ----

def test_journal_priority_prefixes(image, tmpdir_short):
    """With stderr connected to the journal (JOURNAL_STREAM names it), each
    line starts with its syslog priority; elsewhere with "bexd: level:"."""
    img = image(1 << 20)
    nsock = os.path.join(tmpdir_short, "nbd.sock")
    args = ["--blockdev", "driver=file,node-name=disk,filename=" + img,
            "--nbd-server", "addr.type=unix,addr.path=" + nsock,
            "--export", "type=nbd,id=e0,node-name=disk"]
    r, w = os.pipe()
    st = os.fstat(w)
    env = dict(os.environ, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))
    p = subprocess.Popen([BEXD] + args, stdout=subprocess.DEVNULL, stderr=w, env=env)
    os.close(w)
    f = os.fdopen(r, "rb")
    try:
        assert tool_text(f.readline()) == "<6>info: ready: 1 export, 0 clients\n"
        nbd_read(nsock, "disk", 512)
        attach = tool_text(f.readline())
        assert attach.startswith("<6>info: nbd: client unix:pid=")
        assert attach.rstrip().endswith("attached to export 'e0'")
        left = tool_text(f.readline())
        assert left.startswith("<6>info: nbd: client unix:pid=")
        assert "left export 'e0' (client disconnected): 1 reads, 0 writes, 0 errors" in left
        p.send_signal(signal.SIGTERM)
        rest = tool_text(f.read()).splitlines()
        assert rest[0] == "<6>info: shutting down (Terminated): 1 export, 0 clients; " \
                          "finishing in-flight requests"
        assert rest[-1] == "<6>info: stopped"
        assert all(line.startswith("<") for line in rest)
        assert p.wait(timeout=30) == 0
    finally:
        f.close()
        if p.poll() is None:
            p.kill()
            p.wait()
    # not the journal: the usual prefix
    p = subprocess.Popen([BEXD] + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=env)
    try:
        assert tool_text(p.stderr.readline()) == "bexd: info: ready: 1 export, 0 clients\n"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.stderr.close()


def test_activation_with_daemonize(activated, image, tmpdir_short):
    """The sockets were passed to the process systemd started; its
    --daemonize child inherits and uses them."""
    img = image(1 << 20, data=b"daemonized")
    pidfile = os.path.join(tmpdir_short, "pid")
    a = activated(["nbd"], [
        "--blockdev", "driver=file,node-name=disk,filename=" + img,
        "--nbd-server", "addr.type=fd,addr.str=nbd",
        "--export", "type=nbd,id=e0,node-name=disk,name=disk",
        "--daemonize", "--pidfile", pidfile])
    s = socket.socket(socket.AF_UNIX)
    with adopting():
        s.connect(a.paths["nbd"])    # starts bexd; its parent exits once ready
        assert a.proc.wait(timeout=30) == 0
    s.close()
    pid = int(open(pidfile).read())
    try:
        assert "daemonized" in nbd_read(a.paths["nbd"], "disk", 10)
    finally:
        stop_daemonized("bexd", pid)
