#!/usr/bin/env bash
# The GPU checks of issue 15, for a session that has the device machine (one H200), in one run.
#
# Once, on the session's own machine, from the project root (fetches the wheels the GPU image lacks
# into .whl/, kept out of git):
#     bash ../shared/tools/device/wheels.sh
# Then one device `run` with carry [".whl"] and timeout_s 600:
#     bash scripts/device_check.sh
# Steps, most valuable first, each under its own timeout, logs and tables into $OUT (7 files):
#   1. python -m pytest -m cuda -q         goldens fp32/fp16, frame loop CUDA vs CPU, graphs vs eager
#   2. benchmark --ways ours, eager         our frames/s without CUDA graphs   (4 frames, 512x512)
#   3. benchmark --ways ours --cuda_graphs  the same with the UNet replayed from CUDA graphs
#   4. benchmark --device cuda --quick      all four ways, the ratios vs diffusers and upstream
# About 7 minutes in all (estimated from the 2026-11-29 H200 figures in ../shared/tools/README.md).
set -uo pipefail
OUT=${OUT:-outputs/device-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: run bash ../shared/tools/device/wheels.sh here first and carry .whl"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run COMMAND under timeout, output to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local status=$?
  echo "== $name: exit $status after $((SECONDS - start)) s"
  tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
step pytest-cuda 150 python3 -m pytest -m cuda -q -rs
step bench-ours-eager 90 python3 scripts/benchmark.py --device cuda --quick --ways ours --out "$OUT/bench-ours-eager.md"
step bench-ours-graphs 90 python3 scripts/benchmark.py --device cuda --quick --ways ours --cuda_graphs \
  --out "$OUT/bench-ours-graphs.md"
step bench-quick 200 python3 scripts/benchmark.py --device cuda --quick --out "$OUT/bench-quick.md"
