"""Turning model settings into a ready :class:`~sounddiffusion.model.engine.Engine`: checkpoint and config
resolution (the config picked from the checkpoint's family when ``--config`` is not given),
``--demo``, ``--vae taesd:PATH``, device and precision, CPU weight pre-packing, ``torch.compile``.

Every entry point goes through :func:`load_engine`; scripts that build a model themselves (the
benchmark) wrap it with :func:`engine_for_model`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from sounddiffusion.errors import DeviceError, ModelError
from sounddiffusion.model.configs import load_config, model_config_for
from sounddiffusion.model.devices import check_cuda_graphs, pick_device, weight_dtype
from sounddiffusion.model.engine import Engine
from sounddiffusion.model.lora_specs import LoraSpec, lora_record, merge_loras, parse_lora_specs
from sounddiffusion.model.memory import available_memory, check_memory
from sounddiffusion.model.tiny_vae import TinyVae, load_tiny_vae
from sounddiffusion.settings import (CHECKPOINT_DIR, CHECKPOINT_NAMES, DEFAULT_CONFIG, DEMO_CONFIG,
                                     ModelSettings, V2_CHECKPOINT_DIR, shown_path)

log = logging.getLogger(__name__)

DEMO_SEED = 20221024  # of the random weights (demo UNet and text encoder, benchmark models)
DEMO_FINGERPRINT = "demo-3"  # in outputs' metadata; --resume refuses a render of another demo
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


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


def load_engine(settings: ModelSettings, *, loras: Sequence[LoraSpec] | None = None,
                vae: TinyVae | None = None) -> Engine:
    """Build the model of ``settings`` once for a run.

    ``demo`` builds ``configs/stable-diffusion/v1-demo.yaml`` (``config``/``ckpt`` must then be
    unset). Otherwise the checkpoint is resolved with :func:`resolve_checkpoint`, its config picked
    or checked by :func:`model_config_for`, and loaded through ``ldm.util.load_model_from_config``
    (no download, strict key checks). ``settings.vae``: TAESD, read first so that a wrong file fails
    before the model loads (``vae``: that TAESD already loaded by :func:`load_tiny_vae`, as
    audio2video does to check it before anything else). ``compile``, ``cuda_graphs``: see
    :func:`engine_for_model`.
    ``loras``: the ``--lora`` specs already parsed (audio2video's, whose weights may be schedules the
    frame loop sets); None: ``settings.lora`` with number weights, checked before the model loads."""
    from ldm.util import load_model_from_config

    target = check_model_settings(settings)
    name, fingerprint = checkpoint_identity(settings)
    loras = parse_lora_specs(settings.lora) if loras is None else loras
    if settings.vae and vae is None:
        vae = load_tiny_vae(settings.vae)
    if settings.demo:
        model = build_demo_model()
    else:
        path = resolve_checkpoint(settings.ckpt)
        log.info("loading %s", path)
        model_config = model_config_for(path, settings.config)
        model = load_model_from_config(model_config, str(path), device="cpu")
    return engine_for_model(model, device=str(target), precision=settings.precision, checkpoint=name,
                            checkpoint_hash=fingerprint, compile=settings.compile,
                            cuda_graphs=settings.cuda_graphs, loras=loras, vae=vae)


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


def model_record(settings: ModelSettings, loras: Sequence[LoraSpec] = (), engine: Engine | None = None,
                 vae: TinyVae | None = None) -> dict:
    """What outputs record of the model, found without loading it (``engine``: when it is loaded
    already, from it): the checkpoint's name and fingerprint (:func:`checkpoint_identity`), the
    LoRA files by content with their weights' texts, and the hash of ``--vae``'s TAESD weights
    (``vae``: that TAESD already loaded; else it is read here, ModelError for a wrong one)."""
    if engine is not None:
        return {"checkpoint": engine.checkpoint, "checkpoint_hash": engine.checkpoint_hash,
                "lora": engine.loras, "vae_hash": engine.vae_hash}
    name, fingerprint = checkpoint_identity(settings)
    if settings.vae and vae is None:
        vae = load_tiny_vae(settings.vae)
    return {"checkpoint": name, "checkpoint_hash": fingerprint,
            "lora": lora_record(loras),
            "vae_hash": vae.hash if vae is not None else None}


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
                     cuda_graphs: bool = False, channels_last: bool | None = None,
                     loras: Sequence[LoraSpec] = (), vae: TinyVae | None = None) -> Engine:
    """An :class:`Engine` around an already built ``LatentDiffusion`` (e.g. the benchmark's).

    The weights are cast for ``precision`` and moved to ``device`` (the model is changed in place).
    ``compile``: run the UNet through ``torch.compile`` (the first frames are slow while it compiles).
    ``cuda_graphs``: replay the UNet's calls from CUDA graphs, one captured per picture size
    (:mod:`sounddiffusion.model.cuda_graphs`; CUDA only, ParameterError elsewhere).
    ``channels_last``: keep the UNet's and VAE's convolution weights, and so their activations, in
    NHWC layout, which tensor-core convolutions prefer; None: on CUDA only. ``vae``: TAESD in place
    of the model's autoencoder (moved and cast with the model).
    ``loras``: LoRA files merged once the weights are on their device and dtype, the only place
    LoRAs are merged (:func:`~sounddiffusion.model.lora_specs.merge_loras`; with a scheduled weight
    the engine's ``set_lora_weights`` changes them per frame)."""
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
    if vae is not None:
        vae.autoencoder.to(target, dtype)
    patch = merge_loras(model, loras)
    scheduled = any(spec.constant is None for spec in loras)
    if target.type == "cpu" and dtype == torch.float32:
        autoencoder = vae.autoencoder if vae is not None else model.first_stage_model  # the one in use
        _prepack_for_cpu([autoencoder] if compile else [unet, autoencoder])
    if compile:
        # Freezing folds the weights into the compiled code: per-frame LoRA weights would not reach it.
        options = {"freezing": True} if target.type == "cpu" and not scheduled else None
        unet.forward = torch.compile(unet.forward, dynamic=False, options=options)
    if cuda_graphs:
        from sounddiffusion.model.cuda_graphs import use_static_calls

        use_static_calls(unet)
    engine = Engine(model=model, device=target, precision=precision, checkpoint=checkpoint,
                    checkpoint_hash=checkpoint_hash, lora_patch=patch, vae=vae,
                    loras=lora_record(loras))
    if patch is not None and any(name.startswith("cond_stage_model.") for name, _ in patch.touched):
        engine.text_encoder_changed()
    return engine
