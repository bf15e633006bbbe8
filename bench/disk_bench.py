#!/usr/bin/python3
"""Real-disk benchmark: bexd, qemu-storage-daemon and nbdkit on an image on
a real disk with the page cache bypassed, against the device's own limit.

Theory of operation: one image (1 GiB by default, random data written with
O_DIRECT so that every block is allocated) on a real file system
(/var/tmp, not tmpfs).  The limit row is fio's io_uring engine with
direct=1 on that file, no server in between.  Then each server serves the
same file in turn with cache.direct=on and aio=io_uring or aio=native
(nbdkit: its file plugin with cache=none), over:

  nbd    fio's nbd engine (libnbd) over a UNIX socket;
  nbdc   the same server and socket driven by bench/nbd_load_client.c, a
         client that costs about 1-3 us of CPU per request where fio's
         nbd engine costs 11-16 us: on two CPUs fio's rows measure the
         client, these rows the server (the NBD counterpart of vub-client);
  vhost  tests/vhost/vub-client driving the virtqueue directly (no guest),
         as bench/vhost-bench.sh;
  fuse   fio (libaio, direct=1) on the FUSE mount point.

Rows: 4k random read and write at qd1 and qd32, 1M sequential read and
write at qd8.  Each row records IOPS, MiB/s, the server's CPU time per
request (utime+stime of its process tree, /proc), the client's (fio or
vub-client with its children, getrusage), and its ratio to the limit row
of the same run.  With --pair-limit the limit row is measured again just
before every server row and the ratio is to that one (the device's speed
drifts within a run).  Server `bexd-ram` is the same transport to bexd
serving a copy of the image in /dev/shm (page cache, no device): its qd1
rows are the round trip the transport adds to every request, and the
summary's "limit+hop" line is the IOPS a server would have at qd1 if it
added nothing but that round trip to the limit row's device time.  With
--runs N the whole matrix is repeated and medians are printed (the machine
is shared: look at the load column).

Polling variants bexd-poll and qsd-poll (not in the default list): aio=io_uring
with the export in an iothread whose poll-max-ns is --poll-ns (200000):
the loop busy-polls up to that long before it sleeps (for its clients;
QEMU also for its AIO completions, bexd not: see src/util/aio.c).  With
--busy-client the nbdc client polls its socket without sleeping too (-b).
On this 2-vCPU guest neither helped qd1 (session 26).

FUSE variants of bexd (transport fuse only, aio=io_uring): bexd-fuse-uring
serves the FUSE transport over io_uring (__org.bexd_io-uring=on),
bexd-fuse-uring-q2 does so with two iothreads (two queues), bexd-fuse-q2
is /dev/fuse with two iothreads, bexd-ram-fuse-uring is the io_uring
transport's hop row.  For the io_uring variants the fuse module's
enable_uring parameter is set to Y while the server runs, under the lock
the functional tests hold for it (/dev/shm/bexd-test-fuse-enable-uring.lock),
and restored after; the server's log says how many requests came over
each transport, and a row whose requests did not use the ring is an error.
"""
import fcntl
import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from nbd_bench import build_light, tree_cpu_ticks  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")

