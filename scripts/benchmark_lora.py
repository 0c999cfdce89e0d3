#!/usr/bin/env python
"""What LoRA weights that change every frame cost: ``LoraPatch.set_weights`` on the full-size SD v1 UNet
(random weights; text encoder and autoencoder tiny, they play no part) with a LoRA on every attention
projection (attn1 and attn2: to_q, to_k, to_v, to_out.0; 128 layers), written to a temporary file.

    python scripts/benchmark_lora.py                               # CPU, float32, rank 16, 20 frames
    python scripts/benchmark_lora.py --device cuda --dtype float16
    python scripts/benchmark_lora.py --render --device cpu          # a real audio2video render, demo model

Prints the time of load_loras (read, map, up @ down once), of one set_weights call per frame (every
call changes the weight, so every touched tensor is rewritten: W = W0 + w * delta), and the memory the
patch keeps (the originals and one delta per touched tensor).

``--render``: renders the same 4 s click track with audio2video on the demo model (``--render_size``
pixels, 10 steps, strength 0.5) three times: without a LoRA, with a rank-16 LoRA on every attention
projection of its UNet at a constant weight (merged once), and at the scheduled weight
``0.2 + 0.8*onset`` (set on every diffused frame); prints seconds per frame of each and the time spent
in ``Engine.set_lora_weights``.
"""
from __future__ import annotations

import argparse
import logging
import re
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def render_cost(args) -> int:
    """audio2video on the demo model without a LoRA, with a constant one and with a scheduled one,
    ``args.repeats`` times each in turn (the medians are printed: CPU time of this process, which a
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
        cases = {"no LoRA": (), "constant 0.7": (f"{lora}:0.7",),
                 "scheduled 0.2 + 0.8*onset": (f"{lora}:0.2 + 0.8*onset",)}
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
    print(f"audio2video, demo model, {args.render_size}x{args.render_size}, 10 steps at strength 0.5, {fps} fps, "
          f"{seconds:g} s ({frames} frames); rank-{args.rank} LoRA on its {layers} attention layers; {args.device}; "
          f"medians of {args.repeats} renders, model load included")
    for name, runs in results.items():
        cpu, wall, lora_s, calls = (statistics.median(values) for values in zip(*runs))
        print(f"  {name:27s} CPU {cpu / frames * 1e3:7.1f} ms/frame, wall {wall / frames * 1e3:7.1f} ms/frame, "
              f"set_lora_weights {lora_s / max(calls, 1) * 1e3:.2f} ms per frame")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--render", action="store_true", help="time a real audio2video render on the demo model")
    parser.add_argument("--render_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.render:
        return render_cost(args)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    started = time.perf_counter()
    model = full_size_unet_model(device, dtype)
    unet = model.model.diffusion_model
    print(f"full-size SD v1 UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M weights, {args.dtype} "
          f"on {device} (built in {time.perf_counter() - started:.1f} s)")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "attention-lora.safetensors"
        layers = attention_lora(unet, args.rank, path)
        synchronize(device)
        started = time.perf_counter()
        patch = load_loras(model, [(path, 0.0)])
        synchronize(device)
        load_s = time.perf_counter() - started
    kept = patch.kept_bytes
    touched = sum(model.get_parameter(name).numel() for name, _ in patch.touched)
    times = []
    for frame in range(args.frames):
        weight = 0.5 + 0.5 * torch.sin(torch.tensor(frame * 0.7)).item()
        synchronize(device)
        started = time.perf_counter()
        patch.set_weights([weight])
        synchronize(device)
        times.append(time.perf_counter() - started)
    print(f"rank-{args.rank} LoRA on {layers} attention layers ({touched / 1e6:.1f} M weights touched): "
          f"load_loras {load_s:.2f} s, patch keeps {kept / 2**20:.0f} MiB")
    print(f"set_weights per frame: median {statistics.median(times) * 1e3:.1f} ms, "
          f"min {min(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms over {args.frames} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
