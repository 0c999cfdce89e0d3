#!/usr/bin/env bash
# A music video: the picture evolves with the sound, guided from one text prompt to another.
# Edit the variables, then run: bash scripts/music_video.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SOUND=examples/audio/chords.wav
FPS=12
STRENGTH=0.5                          # how far each frame moves from the previous one (0..1)
TEXT="a watercolor landscape at dawn"
TEXTEND="a watercolor landscape at night"
FEATURE=melspectrogram
STEPS=25
SEED=42
EXTRA=(--demo)                        # remove --demo once the weights are in models/

python audio2video.py --path "$SOUND" --fps "$FPS" --strength "$STRENGTH" \
  --textprompt "$TEXT" --textpromptend "$TEXTEND" --feature "$FEATURE" \
  --ddim_steps "$STEPS" --seed "$SEED" --preview_every 10 "${EXTRA[@]}"
