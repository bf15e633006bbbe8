"""Exports served by several iothreads, and FUSE over io_uring.

`iothread` as a list (QEMU 10.1's BlockExportIothreads) spreads one export
over several iothreads: FUSE queues on cloned /dev/fuse fds, NBD clients,
vhost-user-blk virtqueues.  `__org.bexd_io-uring` serves a FUSE export
through the kernel's FUSE-over-io_uring rings (Linux 6.14+), falling back
to /dev/fuse with one log line when the kernel has it off.

Which loop serves what is read from /proc: every loop has its own epoll fd,
and /proc/PID/fdinfo of an epoll fd lists the fds it watches.  What each
FUSE queue served is in the daemon's log when the export goes away.
qemu-storage-daemon 7.2 refuses both options (checked below).
"""
import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import IMPLS, QMP, QMPError

MiB = 1 << 20
URING_PARAM = "/sys/module/fuse/parameters/enable_uring"

fuse_only = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


class Bexd:
    """bexd in the foreground, its log in a file (the tests read it)."""

    def __init__(self, tmpdir, args, impl="bexd"):
        self.qmp_path = os.path.join(tmpdir, "qmp-%d.sock" % id(self))
        self.log_path = os.path.join(tmpdir, "log-%d" % id(self))
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [IMPLS[impl], "--chardev", "socket,id=m,path=%s,server=on,wait=off" % self.qmp_path,
             "--monitor", "chardev=m"] + list(args),
            stdout=self.log, stderr=subprocess.STDOUT)
        # the socket file appears at bind(), before listen(): retry refusals
        self.m = None
        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError("daemon failed: " + self.text())
            if os.path.exists(self.qmp_path):
                try:
                    self.m = QMP(self.qmp_path)
                    break
                except ConnectionRefusedError:
                    pass
            time.sleep(0.05)
        assert self.m, "no QMP socket: " + self.text()

    def text(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.text()


@pytest.fixture
def daemon(tmpdir_short):
    started = []

    def start(*args, impl="bexd"):
        d = Bexd(tmpdir_short, args, impl=impl)
        started.append(d)
        return d

    yield start
    for d in started:
        log = d.stop()
        if d.proc.returncode not in (0, -signal.SIGTERM):
            print(log)   # shown with the failure


@pytest.fixture
def uring_param():
    """set(True/False): the fuse module's enable_uring, restored afterwards."""
    if not os.path.exists(URING_PARAM):
        pytest.skip("kernel without FUSE over io_uring")
    with open(URING_PARAM) as f:
        old = f.read().strip()

    def set_(on):
        try:
            with open(URING_PARAM, "w") as f:
                f.write("Y" if on else "N")
        except OSError as e:
            pytest.skip("cannot set enable_uring: %s" % e)

    yield set_
    with open(URING_PARAM, "w") as f:
        f.write(old)


def epoll_watch(pid):
    """{watched fd: set of epoll fds watching it} of process pid."""
    out = {}
    fddir = "/proc/%d/fd" % pid
    for fd in os.listdir(fddir):
        try:
            if os.readlink(os.path.join(fddir, fd)) != "anon_inode:[eventpoll]":
                continue
            with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
                for line in f:
                    m = re.match(r"tfd:\s+(\d+)", line)
                    if m:
                        out.setdefault(int(m.group(1)), set()).add(int(fd))
        except FileNotFoundError:
            continue
    return out


def fds_to(pid, target):
    """The fds of pid whose link is target (e.g. /dev/fuse)."""
    fddir = "/proc/%d/fd" % pid
    res = []
    for fd in os.listdir(fddir):
        try:
            if os.readlink(os.path.join(fddir, fd)) == target:
                res.append(int(fd))
        except FileNotFoundError:
            pass
    return res


def served(log):
    """Per-queue request counts from the FUSE export's farewell line."""
    m = re.search(r"requests served per queue: /dev/fuse ([\d ]+); io_uring ([\d ]+)", log)
    assert m, log
    return [int(x) for x in m.group(1).split()], [int(x) for x in m.group(2).split()]


def fio(path, cwd, *extra, runtime=None):
    args = ["fio", "--name=v", "--filename=" + path, "--ioengine=libaio", "--direct=1",
            "--output-format=json"]
    args += list(extra)
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                       timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    # fio may print a note before the JSON
    return json.loads(r.stdout[r.stdout.index(b"{"):])


def verify_job(path, cwd, jobs=1):
    """Random writes at depth 16, read back and checked, from `jobs`
    processes, one per CPU (so that the kernel uses every CPU's queue)."""
    ncpu = os.cpu_count()
    out = fio(path, cwd, "--rw=randwrite", "--bs=16k", "--iodepth=16", "--size=8M",
              "--numjobs=%d" % jobs, "--offset_increment=8M", "--verify=crc32c",
              "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
              "--cpus_allowed=0-%d" % (ncpu - 1), "--cpus_allowed_policy=split")
    for job in out["jobs"]:
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == 8 * MiB


@pytest.fixture
def fuse_setup(daemon, image, tmpdir_short):
    """start(export_opts, *extra) -> (daemon, mountpoint, image); unmounted at the end."""
    mnts = []

    def start(opts, *extra):
        img = image(32 * MiB)
        mnt = os.path.join(tmpdir_short, "mnt%d" % len(mnts))
        open(mnt, "w").close()
        mnts.append(mnt)
        d = daemon(*extra, "--blockdev", "driver=file,node-name=d,filename=" + img,
                   "--export", "type=fuse,id=f,node-name=d,mountpoint=%s,writable=on%s"
                   % (mnt, opts))
        assert mounted(mnt)
        return d, mnt, img

    yield start
    for mnt in mnts:
        for _ in range(3):
            if not mounted(mnt):
                break
            subprocess.run(["fusermount3", "-u", "-z", mnt], stderr=subprocess.DEVNULL)


IOTHREADS2 = ("--object", "iothread,id=io0", "--object", "iothread,id=io1")


# ---- FUSE: several queues ----

@fuse_only
def test_fuse_two_queues(fuse_setup, tmpdir_short):
    d, mnt, img = fuse_setup(",iothread.0=io0,iothread.1=io1", *IOTHREADS2)
    verify_job(mnt, tmpdir_short, jobs=2)
    # two /dev/fuse fds (the session's and a clone), each in its own loop
    # (the iothreads start watching them asynchronously: look after I/O)
    fuse_fds = fds_to(d.proc.pid, "/dev/fuse")
    assert len(fuse_fds) == 2
    watch = epoll_watch(d.proc.pid)
    assert all(len(watch.get(fd, ())) == 1 for fd in fuse_fds)
    assert len(set.union(*(watch[fd] for fd in fuse_fds))) == 2
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", mnt, img], check=True)
    d.m.execute("block-export-del", id="f")
    d.m.wait_event("BLOCK_EXPORT_DELETED")
    assert not mounted(mnt)
    dev, uring = served(d.stop())
    assert len(dev) == 2 and all(n > 0 for n in dev), dev
    assert uring == [0, 0]


@fuse_only
def test_fuse_one_queue_by_default(fuse_setup, tmpdir_short):
    d, mnt, img = fuse_setup(",iothread=io0", *IOTHREADS2)
    assert len(fds_to(d.proc.pid, "/dev/fuse")) == 1
    verify_job(mnt, tmpdir_short)
    dev, uring = served(d.stop())
    assert len(dev) == 1 and dev[0] > 0


@fuse_only
def test_fuse_queues_hard_del_under_load(fuse_setup, tmpdir_short):
    # requests in flight on both queues when the export goes: they are
    # answered or failed, the daemon lives on, the mount goes away
    d, mnt, img = fuse_setup(",iothread.0=io0,iothread.1=io1", *IOTHREADS2)
    p = subprocess.Popen(["fio", "--name=l", "--filename=" + mnt, "--rw=randrw",
                          "--bs=64k", "--ioengine=libaio", "--iodepth=16", "--direct=1",
                          "--numjobs=2", "--time_based", "--runtime=20", "--size=32M"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmpdir_short)
    try:
        time.sleep(1)   # not synchronisation: only lets fio get going
        d.m.execute("block-export-del", id="f", mode="hard")
        d.m.wait_event("BLOCK_EXPORT_DELETED")
    finally:
        p.wait(60)
    assert d.m.execute("query-block-exports") == []
    assert not mounted(mnt)
    assert d.proc.poll() is None


# ---- FUSE over io_uring ----

@fuse_only
@pytest.mark.parametrize("opts,nq", [("", 1), (",iothread.0=io0,iothread.1=io1", 2)])
def test_fuse_io_uring(fuse_setup, uring_param, tmpdir_short, opts, nq):
    uring_param(True)
    d, mnt, img = fuse_setup(",__org.bexd_io-uring=on" + opts, *IOTHREADS2)
    verify_job(mnt, tmpdir_short, jobs=2)
    data = os.urandom(3 * MiB)
    with open(mnt, "r+b") as f:
        f.seek(5 * MiB + 512)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with open(img, "rb") as f:
        f.seek(5 * MiB + 512)
        assert f.read(len(data)) == data
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", mnt, img], check=True)
    d.m.execute("block-export-del", id="f")
    d.m.wait_event("BLOCK_EXPORT_DELETED")
    assert not mounted(mnt)
    log = d.stop()
    dev, uring = served(log)
    assert len(uring) == nq
    # INIT (and nothing else that needs an answer) over /dev/fuse
    assert all(n > 0 for n in uring), log
    assert sum(uring) > 1000 and sum(dev) <= 3, log
    assert "io-uring unavailable" not in log


@fuse_only
def test_fuse_io_uring_fallback(fuse_setup, uring_param, tmpdir_short):
    uring_param(False)
    d, mnt, img = fuse_setup(",__org.bexd_io-uring=on")
    verify_job(mnt, tmpdir_short)
    log = d.stop()
    assert log.count("io-uring unavailable") == 1, log
    assert "enable_uring is N): serving /dev/fuse" in log
    dev, uring = served(log)
    assert dev[0] > 100 and uring == [0]


@fuse_only
def test_fuse_io_uring_off(fuse_setup, uring_param, tmpdir_short):
    uring_param(True)
    d, mnt, img = fuse_setup(",__org.bexd_io-uring=off")
    verify_job(mnt, tmpdir_short)
    dev, uring = served(d.stop())
    assert dev[0] > 100 and uring == [0]


@fuse_only
def test_fuse_io_uring_hard_del_under_load(fuse_setup, uring_param, tmpdir_short):
    uring_param(True)
    d, mnt, img = fuse_setup(",__org.bexd_io-uring=on,iothread.0=io0,iothread.1=io1",
                             *IOTHREADS2)
    p = subprocess.Popen(["fio", "--name=l", "--filename=" + mnt, "--rw=randrw",
                          "--bs=64k", "--ioengine=libaio", "--iodepth=16", "--direct=1",
                          "--numjobs=2", "--time_based", "--runtime=20", "--size=32M"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmpdir_short)
    try:
        time.sleep(1)   # not synchronisation: only lets fio get going
        d.m.execute("block-export-del", id="f", mode="hard")
        d.m.wait_event("BLOCK_EXPORT_DELETED")
    finally:
        p.wait(60)
    assert not mounted(mnt)
    assert d.proc.poll() is None
    # the daemon still serves a new export on the same node
    assert "return" in d.m.request("block-export-add", {
        "type": "fuse", "id": "f2", "node-name": "d", "mountpoint": mnt, "writable": True,
        "__org.bexd_io-uring": True})
    with open(mnt, "r+b") as f:
        f.write(b"again")
    d.m.execute("block-export-del", id="f2")
    d.m.wait_event("BLOCK_EXPORT_DELETED")


# ---- bad values ----

def test_bad_iothread_lists(daemon, image, tmpdir_short):
    img = image(MiB)
    d = daemon(*IOTHREADS2, "--blockdev", "driver=file,node-name=d,filename=" + img)
    m = d.m
    mnt = os.path.join(tmpdir_short, "mnt")
    open(mnt, "w").close()
    for args, desc in [
        (dict(type="nbd", iothread=[]), "The set of iothreads must not be empty"),
        (dict(type="nbd", iothread=["io0", "nope"]), None),
        (dict(type="nbd", iothread=["io0", "io1"], fixed_iothread=True),
         "fixed-iothread cannot be used with multiple iothreads"),
        (dict(type="nbd", iothread=["io0", 1]),
         "Invalid parameter type for 'iothread[1]', expected: string"),
        (dict(type="nbd", iothread={"a": 1}),
         "Invalid parameter type for 'iothread', expected: BlockExportIothreads"),
        (dict(type="vhost-user-blk", iothread=["io0", "io1"],
              addr={"type": "unix", "path": os.path.join(tmpdir_short, "vub.sock")}),
         "The vhost-user-blk export does not support multi-threading"),
        (dict(type="nbd", **{"__org.bexd_io-uring": True}),
         "Parameter '__org.bexd_io-uring' is unexpected"),
        (dict(type="fuse", mountpoint=mnt, **{"__org.bexd_io-uring": "yes"}),
         "Invalid parameter type for '__org.bexd_io-uring', expected: boolean"),
    ]:
        args = {k.replace("_", "-"): v for k, v in args.items()}
        args["__org.bexd_io-uring"] = args.pop("--org.bexd-io-uring", None)
        if args["__org.bexd_io-uring"] is None:
            del args["__org.bexd_io-uring"]
        e = m.request("block-export-add", dict(id="e", **{"node-name": "d"}, **args))["error"]
        assert e["class"] == "GenericError"
        if desc:
            assert e["desc"] == desc, (args, e)
        else:
            assert "nope" in e["desc"], e
    assert m.execute("query-block-exports") == []
    # the iothreads were not kept busy by the refused exports
    m.execute("object-del", id="io1")


def test_qsd_refuses_extensions(daemon, image, tmpdir_short):
    # what bexd adds: qemu-storage-daemon 7.2 takes neither
    if not IMPLS.get("qsd"):
        pytest.skip("qemu-storage-daemon not installed")
    img = image(MiB)
    d = daemon(*IOTHREADS2, "--blockdev", "driver=file,node-name=d,filename=" + img,
               impl="qsd")
    e = d.m.error("block-export-add", type="nbd", id="e", node_name="d", iothread=["io0"])
    assert "iothread" in e["desc"]
    mnt = os.path.join(tmpdir_short, "mnt")
    open(mnt, "w").close()
    e = d.m.request("block-export-add", {"type": "fuse", "id": "e", "node-name": "d",
                                         "mountpoint": mnt,
                                         "__org.bexd_io-uring": True})["error"]
    assert "__org.bexd_io-uring" in e["desc"]


def test_iothreads_held_and_released(daemon, image):
    img = image(MiB)
    d = daemon(*IOTHREADS2, "--blockdev", "driver=file,node-name=d,filename=" + img,
               "--nbd-server", "addr.type=unix,addr.path=%s" % os.path.join(
                   os.path.dirname(img), "nbd.sock"))
    d.m.execute("block-export-add", type="nbd", id="e", node_name="d", iothread=["io0", "io1"])
    with pytest.raises(QMPError):
        d.m.execute("object-del", id="io1")
    e = d.m.error("x-blockdev-set-iothread", node_name="d", iothread="io0", force=True)
    assert "Cannot move export 'e'" in e["desc"]
    d.m.execute("block-export-del", id="e")
    d.m.wait_event("BLOCK_EXPORT_DELETED")
    d.m.execute("object-del", id="io1")


# ---- NBD: clients of one export over the given iothreads ----

def test_nbd_clients_spread(daemon, image):
    import nbd
    img = image(4 * MiB)
    sock = os.path.join(os.path.dirname(img), "nbd.sock")
    d = daemon(*IOTHREADS2, "--blockdev", "driver=file,node-name=d,filename=" + img,
               "--nbd-server", "addr.type=unix,addr.path=" + sock,
               "--export", "type=nbd,id=e,node-name=d,writable=on,iothread.0=io0,"
               "iothread.1=io1")
    pid = d.proc.pid
    before = set(int(x) for x in os.listdir("/proc/%d/fd" % pid))
    hs = []
    for i in range(4):
        h = nbd.NBD()
        h.set_export_name("d")
        h.connect_unix(sock)
        h.pwrite(bytes([i + 1]) * 4096, i * 4096)
        hs.append(h)
    watch = epoll_watch(pid)
    new = [fd for fd in watch if fd not in before and
           os.readlink("/proc/%d/fd/%d" % (pid, fd)).startswith("socket:")]
    assert len(new) == 4
    loops = [frozenset(watch[fd]) for fd in new]
    # least busy first: two clients on each iothread
    assert len(set(loops)) == 2
    assert sorted(loops.count(x) for x in set(loops)) == [2, 2]
    for i, h in enumerate(hs):
        assert h.pread(4096, i * 4096) == bytes([i + 1]) * 4096
        h.shutdown()
    with open(img, "rb") as f:
        assert f.read(4096) == b"\x01" * 4096


@fuse_only
@pytest.mark.parametrize("uring", [False, True])
def test_fuse_queues_o_direct_and_growable(daemon, image, tmpdir_short, uring_param, uring):
    # the request paths that leave the queue's loop and come back (a resize
    # in the main thread) and that need aligned memory (cache.direct=on),
    # on two queues, over /dev/fuse and over io_uring
    uring_param(uring)
    img = image(4 * MiB)
    mnt = os.path.join(tmpdir_short, "mnt")
    open(mnt, "w").close()
    d = daemon(*IOTHREADS2, "--blockdev",
               "driver=file,node-name=d,filename=%s,cache.direct=on" % img,
               "--export", "type=fuse,id=f,node-name=d,mountpoint=%s,writable=on,"
               "growable=on,iothread.0=io0,iothread.1=io1,__org.bexd_io-uring=%s"
               % (mnt, "on" if uring else "off"))
    try:
        data = os.urandom(100000)
        fd = os.open(mnt, os.O_RDWR)
        try:
            assert os.pwrite(fd, data, 4 * MiB + 333) == len(data)   # grows, unaligned
            # (an O_DIRECT node grows in whole sectors)
            assert 0 <= os.fstat(fd).st_size - (4 * MiB + 333 + len(data)) < 512
            assert os.pread(fd, len(data), 4 * MiB + 333) == data
            os.ftruncate(fd, 3 * MiB)
            assert os.fstat(fd).st_size == 3 * MiB
            assert os.pwrite(fd, b"x" * 7, 12345) == 7
            os.fsync(fd)
        finally:
            os.close(fd)
        assert os.path.getsize(img) == 3 * MiB
        with open(img, "rb") as f:
            f.seek(12345)
            assert f.read(7) == b"x" * 7
        os.truncate(mnt, 16 * MiB)          # room for the two verify jobs
        verify_job(mnt, tmpdir_short, jobs=2)
    finally:
        d.m.execute("block-export-del", id="f")
        d.m.wait_event("BLOCK_EXPORT_DELETED")
    dev, ur = served(d.stop())
    assert sum(ur if uring else dev) > 100
    if uring:
        assert sum(dev) <= 3
