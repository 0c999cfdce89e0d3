"""LoRA files merged into a loaded CompVis Stable Diffusion model, at constant or per-frame weights.

For every weight ``W`` (shape (out, in) or (out, in, kh, kw)) that the files touch::

    delta_i = scale_i * up_i @ down_i                 scale_i = alpha_i / rank_i (alpha absent: 1)
    W       = W0 + sum_i w_i * delta_i                w_i: the weight given to file i

``up`` is (out, rank) or (out, rank, 1, 1), ``down`` (rank, in) or (rank, in, kh, kw); for a
convolution the product is up composed with down, ``up.flatten(1) @ down.flatten(1)`` reshaped to
``W``'s shape (so a linear LoRA fits a 1x1 convolution and a 1x1-conv LoRA a linear layer: SD v1's
``proj_in``/``proj_out`` are convolutions, SD 2.x's linear).

Use :func:`apply_loras` for weights that stay the same for the whole render (merged once, nothing
left to do per step), :func:`load_loras` and :meth:`LoraPatch.set_weights` for weights that change per
frame: the deltas are computed once, each ``set_weights`` call rewrites only the weights that the
changed files touch, from the kept originals (so the result does not depend on the frames before).
:meth:`LoraPatch.restore` puts the original weights back, bit for bit (after :func:`apply_loras` only
with ``keep_original=True``: the engine's merge keeps no copy). Load after moving the model to
its device and dtype; keep one patch per model at a time (load all its LoRAs in one call).
File formats, hashes and refusals: :mod:`.lora_files`; names: :mod:`.lora_names`.
"""
from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm.modules.diffusionmodules.demo_denoiser import DemoDenoiser
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from sounddiffusion.errors import ModelError, ParameterError

from .lora_files import LoraInfo, LoraModule, lora_info, lora_modules, read_lora
from .lora_names import LoraTarget, lora_targets

log = logging.getLogger(__name__)

# Width of the text conditioning (cross-attention keys' input, text encoder) -> model family.
_FAMILY_OF_WIDTH = {768: "SD v1", 1024: "SD 2.x", 2048: "SDXL"}
_WIDTH_LAYER = re.compile(r"attn2[._](processor[._])?to_k$|self_attn[._](k_proj|to_k)$")
_DEEP_TRANSFORMER = re.compile(r"transformer_blocks[._][1-9]")  # SD v1/2.x have depth 1, SDXL 2 and 10

__all__ = ["LoraInfo", "LoraPatch", "apply_loras", "load_loras"]


@dataclass
class _Patched:
    """One touched weight: the parameter (and its row block), its original values (None: not kept),
    (file index, delta) pairs."""
    parameter: nn.Parameter
    rows: tuple[int, int] | None
    original: torch.Tensor | None
    deltas: list[tuple[int, torch.Tensor]]

    def weight(self) -> torch.Tensor:
        """The tensor to write: the parameter itself (so that in-place writes bump its version, which
        pre-packed layers watch) or a block of its rows."""
        return self.parameter if self.rows is None else self.parameter[self.rows[0]:self.rows[1]]

    def merge(self, weights: Sequence[float]) -> None:
        """W = W0 + sum_i weights[i] * delta_i, in place; terms of weight 0 are skipped (W0 exactly if all are)."""
        weight = self.weight()
        if weight.device != self.original.device or weight.dtype != self.original.dtype:
            raise RuntimeError("the model moved to another device or dtype after its LoRAs were loaded: "
                               "load them after moving the model")
        terms = [(weights[i], delta) for i, delta in self.deltas if weights[i] != 0]
        if not terms:
            weight.copy_(self.original)
            return
        torch.add(self.original, terms[0][1], alpha=terms[0][0], out=weight)
        for w, delta in terms[1:]:
            weight.add_(delta, alpha=w)


