#!/bin/sh
# Run one libFuzzer target for SECONDS (default 60):
#   scripts/fuzz.sh TARGET [SECONDS] [libFuzzer options...]
#   scripts/fuzz.sh list
# Targets live in fuzz/ (fuzz-nbd, fuzz-vhost-user, fuzz-qmp, fuzz-keyval, fuzz-cli,
# fuzz-qcow2, fuzz-fuse when libfuse3 is there);
# they are built with clang 14, ASan, UBSan and libFuzzer in build-fuzz/.
# The run starts from the seed corpus fuzz/corpus/TARGET (copied: the
# repository is not written) and from fuzz/regressions/TARGET (inputs that
# once crashed, each a regression test); new crashes land in
# $FUZZ_OUT (default /tmp/bexd-fuzz/TARGET).  The last line is libFuzzer's
# summary: executions, coverage, and whether it found anything.
set -eu
cd "$(dirname "$0")/.."
BUILD=${FUZZ_BUILD:-build-fuzz}
if [ ! -f "$BUILD/build.ninja" ]; then
    CC=${FUZZ_CC:-clang-14} meson setup "$BUILD" -Dfuzzing=true -Dtests=disabled \
        -Db_sanitize=address,undefined -Db_lundef=false >/dev/null
fi
nice ninja -C "$BUILD" >/dev/null
if [ "${1:-}" = list ] || [ $# -eq 0 ]; then
    for f in fuzz/*.c; do
        t=${f#fuzz/}; t=${t%.c}
        [ -x "$BUILD/fuzz/$t" ] && echo "$t"
    done
    exit 0
fi
T=$1
SECS=${2:-60}
[ $# -ge 2 ] && shift 2 || shift 1
OUT=${FUZZ_OUT:-/tmp/bexd-fuzz/$T}
mkdir -p "$OUT/corpus" "$OUT/crashes"
cp -n fuzz/corpus/"$T"/* "$OUT/corpus/" 2>/dev/null || true
[ -d fuzz/regressions/"$T" ] && cp -n fuzz/regressions/"$T"/* "$OUT/corpus/" 2>/dev/null
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/tests/lsan.supp}
exec "$BUILD/fuzz/$T" -max_total_time="$SECS" -timeout=25 -rss_limit_mb=4096 \
    -artifact_prefix="$OUT/crashes/" -print_final_stats=1 "$@" "$OUT/corpus"
