#!/usr/bin/env bash
# First contact with a CUDA machine, in stages that each stay under 8 minutes, so every stage fits one command of a
# machine that allows 10 minutes a command. Run them in order, one command each, on the same machine:
#
#   OUT=gpu_out bash bench/run_gpu.sh probe   # about 7 min at most: versions, the CPU+CUDA build in the background,
#                                             #   the Triton GPU tests, python -m bench.gpu_probe (Triton backend)
#   OUT=gpu_out bash bench/run_gpu.sh cuda    # about 7.5 min at most: the CUDA extension (rebuilt only if missing or
#                                             #   csrc/ changed since), its GPU tests, the probe with --backend cuda
#   OUT=gpu_out bash bench/run_gpu.sh bench   # about 7 min at most: python -m bench linear, conv2d, models
#                                             #   with --device cuda --quick
#   bash bench/run_gpu.sh all                 # the three in one go, where commands have no time limit
#
# Everything goes under $OUT (default ./gpu_out), appended to where a file exists:
#   summary.txt        one line per step: exit status (124: its timeout) and seconds
#   versions.txt       nvidia-smi, python, torch + CUDA, triton, nvcc, CUDA_HOME, python -m rtl_kernels.info
#   build.log          python3 setup.py build_ext --inplace (RTL_BUILD_CUDA=1), and whether each .so came out
#   triton_tests.log   pytest tests/rtl_kernels tests/rtl/test_cuda_graph.py -m gpu -k triton
#   cuda_tests.log     the same for the cuda backend (rtl_kernels only)
#   gpu_probe.log      the probe's output; gpu_probe.json / gpu_probe.md its results, one table per backend
#   bench.log          the benchmarks' output; linear|conv2d|models_cuda.csv and _cuda_<rev>.md their results
#
# Uses the python3 on PATH (or $PYTHON): torch with CUDA, triton, and pytest for the tests. Every step runs under
# `timeout`; a failed or timed-out step is recorded in summary.txt and the next step still runs. Exit status: 0 when
# every step passed, 1 otherwise, 2 for an unknown stage.
set -uo pipefail

usage() {
  echo "usage: OUT=DIR bash bench/run_gpu.sh STAGE [STAGE ...]   STAGE: probe | cuda | bench | all" >&2
  echo "  run probe, then cuda, then bench (one command each); results under \$OUT (default ./gpu_out)" >&2
  exit 2
}

STAGES=()
for arg in "$@"; do
  case "$arg" in
    probe | cuda | bench) STAGES+=("$arg") ;;
    all) STAGES+=(probe cuda bench) ;;
    -h | --help) usage ;;
    *) echo "run_gpu.sh: unknown stage '$arg'" >&2; usage ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && usage

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # an interpreted kernel on a GPU machine would make every test and timing meaningless
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"

# A toolkit is a folder with bin/nvcc and include/cuda_runtime.h. nvcc on PATH may be a wrapper script outside it
# (/usr/local/bin/nvcc), so its folder is checked before it is used; /usr/local/cuda is the fallback, and no toolkit
# at all only costs the CUDA build.
cuda_home_candidates() {
  [ -n "${CUDA_HOME:-}" ] && echo "$CUDA_HOME"
  local nvcc
  nvcc="$(command -v nvcc 2> /dev/null)"
  if [ -n "$nvcc" ]; then
    dirname "$(dirname "$nvcc")"
    dirname "$(dirname "$(readlink -f "$nvcc")")"
  fi
  echo /usr/local/cuda
  ls -d /usr/local/cuda-* 2> /dev/null | sort -rV
}
CUDA_HOME_FOUND=""
while read -r dir; do
  if [ -x "$dir/bin/nvcc" ] && [ -e "$dir/include/cuda_runtime.h" ]; then
    CUDA_HOME_FOUND="$dir"
    break
  fi