class LoraPatch:
    """LoRA files merged into a model in place (made by :func:`load_loras` or :func:`apply_loras`).

    files: a LoraInfo (path, name, sha256, short_hash) per file, in the order given;
    weights: the weights now merged, one per file; touched: (parameter path, rows or None) of every
    weight the files change."""

    def __init__(self, files: Sequence[LoraInfo], entries: dict[LoraTarget, _Patched], weights, schedulable: bool):
        self.files = tuple(files)
        self._entries = entries
        self._schedulable = schedulable
        self.weights = tuple(weights)

    @property
    def touched(self) -> list[tuple[str, tuple[int, int] | None]]:
        return [(target.parameter, target.rows) for target in self._entries]

    @property
    def kept_bytes(self) -> int:
        """Memory the patch holds: the original of every touched weight (when kept) and, for load_loras, its deltas."""
        return sum((entry.original.nbytes if entry.original is not None else 0)
                   + sum(delta.nbytes for _, delta in entry.deltas) for entry in self._entries.values())

    def set_weights(self, weights: Sequence[float]) -> list[tuple[str, tuple[int, int] | None]]:
        """Merges the files at ``weights`` (one float per file) instead of the weights now merged.

        Rewrites only the weights touched by a file whose weight changed: W = W0 + sum_i w_i * delta_i
        from the kept W0 and deltas (no file read, no up @ down). Returns what it rewrote, as
        :attr:`touched` names it ([] when no weight changed). Raises ParameterError for a wrong
        count or a weight that is not a finite number."""
        if not self._schedulable:
            raise RuntimeError("these LoRAs were merged at constant weights (apply_loras): "
                               "use load_loras for weights that change")
        weights = _checked_weights(weights, [info.path for info in self.files])
        changed = {i for i, (new, old) in enumerate(zip(weights, self.weights)) if new != old}
        rewritten = []
        with torch.no_grad():
            for target, entry in self._entries.items():
                if any(i in changed for i, _ in entry.deltas):
                    entry.merge(weights)
                    rewritten.append((target.parameter, target.rows))
        self.weights = weights
        return rewritten

    def restore(self) -> None:
        """Puts back the original weights, bit for bit (the patch can be merged again with set_weights).
        Raises RuntimeError after :func:`apply_loras` without ``keep_original``, which kept none."""
        if any(entry.original is None for entry in self._entries.values()):
            raise RuntimeError("these LoRAs were merged for good, keeping no original weights: merge them with "
                               "apply_loras(..., keep_original=True) to restore them")
        with torch.no_grad():
            for entry in self._entries.values():
                weight = entry.weight()
                if weight.dtype != entry.original.dtype:
                    raise RuntimeError("the model changed dtype after its LoRAs were loaded: cannot restore it exactly")
                weight.copy_(entry.original)
        self.weights = (0.0,) * len(self.files)


def _checked_weights(weights, paths) -> tuple[float, ...]:
    """weights as floats, one per path; ParameterError for a wrong count or a weight that is not a finite number."""
    weights = tuple(weights)
    if len(weights) != len(paths):
        raise ParameterError(f"{len(weights)} LoRA weights given for {len(paths)} LoRA files: give one weight per file")
    for w, path in zip(weights, paths):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ParameterError(f"LoRA weight {w!r} for {path} is not a finite number: give a number such as 0.8")
    return tuple(float(w) for w in weights)


def _model_family(model) -> tuple[str, str, str]:
    """(family, description, advice), e.g. ("SD v1", "SD v1 model (768-wide text conditioning)",
    "use a LoRA made for SD v1")."""
    text = model.cond_stage_model
    family = ("SD v1" if isinstance(text, FrozenCLIPEmbedder) else "SD 2.x" if isinstance(text, FrozenOpenCLIPEmbedder)
              else "Stable Diffusion")
    widths = [m.in_features for name, m in model.model.diffusion_model.named_modules() if name.endswith("attn2.to_k")]
    width = f" ({widths[0]}-wide text conditioning)" if widths else ""
    if isinstance(model.model.diffusion_model, DemoDenoiser):  # a toy of SD v1's layout, but narrower
        return family, f"--demo model{width}", ("LoRAs made for SD v1 need real SD v1 weights: leave out --demo "
                                                "and pass the checkpoint with --ckpt (README: LoRA files and negative prompts)")
    return family, f"{family} model{width}", f"use a LoRA made for {family}"


