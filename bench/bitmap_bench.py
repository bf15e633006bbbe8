#!/usr/bin/python3
"""Dirty bitmaps and backup, bexd beside qemu-storage-daemon in one run.

Rows (each daemon serves its own RAM-backed image in /dev/shm over a UNIX
socket; fio's nbd engine is the client):

  bitmaps   4 KiB random writes, queue depth 32, with no dirty bitmap and
            with two enabled ones (64 KiB and 4 KiB granularity, added
            empty) on the exported node: the cost of tracking.  Measured
            in pairs on one running daemon: --pairs pairs of short fio runs
            (--pair-time s each), none then two, two then none, ... (A B B
            A ...), each daemon's pairs interleaved with the other's; per
            pair the ratio of IOPS and of the server's CPU time per write
            (the process CPU clock over the run / the writes fio made).
            Reported: the median paired ratio with a distribution-free 95%
            confidence interval, and a verdict on "costs at most 3%":
            shown, refuted, or not resolved by this run.
  cbw       4 KiB random writes, qd 32, through a copy-before-write filter
            (blockdev-add copy-before-write over the disk, a RAM target,
            the export on the filter): every first write to a 64 KiB
            cluster copies it first.
  push      the same 10% as a push-mode incremental backup inside the
            daemon: blockdev-backup sync=incremental into a fresh qcow2
            image in /dev/shm, seconds from the command to
            BLOCK_JOB_COMPLETED (no client round trips: the daemon's own
            copy speed).
  backup    incremental backup of the image with 10% of it dirty (random
            data in random 64 KiB clusters written after a bitmap was
            added): the time from the freeze (transaction: new bitmap,
            blockdev-backup sync=none with a filter) to the copy done, the
            copy being a libnbd client that reads the dirty extents of
            qemu:dirty-bitmap:NAME from the snapshot-access export into a
            file, as a backup client does it: --depth reads in flight
            (default 16; aio_pread, runs of dirty clusters split at 1 MiB;
            --pin puts the daemon on CPU 0 and the client on CPU 1),
            each written to the copy as it completes (pull mode, as
            docs/backup.md shows).  The copy is the previous backup (the
            image before this round's writes, as large as the image).
            "Copy done" is when the client reports it (not its exit); the
            copy's dirtied clusters are then compared with the image's
            (nothing is written after the freeze, so they must match).  The client process is started, its
            buffers made, before the freeze and connects when the export
            exists; its own CPU time is reported beside the row (a client
            near its wall time would be the limit, not the server).  The
            client is bench/nbd_backup_client.c (--client c, the default),
            built here with libnbd-dev, which is installed with apt-get if
            it is missing; --client python runs the same steps in Python
            (python3-libnbd), whose own loop took as long as the server.

Configurations are interleaved (bexd, qsd, bexd, qsd ...) and repeated;
the median of the repeats is reported, with the ratio bexd/qsd.  The
machine may be shared: compare ratios of one run, not absolute figures.
"""
import argparse
import json
import math
import random
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "func"))
from conftest import QMP  # noqa: E402

MiB = 1 << 20


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Server:
    def __init__(self, impl, binary, workdir, img):
        self.impl, self.binary, self.workdir, self.img = impl, binary, workdir, img
        self.sock = os.path.join(workdir, "nbd-%s.sock" % impl)
        self.qmp_path = os.path.join(workdir, "qmp-%s.sock" % impl)
        self.pidfile = os.path.join(workdir, "pid-%s" % impl)

    def start(self, *extra, cpu=None):
        """cpu: pin the daemon (all its threads) to this CPU."""
        for p in (self.sock, self.qmp_path):
            if os.path.exists(p):
                os.unlink(p)
        argv = (["taskset", "-c", str(cpu)] if cpu is not None else []) + [self.binary,
                "--chardev", "socket,id=m,path=%s,server=on,wait=off" % self.qmp_path,
                "--monitor", "chardev=m",
                "--blockdev", "driver=file,node-name=f0,filename=%s" % self.img,
                "--blockdev", "driver=raw,node-name=disk,file=f0",
                "--nbd-server", "addr.type=unix,addr.path=%s" % self.sock] + list(extra) + [
                "--daemonize", "--pidfile", self.pidfile]
        subprocess.run(argv, check=True)
        with open(self.pidfile) as f:
            self.pid = int(f.read())
        self.qmp = QMP(self.qmp_path)
        return self

    def uri(self, name):
        return "nbd+unix:///%s?socket=%s" % (name, self.sock)

    def stop(self):
        self.qmp.close()
        try:
            os.kill(self.pid, 15)
            fd = os.pidfd_open(self.pid)
            import select
            select.select([fd], [], [], 30)
            os.close(fd)
        except ProcessLookupError:
            pass


