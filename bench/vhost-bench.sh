#!/usr/bin/env bash
# vhost-bench.sh - bexd's vhost-user-blk export side by side with
# qemu-storage-daemon's, in one run, on identical RAM-backed raw images.
#
#  device side: tests/vhost/vub-client drives the rings directly (no guest):
#               4k random read (QD 32, and QD 16 on each queue), 1M
#               sequential read (QD 4 and 1) and write (QD 4);
#               IOPS, MiB/s and the server's CPU time per request
#               (utime+stime from /proc/PID/stat over the run).
#  guest side:  tests/vhost/guest.py boots a TCG guest on each export and
#               runs dd inside it: 1M sequential write and read (O_DIRECT),
#               4k reads at QD 1 (TCG dominates these numbers: a sanity
#               check more than a benchmark).
#
# Usage: bench/vhost-bench.sh [BUILD_DIR] [SECONDS]   (default: build, 2)
# Env: QUEUES (2), IMG_MB (256), ROUNDS (2: device rows alternate between
# the two servers and keep each one's best, the machine being shared),
# GUEST=0 skips the guest rows, GUEST_MB (192) sets how much each guest dd moves.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${1:-$ROOT/build}
SECS=${2:-2}
QUEUES=${QUEUES:-2}
IMG_MB=${IMG_MB:-256}
GUEST=${GUEST:-1}
GUEST_MB=${GUEST_MB:-192}   # MiB each guest dd moves (at most the image)
ROUNDS=${ROUNDS:-2}
BEXD=$BUILD/bexd
VUB=$BUILD/tests/vhost/vub-client
QSD=$(command -v qemu-storage-daemon || true)

[ -x "$BEXD" ] || { echo "vhost-bench: $BEXD not built" >&2; exit 2; }
[ -x "$VUB" ] || { echo "vhost-bench: $VUB not built" >&2; exit 2; }
[ -n "$QSD" ] || { echo "vhost-bench: qemu-storage-daemon not installed" >&2; exit 2; }

declare -A R SOCKS PIDOF CRASHES
BASE=/dev/shm
[ -d "$BASE" ] && [ -w "$BASE" ] || BASE=/tmp
WORK=$(mktemp -d "$BASE/vhb.XXXXXX")
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# One image for both daemons, served by one at a time: two images made one
# after the other sit in different memory, and on this machine that alone
# moved the 1 MiB rows by 30-50% in favour of whichever image came second.
IMG=$WORK/disk.img
truncate -s "${IMG_MB}M" "$IMG"
# all random data: a 1M read of a hole costs less than one of data
dd if=/dev/urandom of="$IMG" bs=1M count="$IMG_MB" conv=notrunc status=none

# start IMPL -> sets PID and SOCK
start() {
    local impl=$1 bin
    SOCK=$WORK/$impl.sock
    rm -f "$SOCK"
    if [ "$impl" = bexd ]; then bin=$BEXD; else bin=$QSD; fi
    "$bin" --blockdev "driver=file,node-name=disk,filename=$IMG" \
        --export "type=vhost-user-blk,id=vub0,node-name=disk,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$QUEUES" \
        --daemonize --pidfile "$WORK/$impl.pid"
    PID=$(cat "$WORK/$impl.pid")
    PIDS+=("$PID")
    SOCKS[$impl]=$SOCK
    PIDOF[$impl]=$PID
}

# stop IMPL: SIGTERM, then wait until it has gone (it holds the image lock)
stop() {
    local pid=${PIDOF[$1]} i
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 1 500); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.01
    done
    kill -9 "$pid" 2>/dev/null || true
}

field() { # JSON FIELD
    python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2], "?"))' "$1" "$2"
}

# best_of IMPL KEY_IOPS KEY_US FIELD ARGS...: run a device row, keep the best
# throughput (and the CPU per IO of that run) over the rounds
best_of() {
    local impl=$1 k=$2 ku=$3 f=$4 out v; shift 4
    out=$("$VUB" "$@" | tail -n 1) || true     # a crashed server: no number this round
    ensure_up "$impl"
    v=$(field "$out" "$f")
    [ "$v" = "?" ] && return 0
    if [ -z "${R[$impl,$k]:-}" ] || python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)' "$v" "${R[$impl,$k]}"; then
        R[$impl,$k]=$v
        R[$impl,$ku]=$(field "$out" server_us_per_io)
    fi
}

