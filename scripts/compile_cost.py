#!/usr/bin/env python
"""The one-time cost of ``--compile``: time the first and the second img2img of a compiled UNet.

Run it twice with the same ``TORCHINDUCTOR_CACHE_DIR`` (default /tmp/torchinductor_$USER): the
first process compiles from scratch (``fxgraph_cache_miss``), the second finds inductor's cached
code (``fxgraph_cache_hit``) and pays only for tracing and loading it.

    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor python scripts/compile_cost.py   # twice

Default model: the tiny test model (tests/data/tiny-v1), 64x64, DDIM 4 steps x strength 0.5.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.util import load_model_from_config  # noqa: E402
from sounddiffusion.model.configs import load_config
from sounddiffusion.model.loading import engine_for_model# noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "tests" / "data" / "tiny-v1"),
                        help="folder with config.yaml and model.safetensors")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", type=int, default=64, help="picture side in pixels")
    args = parser.parse_args(argv)
    folder = Path(args.model)
    model = load_model_from_config(load_config(folder / "config.yaml"), str(folder / "model.safetensors"),
                                   device="cpu")
    engine = engine_for_model(model, device=args.device, compile=True)
    generator = torch.Generator().manual_seed(0)
    shape = engine.latent_shape(1, args.size, args.size)
    init, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    cond = torch.randn(1, 77, engine.context_dim, generator=generator)
    for label in ("first img2img (compiles)", "second img2img"):
        start = time.perf_counter()
        engine.img2img(init, cond, noise=noise, strength=0.5, sampler="ddim", steps=4)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        print(f"{label}: {time.perf_counter() - start:.2f} s", flush=True)
    from torch._dynamo.utils import counters

    print("inductor cache:", {k: v for k, v in counters["inductor"].items() if "fxgraph_cache" in k})
    return 0


if __name__ == "__main__":
    sys.exit(main())