def _file_family(modules: dict[str, LoraModule]) -> str | None:
    """The family a LoRA was made for: SDXL when it has transformers deeper than one block, else by the
    width of its cross-attention keys' or text encoder's input."""
    if any(_DEEP_TRANSFORMER.search(name) for name in modules):
        return "SDXL"
    for name, module in modules.items():
        if _WIDTH_LAYER.search(name) and module.down.shape[1] in _FAMILY_OF_WIDTH:
            return _FAMILY_OF_WIDTH[module.down.shape[1]]
    return None


def _layer_shape(module: LoraModule) -> tuple[int, ...]:
    """The shape of the weight a module's update has: (out, in) or (out, in, kh, kw)."""
    return (module.up.shape[0], *module.down.shape[1:])


def _fits(module: LoraModule, shape: torch.Size) -> bool:
    kernel, wanted = tuple(module.down.shape[2:]) or (1, 1), tuple(shape[2:]) or (1, 1)
    return (module.up.shape[0], module.down.shape[1]) == tuple(shape[:2]) and kernel == wanted


def _delta(module: LoraModule, like: torch.Tensor) -> torch.Tensor:
    """scale * up @ down as a tensor of ``like``'s shape, dtype and device (computed in float32)."""
    # Scaling up (out, rank) costs less than scaling the product (out, in * kh * kw).
    up = module.up.to(like.device, torch.float32).flatten(1) * module.scale
    down = module.down.to(like.device, torch.float32).flatten(1)
    return (up @ down).reshape(like.shape).to(like.dtype)


def _target_shape(model, target: LoraTarget) -> torch.Size:
    shape = model.get_parameter(target.parameter).shape
    return shape if target.rows is None else torch.Size((target.rows[1] - target.rows[0], *shape[1:]))


def _matched_modules(path: Path, modules: dict[str, LoraModule], others: list[str], targets: dict[str, LoraTarget],
                     model) -> dict[LoraTarget, LoraModule]:
    """The file's modules by the weight they change. Raises ModelError when none matches or one does
    not fit its layer (a LoRA for another model); logs one warning for the modules matching nothing
    and the file's ``others`` (tensors that belong to no LoRA module)."""
    matched, unmatched = {}, []
    for name, module in modules.items():
        target = targets.get(name)
        if target is None:
            unmatched.append(name)
        elif target in matched:
            raise ModelError(f"LoRA {path} is malformed: it changes {target.layer} twice "
                             f"({matched[target].name}, {name}); download it again")
        else:
            matched[target] = module
    file_family = _file_family(modules)
    made_for = f" is for {file_family} and" if file_family else ""
    family, model_name, advice = _model_family(model)
    if not matched:
        raise ModelError(f"LoRA {path}{made_for} fits no layer of this {model_name}: none of its {len(modules)} "
                         f"modules (e.g. {unmatched[0]!r}) names one; {advice}")
    for target, module in matched.items():
        shape = _target_shape(model, target)
        if not _fits(module, shape):
            raise ModelError(f"LoRA {path}{made_for} does not fit this {model_name}: its {target.layer} is "
                             f"{_layer_shape(module)}, the model's {tuple(shape)}; {advice}")
    if unmatched or others:
        log.warning("LoRA %s: %d of its %d modules match no layer of this model, and %d of its tensors belong "
                    "to no LoRA module; they are left out (debug logging lists them)",
                    path, len(unmatched), len(modules), len(others))
        log.debug("LoRA %s: left out: %s", path, ", ".join(sorted(unmatched) + sorted(others)))
    return matched


