#!/usr/bin/env python
"""Throughput of an audio2img batch on Ray with 1 and 2 (or more) workers.

The same job runs once per worker count: 64 short synthesized sounds (tones and sweeps, 1 s),
one picture each, rendered by :func:`sounddiffusion.jobs.cluster.run_on_ray` with the worker of
``audio2img.py --input_folder ... --ray`` (:class:`sounddiffusion.jobs.batch_jobs.SoundWorker`: same
flags, same seeds, same PNG parameters). Every worker loads the model once before taking
sounds. The pictures of every run are compared byte for byte: they must not depend on the
number of workers.

    OMP_NUM_THREADS=1 python scripts/benchmark_cluster.py                   # demo model, CPU, 64x64, 5 steps
    python scripts/benchmark_cluster.py --device cuda --size 512 --steps 50 --workers 1,2,4 \\
        --batch_size 4 --ckpt models/ldm/stable-diffusion-v1/model.ckpt --address auto   # one worker per GPU

Prints a markdown table, also written to outputs/benchmark-cluster-<UTC time>.md (never
overwritten): per worker count the wall time (Ray start, model loads and warm-up included),
items/s, mean seconds per item inside a worker (a batch's time shared by its sounds), and the
scaling efficiency (items/s with N workers) / (N x items/s with 1 worker).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sounddiffusion.files import write_new_text  # noqa: E402
from sounddiffusion.jobs.batch_jobs import MakeSoundWorker, file_items  # noqa: E402
from sounddiffusion.jobs.cluster import run_on_ray  # noqa: E402
from sounddiffusion.jobs.manifest import Manifest  # noqa: E402
from sounddiffusion.settings import ModelSettings, SoundImageSettings  # noqa: E402

log = logging.getLogger("benchmark_cluster")
SAMPLE_RATE = 44100


def synthesize_sounds(folder: Path, count: int, seconds: float = 1.0) -> list[Path]:
    """``count`` WAVs of ``seconds``: tones and sweeps at different pitches, some with noise."""
    import soundfile

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    paths = []
    for i in range(count):
        f0 = 110.0 * 2 ** (i / 12)
        phase = 2 * np.pi * (f0 * t + (i % 3) * 0.5 * f0 * t ** 2)  # every third a pure tone
        y = 0.5 * np.sin(phase) + 0.05 * (i % 4) * np.random.default_rng(i).standard_normal(t.size)
        path = folder / f"sound-{i:03d}.wav"
        soundfile.write(path, y.astype(np.float32), SAMPLE_RATE)
        paths.append(path)
    return paths


def job_settings(args: argparse.Namespace, folder: Path, outdir: Path) -> tuple[SoundImageSettings, ModelSettings]:
    """The settings of ``audio2img.py --input_folder FOLDER --outdir OUTDIR`` with the benchmark's flags."""
    settings = SoundImageSettings(input_folder=str(folder), outdir=str(outdir), H=args.size, W=args.size,
                                  ddim_steps=args.steps, n_samples=1, n_iter=1, skip_grid=True,
                                  batch_size=args.batch_size)
    model = ModelSettings(ckpt=args.ckpt, demo=not args.ckpt, device=args.device)
    return settings, model


def run_once(args: argparse.Namespace, sounds: list[Path], workers: int, outdir: Path) -> dict:
    """One job with ``workers`` workers into ``outdir``, through the batch worker of
    ``audio2img.py --ray``: its figures."""
    settings, model = job_settings(args, sounds[0].parent, outdir)
    manifest = Manifest(outdir / "manifest.jsonl")
    started = time.perf_counter()
    summary = run_on_ray(file_items(sounds, settings, model), MakeSoundWorker(settings, model),
                         address=args.address, workers=workers, manifest=manifest,
                         desc=f"{workers} worker(s)", unit="sound", batch_size=settings.batch_size)
    wall = time.perf_counter() - started
    if summary.failed or summary.skipped or summary.finished != len(sounds):
        raise SystemExit(f"the job with {workers} workers did not make every picture:\n{summary.report('sound')}")
    item_seconds = [e["seconds"] for e in manifest.entries() if e["seconds"] is not None]
    return dict(workers=workers, wall=wall, items_per_s=len(sounds) / wall,
                item_s=float(np.mean(item_seconds)), per_worker=summary.per_worker)


