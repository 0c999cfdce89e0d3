"""The model as the command lines use it: loading, text conditionings, txt2img, img2img, decoding.

Every entry point goes through :func:`load_engine` and the :class:`Engine` methods, so checkpoint
resolution, ``--demo``, device and precision handling, seeds and samplers live in one place.

Latents are ``(B, 4, H/8, W/8)`` tensors on the engine's device; conditionings are ``(B, 77, D)``
with ``D`` the model's context width (768 for SD v1); images leave as ``(B, H, W, 3)`` uint8 arrays.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DeviceError, ModelError, ParameterError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-demo.yaml"
CHECKPOINT_DIR = REPO / "models" / "ldm" / "stable-diffusion-v1"
CHECKPOINT_NAMES = ("model.safetensors", "model.ckpt")
DEMO_SEED = 20221024
DEMO_CROSS_ATTENTION_GAIN = 4.0
LATENT_SCALE = 8  # the autoencoder's downsampling factor


# ----------------------------------------------------------------------------- resolution

def resolve_checkpoint(ckpt: str | None) -> Path:
    """The checkpoint file to load: ``ckpt`` if given, else the first of ``CHECKPOINT_NAMES``
    that exists in ``models/ldm/stable-diffusion-v1/``. Raises ModelError telling where to get one."""
    folder = _shown_path(CHECKPOINT_DIR)
    download = ("download Stable Diffusion v1.4 (sd-v1-4.ckpt) or v1.5 "
                "(v1-5-pruned-emaonly.safetensors), see README 'Getting the weights'")
    try_demo = "To try the tools first without weights, add --demo"
    if ckpt:
        path = Path(ckpt)
        if path.is_dir():
            raise ModelError(f"checkpoint {path} is a folder: pass the .ckpt or .safetensors file in it "
                             f"with --ckpt. {try_demo}")
        if not path.is_file():
            raise ModelError(f"checkpoint {path} does not exist: check the path, or {download}, and pass "
                             f"it with --ckpt or save it in {folder}/ as model.ckpt or model.safetensors. "
                             f"{try_demo}")
        return path
    for name in CHECKPOINT_NAMES:
        if (CHECKPOINT_DIR / name).is_file():
            return CHECKPOINT_DIR / name
    raise ModelError(
        f"no checkpoint in {folder}/: {download}, and save it there as model.ckpt or "
        f"model.safetensors (or pass --ckpt PATH). {try_demo}")


def _shown_path(path: Path) -> Path:
    """``path`` relative to the repository when inside it (as users type it there), else as is."""
    try:
        return path.relative_to(REPO)
    except ValueError:
        return path


def load_config(path: str | Path):
    """Read a CompVis-format YAML config. Raises ModelError when missing or not valid YAML."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"config {path} is missing: use {Path('configs/stable-diffusion/v1-inference.yaml')} "
                         f"(the default) or pass --config PATH")
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


# ----------------------------------------------------------------------------- engine

