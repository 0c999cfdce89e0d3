#!/usr/bin/env python
"""What LoRA weights that change every frame cost, side by side in one run, as a markdown table that is
printed and written to outputs/benchmark-lora-<UTC time>.md (or ``--out``).

    python scripts/benchmark_lora.py                               # CPU, float32, rank 16, 20 frames
    python scripts/benchmark_lora.py --device cuda --dtype float16
    python scripts/benchmark_lora.py --render --device cpu          # a real audio2video render, demo model

Default: the full-size SD v1 UNet (random weights; text encoder and autoencoder tiny, they play no
part; ``--demo``: the demo model's UNet instead, a quick check of the script) with a LoRA on every
attention projection (attn1 and attn2: to_q, to_k, to_v, to_out.0; 128 layers), written to a
temporary file. The ways take turns for ``--frames`` frames: a constant weight (``set_weights`` with
the weight unchanged: nothing to rewrite), a scheduled weight (every call changes the weight, so every
touched tensor is rewritten: W = W0 + w * delta), and one guided UNet step (batch 2) at ``--size`` as
the yardstick; the header gives the time of ``load_loras`` (read, map, up @ down once) and the memory
the patch keeps (the originals and one delta per touched tensor).

``--render``: renders the same 2 s click track with audio2video on the demo model (``--render_size``
pixels, 10 steps, strength 0.5) three ways in turn: without a LoRA, with a rank-16 LoRA on every
attention projection of its UNet at a constant weight (merged once), and at the scheduled weight
``0.2 + 0.8*onset`` (set on every diffused frame); the table gives milliseconds per frame of each (CPU
and wall time) and the time spent in ``Engine.set_lora_weights``.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.util import instantiate_from_config  # noqa: E402
from scripts.benchmark_parts import synchronize, write_report  # noqa: E402
from sounddiffusion.model.lora import load_loras  # noqa: E402
from sounddiffusion.model.lora_names import unet_layer_names  # noqa: E402

ATTENTION = re.compile(r"\.attn[12]\.(to_[qkv]|to_out\.0)$")


def full_size_unet_model(device: torch.device, dtype: torch.dtype):
    """SD v1's LatentDiffusion with the full-size UNet of v1-inference.yaml, random N(0, 0.02) weights."""
    config = OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml")
    config.model.params.cond_stage_config.params = {"text_config": {"hidden_size": 32, "intermediate_size": 64,
                                                                    "num_hidden_layers": 1, "num_attention_heads": 4}}
    config.model.params.first_stage_config.params.ddconfig.update(ch=32, ch_mult=[1, 1])
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    model = model.to_empty(device=device).to(dtype).eval().requires_grad_(False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def attention_lora(unet, rank: int, path: Path) -> int:
    """Writes a kohya LoRA of the given rank on every attention projection; returns how many layers."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, module_path in unet_layer_names(unet).items():
        if ATTENTION.search(name):
            out, inp = unet.get_submodule(module_path).weight.shape
            stem = f"lora_unet_{name.replace('.', '_')}"
            tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, inp, generator=g).half() * 0.1
            tensors[f"{stem}.lora_up.weight"] = torch.randn(out, rank, generator=g).half() * 0.1
            tensors[f"{stem}.alpha"] = torch.tensor(float(rank)).half()
    save_file(tensors, str(path))
    return len(tensors) // 3


def click_track(path: Path, seconds: float = 4.0, bpm: float = 120.0, sr: int = 44100) -> Path:
    """A quiet tone with a click on every beat: onsets that swing a scheduled weight."""
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    y = 0.05 * np.sin(2 * np.pi * 220 * t)
    for start in np.arange(0.25, seconds, 60.0 / bpm):
        i, n = int(start * sr), sr // 20
        y[i:i + n] += 0.8 * np.exp(-np.arange(len(y[i:i + n])) / (sr / 200)) * np.sin(2 * np.pi * 1500 * t[:len(y[i:i + n])])
    sf.write(path, y.astype(np.float32), sr)
    return path


def render_cost(args) -> list[str]:
    """audio2video on the demo model without a LoRA, with a constant one and with a scheduled one,
    ``args.repeats`` times each in turn; the table's lines (medians: CPU time of this process, which a
    busy machine disturbs less than wall time, and wall time)."""
    from dataclasses import replace

    from sounddiffusion.logs import configure_logging
    from sounddiffusion.model.engine import Engine
    from sounddiffusion.model.loading import build_demo_model
    from sounddiffusion.settings import ModelSettings, VideoSettings
    from sounddiffusion.video.loop import run_audio2video

    configure_logging(False)
    logging.getLogger("sounddiffusion").setLevel(logging.WARNING)
    spent = []
    set_lora_weights = Engine.set_lora_weights

    def timed(engine, weights):
        synchronize(engine.device)
        started = time.perf_counter()
        set_lora_weights(engine, weights)
        synchronize(engine.device)
        spent.append(time.perf_counter() - started)
    Engine.set_lora_weights = timed
    seconds, fps = 2.0, 12
    frames = int(seconds * fps)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        sound = click_track(folder / "clicks.wav", seconds=seconds)
        layers = attention_lora(build_demo_model().model.diffusion_model, args.rank, folder / "style.safetensors")
        lora = str(folder / "style.safetensors")
        cases = {"no LoRA": (), "constant 0.7 (merged once)": (f"{lora}:0.7",),
                 "scheduled `0.2 + 0.8*onset`": (f"{lora}:0.2 + 0.8*onset",)}
        results = {name: [] for name in cases}
        for repeat in range(args.repeats + 1):  # the first round warms up (imports, caches) and is not counted
            for name, loras in cases.items():
                spent.clear()
                settings = VideoSettings(audio=str(sound), fps=fps, strength="0.5", ddim_steps=10, seed=1,
                                         H=args.render_size, W=args.render_size,
                                         output=str(folder / f"{repeat}-{len(results[name])}-{len(loras)}.mp4"))
                cpu, wall = time.process_time(), time.perf_counter()
                run_audio2video(replace(settings), ModelSettings(demo=True, device=args.device, lora=loras))
                if repeat:
                    results[name].append((time.process_time() - cpu, time.perf_counter() - wall, sum(spent),
                                          len(spent)))
    lines = [f"audio2video on the demo model, {args.render_size}x{args.render_size}, 10 steps at strength 0.5, "
             f"{fps} fps, a {seconds:g} s click track ({frames} frames); a rank-{args.rank} LoRA on the {layers} "
             f"attention projections of its UNet; {args.device}; medians of {args.repeats} renders after a warm-up "
             f"round, the ways in turn, the model's load and the MP4's encoding included", "",
             "| way | CPU ms/frame | wall ms/frame | `set_lora_weights` per frame |", "| --- | ---: | ---: | ---: |"]
    for name, runs in results.items():
        cpu, wall, lora_s, calls = (statistics.median(values) for values in zip(*runs))
        lines.append(f"| {name} | {cpu / frames * 1e3:.1f} | {wall / frames * 1e3:.1f} | "
                     f"{lora_s / max(calls, 1) * 1e3:.2f} ms |")
    return lines


def guided_step_seconds(model, context_dim: int, size: int, device: torch.device, dtype: torch.dtype):
    """``step()``: one UNet call on a guided batch of 2 latents for a ``size`` x ``size`` picture; returns
    its seconds."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(device, dtype)
    cond = torch.randn(2, 77, context_dim, generator=g).to(device, dtype)
    t = torch.full((2,), 500, device=device, dtype=torch.long)

    def step() -> float:
        synchronize(device)
        started = time.perf_counter()
        with torch.inference_mode():
            model.apply_model(x, t, cond)
        synchronize(device)
        return time.perf_counter() - started
    return step


