"""Shared fixtures for the functional tests.

Every test starts real daemons as processes and talks to them through real
sockets.  The same scenario can run against bexd and against QEMU's
qemu-storage-daemon (the reference) through the `impl` fixture, since both
take the same command line and speak the same QMP.

Start-up is synchronised with --daemonize: the parent exits only when every
command-line option has been applied (sockets listening), so no test sleeps
or polls to wait for a daemon.
"""
import contextlib
import ctypes
import fcntl
import faulthandler
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

# BEXD_SOURCE_ROOT: for a copy of this file elsewhere (test_harness.py runs
# one in a pytester directory, and it still reads bexd's constants)
ROOT = os.environ.get("BEXD_SOURCE_ROOT") or \
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("BEXD_BUILD", os.path.join(ROOT, "build"))
BEXD = os.environ.get("BEXD", os.path.join(BUILD, "bexd"))
BEXCTL = os.environ.get("BEXCTL", os.path.join(BUILD, "bexctl"))
# The build without sanitizers (scripts/test.sh makes both): for the few
# checks of glibc's own allocator, which a sanitizer build replaces.
RELEASE_BEXD = os.path.join(ROOT, "build", "bexd")
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
        self.on_quit = None       # Daemon.qmp(): "quit" ends the daemon on purpose
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
        if cmd == "quit" and self.on_quit:
            self.on_quit()
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


class DaemonFailure(AssertionError):
    """bexd died, exited with a bad status, or hung on SIGTERM."""


# How long bexd may take to exit after SIGTERM.  Its own graceful stop gives
# up after BEXD_STOP_TIMEOUT seconds (set to STOP_GRACE below for every bexd
# the tests start), names what is stuck and exits 1; the bound adds time for
# the flush, the teardown and the leak check under ASan on a loaded machine.
STOP_GRACE = 10
STOP_BOUND = float(os.environ.get("BEXD_TEST_STOP_BOUND", STOP_GRACE + 20))

# Every daemon started during the current test (see the hooks at the end).
_test_daemons = []

# Time bounds.  A test that bounds a duration takes the limit from bexd
# itself (the option it set, or bexd's source through bexd_define()) and
# allows only for:
#  - TIMER_EARLY: bexd's timers run on a millisecond clock (src/util/loop.c
#    now_ms() truncates), so one fires up to 1 ms before its nominal time:
#    lower bounds are limit - TIMER_EARLY;
#  - LATE: how late a loaded two-core machine may run a due timer in the
#    ASan build (scheduling only: the loop runs due timers before it
#    sleeps).  The one allowance for upper bounds (BEXD_TEST_LATE).
TIMER_EARLY = 0.001
LATE = float(os.environ.get("BEXD_TEST_LATE", 5))


def bexd_define(name, header):
    """The integer value of `#define name value` in bexd's src/<header>,
    so a test's bound follows the code's constant."""
    with open(os.path.join(ROOT, "src", header)) as f:
        for line in f:
            w = line.split()
            if len(w) >= 3 and w[0] == "#define" and w[1] == name:
                expr = re.sub(r"\b(\d+)[uUlL]+\b", r"\1", " ".join(w[2:]).split("/*")[0])
                if not re.fullmatch(r"[0-9xa-fA-F ()<>*+-]+", expr):
                    raise ValueError("%s: not an integer expression: %r" % (name, expr))
                return int(eval(expr, {"__builtins__": {}}))   # digits and operators only
    raise LookupError("%s not defined in src/%s" % (name, header))


# Memory: a test bounds bexd's peak (VmHWM, never one RSS sample) by the
# buffer budget it set or bexd's constant, plus BUF_SLACK for what is not
# request buffers.  The buffers cannot pass the budget: budget.c reserves a
# buffer's bytes before allocating it (nbd_budget_take, after slot_get_buf's
# per-connection check).  What else grows while they fill:
#  - ASan's shadow of them, 1/8: 16 MiB for the 128 MiB connection budget,
#    the largest a test sets (ASan builds; none in release);
#  - thread stacks, the loops' and connections' own buffers, allocator
#    caches: 1.2 MiB (release) and 6.5 MiB (ASan) over a 64 MiB budget in
#    test_nbd_buffer_budget_is_global_and_hard (2026-12-03); 8 MiB allowed.
# 24 MiB is less than one request buffer (NBD_MAX_BUFFER_SIZE, 32 MiB), so a
# single buffer allocated past the budget fails the bound in either build.
BUF_SLACK = bexd_define("NBD_CONN_BUF_BUDGET", "export/nbd/nbd-internal.h") // 8 + (8 << 20)
assert BUF_SLACK < bexd_define("NBD_MAX_BUFFER_SIZE", "export/nbd/nbd-protocol.h")


