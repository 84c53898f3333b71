#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a lent GPU machine (the
# workplace's `device` tool runs it in a copy of this repo; results land in
# $OUT, default ./gpu-results). That machine has torch, triton, timm,
# accelerate and numba but no ffcv, DALI or xformers and no network, so the
# project is installed without dependencies and the CUDA-marked tests plus the
# loss, step and torch-loader benchmarks run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
status=0
# Each step's stdout (JSON for the benchmarks) to $OUT/<name>.json, all stderr to $OUT/errors.log
# (the device tool returns at most 8 files).
run() {
  local name=$1; shift; echo "== $name: $*"
  timeout "${LIMIT:-240}" "$@" > "$OUT/$name.json" 2>> "$OUT/errors.log" || { echo "   FAILED"; tail -5 "$OUT/errors.log"; status=1; }
  tail -c 2000 "$OUT/$name.json"; echo
}
run pytest_cuda python3 -m pytest -q -m cuda -p no:cacheprovider tests
run gpu_bench_loss python3 scripts/gpu_bench_loss.py
run gpu_bench_step python3 scripts/gpu_bench_step.py
# The loader goal is relative to the trainer: the step benchmark's JSON is its yardstick.
run gpu_bench_loader python3 scripts/gpu_bench_loader.py --step-json "$OUT/gpu_bench_step.json"
exit $status
