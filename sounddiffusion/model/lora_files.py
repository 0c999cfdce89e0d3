"""Reading LoRA files: their tensors grouped into modules, their hashes, and refusals of what cannot be merged.

A LoRA module holds ``down`` (rank, in) or (rank, in, kh, kw) and ``up`` (out, rank) or (out, rank, 1, 1);
the layer's weight changes by ``scale * up @ down`` (convolutions: up composed with down). Key endings
by format:

* kohya/LyCORIS LoCon: ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` (absent: alpha = rank);
* diffusers/peft: ``.lora_A.weight``, ``.lora_B.weight`` (scale 1, or peft's ``lora_alpha``/``alpha_pattern``
  from diffusers' ``lora_adapter_metadata`` in the safetensors header);
* older diffusers: ``.processor.to_q_lora.down.weight``, ``.lora_linear_layer.down.weight``, ``.lora.down.weight``.

``.safetensors`` files are read with safetensors; torch pickles (``.pt``/``.ckpt``) only through
``ldm.checkpoint``'s restricted unpickler, which refuses a pickle that would run code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ldm.checkpoint import read_state_dict
from ldm.errors import CheckpointError, UnsafeCheckpointError
from sounddiffusion.errors import ModelError

log = logging.getLogger(__name__)

_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
          ".lora.down.weight": "down", ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
          ".lora_linear_layer.up.weight": "up", "_lora.down.weight": "down", "_lora.up.weight": "up",
          ".alpha": "alpha"}
# Network types whose update is not up @ down: (the end of a key, what to call the file).
_UNSUPPORTED = [(re.compile(pattern), kind) for pattern, kind in (
    (r"\.hada_[wt]\d", "a LyCORIS LoHa file (hada_ weights)"),
    (r"\.lokr_[wt]\d", "a LyCORIS LoKr file (lokr_ weights)"),
    (r"\.lora_mid\.weight$", "a LyCORIS LoCon file with a Tucker core (lora_mid weights)"),
    (r"\.oft_(blocks|diag)$", "a LyCORIS OFT file (oft_ weights)"),
    (r"\.dora_scale$|\.lora_magnitude_vector", "a DoRA file (dora_scale weights)"),
    (r"\.diff(_b)?$", "a LyCORIS full-weight file (diff weights)"),
    (r"\.[wb]_norm$", "a LyCORIS norm file (w_norm weights)"))]
# Key beginnings only SDXL LoRAs have: two text encoders, the added-conditioning embedding. (kohya names
# SDXL's UNet by its CompVis layout, lora_unet_input_blocks_...; so do SD v1 LoRAs extracted by kohya's
# scripts: those names are read as this model's own layers and SDXL's do not fit them.)
_SDXL = ("lora_te1_", "lora_te2_", "text_encoder_2.", "lora_unet_label_emb", "unet.add_embedding.")
_PEFT_METADATA = "lora_adapter_metadata"


@dataclass(frozen=True)
class LoraInfo:
    """What names a LoRA file in outputs' metadata.

    name: the file name without its extension (as A1111's prompts name LoRAs); sha256: of the whole file (hex);
    short_hash: A1111's LoRA hash (Civitai's "AutoV3"): the first 12 hex digits of the sha256 of a
    safetensors file's bytes after its header (so metadata edits keep it), of the whole file for a pickle."""
    path: Path
    name: str
    sha256: str
    short_hash: str


@dataclass
class LoraModule:
    """One layer's LoRA: ``scale * up @ down`` is added to its weight at weight 1. name: the file's own."""
    name: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256 of the whole file, sha256 of what follows its safetensors header; of the whole file for
    other files), both hex."""
    header = 0
    if _is_safetensors(path):
        with open(path, "rb") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
    whole, data = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        whole.update(f.read(header))
        for chunk in iter(lambda: f.read(1 << 20), b""):
            whole.update(chunk)
            data.update(chunk)
    return whole.hexdigest(), data.hexdigest()


def _is_safetensors(path: Path) -> bool:
    """Whether the file starts as safetensors do: a u64 header length, then the JSON header's "{"."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _is_torch_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def lora_info(path) -> LoraInfo:
    """The file's :class:`LoraInfo` (its bytes hashed once: read it when its ``--lora`` is parsed,
    and pass it on). Raises ModelError for a file that cannot be read."""
    path = Path(path)
    try:
        whole, data = file_hashes(path)
    except OSError as exc:
        raise ModelError(f"LoRA file {path} cannot be read ({exc}): check the path and its permissions") from None
    return LoraInfo(path, path.stem, whole, data[:12])


