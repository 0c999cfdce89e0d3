"""The raw per-frame measures behind the envelopes, one video frame's slice at a time (numpy only).

:class:`FrameMeasures` keeps what a measure needs from earlier frames (the previous magnitude
spectrum for ``flux``), so the same numbers come out whether a file is analysed after the fact
(:func:`sounddiffusion.sound.analysis.envelopes`) or a live sound as it arrives
(:mod:`sounddiffusion.live.envelopes`). Definitions in :mod:`sounddiffusion.sound.analysis`.
"""
from __future__ import annotations

import math

import numpy as np

from sounddiffusion.sound.audio import slice_rms

LOW_HZ = 200.0
"""Upper edge of ``low`` and lower edge of ``mid`` (Hz)."""
HIGH_HZ = 2000.0
"""Upper edge of ``mid`` and lower edge of ``high`` (Hz)."""
MEASURES = ("rms", "low", "mid", "high", "centroid", "flux")
"""What :meth:`FrameMeasures.measure` gives for each frame."""


class FrameMeasures:
    """Raw rms, low, mid, high, centroid and flux of consecutive frame slices at ``sr``.

    ``n_fft``: the FFT length every slice is zero-padded to (the longest slice's length), so
    that band edges fall on the same bins for every frame."""

    def __init__(self, n_fft: int, sr: int):
        self.n_fft, self.sr = n_fft, sr
        self.frequencies = np.fft.rfftfreq(n_fft, 1.0 / sr)
        # one-sided power: every bin but DC (and Nyquist for an even n_fft) stands for two
        self.doubled = np.full(len(self.frequencies), 2.0)
        self.doubled[0] = 1.0
        if n_fft % 2 == 0:
            self.doubled[-1] = 1.0
        f = self.frequencies
        self.bands = (f < LOW_HZ, (f >= LOW_HZ) & (f < HIGH_HZ), f >= HIGH_HZ)
        self.windows: dict[int, tuple[np.ndarray, float]] = {}
        self.previous = np.zeros(len(f))  # the frame before the first counts as silence

    def measure(self, piece: np.ndarray) -> dict[str, float]:
        """The next frame's raw measures from its samples ``piece`` (float32 ``(n,)``, n <= n_fft)."""
        raw = {"rms": slice_rms(piece)}
        if len(piece) not in self.windows:
            window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(len(piece)) / len(piece))
            self.windows[len(piece)] = (window, self.n_fft * float(np.sum(window ** 2)) or 1.0)
        window, scale = self.windows[len(piece)]
        power = np.abs(np.fft.rfft(piece * window, n=self.n_fft)) ** 2 * self.doubled / scale
        for name, band in zip(("low", "mid", "high"), self.bands):
            raw[name] = math.sqrt(power[band].sum())
        total = power.sum()
        raw["centroid"] = float(self.frequencies @ power) / total / (self.sr / 2) if total > 0 else 0.0
        magnitude = np.sqrt(power)
        raw["flux"] = math.sqrt(float(np.sum(np.maximum(0.0, magnitude - self.previous) ** 2)))
        self.previous = magnitude
        return raw