def _status_text(rc):
    if rc is None:
        return "unknown exit status"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = "signal %d" % -rc
        return "killed by %s" % name
    return "exit status %d" % rc


def _sanitizer_options(tmpdir):
    """ASAN_OPTIONS/UBSAN_OPTIONS for a bexd: an abort() or a failed
    assert() prints a stack and is an error exit; reports go to the
    daemon's stderr file unless the caller chose a log_path."""
    env = {}
    asan = os.environ.get("ASAN_OPTIONS", "")
    if "handle_abort" not in asan:
        asan = (asan + ":" if asan else "") + "handle_abort=1"
    env["ASAN_OPTIONS"] = asan
    ubsan = os.environ.get("UBSAN_OPTIONS", "")
    if "print_stacktrace" not in ubsan:
        ubsan = (ubsan + ":" if ubsan else "") + "print_stacktrace=1"
    env["UBSAN_OPTIONS"] = ubsan
    return env


def _log_paths():
    """The log_path prefixes sanitizer reports go to, if any."""
    paths = []
    for var in ("ASAN_OPTIONS", "UBSAN_OPTIONS"):
        for opt in os.environ.get(var, "").split(":"):
            if opt.startswith("log_path="):
                paths.append(opt[len("log_path="):])
    return paths


def sanitizer_reports(pid):
    """Text of every sanitizer report file a process wrote (log_path.PID)."""
    out = []
    for prefix in _log_paths():
        path = "%s.%d" % (prefix, pid)
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                out.append("-- %s\n%s" % (path, f.read()[-6000:]))
    return "\n".join(out)


SANITIZER_MARKS = ("runtime error:", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                   "AddressSanitizer:DEADLYSIGNAL")


def sanitizer_findings(text, marks=SANITIZER_MARKS):
    """The lines around each sanitizer report in text, '' if none (a file
    with only LeakSanitizer's "Suppressions used" table is no report)."""
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if any(m in line for m in marks)]
    if not hits:
        return ""
    return "\n".join(lines[max(0, hits[0] - 2):hits[0] + 40])


def check_bexd_exit(rc, what="bexd", log="", pid=None, expected=(0,)):
    """Fail unless a bexd process ended with one of the expected statuses
    (subprocess's convention: -N is signal N)."""
    if rc in expected:
        return
    msg = "%s: %s (expected %s)" % (what, _status_text(rc),
                                   " or ".join(_status_text(e) for e in expected))
    if pid is not None:
        rep = sanitizer_reports(pid)
        if rep:
            log = (log or "") + "\n" + rep
    raise DaemonFailure(msg + "\n--- stderr (tail):\n" + tail(log))


def tail(text, lines=40):
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "\n".join((text or "").splitlines()[-lines:])


def stop_process(p, what="bexd", sig=signal.SIGTERM, bound=None, stderr=None, log_path=None):
    """Stop a bexd started with subprocess.Popen (not daemonized): send sig,
    wait at most `bound` seconds, fail on a hang (then SIGKILL) or on any
    status but 0.  Returns the stderr text (from p.stderr if it is a pipe,
    else `stderr`, else the file log_path)."""
    bound = STOP_BOUND if bound is None else bound
    if p.poll() is None:
        p.send_signal(sig)
    hung = False
    try:
        if p.stderr is not None:
            _, err = p.communicate(timeout=bound)
            stderr = err
        else:
            p.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        hung = True
        p.kill()
        if p.stderr is not None:
            _, err = p.communicate()
            stderr = err
        else:
            p.wait()
    if stderr is None and log_path:
        with open(log_path, "rb") as f:
            stderr = f.read()
    log = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else (stderr or "")
    if hung:
        raise DaemonFailure("%s did not exit within %g s of %s (killed)\n--- stderr (tail):\n%s"
                            % (what, bound, signal.Signals(sig).name, tail(log)))
    check_bexd_exit(p.returncode, what, log, pid=p.pid)
    return log


