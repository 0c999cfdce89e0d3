#!/usr/bin/env python
"""What camera motion costs per frame: the same frames rendered with a still camera, with the
motion warped on the picture (--motion_space pixel: decode, warp, encode) and on the latent
(--motion_space latent), at each size, side by side in one run, through the real frame loop
(``sounddiffusion.video.loop.sample_frames``) on the demo model.

    OMP_NUM_THREADS=1 python scripts/benchmark_motion.py                 # 256 and 512, 10 steps x 0.5
    python scripts/benchmark_motion.py --device cuda --sizes 512 --frames 20

The motion is --zoom "1.02 + 0.03*onset" --angle 0.5 --translation_x 2 (every frame moves). The
writer keeps nothing, so the figures are the sampling loop's: a real render adds the decode and
video encoding of each frame, the same with and without motion. A second table times the move
alone (what each way adds to a diffused frame), which a busy machine's noise hides less. Prints
markdown tables, also written to outputs/benchmark-motion-<UTC time>.md (or --out).

    python scripts/benchmark_motion.py --sharpness                       # what each way costs in sharpness

measures, instead of the times, how much edge contrast each way keeps: 16 frames of a pan at
``--strength 0`` (img2img keeps its start: the frames are the camera alone), ``--border wrap``,
128x128, of 1 pixel a frame (an eighth of a latent cell) and of 8 (one whole cell),
in each space, against a perfect camera: frame 0's picture rolled by the whole pan (exact for
whole pixels with ``wrap``). Two columns: the last frame's :func:`edge_contrast` as a share of
the perfect one's, and the mean absolute difference from it in levels of 0..255; the latents are
decoded directly (no video encoding).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sounddiffusion import cli  # noqa: E402
from scripts.benchmark_parts import DiscardingWriter, synchronize, write_report  # noqa: E402
from sounddiffusion.model.loading import load_engine  # noqa: E402
from sounddiffusion.settings import ModelSettings, VideoSettings  # noqa: E402
from sounddiffusion.video.frame_chain import ChainState  # noqa: E402
from sounddiffusion.video.frame_plan import plan_frames  # noqa: E402
from sounddiffusion.video.loop import sample_frames  # noqa: E402

SOUND = REPO / "examples" / "audio" / "drums.wav"
MOTION = dict(zoom="1.02 + 0.03*onset", angle="0.5", translation_x="2")
WAYS = {
    "still camera": {},
    "pixel: decode, warp, encode": dict(MOTION, motion_space="pixel"),
    "latent: warp the latent": dict(MOTION, motion_space="latent"),
}

# --sharpness: pans in pixels a frame (an eighth of a latent cell, one whole cell), frames, size
PANS = (1, 8)
SHARPNESS_FRAMES = 16
SHARPNESS_SIZE = 128


def time_ways(engine, size: int, args) -> dict[str, float]:
    """Each way's fastest s/frame over the rounds, at ``size`` x ``size``."""
    runs = {}
    for name, motion in WAYS.items():
        settings = VideoSettings(audio=str(SOUND), fps=12, strength=0.5, ddim_steps=args.steps, H=size, W=size,
                                 **motion)
        plan = plan_frames(settings)
        chain = sample_frames(engine, plan, settings, DiscardingWriter(), start=0, stop=2, chain=ChainState())  # warm-up
        runs[name] = (settings, plan, chain)
    best = {name: float("inf") for name in WAYS}
    names = list(runs)
    for round_ in range(args.rounds):
        # Taking turns spreads the machine's other load over every way; the order turns too, as
        # the first way of a round was measured slower than the others, whichever it was.
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            settings, plan, chain = runs[name]
            synchronize(engine.device)
            t0 = time.perf_counter()
            sample_frames(engine, plan, settings, DiscardingWriter(), start=2, stop=2 + args.frames, chain=chain)
            synchronize(engine.device)
            best[name] = min(best[name], (time.perf_counter() - t0) / args.frames)
    return best


def time_moves(engine, size: int, repeats: int) -> dict[str, float]:
    """The move alone, seconds per call (fastest of ``repeats``): what each way adds to a frame."""
    from sounddiffusion.video.camera import CameraMove
    from sounddiffusion.video.motion import Motion2D, motion_matrix

    latent = engine.noise(engine.latent_shape(1, size, size), 0)
    matrix = motion_matrix(Motion2D(zoom=1.035, angle=0.5, translation_x=2), size, size)
    calls = {"pixel: decode, warp, encode": lambda: CameraMove(matrix, "replicate", "pixel").apply(engine, latent),
             "latent: warp the latent": lambda: CameraMove(matrix, "replicate", "latent").warp_latent(latent)}
    best = {}
    for name, call in calls.items():
        call()
        times = []
        for _ in range(repeats):
            synchronize(engine.device)
            t0 = time.perf_counter()
            call()
            synchronize(engine.device)
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    return best


class KeepEnds:
    """A writer that keeps the latents of frame 0 and frame ``last``."""

    def __init__(self, last: int):
        self.last, self.latents = last, {}

    def submit(self, index, latent, chain):
        if index in (0, self.last):
            self.latents[index] = latent


