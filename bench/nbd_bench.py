#!/usr/bin/python3
"""Side-by-side NBD server benchmark: bexd against its peers, one run.

Theory of operation: one RAM-backed image in /dev/shm (filled with random
data once, so reads move real bytes) is served in turn by each server over a
UNIX socket.  For every (server, workload) row a client runs against it
(fio's nbd engine, which is libnbd, or nbdcopy to null:; with --client
light, bench/nbd_load_client.c in place of fio), and we record:

  IOPS, MiB/s, p99 completion latency (fio's clat percentiles), and the
  server's CPU time per operation: utime+stime of the server's whole process
  tree (threads included; forked children too, counting zombies and reaped
  children through cutime/cstime), sampled before and after the row.

The client shares the machine's cores with the server, so throughput is
often client-bound on a small box; CPU per op is then the fairer measure of
server efficiency.  --client light swaps fio for a client that costs about
1-3 us of CPU per 4k request against fio's 11-16 us, so that a row
measures the server and not the client (p99 is then not measured).  The summary gives bexd's ratio to the best peer on each
row: IOPS ratio (>1 is better) and CPU/op ratio (<1 is better).

Every server is started so that it is listening before we go on: bexd and
qemu-storage-daemon with --daemonize, qemu-nbd with --fork, nbdkit (which
forks once listening) with -P; only nbd-server needs its socket polled.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HZ = os.sysconf("SC_CLK_TCK")
ALL_SERVERS = ["bexd", "qsd", "qemu-nbd", "nbdkit", "nbd-server"]
# bexd variants, run only when asked for (-s): the export on one iothread
# (bexd-io1), on an `iothread` list of two (bexd-io2: iothread.0=io0,
# iothread.1=io1), or on one iothread that never busy-polls (bexd-io1-nopoll:
# poll-max-ns=0; the default polls up to 32 us before it sleeps)
VARIANTS = ["bexd-io1", "bexd-io2", "bexd-io1-nopoll"]
VARIANT_ARGS = {
    "bexd-io1": (["iothread,id=io0"], ",iothread=io0"),
    "bexd-io2": (["iothread,id=io0", "iothread,id=io1"], ",iothread.0=io0,iothread.1=io1"),
    "bexd-io1-nopoll": (["iothread,id=io0,poll-max-ns=0"], ",iothread=io0"),
}

# name: (label, kind, fio rw, bs, iodepth, numjobs)
WORKLOADS = {
    "randread-4k-qd1": ("4k randread qd1", "fio", "randread", "4k", 1, 1),
    "randread-4k-qd32": ("4k randread qd32", "fio", "randread", "4k", 32, 1),
    "randwrite-4k-qd32": ("4k randwrite qd32", "fio", "randwrite", "4k", 32, 1),
    "read-1m-qd8": ("1M read qd8", "fio", "read", "1M", 8, 1),
    "write-1m-qd8": ("1M write qd8", "fio", "write", "1M", 8, 1),
    "randread-4k-2conn": ("4k randread 2conn qd16", "fio", "randread", "4k", 16, 2),
    "nbdcopy": ("nbdcopy image -> null:", "nbdcopy", None, "256k", 64, 4),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# -- CPU accounting --------------------------------------------------------------

def _stat(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # fields[0] is state (field 3); utime..cstime are fields 14..17
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def tree_cpu_ticks(root):
    """utime+stime+cutime+cstime summed over `root` and its descendants."""
    parent = {}
    ticks = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = _stat(int(d))
            if s:
                parent[int(d)], ticks[int(d)] = s
    total = 0
    for pid in ticks:
        p = pid
        while p and p != root:
            p = parent.get(p)
        if p == root:
            total += ticks[pid]
    return total


# -- servers -----------------------------------------------------------------------

class Server:
    def __init__(self, name, workdir, img, bexd, node_opts, bexd_b=None):
        self.name = name
        # "<bexd or variant>-b": the same set-up with the --bexd-b binary (A/B)
        self.kind = name[:-2] if name.endswith("-b") and is_bexd(name) else name
        if self.kind != name:
            bexd = bexd_b
        self.dir = workdir
        self.img = img
        self.sock = os.path.join(workdir, "%s.sock" % name)
        self.pidfile = os.path.join(workdir, "%s.pid" % name)
        self.bexd = bexd
        self.node_opts = node_opts
        self.export = "disk" if name == "nbd-server" else ""
        self.pid = None

    @property
    def uri(self):
        return "nbd+unix:///%s?socket=%s" % (self.export, self.sock)

    def argv(self):
        blockdev = "driver=file,node-name=f0,filename=%s%s" % (self.img, self.node_opts)
        export = "type=nbd,id=e0,node-name=f0,writable=on,name="
        objects, export_opts = VARIANT_ARGS.get(self.kind, ([], ""))
        export += export_opts
        qsd_like = ["--blockdev", blockdev,
                    "--nbd-server", "addr.type=unix,addr.path=%s" % self.sock,
                    "--export", export,
                    "--daemonize", "--pidfile", self.pidfile]
        if self.kind == "bexd":
            return [self.bexd] + qsd_like
        if self.kind in VARIANT_ARGS:
            return [self.bexd] + [x for o in objects for x in ("--object", o)] + qsd_like
        if self.name == "qsd":
            return ["qemu-storage-daemon"] + qsd_like
        if self.name == "qemu-nbd":
            return ["qemu-nbd", "-f", "raw", "-t", "-e", "16", "-k", self.sock, "-x", "",
                    "--fork", "--pid-file", self.pidfile, self.img]
        if self.name == "nbdkit":
            return ["nbdkit", "-U", self.sock, "-P", self.pidfile, "file", self.img]
        if self.name == "nbd-server":
            conf = os.path.join(self.dir, "nbd-server.conf")
            with open(conf, "w") as f:
                f.write("[generic]\nuser = root\ngroup = root\nunixsock = %s\n"
                        "allowlist = true\n[disk]\nexportname = %s\n" % (self.sock, self.img))
            return ["nbd-server", "-C", conf, "-p", self.pidfile]
        raise ValueError(self.name)

    def available(self):
        exe = self.argv()[0]
        return os.access(exe, os.X_OK) if "/" in exe else shutil.which(exe) is not None

    def start(self):
        for p in (self.sock, self.pidfile):
            if os.path.exists(p):
                os.unlink(p)
        r = subprocess.run(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           timeout=60)
        if r.returncode != 0:
            raise RuntimeError("%s failed to start: %s" % (self.name, r.stderr.decode().strip()))
        # nbd-server writes its pidfile and socket after it returns; the others
        # are listening by the time their launcher exits
        deadline = time.monotonic() + 10
        while not (os.path.exists(self.pidfile) and os.path.exists(self.sock)):
            if time.monotonic() > deadline:
                raise RuntimeError("%s did not come up" % self.name)
            time.sleep(0.05)
        with open(self.pidfile) as f:
            self.pid = int(f.read().strip())

    def stop(self):
        if self.pid is None:
            return
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.pid = None
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
            import select
            if not select.select([fd], [], [], 10)[0]:
                os.kill(self.pid, signal.SIGKILL)
                select.select([fd], [], [], 10)
        except ProcessLookupError:
            pass
        finally:
            os.close(fd)
        self.pid = None


# -- clients -----------------------------------------------------------------------

def run_fio(srv, w, runtime, size, workdir):
    _, _, rw, bs, qd, jobs = w
    out = os.path.join(workdir, "fio.json")
    argv = ["fio", "--name=bench", "--ioengine=nbd", "--uri=" + srv.uri,
            "--rw=" + rw, "--bs=" + bs, "--iodepth=%d" % qd, "--numjobs=%d" % jobs,
            "--group_reporting", "--time_based", "--runtime=%d" % runtime,
            "--size=%d" % size, "--output-format=json", "--output=" + out]
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=runtime + 120)
    if r.returncode != 0:
        raise RuntimeError("fio: " + r.stderr.decode().strip()[-300:])
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    io = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    pct = io["clat_ns"].get("percentile", {})
    p99 = pct.get("99.000000", 0) / 1000.0
    seconds = job["job_runtime"] / 1000.0 / max(jobs, 1) if job.get("job_runtime") else runtime
    # fio's own CPU (usr+sys, % of one core per job): with the server and
    # the client on the same cores, a client near 100% bounds the row
    return {"ops": io["total_ios"], "bytes": io["io_bytes"], "seconds": seconds,
            "iops": io["iops"], "mibs": io["bw_bytes"] / 1048576.0, "p99_us": p99,
            "client_pct": job["usr_cpu"] + job["sys_cpu"]}


def build_light(workdir):
    """Compile bench/nbd_load_client.c into WORKDIR once (libc only); also
    disk_bench.py's nbdc client."""
    exe = os.path.join(workdir, "nbd-load-client")
    if not os.path.exists(exe):
        subprocess.run(["cc", "-O2", "-Wall", "-o", exe, os.path.join(HERE, "nbd_load_client.c")],
                       check=True)
    return exe


