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

import needs
from conftest import IMPLS, QMP, QMPError, DaemonFailure, stop_process, tool_text, tool_json

MiB = 1 << 20

fuse_only = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


class Bexd:
    """bexd in the foreground, its log in a file (the tests read it)."""

    stopped = False

    def __init__(self, tmpdir, args, impl="bexd"):
        self.impl = impl
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
        """SIGTERM; bexd must exit 0 within the harness's bound (conftest
        stop_process), qemu-storage-daemon just has to go."""
        if self.stopped:
            return self.text()
        self.stopped = True
        try:
            if self.impl == "bexd":
                stop_process(self.proc, stderr=None, log_path=self.log_path)
            elif self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
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
    failures = []
    for d in started:
        try:
            d.stop()
        except DaemonFailure as e:
            failures.append(str(e))
    assert not failures, "\n\n".join(failures)


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
    assert r.returncode == 0, tool_text(r.stderr)
    # fio may print a note before the JSON
    return tool_json(r.stdout[r.stdout.index(b"{"):])


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


def io_running(d, n=300, bound=120):
    """Poll the export's counters until n requests were answered: I/O is
    flowing (a condition polled with a bound, not a sleep)."""
    deadline = time.monotonic() + bound
    while True:
        (e,) = d.m.execute("__org.bexd_query-export-clients", id="f")
        t = e["totals"]
        if t["read-operations"] + t["write-operations"] >= n:
            return
        assert time.monotonic() < deadline, "no I/O through the export: %r" % t
        time.sleep(0.02)


def load_ends(load, how):
    try:
        load.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError("%s: the load still runs 60 s after the export went" % how)