# name: (label, fio rw, bs, iodepth)
WORKLOADS = {
    "rr4k1": ("4k randread qd1", "randread", 4096, 1),
    "rr4k32": ("4k randread qd32", "randread", 4096, 32),
    "rw4k1": ("4k randwrite qd1", "randwrite", 4096, 1),
    "rw4k32": ("4k randwrite qd32", "randwrite", 4096, 32),
    "sr1m8": ("1M read qd8", "read", 1 << 20, 8),
    "sw1m8": ("1M write qd8", "write", 1 << 20, 8),
}
TRANSPORTS = ["nbd", "nbdc", "vhost", "fuse"]
SERVERS = ["bexd-io_uring", "bexd-native", "qsd-io_uring", "qsd-native", "nbdkit", "bexd-ram"]
# bexd over FUSE only: name -> (FUSE over io_uring, queues, RAM-backed); not in the default list
FUSE_VARIANTS = {
    "bexd-fuse-uring": (True, 1, False),
    "bexd-fuse-uring-q2": (True, 2, False),
    "bexd-fuse-q2": (False, 2, False),
    "bexd-ram-fuse-uring": (True, 1, True),
}
# polling servers: name -> implementation (aio=io_uring, export in a polling iothread)
POLL_VARIANTS = {"bexd-poll": "bexd", "qsd-poll": "qsd"}
URING_PARAM = "/sys/module/fuse/parameters/enable_uring"
URING_LOCK = "/dev/shm/bexd-test-fuse-enable-uring.lock"   # tests/func/conftest.py uring_param
RAM_MAX = 256 << 20     # bexd-ram's copy of the image (the rows touch its first --size bytes)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def is_ram(name):
    return name.startswith("bexd-ram")


def hop_server(name):
    """The hop row (same transport, no device) that goes with a server."""
    return "bexd-ram-fuse-uring" if "fuse-uring" in name else "bexd-ram"


class UringKnob:
    """enable_uring=Y while held: the tests' lock, then the parameter,
    restored (and the lock dropped) by release()."""

    def __init__(self):
        self.lock = open(URING_LOCK, "a")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("waiting for %s (a test holds enable_uring) ..." % URING_LOCK)
            fcntl.flock(self.lock, fcntl.LOCK_EX)
        try:
            with open(URING_PARAM) as f:
                self.old = f.read().strip()
            with open(URING_PARAM, "w") as f:
                f.write("Y")
        except OSError:
            self.lock.close()
            raise

    def release(self):
        try:
            with open(URING_PARAM, "w") as f:
                f.write(self.old)
        finally:
            self.lock.close()


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


