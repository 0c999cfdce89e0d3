"""Colour and tone of the chained picture, against colour drift and burn-in in chained img2img videos.

- :func:`match_colors` (``--color_coherence lab|hsv|rgb``): the previous picture's per-channel
  histograms are matched to a reference picture's before the next img2img step, as Deforum's
  ``maintain_colors`` does, blended by a strength.
- :func:`adjust_contrast` (``--contrast F``): the spread of the chained picture or latent about
  its mean, scaled before the next img2img step.

Both return their input unchanged (bit-identical values) at their neutral setting (strength 0,
factor 1), so a flag left at its default changes nothing.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from sounddiffusion.errors import ParameterError

COLOR_SPACES = ("lab", "hsv", "rgb")
_HUE_BINS = 360


def match_colors(rgb: np.ndarray, reference: np.ndarray, *, space: str,
                 strength: float = 1.0) -> np.ndarray:
    """``rgb`` with its colour distribution moved towards ``reference``'s.

    ``rgb``, ``reference``: (H, W, 3) uint8 pictures (sizes may differ). Each channel of ``rgb``
    in ``space`` ("lab": L*, a*, b*; "hsv"; "rgb") is histogram-matched to the same channel of
    ``reference`` (``skimage.exposure.match_histograms``), the result converted back to RGB, and
    blended with ``rgb`` in RGB: ``rgb + strength * (matched - rgb)``, rounded. ``strength``
    0..1: 0 returns a copy of ``rgb`` (bit-identical), 1 the matched picture.

    HSV hue is an angle, so matching it as a line would send hues across the red wrap-around
    (0.99 and 0.01 are neighbours). The hue circle is cut where the two pictures together have
    the fewest pixels (the emptiest of 360 one-degree bins), hues are matched along the circle
    opened there and then put back on it.

    Returns (H, W, 3) uint8. Raises :class:`ParameterError` for an unknown ``space`` or a
    ``strength`` outside [0, 1].
    """
    if space not in COLOR_SPACES:
        raise ParameterError(f"colour space {space!r} is unknown: use one of {', '.join(COLOR_SPACES)}")
    if not 0.0 <= strength <= 1.0:
        raise ParameterError(f"colour coherence strength {strength} is outside [0, 1]: "
                             f"0 keeps the picture, 1 matches it fully")
    _check_picture(rgb, "picture")
    _check_picture(reference, "reference picture")
    if strength == 0:
        return rgb.copy()
    matched = _matched_rgb(rgb, reference, space)
    blended = rgb + strength * (matched - rgb)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _check_picture(rgb: np.ndarray, what: str) -> None:
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"the {what} must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")


def _matched_rgb(rgb: np.ndarray, reference: np.ndarray, space: str) -> np.ndarray:
    """The fully matched picture as float64 RGB on 0..255."""
    from skimage import color
    from skimage.exposure import match_histograms

    if space == "rgb":
        return match_histograms(rgb, reference, channel_axis=-1).astype(np.float64)
    if space == "lab":
        matched = match_histograms(color.rgb2lab(rgb), color.rgb2lab(reference), channel_axis=-1)
        with warnings.catch_warnings():
            # Matched Lab values may leave the RGB gamut; they are clipped below, as intended.
            warnings.simplefilter("ignore", UserWarning)
            return np.clip(color.lab2rgb(matched), 0, 1) * 255.0
    hsv, reference_hsv = color.rgb2hsv(rgb), color.rgb2hsv(reference)
    cut = _emptiest_hue(hsv[..., 0], reference_hsv[..., 0])
    hsv[..., 0] = (hsv[..., 0] - cut) % 1.0
    reference_hsv[..., 0] = (reference_hsv[..., 0] - cut) % 1.0
    matched = match_histograms(hsv, reference_hsv, channel_axis=-1)
    matched[..., 0] = (matched[..., 0] + cut) % 1.0
    return np.clip(color.hsv2rgb(matched), 0, 1) * 255.0


def _emptiest_hue(*hues: np.ndarray) -> float:
    """The start (0..1) of the one-degree hue bin holding the fewest pixels of all ``hues``."""
    counts = sum(np.histogram(h, bins=_HUE_BINS, range=(0.0, 1.0))[0] for h in hues)
    return float(np.argmin(counts)) / _HUE_BINS


def adjust_contrast(x, factor: float):
    """Scale the spread of values about their mean by ``factor``: ``(x - mean) · F + mean``.

    ``--contrast F`` applies this to the chained picture or latent before each img2img step.
    Chained img2img tends to build contrast up frame after frame (burn-in); F slightly below 1
    (0.98..0.995) takes some back each step, F = 1 changes nothing. Unlike Deforum, which
    multiplies the previous picture's values by its contrast schedule and so changes its
    brightness too, the mean stays, so this adds no colour drift.

    ``x``: an (H, W, 3) uint8 picture (mean per colour channel; result rounded and clipped to
    uint8) or a latent tensor (N, C, H, W) (mean per sample and channel over the pixels).
    Returns a new array or tensor of the same type, shape and dtype; F = 1 returns a copy.
    Raises :class:`ParameterError` when ``factor`` is negative.
    """
    if not factor >= 0:
        raise ParameterError(f"--contrast {factor}: use a factor of 0 or more (1 keeps the contrast)")
    if isinstance(x, torch.Tensor):
        if factor == 1:
            return x.clone()
        mean = x.mean(dim=(-2, -1), keepdim=True)
        return (x - mean) * factor + mean
    _check_picture(x, "picture")
    if factor == 1:
        return x.copy()
    values = x.astype(np.float64)
    mean = values.mean(axis=(0, 1), keepdims=True)
    return np.clip(np.rint((values - mean) * factor + mean), 0, 255).astype(np.uint8)
