#!/usr/bin/env bash
# How one export scales with iothreads: NBD clients spread over an
# `iothread` list, FUSE queues (cloned /dev/fuse fds) and FUSE over
# io_uring, 1 against 2 iothreads, on a RAM-backed image.
#
# Usage: bench/scaling-bench.sh [runtime_s]
#   BEXD=path (default build/bexd); SIZE (default 512M); ROUNDS (default 1:
#   each configuration once; more alternate them and print every round);
#   FUSE=0 skips the FUSE rows; CLIENTS="1 2" runs the NBD and FUSE rows
#   with 1 and with 2 fio jobs (default 2; one job is not pinned, two are
#   pinned one per CPU).
#
# NBD rows: fio's nbd engine, 2 jobs (one connection each, one per CPU) at
# qd 16, 4k random read and 1M sequential read, against an export on
#   io1   one iothread           (iothread=io0)
#   io2   two iothreads          (iothread.0=io0,iothread.1=io1)
#   pool  no iothread: bexd's worker loops (one per CPU)
# FUSE rows: bench/fuse-bench.sh with JOBS_N=2 (two fio jobs, one per CPU)
# for bexd-io1, bexd-q2, bexd-uring and bexd-uring-q2.
# vhost-user-blk rows (VHOST=0 skips them): tests/vhost/vub-client drives 2
# virtqueues at 16 requests each (32 in flight), 4k random read and write,
# against an export with num-queues=2 on one iothread (vub-io1) or on two
# (vub-io2: queue 0 in io0, queue 1 in io1).  VUB=path (default
# build/tests/vhost/vub-client).
# Every row prints IOPS, MiB/s and the server's and the client's (fio with
# its jobs, or vub-client) CPU microseconds per op, and the busiest server
# thread's CPU as % of one CPU (top_thr%).
set -u
RT=${1:-4}
HERE=$(cd "$(dirname "$0")/.." && pwd)
BEXD=${BEXD:-$HERE/build/bexd}
SIZE=${SIZE:-512M}
ROUNDS=${ROUNDS:-1}
CLIENTS=${CLIENTS:-2}
D=$(mktemp -d /dev/shm/scalebench.XXXX)
T=$(mktemp -d /tmp/scalebench.XXXX)
IMG=$D/disk.img
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null
  rm -rf "$D" "$T"
}
trap cleanup EXIT
truncate -s "$SIZE" "$IMG"
fio --name=fill --filename="$IMG" --rw=write --bs=1M --size="$SIZE" --ioengine=psync \
    --refill_buffers --output=/dev/null
. "$HERE/bench/proc-stat.sh"   # HZ, cpu_ticks, thread_ticks, top_thread, kill_wait

start_nbd() {
  local xo
  case $1 in
    io1) xo=,iothread=io0 ;;
    io2) xo=,iothread.0=io0,iothread.1=io1 ;;
    pool) xo= ;;
  esac
  rm -f "$T/pid" "$T/nbd.sock"
  "$BEXD" --object iothread,id=io0 --object iothread,id=io1 \
      --blockdev "driver=file,node-name=d,filename=$IMG" \
      --nbd-server "addr.type=unix,addr.path=$T/nbd.sock" \
      --export "type=nbd,id=e,node-name=d,writable=on$xo" \
      --daemonize --pidfile "$T/pid" || return 1
  PID=$(cat "$T/pid")
}
VUB=${VUB:-$HERE/build/tests/vhost/vub-client}
start_vub() {
  local xo
  case $1 in
    io1) xo=,iothread=io0 ;;
    io2) xo=,iothread.0=io0,iothread.1=io1 ;;
  esac
  rm -f "$T/pid" "$T/vub.sock"
  "$BEXD" --object iothread,id=io0 --object iothread,id=io1 \
      --blockdev "driver=file,node-name=d,filename=$IMG" \
      --export "type=vhost-user-blk,id=e,node-name=d,writable=on,num-queues=2,addr.type=unix,addr.path=$T/vub.sock$xo" \
      --daemonize --pidfile "$T/pid" || return 1
  PID=$(cat "$T/pid")
}
stop() {
  kill_wait
}

