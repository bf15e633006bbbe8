"""A throwaway one-node Ceph cluster for the RBD tests.

`ceph` is a session fixture: the first RBD test starts one cluster with the
project's own tests/ceph/ceph-up.sh (one mon and one memstore OSD on
127.0.0.1, no mgr, ~1 s) and the session tears it down at the end, also
after failures or Ctrl-C.  Clusters left behind by a killed test run are
removed first (ceph-down.sh --stale: their owner pid is gone).  The
cluster's [client] section bounds librados waits to CLIENT_TIMEOUT seconds,
so a stopped cluster turns into I/O errors quickly.

Tests skip (with the reason) when the Ceph binaries are not installed.
Root is not needed.
"""
import os
import shutil
import signal
import subprocess
import tempfile
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UP = os.path.join(ROOT, "tests", "ceph", "ceph-up.sh")
DOWN = os.path.join(ROOT, "tests", "ceph", "ceph-down.sh")
CLUSTERS = "/tmp/bxceph-%d" % os.getuid()
CLIENT_TIMEOUT = 3
NEEDED = ("ceph-mon", "ceph-osd", "ceph-authtool", "monmaptool", "ceph", "rbd", "uuidgen")


def missing_binaries():
    return [b for b in NEEDED if not shutil.which(b)]


class CephCluster:
    def __init__(self, path):
        self.dir = path
        env = dict(os.environ, BEXD_CEPH_OWNER=str(os.getpid()))
        env.pop("CEPH_CONF", None)
        env.pop("CEPH_ARGS", None)
        r = subprocess.run(["bash", UP, "--client-timeout", str(CLIENT_TIMEOUT), path],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=90, env=env)
        if r.returncode != 0:
            subprocess.run(["bash", DOWN, path], timeout=30)
            raise RuntimeError("ceph-up.sh failed:\n" + r.stderr.decode())
        self.env = dict(l.split("=", 1) for l in r.stdout.decode().split())
        self.conf = self.env["CEPH_CONF"]
        self.mon_port = self.env["CEPH_MON_PORT"]
        self._key = None

    def rbd(self, *args, check=True, timeout=30):
        r = subprocess.run(["rbd", "-c", self.conf] + list(args), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError("rbd %s -> %d: %s" % (args, r.returncode, r.stderr.decode()))
        return r

    def key(self):
        """client.admin's key, base64 (what a secret object with format=base64 holds)."""
        if self._key is None:
            self._key = subprocess.check_output(
                ["ceph-authtool", "-p", "-n", "client.admin", self.env["CEPH_KEYRING"]],
                timeout=30).decode().strip()
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

    def pause(self):
        """Freeze the mon and the OSD (SIGSTOP): the cluster stops answering."""
        for p in self._pids():
            os.kill(p, signal.SIGSTOP)

    def resume(self):
        for p in reversed(self._pids()):
            os.kill(p, signal.SIGCONT)

    def stop(self):
        subprocess.run(["bash", DOWN, self.dir], timeout=60)


@pytest.fixture(scope="session")
def ceph():
    missing = missing_binaries()
    if missing:
        pytest.skip("Ceph not installed (missing %s)" % ", ".join(missing))
    os.makedirs(CLUSTERS, exist_ok=True)
    subprocess.run(["bash", DOWN, "--stale", CLUSTERS], timeout=120)
    cluster = CephCluster(tempfile.mkdtemp(prefix="c", dir=CLUSTERS))
    try:
        yield cluster
    finally:
        if os.path.isdir(cluster.dir):
            cluster.resume()       # a failed test may have left it frozen
        cluster.stop()


@pytest.fixture
def rbd_image(ceph):
    """A fresh 16 MiB image (4 MiB objects), removed after the test."""
    name = ceph.new_image()
    yield name
    ceph.rbd("rm", "--no-progress", "rbd/" + name, check=False, timeout=60)