def edge_contrast(rgb: np.ndarray) -> float:
    """The mean absolute difference of neighbouring grey pixels of an (H, W, 3) uint8 picture,
    levels of 0..255: ``(mean |g[y, x+1] - g[y, x]| + mean |g[y+1, x] - g[y, x]|) / 2`` with ``g``
    the mean of the three channels. Blurring lowers it; a shift with ``--border wrap`` keeps it."""
    grey = rgb.astype(np.float64).mean(axis=2)
    return float((np.abs(np.diff(grey, axis=1)).mean() + np.abs(np.diff(grey, axis=0)).mean()) / 2)


def sharpness(engine) -> dict[tuple[int, str], tuple[float, float]]:
    """(pan, space) -> (frame SHARPNESS_FRAMES - 1's edge contrast as a share of the perfect
    move's, its mean absolute difference from the perfect move in levels)."""
    last = SHARPNESS_FRAMES - 1
    shares = {}
    for pan in PANS:
        for space in ("pixel", "latent"):
            settings = VideoSettings(audio=str(SOUND), fps=8, H=SHARPNESS_SIZE, W=SHARPNESS_SIZE, ddim_steps=2,
                                     seed=5, strength=0, translation_x=str(pan), border="wrap", motion_space=space)
            keep = KeepEnds(last)
            sample_frames(engine, plan_frames(settings), settings, keep, start=0, stop=SHARPNESS_FRAMES,
                          chain=ChainState())
            first, moved = engine.decode(torch.cat([keep.latents[0], keep.latents[last]]))
            perfect = np.roll(first, last * pan, axis=1)
            shares[pan, space] = (edge_contrast(moved) / edge_contrast(perfect),
                                  float(np.abs(moved.astype(np.float64) - perfect).mean()))
    return shares


def sharpness_lines(engine) -> list[str]:
    lines = [f"After {SHARPNESS_FRAMES - 1} moves, frame {SHARPNESS_FRAMES - 1} against a perfect camera (frame 0 "
             f"rolled by the whole pan): its `edge_contrast` as a share of the perfect one's, and its mean "
             f"absolute difference from it; demo model, {SHARPNESS_SIZE}x{SHARPNESS_SIZE}, "
             f"`{SOUND.relative_to(REPO).as_posix()}` at 8 fps, 2 steps, seed 5, --strength 0 --border wrap "
             f"--translation_x PAN, latents decoded directly:", "",
             "| pan | space | edge contrast kept | mean difference |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {pan} px a frame | {space} | {100 * share:.1f} % | {difference:.1f} levels |"
              for (pan, space), (share, difference) in sharpness(engine).items()]
    return lines


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="benchmark_motion.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3,
                        help="the ways take turns this many times; each keeps its fastest round")
    parser.add_argument("--repeats", type=int, default=20, help="calls of the move alone; the fastest counts")
    parser.add_argument("--sharpness", action="store_true",
                        help="measure the edge contrast each way keeps instead of the times (module docstring)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    for name in ("steps", "frames", "rounds", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: use 1 or more")
    for size in args.sizes:
        if size < 64 or size % 64:
            parser.error(f"--sizes {size}: use multiples of 64 such as 256 and 512")
    engine = load_engine(ModelSettings(demo=True, device=args.device))
    started = datetime.datetime.now(datetime.timezone.utc)
    command = "python " + " ".join(shlex.quote(a) for a in ["scripts/benchmark_motion.py", *(argv or sys.argv[1:])])
    if args.sharpness:
        lines = [f"# Camera motion and sharpness, {started:%Y-%m-%d %H:%M} UTC", "", f"`{command}`, torch "
                 f"{torch.__version__}, {engine.device}", "", *sharpness_lines(engine)]
        write_report(lines, args.out, "benchmark-motion", started)
        return 0
    lines = [f"# Camera motion per frame, {started:%Y-%m-%d %H:%M} UTC", "",
             f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} {command}`: demo model, "
             f"{args.steps} steps x 0.5 per frame, {args.frames} timed frames, fastest of {args.rounds} rounds (the ways taking turns, in a turning order), "
             f"{engine.device} ({torch.get_num_threads()} torch threads), torch {torch.__version__}, "
             f"{platform.processor() or platform.machine()}; motion: "
             + " ".join(f'--{k} "{v}"' for k, v in MOTION.items()), "",
             "| size | way | s/frame | overhead per frame |", "| --- | --- | ---: | ---: |"]
    for size in args.sizes:
        rows = list(time_ways(engine, size, args).items())
        base = rows[0][1]
        lines += [f"| {size}x{size} | {name} | {seconds:.3f} | {1000 * (seconds - base):+.1f} ms "
                  f"({(seconds / base - 1) * 100:+.1f} %) |" for name, seconds in rows]
    lines += ["", f"The move alone (one call per diffused frame; fastest of {args.repeats} calls, "
                  f"zoom 1.035, angle 0.5, translation_x 2):", "",
              "| size | way | ms per move |", "| --- | --- | ---: |"]
    for size in args.sizes:
        lines += [f"| {size}x{size} | {name} | {1000 * seconds:.1f} |"
                  for name, seconds in time_moves(engine, size, args.repeats).items()]
    write_report(lines, args.out, "benchmark-motion", started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
