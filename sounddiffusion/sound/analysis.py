"""The music's envelopes at the video's frame rate, for music-reactive schedules (numpy + librosa).

Frame ``i`` covers the samples of :func:`sounddiffusion.sound.audio.frame_bounds` ``(i, fps)``, the very
slice the video renders frame ``i`` from. Every envelope is float64 ``(n_frames,)`` in [0, 1]:

``rms``
    The slice's RMS level (:func:`sounddiffusion.sound.audio.slice_rms`): linear, 1.0 for a full-scale
    square wave. Left raw by default, so ``--rms_bend F`` is exactly a bend of ``F*rms``.
``onset``
    librosa's onset strength (mean over 128 mel bands of the rise in dB, 2048-sample window,
    512-sample hop; see :mod:`sounddiffusion.sound.onset_stream`), the largest value whose hop lies in
    the frame (hop ``k`` at sample ``512*k``, its time in librosa).
``beat``
    1 on a frame holding a beat of :func:`librosa.beat.beat_track` (run on the median-over-bands
    onset envelope, as librosa does), falling linearly to 0 just before the next beat (after the
    last beat: over one median beat interval). ``bpm`` is the same tracker's tempo.
``low``, ``mid``, ``high``
    The level (RMS) of the part of the frame's Hann-windowed spectrum below 200 Hz, from 200 Hz
    up to 2000 Hz, and from 2000 Hz up: bass and kick; voice, chords and snare body; hats,
    cymbals and sibilants. Before rescaling low² + mid² + high² is about rms².
``centroid``
    The spectral centroid over the Nyquist frequency (0 = all at 0 Hz, 1 = all at sr/2): how bright.
``flux``
    The level (RMS) of the rise of the magnitude spectrum from the previous frame (the frame
    before frame 0 counts as silence).

Each goes through :func:`smooth`: median filter -> envelope follower (attack, release) -> gate ->
rescale. The defaults (:data:`DEFAULT_SMOOTHING`) and why:

=========  ======  ======  =======  ====  =======  ===========================================
envelope   median  attack  release  gate  rescale  why
=========  ======  ======  =======  ====  =======  ===========================================
rms        1       0       0        0     none     raw, so ``--rms_bend`` keeps its exact frames
onset      1       0       0.1 s    0     peak     a hit must peak on its own frame (no median,
                                                   instant attack); a short tail reads as motion
beat       1       0       0        0     none     already shaped: 1 on the beat, then falling
low/mid/   1       0       0.15 s   0     peak     hits land on their frame; the release stops
high                                               a 12-30 fps picture from flickering
centroid   5       0       0        0     minmax   the centroid jumps on single frames between
                                                   notes; timing matters little for brightness
flux       1       0       0.1 s    0     peak     like onset
=========  ======  ======  =======  ====  =======  ===========================================

Change them with :func:`parse_smoothing` (``--smoothing "onset:release=0.3;centroid:median=9"``).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from pathlib import Path

import librosa
import numpy as np
import scipy.ndimage

from sounddiffusion.errors import AudioError, ParameterError
from sounddiffusion.sound.audio import (SAMPLE_RATE, fps_fraction, frame_count, iter_frame_slices, sound_blocks,
                                        sound_length, stream_frame_slices)
from sounddiffusion.sound.frame_features import MEASURES, FrameMeasures
from sounddiffusion.sound.onset_stream import HOP, OnsetStream

log = logging.getLogger(__name__)

ENVELOPE_NAMES = ("rms", "onset", "beat", "low", "mid", "high", "centroid", "flux")
RESCALES = ("peak", "minmax", "none")


@dataclass(frozen=True)
class Smoothing:
    """How one envelope is smoothed (see :func:`smooth`).

    ``median``: frames of the median filter (odd; 1 = off). ``attack``, ``release``: time
    constants of the envelope follower in seconds (0 = follow at once). ``gate``: values below it
    become 0 (in the envelope's own units, before rescaling). ``rescale``: ``"peak"`` divides by
    the largest value, ``"minmax"`` maps the smallest to 0 and the largest to 1, ``"none"`` only
    clips to [0, 1]."""
    median: int = 1
    attack: float = 0.0
    release: float = 0.0
    gate: float = 0.0
    rescale: str = "peak"

    def __post_init__(self):
        if isinstance(self.median, bool) or not isinstance(self.median, (int, np.integer)) \
                or self.median < 1 or self.median % 2 == 0:
            raise ParameterError(f"median {self.median!r}: use an odd whole number of frames (1 = off)")
        for name in ("attack", "release", "gate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ParameterError(f"{name} {value!r}: use a number, 0 or more")
        if self.rescale not in RESCALES:
            raise ParameterError(f"rescale {self.rescale!r}: use one of {', '.join(RESCALES)}")


_SHORT_TAIL = Smoothing(release=0.1)
DEFAULT_SMOOTHING: dict[str, Smoothing] = {
    "rms": Smoothing(rescale="none"),
    "onset": _SHORT_TAIL,
    "beat": Smoothing(rescale="none"),
    "low": Smoothing(release=0.15),
    "mid": Smoothing(release=0.15),
    "high": Smoothing(release=0.15),
    "centroid": Smoothing(median=5, rescale="minmax"),
    "flux": _SHORT_TAIL,
}
"""The smoothing of each envelope unless the user changes it (reasons in the module docstring)."""

_SMOOTHING_FORM = (f"expected ENVELOPE:KEY=VALUE,KEY=VALUE;... with ENVELOPE one of "
                   f"{', '.join(ENVELOPE_NAMES)} and KEY one of median (odd whole number), attack, "
                   f"release (seconds), gate (0 or more), rescale ({', '.join(RESCALES)})")


def parse_smoothing(text: str) -> dict[str, Smoothing]:
    """The smoothing of every envelope: :data:`DEFAULT_SMOOTHING` with the changes in ``text``
    (the ``--smoothing`` flag), e.g. ``"onset:median=1,attack=0,release=0.15,gate=0.05;centroid:median=5"``.

    Raises :class:`ParameterError` (one line naming ``--smoothing``, the text and the form)."""
    result = dict(DEFAULT_SMOOTHING)
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        name, colon, settings = entry.partition(":")
        name = name.strip()
        problem = None if name in ENVELOPE_NAMES and colon else f"'{entry}' names no envelope"
        changes = {}
        for item in filter(None, (part.strip() for part in settings.split(","))):
            key, equals, value = (part.strip() for part in item.partition("="))
            changes[key] = value
            if not equals or key not in {f.name for f in fields(Smoothing)}:
                problem = problem or f"'{item}' is not KEY=VALUE with a known KEY"
        try:
            if problem is None:
                result[name] = replace(result[name], **{key: _setting(key, value) for key, value in changes.items()})
        except (ValueError, ParameterError) as err:
            problem = f"{name}: {err}"
        if problem:
            raise ParameterError(f'--smoothing "{text}": {problem}; {_SMOOTHING_FORM}')
    return result


def _setting(key: str, value: str) -> int | float | str:
    if key == "rescale":
        return value
    if key == "median":
        return int(value)
    return float(value)


def smooth(values: np.ndarray, smoothing: Smoothing, fps: float | Fraction) -> np.ndarray:
    """``values`` (one per frame, ``(n,)``) through median filter -> envelope follower -> gate ->
    rescale; float64 ``(n,)`` in [0, 1].

    The follower is one pole per direction: ``y[i] = y[i-1] + (1 - a) * (x[i] - y[i-1])`` with
    ``a = exp(-1 / (seconds * fps))`` for the attack while rising and the release while falling,
    starting from 0; 0 seconds follows at once. With everything off and ``rescale="none"`` the
    values come back unchanged (clipped to [0, 1])."""
    x = np.array(values, dtype=np.float64)
    if smoothing.median > 1 and len(x):
        x = scipy.ndimage.median_filter(x, size=smoothing.median, mode="nearest")
    if (smoothing.attack or smoothing.release) and len(x):
        x = _follow(x, follower_pole(smoothing.attack, fps), follower_pole(smoothing.release, fps))
    if smoothing.gate:
        x[x < smoothing.gate] = 0.0
    if smoothing.rescale == "peak":
        top = x.max(initial=0.0)
        x = x / top if top > 0 else np.zeros_like(x)
    elif smoothing.rescale == "minmax" and len(x):
        low, high = x.min(), x.max()
        x = (x - low) / (high - low) if high > low else np.zeros_like(x)
    return np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def follower_pole(seconds: float, fps: float | Fraction) -> float:
    """The envelope follower's pole ``a = exp(-1 / (seconds * fps))`` (0 for 0 seconds)."""
    return math.exp(-1.0 / (seconds * float(fps))) if seconds > 0 else 0.0


def follow_step(level: float, value: float, attack: float, release: float) -> float:
    """One frame of the envelope follower: ``level + (1 - a) * (value - level)`` with ``a`` the
    ``attack`` pole while rising and the ``release`` pole while falling."""
    pole = attack if value > level else release
    return level + (1.0 - pole) * (value - level)


def _follow(x: np.ndarray, attack: float, release: float) -> np.ndarray:
    out, level = np.empty_like(x), 0.0
    for i, value in enumerate(x.tolist()):
        level = follow_step(level, value, attack, release)
        out[i] = level
    return out


@dataclass(frozen=True, eq=False)
class Envelopes:
    """The envelopes of one sound at ``fps`` frames per second.

    ``values[name]``: float64 ``(n_frames,)`` in [0, 1] for each of :data:`ENVELOPE_NAMES`;
    ``beat_frames``: the frames holding a beat (int64, increasing); ``bpm``: the tracked tempo
    (0 when no beat was found); ``peaks``: float64 ``(n_frames, 2)``, the smallest and largest
    sample of each frame (to draw the waveform)."""
    fps: Fraction
    n_frames: int
    bpm: float
    beat_frames: np.ndarray
    values: dict
    peaks: np.ndarray

    def times(self) -> np.ndarray:
        """Start time of each frame in seconds, float64 ``(n_frames,)``."""
        return np.arange(self.n_frames, dtype=np.float64) / float(self.fps)

    def variables(self) -> dict[str, np.ndarray | float]:
        """What a schedule expression may name: the envelopes, ``bpm``, ``t`` (frame number),
        ``s`` (seconds), ``fps`` and ``max_f`` (number of frames)."""
        frames = np.arange(self.n_frames, dtype=np.float64)
        return {**self.values, "bpm": float(self.bpm), "t": frames, "s": self.times(),
                "fps": float(self.fps), "max_f": float(self.n_frames)}


def envelopes(audio: str | Path | np.ndarray, *, fps: float | Fraction, sr: int = SAMPLE_RATE,
              smoothing: Mapping[str, Smoothing] | None = None) -> Envelopes:
    """The envelopes of ``audio`` (a sound file, or mono samples at ``sr``) at ``fps``.

    A file is decoded block by block, so a long song takes the memory of its per-frame values
    only. ``smoothing`` changes :data:`DEFAULT_SMOOTHING` for the envelopes it names. Raises
    :class:`AudioError` for an unreadable file or no samples, :class:`ParameterError` for a bad
    ``fps``."""
    rate = fps_fraction(fps)
    if isinstance(audio, (str, Path)):
        n_samples = sound_length(audio, sr)
        slices = stream_frame_slices(sound_blocks(audio, sr, warn_non_finite=False), n_samples, rate, sr)
    else:
        y = _samples(audio)
        n_samples, slices = len(y), iter_frame_slices(y, rate, sr)
    n_frames = frame_count(n_samples, rate, sr)
    starts = np.arange(n_frames + 1, dtype=np.int64) * (sr * rate.denominator) // rate.numerator
    raw, peaks, onset_mean, onset_median = _frame_features(slices, n_frames, starts, n_samples, sr)
    raw["onset"] = _per_frame_max(onset_mean, starts)
    bpm, beat_frames = _beats(onset_median, starts, sr)
    beat_period = 60.0 / bpm * float(rate) if bpm > 0 else 1.0
    raw["beat"] = _beat_envelope(beat_frames, n_frames, beat_period)
    chosen = {**DEFAULT_SMOOTHING, **(smoothing or {})}
    values = {name: smooth(raw[name], chosen[name], rate) for name in ENVELOPE_NAMES}
    return Envelopes(rate, n_frames, bpm, beat_frames, values, peaks)


def snap_to_beats(times_s: Sequence[float], envelopes: Envelopes) -> list[float]:
    """Each time (seconds) moved to the start of the nearest beat frame (for ``--snap_prompts beat``).

    Times stay as they are when the sound has no beats. Raises :class:`ParameterError` when two
    times land on the same beat (the prompts would change at the same moment)."""
    if not len(envelopes.beat_frames):
        log.warning("no beats found in the sound: prompt times are not snapped")
        return [float(t) for t in times_s]
    beats = envelopes.beat_frames / float(envelopes.fps)
    snapped = [float(beats[np.argmin(np.abs(beats - t))]) for t in times_s]
    for before, after, time in zip(snapped, snapped[1:], times_s[1:]):
        if after <= before:
            raise ParameterError(f"--snap_prompts beat: the prompt at {time:g} s lands on the beat at "
                                 f"{after:g} s as the one before it; space the prompts at least one "
                                 f"beat ({60 / envelopes.bpm:.3g} s) apart")
    return snapped


def _samples(audio: np.ndarray) -> np.ndarray:
    """``audio`` as mono float32 with non-finite samples made silent."""
    y = np.array(audio, dtype=np.float32).reshape(-1) if np.ndim(audio) <= 1 else None
    if y is None:
        raise AudioError(f"audio of shape {np.shape(audio)}: give mono samples (one dimension)")
    if not len(y):
        raise AudioError("the audio holds no samples: give a sound that contains samples")
    bad = ~np.isfinite(y)
    if bad.any():
        log.warning("%d non-finite samples (NaN or inf) replaced with silence", int(bad.sum()))
        y[bad] = 0
    return y


def _frame_features(slices, n_frames: int, starts: np.ndarray, n_samples: int, sr: int):
    """Raw rms, low, mid, high, centroid and flux per frame, the (min, max) sample per frame and
    the hop-rate onset envelopes (mean and median over mel bands)."""
    measures = FrameMeasures(int(np.max(np.diff(starts))) if n_frames else 1, sr)
    raw = {name: np.zeros(n_frames) for name in MEASURES}
    peaks = np.zeros((n_frames, 2))
    onsets = OnsetStream(n_samples, sr)
    for i, piece in enumerate(slices):
        onsets.push(piece)
        for name, value in measures.measure(piece).items():
            raw[name][i] = value
        peaks[i] = (piece.min(), piece.max()) if len(piece) else (0.0, 0.0)
    onset_mean, onset_median = onsets.finish()
    return raw, peaks, onset_mean, onset_median


def _hop_frames(n_hops: int, starts: np.ndarray) -> np.ndarray:
    """The video frame of each onset hop: the frame holding sample ``512*k``, the hop's time in
    librosa (``librosa.frames_to_time``)."""
    positions = np.arange(n_hops, dtype=np.int64) * HOP
    return np.clip(np.searchsorted(starts, positions, side="right") - 1, 0, len(starts) - 2)


def _per_frame_max(hop_values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The largest hop value in each frame; a frame shorter than a hop with no hop of its own
    takes the hop nearest its middle."""
    n_frames = len(starts) - 1
    frames = _hop_frames(len(hop_values), starts)
    result = np.zeros(n_frames)
    np.maximum.at(result, frames, hop_values)
    empty = np.flatnonzero(np.bincount(frames, minlength=n_frames) == 0)
    if len(empty) and len(hop_values):
        middle = (starts[empty] + starts[empty + 1]) / 2
        result[empty] = hop_values[np.clip(np.round(middle / HOP).astype(np.int64), 0, len(hop_values) - 1)]
    return result


def _beats(onset_median: np.ndarray, starts: np.ndarray, sr: int) -> tuple[float, np.ndarray]:
    """(tempo in beats per minute, increasing frames holding a beat) from librosa's tracker."""
    if not onset_median.any():
        return 0.0, np.zeros(0, dtype=np.int64)
    tempo = _tempo(onset_median, sr)
    _, hops = librosa.beat.beat_track(onset_envelope=onset_median, sr=sr, hop_length=HOP, bpm=tempo)
    frames = np.unique(_hop_frames(len(onset_median), starts)[np.asarray(hops, dtype=np.int64)])
    return tempo, frames.astype(np.int64)


def _tempo(onset_median: np.ndarray, sr: int, chunk: int = 1024) -> float:
    """librosa's global tempo estimate (:func:`librosa.feature.tempo`: the mean autocorrelation
    tempogram over 8-s windows, weighted by a prior around 120 bpm), with the tempogram built
    ``chunk`` columns at a time: librosa builds it whole, about 34 kB per hop (1.8 GB for
    10 minutes). Each column sees only its own window, so the columns are librosa's."""
    window = int(librosa.time_to_frames(8.0, sr=sr, hop_length=HOP))
    n = len(onset_median)
    total = None
    for start in range(0, n, chunk):
        lo, hi = max(0, start - window), min(n, start + chunk + window)
        # with real values as margins, the kept columns are exactly librosa's
        columns = librosa.feature.tempogram(onset_envelope=onset_median[lo:hi], sr=sr, hop_length=HOP,
                                            win_length=window)
        part = columns[:, start - lo: min(start + chunk, n) - lo].sum(axis=1)
        total = part if total is None else total + part
    mean = (total / n)[:, None]
    return float(np.atleast_1d(librosa.feature.tempo(tg=mean, sr=sr, hop_length=HOP))[0])


def _beat_envelope(beat_frames: np.ndarray, n_frames: int, period: float) -> np.ndarray:
    """1 on each beat frame, falling linearly to 0 just before the next; after the last beat it
    falls over the median beat interval (``period`` frames, the tempo's, for a single beat)."""
    result = np.zeros(n_frames)
    if not len(beat_frames):
        return result
    gaps = np.diff(beat_frames)
    last_gap = max(1, int(np.median(gaps)) if len(gaps) else round(period))
    for start, gap in zip(beat_frames, [*gaps.tolist(), last_gap]):
        end = min(start + gap, n_frames)
        result[start:end] = 1.0 - np.arange(end - start) / gap
    return result