def stop_daemonized(impl, pid, sig=signal.SIGTERM, log=""):
    """Stop a daemon a test started itself with --daemonize inside
    `with adopting():` (so it is our child) and, for bexd, check that it exits 0
    within STOP_BOUND seconds; returns its exit status."""
    import select
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = None
    try:
        rc = _reap(pid)
        if rc is None:
            os.kill(pid, sig)
            p = select.poll()
            p.register(fd, select.POLLIN)
            if not p.poll(STOP_BOUND * 1000):
                os.kill(pid, signal.SIGKILL)
                _reap(pid, block=True)
                if impl == "bexd":
                    raise DaemonFailure("bexd did not exit within %g s of %s (killed)\n%s"
                                        % (STOP_BOUND, signal.Signals(sig).name, tail(log)))
                return None
            rc = _reap(pid, block=True)
    finally:
        if fd is not None:
            os.close(fd)
    if impl == "bexd":
        check_bexd_exit(rc, "bexd after %s" % signal.Signals(sig).name, log, pid=pid)
    return rc


PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


@contextlib.contextmanager
def adopting():
    """A daemon that forks away inside this block (--daemonize: the parent
    exits once the child is ready) is reparented to the test process
    instead of init, so its exit status can be read (waitpid).  Only this
    window: other tools' daemons still go to init."""
    _set_subreaper(True)
    try:
        yield
    finally:
        _set_subreaper(False)


def _reap(pid, block=False):
    """Exit status of a child (a daemonized one is ours if started inside
    adopting()), None while it runs; raises ChildProcessError if it is
    not our child."""
    wpid, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    if wpid == 0:
        return None
    return os.waitstatus_to_exitcode(status)