def step_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: noise drawn from it is the same on every device."""
    return torch.Generator().manual_seed(int(seed) % 2**63)


@dataclass
class Engine:
    """A loaded model on a device, with the operations the entry points need.

    ``model`` is an ``ldm.models.diffusion.ddpm.LatentDiffusion`` in eval mode.
    ``checkpoint``/``checkpoint_hash`` identify the weights in saved parameters.
    """

    model: torch.nn.Module
    device: torch.device
    precision: str
    checkpoint: str
    checkpoint_hash: str
    _text_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _samplers: dict[str, object] = field(default_factory=dict, repr=False)

    @property
    def context_dim(self) -> int:
        """D, the width of the conditioning matrices (768 for SD v1)."""
        return self.text_conditioning("").shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def autocast(self):
        """Mixed precision for ``--precision autocast`` (as upstream), else a no-op context."""
        if self.precision != "autocast":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- conditioning

    @torch.inference_mode()
    def text_conditioning(self, prompt: str) -> torch.Tensor:
        """The (77, D) CLIP conditioning of ``prompt``, float32 on the device; computed once per prompt."""
        cached = self._text_cache.get(prompt)
        if cached is None:
            with self.autocast():
                cached = self.model.get_learned_conditioning([prompt])[0].float()
            self._text_cache[prompt] = cached
        return cached

    def _as_model_input(self, cond: torch.Tensor) -> torch.Tensor:
        cond = cond if cond.ndim == 3 else cond[None]
        return cond.to(self.device, self.dtype)

    # -- samplers

    def sampler(self, kind: str):
        """The sampler 'plms' or 'ddim' for this model (one instance each, reused across calls)."""
        if kind not in self._samplers:
            from ldm.models.diffusion.ddim import DDIMSampler
            from ldm.models.diffusion.plms import PLMSSampler

            classes = {"ddim": DDIMSampler, "plms": PLMSSampler}
            if kind not in classes:
                raise ParameterError(f"sampler {kind!r}: use plms or ddim")
            self._samplers[kind] = classes[kind](self.model)
        return self._samplers[kind]

    def noise(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """Standard normal noise drawn on the CPU from ``seed`` (same numbers on every device)."""
        return torch.randn(shape, generator=step_generator(seed)).to(self.device, self.dtype)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (batch, 4, height // LATENT_SCALE, width // LATENT_SCALE)

    @torch.inference_mode()
    def txt2img(self, cond: torch.Tensor, *, x_T: torch.Tensor, sampler: str = "plms", steps: int = 50,
                scale: float = 7.5, eta: float = 0.0, uncond: torch.Tensor | None = None,
                seed: int = 0, verbose: bool = False) -> torch.Tensor:
        """Sample latents ``(B, 4, h, w)`` from start noise ``x_T`` under conditioning ``cond`` (B, 77, D).

        ``uncond`` defaults to the empty prompt's conditioning (classifier-free guidance);
        ``seed`` seeds the noise DDIM adds at each step when ``eta`` > 0."""
        cond = self._as_model_input(cond)
        uncond = self._uncond(cond, uncond)
        with self.autocast():
            samples, _ = self.sampler(sampler).sample(
                S=steps, batch_size=cond.shape[0], shape=list(x_T.shape[1:]), conditioning=cond,
                verbose=verbose, unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                eta=eta, x_T=x_T.to(self.device, self.dtype), generator=step_generator(seed))
        return samples

    @torch.inference_mode()
    def img2img(self, init_latent: torch.Tensor, cond: torch.Tensor, *, noise: torch.Tensor,
                strength: float, sampler: str = "plms", steps: int = 50, scale: float = 7.5,
                eta: float = 0.0, uncond: torch.Tensor | None = None, latent_offset: float = 0.0,
                seed: int = 0, verbose: bool = False) -> torch.Tensor:
        """Noise ``init_latent`` (B, 4, h, w) to ``strength`` and denoise it under ``cond``.

        As upstream, ``int(strength * steps)`` of the ``steps`` run: strength 0 returns the init
        latent, strength 1 is txt2img from ``noise``. ``latent_offset`` is added to the noised
        latent (upstream's "network bending" by loudness). ``seed`` seeds DDIM's per-step noise
        when ``eta`` > 0."""
        t_enc = int(strength * steps)
        if t_enc >= steps:
            return self.txt2img(cond, x_T=noise + latent_offset, sampler=sampler, steps=steps,
                                scale=scale, eta=eta, uncond=uncond, seed=seed, verbose=verbose)
        init_latent = init_latent.to(self.device, self.dtype)
        if t_enc == 0:
            return init_latent
        cond = self._as_model_input(cond)
        uncond = self._uncond(cond, uncond)
        chosen = self.sampler(sampler)
        with self.autocast():
            chosen.make_schedule(ddim_num_steps=steps, ddim_eta=eta, verbose=False)
            t = torch.full((init_latent.shape[0],), t_enc, device=self.device, dtype=torch.long)
            z_enc = chosen.stochastic_encode(init_latent, t, noise=noise.to(self.device, self.dtype))
            if latent_offset:
                z_enc = z_enc + latent_offset
            return chosen.decode(z_enc, cond, t_enc, unconditional_guidance_scale=scale,
                                 unconditional_conditioning=uncond, generator=step_generator(seed),
                                 verbose=verbose)

    def _uncond(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        if uncond is None:
            uncond = self.text_conditioning("")
        uncond = self._as_model_input(uncond)
        return uncond.expand(cond.shape[0], -1, -1)

    # -- pixels

    @torch.inference_mode()
    def encode_image(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> latents (B, 4, H/8, W/8), the posterior mean scaled.

        The mean (not a sample) keeps img2img deterministic for a given seed."""
        pixels = torch.tensor(images, device=self.device)  # a copy: inputs may be read-only
        pixels = pixels.permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0
        with self.autocast():
            posterior = self.model.encode_first_stage(pixels)
            return self.model.get_first_stage_encoding(posterior.mode())

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (B, 4, h, w) -> uint8 images (B, 8h, 8w, 3)."""
        with self.autocast():
            pixels = self.model.decode_first_stage(latents.to(self.device, self.dtype))
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()


def load_engine(*, config: str | Path | None = None, ckpt: str | None = None, demo: bool = False,
                device: str = "auto", precision: str = "auto", compile: bool = False) -> Engine:
    """Build the model once for a command line run.

    ``demo`` uses ``configs/stable-diffusion/v1-demo.yaml`` with deterministic random weights and
    ignores ``config``/``ckpt``. Otherwise the checkpoint is resolved with :func:`resolve_checkpoint`
    and loaded through ``ldm.util.load_model_from_config`` (no download, strict key checks).
    ``compile``: see :func:`engine_for_model`."""
    from ldm.util import load_model_from_config

    target = pick_device(device)
    weight_dtype(precision, target)  # a bad --precision fails before the model loads
    if demo:
        model = build_demo_model(load_config(DEMO_CONFIG))
        name, fingerprint = "demo", f"demo-{DEMO_SEED}"
    else:
        path = resolve_checkpoint(ckpt)
        model_config = load_config(config or REPO / "configs" / "stable-diffusion" / "v1-inference.yaml")
        log.info("loading %s", path)
        model = load_model_from_config(model_config, str(path), device="cpu")
        name, fingerprint = path.name, checkpoint_fingerprint(path)
    return engine_for_model(model, device=str(target), precision=precision, checkpoint=name,
                            checkpoint_hash=fingerprint, compile=compile)


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
