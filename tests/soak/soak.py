#!/usr/bin/python3
"""Soak: a mixed load on one bexd for a while, its resources sampled.

For SECONDS (default 3600): NBD clients in child processes doing random
reads and writes, of which some are killed with SIGKILL and some stopped
with SIGSTOP (and continued) at random; a QMP client adding and removing
an export and a node in a loop; a FUSE export read and written; a data
region written once and checked at the end; a vhost-user-blk export
driven by the test front-end (tests/vhost/vub-client): a pattern written
and read back each round, and now and then a front-end pushing I/O that is
killed with SIGKILL mid-stream.  With --tls the NBD server requires TLS
(x509 certificates made at start): the clients connect with it, and a
plain client that tries without is refused now and then.  With --guest a
QEMU guest (tests/vhost/guest.py, TCG) is a second vhost-user-blk
front-end: guests one after the other write a 4 MiB pattern that the
image must then hold, and guests streaming I/O are killed with SIGKILL
mid-stream.  Every 5 s RSS, open fds and threads of the daemon are
sampled, with its anonymous memory and what its heap holds
(__org.bexd_x-query-memory).  An NBD client that ends by itself is a
failure, printed with its exit status and stderr; the daemon's sanitizer
reports (LeakSanitizer at exit included) go to files that must stay
empty.  Prints the samples, then a summary: duration, connections
cycled, exports churned, RSS/fds/threads first and last, and exits 1 if
the data changed, the daemon died, fds grew, threads passed what the
worker loops and the I/O pool may start, or memory broke the verdict of
memory_verdict() (memory outside the heap blocks in use grew, or the heap
in use did not come back after the run).

  tests/soak/soak.py [SECONDS] [--bexd PATH] [--tls] [--guest] [--vub PATH]
"""
import argparse
import glob
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "func"))
from vubpattern import vub_pattern  # noqa: E402


CLIENT = r'''
import nbd, os, random, sys
h = nbd.NBD(); r = random.Random(int(sys.argv[2]))
if len(sys.argv) > 3:
    h.set_tls(nbd.TLS_REQUIRE); h.set_tls_certificates(sys.argv[3])
h.connect_uri(sys.argv[1])
while True:
    off = r.randrange(8 * MiB, 63 * MiB) & ~4095      # clients never touch [0, 8 MiB)
    if r.random() < 0.5: h.pread(r.choice([4096, 65536, 1 << 20]), off)
    else: h.pwrite(os.urandom(65536), off)
'''.replace("MiB", str(MiB))


def status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, v = line.split(":", 1)
            if v.split():
                out[k] = v.split()[0]
    return int(out["VmRSS"]), len(os.listdir("/proc/%d/fd" % pid)), int(out["Threads"])


def anon_kib(pid):
    """Anonymous memory of the daemon (KiB): the heap, thread stacks and
    buffers, without the mapped binary and libraries."""
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    return 0


def wait_no_nbd_client(q):
    """The daemon has let the last NBD clients go (and freed their
    buffers) once no NBD export lists one."""
    for _ in range(600):
        if not any(e["clients"] for e in q.cmd("__org.bexd_query-export-clients")["return"]
                   if e["type"] == "nbd"):
            return
        time.sleep(0.1)
    raise RuntimeError("NBD clients stayed")


def memory(q, pid):
    """What the daemon's memory is made of (KiB): anonymous memory from
    the kernel, and the heap as the allocator sees it
    (__org.bexd_x-query-memory)."""
    m = q.cmd("__org.bexd_x-query-memory")["return"]
    out = {k: (v >> 10 if isinstance(v, int) and k != "arenas" else v) for k, v in m.items()}
    out["anon"] = anon_kib(pid)
    return out


class QMP:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rb")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.s.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            m = json.loads(self.f.readline())
            if "event" not in m:
                return m


# What the memory verdict allows (KiB): memory outside the heap's blocks
# in use (free blocks the allocator keeps, thread stacks, static data) may
# grow by SLACK plus SLACK_THREAD per thread started during the run; the
# blocks in use once every client is gone may exceed those after the
# warm-up by LEAK_SLACK.  The I/O pool's threads start on demand during
# the run; state made once on first use is made in the warm-up.  A leak
# smaller than LEAK_SLACK over the run is LeakSanitizer's to find (the
# soak under the ASan build).
SLACK = 2048
SLACK_THREAD = 512
LEAK_SLACK = 256