class Daemon:
    """A bexd or qemu-storage-daemon process with a QMP monitor socket.

    bexd must stay alive until the test (or its teardown) stops it, and
    then exit 0 on SIGTERM within STOP_BOUND seconds; anything else fails
    the test with bexd's exit status and the tail of its stderr.  A test
    that ends bexd on purpose says so: d.stop(signal.SIGKILL), or
    d.expect_exit(...) before it kills it or makes it exit.
    qemu-storage-daemon (the reference) is only held to being alive."""

    def __init__(self, impl, tmpdir, args=(), monitor=True, env=None, binary=None):
        self.impl = impl
        self.binary = binary or IMPLS[impl]
        self.tmpdir = tmpdir
        self.qmp_path = os.path.join(tmpdir, "qmp-%d.sock" % id(self))
        self.pidfile = os.path.join(tmpdir, "pid-%d" % id(self))
        self.stderr_path = os.path.join(tmpdir, "stderr-%d" % id(self))
        self.pid = None
        self.returncode = None
        self.expected = None          # None: alive until stopped, then exit 0
        self.monitors = []
        argv = [self.binary]
        if monitor:
            argv += ["--chardev", "socket,id=qmp0,path=%s,server=on,wait=off" % self.qmp_path,
                     "--monitor", "chardev=qmp0"]
        argv += list(args)
        argv += ["--daemonize", "--pidfile", self.pidfile]
        self.argv = argv
        if impl == "bexd":
            env = dict(os.environ if env is None else env)
            env.setdefault("BEXD_STOP_TIMEOUT", str(STOP_GRACE))
            env["BEXD_KEEP_STDERR"] = "1"
            for k, v in _sanitizer_options(tmpdir).items():
                env.setdefault(k, v)
        _test_daemons.append(self)
        with open(self.stderr_path, "wb") as errf, adopting():
            r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=errf,
                               timeout=60, env=env)
        self.stderr = self.log()
        if r.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (impl, r.returncode, self.stderr))
        with open(self.pidfile) as f:
            self.pid = int(f.read().strip())
        _reap_orphans()               # qsd's intermediate child (it forks twice)

    def log(self):
        """Everything the daemon wrote to stderr so far (bexd keeps its
        stderr with --daemonize in the tests; qsd's goes to /dev/null)."""
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def qmp(self, negotiate=True):
        m = QMP(self.qmp_path, negotiate=negotiate)
        m.on_quit = self._quitting
        self.monitors.append(m)
        return m

    def _quitting(self):
        # QMP quit: the daemon ends on purpose, and must exit 0
        if not self.expected_set:
            self.expect_exit(0)

    def expect_exit(self, *statuses):
        """The test ends this daemon on purpose (kill, crash, quit, a bad
        option at run time): accept one of `statuses` as its end (0 = exit
        0, -signal.SIGKILL = killed by SIGKILL), or any end without
        arguments.  It may then be dead at teardown."""
        self.expected = statuses or None
        self.expect_any = not statuses
        self.expected_set = True

    expected_set = False
    expect_any = False

    def _poll(self):
        if self.returncode is None and self.pid is not None:
            try:
                self.returncode = _reap(self.pid)
            except ChildProcessError:
                pass
        return self.returncode

    def alive(self):
        if self.pid is None or self._poll() is not None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        # a zombie is not alive
        try:
            with open("/proc/%d/stat" % self.pid) as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def wait_exit(self, timeout=30):
        """Wait for the daemon to exit (its pidfd becomes readable); returns
        its exit status (-N: killed by signal N).  Waiting for the exit
        says the test expects it: the status is still checked at stop(),
        0 unless expect_exit() said otherwise."""
        self.waited = True
        if self.pid is None or self._poll() is not None:
            return self.returncode
        import select
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return self._poll()
        try:
            p = select.poll()
            p.register(fd, select.POLLIN)
            if not p.poll(timeout * 1000):
                raise TimeoutError("%s did not exit" % self.impl)
        finally:
            os.close(fd)
        try:
            self.returncode = _reap(self.pid, block=True)
        except ChildProcessError:
            pass
        return self.returncode

    waited = False

    def _check(self, rc, how):
        if self.impl != "bexd":
            return
        if not self.expect_any:
            expected = self.expected or (0,)
            check_bexd_exit(rc, "bexd %s" % how, self.log(), pid=self.pid, expected=expected)
        # a sanitizer report that did not change the exit status (UBSan
        # goes on after a runtime error) fails the test that caused it
        # (a death by signal the test asked for may print ASan's
        # DEADLYSIGNAL report: then only UBSan's runtime errors count)
        killed = self.expect_any or any(e < 0 for e in self.expected or ())
        found = sanitizer_findings(self.log() + "\n" + sanitizer_reports(self.pid),
                                   ("runtime error:",) if killed else SANITIZER_MARKS)
        if found:
            raise DaemonFailure("bexd: sanitizer report\n" + found)

    def check_alive(self):
        """At the end of the test body: fail if bexd (or the reference)
        died and the test did not say it would, or if bexd ended in a way
        the test did not expect.  A failure is reported once."""
        if self.pid is None or self.alive():
            return
        rc = self._poll()
        pid = self.pid
        try:
            if not (self.expected_set or self.waited):
                raise DaemonFailure("%s died during the test: %s\n--- stderr (tail):\n%s"
                                    % (self.impl, _status_text(rc),
                                       tail(self.log() + "\n" + sanitizer_reports(pid))))
            self._check(rc, "exit")
        except DaemonFailure:
            self.pid = None
            raise

    def stop(self, sig=signal.SIGTERM):
        """Stop the daemon with sig and check how it ended (see the class
        comment); returns the daemon's stderr.  SIGKILL is on purpose."""
        for m in self.monitors:
            m.close()
        self.monitors = []
        if self.pid is None:
            return self.log()
        if sig == signal.SIGKILL and not self.expected_set:
            self.expect_exit(-signal.SIGKILL)
        try:
            if not self.alive():
                self.check_alive()
                self._check(self._poll(), "exit")
                return self.log()
            try:
                os.kill(self.pid, sig)
                self.wait_exit(timeout=STOP_BOUND)
            except TimeoutError:
                os.kill(self.pid, signal.SIGKILL)
                self.wait_exit(timeout=60)
                if self.impl == "bexd":
                    raise DaemonFailure("bexd did not exit within %g s of %s (killed)\n"
                                        "--- stderr (tail):\n%s"
                                        % (STOP_BOUND, signal.Signals(sig).name, tail(self.log())))
                return self.log()
            self._check(self.returncode, "after %s" % signal.Signals(sig).name)
            return self.log()
        finally:
            self.pid = None


