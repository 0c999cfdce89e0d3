"""TAESD: the tiny distilled autoencoder of Stable Diffusion's latent space (madebyollin/taesd).

Latent space. TAESD was distilled on the latents the UNet sees: the KL autoencoder's latents
already multiplied by the model's ``scale_factor`` (0.18215 for SD v1.x and SD 2.x, whose KL
autoencoders share one latent space, so one TAESD serves both). There is no scale factor of its
own (diffusers' ``AutoencoderTiny`` config says ``scaling_factor: 1.0``). Against a
``LatentDiffusion`` ``model``, for pictures ``x`` in [-1, 1] and UNet latents ``z``::

    TinyAutoencoder.encode(x)  ~  model.get_first_stage_encoding(model.encode_first_stage(x))
                                  (= scale_factor * the KL posterior's mean; deterministic)
    TinyAutoencoder.decode(z)  ~  model.decode_first_stage(z)     (pictures in [-1, 1], unclamped)

so it replaces those two calls in a frame chain without any scale factor. It must not be put in
``model.first_stage_model``: ``decode_first_stage`` divides by ``scale_factor`` before calling it.

Pixels. TAESD's networks themselves take and give pictures in [0, 1]; ``encode`` maps the
project's [-1, 1] to [0, 1] first (``(x + 1) / 2``) and ``decode`` maps back (``2 y - 1``),
as diffusers' ``AutoencoderTiny`` does.

Architecture (64 channels, 4 latent channels, ReLU; ``Block(x) = relu(conv3(relu(conv2(relu(conv1(x))))) + x)``
with 3x3 convolutions; ``up`` = nearest 2x upsampling)::

    encoder: conv(3->64), Block, 3 x [conv(64->64, stride 2, no bias), 3 Blocks], conv(64->4)
    decoder: clamp z to 3 tanh(z / 3), conv(4->64), ReLU, 3 x [3 Blocks, up, conv(64->64, no bias)],
             Block, conv(64->3)

Files (read by :func:`load_taesd`, never with a plain unpickler):

* madebyollin/taesd's ``taesd_encoder.pth`` / ``taesd_decoder.pth`` (or ``.safetensors``): each a
  bare state dict of one ``nn.Sequential`` (keys ``0.weight``, ``1.conv.0.weight`` ...; the
  decoder's index 0 is the parameter-free clamp). This module keeps that numbering, under
  ``encoder.`` / ``decoder.``.
* diffusers' ``AutoencoderTiny`` (``diffusion_pytorch_model.safetensors`` + ``config.json``): keys
  ``encoder.layers.N...`` (same N) and ``decoder.layers.N...`` (N one less: no clamp layer).

TAESDXL (SDXL), TAESD3 and TAEF1 (SD3, FLUX.1: 16 latent channels) are refused: SDXL latents look
the same to the weights (same architecture, 4 channels), so TAESDXL is told by name (``sdxl`` in
the file's or folder's name, ``taesdxl`` in the folder holding the file) or by ``sdxl`` in its
config's ``_name_or_path`` (diffusers writes the folder it loaded from there, so a mere "xl" in a
user's path says nothing): TAESDXL weights under another name load, and decode SD latents wrongly.
"""
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import read_state_dict
from ldm.errors import CheckpointError

WIDTH = 64
LATENT_CHANNELS = 4
DOWNSCALE = 8  # pixels per latent, along each side
ENCODER_FILES = ("taesd_encoder.safetensors", "taesd_encoder.pth")
DECODER_FILES = ("taesd_decoder.safetensors", "taesd_decoder.pth")
DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_WHERE = ("pass madebyollin/taesd's folder (diffusers' AutoencoderTiny, or taesd_encoder.pth + "
          "taesd_decoder.pth) or one of its files")
_DIFFUSERS_KEY = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(.+)")
_OTHER_LATENTS = {16: "SD3 / FLUX.1 (taesd3, taef1)", 32: "FLUX.2 / Sana", 128: "FLUX.2"}

# ------------------------------------------------------------------------------ the networks


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class LatentClamp(nn.Module):
    """Soft clamp of latents into (-3, 3): ``3 tanh(z / 3)`` (identity near 0)."""

    def forward(self, z):
        return 3.0 * torch.tanh(z / 3.0)


