"""The music's envelopes at the video's frame rate, for music-reactive schedules (numpy + librosa).

Frame ``i`` covers the samples of :func:`sounddiffusion.sound.audio.frame_bounds` ``(i, fps)``, the very
slice the video renders frame ``i`` from. Every envelope is float64 ``(n_frames,)``, in [0, 1] but
for the counts ``beat_in_bar`` (and ``section``):

``rms``
    The slice's RMS level (:func:`sounddiffusion.sound.audio.slice_rms`): linear, 1.0 for a full-scale
    square wave. Left raw by default, so ``--rms_bend F`` is exactly a bend of ``F*rms``.
``onset``
    librosa's onset strength (mean over 128 mel bands of the rise in dB, 2048-sample window,
    512-sample hop; see :mod:`sounddiffusion.sound.onset_stream`), the largest value whose hop lies in
    the frame (hop ``k`` at sample ``512*k``, its time in librosa). The sound's start counts: a hit
    at t = 0 is an onset (capped at the strongest later one).
``beat``
    1 on a frame holding a beat, falling linearly to 0 just before the next beat (after the last
    beat: over one median beat interval). The beats are those of :func:`librosa.beat.beat_track`
    (run on the median-over-bands onset envelope, as librosa does) when they form a steady pulse,
    none otherwise (a pad, a drone), or those of an exact grid (``--bpm``); see
    :mod:`sounddiffusion.sound.beats`. ``bpm`` is the tracker's tempo (0 without a pulse) or the
    grid's.
``bar``, ``beat_in_bar``
    ``bar`` is ``beat`` over the downbeats only; ``beat_in_bar`` the number of the last beat in
    its bar, 0, 1, 2 ... ``beats_per_bar - 1`` (0 before the first beat): a count, not in [0, 1].
``low``, ``mid``, ``high``
    The level (RMS) of the part of the frame's Hann-windowed spectrum below 200 Hz, from 200 Hz
    up to 2000 Hz, and from 2000 Hz up: bass and kick; voice, chords and snare body; hats,
    cymbals and sibilants. Before rescaling low² + mid² + high² is about rms².
``centroid``
    The spectral centroid over the Nyquist frequency (0 = all at 0 Hz, 1 = all at sr/2): how bright.
``flux``
    The level (RMS) of the rise of the magnitude spectrum from the previous frame (the frame
    before frame 0 counts as silence).

Sections (``section``, ``section_start``) are added by :func:`sounddiffusion.sound.sections.with_sections`.

Each of :data:`ENVELOPE_NAMES` goes through :func:`smooth`: median filter -> envelope follower
(attack, release) -> gate -> rescale. The defaults (:data:`DEFAULT_SMOOTHING`) and why:

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import scipy.ndimage

from sounddiffusion.errors import AudioError, ParameterError
from sounddiffusion.sound.audio import (SAMPLE_RATE, fps_fraction, frame_count, frame_starts, iter_frame_slices,
                                        sound_blocks, sound_length, stream_frame_slices)
from sounddiffusion.sound.beats import BeatGrid, beat_envelopes, grid_beats, track_beats
from sounddiffusion.sound.frame_features import HIGH_HZ, LOW_HZ, frame_features, per_frame_max  # noqa: F401

log = logging.getLogger(__name__)

ENVELOPE_NAMES = ("rms", "onset", "beat", "low", "mid", "high", "centroid", "flux")
"""The envelopes every analysis gives, each smoothed (:data:`DEFAULT_SMOOTHING`), in [0, 1]."""
GRID_NAMES = ("bar", "beat_in_bar")
"""The bar envelopes every analysis gives too, from the beats, unsmoothed."""
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

    ``values[name]``: float64 ``(n_frames,)`` for each of :data:`ENVELOPE_NAMES` (in [0, 1]) and
    :data:`GRID_NAMES` (and ``section``, ``section_start`` once sections are added);
    ``beat_frames``: the frames holding a beat (int64, increasing); ``bpm``: the tempo (0 when
    there is no pulse); ``peaks``: float64 ``(n_frames, 2)``, the smallest and largest sample of
    each frame (to draw the waveform); ``grid``: the beat grid set or fitted to the tracked beats
    (None without a pulse), ``beats_pinned``: it was set (``--bpm``); ``beat_note``: one line on
    what the beats are; ``sections``: ``(seconds, label)`` of each section's start, the first at
    0 (empty when no sections were asked for); ``sound_samples``: the samples of the analysed
    length the sound itself filled (fewer when it ended earlier and silence was added)."""
    fps: Fraction
    n_frames: int
    bpm: float
    beat_frames: np.ndarray
    values: dict
    peaks: np.ndarray
    grid: BeatGrid | None = None
    beats_pinned: bool = False
    beat_note: str = ""
    sections: tuple = ()
    sound_samples: int | None = None

    def times(self) -> np.ndarray:
        """Start time of each frame in seconds, float64 ``(n_frames,)``."""
        return np.arange(self.n_frames, dtype=np.float64) / float(self.fps)

    def variables(self) -> dict[str, np.ndarray | float]:
        """What a schedule expression may name: the envelopes (with ``bar``, ``beat_in_bar`` and
        the sections' when present), ``bpm``, ``t`` (frame number), ``s`` (seconds), ``fps`` and
        ``max_f`` (number of frames)."""
        frames = np.arange(self.n_frames, dtype=np.float64)
        return {**self.values, "bpm": float(self.bpm), "t": frames, "s": self.times(),
                "fps": float(self.fps), "max_f": float(self.n_frames)}


