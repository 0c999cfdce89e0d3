#!/usr/bin/env python
"""What LoRA weights that change every frame cost: ``LoraPatch.set_weights`` on the full-size SD v1 UNet
(random weights; text encoder and autoencoder tiny, they play no part) with a LoRA on every attention
projection (attn1 and attn2: to_q, to_k, to_v, to_out.0; 128 layers), written to a temporary file.

    python scripts/benchmark_lora.py                               # CPU, float32, rank 16, 20 frames
    python scripts/benchmark_lora.py --device cuda --dtype float16

Prints the time of load_loras (read, map, up @ down once), of one set_weights call per frame (every
call changes the weight, so every touched tensor is rewritten: W = W0 + w * delta), and the memory the
patch keeps (the originals and one delta per touched tensor).
"""
from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--frames", type=int, default=20)
    args = parser.parse_args(argv)
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