class TinyBlock(nn.Module):
    """Residual block: ``relu(conv(relu(conv(relu(conv(x))))) + x)``, 3x3 convolutions, same width."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.conv = nn.Sequential(_conv(width, width), nn.ReLU(), _conv(width, width), nn.ReLU(), _conv(width, width))
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + x)


def tiny_encoder(latent_channels: int = LATENT_CHANNELS, width: int = WIDTH) -> nn.Sequential:
    """TAESD's encoder: (B, 3, H, W) picture in [0, 1] -> (B, latent_channels, H/8, W/8) UNet latents."""
    layers = [_conv(3, width), TinyBlock(width)]
    for _ in range(3):  # each halves the sides
        layers += [_conv(width, width, stride=2, bias=False), TinyBlock(width), TinyBlock(width), TinyBlock(width)]
    return nn.Sequential(*layers, _conv(width, latent_channels))


def tiny_decoder(latent_channels: int = LATENT_CHANNELS, width: int = WIDTH) -> nn.Sequential:
    """TAESD's decoder: (B, latent_channels, h, w) UNet latents -> (B, 3, 8h, 8w) picture, nominally in [0, 1]."""
    layers = [LatentClamp(), _conv(latent_channels, width), nn.ReLU()]
    for _ in range(3):  # each doubles the sides
        layers += [TinyBlock(width), TinyBlock(width), TinyBlock(width), nn.Upsample(scale_factor=2),
                   _conv(width, width, bias=False)]
    return nn.Sequential(*layers, TinyBlock(width), _conv(width, 3))


class TinyAutoencoder(nn.Module):
    """TAESD for SD v1.x / 2.x: UNet latents <-> pictures in [-1, 1] (see the module doc for the spaces).

    has_encoder / has_decoder: which halves exist (a file may hold only one); ``source`` names
    where the weights came from, for messages. Built with PyTorch's default initialisation; load
    trained weights with :func:`load_taesd`. Parameters are float32 unless moved with ``.to()``.
    """

    def __init__(self, has_encoder: bool = True, has_decoder: bool = True, source: str = "untrained"):
        super().__init__()
        if not (has_encoder or has_decoder):
            raise ValueError("a TinyAutoencoder needs an encoder, a decoder or both")
        self.encoder = tiny_encoder() if has_encoder else None
        self.decoder = tiny_decoder() if has_decoder else None
        self.source = source

    def _weight(self) -> torch.Tensor:
        return next(self.parameters())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> (B, 4, H/8, W/8) UNet latents
        (already scaled: what ``get_first_stage_encoding(encode_first_stage(images))`` gives), in
        the dtype of ``images``. Raises ValueError without an encoder or for a bad shape."""
        if self.encoder is None:
            raise ValueError(f"the TAESD loaded from {self.source} has no encoder (that file holds only the "
                             f"decoder), so it cannot encode pictures: pass the folder holding taesd_encoder.pth "
                             f"and taesd_decoder.pth, or diffusers' diffusion_pytorch_model.safetensors")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % DOWNSCALE or images.shape[3] % DOWNSCALE:
            raise ValueError(f"TAESD encodes (batch, 3, height, width) pictures with sides that are multiples "
                             f"of {DOWNSCALE}, not {tuple(images.shape)}")
        weight = self._weight()
        pixels01 = (images.to(weight.dtype) + 1.0) / 2.0
        return self.encoder(pixels01).to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, 4, h, w): UNet latents (what ``decode_first_stage`` takes, NOT divided by
        scale_factor) -> (B, 3, 8h, 8w) pictures, nominally in [-1, 1], not clamped, in the dtype of
        ``latents``. Raises ValueError without a decoder or for a bad shape."""
        if self.decoder is None:
            raise ValueError(f"the TAESD loaded from {self.source} has no decoder (that file holds only the "
                             f"encoder): pass taesd_decoder.pth or the whole TAESD folder")
        if latents.ndim != 4 or latents.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"TAESD decodes (batch, {LATENT_CHANNELS}, height, width) latents, "
                             f"not {tuple(latents.shape)}")
        pixels01 = self.decoder(latents.to(self._weight().dtype))
        return (2.0 * pixels01 - 1.0).to(latents.dtype)


# ------------------------------------------------------------------------------ loading


