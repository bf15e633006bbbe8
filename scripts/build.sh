#!/bin/sh
# Configure (once) and build bexd.  BUILD=dir selects the build directory;
# SANITIZE=1 builds with AddressSanitizer and UBSan.  A build directory
# configured otherwise than asked (a stale build-asan without sanitizers,
# which would silently drop every sanitizer check) is reconfigured.
set -eu
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
if [ "${SANITIZE:-0}" = 1 ]; then
    want=address,undefined
else
    want=none
fi
if [ ! -f "$BUILD/build.ninja" ]; then
    if [ "$want" != none ]; then
        meson setup "$BUILD" -Db_sanitize=$want -Db_lundef=false >/dev/null
    else
        meson setup "$BUILD" >/dev/null
    fi
fi
# b_sanitize as configured
sanitize_of() {
    meson introspect --buildoptions "$1" 2>/dev/null | /usr/bin/python3 -c '
import json, sys
v = [o["value"] for o in json.load(sys.stdin) if o["name"] == "b_sanitize"]
print(v[0] if v else "?")'
}
have=$(sanitize_of "$BUILD")
if [ "$have" != "$want" ]; then
    echo "$BUILD: b_sanitize is '${have:-?}', want '$want': reconfiguring" >&2
    if [ "$want" != none ]; then
        meson configure "$BUILD" -Db_sanitize=$want -Db_lundef=false >/dev/null
    else
        meson configure "$BUILD" -Db_sanitize=none >/dev/null
    fi
    have=$(sanitize_of "$BUILD")
    if [ "$have" != "$want" ]; then
        echo "$BUILD: b_sanitize is still '${have:-?}', not '$want'" >&2
        exit 1
    fi
fi
ninja -C "$BUILD" >/dev/null
