#!/bin/sh
# Set up, build, and serve a demo image over NBD; show how to connect.
set -eu
cd "$(dirname "$0")/.."
./scripts/deps.sh
./scripts/build.sh
export PATH=/usr/bin:$PATH

DIR=$(mktemp -d /tmp/bexd-demo.XXXXXX)
IMG=$DIR/demo.img
SOCK=$DIR/nbd.sock
QMP=$DIR/qmp.sock
truncate -s 256M "$IMG"
printf 'Hello from bexd!\n' | dd of="$IMG" conv=notrunc status=none
dd if=/dev/urandom of="$IMG" bs=1M count=8 seek=64 conv=notrunc status=none

./build/bexd \
    --blockdev driver=file,node-name=disk0,filename="$IMG" \
    --nbd-server addr.type=unix,addr.path="$SOCK" \
    --export type=nbd,id=exp0,node-name=disk0,name=demo,writable=on,description="bexd demo image" \
    --chardev socket,id=mon0,path="$QMP",server=on,wait=off --monitor chardev=mon0 \
    --daemonize --pidfile "$DIR/bexd.pid"
stop() { kill "$(cat "$DIR/bexd.pid")" 2>/dev/null || true; rm -rf "$DIR"; }
trap stop EXIT INT TERM

URI="nbd+unix:///demo?socket=$SOCK"
echo "== bexd is serving $IMG as NBD export 'demo' on $SOCK"
echo "== nbdinfo $URI"
nbdinfo "$URI"
echo "== nbdinfo --map $URI"
nbdinfo --map "$URI"
echo "== qemu-img info $URI"
qemu-img info "$URI"
echo "== read the first bytes with nbdcopy"
nbdcopy "$URI" - | head -c 17
echo "== QMP: ./build/bexctl -s $QMP query-block-exports"
./build/bexctl -s "$QMP" query-block-exports
if [ -t 0 ]; then
    echo "== serving until Ctrl-C; try: nbdinfo '$URI'   or   qemu-io -f raw -c 'read -v 0 32' '$URI'"
    while kill -0 "$(cat "$DIR/bexd.pid")" 2>/dev/null; do sleep 1; done
fi