done < <(cuda_home_candidates)
export CUDA_HOME="${CUDA_HOME_FOUND:-/usr/local/cuda}"
[ -x "$CUDA_HOME/bin/nvcc" ] && export PATH="$CUDA_HOME/bin:$PATH"

# The .so names carry the interpreter's ABI tag, so a .so built for another python3 is never mistaken for this one's.
EXT_SUFFIX="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2> /dev/null)"
CUDA_SO="rtl_kernels/_C_cuda${EXT_SUFFIX:-.so}"
CPU_SO="rtl_kernels/_C${EXT_SUFFIX:-.so}"

FAILED=0
BUILD_PID=""

note() {  # note TEXT: one line in summary.txt and on stdout
  echo "$(date +%H:%M:%S) $*" | tee -a "$OUT/summary.txt"
}

step() {  # step NAME LIMIT_S LOG CMD...: CMD under timeout, its output appended to LOG, its status in summary.txt
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc
  shift 3
  echo "== $(date +%H:%M:%S) $name (limit ${limit} s): $*" >> "$log"
  # SIGINT first: pytest then still prints what ran and failed, and python says where it was.
  timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$log" 2>&1 < /dev/null
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    note "$name: TIMED OUT after ${limit} s (rc=$rc), see $(basename "$log")"
  else
    note "$name: rc=$rc in $((SECONDS - t0)) s, see $(basename "$log")"
  fi
  [ $rc -eq 0 ] || FAILED=1
  return $rc
}

left() {  # left MAX RESERVE: a step's limit, at most MAX, leaving RESERVE seconds of the stage for later steps
  local n=$((DEADLINE - SECONDS - $2))
  [ $n -gt "$1" ] && n=$1
  [ $n -lt 30 ] && n=30
  echo $n
}