def memory_verdict(samples, mem):
    """(ok, why): RSS follows what the daemon holds.  The daemon's anonymous
    memory minus its heap blocks in use must not grow past the slack at any
    sample (what an allocator that keeps freed memory, or a leak outside
    malloc, would show), and the heap in use after the run, NBD buffers
    apart, must be back near where it started (a leak)."""
    if mem[0]["allocator"] != "glibc":
        return True, "not checked under a sanitizer's allocator (LeakSanitizer checks leaks)"
    base = mem[0]["anon"] - mem[0]["heap-in-use"]
    worst, at = 0, 0
    for (t, _, _, threads), m in zip(samples, mem):
        over = (m["anon"] - m["heap-in-use"]) - base - SLACK_THREAD * max(0, threads - samples[0][3])
        if over > worst:
            worst, at = over, t
    start = mem[0]["heap-in-use"] - mem[0]["nbd-buffer-bytes"]
    end = mem[-1]["heap-in-use"] - mem[-1]["nbd-buffer-bytes"]
    why = ("anon - heap in use grew by at most %d KiB over the thread allowance (t=%ds, "
           "limit %d); heap in use %d -> %d KiB without NBD buffers (limit +%d); "
           "heap free at the end %d KiB in %d arenas"
           % (worst, at, SLACK, start, end, LEAK_SLACK, mem[-1]["heap-free"], mem[-1]["arenas"]))
    return worst <= SLACK and end - start <= LEAK_SLACK, why


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("seconds", type=int, nargs="?", default=3600)
    ap.add_argument("--bexd", default=os.path.join(HERE, "..", "..", "build", "bexd"))
    ap.add_argument("--vub", default=None, help="vub-client (default: next to --bexd)")
    ap.add_argument("--tls", action="store_true", help="NBD over TLS")
    ap.add_argument("--guest", action="store_true",
                    help="also a QEMU guest on a vhost-user-blk export (tests/vhost/guest.py)")
    a = ap.parse_args()
    # SIGTERM (and SIGINT, ignored in background jobs) end the run cleanly:
    # the clients and the daemon go, the images are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(1))
    if a.vub is None:
        a.vub = os.path.join(os.path.dirname(os.path.abspath(a.bexd)), "tests", "vhost", "vub-client")
    tmp = tempfile.mkdtemp(prefix="bxs", dir="/tmp")
    img = "/var/tmp/bexd-soak-%d.img" % os.getpid()
    fimg = os.path.join("/dev/shm", "bexd-soak-%d.img" % os.getpid())
    golden = os.urandom(8 * MiB)
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
        f.write(golden)                    # [0, 8 MiB): never written by clients
    with open(fimg, "wb") as f:
        f.truncate(16 * MiB)
    vimg = os.path.join("/dev/shm", "bexd-soak-v-%d.img" % os.getpid())
    with open(vimg, "wb") as f:
        f.truncate(16 * MiB)
    a.gimg = os.path.join("/dev/shm", "bexd-soak-g-%d.img" % os.getpid())
    guest_args = []
    if a.guest:
        with open(a.gimg, "wb") as f:
            f.truncate(64 * MiB)
        a.gsock = os.path.join(tmp, "guest.sock")
        guest_args = ["--blockdev", "driver=file,node-name=g,filename=%s" % a.gimg,
                      "--export", "type=vhost-user-blk,id=vg,node-name=g,writable=on,"
                                  "num-queues=2,addr.type=unix,addr.path=%s" % a.gsock]
    mnt = os.path.join(tmp, "mnt")
    open(mnt, "w").close()
    sock, qsock, vsock = (os.path.join(tmp, n) for n in ("nbd.sock", "qmp.sock", "vub.sock"))
    tls_args, a.certs = [], None
    if a.tls:
        import tlscerts
        creds = tlscerts.make_credentials(os.path.join(tmp, "tls"))
        a.certs = creds.client
        tls_args = ["--object", "tls-creds-x509,id=tls0,endpoint=server,dir=%s" % creds.server]
    # The daemon is our child (its exit status is checked) with its output
    # in bexd.log; sanitizer reports (ASan, LSan at exit, UBSan) go to
    # files of their own.
    env = dict(os.environ)
    a.san = os.path.join(tmp, "san")
    for k in ("ASAN_OPTIONS", "UBSAN_OPTIONS"):
        env[k] = (env[k] + ":" if env.get(k) else "") + "log_path=" + a.san
    log = open(os.path.join(tmp, "bexd.log"), "wb")
    a.proc = subprocess.Popen([a.bexd] + tls_args +
                   ["--blockdev", "driver=file,node-name=d,filename=%s" % img,
                    "--blockdev", "driver=file,node-name=f,filename=%s" % fimg,
                    "--blockdev", "driver=file,node-name=v,filename=%s" % vimg,
                    "--nbd-server", "addr.type=unix,addr.path=%s%s"
                    % (sock, ",tls-creds=tls0" if a.tls else ""),
                    "--export", "type=vhost-user-blk,id=vx,node-name=v,writable=on,"
                                "addr.type=unix,addr.path=%s" % vsock,
                    "--export", "type=nbd,id=e,node-name=d,name=d,writable=on",
                    "--export", "type=fuse,id=fx,node-name=f,mountpoint=%s,writable=on" % mnt,
                    "--chardev", "socket,id=m,path=%s,server=on,wait=off" % qsock] + guest_args +
                   ["--monitor", "chardev=m"], stdout=log, stderr=subprocess.STDOUT, env=env)
    pid = a.proc.pid
    try:
        # the command line is applied in order: the monitor's socket last
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.socket(socket.AF_UNIX).connect(qsock)
                break                      # (a monitor takes one client: this one is gone)
            except OSError:
                if a.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("bexd did not start: %s"
                                       % open(log.name, errors="replace").read())
                time.sleep(0.05)
        return soak(a, pid, img, fimg, mnt, sock, qsock, vsock, golden)
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", mnt], stderr=subprocess.DEVNULL)
        for p in (img, fimg, vimg, a.gimg):
            if os.path.exists(p):
                os.unlink(p)