def _checked_specs(specs) -> tuple[list[Path], tuple[float, ...]]:
    specs = list(specs)
    if any(not isinstance(spec, (tuple, list)) or len(spec) != 2 for spec in specs):
        raise ParameterError(f"LoRAs {specs!r}: give (file, weight) pairs")
    paths = [Path(path) for path, _ in specs]
    return paths, _checked_weights([w for _, w in specs], paths)


def _load(model, specs, schedulable: bool, keep_original: bool = True,
          infos: Sequence[LoraInfo] | None = None) -> LoraPatch:
    paths, weights = _checked_specs(specs)
    if infos is not None and [info.path for info in infos] != paths:
        raise ValueError("infos must be the LoraInfo of the specs' files, in order")
    targets = lora_targets(model)
    contributions = {}
    for i, path in enumerate(paths):  # every file is read and checked before the model changes
        tensors, metadata = read_lora(path)
        modules, others = lora_modules(path, tensors, metadata)
        for target, module in _matched_modules(path, modules, others, targets, model).items():
            contributions.setdefault(target, []).append((i, module))
    files = list(infos) if infos is not None else [lora_info(path) for path in paths]
    entries = {}
    with torch.no_grad():
        for target, modules in contributions.items():
            parameter = model.get_parameter(target.parameter)
            weight = parameter if target.rows is None else parameter[target.rows[0]:target.rows[1]]
            deltas = [(i, _delta(module, weight)) for i, module in modules]
            if schedulable:
                entries[target] = _Patched(parameter, target.rows, weight.detach().clone(), deltas)
                continue
            # Merged now, for good: W += w_i delta_i in place (the sums set_weights makes from W0);
            # the original is copied, to the CPU, only when asked.
            original = weight.detach().to("cpu", copy=True) if keep_original else None
            for i, delta in deltas:
                if weights[i] != 0:
                    weight.add_(delta, alpha=weights[i])
            entries[target] = _Patched(parameter, target.rows, original, [])
    patch = LoraPatch(files, entries, (0.0,) * len(files), schedulable)
    if schedulable:
        patch.set_weights(weights)
    else:
        patch.weights = weights
    for info, w in zip(files, weights):
        log.info("LoRA %s (%s) %s %g", info.name, info.short_hash, "loaded, weight now" if schedulable else "merged at", w)
    return patch


def load_loras(model: nn.Module, specs: Sequence[tuple[str | Path, float]], *,
               infos: Sequence[LoraInfo] | None = None) -> LoraPatch:
    """Reads LoRA files, merges them into ``model`` at the given weights and returns the patch, whose
    ``set_weights([w1, w2, ...])`` changes the weights later (per frame) and ``restore()`` undoes it.

    model: a CompVis LatentDiffusion (SD v1 or 2.x), on its final device and dtype.
    specs: (file, weight) pairs; files are .safetensors (or .pt/.ckpt pickles, read with the restricted
    unpickler); ``infos``: their :class:`LoraInfo` when already taken (by ``--lora``'s parsing), else
    each file is hashed here. Keeps the original and one delta per file of every touched weight on
    the model's device. Raises ModelError (missing, unreadable or unsafe file, not a LoRA, an unsupported LyCORIS
    type, a LoRA for another model family, none of its layers in the model) and ParameterError (a weight
    that is not a finite number), before changing the model."""
    return _load(model, specs, schedulable=True, infos=infos)


def apply_loras(model: nn.Module, specs: Sequence[tuple[str | Path, float]], *, keep_original: bool = False,
                infos: Sequence[LoraInfo] | None = None) -> LoraPatch:
    """Merges LoRA files into ``model`` in place at constant weights, once: W = W0 + sum_i w_i * delta_i.

    As :func:`load_loras` (same arguments, checks and result), but nothing is kept: no deltas (the
    patch cannot ``set_weights``) and, unless ``keep_original``, no original weights (a LoCon on all of
    SD v1's UNet would keep 3.4 GB); with ``keep_original`` they are copied to the CPU for ``restore()``."""
    return _load(model, specs, schedulable=False, keep_original=keep_original, infos=infos)