class Server:
    """One daemon serving IMG over one transport."""

    def __init__(self, name, transport, img, work, a):
        self.name, self.transport, self.img, self.work, self.a = name, transport, img, work, a
        if is_ram(name):
            self.img = a.ram_img
        self.sock = os.path.join(work, "srv.sock")
        self.pidfile = os.path.join(work, "srv.pid")
        self.mnt = os.path.join(work, "mnt")
        self.logfile = os.path.join(work, "srv.log")
        self.pid = None
        self.knob = None
        self.uring, self.queues, _ = FUSE_VARIANTS.get(name, (False, 1, False))
        self.served = None

    def argv(self):
        if self.name == "nbdkit":
            return ["nbdkit", "-U", self.sock, "-P", self.pidfile, "file", self.img,
                    "cache=none"]
        impl, aio = self.name.split("-", 1)
        if self.name in POLL_VARIANTS:
            impl, aio = POLL_VARIANTS[self.name], "io_uring"
        if self.name in FUSE_VARIANTS:
            aio = "ram" if is_ram(self.name) else "io_uring"
        exe = self.a.bexd if impl == "bexd" else "qemu-storage-daemon"
        node = "driver=file,node-name=f0,filename=%s,cache.direct=on,aio=%s" % (self.img, aio)
        if aio == "ram":
            node = "driver=file,node-name=f0,filename=%s" % self.img
        argv = [exe, "--blockdev", node]
        xo = ""
        if self.uring:
            xo += ",__org.bexd_io-uring=on"
        if self.queues > 1:
            for i in range(self.queues):
                argv += ["--object", "iothread,id=io%d" % i]
                xo += ",iothread.%d=io%d" % (i, i)
        if self.name in POLL_VARIANTS:
            argv += ["--object", "iothread,id=io0,poll-max-ns=%d" % self.a.poll_ns]
            xo += ",iothread=io0"
        if self.transport in ("nbd", "nbdc"):
            argv += ["--nbd-server", "addr.type=unix,addr.path=%s" % self.sock,
                     "--export", "type=nbd,id=e0,node-name=f0,writable=on,name=" + xo]
        elif self.transport == "vhost":
            argv += ["--export", "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
                     "addr.path=%s,writable=on,num-queues=1%s" % (self.sock, xo)]
        else:
            argv += ["--export", "type=fuse,id=e0,node-name=f0,mountpoint=%s,writable=on%s"
                     % (self.mnt, xo)]
        return argv + ["--daemonize", "--pidfile", self.pidfile]

    def supports(self):
        if self.name in FUSE_VARIANTS:
            return self.transport == "fuse"
        return self.name != "nbdkit" or self.transport in ("nbd", "nbdc")

    def start(self):
        for p in (self.sock, self.pidfile, self.logfile):
            if os.path.exists(p):
                os.unlink(p)
        if self.transport == "fuse":
            open(self.mnt, "a").close()
        env = None
        if self.name.startswith("bexd"):
            # keep bexd's log: the FUSE export says what each transport served
            env = dict(os.environ, BEXD_KEEP_STDERR="1")
        if self.uring:
            self.knob = UringKnob()
        with open(self.logfile, "w") as err:
            r = subprocess.run(self.argv(), stdout=subprocess.DEVNULL, stderr=err, env=env,
                               timeout=60)
        if r.returncode != 0:
            self.release_knob()
            raise RuntimeError("%s failed to start: %s" % (self.name, self.log_text().strip()))
        # nbdkit's parent exits right after its fork; the child writes the
        # pid file once it listens, so it may not be there yet (bexd and qsd
        # write theirs before the parent exits).
        deadline = time.monotonic() + 30
        text = ""
        while not text.isdigit():
            if time.monotonic() > deadline:
                self.release_knob()
                raise RuntimeError("%s: no pid in %s after 30 s" % (self.name, self.pidfile))
            if os.path.exists(self.pidfile):
                with open(self.pidfile) as f:
                    text = f.read().strip()
            if not text.isdigit():
                time.sleep(0.01)
        self.pid = int(text)
        if self.uring and "unavailable" in self.log_text():
            self.stop()
            raise RuntimeError("no FUSE over io_uring: " + self.log_text().strip()[-300:])

    def log_text(self):
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def release_knob(self):
        if self.knob:
            self.knob.release()
            self.knob = None

    def served_over(self):
        """(/dev/fuse, io_uring) requests from the export's last words, or None."""
        for line in self.log_text().splitlines():
            if "requests served per queue" in line:
                dev = line.split("/dev/fuse ", 1)[1].split(";", 1)[0]
                ur = line.split("io_uring ", 1)[1]
                return (sum(int(x) for x in dev.split()), sum(int(x) for x in ur.split()))
        return None

    def stop(self):
        if self.pid is None:
            return
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            fd = None
        if fd is not None:
            try:
                import select
                os.kill(self.pid, signal.SIGTERM)
                if not select.select([fd], [], [], 10)[0]:
                    os.kill(self.pid, signal.SIGKILL)
                    select.select([fd], [], [], 10)
            except ProcessLookupError:
                pass
            finally:
                os.close(fd)
        self.pid = None
        if self.transport == "fuse":
            with open("/proc/mounts") as f:
                if (" %s " % self.mnt) in f.read():
                    subprocess.run(["fusermount3", "-u", "-z", self.mnt])
        self.release_knob()
        if self.name.startswith("bexd") and self.transport == "fuse":
            self.served = self.served_over()


