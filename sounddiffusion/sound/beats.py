"""Beats at the video's frame rate: librosa's tracker with a steady-pulse check, or an exact grid
the user sets (``--bpm``, ``--beat_offset``, ``--beats_per_bar``); and the ``beat``, ``bar`` and
``beat_in_bar`` envelopes (numpy + librosa).

Tracker
    :func:`librosa.beat.beat_track` on the median-over-bands onset envelope, at librosa's global
    tempo (:func:`tempo`). Its beats count as a **steady pulse** only when there are at least
    :data:`MIN_BEATS` of them and the onset strength on them (librosa's mean rise in dB, the
    largest within two hops of each beat, median over the beats) is at least
    :data:`MIN_BEAT_DB` dB and :data:`MIN_BEAT_CONTRAST` times the median of the whole onset
    envelope. Held sounds fail it: the tracker places beats on a pad's slow fluctuations, which
    rise less than that, where clicks, a voice or an organ riff rise well above it (the note
    prints the rise; tests/test_music_analysis.py checks held sounds, clicks and recordings).
    Without a pulse there are no beats: ``beat``, ``bar`` and ``beat_in_bar`` stay 0 and the
    tempo is 0. With one, :func:`fit_grid` fits an exact grid to the tracked beats (a robust
    line through beat time against beat number): its tempo and first beat are what ``--bpm`` and
    ``--beat_offset`` take to pin the beats.
Grid
    Beats at ``beat_offset + k * 60 / bpm`` seconds for every whole ``k`` with a time from 0 up
    to the sound's end (before ``beat_offset`` too: a pickup), beat ``k`` being beat
    ``k mod beats_per_bar`` of its bar, so ``beat_offset`` is a downbeat. Without a grid the
    tracked beats are numbered by the fitted grid, so pinning it keeps the bars.

A beat lies on the video frame holding its sample (``round(time * sr)``), as the envelopes' other
events do. Every function works on any stretch of frames given by their first samples, so a
grid's envelopes can be computed frame by frame as a sound arrives (the tracker cannot: it
needs the whole onset envelope).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import librosa
import numpy as np
import scipy.stats

from sounddiffusion.errors import ParameterError
from sounddiffusion.sound.onset_stream import HOP

MIN_BEATS = 3
"""Fewer tracked beats than this are no steady pulse (three beats show two equal intervals)."""
MIN_BEAT_DB = 2.0
"""Median onset strength (mean rise over mel bands, dB) the tracked beats must reach."""
MIN_BEAT_CONTRAST = 2.0
"""... and how many times the median of the whole onset envelope it must be."""
MAX_BPM = 1000.0
MAX_BEATS_PER_BAR = 64


@dataclass(frozen=True)
class BeatGrid:
    """An exact beat grid: ``bpm`` beats per minute, a downbeat at ``offset`` seconds and
    ``beats_per_bar`` beats a bar. Raises :class:`ParameterError` naming the flag of a bad value."""

    bpm: float
    offset: float = 0.0
    beats_per_bar: int = 4

    def __post_init__(self):
        if not isinstance(self.bpm, (int, float)) or not 0 < self.bpm <= MAX_BPM:
            raise ParameterError(f"--bpm {self.bpm:g}: use a tempo above 0 and at most {MAX_BPM:g} "
                                 f"beats per minute, e.g. --bpm 120")
        if not math.isfinite(self.offset) or self.offset < 0:
            raise ParameterError(f"--beat_offset {self.offset:g}: use the time of a downbeat in seconds, "
                                 f"0 or more, e.g. --beat_offset 0.42")
        if isinstance(self.beats_per_bar, bool) or not 1 <= self.beats_per_bar <= MAX_BEATS_PER_BAR:
            raise ParameterError(f"--beats_per_bar {self.beats_per_bar}: use a whole number from 1 to "
                                 f"{MAX_BEATS_PER_BAR}, e.g. 4 (or 3 for a waltz)")

    @property
    def period(self) -> float:
        """Seconds between beats."""
        return 60.0 / self.bpm

    def beats(self, duration: float) -> tuple[np.ndarray, np.ndarray]:
        """(times in seconds, float64; beat numbers ``k``, int64) of the grid's beats from 0 up to
        ``duration`` seconds (excluded), in order."""
        first = -math.floor(self.offset / self.period + 1e-9)
        count = max(0, math.ceil((duration - self.offset) / self.period - 1e-9) - first)
        numbers = np.arange(first, first + count, dtype=np.int64)
        return self.offset + numbers * self.period, numbers

    def flags(self) -> str:
        """The flags that set this grid (what a user copies to pin tracked beats)."""
        return f"--bpm {self.bpm:g} --beat_offset {self.offset:g}"


@dataclass(frozen=True)
class Beats:
    """A sound's beats: ``frames`` (int64, increasing, one per frame at most), ``in_bar`` (each
    beat's number in its bar, 0 = downbeat), ``bpm`` (the tracker's tempo estimate, or the
    grid's; 0 without a pulse), ``grid`` (the grid set, or the one fitted to the tracked beats;
    None without a pulse), ``pinned`` (the grid was set, not tracked) and ``note``, one line
    saying what was found."""

    frames: np.ndarray
    in_bar: np.ndarray
    bpm: float
    grid: BeatGrid | None
    pinned: bool
    note: str


def no_beats(note: str) -> Beats:
    return Beats(np.zeros(0, np.int64), np.zeros(0, np.int64), 0.0, None, False, note)


def frames_of_samples(positions: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The video frame holding each sample position, frames given by their first samples
    ``starts`` (``(n_frames + 1,)``, the last the end); clipped to the frames there are."""
    return np.clip(np.searchsorted(starts, positions, side="right") - 1, 0, len(starts) - 2)