def run_light(srv, w, runtime, size, workdir):
    """bench/nbd_load_client.c, one process (one connection) per job."""
    _, _, rw, bs, qd, jobs = w
    mult = {"k": 1 << 10, "M": 1 << 20}
    nbs = int(bs[:-1]) * mult[bs[-1]]
    argv = [build_light(workdir), "-e", srv.export, "-s", str(size), srv.sock, rw, str(nbs),
            str(qd), str(runtime)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(jobs)]
    outs = []
    for pr in procs:
        out, err = pr.communicate(timeout=runtime + 120)
        if pr.returncode != 0:
            raise RuntimeError("nbd-load-client: " + err.decode().strip()[-300:])
        outs.append(json.loads(out.decode().strip().splitlines()[-1]))
    seconds = max(o["secs"] for o in outs)
    return {"ops": sum(o["ios"] for o in outs), "bytes": sum(o["ios"] for o in outs) * nbs,
            "seconds": seconds, "iops": sum(o["iops"] for o in outs),
            "mibs": sum(o["MiBps"] for o in outs), "p99_us": None,
            "client_pct": 100.0 * sum(o["cpu"] for o in outs) / seconds / jobs}


def run_nbdcopy(srv, w, runtime, size, workdir):
    _, _, _, bs, reqs, conns = w
    req = 256 << 10
    argv = ["nbdcopy", "--request-size=%d" % req, "--requests=%d" % reqs,
            "--connections=%d" % conns, srv.uri, "null:"]
    t0 = time.monotonic()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=600)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError("nbdcopy: " + r.stderr.decode().strip()[-300:])
    ops = size // req
    return {"ops": ops, "bytes": size, "seconds": dt, "iops": ops / dt,
            "mibs": size / 1048576.0 / dt, "p99_us": None}


