#!/bin/bash
# ceph-down.sh - stop a cluster made by tests/ceph/ceph-up.sh.
#
#   bash tests/ceph/ceph-down.sh [--keep] DIR
#   bash tests/ceph/ceph-down.sh --stale ROOT   (every ROOT/*/ whose owner died)
#
# Signals only the pids in DIR/run/*.pid whose command line still holds
# "-c DIR/ceph.conf" (never a reused pid): SIGCONT first (a test may have
# stopped them), SIGKILL for the OSD (a memstore OSD would save its data
# first), SIGTERM for the mon, SIGKILL after 5 s.  Then removes DIR unless
# --keep, and only if ceph-up.sh's marker is there.
set -uo pipefail
PROG=ceph-down.sh
KEEP=0
if [ "${1:-}" = --stale ]; then
    ROOT=${2:?}
    for d in "$ROOT"/*/; do
        d=${d%/}
        [ -e "$d/.bexd-ceph" ] || continue
        owner=$(cat "$d/owner" 2>/dev/null || true)
        if [ -n "$owner" ] && kill -0 "$owner" 2>/dev/null; then continue; fi
        echo "$PROG: removing stale cluster $d (owner ${owner:-?} is gone)" >&2
        bash "$0" "$d"
    done
    exit 0
fi
[ "${1:-}" = --keep ] && { KEEP=1; shift; }
[ $# -eq 1 ] || { echo "usage: $PROG [--keep] DIR | --stale ROOT" >&2; exit 2; }
DIR=$(realpath -m -- "$1")
[ -d "$DIR" ] || exit 0
[ -e "$DIR/.bexd-ceph" ] || { echo "$PROG: $DIR is not a ceph-up.sh cluster" >&2; exit 1; }
CONF=$DIR/ceph.conf

ours() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q -- "-c $CONF "; }

left=0
for name in osd.0 mon.a; do
    pid=$(tr -dc 0-9 2>/dev/null <"$DIR/run/$name.pid" || true)
    [ -n "$pid" ] && ours "$pid" || continue
    kill -CONT "$pid" 2>/dev/null
    case $name in osd.*) kill -KILL "$pid" ;; *) kill -TERM "$pid" ;; esac 2>/dev/null
    for _ in $(seq 50); do ours "$pid" || break; sleep 0.1; done
    if ours "$pid"; then
        kill -KILL "$pid" 2>/dev/null
        sleep 0.2
        ours "$pid" && left=1
    fi
done
[ $left = 0 ] || { echo "$PROG: a daemon of $DIR survived SIGKILL" >&2; exit 1; }
[ $KEEP = 1 ] || rm -rf -- "$DIR"
exit 0