def proc_cpu(pid):
    """CPU time of a process (all its threads, exited ones included), in
    seconds, to the nanosecond: the kernel's process CPU clock of another
    process (clock_getcpuclockid), not /proc's ticks of 10 ms, which are
    15% of a pull backup's 0.07 s."""
    return time.clock_gettime_ns((~pid << 3) | 2) / 1e9


CPU_PER_WRITE = {}      # (row, impl) -> [server CPU microseconds per write]
SERVER_BUSY = {}        # (row, impl) -> [server CPU seconds per second of the run]
CLIENT_BUSY = {}        # (row, impl) -> [fio's own CPU (usr + sys), fraction of a core]


def fio_iops(uri, runtime, size, workdir, pid=None, key=None):
    """IOPS of the run; with pid, also records the server's CPU time per
    write (less sensitive than IOPS to a loaded machine) under key."""
    cpu0 = proc_cpu(pid) if pid else 0
    t0 = time.monotonic()
    out = os.path.join(workdir, "fio.json")
    subprocess.run(["fio", "--name=b", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite",
                    "--bs=4k", "--iodepth=32", "--size=%d" % size, "--time_based",
                    "--runtime=%d" % runtime, "--ramp_time=1", "--randrepeat=0",
                    "--output-format=json", "--output=" + out], check=True,
                   stdout=subprocess.DEVNULL)
    cpu = proc_cpu(pid) - cpu0 if pid else 0
    wall = time.monotonic() - t0
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    w = job["write"]
    if pid:
        # who was the limit: a server busy well below one core while fio
        # is busy near one is a run the client (or the machine) bounded
        SERVER_BUSY.setdefault(key, []).append(cpu / wall)
        CLIENT_BUSY.setdefault(key, []).append((job["usr_cpu"] + job["sys_cpu"]) / 100)
    if pid and w["total_ios"]:
        # CPU over the whole run (ramp included) per write over the whole run
        ios = w["total_ios"] + w["iops"]         # + the 1 s ramp, at the same rate
        CPU_PER_WRITE.setdefault(key, []).append(1e6 * cpu / ios)
    return w["iops"]


def make_image(path, size):
    with open(path, "wb") as f:
        chunk = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(chunk)


def proc_user_sys(pid):
    """(user, system) CPU ticks of a process, from /proc (10 ms each)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


USER_SYS = {}           # (impl, conf) -> [user ticks, system ticks] over its runs


def fio_run(uri, runtime, size, workdir, pid, key=None):
    """One fio run of 4 KiB random writes at qd 32 (no ramp: every write
    is counted); returns (IOPS, writes, server CPU seconds over the run).
    With key, adds the run's user and system ticks to USER_SYS[key]."""
    out = os.path.join(workdir, "fio.json")
    us0 = proc_user_sys(pid)
    cpu0 = proc_cpu(pid)
    subprocess.run(["fio", "--name=b", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite",
                    "--bs=4k", "--iodepth=32", "--size=%d" % size, "--time_based",
                    "--runtime=%dms" % round(1000 * runtime), "--randrepeat=0",
                    "--output-format=json", "--output=" + out], check=True,
                   stdout=subprocess.DEVNULL)
    cpu = proc_cpu(pid) - cpu0
    if key:
        us = USER_SYS.setdefault(key, [0, 0])
        for i, v in enumerate(proc_user_sys(pid)):
            us[i] += v - us0[i]
    with open(out) as f:
        w = json.load(f)["jobs"][0]["write"]
    return w["iops"], w["total_ios"], cpu


def median_ci(xs, conf=0.95):
    """Median of xs with a distribution-free confidence interval for it:
    order statistics k and n+1-k, k the largest with P(B <= k-1) <=
    (1-conf)/2 for B ~ binomial(n, 1/2).  Returns (median, lo, hi, the
    interval's actual coverage); lo and hi are None with too few values."""
    xs = sorted(xs)
    n = len(xs)
    med = statistics.median(xs)
    k, cum = 0, 0.0
    for j in range(n + 1):
        cum += math.comb(n, j) / 2 ** n
        if cum > (1 - conf) / 2:
            break
        k = j + 1
    if k == 0:
        return med, None, None, 0.0
    below = sum(math.comb(n, j) for j in range(k)) / 2 ** n
    return med, xs[k - 1], xs[n - k], 1 - 2 * below