def client_cpu():
    """CPU seconds of our reaped children (fio's forked jobs roll up into fio)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def fio(args, runtime, out):
    argv = ["fio", "--name=b", "--time_based", "--runtime=%d" % runtime,
            "--output-format=json", "--output=" + out] + args
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=runtime + 120)
    if r.returncode != 0:
        raise RuntimeError("fio: " + r.stderr.decode().strip()[-300:])
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    io = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    return {"ops": io["total_ios"], "iops": io["iops"], "mibs": io["bw_bytes"] / 1048576.0}


def fio_common(w, size):
    _, rw, bs, qd = WORKLOADS[w]
    return ["--rw=" + rw, "--bs=%d" % bs, "--iodepth=%d" % qd, "--size=%d" % size,
            "--norandommap", "--randrepeat=0"]


def run_row(transport, srv, w, a, img, work):
    out = os.path.join(work, "fio.json")
    if transport == "limit":
        return fio(["--ioengine=io_uring", "--direct=1", "--filename=" + img]
                   + fio_common(w, a.size), a.runtime, out)
    size = min(a.size, RAM_MAX) if is_ram(srv.name) else a.size
    if transport == "nbd":
        uri = "nbd+unix:///?socket=" + srv.sock
        return fio(["--ioengine=nbd", "--uri=" + uri] + fio_common(w, size), a.runtime, out)
    if transport == "fuse":
        return fio(["--ioengine=libaio", "--direct=1", "--filename=" + srv.mnt]
                   + fio_common(w, size), a.runtime, out)
    _, rw, bs, qd = WORKLOADS[w]
    if transport == "nbdc":
        return light_client([a.nbdc, "-s", str(size)] + (["-b"] if a.busy_client else [])
                            + [srv.sock, rw, str(bs), str(qd), str(a.runtime)],
                            a.runtime, "nbd-load-client")
    # -d: wait for the requests in flight before leaving, as a front-end
    # stopping its device does (qsd 7.2 aborts on `!server->wait_idle` when
    # a front-end leaves with requests in flight); they are not counted
    argv = [a.vub, "-d"] + (["-i"] if bs > 65536 else []) + [srv.sock, "bench", rw, str(bs),
                                                             str(qd), str(a.runtime)]
    return light_client(argv, a.runtime, "vub-client")


def light_client(argv, runtime, what):
    """Run vub-client or nbd-load-client; both print one JSON line at the end."""
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=runtime + 60)
    if r.returncode != 0:
        # vub-client reports its own failures as JSON on stdout
        raise RuntimeError("%s rc %d: %s %s" % (
            what, r.returncode, r.stdout.decode(errors="replace").strip()[-300:],
            r.stderr.decode(errors="replace").strip()[-300:]))
    j = json.loads(r.stdout.decode().strip().splitlines()[-1])
    return {"ops": j["ios"], "iops": j["iops"], "mibs": j["MiBps"]}


def measure(transport, srv, w, a, img, work):
    t0 = tree_cpu_ticks(srv.pid) if srv else 0
    c0 = client_cpu()
    l0 = loadavg()
    res = run_row(transport, srv, w, a, img, work)
    t1 = tree_cpu_ticks(srv.pid) if srv else 0
    c1 = client_cpu()
    cpu = (t1 - t0) / HZ
    res["cpu_us_op"] = 1e6 * cpu / res["ops"] if srv and res["ops"] else None
    res["cli_us_op"] = 1e6 * (c1 - c0) / res["ops"] if res["ops"] else None
    res["load"] = (l0 + loadavg()) / 2
    return res


def make_image(path, size):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.close(fd)
    subprocess.run(["fio", "--name=fill", "--filename=" + path, "--rw=write", "--bs=1M",
                    "--size=%d" % size, "--ioengine=libaio", "--iodepth=8", "--direct=1",
                    "--refill_buffers", "--output=/dev/null"], check=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="disk-bench.sh", description=__doc__.split("\n")[0])
    p.add_argument("-t", "--runtime", type=int, default=5, help="seconds per row (5)")
    p.add_argument("-r", "--runs", type=int, default=1, help="repeat the matrix, print medians")
    p.add_argument("-x", "--transports", default=",".join(TRANSPORTS))
    p.add_argument("-s", "--servers", default=",".join(SERVERS))
    p.add_argument("-w", "--workloads", default=",".join(WORKLOADS))
    p.add_argument("--size", default="1G")
    p.add_argument("--dir", default="/var/tmp", help="directory on the real disk (/var/tmp)")
    p.add_argument("--bexd", default=os.environ.get("BEXD", os.path.join(ROOT, "build", "bexd")))
    p.add_argument("--vub", default=None, help="vub-client (default next to bexd)")
    p.add_argument("--json", help="also write all results here")
    p.add_argument("--poll-ns", type=int, default=200000,
                   help="poll-max-ns of bexd-poll's and qsd-poll's iothread (200000)")
    p.add_argument("--busy-client", action="store_true",
                   help="nbdc: the client polls its socket instead of sleeping (-b)")
    p.add_argument("--pair-limit", action="store_true",
                   help="measure the limit row again just before each server row")
    a = p.parse_args(argv)
    a.transports = [x for x in a.transports.split(",") if x]
    a.servers = [x for x in a.servers.split(",") if x]
    a.workloads = [x for x in a.workloads.split(",") if x]
    for x in a.transports:
        if x not in TRANSPORTS:
            p.error("unknown transport %r" % x)
    for x in a.servers:
        if x not in SERVERS and x not in FUSE_VARIANTS and x not in POLL_VARIANTS:
            p.error("unknown server %r" % x)
    for x in a.workloads:
        if x not in WORKLOADS:
            p.error("unknown workload %r" % x)
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = a.size.upper()
    a.size = int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)
    if not a.vub:
        a.vub = os.path.join(os.path.dirname(a.bexd), "tests", "vhost", "vub-client")
    return a


def hop_summary(results, a):
    """qd1: the limit row's device time plus the transport's own round trip
    (bexd-ram's qd1 latency), as IOPS; and each server's share of it, run by
    run against the limit row that run's ratio used."""
    lines = []
    for t, w, hs in [(t, w, hs) for t in a.transports for w in a.workloads
                     for hs in ("bexd-ram", "bexd-ram-fuse-uring")]:
        if WORKLOADS[w][3] != 1:
            continue
        hop = [r["iops"] for r in results.get((t, hs, w), [])]
        if not hop:
            continue
        h = statistics.median(hop)
        lims, servers = [], []
        for name in a.servers:
            rs = [r for r in results.get((t, name, w), []) if r.get("limit")]
            if is_ram(name) or hop_server(name) != hs or not rs:
                continue
            lims += [r["limit"] for r in rs]
            servers.append("%s %.0f%%" % (name, statistics.median(
                [100.0 * r["iops"] * (1.0 / r["limit"] + 1.0 / h) for r in rs])))
        if not lims:
            continue
        l = statistics.median(lims)
        lines.append("%-6s %-18s limit %7.0f  hop %7.0f (%s)  limit+hop %7.0f  %s" % (
            t, WORKLOADS[w][0], l, h, hs, 1.0 / (1.0 / l + 1.0 / h), ", ".join(servers)))
    if lines:
        print("\n-- qd1 against limit+hop = 1 / (1/limit + 1/hop), medians; "
              "% of it run by run (each row's own limit row)")
        for x in lines:
            print(x)


def fmt(v, spec):
    return "-" if v is None else spec % v


def main(argv):
    a = parse_args(argv)
    # SIGTERM: stop the server in hand and remove the image (finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = tempfile.mkdtemp(prefix="diskbench.", dir=a.dir)
    img = os.path.join(work, "disk.img")
    results = {}          # (transport, server, workload) -> [result per run]
    a.ram_img = None
    try:
        log("writing %d MiB image in %s ..." % (a.size >> 20, work))
        make_image(img, a.size)
        if "nbdc" in a.transports:
            a.nbdc = build_light(work)
        if any(is_ram(x) for x in a.servers):
            a.ram_img = tempfile.mktemp(prefix="diskbench-ram.", dir="/dev/shm")
            with open(img, "rb") as src, open(a.ram_img, "wb") as dst:
                dst.write(src.read(min(a.size, RAM_MAX)))
        print("runtime %ds per row, %d run(s), image %d MiB in %s, %d CPUs%s" % (
            a.runtime, a.runs, a.size >> 20, a.dir, os.cpu_count(),
            ", limit row before each row" if a.pair_limit else ""), flush=True)
        hdr = "%-6s %-19s %-18s %9s %8s %7s %8s %8s %5s" % (
            "xport", "server", "workload", "IOPS", "MiB/s", "%limit", "us/op", "cli_us", "load")
        row = "%-6s %-19s %-18s %9.0f %8.1f %7s %8s %8s %5.1f"

        def show(t, name, w, r):
            print(row % (t, name, WORKLOADS[w][0], r["iops"], r["mibs"], fmt(r["pct"], "%.0f"),
                         fmt(r["cpu_us_op"], "%.1f"), fmt(r["cli_us_op"], "%.1f"), r["load"]),
                  flush=True)

        def run_limit(w, limit):
            try:
                r = measure("limit", None, w, a, img, work)
            except Exception as e:  # report, go on
                print("%-6s %-19s %-18s error: %s" % ("limit", "fio", WORKLOADS[w][0], e), flush=True)
                return
            limit[w] = r["iops"]
            r["pct"] = 100.0
            results.setdefault(("limit", "fio", w), []).append(r)
            show("limit", "fio", w, r)

        for run in range(a.runs):
            print("-- run %d" % (run + 1))
            print(hdr, flush=True)
            limit = {}
            if not a.pair_limit:
                for w in a.workloads:
                    run_limit(w, limit)
            for t, name in [(t, s) for t in a.transports for s in a.servers]:
                srv = Server(name, t, img, work, a)
                if not srv.supports():
                    continue
                try:
                    srv.start()
                    for w in a.workloads:
                        if a.pair_limit and not is_ram(name):
                            run_limit(w, limit)
                        try:
                            r = measure(t, srv, w, a, img, work)
                        except Exception as e:  # report, go on
                            print("%-6s %-19s %-18s error: %s" % (t, name, WORKLOADS[w][0], e),
                                  flush=True)
                            continue
                        r["pct"] = (100.0 * r["iops"] / limit[w]
                                    if limit.get(w) and not is_ram(name) else None)
                        r["limit"] = limit.get(w)
                        results.setdefault((t, name, w), []).append(r)
                        show(t, name, w, r)
                except Exception as e:
                    print("%-6s %-19s skipped: %s" % (t, name, e), flush=True)
                finally:
                    srv.stop()
                    if srv.uring and srv.pid is None and srv.served is not None:
                        dev, ur = srv.served
                        note = "" if ur > dev else "  ERROR: the rows above did not use the ring"
                        print("%-6s %-19s requests over /dev/fuse %d, io_uring %d%s"
                              % (t, name, dev, ur, note), flush=True)
        if a.runs > 1:
            print("\n-- medians of %d runs (%%limit: median of each run's ratio)" % a.runs)
            print(hdr)
            for (t, name, w), rs in results.items():
                med = lambda k: (statistics.median([r[k] for r in rs if r.get(k) is not None])
                                 if any(r.get(k) is not None for r in rs) else None)
                print(row % (t, name, WORKLOADS[w][0], med("iops"), med("mibs"),
                             fmt(med("pct"), "%.0f"), fmt(med("cpu_us_op"), "%.1f"),
                             fmt(med("cli_us_op"), "%.1f"), med("load")))
        hop_summary(results, a)
        if a.json:
            with open(a.json, "w") as f:
                json.dump([dict(transport=t, server=s, workload=w, runs=rs)
                           for (t, s, w), rs in results.items()], f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if a.ram_img and os.path.exists(a.ram_img):
            os.unlink(a.ram_img)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
