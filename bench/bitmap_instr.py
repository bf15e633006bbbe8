#!/usr/bin/python3
"""Instructions per 4 KiB write, with no dirty bitmap and with two enabled
ones, counted by valgrind (callgrind) in bexd: a measure the machine's load
does not move, where IOPS and CPU time do (this VM has no hardware
counters for perf stat).

    bench/bitmap_instr.py [-n WRITES] [--rounds R] [--bexd PATH ...]

One bexd per binary runs under callgrind (instrumentation on only while it
is measured), serves a 1 GiB RAM image in /dev/shm over NBD, and gets R
rounds of: no bitmap, then two enabled empty bitmaps (64 KiB and 4 KiB
granularity, as the bench's bitmaps row), each round's counters zeroed
before fio makes WRITES 4 KiB random writes at qd 32 (--number_ios) and
dumped after.  Reported per binary and configuration: all instructions of
the process per write (the loops' polling adds a little that depends on
timing) and the instructions of bnode_set_dirty (marking) per write, with
its share of the whole.  User-space instructions only: the kernel's work
per write (receive, reply) is not counted, so the share is an upper bound
of the share of the CPU time.
"""
import argparse
import glob
import json
import os
import re
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


def totals(path):
    """(all instructions, inclusive instructions of bnode_set_dirty) of a dump."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                         capture_output=True, text=True, errors="replace", check=True).stdout
    total = mark = 0
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(\(.*?\)\s+)?(PROGRAM TOTALS|\S+:(\S+))", line)
        if not m:
            continue
        n = int(m.group(1).replace(",", ""))
        if m.group(3) == "PROGRAM TOTALS":
            total = n
        elif m.group(4) and m.group(4).split()[0] == "bnode_set_dirty":
            mark = max(mark, n)
    return total, mark


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", "--writes", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bexd", action="append",
                   help="bexd binaries to compare (default build/bexd)")
    p.add_argument("--keep", action="store_true",
                   help="keep the last dump of each configuration (for callgrind_annotate)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    binaries = args.bexd or [os.path.join(ROOT, "build", "bexd")]
    work = tempfile.mkdtemp(prefix="bminstr", dir="/dev/shm")
    results = {}
    try:
        img = os.path.join(work, "disk.img")
        with open(img, "wb") as f:
            chunk = os.urandom(MiB)
            for _ in range(1024):
                f.write(chunk)
        for binary in binaries:
            qmp_path = os.path.join(work, "qmp.sock")
            sock = os.path.join(work, "nbd.sock")
            outpat = os.path.join(work, "cg.out")
            d = subprocess.Popen(
                ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                 "--callgrind-out-file=" + outpat, binary,
                 "--chardev", "socket,id=m,path=%s,server=on,wait=off" % qmp_path,
                 "--monitor", "chardev=m",
                 "--blockdev", "driver=file,node-name=f0,filename=%s" % img,
                 "--blockdev", "driver=raw,node-name=disk,file=f0",
                 "--nbd-server", "addr.type=unix,addr.path=%s" % sock],
                stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 120
                while not os.path.exists(qmp_path):
                    if d.poll() is not None or time.monotonic() > deadline:
                        sys.exit("bexd under valgrind did not start")
                    time.sleep(0.2)
                q = QMP(qmp_path)
                q.execute("block-export-add", type="nbd", id="e", node_name="disk", name="e",
                          writable=True)
                uri = "nbd+unix:///e?socket=%s" % sock
                subprocess.run(["callgrind_control", "--instr=on", str(d.pid)], check=True,
                               stdout=subprocess.DEVNULL)

                def fio(n):
                    subprocess.run(["fio", "--name=b", "--ioengine=nbd", "--uri=" + uri,
                                    "--rw=randwrite", "--bs=4k", "--iodepth=32",
                                    "--size=1g", "--number_ios=%d" % n, "--randrepeat=0",
                                    "--output-format=json",
                                    "--output=" + os.path.join(work, "fio.json")],
                                   check=True, stdout=subprocess.DEVNULL)
                    with open(os.path.join(work, "fio.json")) as f:
                        return json.load(f)["jobs"][0]["write"]["total_ios"]

                fio(2000)                               # warm-up
                res = results.setdefault(binary, {"none": [], "two": []})
                for r in range(args.rounds):
                    for conf in ("none", "two"):
                        for i in range(2):
                            if conf == "two":
                                q.execute("block-dirty-bitmap-add", node="disk",
                                          name="b%d" % i,
                                          granularity=65536 if i == 0 else 4096)
                        subprocess.run(["callgrind_control", "--zero", str(d.pid)],
                                       check=True, stdout=subprocess.DEVNULL)
                        n = fio(args.writes)
                        for f in glob.glob(outpat + "*"):
                            os.unlink(f)
                        subprocess.run(["callgrind_control", "--dump=" + conf, str(d.pid)],
                                       check=True, stdout=subprocess.DEVNULL)
                        dumps = sorted(glob.glob(outpat + "*"))
                        total, mark = totals(dumps[-1])
                        if args.keep:
                            kept = "/dev/shm/bminstr-%s-%s.out" % (os.path.basename(
                                os.path.dirname(os.path.dirname(binary))) or "bexd", conf)
                            shutil.copyfile(dumps[-1], kept)
                        res[conf].append({"writes": n, "instr": total, "mark": mark})
                        print("%s round %d %s: %.0f instructions per write, %.0f marking" % (
                            binary, r, conf, total / n, mark / n), file=sys.stderr, flush=True)
                        if conf == "two":
                            for i in range(2):
                                q.execute("block-dirty-bitmap-remove", node="disk",
                                          name="b%d" % i)
                q.close()
            finally:
                d.terminate()
                d.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for binary, res in results.items():
        print(binary)
        none = statistics.median(x["instr"] / x["writes"] for x in res["none"])
        two = statistics.median(x["instr"] / x["writes"] for x in res["two"])
        mark = statistics.median(x["mark"] / x["writes"] for x in res["two"])
        print("  instructions per write: none %.0f, two bitmaps %.0f (%+.1f%%); "
              "bnode_set_dirty %.0f per write = %.2f%% of the two-bitmap total" % (
                  none, two, 100 * (two / none - 1), mark, 100 * mark / two))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
