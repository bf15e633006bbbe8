#!/usr/bin/env bash
# FUSE on an O_DIRECT node (cache.direct=on) on the real disk: two bexd
# binaries, A and B, alternating, one fresh daemon per row, same image.
#
# Usage: bench/fuse-direct-ab.sh BEXD_A BEXD_B [rounds (3)] [runtime_s (8)]
#   ONLY=regex     run only the workloads matching it (default all below)
#   URING=1        also rows with __org.bexd_io-uring=on (needs enable_uring=Y)
#   DIR=/var/tmp   where the 1 GiB image lives (a real file system, not tmpfs)
#   AIO=io_uring   the file node's aio
# Each row prints MiB/s, IOPS and the server's CPU microseconds per request
# (utime+stime of the daemon over the row), then the medians per binary.
# Built to measure one change of the data path (A = before, B = after) on a
# shared machine: rows alternate, so load drifts over both alike.
set -u
A=$1; B=$2; ROUNDS=${3:-3}; RT=${4:-8}
DIR=${DIR:-/var/tmp}; AIO=${AIO:-io_uring}
W=$(mktemp -d "$DIR/fuseab.XXXX"); T=$(mktemp -d /tmp/fuseab.XXXX)
IMG=$W/disk.img; MNT=$T/mnt; touch "$MNT"
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null
  grep -q " $MNT " /proc/mounts && fusermount3 -u -z "$MNT"
  rm -rf "$W" "$T"
}
trap cleanup EXIT
fio --name=fill --filename="$IMG" --rw=write --bs=1M --size=1G --ioengine=libaio \
    --iodepth=8 --direct=1 --refill_buffers --output=/dev/null || exit 1
. "$(dirname "$0")/proc-stat.sh"   # HZ, cpu_ticks, kill_wait
JOBS=(
  "write 1M 8"
  "read  1M 8"
  "randwrite 4k 32"
)
start() {   # binary, transport
  local xo=
  [ "$2" = uring ] && xo=,__org.bexd_io-uring=on
  rm -f "$T/pid"
  "$1" --blockdev "driver=file,node-name=d,filename=$IMG,cache.direct=on,aio=$AIO" \
       --export "type=fuse,id=f,node-name=d,mountpoint=$MNT,writable=on$xo" \
       --daemonize --pidfile "$T/pid" || return 1
  PID=$(cat "$T/pid")
}
stop() {
  kill_wait
  grep -q " $MNT " /proc/mounts && fusermount3 -u -z "$MNT"
}
TRANSPORTS=dev
[ "${URING:-0}" = 1 ] && TRANSPORTS="dev uring"
echo "uptime: $(uptime)"
printf '%-4s %-6s %-22s %9s %9s %9s\n' bin xport workload MiB/s IOPS us/op
RES=$(mktemp)
for ((r = 1; r <= ROUNDS; r++)); do
  for J in "${JOBS[@]}"; do
    [[ -n "${ONLY:-}" && ! "$J" =~ ${ONLY} ]] && continue
    set -- $J
    for X in $TRANSPORTS; do
      for BIN in A B; do
        if [ $BIN = A ]; then start "$A" "$X"; else start "$B" "$X"; fi || exit 1
        T0=$(cpu_ticks)
        R=$(fio --name=t --filename="$MNT" --rw="$1" --bs="$2" --ioengine=libaio \
                --iodepth="$3" --direct=1 --time_based --runtime="$RT" --size=1G \
                --norandommap --output-format=terse 2>/dev/null |
            awk -F';' '{print ($7+$48)/1024, $8+$49}')
        T1=$(cpu_ticks)
        stop
        read -r MIBS IOPS <<<"${R:-0 0}"
        US=$(awk -v t=$((T1 - T0)) -v hz="$HZ" -v rt="$RT" -v i="$IOPS" \
             'BEGIN { printf "%.1f", (i > 0 ? 1e6 * t / hz / (i * rt) : 0) }')
        printf '%-4s %-6s %-22s %9.0f %9.0f %9s\n' $BIN $X "$1 $2 qd$3" "$MIBS" "$IOPS" "$US" |
          tee -a "$RES"
      done
    done
  done
done
echo "-- medians over $ROUNDS rounds (uptime: $(uptime))"
sort -k1,1 -k2,2 -k3,5 "$RES" | awk '
  { key = $1 " " $2 " " $3 " " $4 " " $5; n[key]++; m[key, n[key]] = $6; u[key, n[key]] = $8 }
  function med(a, k, c,   i, j, t, v) {
    for (i = 1; i <= c; i++) v[i] = a[k, i]
    for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    return c % 2 ? v[(c + 1) / 2] : (v[c / 2] + v[c / 2 + 1]) / 2 }
  END { for (k in n) printf "%-40s MiB/s %8.0f   us/op %8.1f\n", k, med(m, k, n[k]), med(u, k, n[k]) }' | sort
rm -f "$RES"