def grid_beats(grid: BeatGrid, starts: np.ndarray, sr: int) -> Beats:
    """The beats of ``grid`` over the frames starting at samples ``starts`` (``(n_frames + 1,)``)."""
    times, numbers = grid.beats(float(starts[-1]) / sr)
    positions = np.round(times * sr).astype(np.int64)
    inside = (positions >= starts[0]) & (positions < starts[-1])
    frames, first = np.unique(frames_of_samples(positions[inside], starts), return_index=True)
    in_bar = np.mod(numbers[inside][first], grid.beats_per_bar)
    note = (f"beats: the grid of {grid.flags()}, {grid.beats_per_bar} beats a bar "
            f"({len(frames)} beats)")
    return Beats(frames.astype(np.int64), in_bar.astype(np.int64), float(grid.bpm), grid, True, note)


def track_beats(onset_median: np.ndarray, onset_mean: np.ndarray, starts: np.ndarray, sr: int,
                beats_per_bar: int = 4) -> Beats:
    """librosa's beats of a sound (hop-rate onset envelopes ``onset_median``, the tracker's, and
    ``onset_mean``, librosa's default; value ``k`` at sample ``512 k``), on the frames starting at
    ``starts``, if they form a steady pulse (module docstring); else no beats."""
    advice = "so beat, bar and beat_in_bar stay 0; set a grid with --bpm N --beat_offset SECONDS"
    if not onset_median.any():
        return no_beats(f"beats: no steady pulse (the tracker found no beats), {advice}")
    bpm = tempo(onset_median, sr)
    _, hops = librosa.beat.beat_track(onset_envelope=onset_median, sr=sr, hop_length=HOP, bpm=bpm)
    hops = np.asarray(hops, dtype=np.int64)
    strength = _beat_strength(onset_mean, hops)
    background = float(np.median(onset_mean))
    if len(hops) < MIN_BEATS or strength < MIN_BEAT_DB or strength < MIN_BEAT_CONTRAST * background:
        return no_beats(f"beats: no steady pulse (the tracker's {len(hops)} beat{'s' * (len(hops) != 1)} at "
                        f"{bpm:.0f} bpm rise {strength:.1f} dB over a {background:.1f} dB background), {advice}")
    times = hops * HOP / sr
    grid = fit_grid(times, bpm, beats_per_bar, sr)
    numbers = np.round((times - grid.offset) / grid.period).astype(np.int64)
    frames, first = np.unique(frames_of_samples(hops * HOP, starts), return_index=True)
    note = (f"beats: {grid.bpm:g} bpm, first beat at {grid.offset:g} s ({len(hops)} tracked, rising "
            f"{strength:.1f} dB over a {background:.1f} dB background); pin them with {grid.flags()}")
    return Beats(frames.astype(np.int64), np.mod(numbers[first], beats_per_bar).astype(np.int64), bpm, grid,
                 False, note)


