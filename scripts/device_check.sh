#!/usr/bin/env bash
# The GPU checks of issues 15 and 29 in one run, for a session lent the device machine (one H100 or H200).
#
# Once, on the session's own machine, from the project root (fetches the wheels the GPU image lacks
# into .whl/, kept out of git):
#     bash ../shared/tools/device/wheels.sh
# Then one device `run` with carry [".whl"] and timeout_s 600 (the step limits below add up to 560 s):
#     bash scripts/device_check.sh
# A second run may name only the steps still to do:  bash scripts/device_check.sh bench-quick
#
# Steps, most valuable first, each under its own timeout; its output in $OUT/STEP.log, the benchmark
# tables in $OUT/STEP.md, one line per step in $OUT/summary.txt (8 files at most come back):
#   pytest-cuda        (180 s) python -m pytest -m cuda: goldens fp32 (TF32 off) and fp16; the frame loop on
#                              CUDA vs the CPU; --cuda_graphs frames vs eager ones across step count, strength,
#                              sampler, --scale 1 and picture size; block bends inside graphs (amount changing
#                              every frame, identity at capture); bend amounts reach the GPU without a host sync
#   bench-ours-graphs   (90 s) benchmark --quick --ways ours --cuda_graphs: frames/s with the UNet replayed
#   bench-ours-eager    (90 s) benchmark --quick --ways ours: the same without graphs (same machine, same run)
#   bench-quick        (200 s) benchmark --quick, all four ways: ratios vs diffusers and upstream, memory
# Estimated 5-6 minutes in all from the 2026-11-29 H200 figures in ../shared/tools/README.md (the model
# build is about 30 s per benchmark process); none of it has run on a GPU yet.
#
# DEVICE=cpu PYTHON=/path/to/python runs the same steps on a CPU, a check of this script itself: the
# cuda tests skip, the benchmark runs its CPU --quick mode and refuses --cuda_graphs (exit 2).
set -uo pipefail
OUT=${OUT:-outputs/device-check}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
ALL_STEPS=(pytest-cuda bench-ours-graphs bench-ours-eager bench-quick)
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=("${ALL_STEPS[@]}")
mkdir -p "$OUT"
: >"$OUT/summary.txt"

if [ "$DEVICE" = cuda ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: run bash ../shared/tools/device/wheels.sh here first and carry .whl"; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/summary.txt"
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee -a "$OUT/summary.txt"

step() {  # step NAME SECONDS COMMAND...: COMMAND under timeout, output to $OUT/NAME.log, status to summary.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local status=$?
  local verdict=$([ $status -eq 0 ] && echo ok || { [ $status -eq 124 ] && echo "timed out" || echo failed; })
  echo "$name: exit $status ($verdict) after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}

bench() {  # bench NAME SECONDS ARGS...: scripts/benchmark.py --quick on $DEVICE, table in $OUT/NAME.md
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" "$PYTHON" scripts/benchmark.py --device "$DEVICE" --quick "$@" --out "$OUT/$name.md"
}

for name in "${STEPS[@]}"; do
  case $name in
    pytest-cuda) step pytest-cuda 180 "$PYTHON" -m pytest -m cuda -q -rs -p no:cacheprovider \
                   tests/test_cuda.py tests/test_bending.py tests/test_conditioning.py ;;
    bench-ours-graphs) bench bench-ours-graphs 90 --ways ours --cuda_graphs ;;
    bench-ours-eager) bench bench-ours-eager 90 --ways ours ;;
    bench-quick) bench bench-quick 200 ;;
    *) echo "unknown step $name: use ${ALL_STEPS[*]}"; exit 2 ;;
  esac
done
