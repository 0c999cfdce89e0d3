#!/usr/bin/env python
"""Colour drift and flicker of the same demo render with and without each cure, side by side.

Renders one 96-frame video (4 s of examples/audio/chords.wav at 24 fps) on the demo model once
plainly and once per cure (--color_coherence, --latent_noise, --contrast, --cadence, all
together), measures each with sounddiffusion.video.video_stats, and prints a markdown table, also
written to outputs/coherence-<UTC time>.md (or --out).

    python scripts/coherence_table.py                 # 128x128, 10 steps x 0.5: a few minutes on a CPU
    python scripts/coherence_table.py --size 256 --steps 25
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.benchmark_parts import write_report  # noqa: E402
from sounddiffusion.settings import ModelSettings, VideoSettings  # noqa: E402
from sounddiffusion.video.loop import run_audio2video  # noqa: E402
from sounddiffusion.video.video_stats import video_stats  # noqa: E402

SOUND = REPO / "examples" / "audio" / "chords.wav"
CURES = {
    "none": {},
    "--color_coherence lab": {"color_coherence": "lab"},
    "--color_coherence hsv": {"color_coherence": "hsv"},
    "--color_coherence lab --color_coherence_every 4": {"color_coherence": "lab", "color_coherence_every": 4},
    "--latent_noise 0.05": {"latent_noise": "0.05"},
    "--contrast 0.98": {"contrast": "0.98"},
    "--cadence 2": {"cadence": "2"},
    "lab + --latent_noise 0.05 + --contrast 0.98": {"color_coherence": "lab", "latent_noise": "0.05",
                                                    "contrast": "0.98"},
}


def _number(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    base = VideoSettings(audio=str(SOUND), fps=24, strength=0.5, ddim_steps=args.steps, H=args.size, W=args.size,
                         seed=42, textprompt="")
    rows = []
    with tempfile.TemporaryDirectory(prefix="coherence-") as folder:
        for name, changes in CURES.items():
            t0 = time.perf_counter()
            video = run_audio2video(replace(base, output=str(Path(folder) / f"{len(rows)}.mp4"), **changes),
                                    ModelSettings(demo=True, device="cpu"))
            seconds = time.perf_counter() - t0
            summary = video_stats(video).summary()
            rows.append((name, summary, seconds))
    command = "python " + " ".join(shlex.quote(a) for a in ["scripts/coherence_table.py", *(argv or sys.argv[1:])])
    lines = [f"# Drift and flicker of one demo render per cure, {started:%Y-%m-%d} UTC", "",
             f"`{command}`: {SOUND.name}, 96 frames at 24 fps, demo model, {args.size}x{args.size}, "
             f"{args.steps} steps x 0.5 per frame, seed 42", "",
             "| cure | mean drift (ΔE00) | final drift | hist drift | flicker | flicker_hf | clipped | "
             "flicker ~ onset (r) | render s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s, seconds in rows:
        lines.append(f"| {name} | {s['drift_mean']:.2f} | {s['drift_final']:.2f} | {s['hist_drift_mean']:.2f} | "
                     f"{s['flicker_mean']:.2f} | {s['flicker_hf_mean']:.2f} | {s['clipped_mean']:.4f} | "
                     f"{_number(s['onset_correlation'])} | {seconds:.0f} |")
    write_report(lines, args.out, "coherence", started)
    return 0 if np.isfinite([r[1]["drift_mean"] for r in rows]).all() else 1


if __name__ == "__main__":
    sys.exit(main())
