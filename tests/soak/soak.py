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
plain client that tries without is refused now and then.  Every 5 s RSS,
open fds and threads of the daemon are sampled.  Prints the samples, then a summary:
duration, connections cycled, exports churned, RSS/fds/threads first and
last, and exits 1 if the data changed, the daemon died, fds grew, or
threads passed what the worker loops and the I/O pool may start.

  tests/soak/soak.py [SECONDS] [--bexd PATH] [--tls] [--vub PATH]
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
HERE = os.path.dirname(os.path.abspath(__file__))


def vub_pattern(length, seed):
    """The bytes `vub-client write OFF LEN SEED` writes (its fill())."""
    m = (1 << 64) - 1
    x = (seed * 0x9e3779b97f4a7c15 + 1) & m
    out = bytearray(length)
    for i in range(length):
        x ^= (x << 13) & m
        x ^= x >> 7
        x ^= (x << 17) & m
        out[i] = x & 0xff
    return bytes(out)
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


def become_subreaper():
    """The daemonized bexd becomes our child (not init's) when its parent
    exits, so its exit status can be read at the end."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:        # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def exit_status(pid, timeout):
    """bexd's exit status once it ends (-N: signal N), None if it is still
    running after timeout seconds."""
    import select
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = None
    if fd is not None:
        p = select.poll()
        p.register(fd, select.POLLIN)
        ready = p.poll(timeout * 1000)
        os.close(fd)
        if not ready:
            return None
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("seconds", type=int, nargs="?", default=3600)
    ap.add_argument("--bexd", default=os.path.join(HERE, "..", "..", "build", "bexd"))
    ap.add_argument("--vub", default=None, help="vub-client (default: next to --bexd)")
    ap.add_argument("--tls", action="store_true", help="NBD over TLS")
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
    mnt = os.path.join(tmp, "mnt")
    open(mnt, "w").close()
    sock, qsock, pidf, vsock = (os.path.join(tmp, n)
                                for n in ("nbd.sock", "qmp.sock", "pid", "vub.sock"))
    tls_args, a.certs = [], None
    if a.tls:
        sys.path.insert(0, os.path.join(HERE, "..", "func"))
        import tlscerts
        creds = tlscerts.make_credentials(os.path.join(tmp, "tls"))
        a.certs = creds.client
        tls_args = ["--object", "tls-creds-x509,id=tls0,endpoint=server,dir=%s" % creds.server]
    become_subreaper()
    subprocess.run([a.bexd] + tls_args +
                   ["--blockdev", "driver=file,node-name=d,filename=%s" % img,
                    "--blockdev", "driver=file,node-name=f,filename=%s" % fimg,
                    "--blockdev", "driver=file,node-name=v,filename=%s" % vimg,
                    "--nbd-server", "addr.type=unix,addr.path=%s%s"
                    % (sock, ",tls-creds=tls0" if a.tls else ""),
                    "--export", "type=vhost-user-blk,id=vx,node-name=v,writable=on,"
                                "addr.type=unix,addr.path=%s" % vsock,
                    "--export", "type=nbd,id=e,node-name=d,name=d,writable=on",
                    "--export", "type=fuse,id=fx,node-name=f,mountpoint=%s,writable=on" % mnt,
                    "--chardev", "socket,id=m,path=%s,server=on,wait=off" % qsock,
                    "--monitor", "chardev=m", "--daemonize", "--pidfile", pidf], check=True)
    pid = int(open(pidf).read())
    try:
        return soak(a, pid, img, fimg, mnt, sock, qsock, vsock, golden)
    finally:
        if os.path.exists("/proc/%d" % pid):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["fusermount3", "-u", "-z", mnt], stderr=subprocess.DEVNULL)
        for p in (img, fimg, vimg):
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


def soak(a, pid, img, fimg, mnt, sock, qsock, vsock, golden):
    q = QMP(qsock)
    uri = "nbd%s+unix:///d?socket=%s" % ("s" if a.tls else "", sock)
    rng = random.Random(7)
    clients, stopped = [], []
    cycled = churned = fuse_ops = refused_plain = client_failed = 0
    vub = Vub(a, vsock, rng)
    samples = [(0, *status(pid))]
    t0 = time.monotonic()
    next_sample = 5
    ok = True
    try:
        while time.monotonic() - t0 < a.seconds:
            for c in list(clients):          # a client that ended by itself failed
                if c.poll() is not None:
                    client_failed += 1
                    clients.remove(c)
                    if c in stopped:
                        stopped.remove(c)
            while len(clients) < 6:
                clients.append(subprocess.Popen([sys.executable, "-c", CLIENT, uri,
                                                 str(rng.randrange(1 << 30))] +
                                                ([a.certs] if a.tls else []),
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
                print("t=%ds rss=%d KiB fds=%d threads=%d" % samples[-1], flush=True)
                next_sample += 5
    finally:
        vub.stop()
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
    # quit ends bexd with status 0 within its stop deadline (30 s)
    rc = exit_status(pid, 60)
    if rc is None:
        print("soak: bexd did not exit within 60 s of quit", flush=True)
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    # Threads start on demand and are kept: worker loops (one per CPU) and
    # the I/O pool (at most 16, util/aio.c).  Bounded, not flat.
    ok = (ok and alive and same and rc == 0 and vub.bad == 0 and client_failed == 0 and last[2] <= first[2] + 4 and
          last[3] <= first[3] + os.cpu_count() + 16)
    print("soak: %ds, %d %sNBD connections cycled, %d exports churned, %d FUSE rounds, "
          "%d vhost-user rounds (%d bad, %d front-ends killed mid-I/O, %d retries), "
          "%d plain clients refused, %d NBD clients failed; "
          "rss %d -> %d KiB, fds %d -> %d, threads %d -> %d; bexd %s; data %s; %s"
          % (last[0], cycled, "TLS " if a.tls else "", churned, fuse_ops, vub.rounds, vub.bad,
             vub.killed, vub.refused, refused_plain, client_failed, first[1], last[1], first[2], last[2],
             first[3], last[3], "exit status %s" % rc if rc is not None else "HUNG",
             "intact" if same else "CHANGED", "ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