def same_pictures(first: Path, other: Path) -> bool:
    """True when both folders hold the same PNG names with the same bytes."""
    names = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    return names == sorted(p.relative_to(other) for p in other.rglob("*.png")) and \
        all((first / n).read_bytes() == (other / n).read_bytes() for n in names)


def markdown(results: list[dict], context: dict) -> str:
    base = results[0]["items_per_s"] / results[0]["workers"]
    base_render = 1 / results[0]["item_s"]
    rows = ["| workers | wall s | items/s | mean s/item in a worker | efficiency (wall) | "
            "efficiency (rendering) | items per worker |", "|---|---|---|---|---|---|---|"]
    for r in results:
        eff_wall = r["items_per_s"] / (r["workers"] * base)
        eff_render = (r["workers"] / r["item_s"]) / (r["workers"] * base_render)
        counts = ", ".join(str(c) for _, c in sorted(r["per_worker"].items()))
        rows.append(f"| {r['workers']} | {r['wall']:.1f} | {r['items_per_s']:.3f} | {r['item_s']:.3f} | "
                    f"{eff_wall:.2f} | {eff_render:.2f} | {counts} |")
    head = [f"# Ray batch benchmark, {context['date']}", "",
            f"- machine: {context['machine']}", f"- command: `{context['command']}`",
            f"- job: {context['items']} sounds of 1 s, audio2img {' '.join(context['argv'])}",
            f"- pictures identical for every worker count: {context['identical']}", ""]
    return "\n".join(head + rows) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=64, help="sounds in the job")
    p.add_argument("--workers", default="1,2", help="worker counts to compare, e.g. 1,2,4")
    p.add_argument("--size", type=int, default=64, help="picture width and height")
    p.add_argument("--steps", type=int, default=5, help="DDIM steps")
    p.add_argument("--batch_size", type=int, default=1, help="sounds per sampling call inside a worker")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ckpt", default=None, help="a real checkpoint instead of the demo model")
    p.add_argument("--address", default=None, help="a Ray cluster (auto, ray://HOST:PORT); default local")
    p.add_argument("--out", type=Path, default=REPO / "outputs", help="folder of the markdown table")
    return p


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    argv = ("--H", str(args.size), "--W", str(args.size), "--ddim_steps", str(args.steps),
            "--n_samples", "1", "--n_iter", "1", "--batch_size", str(args.batch_size), "--skip_grid",
            "--device", args.device,
            *(("--ckpt", args.ckpt) if args.ckpt else ("--demo",)))
    with tempfile.TemporaryDirectory(prefix="benchmark-cluster-") as tmp:
        (Path(tmp) / "sounds").mkdir()
        sounds = synthesize_sounds(Path(tmp) / "sounds", args.items)
        results = []
        for n in counts:
            results.append(run_once(args, sounds, n, Path(tmp) / f"out-{n}"))
            log.info("%d worker(s): %.1f s, %.3f items/s", n, results[-1]["wall"], results[-1]["items_per_s"])
        identical = all(same_pictures(Path(tmp) / f"out-{counts[0]}", Path(tmp) / f"out-{n}") for n in counts[1:])
    now = datetime.datetime.now(datetime.timezone.utc)
    context = dict(date=now.strftime("%Y-%m-%d %H:%M UTC"), items=args.items, argv=argv,
                   identical="yes" if identical else "NO",
                   machine=f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} "
                           f"CPUs, {platform.system()} {platform.release()}, "
                           f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
                   command=" ".join(shlex.quote(a) for a in ["python", *sys.argv]))
    text = markdown(results, context)
    print(text)
    print(f"written to {write_new_text(args.out / now.strftime('benchmark-cluster-%Y%m%dT%H%M%SZ.md'), text)}")
    if not identical:
        raise SystemExit("the pictures differ between worker counts")


if __name__ == "__main__":
    main()
