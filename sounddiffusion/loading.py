"""Turning model settings into a ready :class:`~sounddiffusion.engine.Engine`: checkpoint and config
resolution, ``--demo``, device and precision, CPU weight pre-packing, ``torch.compile``.

Every entry point goes through :func:`load_engine`; scripts that build a model themselves (the
benchmark) wrap it with :func:`engine_for_model`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from .engine import Engine
from .errors import DeviceError, ModelError, ParameterError
from .settings import (CHECKPOINT_DIR, CHECKPOINT_NAMES, DEFAULT_CONFIG, DEMO_CONFIG, ModelSettings,
                       shown_path)

log = logging.getLogger(__name__)

DEMO_SEED = 20221024
DEMO_CROSS_ATTENTION_GAIN = 4.0


# ----------------------------------------------------------------------------- resolution

def resolve_checkpoint(ckpt: str | None) -> Path:
    """The checkpoint file to load: ``ckpt`` if given, else the first of ``CHECKPOINT_NAMES``
    that exists in ``models/ldm/stable-diffusion-v1/``. Raises ModelError telling where to get one."""
    folder = shown_path(CHECKPOINT_DIR)
    # One piece of advice each, fact first; the download itself is README 'Getting the weights'.
    try_demo = "or add --demo to try the tools without weights"
    if ckpt:
        path = Path(ckpt)
        if path.is_dir():
            raise ModelError(f"checkpoint {path} is a folder: pass the .ckpt or .safetensors file in it "
                             f"with --ckpt, {try_demo}")
        if not path.is_file():
            raise ModelError(f"checkpoint {path} does not exist: check the --ckpt path (to download one "
                             f"see README 'Getting the weights'), {try_demo}")
        return path
    for name in CHECKPOINT_NAMES:
        if (CHECKPOINT_DIR / name).is_file():
            return CHECKPOINT_DIR / name
    raise ModelError(
        f"no checkpoint in {folder}/: download sd-v1-4.ckpt or v1-5-pruned-emaonly.safetensors (README "
        f"'Getting the weights') into it as model.ckpt or model.safetensors, or pass --ckpt PATH, {try_demo}")


def load_config(path: str | Path):
    """Read a CompVis-format YAML config. Raises ModelError when missing or not valid YAML."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"config {path} is missing: leave out --config for the default "
                         f"({shown_path(DEFAULT_CONFIG)}) or pass the path of an existing config")
    try:
        config = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ModelError(f"config {path} is not valid YAML ({reason}): fix it or use "
                         f"configs/stable-diffusion/v1-inference.yaml") from None
    if not hasattr(config, "get") or "model" not in config or "target" not in config.model:
        raise ModelError(f"config {path} has no 'model: target: ...' section: it is not a "
                         f"Stable Diffusion config; use configs/stable-diffusion/v1-inference.yaml")
    config.source_path = str(path)
    return config


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA, else Apple MPS, else CPU. Raises DeviceError for an unavailable device."""
    from ldm.util import default_device

    if name in (None, "auto"):
        return default_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda, but PyTorch sees no CUDA GPU here: install a CUDA build "
                          "of torch (see README), or use --device cpu")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError("--device mps, but Apple MPS is not available here: use --device cpu")
    return torch.device(name)


def weight_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the weights are cast to for ``--precision`` on ``device``."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision in ("full", "autocast"):
        return torch.float32
    if device.type == "mps":
        raise ParameterError(f"--precision {precision}: Apple MPS runs float32; use --precision full")
    if precision == "fp16":
        if device.type != "cuda":
            raise ParameterError("--precision fp16 needs a CUDA GPU: on CPU use full (or bf16)")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    raise ParameterError(f"--precision {precision}: use one of auto, full, autocast, fp16, bf16")


def checkpoint_fingerprint(path: Path) -> str:
    """A short, fast hash of a checkpoint file (sha256 of its size, first and last MiB), 10 hex digits.

    Hashing all of a 4 GB file would cost seconds at every start; this tells real files apart."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), 2)
            digest.update(f.read())
    return digest.hexdigest()[:10]


# ----------------------------------------------------------------------------- demo model