BITMAP_PAIRS = {}       # impl -> [{"none": (IOPS, CPU us/write), "two": (...)}]


def bitmaps_on(srv, on):
    """Two empty enabled bitmaps on the exported node, or none at all."""
    for i in range(2):
        if on:
            srv.qmp.execute("block-dirty-bitmap-add", node="disk", name="b%d" % i,
                            granularity=65536 if i == 0 else 4096)
        else:
            srv.qmp.execute("block-dirty-bitmap-remove", node="disk", name="b%d" % i)


def row_bitmap_pairs(impls, args, img):
    """The bitmaps row: paired runs on one daemon per implementation (each
    on its own copy of the image), A B B A ..., the daemons' pairs
    interleaved."""
    servers = {}
    try:
        for name, binary in impls.items():
            own = os.path.join(args.workdir, "bm-%s.img" % name)
            shutil.copyfile(img, own)
            srv = servers[name] = Server(name, binary, args.workdir, own).start()
            srv.qmp.execute("block-export-add", type="nbd", id="e", node_name="disk",
                            name="e", writable=True)
            srv.has = False
            fio_run(srv.uri("e"), 1, args.size, args.workdir, srv.pid)   # warm-up
        for i in range(args.pairs):
            order = ("none", "two") if i % 2 == 0 else ("two", "none")
            for name, srv in servers.items():
                res = {}
                for conf in order:
                    if srv.has:
                        bitmaps_on(srv, False)
                        srv.has = False
                    if conf == "two":
                        bitmaps_on(srv, True)
                        srv.has = True
                    iops, n, cpu = fio_run(srv.uri("e"), args.pair_time, args.size,
                                           args.workdir, srv.pid, (name, conf))
                    res[conf] = (iops, 1e6 * cpu / n)
                BITMAP_PAIRS.setdefault(name, []).append(res)
                log("%s pair %d: none %.0f IOPS %.2f us/write, two %.0f IOPS %.2f us/write" % (
                    name, i, res["none"][0], res["none"][1], res["two"][0], res["two"][1]))
    finally:
        for srv in servers.values():
            srv.stop()
            os.unlink(srv.img)


def bitmap_verdict(name, pairs):
    """Lines on "two enabled bitmaps cost at most 3%" for one daemon."""
    lines = []
    iops = [p["two"][0] / p["none"][0] for p in pairs]
    cpu = [p["two"][1] / p["none"][1] for p in pairs]
    for what, ratios, cost_of in (("IOPS", iops, lambda r: 1 - r),
                                  ("CPU per write", cpu, lambda r: r - 1)):
        med, lo, hi, cover = median_ci(ratios)
        if lo is None:
            lines.append("%s: %s cost %.1f%% (median of %d pairs; too few pairs for an "
                         "interval: not resolved)" % (name, what, 100 * cost_of(med), len(ratios)))
            continue
        worst, best = max(cost_of(lo), cost_of(hi)), min(cost_of(lo), cost_of(hi))
        verdict = ("at most 3%: shown" if worst < 0.03 else
                   "more than 3%: shown" if best > 0.03 else
                   "at most 3%: not resolved by this run")
        lines.append("%s: two enabled bitmaps cost %.1f%% of %s (median of %d paired ratios; "
                     "%.0f%% interval %.1f%% .. %.1f%%): %s" % (
                         name, 100 * cost_of(med), what, len(ratios), 100 * cover,
                         100 * best, 100 * worst, verdict))
    return lines


def row_cbw(srv, args):
    tmp = os.path.join(args.workdir, "cbw-target-%s.img" % srv.impl)
    with open(tmp, "wb") as f:
        f.truncate(args.size)
    srv.start("--blockdev", "driver=file,node-name=tmp,filename=%s" % tmp)
    srv.qmp.execute("blockdev-add", driver="copy-before-write", node_name="c0", file="disk",
                    target="tmp")
    srv.qmp.execute("block-export-add", type="nbd", id="e", node_name="c0", name="e",
                    writable=True)
    try:
        return fio_iops(srv.uri("e"), args.runtime, args.size, args.workdir, srv.pid,
                        ("cbw", srv.impl))
    finally:
        srv.stop()
        os.unlink(tmp)