def load_taesd(path) -> TinyAutoencoder:
    """TAESD for SD v1.x / 2.x from ``path``, on the CPU in float32, in eval mode, no gradients.

    path: a folder (diffusers' ``AutoencoderTiny`` with ``diffusion_pytorch_model.safetensors`` or
    ``.bin``, read first when present; else ``taesd_encoder`` / ``taesd_decoder`` ``.safetensors``
    or ``.pth``, either may be missing) or one such file. A decoder-only file gives a model whose
    ``encode`` raises. Pickles are read by ``ldm.checkpoint.read_state_dict`` (restricted).
    Raises CheckpointError for a missing path, a file that is not TAESD (a KL VAE, a UNet ...),
    TAESD for other latents (SDXL, SD3, FLUX), or a folder without TAESD files in it
    (UnsafeCheckpointError for a pickle that would run code).
    """
    halves = {}
    for file in taesd_files(path):
        halves.update(taesd_halves(_read(file), file))
    model = TinyAutoencoder("encoder" in halves, "decoder" in halves, source=str(Path(path)))
    for name, state in halves.items():
        getattr(model, name).load_state_dict(state)
    return model.eval().requires_grad_(False)


def _read(file: Path) -> dict:
    """read_state_dict's tensors; its errors' advice (about SD checkpoints) is changed to TAESD's."""
    try:
        return read_state_dict(file)
    except CheckpointError as exc:
        message = str(exc).replace("pass a Stable Diffusion .ckpt or .safetensors file", _WHERE)
        raise type(exc)(message) from None


def _refuse_taesdxl_name(path: Path) -> None:
    """TAESDXL has TAESD's shapes: refuse it by name (``sdxl`` in the file's or folder's own name,
    ``taesdxl`` in the name of the folder holding the file)."""
    if "sdxl" in path.name.lower() or (path.is_file() and "taesdxl" in path.resolve().parent.name.lower()):
        raise CheckpointError(f"{path} looks like TAESDXL, made for SDXL latents, which SD v1.x / 2.x models do "
                              f"not use: use madebyollin/taesd instead (taesd_encoder.pth, taesd_decoder.pth)")


def taesd_files(path) -> list[Path]:
    """The weight files :func:`load_taesd` reads from ``path``: the file itself, or a folder's
    diffusers single file (its config.json checked) or original pair (either may lack), encoder first.
    Raises CheckpointError for a missing path, a TAESDXL name or config, a folder without TAESD files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"TAESD weights {path} do not exist: {_WHERE}")
    _refuse_taesdxl_name(path)
    return _taesd_files_in(path) if path.is_dir() else [path]


def _taesd_files_in(folder: Path) -> list[Path]:
    """The weight files of a TAESD folder: diffusers' single file, or the original pair (either may lack)."""
    config = folder / "config.json"
    for name in DIFFUSERS_FILES:
        if (folder / name).is_file():
            if config.is_file():
                _check_diffusers_config(config)
            return [folder / name]
    found = [next((folder / name for name in names if (folder / name).is_file()), None)
             for names in (ENCODER_FILES, DECODER_FILES)]
    if found == [None, None]:
        raise CheckpointError(f"{folder} holds no TAESD weights (looked for {DIFFUSERS_FILES[0]}, "
                              f"{ENCODER_FILES[1]}, {DECODER_FILES[1]} and their .safetensors/.bin forms): {_WHERE}")
    return [file for file in found if file is not None]