def fit_grid(times: np.ndarray, bpm: float, beats_per_bar: int = 4, sr: int = 44100) -> BeatGrid:
    """The exact grid closest to beats at ``times`` (seconds, increasing) tracked at about ``bpm``:
    each beat numbered by the one before it plus their interval in beats of ``bpm``, rounded (at
    least 1): ``bpm`` is librosa's rounded estimate, so numbering by the distance from the first
    beat would skip or repeat a number every 1/error beats. Then time = offset + number x period
    fitted by least squares over the beats within 5 % of a period (or two hops at ``sr``) of the
    Theil-Sen line (the median of the slopes between every two beats, robust to the
    odd misplaced beat: librosa's last beat often is); one beat: ``bpm``'s period. The offset is
    the grid's first beat at or after 0 s, which counts as a downbeat (the tracker finds no bars);
    the tempo is rounded to 0.01 bpm and the offset to 1 ms."""
    numbers = np.concatenate([[0.0], np.cumsum(np.maximum(1.0, np.round(np.diff(times) * bpm / 60.0)))])
    period, intercept = 60.0 / bpm, float(times[0])
    if numbers[-1] > 0:
        period, intercept = scipy.stats.theilslopes(times, numbers)[:2]
        inliers = np.abs(times - intercept - period * numbers) <= max(0.05 * period, 2 * HOP / sr)
        if len(set(numbers[inliers])) >= 2:  # least squares on the beats the robust line keeps
            period, intercept = np.polyfit(numbers[inliers], times[inliers], 1)
    offset = intercept - period * math.floor(intercept / period + 1e-9)
    # rounded as printed (0.01 bpm drifts 25 ms over 600 beats), so that the flags copied pin these beats
    return BeatGrid(round(float(60.0 / period), 2), round(float(max(0.0, offset)), 3), beats_per_bar)


def tempo(onset_median: np.ndarray, sr: int, chunk: int = 1024) -> float:
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


def _beat_strength(onset_mean: np.ndarray, hops: np.ndarray, reach: int = 2) -> float:
    """The median over ``hops`` of the largest ``onset_mean`` within ``reach`` hops of each."""
    if not len(hops):
        return 0.0
    padded = np.pad(onset_mean, reach)
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * reach + 1)
    return float(np.median(windows[np.clip(hops, 0, len(onset_mean) - 1)].max(axis=1)))


def beat_envelopes(beats: Beats, n_frames: int, fps: float) -> dict[str, np.ndarray]:
    """``beat``: 1 on each beat frame, falling linearly to 0 just before the next; ``bar``: the
    same over downbeats; ``beat_in_bar``: the number in its bar (0, 1, 2 ...) of the last beat at
    or before each frame, 0 before the first. float64 ``(n_frames,)`` each."""
    period = beats.grid.period * fps if beats.grid is not None else 1.0
    bar_period = period * (beats.grid.beats_per_bar if beats.grid is not None else 1)
    downbeats = beats.frames[beats.in_bar == 0]
    in_bar = np.zeros(n_frames)
    if len(beats.frames):
        last = np.searchsorted(beats.frames, np.arange(n_frames), side="right") - 1
        in_bar = np.where(last >= 0, beats.in_bar[np.maximum(last, 0)], 0).astype(np.float64)
    return {"beat": falling_ramps(beats.frames, n_frames, period),
            "bar": falling_ramps(downbeats, n_frames, bar_period), "beat_in_bar": in_bar}


def falling_ramps(event_frames: np.ndarray, n_frames: int, period: float) -> np.ndarray:
    """1 on each event frame, falling linearly to 0 just before the next; after the last event it
    falls over the median interval (``period`` frames, rounded, for a single event)."""
    result = np.zeros(n_frames)
    if not len(event_frames):
        return result
    gaps = np.diff(event_frames)
    last_gap = max(1, int(np.median(gaps)) if len(gaps) else round(period))
    for start, gap in zip(event_frames, [*gaps.tolist(), last_gap]):
        end = min(start + gap, n_frames)
        result[start:end] = 1.0 - np.arange(end - start) / gap
    return result