def read_lora(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by key on the CPU in the file's dtypes, the safetensors header's metadata or {}).

    Raises ModelError, one line naming the file, for a missing file, a folder, a file that is neither
    safetensors nor a torch pickle, a truncated one, and a pickle that would run code."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"LoRA file {path} does not exist: check the path and the file name")
    if path.is_dir():
        raise ModelError(f"LoRA {path} is a folder: pass the .safetensors file in it")
    try:
        safetensors = _is_safetensors(path)
        if not safetensors and not _is_torch_pickle(path):
            raise ModelError(f"LoRA file {path} is neither a .safetensors file nor a torch pickle: "
                             f"pass a LoRA .safetensors file")
        tensors = read_state_dict(path)
        metadata = {}
        if safetensors:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
    except UnsafeCheckpointError as exc:  # "checkpoint <path> is unsafe: <which call>. Use a .safetensors copy ..."
        raise ModelError(f"LoRA {str(exc).removeprefix('checkpoint ')}") from None
    except CheckpointError as exc:  # "checkpoint <path> is <what is wrong>: <advice for checkpoints>"
        problem = str(exc).rsplit(": ", 1)[0].removeprefix("checkpoint ")
        raise ModelError(f"LoRA {problem}: download it again, or pass a LoRA .safetensors file") from None
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"LoRA file {path} cannot be read ({exc}): check its permissions") from None
    return tensors, metadata


def refuse_unmergeable(path: Path, keys) -> None:
    """Raises ModelError for LyCORIS/DoRA types other than LoRA/LoCon and for SDXL LoRAs."""
    for key in keys:
        for pattern, kind in _UNSUPPORTED:
            if pattern.search(key):
                raise ModelError(f"LoRA {path} is {kind}, which Sound Diffusion cannot merge: use a LoRA or "
                                 f"LoCon file (lora_down/lora_up or lora_A/lora_B weights)")
        if key.startswith(_SDXL):
            raise ModelError(f"LoRA {path} is for SDXL (it has keys like {key.split('.')[0]!r}), which Sound "
                             f"Diffusion does not run: use a LoRA made for SD v1 or SD 2.x")


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, "down" | "up" | "alpha") of a LoRA file key, or None for any other key."""
    key = key.removeprefix("base_model.model.")  # peft's own saving
    for ending, part in _PARTS.items():
        if key.endswith(ending):
            return key[: -len(ending)], part
    return None


def lora_modules(path: Path, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str]) -> tuple[dict[str, LoraModule], list[str]]:
    """(the file's modules by the file's module name, with scale = alpha / rank; the keys of its other
    tensors, e.g. textual-inversion embeddings bundled with the LoRA, or an alpha without its module).

    Raises ModelError for unmergeable types (see refuse_unmergeable), a file without any LoRA
    weights, and a module whose down and up do not fit each other."""
    refuse_unmergeable(path, tensors)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    for key, tensor in tensors.items():
        split = split_key(key)
        if split:
            parts.setdefault(split[0], {})[split[1]] = tensor
        else:
            others.append(key)
    peft_alpha = _peft_alpha(metadata)
    modules = {}
    for name, found in parts.items():
        down, up, alpha = found.get("down"), found.get("up"), found.get("alpha")
        if down is None and up is None:
            others.append(f"{name}.alpha")
            continue
        if down is None or up is None or down.ndim not in (2, 4) or up.ndim not in (2, 4) \
                or up.shape[1] != down.shape[0] or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
            raise ModelError(f"LoRA {path} is damaged: its module {name} has down {_shape(down)} and up "
                             f"{_shape(up)}, which do not compose: download it again")
        rank = down.shape[0]
        if alpha is not None:
            scale = float(alpha) / rank
        else:
            scale = peft_alpha(name, rank) if _is_peft(name, tensors) else 1.0
        modules[name] = LoraModule(name, down, up, scale)
    if not modules:
        example = next(iter(tensors), "none")
        raise ModelError(f"{path} is not a LoRA: none of its {len(tensors)} tensors (e.g. {example!r}) is a "
                         f"lora_down/lora_up or lora_A/lora_B weight; pass a LoRA file (a full checkpoint "
                         f"is loaded as the model, not as a LoRA)")
    return modules, others


def _shape(t) -> str:
    return "missing" if t is None else str(tuple(t.shape))


def _is_peft(name: str, tensors) -> bool:
    return f"{name}.lora_A.weight" in tensors or f"base_model.model.{name}.lora_A.weight" in tensors


def _peft_alpha(metadata: dict[str, str]):
    """scale(module name, rank) from diffusers' peft metadata: lora_alpha / rank, alpha_pattern, use_rslora.

    The metadata's keys are prefixed by component ("unet.lora_alpha") or bare; without metadata: 1."""
    try:
        config = json.loads(metadata.get(_PEFT_METADATA) or "{}")
    except json.JSONDecodeError:
        config = {}

    def scale(name: str, rank: int) -> float:
        component = name.split(".", 1)[0]
        local = name.split(".", 1)[-1]

        def setting(key, default):
            return config.get(f"{component}.{key}", config.get(key, default))
        alpha = setting("lora_alpha", None)
        for pattern, value in (setting("alpha_pattern", {}) or {}).items():
            if re.fullmatch(rf"(.*\.)?{pattern}", local):
                alpha = value
        if alpha is None:
            return 1.0
        return float(alpha) / (math.sqrt(rank) if setting("use_rslora", False) else rank)
    return scale
