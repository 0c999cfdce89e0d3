#!/usr/bin/env bash
# A video whose text prompt changes at given times (a prompt file: "M:SS text" per line).
# Edit the variables, then run: bash scripts/video_with_prompt_file.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SOUND=examples/audio/drums.wav
PROMPTS=examples/prompts.txt
FPS=8
STRENGTH=0.45
SEED=7
EXTRA=(--demo)                        # remove --demo once the weights are in models/

python audio2video.py --path "$SOUND" --prompt_file "$PROMPTS" --fps "$FPS" \
  --strength "$STRENGTH" --rms_bend 0.8 --seed "$SEED" "${EXTRA[@]}"