BACKUP_CLIENT = r"""
import nbd, os, resource, sys, time
uri, ctx, out, depth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
CHUNK = 1 << 20                   # largest read: a run of dirty clusters is split
# buffers made (and their pages touched) before the start
free = [memoryview(bytearray(CHUNK)) for _ in range(depth)]
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.readline()              # the export exists: go
t0 = time.monotonic()
ru0 = resource.getrusage(resource.RUSAGE_SELF)
h = nbd.NBD()
h.add_meta_context(ctx)
h.set_opt_mode(False)
h.connect_uri(uri)
size = h.get_size()
dirty = []
off = 0
while off < size:
    def cb(meta, o, entries, err):
        global off
        if meta != ctx:
            return 0
        p = o
        for i in range(0, len(entries), 2):
            if entries[i + 1] & 1:
                dirty.append((p, entries[i]))
            p += entries[i]
        off = p
        return 0
    h.block_status(min(size - off, 1 << 30), off, cb)
reqs = []
for o, l in dirty:
    while l:
        n = min(l, CHUNK)
        reqs.append((o, n))
        o += n
        l -= n
reqs.reverse()
fd = os.open(out, os.O_WRONLY)
failed = []


def done(buf, o, n, err):
    if err.value:
        failed.append((o, err.value))
    else:
        os.pwrite(fd, buf[:n], o)
    free.append(buf)
    return 1                      # retire the command


inflight = 0
while reqs or h.aio_in_flight():
    while reqs and free:
        o, n = reqs.pop()
        buf = free.pop()
        h.aio_pread(nbd.Buffer.from_buffer(buf[:n]), o,
                    lambda err, buf=buf, o=o, n=n: done(buf, o, n, err))
    h.poll(-1)
os.close(fd)
if failed:
    sys.exit("read failed: %r" % failed[:3])
h.shutdown()
ru = resource.getrusage(resource.RUSAGE_SELF)
print(sum(l for _, l in dirty), time.monotonic() - t0,
      ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime)
"""


BACKUP_CPU = {}         # (row, impl) -> [server CPU seconds of the backup]
CLIENT_CPU = {}         # impl -> [the pull client's CPU seconds (usr + sys)]
CLIENT_WALL = {}        # impl -> [the pull client's seconds from "go" to done]
FREEZE_S = {}           # impl -> [seconds of the QMP part: freeze, node, export]
PHASES = {}             # impl -> [[connected, extents known, last read] s from the go]


