#!/usr/bin/env python
"""Peak memory of single model calls on a CPU, against the estimate of sounddiffusion.model.memory:
the peaks its docstring quotes and the values-per-unit constants it uses come from this script.

    python scripts/measure_memory.py                       # SD v1 and the demo model, every part (~5 min)
    python scripts/measure_memory.py --parts taesd --sizes 512 1024
    python scripts/measure_memory.py --config tests/data/tiny-v1/config.yaml --parts decoder --sizes 384

Each call runs in a fresh process, float32, one thread, with random weights (memory does not
depend on their values): one call at 64x64 first (the one-off allocations), then the measured call;
its peak is the peak resident memory (Linux /proc/self/status VmHWM, reset to the memory held now
by writing 5 to /proc/self/clear_refs) above what the process held before. Parts, of each
``--config`` (default: configs/stable-diffusion/v1-inference.yaml and v1-demo.yaml):

  decoder   the config's autoencoder decoding one latent (SD v1: the KL decoder; the demo: block means)
  unet      its UNet on a guidance batch of 2, cross-attention on a (2, 77, context_dim) context
  taesd     TAESD's decoder (ldm.models.taesd, 64 channels; --vae taesd:PATH), one latent, once

Prints per part and size the measured and the estimated MiB (memory.unet_values or
memory.decoder_values, 4 bytes a value) and the measured values per unit, the quantity memory.py's
constants stand for: per pixel and channel for the KL and TAESD decoders (the KL decoder's CPU
attention term, ((H/8)(W/8))^2 values, taken off first), per pixel for the block means, per latent
position, picture of the guidance batch and model channel for the UNets. Linux only.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARTS = ("decoder", "unet", "taesd")
DEFAULT_SIZES = {"decoder": (256, 384, 512), "unet": (256, 512, 768), "taesd": (256, 512, 1024)}
MiB = 2**20


def _status(field: str) -> int:
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))


def _model(part: str, config):
    """The part of ``config`` (an OmegaConf model config), built with random weights, in eval mode."""
    import torch

    from ldm.models.taesd import TinyAutoencoder
    from ldm.util import instantiate_from_config

    if part == "taesd":
        return TinyAutoencoder(has_encoder=False).eval()
    params = config.model.params
    if part == "decoder":
        return instantiate_from_config(params.first_stage_config).eval()
    unet = instantiate_from_config(params.unet_config).eval()
    if hasattr(unet, "set_null_context"):  # the demo's denoiser measures against the empty prompt
        unet.set_null_context(torch.randn(77, params.unet_config.params.context_dim))
    return unet


def _call(part: str, model, size: int, config) -> None:
    """One call of ``model`` on a ``size`` x ``size`` picture's latent."""
    import torch

    latent = torch.randn(1, 4, size // 8, size // 8)
    if part == "unet":
        width = int(config.model.params.unet_config.params.context_dim)
        model(latent.expand(2, -1, -1, -1), torch.tensor([500, 500]), context=torch.randn(2, 77, width))
    else:
        model.decode(latent)


def measure(part: str, size: int, config_path) -> int:
    """Bytes of peak resident memory of one call of ``part`` at ``size`` above what was held
    before it; run it in a fresh process (:func:`measure_in_fresh_process`)."""
    import torch

    from sounddiffusion.model.configs import load_config

    config = load_config(config_path)
    torch.set_num_threads(1)
    with torch.inference_mode():
        model = _model(part, config)
        _call(part, model, 64, config)
        with open("/proc/self/clear_refs", "w") as reset:
            reset.write("5")
        before = _status("VmRSS:")
        _call(part, model, size, config)
    return _status("VmHWM:") - before


def measure_in_fresh_process(part: str, size: int, config_path) -> int:
    """:func:`measure` in a new Python process (one thread); SystemExit with its stderr if it fails."""
    run = subprocess.run([sys.executable, __file__, "--one", part, str(size), str(config_path)],
                         capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    if run.returncode:
        raise SystemExit(f"measuring {part} of {config_path} at {size}x{size} failed:\n{run.stderr}")
    return int(run.stdout.split()[-1])


def estimate(part: str, size: int, config) -> int:
    """Bytes memory.py estimates for the part's call (float32, on a CPU)."""
    from sounddiffusion.model import memory

    if part == "unet":
        return 4 * memory.unet_values(config, size, size)
    return 4 * memory.decoder_values(config, size, size, taesd=part == "taesd")


def values_per_unit(part: str, size: int, measured: int, config) -> float:
    """The measured peak in the units of memory.py's constants (see the module doc)."""
    from ldm.models.taesd import WIDTH

    params = config.model.params
    values, pixels, positions = measured / 4, size * size, (size // 8) ** 2
    if part == "unet":
        return values / (2 * positions * int(params.unet_config.params.model_channels))
    if part == "taesd":
        return values / (pixels * WIDTH)
    if "ddconfig" not in params.first_stage_config.get("params", {}):
        return values / pixels  # block means
    return (values - positions ** 2) / (pixels * int(params.first_stage_config.params.ddconfig.ch))


def main(argv=None) -> int:
    from sounddiffusion.model.configs import load_config
    from sounddiffusion.settings import DEFAULT_CONFIG, DEMO_CONFIG

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--config", action="append", help="a model config (repeatable; default: SD v1 and the demo)")
    parser.add_argument("--sizes", nargs="+", type=int, help="picture sides in pixels (default: per part)")
    parser.add_argument("--one", nargs=3, metavar=("PART", "SIZE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        parser.error("measuring needs Linux's /proc/self/clear_refs")
    if args.one:
        print(measure(args.one[0], int(args.one[1]), args.one[2]))
        return 0
    configs = args.config or [str(DEFAULT_CONFIG), str(DEMO_CONFIG)]
    runs = [(part, path) for path in configs for part in args.parts if part != "taesd"]
    runs += [("taesd", configs[0])] if "taesd" in args.parts else []
    print(f"{'config':<18} {'part':<8} {'size':>9} {'measured':>12} {'estimate':>12} {'values/unit':>12}")
    for part, path in runs:
        config = load_config(path)
        for size in args.sizes or DEFAULT_SIZES[part]:
            measured = measure_in_fresh_process(part, size, path)
            name = "-" if part == "taesd" else Path(path).name
            per_unit = values_per_unit(part, size, measured, config)
            print(f"{name:<18} {part:<8} {size:>4}x{size:<4} {measured / MiB:>8.0f} MiB "
                  f"{estimate(part, size, config) / MiB:>8.0f} MiB {per_unit:>12.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
