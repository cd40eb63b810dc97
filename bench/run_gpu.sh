#!/usr/bin/env bash
# Runs on a machine with an NVIDIA GPU: builds the extensions for that GPU, runs the GPU tests and the benchmarks,
# and leaves everything under $OUT (default ./gpu_out), so the results can be committed to bench/results with the
# device named.
#
# Uses the python3 found on PATH (it must have torch with CUDA and triton). It builds in place and never reuses a
# .so built on another machine.
#
# Usage: OUT=/some/dir bash bench/run_gpu.sh [STAGE ...] [--quick]
#   STAGE: build | tests | linear | conv2d | models | all (the default: every stage in that order)
#
# The stages let a run that must fit a time limit per command go in several calls on one machine: a stage other
# than build builds only when the extensions are missing or older than their sources. Each stage writes its own
# files, at most 8 in all:
#   build.log (with the device and versions), tests.log, and one CSV + one markdown table per benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" RTL_BUILD_CUDA=1 RTL_BUILD_CPU=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

QUICK=""
STAGES=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK="--quick" ;;
    build|tests|linear|conv2d|models) STAGES+=("$arg") ;;
    all) STAGES+=(build tests linear conv2d models) ;;
    *) echo "unknown argument: $arg (stages: build tests linear conv2d models all; option: --quick)" >&2; exit 2 ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build tests linear conv2d models)

build() {
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    rm -f rtl_kernels/_C*.so
    python3 setup.py build_ext --inplace && python3 -m rtl_kernels.info
  } >> "$OUT/build.log" 2>&1 || { echo "build failed: see build.log"; return 1; }
}

built() {  # the CUDA extension exists and is newer than every source under csrc/
  local so
  so=$(ls rtl_kernels/_C_cuda*.so 2>/dev/null | head -n 1)
  [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -print -quit)" ]
}

rc=0
for stage in "${STAGES[@]}"; do
  if [ "$stage" = build ]; then
    build || exit 1
    continue
  fi
  built || build || exit 1
  case "$stage" in
    tests)
      # correctness before speed
      python3 -m pytest tests -m gpu -q -ra -p no:cacheprovider > "$OUT/tests.log" 2>&1
      echo "gpu tests rc=$?" >> "$OUT/tests.log"
      tail -n 3 "$OUT/tests.log" ;;
    linear|conv2d|models)
      python3 -m bench "$stage" --device cuda $QUICK --results-dir "$OUT" || rc=1 ;;
  esac
done
exit $rc
