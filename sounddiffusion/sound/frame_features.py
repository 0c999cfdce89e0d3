"""The raw per-frame values behind the envelopes (:mod:`sounddiffusion.sound.analysis`), computed
one video frame slice at a time: level, band levels, centroid, flux and the waveform's extremes
(:class:`FrameFeatures`), and the hop-rate onset envelopes of :class:`~sounddiffusion.sound.onset_stream.OnsetStream`
taken per frame (:func:`per_frame_max`). numpy + librosa's mel filters; no torch.
"""
from __future__ import annotations

import math

import numpy as np

from sounddiffusion.sound.audio import SAMPLE_RATE, slice_rms
from sounddiffusion.sound.beats import frames_of_samples
from sounddiffusion.sound.onset_stream import HOP, OnsetStream

LOW_HZ = 200.0
"""Upper edge of ``low`` and lower edge of ``mid`` (Hz)."""
HIGH_HZ = 2000.0
"""Upper edge of ``mid`` and lower edge of ``high`` (Hz)."""

FRAME_FEATURES = ("rms", "low", "mid", "high", "centroid", "flux")


class FrameFeatures:
    """The raw per-frame values of :data:`FRAME_FEATURES` and the (min, max) sample, one video frame
    slice at a time (:meth:`push`): each frame needs only its own slice and the previous frame's
    spectrum, so a live input can be analysed as it arrives. ``n_fft``: the spectrum's size (the
    longest frame's samples)."""

    def __init__(self, n_fft: int, sr: int = SAMPLE_RATE):
        self.n_fft, self.sr = n_fft, sr
        self.frequencies = np.fft.rfftfreq(n_fft, 1.0 / sr)
        self.doubled = np.full(len(self.frequencies), 2.0)
        self.doubled[0] = 1.0
        if n_fft % 2 == 0:
            self.doubled[-1] = 1.0
        f = self.frequencies
        self.bands = (f < LOW_HZ, (f >= LOW_HZ) & (f < HIGH_HZ), f >= HIGH_HZ)
        self.windows: dict[int, tuple[np.ndarray, float]] = {}
        self.previous = np.zeros(len(f))  # the frame before the first counts as silence

    def push(self, piece: np.ndarray) -> tuple[dict[str, float], tuple[float, float]]:
        """(raw value of each of :data:`FRAME_FEATURES`, (min, max) sample) of the next frame's slice."""
        if len(piece) not in self.windows:
            window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(len(piece)) / len(piece))
            self.windows[len(piece)] = (window, self.n_fft * float(np.sum(window ** 2)) or 1.0)
        window, scale = self.windows[len(piece)]
        power = np.abs(np.fft.rfft(piece * window, n=self.n_fft)) ** 2 * self.doubled / scale
        values = {"rms": slice_rms(piece)}
        for name, band in zip(("low", "mid", "high"), self.bands):
            values[name] = math.sqrt(power[band].sum())
        total = power.sum()
        values["centroid"] = float(self.frequencies @ power) / total / (self.sr / 2) if total > 0 else 0.0
        magnitude = np.sqrt(power)
        values["flux"] = math.sqrt(float(np.sum(np.maximum(0.0, magnitude - self.previous) ** 2)))
        self.previous = magnitude
        return values, ((float(piece.min()), float(piece.max())) if len(piece) else (0.0, 0.0))


def frame_features(slices, n_frames: int, starts: np.ndarray, n_samples: int, sr: int):
    """Raw rms, low, mid, high, centroid and flux per frame, the (min, max) sample per frame and
    the hop-rate onset envelopes (mean and median over mel bands)."""
    features = FrameFeatures(int(np.max(np.diff(starts))) if n_frames else 1, sr)
    raw = {name: np.zeros(n_frames) for name in FRAME_FEATURES}
    peaks = np.zeros((n_frames, 2))
    onsets = OnsetStream(n_samples, sr)
    for i, piece in enumerate(slices):
        onsets.push(piece)
        values, peaks[i] = features.push(piece)
        for name, value in values.items():
            raw[name][i] = value
    onset_mean, onset_median = onsets.finish()
    return raw, peaks, onset_mean, onset_median


def per_frame_max(hop_values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The largest hop value in each frame; a frame shorter than a hop with no hop of its own
    takes the hop nearest its middle."""
    n_frames = len(starts) - 1
    # hop k belongs to the frame holding sample 512*k, its time in librosa (frames_to_time)
    frames = frames_of_samples(np.arange(len(hop_values), dtype=np.int64) * HOP, starts)
    result = np.zeros(n_frames)
    np.maximum.at(result, frames, hop_values)
    empty = np.flatnonzero(np.bincount(frames, minlength=n_frames) == 0)
    if len(empty) and len(hop_values):
        middle = (starts[empty] + starts[empty + 1]) / 2
        result[empty] = hop_values[np.clip(np.round(middle / HOP).astype(np.int64), 0, len(hop_values) - 1)]
    return result
