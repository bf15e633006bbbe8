#!/bin/bash
# rbd-bench.sh - NBD export of one RBD image from bexd and from
# qemu-storage-daemon, side by side, with fio's rbd engine straight on
# librbd as the ceiling.  One run, one throwaway Ceph cluster (the test
# suite's tests/ceph/ceph-up.sh: one mon, one memstore OSD on 127.0.0.1).
#
#   bench/rbd-bench.sh [-t SECONDS] [-s SIZE_MIB] [-w WORKLOADS] [-i IMPLS]
#
#   -t  seconds per row (default 8)
#   -s  image size in MiB (default 256; written in full before reading)
#   -w  comma list of: randread-4k-qd32, write-1m-qd8, randwrite-4k-qd32,
#       randread-4k-qd1 (default: randread-4k-qd32,write-1m-qd8)
#   -i  comma list of: fio-rbd, bexd, qsd (default: all three)
#   BEXD=path  the bexd binary (default build/bexd)
#   NODE_OPTS=",cache.direct=on"  appended to the rbd node options of both
#
# Each server exports the image with the same command line (rbd node with
# conf=, NBD server on a UNIX socket, writable export); fio's nbd engine is
# the client.  "srv cpu" is the server's user+system CPU over the row, in
# percent of one core.  Everything shares this machine's cores with the
# OSD and mon, so compare rows of one run, not across machines.
set -euo pipefail
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
BEXD=${BEXD:-$ROOT/build/bexd}
T=8
SIZE=256
WORKLOADS=randread-4k-qd32,write-1m-qd8
IMPLS=fio-rbd,bexd,qsd
while getopts "t:s:w:i:h" o; do
    case $o in
    t) T=$OPTARG ;;
    s) SIZE=$OPTARG ;;
    w) WORKLOADS=$OPTARG ;;
    i) IMPLS=$OPTARG ;;
    *) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
    esac
done
for t in fio rbd ceph-mon ceph-osd; do
    command -v $t >/dev/null || { echo "rbd-bench: $t is not installed" >&2; exit 1; }
done
case ,$IMPLS, in *,bexd,*) [ -x "$BEXD" ] || { echo "rbd-bench: no $BEXD (set BEXD=)" >&2; exit 1; } ;; esac

WORK=$(mktemp -d /tmp/bxrb.XXXX)
CL=$WORK/c
SRV_PID=
cleanup() {
    [ -n "$SRV_PID" ] && kill "$SRV_PID" 2>/dev/null && sleep 0.3
    bash "$ROOT/tests/ceph/ceph-down.sh" "$CL" || true
    rm -rf "$WORK"
}
trap cleanup EXIT

BEXD_CEPH_OWNER=$$ bash "$ROOT/tests/ceph/ceph-up.sh" "$CL" >"$WORK/env" 2>"$WORK/up.log" ||
    { cat "$WORK/up.log" >&2; exit 1; }
set -a; . "$WORK/env"; set +a
IMG=bench
rbd create --size "${SIZE}M" rbd/$IMG
SOCK=$WORK/nbd.sock
URI="nbd+unix:///?socket=$SOCK"

# fill the image so that reads hit real objects
fio --name=fill --ioengine=rbd --clientname=admin --pool=rbd --rbdname=$IMG \
    --rw=write --bs=4M --iodepth=4 --size=${SIZE}M --output-format=terse >/dev/null

fio_args() {   # fio_args WORKLOAD
    case $1 in
    randread-4k-qd32) echo "--rw=randread --bs=4k --iodepth=32" ;;
    randread-4k-qd1) echo "--rw=randread --bs=4k --iodepth=1" ;;
    randwrite-4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    write-1m-qd8) echo "--rw=write --bs=1M --iodepth=8" ;;
    *) echo "rbd-bench: unknown workload $1" >&2; exit 2 ;;
    esac
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

start_server() {   # start_server IMPL
    local bin=$BEXD
    [ "$1" = qsd ] && bin=qemu-storage-daemon
    rm -f "$SOCK" "$WORK/pid"
    "$bin" --blockdev "driver=rbd,node-name=r0,pool=rbd,image=$IMG,conf=$CEPH_CONF${NODE_OPTS:-}" \
        --nbd-server "addr.type=unix,addr.path=$SOCK" \
        --export "type=nbd,id=e0,node-name=r0,name=,writable=on" \
        --daemonize --pidfile "$WORK/pid"
    SRV_PID=$(cat "$WORK/pid")
}

stop_server() {
    kill "$SRV_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$SRV_PID" 2>/dev/null || break; sleep 0.05; done
    SRV_PID=
}

run_row() {   # run_row IMPL WORKLOAD
    local impl=$1 w=$2 engine out c0 c1 hz iops bw cpu=-
    if [ "$impl" = fio-rbd ]; then
        engine="--ioengine=rbd --clientname=admin --pool=rbd --rbdname=$IMG"
    else
        engine="--ioengine=nbd --uri=$URI"
        c0=$(cpu_ticks "$SRV_PID")
    fi
    # shellcheck disable=SC2046,SC2086
    out=$(fio --name=$w $engine $(fio_args "$w") --size=${SIZE}M --time_based --runtime="$T" \
        --ramp_time=1 --output-format=json 2>"$WORK/fio.err") || { cat "$WORK/fio.err" >&2; echo "$out" | tail -5 >&2; exit 1; }
    if [ "$impl" != fio-rbd ]; then
        c1=$(cpu_ticks "$SRV_PID")
        hz=$(getconf CLK_TCK)
        cpu=$(( (c1 - c0) * 100 / hz / (T + 1) ))%
    fi
    read -r iops bw < <(echo "$out" | /usr/bin/python3 -c '
import json, sys
s = sys.stdin.read()
j = json.loads(s[s.index("{"):])["jobs"][0]   # the rbd engine prints a line first
d = j["read"] if j["read"]["io_bytes"] else j["write"]
print("%d %.1f" % (d["iops"], d["bw"] / 1024.0))')
    printf '%-18s %-8s %10s %10s %8s\n' "$w" "$impl" "$iops" "$bw" "$cpu"
}

printf '# %s, image %s MiB, %s s per row, %s cores\n' "$(date -u +%FT%TZ)" "$SIZE" "$T" "$(nproc)"
printf '%-18s %-8s %10s %10s %8s\n' workload server IOPS MiB/s "srv cpu"
IFS=, read -r -a WL <<<"$WORKLOADS"
IFS=, read -r -a IM <<<"$IMPLS"
for impl in "${IM[@]}"; do
    [ "$impl" = fio-rbd ] || start_server "$impl"
    for w in "${WL[@]}"; do run_row "$impl" "$w"; done
    [ "$impl" = fio-rbd ] || stop_server
done
