#!/usr/bin/env bash
# A parameter sweep: one video per (strength, fps) pair, to find the look you want.
# Edit the lists, then run: bash scripts/sweep_strength_fps.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SOUND=examples/audio/bell.wav
STRENGTHS=(0.3 0.5 0.7)
FPSS=(6 12)
TEXT="a bronze bell in fog"
EXTRA=(--demo)                        # remove --demo once the weights are in models/

for strength in "${STRENGTHS[@]}"; do
  for fps in "${FPSS[@]}"; do
    python audio2video.py --path "$SOUND" --fps "$fps" --strength "$strength" \
      --textprompt "$TEXT" --seed 42 \
      --output "outputs/audio2video/bell-s${strength}-fps${fps}.mp4" "${EXTRA[@]}"
  done
done
