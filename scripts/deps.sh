#!/bin/sh
# Install the Debian 12 packages bexd needs to build, test and benchmark.
# Idempotent and quiet when everything is already there.  Run as root.
#   scripts/deps.sh          build + test dependencies
#   scripts/deps.sh --print  print the package list only
# (file: nbdinfo describes an export's content with file(1), and prints
# "sh: file: not found" and undecodable bytes without it.)
set -eu
PKGS="build-essential meson ninja-build pkg-config
 libjansson-dev liburing-dev libcmocka-dev libfuse3-dev fuse3 libgnutls28-dev gnutls-bin
 libpam0g-dev librbd-dev librados-dev
 zlib1g-dev libzstd-dev
 python3 python3-pytest python3-libnbd libnbd-bin nbdkit nbd-server fio
 qemu-utils qemu-system-common qemu-block-extra qemu-system-x86
 linux-image-amd64 busybox-static cpio kmod
 ceph-mon ceph-osd ceph-common ceph-base uuid-runtime
 procps psmisc iproute2 util-linux coreutils file openssl
 clang-14 libclang-rt-14-dev"
# operations (issue 14): socket activation and unit checks (systemd), man
# pages (scdoc, man-db), the Debian package (debhelper, dpkg-dev, fakeroot,
# lintian), /metrics (libmicrohttpd-dev, prometheus), bexctl top (tmux)
PKGS="$PKGS systemd scdoc man-db debhelper dpkg-dev fakeroot lintian
 libmicrohttpd-dev prometheus tmux"

if [ "${1:-}" = "--print" ]; then
    echo $PKGS
    exit 0
fi
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "deps.sh: installing:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends $missing >/dev/null
