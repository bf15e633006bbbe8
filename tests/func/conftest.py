"""Shared fixtures for the functional tests.

Every test starts real daemons as processes and talks to them through real
sockets.  The same scenario can run against bexd and against QEMU's
qemu-storage-daemon (the reference) through the `impl` fixture, since both
take the same command line and speak the same QMP.

Start-up is synchronised with --daemonize: the parent exits only when every
command-line option has been applied (sockets listening), so no test sleeps
or polls to wait for a daemon.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("BEXD_BUILD", os.path.join(ROOT, "build"))
BEXD = os.environ.get("BEXD", os.path.join(BUILD, "bexd"))
BEXCTL = os.environ.get("BEXCTL", os.path.join(BUILD, "bexctl"))
QSD = shutil.which("qemu-storage-daemon")

IMPLS = {"bexd": BEXD, "qsd": QSD}


def pytest_generate_tests(metafunc):
    # `impl` runs a test against bexd, and also against qemu-storage-daemon
    # when it is installed, so both answer the same scenario.
    if "impl" in metafunc.fixturenames:
        impls = ["bexd"] + (["qsd"] if QSD else [])
        metafunc.parametrize("impl", impls)


@pytest.fixture
def impl():  # overridden by parametrisation; bexd when a test asks directly
    return "bexd"


class QMPError(Exception):
    def __init__(self, error):
        super().__init__("%s: %s" % (error.get("class"), error.get("desc")))
        self.cls = error.get("class")
        self.desc = error.get("desc")


class QMP:
    """A minimal QMP client: greeting, negotiation, commands, events."""

    def __init__(self, path, negotiate=True, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.events = []
        self.greeting = self.recv()
        if negotiate:
            self.execute("qmp_capabilities")

    def close(self):
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass

    def send_raw(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def recv(self):
        line = self.file.readline()
        if not line:
            raise EOFError("monitor closed")
        return json.loads(line)

    def recv_response(self):
        """Next non-event message; events are kept in self.events."""
        while True:
            msg = self.recv()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def request(self, cmd, args=None, id=None):
        req = {"execute": cmd}
        if args is not None:
            req["arguments"] = args
        if id is not None:
            req["id"] = id
        self.send_raw(json.dumps(req) + "\n")
        return self.recv_response()

    def execute(self, cmd, **args):
        """Run a command; return its "return" or raise QMPError."""
        args = {k.replace("_", "-"): v for k, v in args.items()}
        resp = self.request(cmd, args if args else None)
        if "error" in resp:
            raise QMPError(resp["error"])
        return resp["return"]

    def error(self, cmd, **args):
        """Run a command that must fail; return the error object."""
        args = {k.replace("_", "-"): v for k, v in args.items()}
        resp = self.request(cmd, args if args else None)
        assert "error" in resp, "%s unexpectedly succeeded: %r" % (cmd, resp)
        return resp["error"]

    def wait_event(self, name):
        for i, ev in enumerate(self.events):
            if ev["event"] == name:
                return self.events.pop(i)
        while True:
            msg = self.recv()
            if msg.get("event") == name:
                return msg
            if "event" in msg:
                self.events.append(msg)


class Daemon:
    """A bexd or qemu-storage-daemon process with a QMP monitor socket."""

    def __init__(self, impl, tmpdir, args=(), monitor=True, env=None):
        self.impl = impl
        self.binary = IMPLS[impl]
        self.tmpdir = tmpdir
        self.qmp_path = os.path.join(tmpdir, "qmp-%d.sock" % id(self))
        self.pidfile = os.path.join(tmpdir, "pid-%d" % id(self))
        self.pid = None
        self.monitors = []
        argv = [self.binary]
        if monitor:
            argv += ["--chardev", "socket,id=qmp0,path=%s,server=on,wait=off" % self.qmp_path,
                     "--monitor", "chardev=qmp0"]
        argv += list(args)
        argv += ["--daemonize", "--pidfile", self.pidfile]
        self.argv = argv
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=60, env=env)
        self.stderr = r.stderr.decode()
        if r.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (impl, r.returncode, self.stderr))
        with open(self.pidfile) as f:
            self.pid = int(f.read().strip())

    def qmp(self, negotiate=True):
        m = QMP(self.qmp_path, negotiate=negotiate)
        self.monitors.append(m)
        return m

    def alive(self):
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        # a zombie is not alive (daemonized processes are reparented to init)
        try:
            with open("/proc/%d/stat" % self.pid) as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def wait_exit(self, timeout=30):
        """Wait for the daemon to exit, by waiting for its pidfd to close."""
        fd = os.pidfd_open(self.pid)
        try:
            import select
            p = select.poll()
            p.register(fd, select.POLLIN)
            if not p.poll(timeout * 1000):
                raise TimeoutError("%s did not exit" % self.impl)
        finally:
            os.close(fd)

    def stop(self, sig=signal.SIGTERM):
        for m in self.monitors:
            m.close()
        self.monitors = []
        if self.alive():
            try:
                os.kill(self.pid, sig)
                self.wait_exit()
            except (ProcessLookupError, TimeoutError):
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.pid = None


def tool_text(data):
    """A tool's output as text.  Tools print bytes, not promised UTF-8:
    nbdinfo, for one, quotes what file(1) says of the export's content."""
    return data.decode("utf-8", "replace")


def tool_json(data):
    return json.loads(tool_text(data))


def require_localhost():
    """For tests that connect to the name a certificate carries."""
    try:
        socket.getaddrinfo("localhost", None)
    except socket.gaierror as e:
        pytest.fail("this test needs the name 'localhost' to resolve "
                    "(a line for it in /etc/hosts): %s" % e)


@pytest.fixture
def tmpdir_short():
    # UNIX socket paths must fit in 108 bytes: keep the directory short.
    d = tempfile.mkdtemp(prefix="bx", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_daemon(tmpdir_short):
    """start_daemon(impl, *args) -> Daemon; every daemon is stopped at teardown."""
    daemons = []

    def start(impl="bexd", *args, **kw):
        d = Daemon(impl, tmpdir_short, args, **kw)
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        d.stop()


def run_daemon_expect_fail(impl, args, timeout=30):
    """Run a daemon whose command line is bad; return (returncode, stderr)."""
    r = subprocess.run([IMPLS[impl]] + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout)
    return r.returncode, r.stderr.decode()


@pytest.fixture
def image(tmpdir_short):
    """make(size, name='disk.img', data=None) -> path of a raw image file."""
    def make(size=64 << 20, name="disk.img", data=None):
        path = os.path.join(tmpdir_short, name)
        with open(path, "wb") as f:
            f.truncate(size)
            if data is not None:
                f.seek(0)
                f.write(data)
        return path
    return make