class Vub:
    """The vhost-user-blk front-end: one at a time on the export."""

    def __init__(self, a, vsock, rng):
        self.a, self.vsock, self.rng = a, vsock, rng
        self.rounds = self.killed = self.bad = self.refused = 0
        self.streaming = None

    def run(self, *args):
        # a front-end just killed may still be on its way out: the export
        # takes one at a time, so a new one may be turned away briefly
        for _ in range(100):
            r = subprocess.run([self.a.vub, self.vsock] + [str(x) for x in args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
            if r.returncode == 0:
                return r
            self.refused += 1
            time.sleep(0.05)
        raise RuntimeError("vub-client kept failing: %r" % r.stderr)

    def step(self):
        if self.streaming is not None:
            self.streaming.kill()              # a front-end dies mid-I/O
            self.streaming.wait()
            self.streaming = None
            self.killed += 1
        off = self.rng.randrange(0, 255) * 65536
        seed = self.rng.randrange(1 << 30)
        w = json.loads(self.run("write", off, 65536, seed).stdout.decode().splitlines()[-1])
        back = self.run("read", off, 65536).stdout
        self.rounds += 1
        if w.get("status") != 0 or back != vub_pattern(65536, seed):
            self.bad += 1
        if self.rng.random() < 0.1:
            self.streaming = subprocess.Popen(
                [self.a.vub, self.vsock, "bench", self.rng.choice(["read", "write"]), "4096",
                 "16", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self):
        if self.streaming is not None:
            self.streaming.kill()
            self.streaming.wait()


class GuestLoop(threading.Thread):
    """QEMU guests on the "vg" export, one after the other until stopped:
    a guest writes a 4 MiB pattern, reads it back and the image must hold
    it; then a guest streaming I/O is killed with SIGKILL mid-stream."""

    def __init__(self, a, seed):
        super().__init__()
        sys.path.insert(0, os.path.join(HERE, "..", "vhost"))
        import guest
        self.guest, self.a, self.rng = guest, a, random.Random(seed)
        self.stop = threading.Event()
        self.rounds = self.killed = 0
        self.bad = []

    def run(self):
        import hashlib
        while True:
            off = self.rng.randrange(0, 60) * MiB
            try:
                g = self.guest.Guest(self.a.gsock, "rw", queues=2, off=off, mb=4,
                                     seed=self.rng.randrange(1 << 30), timeout=300)
                rep = g.finish()
                with open(self.a.gimg, "rb") as f:
                    f.seek(off)
                    sha = hashlib.sha256(f.read(4 * MiB)).hexdigest()
                self.rounds += 1
                if rep["result"] != "PASS" or rep.get("pattern_sha256") != sha:
                    self.bad.append(rep)
                    print("guest round failed: %r; console:\n%s" % (rep, g.text[-3000:]), flush=True)
                if self.stop.is_set():
                    return
                g = self.guest.Guest(self.a.gsock, "stream", queues=2, timeout=300,
                                     off=self.rng.randrange(0, 63) * MiB, mb=1)
                try:
                    g.wait_line("BEX: streaming")
                    time.sleep(self.rng.random() * 2)     # a while into the stream
                finally:
                    g.kill()
                    g.finish()
                self.killed += 1
            except Exception as e:
                self.bad.append(repr(e))
                print("guest round failed: %r" % e, flush=True)
                return


def soak(a, pid, img, fimg, mnt, sock, qsock, vsock, golden):
    q = QMP(qsock)
    uri = "nbd%s+unix:///d?socket=%s" % ("s" if a.tls else "", sock)
    rng = random.Random(7)
    clients, stopped = [], []
    errdir = os.path.join(os.path.dirname(sock), "clients")
    os.makedirs(errdir, exist_ok=True)
    failures = []                        # (pid, status, stderr) of clients that ended by themselves

    def client_ended(c, killed=False):
        """c has been reaped: a client dies only of our SIGKILL; any other
        end is a failure, reported with its status and stderr."""
        if not (killed and c.returncode == -signal.SIGKILL):
            c.errf.seek(0)
            err = c.errf.read().decode(errors="replace")
            failures.append((c.pid, c.returncode, err))
            print("t=%ds NBD client %d ended by itself, status %d; its stderr:\n%s"
                  % (time.monotonic() - t0, c.pid, c.returncode, err), flush=True)
        c.errf.close()
    cycled = churned = fuse_ops = refused_plain = 0
    vub = Vub(a, vsock, rng)

    def churn():
        # QMP churn: a node and an export on it, added and removed
        nonlocal churned
        churned += 1
        q.cmd("blockdev-add", driver="null-co", **{"node-name": "c%d" % churned})
        q.cmd("block-export-add", type="nbd", id="x%d" % churned,
              **{"node-name": "c%d" % churned})
        q.cmd("block-export-del", id="x%d" % churned, mode="hard")
        q.cmd("blockdev-del", **{"node-name": "c%d" % churned})

    def fuse_round():
        nonlocal fuse_ops
        with open(mnt, "r+b") as f:
            off = rng.randrange(0, 15) * MiB
            f.seek(off)
            f.write(os.urandom(65536))
            f.seek(off)
            f.read(65536)
            fuse_ops += 1

    # Warm-up: each kind of work once before the baseline, so that what the
    # daemon makes on first use and keeps (worker loops and their I/O
    # engines, FUSE and vhost-user buffers, TLS state) is in the baseline
    # the leak check compares the end with.
    warm = subprocess.Popen([sys.executable, "-c", CLIENT, uri, "1"] +
                            ([a.certs] if a.tls else []), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(cl["read-operations"] + cl["write-operations"] >= 4
                  for e in q.cmd("__org.bexd_query-export-clients")["return"]
                  if e["type"] == "nbd" for cl in e["clients"]):
        if warm.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the warm-up NBD client did not get going")
        time.sleep(0.1)
    warm.kill()
    warm.wait()
    churn()
    fuse_round()
    vub.step()
    vub.stop()
    wait_no_nbd_client(q)
    guests = None
    if a.guest:
        guests = GuestLoop(a, rng.randrange(1 << 30))
        guests.start()
    samples = [(0, *status(pid))]
    mem = [memory(q, pid)]
    t0 = time.monotonic()
    next_sample = 5
    ok = True
    try:
        while time.monotonic() - t0 < a.seconds:
            for c in list(clients):          # a client that ended by itself failed
                if c.poll() is not None:
                    clients.remove(c)
                    if c in stopped:
                        stopped.remove(c)
                    client_ended(c)
            while len(clients) < 6:
                errf = tempfile.TemporaryFile(dir=errdir)   # its stderr, read if it fails
                c = subprocess.Popen([sys.executable, "-c", CLIENT, uri,
                                      str(rng.randrange(1 << 30))] +
                                     ([a.certs] if a.tls else []), stderr=errf)
                c.errf = errf
                clients.append(c)
                cycled += 1
            c = rng.choice(clients)
            r = rng.random()
            if r < 0.3:
                c.kill()
                c.wait()
                clients.remove(c)
                if c in stopped:
                    stopped.remove(c)
                client_ended(c, killed=True)
            elif r < 0.4 and c not in stopped:
                c.send_signal(signal.SIGSTOP)
                stopped.append(c)
            elif stopped:
                s = stopped.pop(0)
                if s.poll() is None:
                    s.send_signal(signal.SIGCONT)
            churn()
            fuse_round()
            vub.step()
            if a.tls and rng.random() < 0.1:
                # a client without TLS: refused (NBD_REP_ERR_TLS_REQD)
                import nbd
                h = nbd.NBD()
                h.set_export_name("d")
                try:
                    h.connect_unix(sock)
                    ok = False
                except nbd.Error:
                    refused_plain += 1
                del h
            time.sleep(0.2)
            if time.monotonic() - t0 >= next_sample:
                samples.append((int(time.monotonic() - t0), *status(pid)))
                mem.append(memory(q, pid))
                print("t=%ds rss=%d KiB fds=%d threads=%d" % samples[-1] +
                      " anon=%(anon)d KiB heap-in-use=%(heap-in-use)d KiB heap=%(heap-arena-bytes)d KiB "
                      "heap-free=%(heap-free)d KiB arenas=%(arenas)d nbd-buffers=%(nbd-buffer-bytes)d KiB"
                      % mem[-1], flush=True)
                next_sample = time.monotonic() - t0 + 5
    finally:
        vub.stop()
        if guests:
            guests.stop.set()
            guests.join()
        for c in stopped:
            if c.poll() is None:
                c.send_signal(signal.SIGCONT)
        for c in clients:
            c.kill()
            c.wait()
            client_ended(c, killed=True)
    wait_no_nbd_client(q)
    samples.append((int(time.monotonic() - t0), *status(pid)))
    mem.append(memory(q, pid))
    mem_ok, mem_why = memory_verdict(samples, mem)
    print("memory: %s" % mem_why, flush=True)
    alive = os.path.exists("/proc/%d" % pid)
    with open(img, "rb") as f:
        same = f.read(8 * MiB) == golden
    q.cmd("quit")
    try:
        exit_status = a.proc.wait(timeout=120)  # LeakSanitizer runs at exit
    except subprocess.TimeoutExpired:
        exit_status = None
    print("bexd exit status after quit: %s" % exit_status, flush=True)
    if exit_status != 0:
        print(open(os.path.join(os.path.dirname(qsock), "bexd.log"), errors="replace").read()[-3000:])
    reports = []
    for f in sorted(glob.glob(a.san + ".*")):
        reports.append(open(f, errors="replace").read())
        print("sanitizer report %s:\n%s" % (f, reports[-1]), flush=True)
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    # Threads start on demand and are kept: worker loops (one per CPU) and
    # the I/O pool (at most 16, util/aio.c).  Bounded, not flat.
    if guests:
        print("guests: %d rounds verified, %d killed mid-I/O, %d failed"
              % (guests.rounds, guests.killed, len(guests.bad)), flush=True)
        ok = ok and not guests.bad and guests.rounds > 0
    ok = (ok and mem_ok and alive and exit_status == 0 and not reports and same and vub.bad == 0 and not failures and last[2] <= first[2] + 4 and
          last[3] <= first[3] + os.cpu_count() + 16)
    print("soak: %ds, %d %sNBD connections cycled, %d exports churned, %d FUSE rounds, "
          "%d vhost-user rounds (%d bad, %d front-ends killed mid-I/O, %d retries), "
          "%d plain clients refused, %d NBD clients failed, %d sanitizer reports; "
          "rss %d -> %d KiB, fds %d -> %d, threads %d -> %d; data %s; %s"
          % (last[0], cycled, "TLS " if a.tls else "", churned, fuse_ops, vub.rounds, vub.bad,
             vub.killed, vub.refused, refused_plain, len(failures), len(reports), first[1], last[1], first[2], last[2],
             first[3], last[3], "intact" if same else "CHANGED", "ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
