"""Turning model settings into a ready :class:`~sounddiffusion.model.engine.Engine`: checkpoint and config
resolution (the config picked from the checkpoint's family when ``--config`` is not given),
``--demo``, device and precision, CPU weight pre-packing, ``torch.compile``.

Every entry point goes through :func:`load_engine`; scripts that build a model themselves (the
benchmark) wrap it with :func:`engine_for_model`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from ldm.checkpoint_keys import SD_V1, SD_V2

from sounddiffusion.errors import DeviceError, ModelError, ParameterError
from sounddiffusion.model.engine import Engine
from sounddiffusion.model.memory import available_memory, check_memory
from sounddiffusion.settings import (CHECKPOINT_DIR, CHECKPOINT_NAMES, DEFAULT_CONFIG, DEMO_CONFIG,
                                     ModelSettings, V2_CHECKPOINT_DIR, V2_CONFIG, V2_V_CONFIG, shown_path)

log = logging.getLogger(__name__)

DEMO_SEED = 20221024  # of the random weights (demo UNet and text encoder, benchmark models)
DEMO_FINGERPRINT = "demo-3"  # in outputs' metadata; --resume refuses a render of another demo
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
FAMILY_NAMES = {SD_V1: "SD v1", SD_V2: "SD 2.x"}


# ----------------------------------------------------------------------------- resolution

def resolve_checkpoint(ckpt: str | None) -> Path:
    """The checkpoint file to load: ``ckpt`` if given, else the first of ``CHECKPOINT_NAMES``
    that exists in ``models/ldm/stable-diffusion-v1/``, else the one ``.safetensors``/``.ckpt`` file
    in ``models/ldm/stable-diffusion-v2/`` (SD 2.x files keep their own names there, so that a
    "768" in the name still selects the v-prediction config). Raises ModelError telling where to
    get one, or to pick one with --ckpt when the v2 folder holds several."""
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
    v2_file = _v2_folder_checkpoint()
    if v2_file is not None:
        return v2_file
    raise ModelError(
        f"no checkpoint in {folder}/: download sd-v1-4.ckpt or v1-5-pruned-emaonly.safetensors (README "
        f"'Getting the weights') into it as model.ckpt or model.safetensors, or pass --ckpt PATH, {try_demo}")


def _v2_folder_checkpoint() -> Path | None:
    """The one checkpoint file in ``V2_CHECKPOINT_DIR`` (None when there is none)."""
    if not V2_CHECKPOINT_DIR.is_dir():
        return None
    files = sorted(p for p in V2_CHECKPOINT_DIR.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    if len(files) > 1:
        names = ", ".join(p.name for p in files[:3]) + (", ..." if len(files) > 3 else "")
        raise ModelError(f"{shown_path(V2_CHECKPOINT_DIR)}/ holds {len(files)} checkpoints ({names}): "
                         f"pick one with --ckpt")
    return files[0] if files else None


def config_for_family(family: str | None, checkpoint_name: str) -> Path:
    """The config for a checkpoint of ``family`` ("sd-v1", "sd-v2" or None) named ``checkpoint_name``.

    SD 2.x: ``v2-inference-v.yaml`` (v-prediction) when the name contains "768" (the 768-v and 512
    base files have the same keys, only the name tells them apart), else ``v2-inference.yaml``;
    SD v1 and unknown files: ``v1-inference.yaml``."""
    if family == SD_V2:
        return V2_V_CONFIG if "768" in checkpoint_name else V2_CONFIG
    return DEFAULT_CONFIG


def config_family(config) -> str | None:
    """"sd-v1", "sd-v2" or None for a loaded config, from its text encoder (OpenCLIP: SD 2.x)."""
    target = str(config.model.get("params", {}).get("cond_stage_config", {}).get("target", ""))
    if target.endswith(".FrozenOpenCLIPEmbedder"):
        return SD_V2
    if target.endswith(".FrozenCLIPEmbedder"):
        return SD_V1
    return None


def _picked_config_note(config: Path, family: str | None, checkpoint: Path) -> str:
    """The one line that says which config was picked for ``checkpoint``, and how to choose another."""
    shown = shown_path(config)
    if family is None:
        return (f"config {shown}: the model family of {shown_path(checkpoint)} cannot be told from its keys; "
                f"pass --config for another")
    why = f"{shown_path(checkpoint)} is {FAMILY_NAMES[family]}"
    if config == V2_V_CONFIG:
        return (f"config {shown} ({why}, v-prediction as its name says 768); "
                f"pass --config {shown_path(V2_CONFIG)} if it is not a 768-v model")
    if config == V2_CONFIG:
        return f"config {shown} ({why}); for a 768-v model pass --config {shown_path(V2_V_CONFIG)}"
    return f"config {shown} ({why}); pass --config for another"


def model_config_for(checkpoint: Path, config: str | Path | None):
    """The loaded config to build ``checkpoint``'s model from.

    ``config`` None: :func:`config_for_family` of the file's family, named in a log line. Given: it
    must build the file's family; otherwise ModelError says which family the file is and which config
    to pass. Raises CheckpointError for a file whose keys cannot be read."""
    from ldm.checkpoint import checkpoint_family

    family = checkpoint_family(checkpoint)
    if config is None:
        chosen = config_for_family(family, checkpoint.name)
        log.info("%s", _picked_config_note(chosen, family, checkpoint))
        return load_config(chosen)
    model_config = load_config(config)
    builds = config_family(model_config)
    if family and builds and family != builds:
        fitting = shown_path(config_for_family(family, checkpoint.name))
        raise ModelError(f"{shown_path(checkpoint)} is an {FAMILY_NAMES[family]} checkpoint but {config} "
                         f"builds {FAMILY_NAMES[builds]}: pass --config {fitting} (or leave out --config)")
    return model_config


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


def check_cuda_graphs(cuda_graphs: bool, device: torch.device) -> None:
    """Raises ParameterError when ``--cuda_graphs`` is asked for on a device other than CUDA."""
    if cuda_graphs and device.type != "cuda":
        raise ParameterError(f"--cuda_graphs needs a CUDA GPU, but the model runs on {device.type}: "
                             f"leave --cuda_graphs out")


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

def init_random_weights(model: torch.nn.Module, seed: int = DEMO_SEED) -> None:
    """Fill every parameter with deterministic random values, independent of torch's global RNG.

    For models without trained weights: the demo's small UNet and text encoder, the benchmark's
    full-size model. Fresh modules zero some output layers (an untrained UNet would then ignore
    its input); here every weight gets a normal draw scaled by 1 / sqrt(fan-in), norm weights
    are set near 1 and biases near 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim >= 2:
                values = torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5
            elif "norm" in name and name.endswith("weight"):
                values = 1 + 0.1 * torch.randn(param.shape, generator=generator)
            else:
                values = 0.02 * torch.randn(param.shape, generator=generator)
            param.copy_(values.to(param.dtype))