# Sources are compared by content, not time: a working tree copied afresh for each command gets new timestamps.
STAMP=build/run_gpu_sources.sha256
sources_hash() {
  find csrc setup.py -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

built() {  # the CUDA extension exists and was built from the sources as they are now
  [ -f "$CUDA_SO" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(sources_hash)" ]
}

start_build() {  # start_build LIMIT_S: the CPU+CUDA build in the background, bounded by its own timeout
  local limit=$1
  rm -f "$CUDA_SO" "$CPU_SO" "$STAMP"  # a stale .so must not pass for this build's result
  mkdir -p build
  sources_hash > "$STAMP.next"
  echo "== $(date +%H:%M:%S) build (limit ${limit} s), CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" \
    "MAX_JOBS=$MAX_JOBS" >> "$OUT/build.log"
  # nice: the tests and the probe run beside it, and their timings matter more than the build's.
  RTL_BUILD_CUDA=1 RTL_BUILD_CPU=1 timeout --kill-after=10 "$limit" nice -n 10 "$PY" setup.py build_ext --inplace \
    >> "$OUT/build.log" 2>&1 < /dev/null &
  BUILD_PID=$!
  BUILD_T0=$SECONDS
  note "build: started (limit ${limit} s)"
}

finish_build() {  # wait for the background build (its timeout bounds the wait) and record what came out
  [ -n "$BUILD_PID" ] || return 0
  local rc
  wait "$BUILD_PID"
  rc=$?
  BUILD_PID=""
  [ -f "$CUDA_SO" ] && mv -f "$STAMP.next" "$STAMP"
  {
    echo "build rc=$rc; $CUDA_SO: $([ -f "$CUDA_SO" ] && echo present || echo MISSING);" \
      "$CPU_SO: $([ -f "$CPU_SO" ] && echo present || echo MISSING)"
    timeout 60 "$PY" -m rtl_kernels.info
  } >> "$OUT/build.log" 2>&1
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    note "build: TIMED OUT (rc=$rc) after $((SECONDS - BUILD_T0)) s, see build.log"
  else
    note "build: rc=$rc in $((SECONDS - BUILD_T0)) s; CUDA extension $(built && echo built || echo MISSING)"
  fi
  [ $rc -eq 0 ] || FAILED=1
  return $rc
}

have_pytest() {
  "$PY" -c "import pytest" > /dev/null 2>&1 && return 0
  note "$1: skipped, $PY has no pytest"
  FAILED=1
  return 1
}

versions() {  # what the machine is, into versions.txt; never fails
  {
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(uname -srm), $(nproc) cores"
    echo "== nvidia-smi"
    timeout 30 nvidia-smi || echo "nvidia-smi failed or missing"
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv
    echo "== $PY: $(command -v "$PY")"
    timeout 120 "$PY" -c "
import platform, torch
print('python', platform.python_version())
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())
print('cuda available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))
for name in ('triton', 'pytest', 'setuptools', 'ninja'):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:
        print(name, 'unavailable:', exc)
"
    echo "== nvcc: $(command -v nvcc || echo 'not on PATH'); CUDA_HOME=$CUDA_HOME"
    [ -x "$CUDA_HOME/bin/nvcc" ] && timeout 30 "$CUDA_HOME/bin/nvcc" --version
    echo "== python -m rtl_kernels.info (before this run's build)"
    timeout 60 "$PY" -m rtl_kernels.info
  } >> "$OUT/versions.txt" 2>&1
  note "versions: $(grep -m1 -E '^torch ' "$OUT/versions.txt"); $(grep -m1 -E '^device ' "$OUT/versions.txt" \
    || echo 'no CUDA device')"
}

stage_probe() {  # about 7 minutes at most
  DEADLINE=$((SECONDS + 420))
  versions
  # The build runs to the end of the stage at most; a failed CUDA build does not stop the Triton steps.
  start_build "$(left 400 0)"
  # -v names each test as it starts, so a crash that kills the process still shows which test it was.
  if have_pytest triton_tests; then
    step triton_tests 180 "$OUT/triton_tests.log" \
      "$PY" -m pytest tests/rtl_kernels tests/rtl/test_cuda_graph.py -m gpu -k triton -v -x -ra -p no:cacheprovider
    tail -n 3 "$OUT/triton_tests.log"
  fi
  # A build running beside the probe takes CPU from eager launches; say so next to the timings.
  kill -0 "$BUILD_PID" 2> /dev/null && note "probe: the build is still running beside it"
  step probe 150 "$OUT/gpu_probe.log" "$PY" -m bench.gpu_probe --out "$OUT" --backend triton --budget 90
  finish_build
}

stage_cuda() {  # about 7.5 minutes at most
  DEADLINE=$((SECONDS + 450))
  if built; then
    note "build: $CUDA_SO is up to date"
  else
    start_build 240
    finish_build
  fi
  if ! built; then
    note "cuda: no CUDA extension (see build.log), its tests and probe skipped"
    FAILED=1
    return
  fi
  if have_pytest cuda_tests; then
    step cuda_tests "$(left 240 100)" "$OUT/cuda_tests.log" \
      "$PY" -m pytest tests/rtl_kernels -m gpu -k "cuda and not triton" -v --maxfail=10 -ra -p no:cacheprovider
    tail -n 3 "$OUT/cuda_tests.log"
  fi
  step probe_cuda "$(left 150 0)" "$OUT/gpu_probe.log" \
    "$PY" -m bench.gpu_probe --out "$OUT" --backend cuda --budget 90
}

stage_bench() {  # about 7 minutes at most
  built || note "bench: no CUDA extension, so ours:cuda rows will say unavailable"
  for target in linear conv2d models; do
    step "bench $target" 140 "$OUT/bench.log" \
      "$PY" -m bench "$target" --device cuda --quick --results-dir "$OUT"
  done
}

for stage in "${STAGES[@]}"; do
  note "stage $stage: CUDA_HOME=$CUDA_HOME, $PY"
  "stage_$stage"
done
exit $FAILED
