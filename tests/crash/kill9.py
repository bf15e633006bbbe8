#!/usr/bin/python3
"""Crash consistency of raw images: kill -9 of bexd under write load.

Each round starts bexd on a raw image on a real disk (/var/tmp, ext4),
runs writers (libnbd, several connections) that write 64 KiB blocks, each
holding its round, offset and a sequence number, some with FUA and the
others followed by FLUSH; a block counts as durable once its FUA write or
the FLUSH after it was acknowledged.  At a random moment the daemon gets
SIGKILL.  The image is then read directly: every durable block must hold
what was last acknowledged for it (or a newer write of the same round,
which may have reached the disk before the kill).

  tests/crash/kill9.py [ROUNDS] [--bexd PATH] [--image PATH]
Prints one line per round and a summary: rounds, writes acknowledged,
durable blocks checked, failures.  Exit status 1 on any failure.
"""
import argparse
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

import nbd

BLOCK = 64 << 10
NBLOCKS = 512                     # a 32 MiB image


def block_data(rnd, idx, seq):
    head = struct.pack(">QQQ", rnd, idx, seq)
    return (head * (BLOCK // len(head)))[:BLOCK]


def writer(uri, rnd, idx_range, durable, stop, counts, seed):
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    seq = 0
    pending = {}
    try:
        while not stop.is_set():
            idx = rng.choice(idx_range)
            seq += 1
            data = block_data(rnd, idx, seq)
            if rng.random() < 0.5:
                h.pwrite(data, idx * BLOCK, nbd.CMD_FLAG_FUA)
                durable[idx] = seq
            else:
                h.pwrite(data, idx * BLOCK)
                pending[idx] = seq
                if len(pending) >= 4:
                    h.flush()
                    durable.update(pending)
                    pending.clear()
            counts[0] += 1
    except nbd.Error:
        pass                       # the daemon was killed


def one_round(bexd, image, rnd, rng, tmpdir):
    sock = os.path.join(tmpdir, "nbd.sock")
    pidf = os.path.join(tmpdir, "pid")
    subprocess.run([bexd, "--blockdev", "driver=file,node-name=d,filename=%s" % image,
                    "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                    "--export", "type=nbd,id=e,node-name=d,name=d,writable=on",
                    "--daemonize", "--pidfile", pidf], check=True)
    pid = int(open(pidf).read())
    uri = "nbd+unix:///d?socket=%s" % sock
    stop = threading.Event()
    durables, counts, threads = [], [0], []
    for w in range(4):                 # disjoint blocks: one writer per block
        d = {}
        durables.append(d)
        t = threading.Thread(target=writer, args=(uri, rnd, range(w, NBLOCKS, 4), d, stop,
                                                  counts, rnd * 10 + w))
        t.start()
        threads.append(t)
    time.sleep(rng.uniform(0.05, 1.0))  # a random moment under load
    snapshot = [dict(d) for d in durables]
    os.kill(pid, signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join()
    while os.path.exists("/proc/%d" % pid):
        time.sleep(0.01)
    bad = 0
    checked = 0
    with open(image, "rb") as f:
        for d in snapshot:
            for idx, seq in d.items():
                f.seek(idx * BLOCK)
                got = f.read(24)
                r, i, s = struct.unpack(">QQQ", got)
                checked += 1
                if r != rnd or i != idx or s < seq:
                    bad += 1
                    print("  block %d: durable seq %d of round %d, found round %d seq %d"
                          % (idx, seq, rnd, r, s))
    return counts[0], checked, bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rounds", type=int, nargs="?", default=100)
    ap.add_argument("--bexd", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                   "build", "bexd"))
    ap.add_argument("--image", default=None)
    a = ap.parse_args()
    tmpdir = tempfile.mkdtemp(prefix="bxk", dir="/tmp")
    image = a.image or "/var/tmp/bexd-kill9-%d.img" % os.getpid()
    with open(image, "wb") as f:
        f.truncate(NBLOCKS * BLOCK)
    rng = random.Random(1)
    total_w = total_c = total_bad = 0
    try:
        for rnd in range(1, a.rounds + 1):
            w, c, bad = one_round(a.bexd, image, rnd, rng, tmpdir)
            total_w += w
            total_c += c
            total_bad += bad
            print("round %d: %d writes acknowledged, %d durable blocks checked, %d lost"
                  % (rnd, w, c, bad))
    finally:
        if not a.image:
            os.unlink(image)
    print("kill9: %d rounds, %d writes acknowledged, %d durable blocks checked, %d lost"
          % (a.rounds, total_w, total_c, total_bad))
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