def measure(srv, wname, runtime, size, workdir, client="fio"):
    w = WORKLOADS[wname]
    t0 = tree_cpu_ticks(srv.pid)
    run = run_nbdcopy if w[1] != "fio" else run_light if client == "light" else run_fio
    res = run(srv, w, runtime, size, workdir)
    # let a forking server (nbd-server) reap its per-connection children
    time.sleep(0.2)
    t1 = tree_cpu_ticks(srv.pid)
    cpu_s = (t1 - t0) / HZ
    res["cpu_s"] = cpu_s
    res["cpu_pct"] = 100.0 * cpu_s / res["seconds"] if res["seconds"] else 0
    res["cpu_us_op"] = 1e6 * cpu_s / res["ops"] if res["ops"] else None
    return res


# -- output -------------------------------------------------------------------------

def fmt(v, spec):
    return "-" if v is None else spec % v


def print_row(server, wname, r, run=None):
    tag = server if run is None else "%s #%d" % (server, run + 1)
    if "error" in r:
        print("%-18s %-24s  error: %s" % (tag, WORKLOADS[wname][0], r["error"]), flush=True)
        return
    print("%-18s %-24s %10s %9s %9s %7s %10s %7s %5s" % (
        tag, WORKLOADS[wname][0], fmt(r["iops"], "%.0f"), fmt(r["mibs"], "%.1f"),
        fmt(r["p99_us"], "%.1f"), fmt(r["cpu_pct"], "%.0f"), fmt(r["cpu_us_op"], "%.2f"),
        fmt(r.get("client_pct"), "%.0f"), fmt(r.get("load"), "%.1f")), flush=True)