def _reap_orphans():
    """Reap zombie children that are no test's Popen: daemonized processes
    (another session) whose exit nobody waits for, e.g. qsd's intermediate
    fork or a tool's daemon."""
    mysid = os.getsid(0)
    mine = os.getpid()
    tracked = {d.pid for d in _test_daemons if d.pid is not None}
    try:
        pids = [int(x) for x in os.listdir("/proc") if x.isdigit()]
    except OSError:
        return
    for pid in pids:
        if pid in tracked:
            continue
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields: state ppid pgrp session ...
        if fields[0] == "Z" and int(fields[1]) == mine and int(fields[3]) != mysid:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def xfail_if_reference_died(d, what, timeout=5):
    """For the reference daemon only: if qsd ends within `timeout` s (a
    crash the test provoked: qsd 7.2 aborts in some of bexd's scenarios),
    the test xfails with `what` and qsd's status, never passes silently.
    bexd is not excused: its end is checked at teardown as always."""
    if d.impl != "qsd":
        return
    try:
        rc = d.wait_exit(timeout=timeout)
    except TimeoutError:
        d.waited = False
        return
    d.expect_exit()
    pytest.xfail("qemu-storage-daemon 7.2 %s (status %r)" % (what, rc))


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


FUSE_URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


@pytest.fixture
def uring_param():
    """set(True/False): the fuse module's enable_uring, restored afterwards.
    The parameter is one for the whole machine: the fixture holds an
    exclusive lock on it from setup to restore, so test sessions sharing
    the machine (or pytest workers) do not flip it under each other's
    exports (test_fuse_io_uring_teardown_under_io found the rings
    'disabled in the kernel' 2 runs in 10 while another session ran)."""
    if not os.path.exists(FUSE_URING_PARAM):
        pytest.skip("kernel without FUSE over io_uring")
    # in /dev/shm, which a chroot on the machine (fresh-root.sh) shares
    lock = open(os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp",
                             "bexd-test-fuse-enable-uring.lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(FUSE_URING_PARAM) as f:
            old = f.read().strip()

        def set_(on):
            try:
                with open(FUSE_URING_PARAM, "w") as f:
                    f.write("Y" if on else "N")
            except OSError as e:
                pytest.skip("cannot set enable_uring: %s" % e)

        yield set_
        with open(FUSE_URING_PARAM, "w") as f:
            f.write(old)
    finally:
        lock.close()


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
    failures = []
    for d in daemons:
        try:
            d.stop()
        except DaemonFailure as e:
            failures.append(str(e))
    if failures:
        raise DaemonFailure("\n\n".join(failures))


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


# ---------------------------------------------------------------------------
# The harness: daemons are children, one test's hang fails that test, and
# the summary tells bexd's tests from the reference's.

TEST_TIMEOUT = float(os.environ.get("BEXD_TEST_TIMEOUT", 600))
_OUTCOMES = {}      # nodeid -> {"kind": "bexd"|"reference", "passed": True, ...}


_CONFIG = None


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config
    _set_subreaper(False)      # fails here, not in a test, without prctl
    config.addinivalue_line(
        "markers", "timeout(seconds): this test's limit per phase (setup, call, "
        "teardown) instead of BEXD_TEST_TIMEOUT (%g s)" % TEST_TIMEOUT)


class TestTimeout(BaseException):
    """A test phase ran past its limit (BaseException: no `except
    Exception` in a test swallows it)."""


def _timeout_of(item):
    m = item.get_closest_marker("timeout")
    return float(m.args[0]) if m else TEST_TIMEOUT


def _on_alarm(signum, frame):
    # Python-level stacks of every thread, then fail the phase: the
    # teardown still runs and stops the daemons.
    faulthandler.dump_traceback(all_threads=True)
    raise TestTimeout("test phase ran past its time limit (hung?)")


def _timed(item, when):
    limit = _timeout_of(item)
    if when == "teardown":
        # stopping the daemons is not cut short by a tight limit
        limit = max(limit, 2 * STOP_BOUND + 60)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    # Backstop for a hang the alarm cannot interrupt (blocked in C code
    # that retries EINTR): dump the stacks and end the run.
    faulthandler.dump_traceback_later(limit + 120, exit=True)
    return old


def _untimed(old):
    signal.setitimer(signal.ITIMER_REAL, 0)
    faulthandler.cancel_dump_traceback_later()
    signal.signal(signal.SIGALRM, old)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    del _test_daemons[:]
    old = _timed(item, "setup")
    try:
        yield
    finally:
        _untimed(old)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item):
    old = _timed(item, "call")
    try:
        outcome = yield
    finally:
        _untimed(old)
    # The test's checks passed: every daemon it did not end on purpose
    # must still be alive (a crash after the last check fails the test).
    if outcome.excinfo is None:
        for d in _test_daemons:
            d.check_alive()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_teardown(item):
    old = _timed(item, "teardown")
    try:
        yield
    finally:
        _untimed(old)
        impls = {d.impl for d in _test_daemons}
        param = getattr(getattr(item, "callspec", None), "params", {}).get("impl")
        ref = param == "qsd" or (impls == {"qsd"})
        _OUTCOMES.setdefault(item.nodeid, {})["kind"] = \
            "reference" if ref else "bexd"
        _reap_orphans()


