#!/usr/bin/env python
"""What one network bend costs per frame: the same frames rendered without a bend and with one bend
at each place (noised latent, before a step, final latent, inside a UNet block), side by side in
one run, through the real frame loop (``sounddiffusion.video.loop.sample_frames``) on the demo model.

    python scripts/benchmark_bends.py                      # 128x128, 10 steps x 0.5, 8 frames
    python scripts/benchmark_bends.py --device cuda --size 512 --frames 20

Prints a markdown table, also written to outputs/benchmark-bends-<UTC time>.md (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.benchmark_parts import DiscardingWriter, synchronize, write_report  # noqa: E402
from sounddiffusion.model.loading import load_engine  # noqa: E402
from sounddiffusion.settings import ModelSettings, VideoSettings  # noqa: E402
from sounddiffusion.video.frame_chain import ChainState  # noqa: E402
from sounddiffusion.video.frame_plan import plan_frames  # noqa: E402
from sounddiffusion.video.loop import sample_frames  # noqa: E402

SOUND = REPO / "examples" / "audio" / "drums.wav"
WAYS = {
    "no bend": (),
    "latent: add=0.5*onset": ("add=0.5*onset",),
    "step: rotate_z=0.8*beat@step=0.5": ("rotate_z=0.8*beat@step=0.5",),
    "final latent: noise=0.3*onset@step=99": ("noise=0.3*onset@step=99",),
    "block: dilate=2*onset@output_blocks.5": ("dilate=2*onset@output_blocks.5",),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3,
                        help="the ways take turns this many times; each keeps its fastest round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    engine = load_engine(ModelSettings(demo=True, device=args.device))
    started = datetime.datetime.now(datetime.timezone.utc)
    runs = {}
    for name, bends in WAYS.items():
        settings = VideoSettings(audio=str(SOUND), fps=12, strength=0.5, ddim_steps=args.steps, H=args.size,
                                 W=args.size, bend=bends)
        plan = plan_frames(settings)
        chain = sample_frames(engine, plan, settings, DiscardingWriter(), start=0, stop=2, chain=ChainState())  # warm-up
        runs[name] = (settings, plan, chain)
    best = {name: float("inf") for name in WAYS}
    for _ in range(args.rounds):  # taking turns spreads the machine's other load over every way
        for name, (settings, plan, chain) in runs.items():
            synchronize(engine.device)
            t0 = time.perf_counter()
            sample_frames(engine, plan, settings, DiscardingWriter(), start=2, stop=2 + args.frames, chain=chain)
            synchronize(engine.device)
            best[name] = min(best[name], (time.perf_counter() - t0) / args.frames)
    rows = list(best.items())
    base = rows[0][1]
    command = "python " + " ".join(shlex.quote(a) for a in ["scripts/benchmark_bends.py", *(argv or sys.argv[1:])])
    lines = [f"# One bend per frame, {started:%Y-%m-%d %H:%M} UTC", "",
             f"`{command}`: demo model, {args.size}x{args.size}, {args.steps} steps x 0.5 per frame, "
             f"{args.frames} timed frames, fastest of {args.rounds} rounds, {engine.device} "
             f"({torch.get_num_threads()} threads)", "",
             "| way | s/frame | overhead per frame |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {seconds:.3f} | {seconds - base:+.3f} s ({(seconds / base - 1) * 100:+.1f} %) |"
              for name, seconds in rows]
    write_report(lines, args.out, "benchmark-bends", started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
