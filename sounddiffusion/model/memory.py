"""How much memory a picture size needs, against what this machine has: a size that cannot fit is
refused in one line before anything loads, instead of the kernel killing the run without a word.

:func:`memory_needed` estimates a run's peak from the model config alone (see its formula);
:func:`available_memory` says what the device can still give; :func:`check_memory` refuses. The
constants rest on ``python scripts/measure_memory.py``: the peak resident memory of single calls
on a CPU above what the process held before (float32, one thread, each in a fresh process, random
weights). One run (torch 2.13 CPU, a shared 2-core machine) gave, in MiB, with the values per unit
that the constants stand for in brackets:

    SD v1 KL decoder     256x256 259 (8.0)   384x384 553 (7.4)   512x512 1010 (7.4)   per pixel, channel
    SD v1 UNet, batch 2  256x256 214 (85.7)  512x512 351 (35.1)  768x768 605 (26.9)   per position, picture, channel
    demo block means     256x256 11 (42.9)   384x384 25 (44.6)   512x512 42 (42.1)    per pixel
    demo UNet, batch 2   256x256 9 (34.7)    512x512 38 (37.7)   768x768 72 (31.9)    per position, picture, channel
    TAESD decoder        256x256 64 (4.0)    512x512 273 (4.3)   1024x1024 1025 (4.0) per pixel, channel

Peaks move by up to a fifth between runs (an earlier one: the SD v1 UNet 417 MiB at 512x512, 754
at 768x768), and the UNets' include a part that hardly grows with the size. The constants are at or
below the values per unit measured at the largest sizes (but the block means' 43, within their 42.1
to 44.6): the estimate aims at what a run needs at least, so that only sizes that cannot fit are
refused. It is not measured on CUDA or MPS yet.
"""
from __future__ import annotations

import functools
import os

import torch

from ldm.models.taesd import WIDTH, TinyAutoencoder
from sounddiffusion.errors import DeviceError
from sounddiffusion.model.configs import load_config
from sounddiffusion.model.devices import weight_dtype
from sounddiffusion.settings import DEFAULT_CONFIG, DEMO_CONFIG, ModelSettings

# Values held at the peak of one UNet call, per latent position, per picture of the guidance
# batch, per channel of the config's model_channels: skip connections of every level and a
# transformer block's feed-forward at full latent resolution. Measured at 768x768: SD v1 (320
# channels) 26.9 and 33.5 in two runs, the 32-channel demo 31.9 (see the module doc).
UNET_VALUES_PER_CHANNEL = 23
# Values held at the peak of decoding, per pixel, per picture, per channel of the KL
# autoencoder's ``ch`` (its last up-block at full resolution). Measured: SD v1 (ch 128) 7.4 at
# 384x384 and 512x512, 8.0 at 256x256.
DECODER_VALUES_PER_CHANNEL = 6
# The demo's BlockMeanAutoencoder (bicubic upsampling of block means): measured 42.1 to 44.6 per pixel.
BLOCK_MEAN_VALUES_PER_PIXEL = 43
# TAESD's decoder (--vae): values per pixel, per picture, per channel of its 64 (ldm.models.taesd.WIDTH):
# a few full-resolution 64-channel tensors alive at once in its last blocks. Measured 4.0 to 4.3.
TAESD_WIDTH = WIDTH
TAESD_VALUES_PER_CHANNEL = 4


def unet_values(config, height: int, width: int, pictures: int = 1) -> int:
    """Values one UNet call holds at its peak: 2 P (H/8)(W/8) * model_channels * UNET_VALUES_PER_CHANNEL
    (guidance doubles the batch); ``config`` an OmegaConf model config."""
    channels = int(config.model.params.unet_config.params.get("model_channels", 320))
    return 2 * pictures * (height // 8) * (width // 8) * channels * UNET_VALUES_PER_CHANNEL


def decoder_values(config, height: int, width: int, pictures: int = 1, *, device_type: str = "cpu",
                   taesd: bool = False) -> int:
    """Values decoding ``pictures`` latents holds at its peak (see :func:`memory_needed`): TAESD's
    decoder with ``taesd`` (``--vae``), else ``config``'s autoencoder."""
    if taesd:
        return pictures * height * width * TAESD_WIDTH * TAESD_VALUES_PER_CHANNEL
    first_stage = config.model.params.first_stage_config
    if "ddconfig" not in first_stage.get("params", {}):
        return pictures * height * width * BLOCK_MEAN_VALUES_PER_PIXEL
    values = pictures * height * width * int(first_stage.params.ddconfig.ch) * DECODER_VALUES_PER_CHANNEL
    if device_type == "cpu":
        values += pictures * ((height // 8) * (width // 8)) ** 2
    return values


def memory_needed(config, height: int, width: int, *, pictures: int = 1, value_bytes: int = 4,
                  weight_bytes: int = 0, device_type: str = "cpu", taesd: bool = False) -> int:
    """Bytes a run of the model ``config`` (an OmegaConf model config) needs at its peak for
    ``pictures`` pictures of ``height`` x ``width`` pixels sampled and decoded together::

        weights + max(unet, decoder)
        unet    = 2 P (H/8)(W/8) * model_channels * 23 values          (guidance doubles the batch)
        decoder = P H W * ch * 6 values + [CPU] P ((H/8)(W/8))^2 values  (KL autoencoder)
                  P H W * 43 values                                      (the demo's block means)
                  P H W * 64 * 3 values                                  (TAESD, ``taesd``: --vae)

    with P = ``pictures``, each value ``value_bytes`` bytes (4 for float32, 2 for float16) and
    ``weight_bytes`` the model's weights. The squared term is the single-head attention of the
    decoder's middle block over the (H/8)(W/8) latent positions, whose score matrix PyTorch's CPU
    attention keeps whole for that head width (measured); the UNet's attention runs through
    ``scaled_dot_product_attention``, which keeps no such matrix (linear in the positions).
    TAESD's decoder has no attention: 64 channels at full resolution, a few tensors of them alive."""
    unet = unet_values(config, height, width, pictures)
    decoder = decoder_values(config, height, width, pictures, device_type=device_type, taesd=taesd)
    return weight_bytes + max(unet, decoder) * value_bytes


def check_memory(settings: ModelSettings, device: torch.device, height: int, width: int, pictures: int) -> None:
    """Refuse (:class:`DeviceError`, one line) a picture size that cannot fit in ``device``'s
    memory by :func:`memory_needed`, ``pictures`` sampled together; nothing is loaded (the model
    of ``settings``' config is built on the meta device to count its weights). With ``--vae``
    TAESD decodes (and its weights count too). Unknown free memory lets every size pass."""
    available = available_memory(device)
    if available is None:
        return
    path = DEMO_CONFIG if settings.demo else settings.config or DEFAULT_CONFIG
    config = load_config(path)
    dtype = weight_dtype(settings.precision, device)
    taesd = bool(settings.vae)
    weights = (parameter_count(str(path)) + (taesd_parameter_count() if taesd else 0)) * dtype.itemsize
    # Autocast computes in half precision whatever the weights are.
    value_bytes = 2 if settings.precision == "autocast" and device.type == "cuda" else dtype.itemsize
    sizing = dict(value_bytes=value_bytes, weight_bytes=weights, device_type=device.type, taesd=taesd)
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


@functools.lru_cache(maxsize=1)
def taesd_parameter_count() -> int:
    """The number of weights of TAESD's encoder and decoder (counted on the meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in TinyAutoencoder().parameters())


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
