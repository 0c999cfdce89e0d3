"""How much memory a picture size needs, against what this machine has: a size that cannot fit is
refused in one line before anything loads, instead of the kernel killing the run without a word.

:func:`memory_needed` estimates a run's peak from the model config alone (see its formula);
:func:`available_memory` says what the device can still give; :func:`check_memory` refuses. The
constants come from the peak resident memory of single calls on a CPU (float32, each in a fresh
process, random weights of configs/stable-diffusion/v1-inference.yaml), against the estimate:

    SD v1 decoder 256x256 298 MiB (est. 196), 384x384 573 (452), 512x512 994 (832), 768x768 2168 (2052)
    SD v1 UNet, guidance batch of 2, 768x768: 734 MiB (est. 517; ~300 MiB of it at any size)
    demo block-mean decoder 1024x1024 180 MiB (est. 172); demo UNet 1024x1024 173 MiB (est. 96)

The estimate aims at what a run needs at least, so that only sizes that cannot fit are refused.
It is not measured on CUDA or MPS yet.
"""
from __future__ import annotations

import functools
import os

import torch

from sounddiffusion.errors import DeviceError
from sounddiffusion.model.configs import load_config
from sounddiffusion.model.devices import weight_dtype
from sounddiffusion.settings import DEFAULT_CONFIG, DEMO_CONFIG, ModelSettings

# Values held at the peak of one UNet call, per latent position, per picture of the guidance
# batch, per channel of the config's model_channels: skip connections of every level and a
# transformer block's feed-forward at full latent resolution. Measured: SD v1 (320 channels) 23,
# the 32-channel demo and test UNets 40 (their fixed costs per position weigh more).
UNET_VALUES_PER_CHANNEL = 23
# Values held at the peak of decoding, per pixel, per picture, per channel of the KL
# autoencoder's ``ch`` (its last up-block at full resolution). Measured: SD v1 (ch 128) 6.1.
DECODER_VALUES_PER_CHANNEL = 6
# The demo's BlockMeanAutoencoder (bicubic upsampling of block means): measured 43 per pixel.
BLOCK_MEAN_VALUES_PER_PIXEL = 43


def memory_needed(config, height: int, width: int, *, pictures: int = 1, value_bytes: int = 4,
                  weight_bytes: int = 0, device_type: str = "cpu") -> int:
    """Bytes a run of the model ``config`` (an OmegaConf model config) needs at its peak for
    ``pictures`` pictures of ``height`` x ``width`` pixels sampled and decoded together::

        weights + max(unet, decoder)
        unet    = 2 P (H/8)(W/8) * model_channels * 23 values          (guidance doubles the batch)
        decoder = P H W * ch * 6 values + [CPU] P ((H/8)(W/8))^2 values  (KL autoencoder)
                  P H W * 43 values                                      (the demo's block means)

    with P = ``pictures``, each value ``value_bytes`` bytes (4 for float32, 2 for float16) and
    ``weight_bytes`` the model's weights. The squared term is the single-head attention of the
    decoder's middle block over the (H/8)(W/8) latent positions, whose score matrix PyTorch's CPU
    attention keeps whole for that head width (measured); the UNet's attention runs through
    ``scaled_dot_product_attention``, which keeps no such matrix (linear in the positions)."""
    params = config.model.params
    positions = (height // 8) * (width // 8)
    unet_channels = int(params.unet_config.params.get("model_channels", 320))
    unet = 2 * pictures * positions * unet_channels * UNET_VALUES_PER_CHANNEL
    first_stage = params.first_stage_config
    if "ddconfig" in first_stage.get("params", {}):
        decoder = pictures * height * width * int(first_stage.params.ddconfig.ch) * DECODER_VALUES_PER_CHANNEL
        if device_type == "cpu":
            decoder += pictures * positions ** 2
    else:
        decoder = pictures * height * width * BLOCK_MEAN_VALUES_PER_PIXEL
    return weight_bytes + max(unet, decoder) * value_bytes


def check_memory(settings: ModelSettings, device: torch.device, height: int, width: int, pictures: int) -> None:
    """Refuse (:class:`DeviceError`, one line) a picture size that cannot fit in ``device``'s
    memory by :func:`memory_needed`, ``pictures`` sampled together; nothing is loaded (the model
    of ``settings``' config is built on the meta device to count its weights). Unknown free
    memory lets every size pass."""

    available = available_memory(device)
    if available is None:
        return
    path = DEMO_CONFIG if settings.demo else settings.config or DEFAULT_CONFIG
    config = load_config(path)
    dtype = weight_dtype(settings.precision, device)
    weights = parameter_count(str(path)) * dtype.itemsize
    # Autocast computes in half precision whatever the weights are.
    value_bytes = 2 if settings.precision == "autocast" and device.type == "cuda" else dtype.itemsize
    sizing = dict(value_bytes=value_bytes, weight_bytes=weights, device_type=device.type)
    needed = memory_needed(config, height, width, pictures=pictures, **sizing)
    if needed <= available:
        return
    side = largest_square(config, available, pictures=pictures, **sizing)
    fewer = ", or fewer pictures at once (--n_samples, --batch_size)" if pictures > 1 else ""
    advice = f"use a smaller --H/--W (about {side}x{side} fits){fewer}" if side else "it cannot hold the model"
    what = f"{pictures} pictures of {width}x{height}" if pictures > 1 else f"a {width}x{height} picture"
    free = "free GPU memory" if device.type == "cuda" else "memory available"
    raise DeviceError(f"--H {height} --W {width}: {what} needs about {size_text(needed)} of memory (the model "
                      f"{size_text(weights)}), but this machine has {size_text(available)} {free}: {advice}")


@functools.lru_cache(maxsize=8)
def parameter_count(config_path: str) -> int:
    """The number of weights of the model of the config file at ``config_path``, counted on the
    meta device (no memory, nothing read but the config)."""
    from ldm.util import get_obj_from_str, instantiate_from_config


    config = load_config(config_path).model
    # Import the model's modules first: tensors made at import time under the meta device would
    # stay meta for every later, real model.
    parts = [config] + [config.params.get(name) for name in ("unet_config", "first_stage_config", "cond_stage_config")]
    for part in parts:
        if hasattr(part, "get") and isinstance(part.get("target"), str):
            get_obj_from_str(part.target)
    with torch.device("meta"):
        return sum(p.numel() for p in instantiate_from_config(config).parameters())


def available_memory(device: torch.device | None = None) -> int | None:
    """Bytes ``device`` can still give: free GPU memory for CUDA (``torch.cuda.mem_get_info``),
    else the system's available memory (CPU, and Apple MPS, which shares it): MemAvailable of
    /proc/meminfo, else free pages times the page size (``os.sysconf``); None where unknown."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def largest_square(config, available: int, **kwargs) -> int:
    """The largest side, a multiple of 64, whose square picture :func:`memory_needed` (with
    ``kwargs``) says fits in ``available`` bytes; 0 when not even 64x64 does."""
    side = 0
    while memory_needed(config, side + 64, side + 64, **kwargs) <= available:
        side += 64
    return side


def size_text(n: int) -> str:
    """Bytes in the unit that reads best: "21 MiB", "20.9 GiB", "1.4 TiB"."""
    if n >= 2**40:
        return f"{n / 2**40:.1f} TiB"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
