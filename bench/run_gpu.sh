#!/usr/bin/env bash
# One run on a machine with an NVIDIA GPU (the device machine of a session, or any CUDA box): build the
# extensions for that GPU, run the GPU tests and both benchmarks, and leave everything under $OUT (default
# ./gpu_out) so the results can be committed to bench/results with the device named.
#
# Uses the python3 found on PATH (it must have torch with CUDA and triton); builds in place, never reuses a .so
# built elsewhere. Usage: OUT=/some/dir bash bench/run_gpu.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
QUICK="${1:-}"
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" RTL_BUILD_CUDA=1 RTL_BUILD_CPU=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/info.txt" 2>&1

python3 -m pip install -q pytest ninja numpy >> "$OUT/build.log" 2>&1
rm -f rtl_kernels/_C*.so
python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { echo "build failed: see build.log"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m rtl_kernels.info >> "$OUT/info.txt" 2>&1

# GPU tests first (correctness before speed), then the whole suite on the GPU machine.
python3 -m pytest tests -m gpu -q -ra -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?" >> "$OUT/gpu_tests.log"

# At most 8 files come back from a device machine: info, build, tests, one bench log and 2 CSV + 2 md results.
python3 bench/bench_linear.py --device cuda $QUICK --results-dir "$OUT" > "$OUT/bench.log" 2>&1
python3 bench/bench_conv2d.py --device cuda $QUICK --results-dir "$OUT" >> "$OUT/bench.log" 2>&1
tail -n 3 "$OUT/gpu_tests.log" "$OUT/bench.log"