def is_bexd(name):
    return name == "bexd" or name.startswith("bexd-")


def ratios(results, name, peers, w, run):
    """(IOPS ratio to the fastest peer, CPU/op ratio to the most frugal
    peer, fastest, most frugal) of server `name` in one run, or None."""
    b = results.get((name, w), [])
    b = b[run] if run < len(b) else None
    ok = []
    for s in peers:
        rs = results.get((s, w), [])
        if run < len(rs) and "error" not in rs[run]:
            ok.append((s, rs[run]))
    if not b or "error" in b or not ok:
        return None
    best_iops = max(ok, key=lambda x: x[1]["iops"])
    cpu_ok = [x for x in ok if x[1]["cpu_us_op"]]
    best_cpu = min(cpu_ok, key=lambda x: x[1]["cpu_us_op"]) if cpu_ok else None
    iops_ratio = b["iops"] / best_iops[1]["iops"] if best_iops[1]["iops"] else None
    cpu_ratio = (b["cpu_us_op"] / best_cpu[1]["cpu_us_op"]
                 if best_cpu and b["cpu_us_op"] is not None else None)
    return iops_ratio, cpu_ratio, best_iops[0], best_cpu[0] if best_cpu else "-"


def med_range(vals, spec):
    vals = sorted(v for v in vals if v is not None)
    if not vals:
        return "-"
    if len(vals) == 1:
        return spec % vals[0]
    return (spec + " [" + spec + ".." + spec + "]") % (statistics.median(vals), vals[0], vals[-1])


def summary(results, servers, workloads, runs):
    if runs > 1:
        print("\nmedians of %d runs [min..max]" % runs)
        print("%-16s %-24s %26s %26s" % ("server", "workload", "IOPS", "cpu_us/op"))
        for name in servers:
            for w in workloads:
                rs = [r for r in results.get((name, w), []) if "error" not in r]
                if rs:
                    print("%-16s %-24s %26s %26s" % (
                        name, WORKLOADS[w][0], med_range([r["iops"] for r in rs], "%.0f"),
                        med_range([r["cpu_us_op"] for r in rs], "%.2f")))
    peers = [s for s in servers if not is_bexd(s)]
    for name in [s for s in servers if is_bexd(s)]:
        if not peers:
            break
        print("\n%s vs best peer, per run (IOPS ratio >1 is better; CPU/op ratio <1 is better)"
              % name)
        print("%-24s %5s %12s %10s %12s %10s" % ("workload", "run", "IOPS ratio", "best",
                                                 "CPU/op ratio", "best"))
        for w in workloads:
            got = []
            for run in range(runs):
                r = ratios(results, name, peers, w, run)
                if r is None:
                    print("%-24s %5d %12s" % (WORKLOADS[w][0], run + 1, "n/a"))
                    continue
                got.append(r)
                print("%-24s %5d %12s %10s %12s %10s" % (
                    WORKLOADS[w][0], run + 1, fmt(r[0], "%.2f"), r[2], fmt(r[1], "%.2f"), r[3]))
            if runs > 1 and got:
                print("%-24s %5s %12s %10s %12s" % (
                    WORKLOADS[w][0], "min", fmt(min(g[0] for g in got if g[0] is not None), "%.2f"),
                    "", fmt(max((g[1] for g in got if g[1] is not None), default=None), "%.2f")
                    + " (max)"))


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="nbd-bench.sh",
        description="Benchmark bexd side by side with qemu-storage-daemon, qemu-nbd, "
                    "nbdkit and nbd-server on one RAM-backed image.")
    p.add_argument("-t", "--runtime", type=int, default=8, help="seconds per fio row (8)")
    p.add_argument("-s", "--servers", default=",".join(ALL_SERVERS),
                   help="comma-separated subset of: " + ",".join(ALL_SERVERS + VARIANTS))
    p.add_argument("-r", "--runs", type=int, default=1,
                   help="repeat every row N times, servers interleaved (each run starts "
                        "every server in turn); medians, ranges and per-run ratios")
    p.add_argument("-w", "--workloads", default=",".join(WORKLOADS),
                   help="comma-separated subset of: " + ",".join(WORKLOADS))
    p.add_argument("--size", default="1G", help="image size (1G); suffix K/M/G")
    p.add_argument("--shm", default="/dev/shm", help="RAM-backed directory for the image")
    p.add_argument("--bexd", default=os.environ.get("BEXD", os.path.join(ROOT, "build", "bexd")),
                   help="bexd binary ($BEXD or build/bexd)")
    p.add_argument("--bexd-b", help="a second bexd binary, for an A/B: a server named like "
                        "a bexd one plus '-b' (bexd-b, bexd-io1-b, ...) runs this binary")
    p.add_argument("--node-opts", default="",
                   help="extra ,key=value for the file node of bexd and qsd (same for both)")
    p.add_argument("--tls", default="off", choices=["off", "psk", "x509"],
                   help="TLS mode (placeholder: only 'off' is implemented)")
    p.add_argument("--client", default="fio", choices=["fio", "light"],
                   help="client of the fio rows: fio's nbd engine (libnbd), or "
                        "bench/nbd_load_client.c, which costs the CPU a tenth as much")
    p.add_argument("--json", help="also write all results to this JSON file")
    a = p.parse_args(argv)
    a.servers = [s for s in a.servers.split(",") if s]
    a.workloads = [w for w in a.workloads.split(",") if w]
    for s in a.servers:
        base = s[:-2] if s.endswith("-b") else s
        if s not in ALL_SERVERS + VARIANTS and not (base != s and is_bexd(base) and
                                                   base in ["bexd"] + VARIANTS):
            p.error("unknown server %r" % s)
        if base != s and not a.bexd_b:
            p.error("server %r needs --bexd-b" % s)
    for w in a.workloads:
        if w not in WORKLOADS:
            p.error("unknown workload %r" % w)
    if a.tls != "off":
        p.error("--tls=%s is not implemented yet (placeholder for TLS runs)" % a.tls)
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = a.size.upper()
    a.size = int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)
    if a.node_opts and not a.node_opts.startswith(","):
        a.node_opts = "," + a.node_opts
    return a


