#!/bin/bash
# ceph-up.sh - start a throwaway one-node Ceph cluster for bexd's tests.
#
#   bash tests/ceph/ceph-up.sh [--client-timeout S] [--timeout S] DIR
#
# One mon and one memstore OSD (data in the OSD's RAM), no mgr, cephx, pool
# "rbd" of size 1, everything under DIR and bound to 127.0.0.1 on a block of
# 32 free ports.  Writes DIR/env (CEPH_CONF=... lines, also on stdout) once
# a real image create/remove has worked.  DIR/ceph.conf leaves clients
# librados' own timeouts (and bexd its defaults): the tests' own CLI calls
# wait for a slow cluster instead of failing.  --client-timeout S also
# writes DIR/ceph-timeout.conf, the same file with librados op and mount
# timeouts of S seconds in [client], for the one client of a test that must
# see a stopped cluster as errors (env: CEPH_CONF_TIMEOUT).
# DIR/owner holds $BEXD_CEPH_OWNER (default: our parent pid) so a later run
# can tell a cluster whose test run died (see ceph-down.sh --stale ROOT).
# Exit 0 ready; 1 failed (daemons stopped, logs kept in DIR/log); 2 usage.
set -euo pipefail
PROG=ceph-up.sh
HERE=$(cd "$(dirname "$0")" && pwd)
T0=${EPOCHREALTIME/./}
log() { printf '%s: [%4d ms] %s\n' "$PROG" $(( (${EPOCHREALTIME/./} - T0) / 1000 )) "$*" >&2; }
die() { log "$*"; exit 1; }

TIMEOUT=60
CLIENT_TIMEOUT=
while [ $# -gt 1 ]; do
    case $1 in
    --client-timeout) CLIENT_TIMEOUT=${2:?}; shift ;;
    --timeout) TIMEOUT=${2:?}; shift ;;
    *) echo "$PROG: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
[ $# -eq 1 ] || { echo "usage: $PROG [--client-timeout S] [--timeout S] DIR" >&2; exit 2; }
for t in ceph-mon ceph-osd ceph-authtool monmaptool ceph rbd uuidgen ss flock timeout; do
    command -v "$t" >/dev/null || die "$t is not installed"
done
DIR=$(realpath -m -- "$1")
# sun_path limit for the admin sockets under DIR/run; ':' ',' '=' break
# QEMU's rbd: filename syntax
case $DIR in *[!A-Za-z0-9._/+-]*) die "DIR may only hold [A-Za-z0-9._/+-]" ;; esac
[ ${#DIR} -le 56 ] || die "DIR longer than 56 characters"
[ ! -e "$DIR" ] || [ -z "$(ls -A "$DIR")" ] || die "$DIR is not empty"
mkdir -p "$DIR"/{run,log,mon.a,osd.0,tmp}
echo "${BEXD_CEPH_OWNER:-$PPID}" >"$DIR/owner"
touch "$DIR/.bexd-ceph"
CONF=$DIR/ceph.conf
DEADLINE=$(( T0 / 1000000 + TIMEOUT ))

ok=0
cleanup() {
    [ $ok = 1 ] && return
    for f in "$DIR"/log/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 8 "$f" >&2; }; done
    bash "$HERE/ceph-down.sh" --keep "$DIR" || true
}
trap cleanup EXIT
# left: seconds until the overall deadline (at least 1)
left() { local l=$(( DEADLINE - ${EPOCHSECONDS} )); [ $l -gt 0 ] || die "overall timeout ${TIMEOUT}s"; echo $l; }
t() { local max=$1; shift; local l; l=$(left); [ "$max" -le "$l" ] || max=$l; timeout -k 1 "$max" "$@"; }
C() { t 20 ceph -c "$CONF" --connect-timeout 15 "$@"; }

write_conf() {
    local base=$1
    cat >"$CONF" <<CONF
# bexd test cluster (tests/ceph/ceph-up.sh): loopback only, throwaway
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:$base,v1:127.0.0.1:$(( base + 1 ))]
public addr = 127.0.0.1
ms bind ipv6 = false
ms bind port min = $(( base + 2 ))
ms bind port max = $(( base + 31 ))
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = $DIR/run
tmp dir = $DIR/tmp
crash dir = $DIR/tmp
log to syslog = false
mon cluster log file = $DIR/log/cluster.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# this disk may be fuller than the defaults tolerate (the mon would stop)
mon data avail warn = 1
mon data avail crit = 0
# no mgr: no MGR_DOWN warning either
mon mgr mkfs grace = 86400

[mon]
mon data = $DIR/mon.\$id
keyring = $DIR/mon.\$id/keyring
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
admin socket = $DIR/run/\$name.asok
# commit every 50 ms instead of 1 s: each start-up step waits for one
paxos propose interval = 0.05
ms bind retry count = 1

[osd]
osd data = $DIR/osd.\$id
keyring = $DIR/osd.\$id/keyring
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
admin socket = $DIR/run/\$name.asok
osd objectstore = memstore
memstore device bytes = 4294967296
# without this a restarted memstore OSD comes back empty
osd fast shutdown = false
# short PG logs keep the OSD's memory flat under many small writes
osd min pg log entries = 100
osd max pg log entries = 500
osd pg log dups tracked = 500
osd target pg log entries per osd = 4000

[client]
keyring = $DIR/client.admin.keyring
log file = $DIR/log/client.log
admin socket =
CONF
    # [client] is the last section: appended lines belong to it
    if [ -n "$CLIENT_TIMEOUT" ]; then
        cp "$CONF" "$DIR/ceph-timeout.conf"
        printf 'client mount timeout = %s\nrados mon op timeout = %s\nrados osd op timeout = %s\n' \
            "$CLIENT_TIMEOUT" "$CLIENT_TIMEOUT" "$CLIENT_TIMEOUT" >>"$DIR/ceph-timeout.conf"
    fi
}

