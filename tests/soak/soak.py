#!/usr/bin/python3
"""Soak: a mixed load on one bexd for a while, its resources sampled.

For SECONDS (default 3600): NBD clients in child processes doing random
reads and writes, of which some are killed with SIGKILL and some stopped
with SIGSTOP (and continued) at random; a QMP client adding and removing
an export and a node in a loop; a FUSE export read and written; a data
region written once and checked at the end.  Every 5 s RSS, open fds and
threads of the daemon are sampled.  Prints the samples, then a summary:
duration, connections cycled, exports churned, RSS/fds/threads first and
last, and exits 1 if the data changed, the daemon died, fds grew, or
threads passed what the worker loops and the I/O pool may start.

  tests/soak/soak.py [SECONDS] [--bexd PATH]
"""
import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
CLIENT = r'''
import nbd, os, random, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); r = random.Random(int(sys.argv[2]))
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("seconds", type=int, nargs="?", default=3600)
    ap.add_argument("--bexd", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                   "build", "bexd"))
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bxs", dir="/tmp")
    img = "/var/tmp/bexd-soak-%d.img" % os.getpid()
    fimg = os.path.join("/dev/shm", "bexd-soak-%d.img" % os.getpid())
    golden = os.urandom(8 * MiB)
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
        f.write(golden)                    # [0, 8 MiB): never written by clients
    with open(fimg, "wb") as f:
        f.truncate(16 * MiB)
    mnt = os.path.join(tmp, "mnt")
    open(mnt, "w").close()
    sock, qsock, pidf = (os.path.join(tmp, n) for n in ("nbd.sock", "qmp.sock", "pid"))
    subprocess.run([a.bexd, "--blockdev", "driver=file,node-name=d,filename=%s" % img,
                    "--blockdev", "driver=file,node-name=f,filename=%s" % fimg,
                    "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                    "--export", "type=nbd,id=e,node-name=d,name=d,writable=on",
                    "--export", "type=fuse,id=fx,node-name=f,mountpoint=%s,writable=on" % mnt,
                    "--chardev", "socket,id=m,path=%s,server=on,wait=off" % qsock,
                    "--monitor", "chardev=m", "--daemonize", "--pidfile", pidf], check=True)
    pid = int(open(pidf).read())
    try:
        return soak(a, pid, img, fimg, mnt, sock, qsock, golden)
    finally:
        if os.path.exists("/proc/%d" % pid):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["fusermount3", "-u", "-z", mnt], stderr=subprocess.DEVNULL)
        for p in (img, fimg):
            if os.path.exists(p):
                os.unlink(p)


def soak(a, pid, img, fimg, mnt, sock, qsock, golden):
    q = QMP(qsock)
    uri = "nbd+unix:///d?socket=%s" % sock
    rng = random.Random(7)
    clients, stopped = [], []
    cycled = churned = fuse_ops = 0
    samples = [(0, *status(pid))]
    t0 = time.monotonic()
    next_sample = 5
    ok = True
    try:
        while time.monotonic() - t0 < a.seconds:
            while len(clients) < 6:
                clients.append(subprocess.Popen([sys.executable, "-c", CLIENT, uri,
                                                 str(rng.randrange(1 << 30))],
                                                stderr=subprocess.DEVNULL))
                cycled += 1
            c = rng.choice(clients)
            r = rng.random()
            if r < 0.3:
                c.kill()
                c.wait()
                clients.remove(c)
            elif r < 0.4 and c not in stopped:
                c.send_signal(signal.SIGSTOP)
                stopped.append(c)
            elif stopped:
                s = stopped.pop(0)
                if s.poll() is None:
                    s.send_signal(signal.SIGCONT)
            # QMP churn: a node and an export on it, added and removed
            churned += 1
            q.cmd("blockdev-add", driver="null-co", **{"node-name": "c%d" % churned})
            q.cmd("block-export-add", type="nbd", id="x%d" % churned,
                  **{"node-name": "c%d" % churned})
            q.cmd("block-export-del", id="x%d" % churned, mode="hard")
            q.cmd("blockdev-del", **{"node-name": "c%d" % churned})
            with open(mnt, "r+b") as f:
                off = rng.randrange(0, 15) * MiB
                f.seek(off)
                f.write(os.urandom(65536))
                f.seek(off)
                f.read(65536)
                fuse_ops += 1
            time.sleep(0.2)
            if time.monotonic() - t0 >= next_sample:
                samples.append((int(time.monotonic() - t0), *status(pid)))
                print("t=%ds rss=%d KiB fds=%d threads=%d" % samples[-1], flush=True)
                next_sample += 5
    finally:
        for c in stopped:
            if c.poll() is None:
                c.send_signal(signal.SIGCONT)
        for c in clients:
            c.kill()
            c.wait()
    time.sleep(1)                          # let the daemon see the last clients go
    samples.append((int(time.monotonic() - t0), *status(pid)))
    alive = os.path.exists("/proc/%d" % pid)
    with open(img, "rb") as f:
        same = f.read(8 * MiB) == golden
    q.cmd("quit")
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    # Threads start on demand and are kept: worker loops (one per CPU) and
    # the I/O pool (at most 16, util/aio.c).  Bounded, not flat.
    ok = alive and same and last[2] <= first[2] + 4 and last[3] <= first[3] + os.cpu_count() + 16
    print("soak: %ds, %d NBD connections cycled, %d exports churned, %d FUSE rounds; "
          "rss %d -> %d KiB, fds %d -> %d, threads %d -> %d; data %s; %s"
          % (last[0], cycled, churned, fuse_ops, first[1], last[1], first[2], last[2],
             first[3], last[3], "intact" if same else "CHANGED", "ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