def random_weights_model(config) -> torch.nn.Module:
    """The model of ``config`` (an OmegaConf config) with :func:`init_random_weights`, on the CPU."""
    from ldm.util import instantiate_from_config

    model = instantiate_from_config(config.model)
    init_random_weights(model)
    return model


def build_demo_model() -> torch.nn.Module:
    """The ``--demo`` model (``configs/stable-diffusion/v1-demo.yaml``): hand-designed denoiser
    and autoencoder (:mod:`ldm.modules.diffusionmodules.demo_denoiser`), random text encoder."""
    model = random_weights_model(load_config(DEMO_CONFIG))
    with torch.no_grad():
        model.model.diffusion_model.set_null_context(model.get_learned_conditioning([""]))
    log.info("demo model: a hand-designed toy that shows how sound steers the picture (abstract "
             "pictures, prompts without meaning); see README 'Getting the weights' for real ones")
    return model


def load_engine(settings: ModelSettings) -> Engine:
    """Build the model of ``settings`` once for a run.

    ``demo`` builds ``configs/stable-diffusion/v1-demo.yaml`` (``config``/``ckpt`` must then be
    unset). Otherwise the checkpoint is resolved with :func:`resolve_checkpoint`, its config picked
    or checked by :func:`model_config_for`, and loaded through ``ldm.util.load_model_from_config``
    (no download, strict key checks). ``compile``, ``cuda_graphs``: see :func:`engine_for_model`."""
    from ldm.util import load_model_from_config

    target = check_model_settings(settings)
    name, fingerprint = checkpoint_identity(settings)
    if settings.demo:
        model = build_demo_model()
    else:
        path = resolve_checkpoint(settings.ckpt)
        log.info("loading %s", path)
        model_config = model_config_for(path, settings.config)
        model = load_model_from_config(model_config, str(path), device="cpu")
    return engine_for_model(model, device=str(target), precision=settings.precision, checkpoint=name,
                            checkpoint_hash=fingerprint, compile=settings.compile,
                            cuda_graphs=settings.cuda_graphs)