printf '%-13s %-32s %9s %9s %9s %9s %8s\n' config workload IOPS MiB/s cpu_us/op cli_us/op top_thr%
TIMEFORMAT='%3U %3S'    # bash's `time`: the client's (fio's and its jobs') CPU seconds
cli_us() {   # cli_us IOPS: client CPU microseconds per op from $T/cli
  awk -v i="${1:-0}" -v rt="$RT" -v c="$(cat "$T/cli" 2>/dev/null)" \
      'BEGIN { split(c, u, " "); printf "%.1f", (i>0 ? 1e6*(u[1]+u[2])/(i*rt) : 0) }'
}
for r in $(seq "$ROUNDS"); do
  for N in $CLIENTS; do
    PIN=()
    [ "$N" -gt 1 ] && PIN=(--cpus_allowed=0-$(( $(nproc) - 1 )) --cpus_allowed_policy=split)
    for J in "randread 4k" "read 1M"; do
      set -- $J
      for C in io1 io2 pool; do
        start_nbd "$C" || continue
        T0=$(cpu_ticks); thread_ticks >"$T/th0"
        { time fio --name=t --ioengine=nbd --uri="nbd+unix:///d?socket=$T/nbd.sock" \
                --rw="$1" --bs="$2" --iodepth=16 --numjobs="$N" --group_reporting "${PIN[@]}" \
                --time_based --runtime="$RT" --size="$SIZE" --norandommap \
                --output-format=terse >"$T/fio.out" 2>/dev/null; } 2>"$T/cli"
        R=$(grep '^3;' "$T/fio.out" | awk -F';' '{print $8+$49, ($7+$48)/1024}')
        T1=$(cpu_ticks); thread_ticks >"$T/th1"
        read -r IOPS MIBS <<<"${R:-0 0}"
        US=$(awk -v t=$(( T1 - T0 )) -v hz="$HZ" -v rt="$RT" -v i="${IOPS:-0}" \
             'BEGIN { printf "%.1f", (i>0 ? 1e6*(t/hz)/(i*rt) : 0) }')
        printf '%-13s %-32s %9s %9.0f %9s %9s %8s\n' "nbd-$C" "$1 $2 qd16 x$N conns" "$IOPS" "$MIBS" "$US" \
            "$(cli_us "$IOPS")" "$(top_thread "$T/th0" "$T/th1")"
        stop
      done
    done
  done
  if [ "${VHOST:-1}" != 0 ] && [ -x "$VUB" ]; then
    for W in randread randwrite; do
      for C in io1 io2; do
        start_vub "$C" || continue
        thread_ticks >"$T/th0"
        { time "$VUB" -q 2 "$T/vub.sock" bench "$W" 4096 16 "$RT" "$PID" >"$T/vub.out"; } 2>"$T/cli"
        thread_ticks >"$T/th1"
        R=$(tail -1 "$T/vub.out")
        IOPS=$(echo "$R" | python3 -c 'import json,sys; print(json.load(sys.stdin)["iops"])' 2>/dev/null)
        US=$(echo "$R" | python3 -c 'import json,sys; print(json.load(sys.stdin)["server_us_per_io"])' 2>/dev/null)
        MIBS=$(awk -v i="${IOPS:-0}" 'BEGIN { print i * 4096 / 1048576 }')
        printf '%-13s %-32s %9s %9.0f %9s %9s %8s\n' "vub-$C" "$W 4k qd16 x2 queues" "${IOPS:-0}" "$MIBS" \
            "${US:-0}" "$(cli_us "${IOPS:-0}")" "$(top_thread "$T/th0" "$T/th1")"
        stop
      done
    done
  fi
  [ "${FUSE:-1}" = 0 ] && continue
  for N in $CLIENTS; do
    BEXD=$BEXD SIZE=$SIZE JOBS_N=$N ONLY='libaio' \
        "$HERE/bench/fuse-bench.sh" "$RT" bexd-io1 bexd-q2 bexd-uring bexd-uring-q2 2>/dev/null |
        tail -n +2 | sed "s/\$/ x$N jobs/"
  done
done
