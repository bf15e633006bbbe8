"""qcow2 rows: bexd beside qemu-storage-daemon and qemu-nbd -f qcow2, one run.

Rows (each server in turn on the same kind of image, fio's nbd engine over
a UNIX socket):
  read-4k-qd32       4 KiB random reads, queue depth 32, fully allocated
                     qcow2 (bexd's raw figure on the same data in the same run)
  alloc-write-4k     4 KiB random writes at queue depth 32 on an empty image
                     of --alloc-size (64 GiB: writes land in clusters never
                     used before, so every write allocates: the hard path);
                     server CPU per request from /proc
  alloc-write-1m     1 MiB sequential writes at queue depth 8 on an empty
                     image of --alloc-size
  chain1 / chain10   4 KiB random reads at queue depth 32 through a backing
                     chain of 1 and 10 images (data in the bottom one)
The read rows' images are made once and read in every repeat; each
allocating-write row gets a fresh empty image.  Images live in /dev/shm,
or with --direct in /var/tmp with cache.direct=on (aio=io_uring).
--repeat N runs every row N times, servers interleaved, and prints the
median of each (and the load average before the run).  --read-jobs N
splits the read row's queue depth of 32 over N fio jobs (N connections):
with one job fio itself can be the bound, which the "fio us/req" column
(fio's own CPU per request) shows.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEXD = os.environ.get("BEXD", os.path.join(ROOT, "build", "bexd"))
HZ = os.sysconf("SC_CLK_TCK")


def sh(*args, **kw):
    return subprocess.run(list(args), check=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, **kw).stdout.decode()


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


class Server:
    def __init__(self, kind, img, d, fmt="qcow2", direct=False):
        self.sock = os.path.join(d, "s.sock")
        self.pidfile = os.path.join(d, "pid")
        for p in (self.sock, self.pidfile):
            if os.path.exists(p):
                os.unlink(p)
        node = ",cache.direct=on,aio=io_uring" if direct else ""
        if kind == "qemu-nbd":
            args = ["qemu-nbd", "-f", fmt, "-t", "-e", "16", "-k", self.sock, "-x", "",
                    "--fork", "--pid-file", self.pidfile]
            if direct:
                args += ["--cache=none", "--aio=io_uring"]
            sh(*(args + [img]))
        else:
            binary = BEXD if kind == "bexd" else "qemu-storage-daemon"
            args = [binary, "--blockdev", "driver=file,node-name=f0,filename=%s%s" % (img, node)]
            top = "f0"
            if fmt == "qcow2":
                args += ["--blockdev", "driver=qcow2,node-name=q0,file=f0"]
                top = "q0"
            args += ["--nbd-server", "addr.type=unix,addr.path=%s" % self.sock,
                     "--export", "type=nbd,id=e0,node-name=%s,writable=on,name=" % top,
                     "--daemonize", "--pidfile", self.pidfile]
            sh(*args)
        for _ in range(100):
            if os.path.exists(self.pidfile) and os.path.getsize(self.pidfile):
                break
            time.sleep(0.05)
        with open(self.pidfile) as f:
            self.pid = int(f.read().strip())
        self.uri = "nbd+unix:///?socket=%s" % self.sock

    def stop(self):
        try:
            os.kill(self.pid, 15)
            for _ in range(200):
                os.kill(self.pid, 0)
                time.sleep(0.05)
        except ProcessLookupError:
            pass


def fio(uri, rw, bs, qd, runtime, size=None, jobs=1):
    """IOPS and bytes/s; with jobs > 1, that many fio jobs (one NBD connection
    each) share the queue depth qd.  Also fio's own CPU seconds (usr+sys)."""
    args = ["fio", "--name=b", "--ioengine=nbd", "--uri=" + uri, "--rw=" + rw, "--bs=" + bs,
            "--iodepth=%d" % max(1, qd // jobs), "--time_based", "--runtime=%d" % runtime,
            "--output-format=json", "--norandommap", "--randrepeat=0"]
    if jobs > 1:
        args += ["--numjobs=%d" % jobs, "--group_reporting"]
    if size:
        args.append("--size=%s" % size)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = sh(*args)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = json.loads(text[text.index("{"):])      # the nbd engine says hello first
    job = out["jobs"][0]
    part = job["read"] if rw.endswith("read") else job["write"]
    cli = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return part["iops"], part["bw"] * 1024, cli


def make_allocated(path, size, fmt="qcow2"):
    if os.path.exists(path):
        os.unlink(path)
    sh("qemu-img", "create", "-f", fmt, path, str(size))
    sh("qemu-io", "-f", fmt, "-c", "write -P 0x5a 0 %d" % size, path)


def make_chain(d, n, size):
    prev = None
    for i in range(n):
        p = os.path.join(d, "chain%d-%d.qcow2" % (n, i))
        args = ["qemu-img", "create", "-f", "qcow2"]
        if prev:
            args += ["-b", os.path.basename(prev), "-F", "qcow2"]
        sh(*(args + [p, str(size)]))
        if i == 0:
            sh("qemu-io", "-c", "write -P 0x11 0 %d" % size, p)
        prev = p
    return prev


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-t", "--runtime", type=int, default=8)
    ap.add_argument("--size", type=int, default=512 << 20)
    ap.add_argument("-s", "--servers", default="bexd,qsd,qemu-nbd")
    ap.add_argument("-w", "--workloads",
                    default="read-4k-qd32,alloc-write-4k,alloc-write-1m,chain")
    ap.add_argument("--alloc-size", type=int, default=64 << 30)
    ap.add_argument("-r", "--repeat", type=int, default=1)
    ap.add_argument("-j", "--read-jobs", type=int, default=1,
                    help="fio jobs (NBD connections) sharing the read row's queue depth "
                         "of 32: 2 shows whether one fio job is the bound")
    ap.add_argument("--direct", action="store_true", help="/var/tmp, cache.direct=on")
    ap.add_argument("--json")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="qbench", dir="/var/tmp" if a.direct else "/dev/shm")
    servers = a.servers.split(",")
    work = a.workloads.split(",")
    rows = []
    load = os.getloadavg()
    try:
        # the read rows' images are made once: reads leave them as they are
        if "read-4k-qd32" in work:
            img = os.path.join(d, "full.qcow2")
            make_allocated(img, a.size)
            raw = os.path.join(d, "full.raw")
            make_allocated(raw, a.size, fmt="raw")
        if "chain" in work:
            tops = {n: make_chain(d, n, min(a.size, 256 << 20)) for n in (1, 10)}
        for _ in range(a.repeat):
            if "read-4k-qd32" in work:
                for k, path, fmt in [("bexd (raw)", raw, "raw")] + \
                                    [(k, img, "qcow2") for k in servers]:
                    s = Server(k.split()[0], path, d, fmt=fmt, direct=a.direct)
                    c0 = cpu_seconds(s.pid)
                    iops, _, cli = fio(s.uri, "randread", "4k", 32, a.runtime, jobs=a.read_jobs)
                    cpu = (cpu_seconds(s.pid) - c0) / (iops * a.runtime) * 1e6
                    s.stop()
                    rows.append(("read-4k-qd32", k, iops, cpu, cli * 1e6 / (iops * a.runtime)))
            for name, rw, bs in (("alloc-write-4k", "randwrite", "4k"),
                                 ("alloc-write-1m", "write", "1m")):
                if name not in work:
                    continue
                for k in servers:
                    img = os.path.join(d, "empty.qcow2")
                    if os.path.exists(img):
                        os.unlink(img)
                    sh("qemu-img", "create", "-f", "qcow2", img, str(a.alloc_size))
                    s = Server(k, img, d, direct=a.direct)
                    c0 = cpu_seconds(s.pid)
                    iops, bw, cli = fio(s.uri, rw, bs, 32 if bs == "4k" else 8, a.runtime)
                    cpu = (cpu_seconds(s.pid) - c0) / (iops * a.runtime) * 1e6
                    s.stop()
                    rows.append((name, k, iops if bs == "4k" else bw / (1 << 20), cpu,
                                 cli * 1e6 / (iops * a.runtime)))
            if "chain" in work:
                for k in servers:
                    for n in (1, 10):
                        s = Server(k, tops[n], d, direct=a.direct)
                        iops, _, cli = fio(s.uri, "randread", "4k", 32, a.runtime)
                        s.stop()
                        rows.append(("chain%d-read-4k-qd32" % n, k, iops, None,
                                     cli * 1e6 / (iops * a.runtime)))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print("load average before the run: %.1f %.1f %.1f; %d run(s), medians; read row: "
          "%d fio job(s)" % (load + (a.repeat, a.read_jobs)))
    print("%-22s %-12s %12s %14s %14s" % ("row", "server", "IOPS or MiB/s", "CPU us/req",
                                          "fio us/req"))
    seen = []
    for r in rows:
        if (r[0], r[1]) not in seen:
            seen.append((r[0], r[1]))
    med = []
    for key in seen:
        vals = sorted(x[2] for x in rows if (x[0], x[1]) == key)
        cpus = sorted(x[3] for x in rows if (x[0], x[1]) == key and x[3])
        clis = sorted(x[4] for x in rows if (x[0], x[1]) == key)
        v = vals[len(vals) // 2]
        c = cpus[len(cpus) // 2] if cpus else None
        cl = clis[len(clis) // 2]
        med.append((key[0], key[1], v, c, vals, cl))
        print("%-22s %-12s %12.0f %14s %14.1f   %s" % (
            key[0], key[1], v, "%.1f" % c if c else "-", cl, " ".join("%.0f" % x for x in vals)))
    rows = {"load": load, "repeat": a.repeat, "read_jobs": a.read_jobs, "rows": rows,
            "medians": med}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
