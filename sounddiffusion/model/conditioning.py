"""From raw audio features to the conditioning the UNet reads, and text prompts that change over time.

Normalization modes (``--normalize``) turn raw features ``(77, D)`` into a conditioning ``(77, D)``
and say how a text prompt is mixed in. ``--textstrength`` means something different in each:

``clip`` (default)
    Match CLIP's statistics. Each column of the feature rows 1..76 is standardized over those 76
    rows and then given the mean and standard deviation of the same column of the empty prompt's
    conditioning (rows 1..76). Row 0 is the empty prompt's row 0 (feature row 0 is not used):
    CLIP's causal text encoder gives the same beginning-of-text row for every prompt, so the
    model always sees it there.
    A column that does not vary (silence, a constant sound) carries no information and takes the
    empty prompt's column unchanged, so silence conditions like the empty prompt.
    With a text prompt the result is ``(1 - w) * audio + w * text_cond`` with
    ``w = textstrength`` clipped to [0, 1]: 0 is sound only, 1 is text only.
    Without a text prompt ``textstrength`` is not used.

``text-range``
    The original Sound-Diffusion formula. With ``t`` the text prompt's conditioning (the empty
    prompt's when there is none) and ``s = textstrength > 0``: the features are scaled linearly
    from [min f, max f] onto [min t / s, max t / s] (all entries of the matrices) and ``t`` is
    added. A larger ``s`` makes the sound's part smaller next to the text. Constant features
    (silence) map to the middle of that range.

``none``
    The raw features, as in upstream's first experiments; with a text prompt,
    ``raw + text_cond``. ``textstrength`` is not used.

:func:`blend_conditionings` mixes the conditionings of the prompts a prompt schedule
(:mod:`sounddiffusion.control.prompts`) gives for a frame.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from sounddiffusion.errors import ParameterError

NORMALIZE_MODES = ("clip", "text-range", "none")
"""The ``--normalize`` modes :func:`condition` accepts; the first is the default."""

# A feature column whose std is at most this fraction of its largest |value| is constant up to
# float32 rounding: standardizing it would blow rounding noise up to full-size signal.
_FLAT_COLUMN = 1e-6


def condition(
    features: np.ndarray | torch.Tensor,
    *,
    mode: str = NORMALIZE_MODES[0],
    text_cond: torch.Tensor | None = None,
    empty_cond: torch.Tensor,
    textstrength: float = 0.5,
) -> torch.Tensor:
    """The conditioning ``(77, D)`` float32 for raw audio ``features`` ``(77, D)``.

    ``text_cond`` is the text prompt's conditioning ``(77, D)`` or None without a text prompt;
    ``empty_cond`` is the conditioning of ``""`` ``(77, D)``. ``mode`` is one of
    :data:`NORMALIZE_MODES` (see the module documentation for what each does and what
    ``textstrength`` means there). The result lies on ``empty_cond``'s device; it is computed in
    float64 on the CPU, so it is the same on every device. Raises :class:`ParameterError` for an
    unknown mode, mismatched shapes, non-finite features or an unusable ``textstrength``.
    """
    if mode not in NORMALIZE_MODES:
        raise ParameterError(f"unknown normalization {mode!r}: use one of {', '.join(NORMALIZE_MODES)}")
    empty = _as_float64(empty_cond)
    raw = _as_float64(features)
    text = None if text_cond is None else _as_float64(text_cond)
    for name, matrix in (("features", raw), ("text conditioning", text)):
        if matrix is not None and matrix.shape != empty.shape:
            raise ParameterError(f"{name} have shape {tuple(matrix.shape)} but the model's conditioning is "
                                 f"{tuple(empty.shape)}: featurize with dim={empty.shape[-1]}")
    if not torch.isfinite(raw).all():
        raise ParameterError("audio features contain NaN or inf: compute them with sounddiffusion.sound.features.featurize")
    if not math.isfinite(textstrength):
        raise ParameterError(f"--textstrength {textstrength}: use a finite number")
    if mode == "clip":
        result = clip_stats_conditioning(raw, empty)
        if text is not None:
            weight = min(max(textstrength, 0.0), 1.0)
            result = (1.0 - weight) * result + weight * text
    elif mode == "text-range":
        result = text_range_conditioning(raw, empty if text is None else text, textstrength)
    else:
        result = raw if text is None else raw + text
    return result.to(device=empty_cond.device, dtype=torch.float32)


def clip_stats_conditioning(features: torch.Tensor, empty_cond: torch.Tensor) -> torch.Tensor:
    """``features`` ``(77, D)`` with row 0 and the column statistics of ``empty_cond`` ``(77, D)``.

    Row 0 is ``empty_cond[0]``. In rows 1..76 every column is standardized and rescaled to the
    mean and (population) standard deviation of the same column of ``empty_cond[1:]``; columns
    that are constant in ``features`` are copied from ``empty_cond``. So every column of rows
    1..76 of the result has exactly the empty prompt's mean and standard deviation.
    """
    audio, empty = features[1:], empty_cond[1:]
    mean, std = audio.mean(dim=0), audio.std(dim=0, correction=0)
    flat = std <= _FLAT_COLUMN * audio.abs().amax(dim=0)
    standardized = (audio - mean) / torch.where(flat, 1.0, std)
    rescaled = standardized * empty.std(dim=0, correction=0) + empty.mean(dim=0)
    return torch.cat([empty_cond[:1], torch.where(flat, empty, rescaled)])


def text_range_conditioning(features: torch.Tensor, text_cond: torch.Tensor, textstrength: float) -> torch.Tensor:
    """The original formula: ``features`` ``(77, D)`` scaled onto [min t / s, max t / s], plus ``t``.

    ``t = text_cond`` ``(77, D)``, ``s = textstrength`` (> 0). Minima and maxima are over all
    entries. Constant features map to the middle of the range instead of dividing by zero.
    """
    if not textstrength > 0:
        raise ParameterError(f"--textstrength {textstrength}: --normalize text-range divides by it, use a value > 0")
    lo, hi = text_cond.min() / textstrength, text_cond.max() / textstrength
    f_min, f_max = features.min(), features.max()
    if f_max > f_min:
        scaled = (features - f_min) * (hi - lo) / (f_max - f_min) + lo
    else:
        scaled = torch.full_like(features, float((lo + hi) / 2))
    return scaled + text_cond


def _as_float64(matrix: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``matrix`` as a float64 CPU tensor; :class:`ParameterError` unless it is 2-D."""
    tensor = torch.as_tensor(matrix).detach().to(device="cpu", dtype=torch.float64)
    if tensor.ndim != 2:
        raise ParameterError(f"a conditioning matrix must be (77, D), got shape {tuple(tensor.shape)}")
    return tensor


def blend_conditionings(weights: Sequence[tuple[str, float]],
                        cond_of: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The weighted sum of the prompts' conditionings ``(77, D)``: sum of ``weight * cond_of(prompt)``.

    ``cond_of`` is called once per distinct prompt (a prompt listed twice has its weights added).
    """
    if not weights:
        raise ParameterError("blending conditionings needs at least one (prompt, weight) pair")
    merged: dict[str, float] = {}
    for prompt, weight in weights:
        merged[prompt] = merged.get(prompt, 0.0) + weight
    return sum(weight * cond_of(prompt) for prompt, weight in merged.items())
