#!/usr/bin/env python
"""Writes a LoRA file for the --demo model, to try --lora (and a weight that follows the music)
without downloading Stable Diffusion weights.

    python scripts/make_demo_lora.py demo-style.safetensors
    python audio2video.py --demo --path examples/audio/drums.wav --fps 8 --textprompt "a forest" \\
        --lora demo-style.safetensors:"0.2 + 0.8*onset"

The file is in kohya's format (``lora_unet_...``, ``lora_te_...``; ``.lora_down.weight``,
``.lora_up.weight``, ``.alpha``) with seeded random weights on every attention projection of the
demo's UNet and text encoder, sized for the demo's own layers (64-wide text conditioning): it fits
no real model, and no real LoRA fits the demo. Like the demo's text encoder it means nothing: it
shifts the demo's colours and light (through the prompt's conditioning) and, a little, its texture
(through the UNet's 5 % share), which is enough to see a weight rise and fall with the music.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sounddiffusion.model.loading import build_demo_model  # noqa: E402
from sounddiffusion.model.lora_names import unet_layer_names  # noqa: E402

ATTENTION = re.compile(r"\.attn[12]\.(to_[qkv]|to_out\.0)$")
TEXT_ATTENTION = re.compile(r"^(?:text_model\.)?encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj$")


def demo_lora_tensors(rank: int = 4, strength: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """kohya tensors for every attention projection of the demo model, down ~ N(0, 1/in), up ~ N(0,
    strength^2 / rank), alpha = rank, so that at weight 1 each layer changes by about ``strength``
    times the size of its input."""
    model = build_demo_model()
    generator = torch.Generator().manual_seed(seed)
    layers = {f"lora_unet_{name.replace('.', '_')}": model.model.diffusion_model.get_submodule(path)
              for name, path in unet_layer_names(model.model.diffusion_model).items() if ATTENTION.search(name)}
    text = model.cond_stage_model.transformer
    for name, module in text.named_modules():
        if TEXT_ATTENTION.match(name):
            layers["lora_te_text_model_" + name.removeprefix("text_model.").replace(".", "_")] = module
    tensors = {}
    for stem, layer in sorted(layers.items()):
        out, inp = layer.weight.shape
        tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, inp, generator=generator) / inp**0.5
        tensors[f"{stem}.lora_up.weight"] = torch.randn(out, rank, generator=generator) * strength / rank**0.5
        tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    return tensors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--rank", type=int, default=4, help="rank of every layer's update")
    parser.add_argument("--strength", type=float, default=1.0, help="how much the file changes at weight 1")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights: another seed, another 'style'")
    args = parser.parse_args(argv)
    tensors = demo_lora_tensors(args.rank, args.strength, args.seed)
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.output)
    print(f"wrote {args.output}: a rank-{args.rank} LoRA on {len(tensors) // 3} attention layers of the demo model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
