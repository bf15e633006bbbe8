#!/bin/sh
# NBD over TLS, side by side: bexd vs qemu-storage-daemon vs nbdkit
# (--tls=require), one RAM-backed image, fio's nbd engine (libnbd) as the
# client with an nbds+unix URI.  Rows: 4k random read qd32, 1M read qd8,
# 1M write qd8; each reports IOPS, MiB/s, p99 and the server's CPU time per
# operation (whole process tree), then bexd's ratio to the best peer.
#
#   bench/nbd-tls-bench.sh [-t SECONDS] [-s bexd,qsd,nbdkit] [--size 256M]
#                          [--bexd PATH]
#
# x509 only: fio's nbd engine refuses file names in URIs (tls-certificates,
# tls-psk-file), so the client certificate is put where libnbd looks by
# default, $HOME/.pki/libnbd (its CA is what verifies the server), with HOME
# pointing into the run's directory.
#
# Credentials are generated for the run (tests/func/tlscerts.py).  The
# client verifies the server; no server asks for a client certificate
# (verify-peer=off; nbdkit without --tls-verify-peer), because libnbd sends
# none from its default directory.  That costs a handshake only, not the
# data path.  The measuring, CPU accounting and tables are nbd_bench.py's.
PATH=/usr/bin:/usr/sbin:$PATH
export PATH
HERE=$(dirname "$0")
exec /usr/bin/python3 - "$HERE" "$@" <<'EOF'
import argparse
import os
import shutil
import sys
import tempfile

here = os.path.abspath(sys.argv[1])
sys.path.insert(0, here)
sys.path.insert(0, os.path.join(os.path.dirname(here), "tests", "func"))
import nbd_bench as nb  # noqa: E402
import tlscerts  # noqa: E402

WORKLOADS = ["randread-4k-qd32", "read-1m-qd8", "write-1m-qd8"]
SERVERS = ["bexd", "qsd", "nbdkit"]


class TLSServer(nb.Server):
    def __init__(self, name, workdir, img, bexd, creds, mode):
        super().__init__(name, workdir, img, bexd, "")
        self.creds, self.mode = creds, mode

    @property
    def uri(self):
        return "nbds+unix:///?socket=%s" % self.sock

    def argv(self):
        if self.name == "nbdkit":
            tls = (["--tls-certificates=%s" % self.creds.server]
                   if self.mode == "x509" else ["--tls-psk=%s" % self.creds.psk_file("psk")])
            return ["nbdkit", "-U", self.sock, "-P", self.pidfile, "--tls=require"] + tls + \
                ["file", self.img]
        obj = ("tls-creds-x509,id=t0,endpoint=server,verify-peer=off,dir=%s" % self.creds.server
               if self.mode == "x509" else
               "tls-creds-psk,id=t0,endpoint=server,dir=%s" % self.creds.psk)
        base = super().argv()
        i = base.index("--nbd-server")
        base[i + 1] += ",tls-creds=t0"
        return base[:1] + ["--object", obj] + base[1:]


def main(argv):
    p = argparse.ArgumentParser(prog="nbd-tls-bench.sh")
    p.add_argument("-t", "--runtime", type=int, default=5)
    p.add_argument("-s", "--servers", default=",".join(SERVERS))
    p.add_argument("-w", "--workloads", default=",".join(WORKLOADS))
    p.add_argument("--size", default="256M")
    p.add_argument("--shm", default="/dev/shm")
    p.add_argument("--bexd", default=os.environ.get("BEXD", os.path.join(nb.ROOT, "build", "bexd")))
    a = p.parse_args(argv)
    servers = [s for s in a.servers.split(",") if s]
    workloads = [w for w in a.workloads.split(",") if w]
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = a.size.upper()
    size = int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)
    work = tempfile.mkdtemp(prefix="nbdtls.", dir=a.shm)
    results = {}
    try:
        creds = tlscerts.make_credentials(os.path.join(work, "creds"))
        os.environ["HOME"] = work
        shutil.copytree(creds.client, os.path.join(work, ".pki", "libnbd"))
        img = os.path.join(work, "disk.img")
        nb.make_image(img, size)
        print("TLS x509, runtime %ds per row, image %d MiB, %d CPUs" % (
            a.runtime, size >> 20, os.cpu_count()))
        print("%-11s %-24s %10s %9s %9s %7s %10s" % (
            "server", "workload", "IOPS", "MiB/s", "p99_us", "srvCPU%", "cpu_us/op"))
        for name in servers:
            srv = TLSServer(name, work, img, a.bexd, creds, "x509")
            if not srv.available():
                print("%-11s skipped: %s not found" % (name, srv.argv()[0]), flush=True)
                continue
            try:
                srv.start()
            except Exception as e:
                print("%-11s skipped: %s" % (name, e), flush=True)
                srv.stop()
                continue
            try:
                for w in workloads:
                    try:
                        results[(name, w)] = nb.measure(srv, w, a.runtime, size, work)
                    except Exception as e:
                        results[(name, w)] = {"error": str(e)}
                    nb.print_row(name, w, results[(name, w)])
            finally:
                srv.stop()
        nb.summary(results, [s for s in servers if any(k[0] == s for k in results)], workloads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


sys.exit(main(sys.argv[2:]))
EOF
