#!/usr/bin/env bash
# FUSE export throughput, bexd side by side with qemu-storage-daemon, one run.
#
# Both daemons get the same command line (bexd is a drop-in replacement):
# a RAM-backed (/dev/shm) raw image exported with type=fuse on a regular file,
# then fio runs the same jobs on the mounted file for each.  Each row prints
# IOPS, MiB/s, the server's CPU use and CPU microseconds per operation, the
# client's (fio with its jobs) CPU microseconds per operation, and the
# busiest server thread's CPU as % of one CPU (top_thr%).
#
# Usage: bench/fuse-bench.sh [runtime_s] [servers...]
#   servers: bexd qsd (default both), and bexd variants: bexd-uring (FUSE
#   over io_uring, needs enable_uring=Y), bexd-q2 (two iothreads, two
#   queues: iothread list), bexd-uring-q2, bexd-io1 (one iothread);
#   JOBS_N=n runs every row with n fio jobs, one per CPU (group reported),
#   so that both queues and both CPUs' kernel queues get work;
#   BEXD=path overrides the binary
#   (default build/bexd, else build-fuse/bexd); SIZE=image size (default 1G);
#   EXTRA_BLOCKDEV / EXTRA_EXPORT: appended options (e.g. aio=io_uring);
#   ONLY=regex: run only the workloads matching it (e.g. ONLY='1M').
set -u
RT=${1:-4}; shift || true
SERVERS=${*:-"bexd qsd"}
HERE=$(cd "$(dirname "$0")/.." && pwd)
BEXD=${BEXD:-$HERE/build/bexd}
[ -x "$BEXD" ] || BEXD=$HERE/build-fuse/bexd
SIZE=${SIZE:-1G}
D=$(mktemp -d /dev/shm/fusebench.XXXX)
T=$(mktemp -d /tmp/fusebench.XXXX)
IMG=$D/disk.img; MNT=$T/mnt; touch "$MNT"
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null
  grep -q " $MNT " /proc/mounts && fusermount3 -u -z "$MNT"
  rm -rf "$D" "$T"
}
trap cleanup EXIT
truncate -s "$SIZE" "$IMG"
# Real data everywhere: reads of holes would measure nothing.
fio --name=fill --filename="$IMG" --rw=write --bs=1M --size="$SIZE" --ioengine=psync \
    --refill_buffers --output=/dev/null

start() {
  local bin objs=() xo=
  case $1 in
    bexd*) bin=$BEXD ;;
    qsd)  bin=qemu-storage-daemon ;;
  esac
  case $1 in *uring*) xo+=,__org.bexd_io-uring=on ;; esac
  case $1 in
    *-q2) objs=(--object iothread,id=io0 --object iothread,id=io1); xo+=,iothread.0=io0,iothread.1=io1 ;;
    *-io1) objs=(--object iothread,id=io0); xo+=,iothread=io0 ;;
  esac
  rm -f "$T/pid"
  "$bin" "${objs[@]}" \
         --blockdev "driver=file,node-name=d,filename=$IMG${EXTRA_BLOCKDEV:+,$EXTRA_BLOCKDEV}" \
         --export "type=fuse,id=f,node-name=d,mountpoint=$MNT,writable=on$xo${EXTRA_EXPORT:+,$EXTRA_EXPORT}" \
         --daemonize --pidfile "$T/pid" || { echo "$1: failed to start" >&2; return 1; }
  PID=$(cat "$T/pid")
  grep -q " $MNT " /proc/mounts || { echo "$1: not mounted" >&2; return 1; }
}
stop() {
  kill_wait
  grep -q " $MNT " /proc/mounts && fusermount3 -u -z "$MNT"
}
. "$HERE/bench/proc-stat.sh"   # HZ, cpu_ticks, thread_ticks, top_thread, kill_wait

JOBS=(
  "randread  4k psync  1 1"
  "randwrite 4k psync  1 1"
  "randread  4k libaio 32 1"
  "randwrite 4k libaio 32 1"
  "read      1M libaio 8 1"
  "write     1M libaio 8 1"
  "randread  4k psync  1 0"
  "read      1M psync  1 0"
)
SPLIT=()
[ "${JOBS_N:-1}" -gt 1 ] && SPLIT=(--cpus_allowed=0-$(( $(nproc) - 1 )) --cpus_allowed_policy=split)
# Rows alternate between the servers (one fresh daemon per row), so that the
# load of a shared machine drifts over both alike.
[[ "$SERVERS" == *uring* ]] && ! grep -q Y /sys/module/fuse/parameters/enable_uring 2>/dev/null &&
  echo "note: enable_uring is off: the uring rows fall back to /dev/fuse" >&2
printf '%-13s %-32s %9s %9s %7s %9s %9s %8s\n' server workload IOPS MiB/s srvCPU% cpu_us/op cli_us/op top_thr%
TIMEFORMAT='%3U %3S'    # bash's `time`: the client's (fio's and its jobs') CPU seconds
for J in "${JOBS[@]}"; do
  [[ -n "${ONLY:-}" && ! "$J" =~ ${ONLY} ]] && continue
  for S in $SERVERS; do
    start "$S" || continue
    set -- $J
    T0=$(cpu_ticks); thread_ticks >"$T/th0"
    { time fio --name=t --filename="$MNT" --rw="$1" --bs="$2" --ioengine="$3" --iodepth="$4" \
            --direct="$5" --time_based --runtime="$RT" --size="$SIZE" --norandommap \
            --numjobs="${JOBS_N:-1}" --group_reporting "${SPLIT[@]}" \
            --invalidate=1 --output-format=terse >"$T/fio.out" 2>/dev/null; } 2>"$T/cli"
    R=$(awk -F';' '{print $8+$49, ($7+$48)/1024}' "$T/fio.out")
    T1=$(cpu_ticks); thread_ticks >"$T/th1"
    read -r IOPS MIBS <<<"${R:-0 0}"
    CPU=$(awk -v t=$(( T1 - T0 )) -v hz="$HZ" -v rt="$RT" -v i="${IOPS:-0}" -v c="$(cat "$T/cli")" \
          'BEGIN { s=t/hz; split(c, u, " "); printf "%.0f %.1f %.1f", 100*s/rt,
                   (i>0 ? 1e6*s/(i*rt) : 0), (i>0 ? 1e6*(u[1]+u[2])/(i*rt) : 0) }')
    printf '%-13s %-32s %9s %9.0f %7s %9s %9s %8s\n' "$S" "$1 $2 $3 qd=$4 direct=$5" "$IOPS" "$MIBS" $CPU \
        "$(top_thread "$T/th0" "$T/th1")"
    stop
  done
done