def weight_cost(args) -> list[str]:
    """The table's lines: a constant and a scheduled weight's ``set_weights`` per frame next to one
    guided UNet step, the ways in turn for ``args.frames`` frames (medians)."""
    from sounddiffusion.model.loading import build_demo_model

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    started = time.perf_counter()
    if args.demo:
        model, context_dim, what = build_demo_model().to(device, dtype).eval(), 64, "the demo model's UNet"
    else:
        model, context_dim, what = full_size_unet_model(device, dtype), 768, "full-size SD v1 UNet"
    built = time.perf_counter() - started
    unet = model.model.diffusion_model
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "attention-lora.safetensors"
        layers = attention_lora(unet, args.rank, path)
        synchronize(device)
        started = time.perf_counter()
        patch = load_loras(model, [(path, 0.5)])
        synchronize(device)
        load_s = time.perf_counter() - started
    touched = sum(model.get_parameter(name).numel() for name, _ in patch.touched)
    step = guided_step_seconds(model, context_dim, args.size, device, dtype)
    step()  # warm-up: the first call packs weights and picks kernels

    def set_weights(weight: float) -> float:
        synchronize(device)
        started = time.perf_counter()
        patch.set_weights([weight])
        synchronize(device)
        return time.perf_counter() - started

    ways = {"constant weight (set_weights, weight unchanged)": [], "scheduled weight (set_weights, a new weight)": [],
            f"one guided UNet step at {args.size}x{args.size} (batch 2)": []}
    constant, scheduled, unet_step = ways.values()
    for frame in range(args.frames):
        constant.append(set_weights(patch.weights[0]))
        scheduled.append(set_weights(0.25 + 0.5 * (frame % 2)))  # never the weight merged before
        unet_step.append(step())
    yardstick = statistics.median(unet_step)
    lines = [f"{what}: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M weights, {args.dtype} on {device} "
             f"(built in {built:.1f} s); a rank-{args.rank} LoRA on its {layers} attention projections "
             f"({touched / 1e6:.1f} M weights touched): load_loras {load_s:.2f} s, the patch keeps "
             f"{patch.kept_bytes / 2**20:.0f} MiB. Medians of {args.frames} frames, the ways in turn.", "",
             "| way | ms per frame | min .. max ms | share of one UNet step |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {statistics.median(times) * 1e3:.2f} | {min(times) * 1e3:.2f} .. {max(times) * 1e3:.2f} | "
              f"{statistics.median(times) / yardstick * 100:.2f} % |" for name, times in ways.items()]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--size", type=int, default=128, help="the picture size of the UNet step (default mode)")
    parser.add_argument("--demo", action="store_true", help="the demo model's UNet instead of the full-size one")
    parser.add_argument("--render", action="store_true", help="time a real audio2video render on the demo model")
    parser.add_argument("--render_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="the table's file (default: outputs/benchmark-lora-<UTC time>.md)")
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    table = render_cost(args) if args.render else weight_cost(args)
    command = "python " + " ".join(shlex.quote(a) for a in ["scripts/benchmark_lora.py", *(argv or sys.argv[1:])])
    threads = os.environ.get("OMP_NUM_THREADS")
    lines = [f"# LoRA weights per frame, {started:%Y-%m-%d %H:%M} UTC", "",
             f"`{'OMP_NUM_THREADS=' + threads + ' ' if threads else ''}{command}` "
             f"({torch.get_num_threads()} torch threads, torch {torch.__version__})", "", *table]
    write_report(lines, args.out, "benchmark-lora", started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