def _failure_line(report):
    """'FAILED nodeid (phase): first line of the reason'."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        why = crash.message
    elif isinstance(report.longrepr, tuple):       # (path, line, message)
        why = str(report.longrepr[-1])
    else:
        why = str(report.longrepr or "")
    lines = [ln for ln in why.splitlines() if ln.strip()]
    why = lines[0].strip() if lines else "(no message)"
    if len(why) > 200:
        why = why[:197] + "..."
    word = "FAILED" if report.when == "call" else "ERROR"
    return "%s %s (%s): %s" % (word, report.nodeid, report.when, why)


def _say_failure_now(report):
    # Named the moment it fails, even under -q (which names failures only
    # at the end): a run stopped half-way still says what failed.
    tr = _CONFIG.pluginmanager.get_plugin("terminalreporter") if _CONFIG else None
    line = _failure_line(report)
    if tr is not None:
        if tr._tw.width_of_current_line:      # after -q's progress letters
            tr._tw.line()
        tr.write_line(line, red=True, bold=True)
        tr._tw.flush()
    else:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


@pytest.hookimpl(trylast=True)     # after the terminal's own F/E letter
def pytest_runtest_logreport(report):
    if report.failed and not hasattr(report, "wasxfail"):
        _say_failure_now(report)
    o = _OUTCOMES.setdefault(report.nodeid, {})
    if hasattr(report, "wasxfail"):
        o["xfail"] = "xpassed" if report.passed else "xfailed"
    elif report.failed:
        o["failed"] = True
    elif report.skipped:
        o["skipped"] = True
    elif report.when == "call" and report.passed:
        o["passed"] = True


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = {k: {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0, "xpassed": 0}
              for k in ("bexd", "reference")}
    for nodeid, o in _OUTCOMES.items():
        kind = o.get("kind")
        if kind is None:      # never ran its teardown (collection error, -x)
            kind = "reference" if "[qsd" in nodeid or "-qsd" in nodeid else "bexd"
        c = counts[kind]
        if o.get("failed"):
            c["failed"] += 1
        elif "xfail" in o:
            c[o["xfail"]] += 1
        elif o.get("skipped"):
            c["skipped"] += 1
        elif o.get("passed"):
            c["passed"] += 1

    def fmt(c):
        s = "%d passed, %d failed, %d skipped" % (c["passed"], c["failed"], c["skipped"])
        if c["xfailed"] or c["xpassed"]:
            s += ", %d xfailed, %d xpassed" % (c["xfailed"], c["xpassed"])
        return s
    terminalreporter.write_line("bexd: %s; reference: %s" % (fmt(counts["bexd"]),
                                                             fmt(counts["reference"])))
