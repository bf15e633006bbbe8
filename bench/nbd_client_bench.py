#!/usr/bin/python3
"""The nbd block driver (an NBD client node) side by side: bexd against
qemu-storage-daemon 7.2 (and nbdkit's nbd plugin for the proxy rows).

One NBD server (bexd) exports a RAM-backed raw image with data.  For each
client:
  - mirror: blockdev-mirror sync=full from a local RAM image onto an nbd
    node, seconds to BLOCK_JOB_READY (storage migration's bulk copy);
  - backup: blockdev-backup sync=full onto an nbd node, seconds to
    BLOCK_JOB_COMPLETED (push backup);
  - proxy: the nbd node exported again over NBD (nbdkit: its nbd plugin),
    fio's nbd engine through both hops: 4k random read qd32 (IOPS), 1M
    read and 1M write qd8 (MiB/s).
Rounds alternate the clients; the table gives each row's median and the
ratio bexd / qsd.  Usage: bench/nbd-client-bench.sh [--size MiB] [--rounds N]
[--runtime S].
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BEXD = os.environ.get("BEXD", os.path.join(HERE, "..", "build", "bexd"))


class Daemon:
    def __init__(self, impl, d, name, *args):
        self.qmp_path = os.path.join(d, name + ".qmp")
        exe = BEXD if impl == "bexd" else "qemu-storage-daemon"
        self.p = subprocess.Popen(
            [exe, "--chardev", "socket,id=m,path=%s,server=on,wait=off" % self.qmp_path,
             "--monitor", "chardev=m"] + list(args),
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, name + ".log"), "w"))
        deadline = time.monotonic() + 10
        while not os.path.exists(self.qmp_path):
            if time.monotonic() > deadline or self.p.poll() is not None:
                raise RuntimeError("%s did not start" % impl)
            time.sleep(0.01)
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(self.qmp_path)
        self.buf = b""
        self.events = []
        self._line()
        self.cmd("qmp_capabilities")

    def _line(self):
        while b"\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise EOFError
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, _cmd, **args):
        self.s.sendall((json.dumps({"execute": _cmd, "arguments": args}) + "\n").encode())
        while True:
            r = self._line()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise RuntimeError("%s: %s" % (_cmd, r["error"]["desc"]))
            return r["return"]

    def wait(self, event):
        while True:
            for e in self.events:
                if e["event"] == event:
                    self.events.remove(e)
                    return e
            self.events.append(self._line())

    def stop(self):
        self.p.terminate()
        self.p.wait()


def fill(path, mib):
    with open(path, "wb") as f:
        block = bytes(range(256)) * 4096
        for _ in range(mib):
            f.write(block)


def fio(uri_sock, export, rw, bs, qd, runtime):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        r = subprocess.run(
            ["fio", "--name=j", "--ioengine=nbd",
             "--uri=nbd+unix:///%s?socket=%s" % (export, uri_sock),
             "--rw=" + rw, "--bs=" + bs, "--iodepth=%d" % qd, "--time_based",
             "--runtime=%d" % runtime, "--output-format=json", "--output=" + out.name],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise RuntimeError("fio: " + r.stderr.strip()[-300:])
        j = json.load(out)["jobs"][0]
    side = j["read"] if "read" in rw else j["write"]
    return side["iops"] if bs == "4k" else side["bw_bytes"] / (1 << 20)


def node(server_sock):
    return {"driver": "nbd", "node-name": "t0", "export": "tgt",
            "server": {"type": "unix", "path": server_sock}}


def one_round(impl, d, size, runtime, out):
    src = os.path.join(d, "src.img")
    srv_sock = os.path.join(d, "srv.sock")
    tgt = os.path.join(d, "tgt.img")
    with open(tgt, "wb") as f:
        f.truncate(size << 20)
    srv = Daemon("bexd", d, "srv", "--blockdev", "file,filename=%s,node-name=f0" % tgt,
                 "--nbd-server", "addr.type=unix,addr.path=%s" % srv_sock,
                 "--export", "type=nbd,id=e0,node-name=f0,name=tgt,writable=on")
    try:
        if impl == "nbdkit":
            px = os.path.join(d, "px.sock")
            k = subprocess.Popen(["nbdkit", "-f", "-U", px, "nbd", "socket=" + srv_sock,
                                  "export=tgt"], stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 10
                while not os.path.exists(px) and time.monotonic() < deadline:
                    time.sleep(0.01)
                proxy_rows(px, "", runtime, out)
            finally:
                k.terminate()
                k.wait()
            return
        c = Daemon(impl, d, "cli", "--blockdev", "file,filename=%s,node-name=s0" % src)
        try:
            c.cmd("blockdev-add", **node(srv_sock))
            t = time.monotonic()
            c.cmd("blockdev-mirror", **{"job-id": "m0"}, device="s0", target="t0", sync="full")
            c.wait("BLOCK_JOB_READY")
            out.setdefault("mirror (s)", []).append(time.monotonic() - t)
            c.cmd("block-job-cancel", device="m0")
            c.wait("BLOCK_JOB_COMPLETED")
            t = time.monotonic()
            c.cmd("blockdev-backup", **{"job-id": "b0"}, device="s0", target="t0", sync="full")
            c.wait("BLOCK_JOB_COMPLETED")
            out.setdefault("backup (s)", []).append(time.monotonic() - t)
            px = os.path.join(d, "px.sock")
            c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": px}})
            c.cmd("block-export-add", type="nbd", id="p0", **{"node-name": "t0"},
                  name="px", writable=True)
            proxy_rows(px, "px", runtime, out)
        finally:
            c.stop()
    finally:
        srv.stop()
        for f in ("srv.sock", "px.sock"):
            if os.path.exists(os.path.join(d, f)):
                os.unlink(os.path.join(d, f))


def proxy_rows(sock, export, runtime, out):
    out.setdefault("proxy 4k randread qd32 (IOPS)", []).append(
        fio(sock, export, "randread", "4k", 32, runtime))
    out.setdefault("proxy 1M read qd8 (MiB/s)", []).append(
        fio(sock, export, "read", "1M", 8, runtime))
    out.setdefault("proxy 1M write qd8 (MiB/s)", []).append(
        fio(sock, export, "write", "1M", 8, runtime))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512, help="image MiB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio row")
    a = ap.parse_args()
    impls = ["bexd", "qsd", "nbdkit"] if shutil.which("nbdkit") else ["bexd", "qsd"]
    res = {i: {} for i in impls}
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="bexd-nbdc-") as d:
        fill(os.path.join(d, "src.img"), a.size)
        for r in range(a.rounds):
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                one_round(impl, d, a.size, a.runtime, res[impl])
                print("round %d %s done" % (r + 1, impl), file=sys.stderr)
    rows = list(res["bexd"])
    print("| row | " + " | ".join(impls) + " | bexd/qsd | runs bexd/qsd |")
    print("|---" * (len(impls) + 3) + "|")
    for row in rows:
        med = {i: statistics.median(res[i][row]) if row in res[i] else None for i in impls}
        ratio = med["bexd"] / med["qsd"]
        runs = ", ".join("%.2f" % (b / q) for b, q in zip(res["bexd"][row], res["qsd"][row]))
        if "(s)" in row:        # times: smaller is better
            ratio = 1 / ratio
            runs = ", ".join("%.2f" % (q / b) for b, q in zip(res["bexd"][row], res["qsd"][row]))
        cells = ["%.1f" % med[i] if med[i] is not None else "-" for i in impls]
        print("| %s | %s | %.2fx | %s |" % (row, " | ".join(cells), ratio, runs))
    print("(bexd/qsd: higher is better for bexd; for times, qsd's time / bexd's)")


if __name__ == "__main__":
    main()