# qemu-storage-daemon 7.2 sometimes aborts when a front-end leaves with
# requests in flight (vhost_user_server_ref: Assertion '!server->wait_idle');
# start it again rather than lose the rest of the run, and say so.
ensure_up() { # IMPL
    local impl=$1
    if ! kill -0 "${PIDOF[$impl]}" 2>/dev/null; then
        echo "vhost-bench: $impl had exited (crash on front-end disconnect?); restarting it" >&2
        start "$impl"
        CRASHES[$impl]=$(( ${CRASHES[$impl]:-0} + 1 ))
    fi
}

device_rows() { # IMPL (one round)
    local impl=$1 s p
    ensure_up "$impl"
    s=${SOCKS[$impl]} p=${PIDOF[$impl]}
    best_of "$impl" rr4k_iops rr4k_us iops "$s" bench randread 4096 32 "$SECS" "$p"
    best_of "$impl" rr4kq_iops rr4kq_us iops -q "$QUEUES" "$s" bench randread 4096 16 "$SECS" "$p"
    best_of "$impl" sr1m_mib sr1m_us MiBps -i "$s" bench read 1048576 4 "$SECS" "$p"
    best_of "$impl" sr1m1_mib sr1m1_us MiBps -i "$s" bench read 1048576 1 "$SECS" "$p"
    best_of "$impl" sw1m_mib sw1m_us MiBps -i "$s" bench write 1048576 4 "$SECS" "$p"
}

keep_max() { # KEY VALUE
    if [ -z "${R[$1]:-}" ] || [ "${R[$1]}" = "?" ] ||
        python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)' "$2" "${R[$1]}" 2>/dev/null; then
        R[$1]=$2
    fi
}

guest_rows() { # IMPL (one boot; the best of the rounds is kept)
    local impl=$1 out
    ensure_up "$impl"
    out=$(python3 "$ROOT/tests/vhost/guest.py" --socket "${SOCKS[$impl]}" --workload bench --queues "$QUEUES" --mb "$GUEST_MB" || true)
    keep_max "$impl,g_sw" "$(field "$out" seq_write_MiBps)"
    keep_max "$impl,g_sr" "$(field "$out" seq_read_MiBps)"
    keep_max "$impl,g_rr" "$(field "$out" read4k_iops)"
}

# interleaved rounds, so that load from elsewhere on the machine hits both
for round in $(seq 1 "$ROUNDS"); do
    for impl in bexd qsd; do start "$impl"; device_rows "$impl"; stop "$impl"; done
done
if [ "$GUEST" != 0 ]; then
    for round in $(seq 1 "$ROUNDS"); do
        for impl in bexd qsd; do start "$impl"; guest_rows "$impl"; stop "$impl"; done
    done
fi

ratio() { python3 -c 'import sys
a, b = sys.argv[1], sys.argv[2]
try:
    print("%.2f" % (float(a) / float(b)))
except (ValueError, ZeroDivisionError):
    print("?")' "$1" "$2"; }
lower_better() { ratio "$2" "$1"; }

printf '%-44s %12s %12s %8s\n' "row (best of $ROUNDS x $SECS s, $QUEUES queues, ${IMG_MB} MiB image in $BASE)" bexd qsd "bexd/qsd"
row() { printf '%-44s %12s %12s %8s\n' "$1" "${R[bexd,$2]}" "${R[qsd,$2]}" "$($3 "${R[bexd,$2]}" "${R[qsd,$2]}")"; }
row "device: 4k randread QD32, IOPS" rr4k_iops ratio
row "device: 4k randread, server us/IO (lower)" rr4k_us lower_better
row "device: 4k randread QD16 x ${QUEUES}q, IOPS" rr4kq_iops ratio
row "device: 4k randread x ${QUEUES}q, us/IO (lower)" rr4kq_us lower_better
row "device: 1M seq read QD4, MiB/s" sr1m_mib ratio
row "device: 1M seq read, server us/IO (lower)" sr1m_us lower_better
row "device: 1M seq read QD1, MiB/s" sr1m1_mib ratio
row "device: 1M seq write QD4, MiB/s" sw1m_mib ratio
row "device: 1M seq write, server us/IO (lower)" sw1m_us lower_better
if [ "$GUEST" != 0 ]; then
    row "guest (TCG): dd 1M seq write, MiB/s" g_sw ratio
    row "guest (TCG): dd 1M seq read, MiB/s" g_sr ratio
    row "guest (TCG): dd 4k read QD1, IOPS" g_rr ratio
fi
echo "(ratio columns: > 1.00 means bexd is better, for us/IO rows too)"
for impl in bexd qsd; do
    [ -n "${CRASHES[$impl]:-}" ] && echo "$impl exited ${CRASHES[$impl]} time(s) during the run and was restarted"
done
true