FSID=$(uuidgen)
A() { t 10 ceph-authtool "$@" >/dev/null; }
A --create-keyring "$DIR/mkfs.keyring" --gen-key -n mon. --cap mon 'allow *'
A --create-keyring "$DIR/client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *'
A --create-keyring "$DIR/osd.0/keyring" --gen-key -n osd.0 \
    --cap mon 'allow profile osd' --cap osd 'allow *'
A "$DIR/mkfs.keyring" --import-keyring "$DIR/client.admin.keyring"
A "$DIR/mkfs.keyring" --import-keyring "$DIR/osd.0/keyring"
chmod 644 "$DIR/client.admin.keyring"

# pid_of NAME: the daemon's pid once its pid file names a live process of
# ours (polled for up to 20 s: a loaded machine can be slow to get there)
pid_of() {
    local p end=$(( EPOCHSECONDS + 20 ))
    while :; do
        p=$(cat "$DIR/run/$1.pid" 2>/dev/null || true)
        if [ -n "$p" ] && tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -- "-c $CONF "; then
            echo "$p"; return 0
        fi
        [ "$EPOCHSECONDS" -lt "$end" ] || return 1
        sleep 0.05
    done
}

# ports: a random block of 32 below the ephemeral range, chosen under a
# lock so that parallel runs do not pick the same one; retried if the mon
# finds a port taken anyway
exec 9>>"${TMPDIR:-/tmp}/bexd-ceph-ports.$(id -u).lock"
t 30 flock 9 || die "port lock"
started=0
for attempt in 1 2 3 4 5; do
    used=" $(ss -Htan | awk '{n = split($4, a, ":"); print a[n]}' | sort -un | tr '\n' ' ') "
    base=$(( 20000 + (RANDOM % 375) * 32 ))
    busy=0
    for (( p = base; p < base + 32; p++ )); do case $used in *" $p "*) busy=1 ;; esac; done
    [ $busy = 0 ] || continue
    write_conf "$base"
    rm -rf "$DIR/mon.a" && mkdir "$DIR/mon.a"
    t 10 monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$base,v1:127.0.0.1:$(( base + 1 ))]" \
        "$DIR/monmap" >/dev/null
    t 20 ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mkfs.keyring" \
        >>"$DIR/log/mon.start.log" 2>&1 9>&-
    if t 20 ceph-mon -c "$CONF" -i a >>"$DIR/log/mon.start.log" 2>&1 9>&- && pid_of mon.a >/dev/null; then
        started=1
        break
    fi
    log "mon did not start on port $base; trying another block"
done
exec 9>&-
[ $started = 1 ] || die "mon did not start"
log "mon up on 127.0.0.1:$base"

OSD_UUID=$(uuidgen)
[ "$(C osd new "$OSD_UUID" 0 2>>"$DIR/log/client.stderr")" = 0 ] || die "ceph osd new failed"
t 30 ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" >>"$DIR/log/osd.start.log" 2>&1 ||
    die "ceph-osd --mkfs failed"
t 30 ceph-osd -c "$CONF" -i 0 >>"$DIR/log/osd.start.log" 2>&1 || die "ceph-osd failed to start"
pid_of osd.0 >/dev/null || die "osd.0 has no pid"
C osd pool create rbd 8 8 replicated >/dev/null 2>>"$DIR/log/client.stderr" || die "pool create failed"
log "osd started, pool created"
# rbd pool init returns once the pool's PGs are active; then a real probe
t 60 rbd -c "$CONF" pool init rbd 2>>"$DIR/log/client.stderr" || die "rbd pool init failed"
t 30 rbd -c "$CONF" create --size 4M rbd/probe 2>>"$DIR/log/client.stderr" || die "rbd create failed"
t 30 rbd -c "$CONF" rm --no-progress rbd/probe 2>>"$DIR/log/client.stderr" || die "rbd rm failed"
cat >"$DIR/env" <<ENV
CEPH_CONF=$CONF
CEPH_KEYRING=$DIR/client.admin.keyring
CEPH_MON_PORT=$(( base + 1 ))
CEPH_MON_V2_PORT=$base
CEPH_POOL=rbd
ENV
[ -z "$CLIENT_TIMEOUT" ] || echo "CEPH_CONF_TIMEOUT=$DIR/ceph-timeout.conf" >>"$DIR/env"
ok=1
log "ready"
cat "$DIR/env"
