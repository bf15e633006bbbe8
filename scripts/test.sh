#!/bin/sh
# Set up and run the whole test suite: unit tests (cmocka) and functional
# tests (pytest, real daemons and clients), the latter against the
# ASan/UBSan build.  Ends with "N passed, N failed, N skipped" (xfailed too
# when there are any), after a line splitting the functional tests into
# bexd's and the reference daemon's.
set -u
cd "$(dirname "$0")/.."
./scripts/deps.sh || exit 1
export PATH=/usr/bin:/usr/sbin:/sbin:$PATH
./scripts/build.sh || { echo "build failed"; echo "0 passed, 1 failed"; exit 1; }
BUILD=build-asan SANITIZE=1 ./scripts/build.sh || { echo "sanitizer build failed"; echo "0 passed, 1 failed"; exit 1; }

LOG=$(mktemp -d /tmp/bexd-test.XXXXXX)
ASAN_DIR=$LOG/asan
mkdir -p "$ASAN_DIR"

# Unit tests
meson test -C build --print-errorlogs >"$LOG/unit.txt" 2>&1
unit_rc=$?
tail -n 12 "$LOG/unit.txt"
unit_pass=$(sed -n 's/^Ok: *\([0-9]*\).*/\1/p' "$LOG/unit.txt" | tail -1)
unit_fail=$(sed -n 's/^Fail: *\([0-9]*\).*/\1/p' "$LOG/unit.txt" | tail -1)
unit_pass=${unit_pass:-0}; unit_fail=${unit_fail:-0}
[ "$unit_rc" -ne 0 ] && [ "$unit_fail" -eq 0 ] && unit_fail=1

# The same unit tests under ASan/UBSan: any report is a failure (undefined
# behaviour on hostile input, e.g. a misaligned guest table, is a bug even
# where x86 forgives it).
ASAN_OPTIONS="detect_leaks=1" UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
LSAN_OPTIONS="suppressions=$PWD/tests/lsan.supp" \
    meson test -C build-asan --print-errorlogs >"$LOG/unit-asan.txt" 2>&1
asan_rc=$?
tail -n 8 "$LOG/unit-asan.txt"
asan_pass=$(sed -n 's/^Ok: *\([0-9]*\).*/\1/p' "$LOG/unit-asan.txt" | tail -1)
asan_fail=$(sed -n 's/^Fail: *\([0-9]*\).*/\1/p' "$LOG/unit-asan.txt" | tail -1)
asan_pass=${asan_pass:-0}; asan_fail=${asan_fail:-0}
[ "$asan_rc" -ne 0 ] && [ "$asan_fail" -eq 0 ] && asan_fail=1
unit_pass=$((unit_pass + asan_pass)); unit_fail=$((unit_fail + asan_fail))

# Fuzzing: a short run of every libFuzzer target (clang 14, ASan, UBSan)
# from its seed corpus and regression inputs; a crash, leak, sanitizer
# report or hang fails it.  FUZZ_SECONDS=0 skips them.
fuzz_pass=0; fuzz_fail=0
if [ "${FUZZ_SECONDS:-20}" -gt 0 ]; then
    for t in $(./scripts/fuzz.sh list 2>"$LOG/fuzz-build.txt"); do
        if FUZZ_OUT="$LOG/fuzz/$t" ./scripts/fuzz.sh "$t" "${FUZZ_SECONDS:-20}" >"$LOG/fuzz-$t.txt" 2>&1; then
            fuzz_pass=$((fuzz_pass + 1))
            echo "fuzz $t: ok ($(sed -n 's/^stat::number_of_executed_units: *//p' "$LOG/fuzz-$t.txt") runs)"
        else
            fuzz_fail=$((fuzz_fail + 1))
            echo "fuzz $t: FAILED"; grep -E "ERROR|SUMMARY|runtime error" "$LOG/fuzz-$t.txt" | head -5
        fi
    done
    [ -s "$LOG/fuzz-build.txt" ] && { echo "fuzz build failed:"; tail -5 "$LOG/fuzz-build.txt"; fuzz_fail=$((fuzz_fail + 1)); }
fi
unit_pass=$((unit_pass + fuzz_pass)); unit_fail=$((unit_fail + fuzz_fail))

# Functional tests against the sanitizer build; sanitizer reports go to files.
export BEXD_BUILD=$PWD/build-asan
# handle_abort: an abort() or failed assert() prints a stack (a report
# file) and is an error exit, not a silent SIGABRT.
export ASAN_OPTIONS="log_path=$ASAN_DIR/asan:detect_leaks=1:abort_on_error=0:handle_abort=1"
export UBSAN_OPTIONS="log_path=$ASAN_DIR/ubsan:print_stacktrace=1"
export LSAN_OPTIONS="suppressions=$PWD/tests/lsan.supp"
/usr/bin/python3 -m pytest -q -p no:cacheprovider tests/func "$@" >"$LOG/func.txt" 2>&1
func_rc=$?
tail -n 40 "$LOG/func.txt"
summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$LOG/func.txt" | tail -1)
func_pass=$(echo "$summary" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+'); func_pass=${func_pass:-0}
func_fail=$(echo "$summary" | grep -oE '[0-9]+ failed' | grep -oE '[0-9]+'); func_fail=${func_fail:-0}
func_err=$(echo "$summary" | grep -oE '[0-9]+ error' | grep -oE '[0-9]+'); func_err=${func_err:-0}
func_skip=$(echo "$summary" | grep -oE '[0-9]+ skipped' | grep -oE '[0-9]+'); func_skip=${func_skip:-0}
func_xfail=$(echo "$summary" | grep -oE '[0-9]+ xfailed' | grep -oE '[0-9]+'); func_xfail=${func_xfail:-0}
func_fail=$((func_fail + func_err))
# rc 5: pytest collected nothing - nothing was checked, that is a failure
if [ "$func_rc" -eq 5 ]; then
    echo "pytest collected no functional test"
    func_fail=$((func_fail + 1))
fi
[ "$func_rc" -ne 0 ] && [ "$func_fail" -eq 0 ] && func_fail=1
# conftest's line: which of the functional tests ran bexd and which the
# reference daemon (qemu-storage-daemon), so nobody reads one total as checks of bexd
split=$(grep -E '^bexd: [0-9]+ passed' "$LOG/func.txt" | tail -1)

# Any sanitizer report from bexd is a failure of its own.
san_fail=0
if ls "$ASAN_DIR"/* >/dev/null 2>&1; then
    echo "== sanitizer reports:"
    for f in "$ASAN_DIR"/*; do echo "-- $f"; head -n 40 "$f"; done
    san_fail=1
fi

passed=$((unit_pass + func_pass))
failed=$((unit_fail + func_fail + san_fail))
echo "unit: $unit_pass passed, $unit_fail failed (plain, sanitizer and fuzz runs); functional: $func_pass passed, $func_fail failed, $func_skip skipped"
echo "${split:-bexd: (no per-daemon count: conftest did not report)}"
if [ "$func_xfail" -gt 0 ]; then
    echo "$passed passed, $failed failed, $func_skip skipped, $func_xfail xfailed"
else
    echo "$passed passed, $failed failed, $func_skip skipped"
fi
[ "$failed" -eq 0 ]