def teardown_load(mnt, cwd):
    # direct and buffered I/O from 3 processes; it runs until the export
    # goes (then fails), the runtime is only a bound
    return subprocess.Popen(
        ["fio", "--filename=" + mnt, "--ioengine=libaio", "--time_based", "--runtime=120",
         "--size=32M", "--name=d", "--rw=randrw", "--bsrange=4k-256k", "--iodepth=16",
         "--direct=1", "--numjobs=2", "--name=b", "--rw=randwrite", "--bs=64k",
         "--iodepth=1", "--direct=0", "--fsync=4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)


@fuse_only
@pytest.mark.timeout(900)
@pytest.mark.parametrize("opts", ["", ",iothread.0=io0,iothread.1=io1"])
def test_fuse_io_uring_teardown_under_io(daemon, image, tmpdir_short, uring_param, opts):
    # The export goes while the rings still complete commands: a hard
    # block-export-del, SIGTERM, QMP quit, and an unmount behind our back
    # (umount -f aborts the connection) followed by a delete, each with
    # I/O running, in turn.  Each queue's rings are closed and freed in
    # the queue's own loop (the thread whose task work the kernel copies
    # requests in), so no copy meets freed buffers and the deferred submit
    # is never cancelled from another thread.  Every bexd must exit 0 with
    # no sanitizer report, the mount must go, the load must end, and after
    # a delete the daemon serves a new export on the same node.
    uring_param(True)
    img = image(32 * MiB)
    mnt = os.path.join(tmpdir_short, "mnt")
    open(mnt, "w").close()
    export = ("type=fuse,id=f,node-name=d,mountpoint=%s,writable=on,__org.bexd_io-uring=on%s"
              % (mnt, opts))
    for how in ["hard-del", "sigterm", "quit", "abort", "hard-del", "sigterm"]:
        d = daemon(*IOTHREADS2, "--blockdev", "driver=file,node-name=d,filename=" + img,
                   "--export", export)
        load = teardown_load(mnt, tmpdir_short)
        try:
            io_running(d)
            if how == "abort":
                # our own mount, forced: the kernel aborts the connection
                subprocess.run(["umount", "-f", mnt], stderr=subprocess.DEVNULL)
                load_ends(load, how)
                subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL)
            if how in ("hard-del", "abort"):
                d.m.execute("block-export-del", id="f", mode="hard")
                d.m.wait_event("BLOCK_EXPORT_DELETED")
                assert not mounted(mnt)
                load_ends(load, how)
                assert d.proc.poll() is None
                # the daemon lives on and serves the node again
                assert "return" in d.m.request("block-export-add", {
                    "type": "fuse", "id": "f2", "node-name": "d", "mountpoint": mnt,
                    "writable": True, "__org.bexd_io-uring": True})
                with open(mnt, "r+b") as f:
                    f.write(b"again")
                d.m.execute("block-export-del", id="f2")
                d.m.wait_event("BLOCK_EXPORT_DELETED")
            elif how == "quit":
                d.m.request("quit")
            log = d.stop()        # SIGTERM unless it has ended; exit 0 or fail
        finally:
            if load.poll() is None:
                load.kill()
            load.wait()
        assert not mounted(mnt), how
        dev, ur = served(log)
        assert sum(ur) > 0, (how, log)


# ---- bad values ----

def test_bad_iothread_lists(daemon, image, tmpdir_short):
    img = image(MiB)
    d = daemon(*IOTHREADS2, "--blockdev", "driver=file,node-name=d,filename=" + img)
    m = d.m
    mnt = os.path.join(tmpdir_short, "mnt")
    open(mnt, "w").close()
    for args, desc in [
        (dict(type="nbd", iothread=[]), "The set of I/O threads must not be empty"),
        (dict(type="nbd", iothread=["io0", "nope"]), None),
        (dict(type="nbd", iothread=["io0", "io1"], fixed_iothread=True),
         "Cannot use fixed-iothread for a multi-threaded export"),
        (dict(type="nbd", iothread=["io0", 1]),
         "Invalid parameter type for 'iothread[1]', expected: string"),
        (dict(type="nbd", iothread={"a": 1}),
         "Invalid parameter type for 'iothread', expected: BlockExportIothreads"),
        (dict(type="vhost-user-blk", iothread=["io0", "io1"], fixed_iothread=True,
              addr={"type": "unix", "path": os.path.join(tmpdir_short, "vub.sock")}),
         "Cannot use fixed-iothread for a multi-threaded export"),
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
    # moving the node leaves the export in its iothreads (QEMU 10.1): io1 stays held
    d.m.execute("x-blockdev-set-iothread", node_name="d", iothread="io0", force=True)
    with pytest.raises(QMPError):
        d.m.execute("object-del", id="io1")
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


def fuse_totals(d):
    (e,) = d.m.execute("__org.bexd_query-export-clients", id="f")
    return e["totals"]


@fuse_only
@pytest.mark.parametrize("uring", [False, True])
def test_fuse_o_direct_writes_not_copied(daemon, image, tmpdir_short, uring_param, uring):
    # On an O_DIRECT node (cache.direct=on, image on the real disk) a WRITE
    # is written from the buffer it arrived in: /dev/fuse requests are read
    # so that the payload lands on a page, FUSE io_uring payloads start on
    # one.  write-copied-bytes counts payloads that had to be copied into
    # an aligned buffer first (every O_DIRECT write over /dev/fuse before).
    uring_param(uring)
    img = image(16 * MiB)
    mnt = os.path.join(tmpdir_short, "mnt")
    open(mnt, "w").close()
    d = daemon("--blockdev", "driver=file,node-name=d,filename=%s,cache.direct=on" % img,
               "--export", "type=fuse,id=f,node-name=d,mountpoint=%s,writable=on,"
               "__org.bexd_io-uring=%s" % (mnt, "on" if uring else "off"))
    # 1 MiB O_DIRECT writes at depth 8 (one FUSE WRITE each: max_write),
    # read back and checked through the mount
    out = fio(mnt, tmpdir_short, "--rw=write", "--bs=1M", "--iodepth=8", "--size=8M",
              "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
              "--verify_state_save=0")
    assert out["jobs"][0]["error"] == 0
    t = fuse_totals(d)
    assert t["write-bytes"] == 8 * MiB and t["write-operations"] == 8, t
    assert t["write-copied-bytes"] == 0, t
    # small writes at odd offsets through the page cache: the node's
    # read-modify-write aligns the range, the payload is still not copied
    data = os.urandom(100)
    fd = os.open(mnt, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 12 * MiB + 7) == 100
        os.fsync(fd)
    finally:
        os.close(fd)
    t = fuse_totals(d)
    assert t["write-bytes"] == 8 * MiB + 100 and t["write-copied-bytes"] == 0, t
    assert t["failed-operations"] == 0, t
    with open(img, "rb") as f:
        f.seek(12 * MiB + 7)
        assert f.read(100) == data
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", mnt, img], check=True)
    d.m.execute("block-export-del", id="f")
    d.m.wait_event("BLOCK_EXPORT_DELETED")
    dev, ur = served(d.stop())
    if uring:       # the writes went over the rings, not /dev/fuse
        assert sum(ur) > 8 and sum(dev) <= 3, (dev, ur)
    else:
        assert sum(dev) > 8 and sum(ur) == 0, (dev, ur)


# ---- vhost-user-blk: virtqueues over the given iothreads ----

VUB = os.environ.get("VUB_CLIENT", os.path.join(os.environ.get("BEXD_BUILD", "build"),
                                                "tests", "vhost", "vub-client"))


def vub_cmd(sock, *args, nq=1):
    needs.built(VUB, "vub-client")
    return [VUB, "-q", str(nq), sock] + [str(a) for a in args]


def vub_json(sock, *args, nq=1, env=None):
    r = subprocess.run(vub_cmd(sock, *args, nq=nq), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=120, env=env)
    out = tool_text(r.stdout).strip().splitlines()
    assert r.returncode == 0, (r.returncode, out, tool_text(r.stderr))
    return json.loads(out[-1])


def vub_daemon(daemon, image, tmpdir_short, iothread, nq=4, impl="bexd", size=16 * MiB):
    img = image(size)
    sock = os.path.join(tmpdir_short, "vub.sock")
    exp = ("type=vhost-user-blk,id=e,node-name=d,writable=on,addr.type=unix,addr.path=%s,"
           "num-queues=%d" % (sock, nq))
    if iothread:
        exp += "," + iothread
    d = daemon(*IOTHREADS2, "--blockdev", "driver=file,node-name=d,filename=" + img,
               "--export", exp, impl=impl)
    return d, sock, img


def test_vhost_queues_over_iothreads(daemon, image, tmpdir_short):
    # 4 virtqueues over io0/io1: queues 0 and 2 in io0, 1 and 3 in io1 (QEMU's
    # round-robin); every queue writes blocks that another queue reads back
    d, sock, img = vub_daemon(daemon, image, tmpdir_short, "iothread.0=io0,iothread.1=io1")
    r, w = os.pipe()
    p = subprocess.Popen(vub_cmd(sock, "mqverify", 4096, 16, 6, w, nq=4), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(w,))
    os.close(w)
    try:
        with os.fdopen(r) as hold:
            line = hold.readline().split()
        assert line[:1] == ["ready"], p.stderr.read()
        kick_ids = [int(x) for x in line[1:]]
        # the client is connected and each queue has served a round
        tids = {t["id"]: t["thread-id"] for t in d.m.execute("query-iothreads")}
        clients = d.m.execute("__org.bexd_query-export-clients", id="e")[0]["clients"]
        assert len(clients) == 1
        queues = clients[0]["queues"]
        assert [q["index"] for q in queues] == [0, 1, 2, 3]
        assert [q["iothread"] for q in queues] == ["io0", "io1", "io0", "io1"]
        for q in queues:
            assert q["requests"] >= 32, queues           # 16 writes and 16 reads
            # completed by that iothread's thread
            assert q["thread-id"] == tids[q["iothread"]], (q, tids)
        # queue i's kick fd is watched by the epoll fd of iothread i mod 2
        if min(kick_ids) >= 0:
            pid = d.proc.pid
            watch = epoll_watch(pid)
            by_id = {}
            for fd in watch:
                try:
                    with open("/proc/%d/fdinfo/%d" % (pid, fd)) as f:
                        m = re.search(r"eventfd-id:\s+(\d+)", f.read())
                except FileNotFoundError:
                    continue
                if m:
                    by_id[int(m.group(1))] = watch[fd]
            loops = [frozenset(by_id[k]) for k in kick_ids]
            assert all(len(x) == 1 for x in loops), loops
            assert loops[0] == loops[2] and loops[1] == loops[3] and loops[0] != loops[1], loops
        out, err = p.communicate(b"x", timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    res = json.loads(tool_text(out).strip().splitlines()[-1])
    assert res == dict(res, checked=4 * 16 * 6, mismatches=0, failed=0), res
    # the data is in the image: what queue 1 wrote in round 5 ...
    assert vub_json(sock, "mqverify", 4096, 16, 1, nq=4)["mismatches"] == 0


@pytest.mark.parametrize("server,iothread,nq", [
    ("bexd", "iothread.0=io0,iothread.1=io1", 4),
    ("bexd", "iothread.0=io0,iothread.1=io1", 3),
    ("bexd", "iothread.0=io1,iothread.1=io0,iothread.2=io1", 2),
    ("bexd", "iothread=io0", 4),
    ("bexd", None, 2),
])
def test_vhost_queues_restart_under_io(daemon, image, tmpdir_short, server, iothread, nq):
    # the front-end stops every ring while its writes are in flight
    # (GET_VRING_BASE waits for them), hands the memory table over again and
    # restarts the rings: the control loop re-points rings that other loops
    # serve, and nothing is lost or completed twice
    if server == "qsd" and not IMPLS.get("qsd"):
        pytest.skip("qemu-storage-daemon not installed")
    d, sock, img = vub_daemon(daemon, image, tmpdir_short, iothread, nq=nq, impl=server)
    env = dict(os.environ, VUB_CYCLE="1")
    for bs, depth in [(4096, 16), (65536, 8)]:
        res = vub_json(sock, "mqverify", bs, depth, 12, nq=nq, env=env)
        assert res == dict(res, checked=nq * depth * 12, mismatches=0, failed=0,
                           restarts=12), res


def test_vhost_queues_front_end_gone_and_hard_del(daemon, image, tmpdir_short):
    # a front-end killed with requests in flight on every iothread, then a
    # hard block-export-del under load: the daemon drops the client cleanly
    d, sock, img = vub_daemon(daemon, image, tmpdir_short, "iothread.0=io0,iothread.1=io1")
    for rw in ("randread", "randwrite"):
        p = subprocess.Popen(vub_cmd(sock, "bench", rw, 65536, 16, 30, nq=4),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout.readline().strip() == b'{"started": true}'
        p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()
        assert vub_json(sock, "mqverify", 4096, 8, 3, nq=4)["mismatches"] == 0
    p = subprocess.Popen(vub_cmd(sock, "bench", "randwrite", 4096, 16, 30, nq=4),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b'{"started": true}'
        d.m.execute("block-export-del", id="e", mode="hard")
        d.m.wait_event("BLOCK_EXPORT_DELETED")
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()
    assert d.m.execute("query-block-exports") == []
    # both iothreads are free again, and a new export on them serves
    d.m.execute("block-export-add", type="vhost-user-blk", id="e2", node_name="d",
                writable=True, iothread=["io1", "io0"], num_queues=2,
                addr={"type": "unix", "path": sock})
    assert vub_json(sock, "mqverify", 4096, 8, 2, nq=2)["mismatches"] == 0
    d.m.execute("block-export-del", id="e2")
    d.m.wait_event("BLOCK_EXPORT_DELETED")
    d.m.execute("object-del", id="io1")


@pytest.mark.parametrize("queue", [1, 2, 3])
@pytest.mark.parametrize("kind", ["loop", "desc-oob", "avail-jump"])
def test_vhost_queues_hostile_ring(daemon, image, tmpdir_short, queue, kind):
    # a broken ring in a queue served by another iothread than the control
    # loop: that loop asks the control loop to drop the front-end
    d, sock, img = vub_daemon(daemon, image, tmpdir_short, "iothread.0=io0,iothread.1=io1")
    env = dict(os.environ, VUB_QUEUE=str(queue))
    res = vub_json(sock, "hostile", kind, nq=4, env=env)
    assert res["connected"] is False, res
    assert "dropping front-end" in d.text()
    assert vub_json(sock, "mqverify", 4096, 8, 2, nq=4)["mismatches"] == 0


@fuse_only
def test_fuse_io_uring_entries_bounded(fuse_setup, uring_param, tmpdir_short, monkeypatch):
    # the io_uring entries (a 1 MiB payload buffer each) are an export-wide
    # budget shared by every CPU's kernel queue, not 32 per CPU: with a
    # budget of 8 each of this machine's kernel queues gets 8 / ncpu (at
    # least 2), and the rings still carry the I/O
    with open("/sys/devices/system/cpu/possible") as f:
        ncpu = max(int(x.split("-")[-1]) for x in f.read().strip().split(",")) + 1
    uring_param(True)
    monkeypatch.setenv("BEXD_FUSE_URING_ENTRIES", "8")
    d, mnt, img = fuse_setup(",__org.bexd_io-uring=on")
    verify_job(mnt, tmpdir_short, jobs=2)
    d.m.execute("block-export-del", id="f")
    d.m.wait_event("BLOCK_EXPORT_DELETED")
    log = d.stop()
    depth = max(2, min(32, 8 // ncpu))
    assert "queue 0 registered %d io_uring entries" % (depth * ncpu) in log, log
    dev, uring = served(log)
    assert sum(uring) > 100 and sum(dev) <= 3, log


@fuse_only
def test_fuse_io_uring_entries_default(fuse_setup, uring_param, tmpdir_short, monkeypatch):
    with open("/sys/devices/system/cpu/possible") as f:
        ncpu = max(int(x.split("-")[-1]) for x in f.read().strip().split(",")) + 1
    uring_param(True)
    monkeypatch.delenv("BEXD_FUSE_URING_ENTRIES", raising=False)
    d, mnt, img = fuse_setup(",__org.bexd_io-uring=on")
    d.m.execute("block-export-del", id="f")
    d.m.wait_event("BLOCK_EXPORT_DELETED")
    log = d.stop()
    depth = max(2, min(32, 256 // ncpu))
    assert "queue 0 registered %d io_uring entries" % (depth * ncpu) in log, log
