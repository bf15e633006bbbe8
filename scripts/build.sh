#!/bin/sh
# Configure (once) and build bexd.  BUILD=dir selects the build directory;
# SANITIZE=1 builds with AddressSanitizer and UBSan.
set -eu
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
if [ ! -f "$BUILD/build.ninja" ]; then
    if [ "${SANITIZE:-0}" = 1 ]; then
        meson setup "$BUILD" -Db_sanitize=address,undefined -Db_lundef=false >/dev/null
    else
        meson setup "$BUILD" >/dev/null
    fi
fi
ninja -C "$BUILD" >/dev/null