def check_model_settings(settings: ModelSettings, *, height: int | None = None, width: int | None = None,
                         pictures: int = 1) -> torch.device:
    """What :func:`load_engine` would refuse about ``settings``, found before anything loads: the
    device, the precision on it, ``--cuda_graphs``, the checkpoint file and a ``--config`` that
    cannot be read; with ``height`` and ``width``, also a picture size whose run cannot fit in
    the device's memory (:func:`~sounddiffusion.model.memory.check_memory`, ``pictures`` sampled
    together). Returns the device."""
    target = pick_device(settings.device)
    weight_dtype(settings.precision, target)
    check_cuda_graphs(settings.cuda_graphs, target)
    if not settings.demo:
        resolve_checkpoint(settings.ckpt)
        if settings.config:
            load_config(settings.config)
    if height is not None and width is not None:
        check_memory(settings, target, height, width, pictures)
    return target


def checkpoint_identity(settings: ModelSettings) -> tuple[str, str]:
    """(name, fingerprint) of the model ``settings`` loads, as the engine records them in outputs'
    metadata, found without loading it: ("demo", :data:`DEMO_FINGERPRINT`), or the checkpoint's
    file name and :func:`checkpoint_fingerprint`."""
    if settings.demo:
        return "demo", DEMO_FINGERPRINT
    path = resolve_checkpoint(settings.ckpt)
    return path.name, checkpoint_fingerprint(path)


def unet_skeleton(settings: ModelSettings) -> torch.nn.Module:
    """The UNet of the config ``settings`` would load, built on the meta device (no memory, no
    weights): for checking block names (``--bend ...@output_blocks.N``) before the model loads."""
    from ldm.util import instantiate_from_config

    config = load_config(DEMO_CONFIG if settings.demo else settings.config or DEFAULT_CONFIG)
    with torch.device("meta"):
        return instantiate_from_config(config.model.params.unet_config)


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
                     cuda_graphs: bool = False, channels_last: bool | None = None) -> Engine:
    """An :class:`Engine` around an already built ``LatentDiffusion`` (e.g. the benchmark's).

    The weights are cast for ``precision`` and moved to ``device`` (the model is changed in place).
    ``compile``: run the UNet through ``torch.compile`` (the first frames are slow while it compiles).
    ``cuda_graphs``: replay the UNet's calls from CUDA graphs, one captured per picture size
    (:mod:`sounddiffusion.model.cuda_graphs`; CUDA only, ParameterError elsewhere).
    ``channels_last``: keep the UNet's and VAE's convolution weights, and so their activations, in
    NHWC layout, which tensor-core convolutions prefer; None: on CUDA only."""
    target = pick_device(device)
    dtype = weight_dtype(precision, target)
    check_cuda_graphs(cuda_graphs, target)
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
    if cuda_graphs:
        from sounddiffusion.model.cuda_graphs import use_static_calls

        use_static_calls(unet)
    return Engine(model=model, device=target, precision=precision, checkpoint=checkpoint,
                  checkpoint_hash=checkpoint_hash)
