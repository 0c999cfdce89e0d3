#!/usr/bin/env python
"""Two small timings docs/PERFORMANCE.md quotes, side by side in one run, as a markdown table that is
printed and written to outputs/benchmark-op-costs-<UTC time>.md (or ``--out``):

1. grey-scale morphology, the dearest bending operator (``dilate`` at radius 2: a 5 x 5 window;
   ``erode`` is the same with signs flipped), per call on a latent (1, 4, 64, 64) and on SD v1's
   output-block activations (2, 1280, 32, 32) that a block bend sees at 512x512 with guidance;
2. one call of the demo model's UNet (``apply_model``) on a batch of 2 (guidance: conditional and
   unconditional rows) against a batch of 1, at 16 x 16 latents (128x128 pictures, as
   ``benchmark.py --samplers`` renders by default).

    python scripts/benchmark_op_costs.py                  # CPU, one torch thread, 20 calls each
    python scripts/benchmark_op_costs.py --device cuda --threads 0

Each row: the median of ``--calls`` timed calls after one warm-up call, with min and max.
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sounddiffusion.control.bending import apply  # noqa: E402
from scripts.benchmark_parts import synchronize, write_report  # noqa: E402
from sounddiffusion.model.loading import build_demo_model  # noqa: E402


def timed(call: Callable[[], object], calls: int, device: torch.device) -> list[float]:
    """Seconds of each of ``calls`` calls of ``call`` after one warm-up call."""
    call()
    times = []
    for _ in range(calls):
        synchronize(device)
        started = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def measure(device: torch.device, calls: int) -> dict[str, list[float]]:
    """Row name -> seconds of each timed call."""
    g = torch.Generator().manual_seed(0)
    rows = {}
    for shape in ((1, 4, 64, 64), (2, 1280, 32, 32)):
        x = torch.randn(shape, generator=g).to(device)
        rows[f"dilate at radius 2, {tuple(shape)}"] = timed(lambda: apply("dilate", x, 2.0), calls, device)
    model = build_demo_model().to(device).eval()
    cond = model.get_learned_conditioning([""]).to(device)
    for batch in (1, 2):
        x = torch.randn(batch, 4, 16, 16, generator=g).to(device)
        t = torch.full((batch,), 500, device=device, dtype=torch.long)
        c = cond.expand(batch, -1, -1)
        with torch.inference_mode():
            rows[f"demo UNet apply_model, batch {batch}, 16x16 latents"] = timed(
                lambda: model.apply_model(x, t, c), calls, device)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per row")
    parser.add_argument("--out", default=None,
                        help="the table's file (default: outputs/benchmark-op-costs-<UTC time>.md)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = measure(device, args.calls)
    command = "python " + " ".join(shlex.quote(a) for a in ["scripts/benchmark_op_costs.py", *(argv or sys.argv[1:])])
    batch_1, batch_2 = (statistics.median(rows[f"demo UNet apply_model, batch {b}, 16x16 latents"]) for b in (1, 2))
    lines = [f"# Operator and UNet-call costs, {started:%Y-%m-%d %H:%M} UTC", "",
             f"`{command}`: {device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
             f"medians of {args.calls} calls after a warm-up call", "",
             "| call | median ms | min .. max ms |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {statistics.median(times) * 1e3:.2f} | {min(times) * 1e3:.2f} .. {max(times) * 1e3:.2f} |"
              for name, times in rows.items()]
    lines += ["", f"batch_2_vs_batch_1={batch_2 / batch_1:.2f}"]
    write_report(lines, args.out, "benchmark-op-costs", started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