def init_demo_weights(model: torch.nn.Module, seed: int = DEMO_SEED) -> None:
    """Fill every parameter with deterministic random values, independent of torch's global RNG.

    Fresh modules zero some output layers (so an untrained UNet would ignore its conditioning);
    here every weight gets a scaled normal draw, and the cross-attention's query, key and value
    weights a larger one: random attention is nearly uniform and would average the sound's rows
    away, so sharper attention lets different sounds give visibly different pictures.
    Norm weights are set near 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim >= 2:
                fan_in = param[0].numel()
                gain = DEMO_CROSS_ATTENTION_GAIN if ".attn2.to_" in name and "to_out" not in name else 1.0
                values = gain * torch.randn(param.shape, generator=generator) / fan_in ** 0.5
            elif "norm" in name and name.endswith("weight"):
                values = 1 + 0.1 * torch.randn(param.shape, generator=generator)
            else:
                values = 0.02 * torch.randn(param.shape, generator=generator)
            param.copy_(values.to(param.dtype))


def build_demo_model(config) -> torch.nn.Module:
    from ldm.util import instantiate_from_config

    model = instantiate_from_config(config.model)
    init_demo_weights(model)
    log.info("demo model: untrained random weights, so its pictures are abstract; "
             "see README 'Getting the weights' for real ones")
    return model

def load_engine(settings: ModelSettings) -> Engine:
    """Build the model of ``settings`` once for a run.

    ``demo`` builds ``configs/stable-diffusion/v1-demo.yaml`` (``config``/``ckpt`` must then be
    unset). Otherwise the checkpoint is resolved with :func:`resolve_checkpoint` and loaded through
    ``ldm.util.load_model_from_config`` (no download, strict key checks). ``compile``: see
    :func:`engine_for_model`."""
    from ldm.util import load_model_from_config

    target = pick_device(settings.device)
    weight_dtype(settings.precision, target)  # a bad --precision fails before the model loads
    if settings.demo:
        model = build_demo_model(load_config(DEMO_CONFIG))
        name, fingerprint = "demo", f"demo-{DEMO_SEED}"
    else:
        path = resolve_checkpoint(settings.ckpt)
        model_config = load_config(settings.config or DEFAULT_CONFIG)
        log.info("loading %s", path)
        model = load_model_from_config(model_config, str(path), device="cpu")
        name, fingerprint = path.name, checkpoint_fingerprint(path)
    return engine_for_model(model, device=str(target), precision=settings.precision, checkpoint=name,
                            checkpoint_hash=fingerprint, compile=settings.compile)


def available_memory() -> int | None:
    """Bytes of memory the system can still give (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _prepack_for_cpu(modules: list[torch.nn.Module]) -> None:
    """oneDNN weight layouts made once instead of at every call (``ldm.modules.prepack``, about
    2x faster CPU steps), when the packed copies (as much memory as the weights again, 3.5 GB
    for SD v1 in float32) fit in the free memory with a quarter to spare."""
    from ldm.modules.prepack import prepack_bytes, prepack_weights

    needed = sum(prepack_bytes(m) for m in modules)
    spare = available_memory()
    if spare is not None and needed * 1.25 > spare:
        log.warning("not pre-packing the weights for the CPU (needs %.1f GiB, %.1f GiB free): "
                    "steps will be about 2x slower", needed / 2**30, spare / 2**30)
        return
    for module in modules:
        prepack_weights(module)


def engine_for_model(model: torch.nn.Module, *, device: str = "auto", precision: str = "auto",
                     checkpoint: str = "in-memory", checkpoint_hash: str = "", compile: bool = False,
                     channels_last: bool | None = None) -> Engine:
    """An :class:`Engine` around an already built ``LatentDiffusion`` (e.g. the benchmark's).

    The weights are cast for ``precision`` and moved to ``device`` (the model is changed in place).
    ``compile``: run the UNet through ``torch.compile`` (the first frames are slow while it compiles).
    ``channels_last``: keep the UNet's and VAE's convolution weights, and so their activations, in
    NHWC layout, which tensor-core convolutions prefer; None: on CUDA only."""
    target = pick_device(device)
    dtype = weight_dtype(precision, target)
    model = model.eval().requires_grad_(False).to(dtype=dtype)
    try:
        model = model.to(target)
    except RuntimeError as exc:
        if "out of memory" in str(exc):
            raise DeviceError(f"the model does not fit in {target} memory: use --precision fp16, "
                              f"or --device cpu") from None
        raise
    # The noise schedule stays float32 whatever the weights are (as upstream keeps its buffers).
    for buffer_name, buffer in model.named_buffers(recurse=False):
        if buffer.is_floating_point():
            setattr(model, buffer_name, buffer.float())
    unet = model.model.diffusion_model
    if channels_last if channels_last is not None else target.type == "cuda":
        unet.to(memory_format=torch.channels_last)
        model.first_stage_model.to(memory_format=torch.channels_last)
    if target.type == "cpu" and dtype == torch.float32:
        _prepack_for_cpu([model.first_stage_model] if compile else [unet, model.first_stage_model])
    if compile:
        options = {"freezing": True} if target.type == "cpu" else None
        unet.forward = torch.compile(unet.forward, dynamic=False, options=options)
    return Engine(model=model, device=target, precision=precision, checkpoint=checkpoint,
                  checkpoint_hash=checkpoint_hash)