def dirty_tenth(srv):
    """Write 10% of the image's 64 KiB clusters (spread out) through an
    export, with random data (a zero cluster would read back as a hole: a
    cheaper reply than real data); returns how many.  Each call of a
    server picks other clusters and data (a backup that copied nothing
    would leave its copy different from the image)."""
    nclusters = srv.size // 65536
    srv.rounds = getattr(srv, "rounds", 0) + 1
    r = random.Random(3 + srv.rounds)         # the same draws as the script's
    r.randbytes(65536)
    srv.dirtied = r.sample(range(nclusters), nclusters // 10)
    script = ("import nbd, random\nh = nbd.NBD()\nh.connect_uri(%r)\n"
              "r = random.Random(%d)\nbuf = r.randbytes(65536)\n"
              "for c in r.sample(range(%d), %d):\n    h.pwrite(buf, c * 65536)\n"
              % (srv.uri("w"), 3 + srv.rounds, nclusters, nclusters // 10))
    subprocess.run(["/usr/bin/python3", "-c", script], check=True)
    return nclusters // 10


def check_copy(copy, img, clusters, impl):
    """The pull copy must equal the image in every cluster this round
    dirtied (elsewhere the copy is the previous round's, and nothing else
    was written); a full cmp of 1 GiB took 1.6 s a round here."""
    with open(copy, "rb") as a, open(img, "rb") as b:
        for c in clusters:
            if os.pread(a.fileno(), 65536, c * 65536) != os.pread(b.fileno(), 65536, c * 65536):
                raise AssertionError("%s: the copy differs from the image at cluster %d"
                                     % (impl, c))


def row_push(srv, args):
    """Push-mode incremental backup of 10% dirty: seconds from the command
    to the job's completion."""
    tgt = os.path.join(args.workdir, "push-%s.qcow2" % srv.impl)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, str(args.size)], check=True)
    srv.size = args.size
    srv.start()
    q = srv.qmp
    q.execute("block-dirty-bitmap-add", node="disk", name="b0")
    q.execute("block-export-add", type="nbd", id="w", node_name="disk", name="w",
              writable=True)
    n = dirty_tenth(srv)
    q.execute("blockdev-add", node_name="tgt", driver="qcow2",
              file={"driver": "file", "filename": tgt})
    try:
        cpu0 = proc_cpu(srv.pid)
        t0 = time.monotonic()
        q.execute("blockdev-backup", job_id="push", device="disk", target="tgt",
                  sync="incremental", bitmap="b0")
        e = q.wait_event("BLOCK_JOB_COMPLETED")
        dt = time.monotonic() - t0
        BACKUP_CPU.setdefault(("push", srv.impl), []).append(proc_cpu(srv.pid) - cpu0)
        assert "error" not in e["data"] and e["data"]["len"] == n * 65536, e
        return dt
    finally:
        srv.stop()
        os.unlink(tgt)


def build_c_client(workdir):
    """Compile bench/nbd_backup_client.c (installing libnbd-dev first if
    its header is missing); returns the binary's path."""
    if not os.path.exists("/usr/include/libnbd.h"):
        log("libnbd-dev is missing: installing it with apt-get (bench only)")
        subprocess.run(["apt-get", "install", "-y", "-q", "libnbd-dev"], check=True,
                       stdout=subprocess.DEVNULL,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    exe = os.path.join(workdir, "nbd-backup-client")
    subprocess.run(["cc", "-O2", "-Wall", "-o", exe, os.path.join(HERE, "nbd_backup_client.c"),
                    "-lnbd"], check=True)
    return exe


def row_backup(srv, args):
    """Pull-mode incremental backup of 10% dirty: seconds from freeze to copy done."""
    tmp = os.path.join(args.workdir, "fleece-%s.img" % srv.impl)
    # the previous backup: the image before this round's writes (made
    # once, then kept up to date by each round's backup)
    copy = os.path.join(args.workdir, "copy-%s.img" % srv.impl)
    with open(tmp, "wb") as f:
        f.truncate(args.size)
    if not os.path.exists(copy):
        shutil.copyfile(srv.img, copy)
    srv.start("--blockdev", "driver=file,node-name=tmp,filename=%s" % tmp,
              cpu=0 if args.pin else None)
    q = srv.qmp
    q.execute("block-dirty-bitmap-add", node="disk", name="b0")
    q.execute("block-export-add", type="nbd", id="w", node_name="disk", name="w",
              writable=True)
    srv.size = args.size
    nclusters = dirty_tenth(srv) * 10
    # the client is started (interpreter, libnbd loaded) before the freeze
    # and connects when told: its start-up is not the server's time
    argv = [args.c_client] if args.c_client else ["/usr/bin/python3", "-c", BACKUP_CLIENT]
    if args.pin:
        argv = ["taskset", "-c", "1"] + argv
    client = subprocess.Popen(argv + [srv.uri("s"), "qemu:dirty-bitmap:b0", copy,
                                      str(args.depth)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline() == "ready\n"
        cpu0 = proc_cpu(srv.pid)
        t0 = time.monotonic()
        q.execute("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "b1"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "b0"}},
            {"type": "blockdev-backup", "data": {"job-id": "fleece", "device": "disk",
                                                 "target": "tmp", "sync": "none",
                                                 "filter-node-name": "cbw0"}}])
        q.execute("blockdev-add", driver="snapshot-access", node_name="snap", file="cbw0")
        q.execute("block-export-add", type="nbd", id="s", node_name="snap", name="s",
                  bitmaps=[{"node": "disk", "name": "b0"}])
        FREEZE_S.setdefault(srv.impl, []).append(time.monotonic() - t0)
        client.stdin.write("go\n")
        client.stdin.flush()
        out = client.stdout.readline()      # the copy is done
        dt = time.monotonic() - t0
        BACKUP_CPU.setdefault(("backup", srv.impl), []).append(proc_cpu(srv.pid) - cpu0)
        assert client.wait() == 0, client.returncode
        fields = out.split()
        copied, client_s, client_cpu = fields[:3]
        CLIENT_WALL.setdefault(srv.impl, []).append(float(client_s))
        CLIENT_CPU.setdefault(srv.impl, []).append(float(client_cpu))
        if len(fields) >= 6:                # the C client's phases, from its go
            PHASES.setdefault(srv.impl, []).append([float(x) for x in fields[3:6]])
        assert int(copied) == nclusters // 10 * 65536, out
        if args.verify:
            check_copy(copy, srv.img, srv.dirtied, srv.impl)
        return dt
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        srv.stop()
        os.unlink(tmp)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-t", "--runtime", type=int, default=6, help="seconds per fio row")
    p.add_argument("-r", "--repeat", type=int, default=3, help="repeats of each row")
    p.add_argument("--size", type=int, default=1024, help="image size in MiB (1024)")
    p.add_argument("-w", "--rows", default="bitmaps,cbw,push,backup")
    p.add_argument("-d", "--depth", type=int, default=16,
                   help="reads the pull client keeps in flight (16)")
    p.add_argument("--client", choices=("c", "python"), default="c",
                   help="the pull client: bench/nbd_backup_client.c (default) or Python")
    p.add_argument("--pin", action="store_true",
                   help="pull row: the daemon on CPU 0, the client on CPU 1 (the same for "
                   "both daemons; without it the scheduler may put both on one CPU)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not compare each pull backup's copy with the image")
    p.add_argument("--pairs", type=int, default=12,
                   help="bitmaps row: pairs of runs per daemon (12)")
    p.add_argument("--pair-time", type=float, default=2,
                   help="bitmaps row: seconds per fio run of a pair (2)")
    p.add_argument("--impls", default="bexd,qsd", help="daemons to run (bexd,qsd)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.size *= MiB
    bexd = os.environ.get("BEXD", os.path.join(ROOT, "build", "bexd"))
    impls = {"bexd": bexd, "qsd": shutil.which("qemu-storage-daemon")}
    impls = {k: v for k, v in impls.items() if v and k in args.impls.split(",")}
    args.workdir = tempfile.mkdtemp(prefix="bmbench", dir="/dev/shm")
    results = {}
    try:
        args.c_client = None
        if "backup" in args.rows.split(",") and args.client == "c":
            args.c_client = build_c_client(args.workdir)
        img = os.path.join(args.workdir, "disk.img")
        make_image(img, args.size)
        servers = {k: Server(k, v, args.workdir, img) for k, v in impls.items()}
        rows = args.rows.split(",")
        if "bitmaps" in rows:
            row_bitmap_pairs(impls, args, img)
            for name, pairs in BITMAP_PAIRS.items():
                for n, conf in ((0, "none"), (2, "two")):
                    results.setdefault("bitmaps%d" % n, {})[name] = [p[conf][0] for p in pairs]
                    CPU_PER_WRITE[("bitmaps%d" % n, name)] = [p[conf][1] for p in pairs]
        for rep in range(args.repeat):
            for name, srv in servers.items():
                if "cbw" in rows:
                    v = row_cbw(srv, args)
                    results.setdefault("cbw", {}).setdefault(name, []).append(v)
                    log("%s cbw: %.0f IOPS" % (name, v))
                if "push" in rows:
                    v = row_push(srv, args)
                    results.setdefault("push", {}).setdefault(name, []).append(v)
                    log("%s push: %.2f s" % (name, v))
                if "backup" in rows:
                    v = row_backup(srv, args)
                    results.setdefault("backup", {}).setdefault(name, []).append(v)
                    log("%s backup: %.2f s" % (name, v))
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    med = {r: {s: statistics.median(v) for s, v in d.items()} for r, d in results.items()}
    print("%-28s %12s %12s %8s" % ("row", "bexd", "qsd", "ratio"))
    for r, label, unit in (("bitmaps0", "4k randwrite, no bitmap", "IOPS"),
                           ("bitmaps2", "4k randwrite, 2 bitmaps", "IOPS"),
                           ("cbw", "4k randwrite through cbw", "IOPS"),
                           ("push", "push incr. 10% (s)", "s"),
                           ("backup", "incr. backup 10% (s)", "s")):
        if r not in med:
            continue
        b, q = med[r].get("bexd"), med[r].get("qsd")
        ratio = (q / b if unit == "s" else b / q) if b and q else float("nan")
        print("%-28s %12.2f %12.2f %8.2f" % (label, b or 0, q or 0, ratio))
    cpu = {k: statistics.median(v) for k, v in CPU_PER_WRITE.items()}
    if cpu:
        print("server CPU per write (us, median):")
        for r in ("bitmaps0", "bitmaps2", "cbw"):
            if (r, "bexd") in cpu or (r, "qsd") in cpu:
                print("  %-10s bexd %7.1f   qsd %7.1f" % (r, cpu.get((r, "bexd"), 0),
                                                        cpu.get((r, "qsd"), 0)))
    if BACKUP_CPU:
        print("server CPU seconds per backup (median):")
        for r in ("push", "backup"):
            if (r, "bexd") in BACKUP_CPU or (r, "qsd") in BACKUP_CPU:
                print("  %-10s bexd %7.2f   qsd %7.2f" % (
                    r, statistics.median(BACKUP_CPU.get((r, "bexd"), [0])),
                    statistics.median(BACKUP_CPU.get((r, "qsd"), [0]))))
    if CLIENT_CPU:
        print("pull (%s client, depth %d%s), median: QMP s (freeze, node, export); client CPU s / "
              "wall s from connect to done" % (args.client, args.depth,
                                              ", daemon on CPU 0, client on CPU 1" if args.pin else ""))
        for impl in ("bexd", "qsd"):
            if impl in CLIENT_CPU:
                print("  %-10s %.2f; %.2f / %.2f" % (impl, statistics.median(FREEZE_S[impl]),
                                                   statistics.median(CLIENT_CPU[impl]),
                                                   statistics.median(CLIENT_WALL[impl])))
    if SERVER_BUSY:
        print("busy, fraction of one core (median): server / fio client")
        for r in ("bitmaps0", "bitmaps2", "cbw"):
            line = []
            for impl in ("bexd", "qsd"):
                if (r, impl) in SERVER_BUSY:
                    line.append("%s %.2f / %.2f" % (
                        impl, statistics.median(SERVER_BUSY[(r, impl)]),
                        statistics.median(CLIENT_BUSY[(r, impl)])))
            if line:
                print("  %-10s %s" % (r, "   ".join(line)))
    for name, pairs in BITMAP_PAIRS.items():
        for line in bitmap_verdict(name, pairs):
            print(line)
        print("%s: user share of the server's CPU time, no bitmap / two: %s" % (name, " / ".join(
            "%.1f%%" % (100 * USER_SYS[(name, c)][0] / max(1, sum(USER_SYS[(name, c)])))
            for c in ("none", "two"))))
    if PHASES:
        print("pull, seconds from the client's go (median): connected, dirty extents "
              "known, last read done")
        for impl in ("bexd", "qsd"):
            if impl in PHASES:
                print("  %-10s %s" % (impl, " ".join(
                    "%.3f" % statistics.median(ph[i] for ph in PHASES[impl]) for i in range(3))))
    if "backup" in results and len(results["backup"]) == 2:
        b, q = results["backup"]["bexd"], results["backup"]["qsd"]
        med_r, lo, hi, cover = median_ci([y / x for x, y in zip(b, q)])
        print("pull, qsd/bexd by repeat (each pair run back to back): median %.2fx, "
              "range %.2f-%.2fx%s" % (
                  med_r, min(y / x for x, y in zip(b, q)), max(y / x for x, y in zip(b, q)),
                  ", %.0f%% interval of the median %.2f-%.2fx" % (100 * cover, lo, hi)
                  if lo is not None else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": results, "median": med,
                       "cpu_us_per_write": {"%s/%s" % k: v for k, v in CPU_PER_WRITE.items()},
                       "server_busy": {"%s/%s" % k: v for k, v in SERVER_BUSY.items()},
                       "client_busy": {"%s/%s" % k: v for k, v in CLIENT_BUSY.items()},
                       "backup_cpu_s": {"%s/%s" % k: v for k, v in BACKUP_CPU.items()},
                       "pull_qmp_s": FREEZE_S, "pull_client_cpu_s": CLIENT_CPU, "pull_client_wall_s": CLIENT_WALL,
                       "pull_depth": args.depth, "pull_client": args.client,
                       "pull_phases_s": PHASES, "pull_pinned": args.pin,
                       "bitmap_pairs": BITMAP_PAIRS, "pair_time_s": args.pair_time,
                       "bitmap_user_sys_ticks": {"%s/%s" % k: v for k, v in USER_SYS.items()}},
                      f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