def make_image(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n


def main(argv):
    a = parse_args(argv)
    work = tempfile.mkdtemp(prefix="nbdbench.", dir=a.shm)
    img = os.path.join(work, "disk.img")
    results = {}
    try:
        log("filling %d MiB image in %s ..." % (a.size >> 20, work))
        make_image(img, a.size)
        print("runtime %ds per fio row, image %d MiB in %s, %d CPUs, client %s" % (
            a.runtime, a.size >> 20, a.shm, os.cpu_count(),
            "fio's nbd engine" if a.client == "fio" else "bench/nbd_load_client.c"))
        print("%-18s %-24s %10s %9s %9s %7s %10s %7s %5s" % (
            "server", "workload", "IOPS", "MiB/s", "p99_us", "srvCPU%", "cpu_us/op", "cliCPU%",
            "load"))
        for run in range(a.runs):
            for name in a.servers:
                srv = Server(name, work, img, a.bexd,
                             a.node_opts if is_bexd(name) or name == "qsd" else "", a.bexd_b)
                if not srv.available():
                    print("%-11s skipped: %s not found" % (name, srv.argv()[0]), flush=True)
                    continue
                try:
                    srv.start()
                except Exception as e:  # report and go on with the other servers
                    print("%-11s skipped: %s" % (name, e), flush=True)
                    srv.stop()
                    continue
                try:
                    for w in a.workloads:
                        l0 = os.getloadavg()[0]
                        try:
                            r = measure(srv, w, a.runtime, a.size, work, a.client)
                            r["load"] = (l0 + os.getloadavg()[0]) / 2
                        except Exception as e:
                            r = {"error": str(e)}
                        results.setdefault((name, w), []).append(r)
                        print_row(name, w, r, run if a.runs > 1 else None)
                finally:
                    srv.stop()
        summary(results, [s for s in a.servers if any(k[0] == s for k in results)],
                a.workloads, a.runs)
        if a.json:
            with open(a.json, "w") as f:
                json.dump([dict(server=s, workload=w, run=i, **r)
                           for (s, w), rs in results.items() for i, r in enumerate(rs)],
                          f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
