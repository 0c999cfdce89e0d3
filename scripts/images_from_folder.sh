#!/usr/bin/env bash
# One image per sound in a folder, from each sound's spectrum, lightly mixed with a text prompt.
# Edit the variables, then run: bash scripts/images_from_folder.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SOUNDS=examples/audio        # a folder of wav/flac/ogg/mp3 files
FEATURE=fft                  # waveform | fft | melspectrogram | mfcc
TEXT="an abstract painting"  # "" for sound only
TEXTSTRENGTH=0.3             # 0 = sound only, 1 = text only
SEED=42
EXTRA=(--demo)               # remove --demo once models/ldm/stable-diffusion-v1/ holds the weights

python audio2img.py --input_folder "$SOUNDS" --feature "$FEATURE" \
  --textprompt "$TEXT" --textstrength "$TEXTSTRENGTH" --seed "$SEED" \
  --n_samples 1 --n_iter 1 --plms "${EXTRA[@]}"   # writes to outputs/audio2img-samples/<sound name>/
