#!/usr/bin/env python
"""What ``--crf`` does to a video: the README's figures, from one demo render per crf.

    python scripts/crf_table.py                       # --crf 18, 10 and 0 (three renders, minutes on a CPU)
    python scripts/crf_table.py --crf 23 18 --fps 4

Renders ``audio2video.py --demo --path examples/audio/chords.wav --fps 8 --seed 42 --save_frames``
(256x256, 32 frames) once per ``--crf``, each in its own process, then decodes each MP4 (RGB, as
ffmpeg converts yuv420p back) and compares it with the PNGs the same render saved: the mean
absolute difference over every pixel and channel (in 1/255), the largest one, and the MP4's size.
Prints a markdown table, also written to outputs/crf-table-<UTC time>.md (or ``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.benchmark_parts import write_report  # noqa: E402

SOUND = "examples/audio/chords.wav"


def decoded_frames(video: Path) -> list[np.ndarray]:
    """The frames of ``video`` as (H, W, 3) uint8 RGB."""
    reader = imageio_ffmpeg.read_frames(str(video), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    return [np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in reader]


def compare(video: Path, frames_dir: Path) -> tuple[float, int, int]:
    """(mean and largest absolute difference in 1/255, number of frames) between ``video`` and the
    PNGs in ``frames_dir``."""
    saved = [np.asarray(Image.open(path).convert("RGB")) for path in sorted(frames_dir.glob("frame-*.png"))]
    decoded = decoded_frames(video)
    if len(saved) != len(decoded):
        raise SystemExit(f"{video}: {len(decoded)} frames in the video, {len(saved)} PNGs in {frames_dir}")
    differences = np.stack([np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(saved, decoded)])
    return float(differences.mean()), int(differences.max()), len(saved)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crf", type=int, nargs="+", default=[18, 10, 0])
    parser.add_argument("--fps", default="8")
    parser.add_argument("--out", default=None, help="the table's file (default: outputs/crf-table-<UTC time>.md)")
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    render = ["--demo", "--path", SOUND, "--fps", args.fps, "--seed", "42", "--save_frames"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for crf in args.crf:
            outdir = Path(folder) / f"crf{crf}"
            subprocess.run([sys.executable, str(REPO / "audio2video.py"), *render, "--crf", str(crf),
                            "--outdir", str(outdir)], cwd=REPO, check=True)
            video = outdir / "chords.mp4"
            mean, largest, frames = compare(video, outdir / "chords-frames")
            rows.append(f"| {crf} | {mean:.2f} | {largest} | {video.stat().st_size / 1024:.0f} |")
    command = "python " + " ".join(shlex.quote(a) for a in ["scripts/crf_table.py", *(argv or sys.argv[1:])])
    lines = [f"# --crf: the video against its saved frames, {started:%Y-%m-%d %H:%M} UTC", "",
             f"`{command}`: `audio2video.py {' '.join(render)} --crf N`, {frames} frames; differences in 1/255 "
             f"over every pixel and channel of the decoded RGB", "",
             "| --crf | mean difference | largest | MP4 KiB |", "| ---: | ---: | ---: | ---: |", *rows]
    write_report(lines, args.out, "crf-table", started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