def envelopes(audio: str | Path | np.ndarray, *, fps: float | Fraction, sr: int = SAMPLE_RATE,
              smoothing: Mapping[str, Smoothing] | None = None, grid: BeatGrid | None = None,
              beats_per_bar: int = 4, n_samples: int | None = None,
              on_block: Callable[[np.ndarray], None] | None = None) -> Envelopes:
    """The envelopes of ``audio`` (a sound file, or mono samples at ``sr``) at ``fps``.

    A file is decoded block by block, so a long song takes the memory of its per-frame values
    only. ``smoothing`` changes :data:`DEFAULT_SMOOTHING` for the envelopes it names. ``grid``
    replaces the beat tracker with an exact grid; without it tracked beats are numbered in bars
    of ``beats_per_bar``. ``n_samples``: analyse exactly that many samples, the sound cut there
    or continued with silence (a control track aligned to the main sound's time). ``on_block``
    is given each block of samples read (mono float32 at ``sr``, in order; the samples themselves
    for an array), so that another analysis shares the decoding. Raises :class:`AudioError` for
    an unreadable file or no samples, :class:`ParameterError` for a bad ``fps``."""
    rate = fps_fraction(fps)
    counted = [0]
    if isinstance(audio, (str, Path)):
        if n_samples is None:
            n_samples = sound_length(audio, sr)
        blocks = _counted(sound_blocks(audio, sr, warn_non_finite=False), counted, on_block)
        slices = stream_frame_slices(blocks, n_samples, rate, sr)
    else:
        y = _samples(audio)
        counted[0] = len(y)
        if on_block is not None:
            on_block(y)
        if n_samples is not None:
            y = np.pad(y[:n_samples], (0, max(0, n_samples - len(y))))
        n_samples, slices = len(y), iter_frame_slices(y, rate, sr)
    n_frames = frame_count(n_samples, rate, sr)
    starts = frame_starts(n_frames, rate, sr)
    raw, peaks, onset_mean, onset_median = frame_features(slices, n_frames, starts, n_samples, sr)
    raw["onset"] = per_frame_max(onset_mean, starts)
    beats = grid_beats(grid, starts, sr) if grid is not None else \
        track_beats(onset_median, onset_mean, starts, sr, beats_per_bar)
    chosen = {**DEFAULT_SMOOTHING, **(smoothing or {})}
    by_beats = beat_envelopes(beats, n_frames, float(rate))
    raw["beat"] = by_beats["beat"]
    values = {name: smooth(raw[name], chosen[name], rate) for name in ENVELOPE_NAMES}
    values.update({name: by_beats[name] for name in GRID_NAMES})
    return Envelopes(rate, n_frames, beats.bpm, beats.frames, values, peaks, beats.grid, beats.pinned, beats.note,
                     sound_samples=min(counted[0], n_samples))


def _counted(blocks, counter: list, on_block: Callable[[np.ndarray], None] | None = None):
    """``blocks`` passed on (and to ``on_block``), their samples added up in ``counter[0]`` as they go."""
    for block in blocks:
        counter[0] += len(block)
        if on_block is not None:
            on_block(block)
        yield block


SNAP_UNITS = ("beat", "bar", "section")
"""What ``--snap_prompts`` moves prompt times to: the frames where ``beat``, ``bar`` or
``section_start`` is 1."""


def snap_times(times_s: Sequence[float], envelopes: Envelopes, unit: str = "beat") -> list[float]:
    """Each time (seconds) moved to the start of the nearest frame where ``unit``'s envelope is 1
    (a beat, a downbeat, a section start; for ``--snap_prompts``).

    Times stay as they are, with a warning, when there is no such frame. Raises
    :class:`ParameterError` when two times land on the same one (the prompts would change at the
    same moment)."""
    if unit == "beat":
        frames = envelopes.beat_frames
    else:
        frames = np.flatnonzero(envelopes.values.get("bar" if unit == "bar" else "section_start", np.zeros(0)) == 1)
    if not len(frames):
        log.warning("no %ss found in the sound: prompt times are not snapped", unit)
        return [float(t) for t in times_s]
    targets = frames / float(envelopes.fps)
    snapped = [float(targets[np.argmin(np.abs(targets - t))]) for t in times_s]
    for before, after, time in zip(snapped, snapped[1:], times_s[1:]):
        if after <= before:
            grid = envelopes.grid
            spacing = (f" ({grid.period * (grid.beats_per_bar if unit == 'bar' else 1):.3g} s)"
                       if unit != "section" and grid is not None else "")
            raise ParameterError(f"--snap_prompts {unit}: the prompt at {time:g} s lands on the {unit} at "
                                 f"{after:g} s as the one before it; space the prompts at least one "
                                 f"{unit}{spacing} apart")
    return snapped


def snap_to_beats(times_s: Sequence[float], envelopes: Envelopes) -> list[float]:
    """:func:`snap_times` to beats."""
    return snap_times(times_s, envelopes, "beat")


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
