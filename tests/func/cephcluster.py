"""Throwaway one-node Ceph clusters for the RBD tests.

`ceph` is a session fixture: the first RBD test starts one cluster with the
project's own tests/ceph/ceph-up.sh (one mon and one memstore OSD on
127.0.0.1, no mgr, ~1 s) and the session tears it down at the end, also
after failures or Ctrl-C.  Clusters left behind by a killed test run are
removed first (ceph-down.sh --stale: their owner pid is gone).  Its
ceph.conf keeps librados' own timeouts, so the tests' CLI calls (rbd,
qemu-img) and the daemons wait for a cluster slowed down by a busy machine
instead of failing; every wait is bounded by the subprocess timeout.

`private_ceph` is a cluster of the test's own, for a test that freezes it
(SIGSTOP): the shared one never sees an outage, so no later test depends
on how fast it recovers.  Its `timeout_conf` adds librados op and mount
timeouts of CLIENT_TIMEOUT seconds, for the daemon that must turn the
outage into errors; the test's own CLI calls use the plain `conf`.

Tests skip (with the reason) when the Ceph binaries are not installed.
Root is not needed.
"""
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import pytest
from conftest import tool_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UP = os.path.join(ROOT, "tests", "ceph", "ceph-up.sh")
DOWN = os.path.join(ROOT, "tests", "ceph", "ceph-down.sh")
CLUSTERS = "/tmp/bxceph-%d" % os.getuid()
CLIENT_TIMEOUT = 3
NEEDED = ("ceph-mon", "ceph-osd", "ceph-authtool", "monmaptool", "ceph", "rbd", "uuidgen")


def _all_stopped(pid):
    """Every thread of pid is stopped (state T in /proc/PID/task/*/stat)."""
    task = "/proc/%d/task" % pid
    for tid in os.listdir(task):
        try:
            with open("%s/%s/stat" % (task, tid)) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue                       # a thread that just exited
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


def missing_binaries():
    return [b for b in NEEDED if not shutil.which(b)]


class CephCluster:
    def __init__(self, path, client_timeout=None):
        self.dir = path
        env = dict(os.environ, BEXD_CEPH_OWNER=str(os.getpid()))
        env.pop("CEPH_CONF", None)
        env.pop("CEPH_ARGS", None)
        opts = ["--client-timeout", str(client_timeout)] if client_timeout else []
        r = subprocess.run(["bash", UP] + opts + [path],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=90, env=env)
        if r.returncode != 0:
            subprocess.run(["bash", DOWN, path], timeout=30)
            raise RuntimeError("ceph-up.sh failed:\n" + tool_text(r.stderr))
        self.env = dict(l.split("=", 1) for l in tool_text(r.stdout).split())
        self.conf = self.env["CEPH_CONF"]
        self.timeout_conf = self.env.get("CEPH_CONF_TIMEOUT")
        self.mon_port = self.env["CEPH_MON_PORT"]
        self._key = None

    def rbd(self, *args, check=True, timeout=60):
        r = subprocess.run(["rbd", "-c", self.conf] + list(args), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError("rbd %s -> %d: %s" % (args, r.returncode, tool_text(r.stderr)))
        return r

    def key(self):
        """client.admin's key, base64 (what a secret object with format=base64 holds)."""
        if self._key is None:
            self._key = subprocess.check_output(
                ["ceph-authtool", "-p", "-n", "client.admin", self.env["CEPH_KEYRING"]],
                timeout=30).decode(errors="replace").strip()
        return self._key

    def new_image(self, size="16M", prefix="img"):
        name = "%s-%s" % (prefix, uuid.uuid4().hex[:8])
        self.rbd("create", "--size", size, "rbd/" + name)
        return name

    def export_image(self, name, path):
        self.rbd("export", "--no-progress", "rbd/" + name, path)
        with open(path, "rb") as f:
            return f.read()

    def qemu_uri(self, name):
        """QEMU's legacy filename for the image (qemu-img's own rbd driver)."""
        return "rbd:rbd/%s:conf=%s" % (name, self.conf)

    def _pids(self):
        pids = []
        for n in ("osd.0", "mon.a"):
            try:
                with open(os.path.join(self.dir, "run", n + ".pid")) as f:
                    pids.append(int(f.read().strip()))
            except (OSError, ValueError):
                pass
        return pids

    def pause(self, timeout=10):
        """Freeze the mon and the OSD (SIGSTOP): the cluster stops answering.
        kill() returns before a busy process's threads have all stopped (a
        request sent right after could still be served): returns once every
        thread of both daemons is in state T."""
        pids = self._pids()
        for p in pids:
            os.kill(p, signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not all(_all_stopped(p) for p in pids):
            assert time.monotonic() < deadline, "ceph daemons did not stop"
            time.sleep(0.005)

    def resume(self):
        for p in reversed(self._pids()):
            os.kill(p, signal.SIGCONT)

    def wait_serving(self, deadline):
        """After resume(): poll until the cluster serves a client again (a
        pool listing is a mon and an OSD round trip), by `deadline`
        (time.monotonic()).  Each try is bounded by the timeout conf."""
        last = None
        while time.monotonic() < deadline:
            try:
                r = subprocess.run(["rbd", "-c", self.timeout_conf or self.conf, "ls", "rbd"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
            if r.returncode == 0:
                return
            last = tool_text(r.stderr)
        raise AssertionError("cluster not serving again by the deadline: %s" % last)

    def stop(self):
        subprocess.run(["bash", DOWN, self.dir], timeout=60)


def _start(client_timeout=None):
    missing = missing_binaries()
    if missing:
        pytest.fail("Ceph is not installed (missing %s; Debian packages ceph-mon, ceph-osd, "
                    "ceph-common, ceph-base: run scripts/deps.sh)" % ", ".join(missing),
                    pytrace=False)
    os.makedirs(CLUSTERS, exist_ok=True)
    return CephCluster(tempfile.mkdtemp(prefix="c", dir=CLUSTERS), client_timeout)


def _stop(cluster):
    if os.path.isdir(cluster.dir):
        cluster.resume()           # a failed test may have left it frozen
    cluster.stop()


@pytest.fixture(scope="session")
def ceph():
    if not missing_binaries():
        os.makedirs(CLUSTERS, exist_ok=True)
        subprocess.run(["bash", DOWN, "--stale", CLUSTERS], timeout=120)
    cluster = _start()
    try:
        yield cluster
    finally:
        _stop(cluster)


@pytest.fixture
def private_ceph():
    """A cluster of the test's own (~1 s to start), with `timeout_conf`."""
    cluster = _start(CLIENT_TIMEOUT)
    try:
        yield cluster
    finally:
        _stop(cluster)


@pytest.fixture
def rbd_image(ceph):
    """A fresh 16 MiB image (4 MiB objects), removed after the test."""
    name = ceph.new_image()
    yield name
    ceph.rbd("rm", "--no-progress", "rbd/" + name, check=False, timeout=60)