def _check_diffusers_config(config_path: Path) -> None:
    """Refuse an AutoencoderTiny config that is not SD v1/2's TAESD (the weights cannot tell SDXL apart)."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path} cannot be read as JSON ({exc}): download it again") from None
    wanted = {"_class_name": "AutoencoderTiny", "latent_channels": LATENT_CHANNELS, "act_fn": "relu",
              "upsample_fn": "nearest", "scaling_factor": 1.0, "shift_factor": 0.0}
    wrong = {key: config[key] for key, value in wanted.items() if key in config and config[key] != value}
    if wrong:
        raise CheckpointError(f"{config_path} describes another tiny autoencoder than SD v1/2's TAESD "
                              f"({', '.join(f'{k}={v!r}' for k, v in wrong.items())}): use madebyollin/taesd")
    if "sdxl" in str(config.get("_name_or_path", "")).lower():  # taesdxl, sdxl-vae...
        raise CheckpointError(f"{config_path} names {config['_name_or_path']}, a TAESD for SDXL latents, which SD "
                              f"v1.x / 2.x models do not use: use madebyollin/taesd instead")


def taesd_halves(state: dict, file) -> dict[str, dict]:
    """{"encoder": ..., "decoder": ...} (those present) in this module's numbering, from a file's state dict.

    state: one file's tensors (diffusers' or the original layout, see the module doc); file: its
    name, for messages. The halves' keys and shapes are checked; raises CheckpointError otherwise.
    """
    keys = list(state)
    diffusers_keys = {key: _DIFFUSERS_KEY.fullmatch(key) for key in keys}
    if keys and all(diffusers_keys.values()):
        halves = {"encoder": {}, "decoder": {}}
        for key, tensor in state.items():
            half, index, name = diffusers_keys[key].groups()
            shift = 1 if half == "decoder" else 0  # the original decoder's index 0 is the clamp
            halves[half][f"{int(index) + shift}.{name}"] = tensor
        halves = {half: tensors for half, tensors in halves.items() if tensors}
    elif keys and all(key.split(".")[0].isdigit() for key in keys):
        halves = {"encoder" if "0.weight" in state else "decoder": dict(state)}
    else:
        raise CheckpointError(f"{file} is not a TAESD file: {_looks_like(keys)}. {_WHERE[0].upper()}{_WHERE[1:]}")
    for half, tensors in halves.items():
        _check_half(half, tensors, file)
    return halves


def _looks_like(keys: list[str]) -> str:
    if any(key.startswith("model.diffusion_model.") for key in keys) and any(
            key.startswith("first_stage_model.") for key in keys):
        return "it is a whole Stable Diffusion checkpoint (UNet, VAE and text encoder)"
    if any(key.startswith(("model.diffusion_model.", "down_blocks.", "time_embedding.")) for key in keys):
        return "it holds a UNet (a Stable Diffusion model or part of one)"
    if any(key.startswith("first_stage_model.") or key.endswith(("quant_conv.weight", "conv_in.weight"))
           for key in keys):
        return "it holds a KL autoencoder (Stable Diffusion's full-size VAE)"
    return f"its keys ({', '.join(keys[:3]) or 'none'} ...) are not TAESD's"


def _check_half(half: str, tensors: dict, file) -> None:
    """The keys and shapes of one half must be TAESD's, with 4 latent channels."""
    latent_key, latent_dim = ("14.weight", 0) if half == "encoder" else ("1.weight", 1)
    if latent_key in tensors and tensors[latent_key].ndim == 4:
        channels = tensors[latent_key].shape[latent_dim]
        if channels != LATENT_CHANNELS:
            family = _OTHER_LATENTS.get(channels, "another model")
            raise CheckpointError(f"{file} is a TAESD {half} for {channels}-channel latents ({family}); SD v1.x / 2.x "
                                  f"use {LATENT_CHANNELS}: use madebyollin/taesd instead")
    expected = {key: tuple(t.shape) for key, t in (tiny_encoder() if half == "encoder" else tiny_decoder())
                .state_dict().items()}
    got = {key: tuple(t.shape) for key, t in tensors.items()}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    reshaped = sorted(key for key in expected.keys() & got.keys() if expected[key] != got[key])
    if missing or unexpected or reshaped:
        problems = [f"{label} {', '.join(keys[:3])}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("other shapes of", reshaped)) if keys]
        raise CheckpointError(f"{file} does not fit TAESD's {half} ({'; '.join(problems)}): it is another "
                              f"architecture or a damaged file: {_WHERE}")


# ------------------------------------------------------------------------------ speed


def decode_seconds(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, repeats: int = 3) -> float:
    """Median wall-clock seconds of ``decode(latents)`` under ``torch.inference_mode``.

    decode: e.g. ``TinyAutoencoder.decode`` or ``LatentDiffusion.decode_first_stage`` (both take
    UNet latents); latents: (B, 4, h, w) on the device and in the dtype to measure (64x64 for a
    512x512 picture). One untimed warm-up call first; CUDA is synchronised around each call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}")

    def sync():
        if latents.device.type == "cuda":
            torch.cuda.synchronize(latents.device)

    times = []
    with torch.inference_mode():
        for call in range(repeats + 1):
            sync()
            start = time.perf_counter()
            decode(latents)
            sync()
            if call:  # call 0 is the warm-up
                times.append(time.perf_counter() - start)
    return statistics.median(times)
