#!/usr/bin/env bash
# The sanitizer lane: rtl_kernels._C built with AddressSanitizer and UndefinedBehaviorSanitizer (any error aborts)
# into build/sanitize, then the rtl_kernels tests and the property-based tests run against that build. A memory
# error or undefined behaviour in the C++ kernels fails the lane. `make sanitize` runs it; CI runs it after the
# tests. Usage: tools/sanitizer_lane.sh [extra pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
OUT="$ROOT/build/sanitize"
LIB="$OUT/lib"

rm -rf "$LIB"
mkdir -p "$LIB"
# the Python packages beside the sanitized extension (never the regular build's .so files)
tar --exclude='*.so' --exclude='__pycache__' -cf - rtl rtl_kernels | tar -xf - -C "$LIB"
start=$(date +%s)
RTL_SANITIZE=1 RTL_BUILD_CPU=1 RTL_BUILD_CUDA=0 "$PY" setup.py -q build_ext --build-lib "$LIB" \
    --build-temp "$OUT/temp" >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "sanitizer lane: extension built in $(( $(date +%s) - start )) s"

export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
# Leaks are not checked (CPython and torch keep allocations to exit); torch frees some memory with a
# deallocator that differs from the allocator ASan saw, which is not ours to report.
export ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1:detect_odr_violation=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export RTL_BUILD_CPU=0 RTL_BUILD_CUDA=0
cd "$LIB"  # first on sys.path: the sanitized rtl_kernels is the one imported
"$PY" -c "import rtl_kernels._C as c, sys; assert c.__file__.startswith('$LIB'), c.__file__; print('sanitized:', c.__file__)"
start=$(date +%s)
"$PY" -m pytest "$ROOT/tests/rtl_kernels" "$ROOT/tests/test_properties.py" -c "$ROOT/pyproject.toml" --rootdir "$ROOT" \
    -k "not triton and not cuda" -p no:cacheprovider -q "$@"
echo "sanitizer lane: tests ran in $(( $(date +%s) - start )) s"
