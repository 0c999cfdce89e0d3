#!/usr/bin/env python
"""Frames per second and latency of live.py, on a sound file played in real time.

Runs ``sounddiffusion.live.loop.run_live`` (the whole of live.py: sound input, causal envelopes,
the frame loop, JPEG, the web server on a free port) once per picture size, each for ``--seconds``
of sound after one load of the model and its warm-up, and writes a markdown table:

- frames/s: pictures made / seconds of sound (what the page shows, averaged over the run);
- latency: from the capture of the last sample of the sound a picture was made from to its
  JPEG being ready to send (mean, median, 95th percentile, largest), in ms;
- making one: the mean wall-clock time of the frame loop's steps that made a picture (numbers,
  conditioning, img2img, decoding, JPEG; not those that rested), so 1000 / it is the most
  pictures per second this machine could show at the moment; the latency is about 1 to 2 of
  these (a frame of sound waits for the picture in progress, then for its own);
- dropped: frames of the sound (at ``--fps``) that completed while a picture was being made and
  got none; rested: frames the loop rested on (none with ``--rest 0``, the default here).

A run that made no picture has – in the picture columns.

    python scripts/benchmark_live.py --device cpu                       # the demo, 128x128: DDIM 4 x 0.5 beside LCM
    python scripts/benchmark_live.py --device cpu --sizes 128 256 --seconds 30
    python scripts/benchmark_live.py --device cuda --ckpt model.safetensors --sizes 512

The machine's load average is printed beside each row: on a shared machine other work slows the
frames. The table goes to outputs/benchmark-live-<UTC time>.md (or ``--out``) and stdout.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(REPO / "examples" / "audio" / "drums.wav"),
                        help="the sound file played (looped) in real time")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128], help="picture sizes (square), pixels")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of sound per size")
    parser.add_argument("--ways", nargs="+", default=["ddim:4:7.5", "lcm:4:1"], metavar="SAMPLER:STEPS:SCALE",
                        help="the samplers compared side by side, each with its steps and guidance scale "
                             "(default: ddim:4:7.5 lcm:4:1)")
    parser.add_argument("--strength", default="0.5")
    parser.add_argument("--fps", type=float, default=24.0, help="live.py --fps: the most pictures per second")
    parser.add_argument("--rest", type=float, default=0.0, help="live.py --rest (0: never rest)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: live.py's choice, all cores but one on a CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--ckpt", default=None, help="a checkpoint instead of the demo model")
    parser.add_argument("--out", default=None, help="the table's file (default: outputs/benchmark-live-<time>.md)")
    return parser.parse_args(argv)


def machine() -> str:
    """CPU model and cores, torch and Python versions."""
    import torch

    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{model}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch: live.py then leaves it as it is
    import numpy as np
    import torch

    from sounddiffusion.files import write_new_text
    from sounddiffusion.live.loop import LiveLoop, run_live
    from sounddiffusion.logs import configure_logging
    from sounddiffusion.model.loading import load_engine
    from sounddiffusion.model.samplers import img2img_step_count, unet_evaluations
    from sounddiffusion.settings import LiveSettings, ModelSettings

    configure_logging(False)
    making = []  # seconds of each step that made a picture
    picture = LiveLoop.picture

    def timed(self, heard):
        shown, started = self.state.newest(), time.perf_counter()
        picture(self, heard)
        if self.state.newest() is not shown:  # not a rest, nor a skipped frame
            making.append(time.perf_counter() - started)

    LiveLoop.picture = timed
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = ModelSettings(demo=args.ckpt is None, ckpt=args.ckpt, device=args.device, precision=args.precision)
    engine = load_engine(model)
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for size in args.sizes:
        for way in args.ways:
            sampler, steps, scale = way.split(":")
            settings = LiveSettings(input=args.input, loop=True, seconds=args.seconds, port=0, H=size, W=size,
                                    sampler=sampler, ddim_steps=int(steps), scale=scale, strength=args.strength,
                                    fps=args.fps, rest=args.rest)
            load_before = os.getloadavg()[0]
            making.clear()
            summary = run_live(settings, model, engine=engine, announce=lambda line: print(line, flush=True))
            lat = np.array(summary.latencies_ms)
            timings = (f"{1000 * np.mean(making):.0f} | {lat.mean():.0f} | {np.median(lat):.0f} | "
                       f"{np.percentile(lat, 95):.0f} | {lat.max():.0f}") if len(lat) else " | ".join("–" * 5)
            per_picture = img2img_step_count(sampler, int(steps), float(args.strength))
            calls = unet_evaluations(sampler, per_picture, float(scale))
            rate = summary.frames / summary.seconds if summary.seconds else 0.0
            rows.append(f"| {size}x{size} | {sampler} {steps} x {args.strength} = {per_picture}, scale {scale} "
                        f"({calls} UNet rows) | {torch.get_num_threads()} | "
                        f"{summary.frames} | {summary.seconds:.1f} | {rate:.2f} | {timings} | "
                        f"{summary.dropped} | {summary.rested} | {load_before:.1f} / {os.getloadavg()[0]:.1f} |")
    command = "python scripts/benchmark_live.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    table = "\n".join([
        f"- Date: {started:%Y-%m-%d %H:%M} UTC", f"- Command: `{command.strip()}`",
        f"- Machine: {machine()}; device {engine.device}, precision {model.precision}",
        f"- Model: {'the demo model' if args.ckpt is None else Path(args.ckpt).name}; sound "
        f"{Path(args.input).name} looped in real time; live.py --fps {args.fps:g} --rest {args.rest:g}",
        "",
        "| size | sampler, steps x strength = steps per picture | torch threads | pictures | sound (s) | frames/s "
        "| making one (ms) | latency mean (ms) | median | 95th pct. | max | dropped | rested | load avg. before / after |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        *rows, ""])
    print(table)
    out = Path(args.out) if args.out else REPO / "outputs" / f"benchmark-live-{started:%Y%m%d-%H%M%S}.md"
    print(f"wrote {write_new_text(out, table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
