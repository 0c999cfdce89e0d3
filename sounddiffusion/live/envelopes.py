"""The music's envelopes computed causally, from a sound that arrives block by block (numpy + librosa).

:class:`LiveEnvelopes` cuts the incoming sound into frames at ``fps`` exactly as a file is cut
(:func:`sounddiffusion.sound.audio.frame_bounds`) and gives each frame the envelopes of
:mod:`sounddiffusion.sound.analysis` as soon as its last sample is in. Which of them equal the
file's values, frame for frame, and which cannot:

- ``rms``, ``low``, ``mid``, ``high``, ``centroid``, ``flux``, ``onset`` (raw): the same numbers
  (:class:`~sounddiffusion.sound.frame_features.FrameFeatures`,
  :class:`~sounddiffusion.sound.onset_stream.OnsetStream`, whose value for the hop at sample
  ``512 k`` needs only the samples before it), except the file's onset at t = 0, which is capped by
  the loudest onset of the whole sound: live, the sound's first frames have librosa's onset (none).
- Smoothing: the median filter looks back only (``median=5`` is the median of this frame and the 4
  before, 2 frames later than the file's centred one); the envelope follower and the gate are
  causal already; ``peak`` and ``minmax`` rescaling cannot know the loudest frame to come, so
  they divide by the loudest (and lift the quietest) so far, forgetting with a time constant of
  :data:`RESCALE_MEMORY_S` seconds, so that one loud hit does not flatten the rest of a set.
- ``beat`` and ``bpm``: :class:`LiveBeats` runs librosa's tracker, as the file analysis does, on the
  last :data:`BEAT_WINDOW_S` seconds of the onset envelope every :data:`BEAT_UPDATE_S` seconds (with
  the tempo estimated anew every :data:`TEMPO_UPDATE_S` seconds), and
  predicts the beats after the last one it found from its tempo: ``beat`` is 1 on a frame holding
  a predicted beat and falls linearly to 0 just before the next, as in a file. ``bar`` and
  ``beat_in_bar`` count the beats as they pass, the first one heard a downbeat (the tracker
  finds no bars; a file numbers its beats from its first one too): ``beat_in_bar`` is the number
  in its bar of the last beat counted, ``bar`` is 1 on the frame of a downbeat and falls to 0
  over one bar of the current tempo. Without a tempo (silence) ``beat`` and ``bar`` are 0 and
  ``beat_in_bar`` holds; the count goes on when the beats come back.
- With an exact grid (``--bpm``), :class:`LiveGrid` gives ``beat``, ``bar`` and ``beat_in_bar``
  instead of the tracker: a grid is known in advance, so they are the file's, frame for frame
  (:func:`~sounddiffusion.sound.beats.grid_beats`, :func:`~sounddiffusion.sound.beats.beat_envelopes`).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from fractions import Fraction

import librosa
import numpy as np

from sounddiffusion.sound.analysis import (DEFAULT_SMOOTHING, ENVELOPE_NAMES, GRID_NAMES, Smoothing, follow_step,
                                           follower_pole)
from sounddiffusion.sound.audio import SAMPLE_RATE, fps_fraction, frame_bounds, frame_starts
from sounddiffusion.sound.beats import BeatGrid, beat_envelopes, grid_beats
from sounddiffusion.sound.frame_features import FrameFeatures
from sounddiffusion.sound.onset_stream import HOP, OnsetStream

RESCALE_MEMORY_S = 10.0
"""Time constant (s) with which the running peak (and minimum) of ``peak``/``minmax`` rescaling forget."""
BEAT_WINDOW_S = 8.0
"""Seconds of onset envelope the live beat tracker reads (librosa's tempo window)."""
BEAT_UPDATE_S = 0.5
"""Seconds of sound between two runs of the live beat tracker."""
TEMPO_UPDATE_S = 2.0
"""Seconds of sound between two estimates of the tempo (the costlier part; tempos change slowly)."""
BEAT_START_S = 2.0
"""Seconds of sound before the first run of the live beat tracker."""
GRID_CHUNK_S = 10.0
"""Seconds of frames whose grid envelopes :class:`LiveGrid` computes at a time."""


class CausalSmoother:
    """:func:`sounddiffusion.sound.analysis.smooth` one frame at a time, looking back only (see the
    module docstring): median of the last ``median`` values -> follower -> gate -> running rescale."""

    def __init__(self, smoothing: Smoothing, fps: float | Fraction):
        self.smoothing = smoothing
        self.history: deque[float] = deque(maxlen=smoothing.median)
        self.attack = follower_pole(smoothing.attack, fps)
        self.release = follower_pole(smoothing.release, fps)
        self.memory = follower_pole(RESCALE_MEMORY_S, fps)
        self.level = 0.0
        self.low: float | None = None
        self.high: float | None = None

    def step(self, value: float) -> float:
        """The smoothed value, in [0, 1], of the next frame's raw ``value``."""
        s = self.smoothing
        self.history.append(float(value) if math.isfinite(value) else 0.0)
        x = float(np.median(self.history)) if s.median > 1 else self.history[-1]
        if s.attack or s.release:
            self.level = x = follow_step(self.level, x, self.attack, self.release)
        if s.gate and x < s.gate:
            x = 0.0
        if s.rescale == "peak":
            self.high = max(x, (self.high or 0.0) * self.memory)
            x = x / self.high if self.high > 0 else 0.0
        elif s.rescale == "minmax":
            relax = 1.0 - self.memory
            self.high = x if self.high is None else max(x, self.high - relax * (self.high - x))
            self.low = x if self.low is None else min(x, self.low + relax * (x - self.low))
            x = (x - self.low) / (self.high - self.low) if self.high > self.low else 0.0
        return min(1.0, max(0.0, x))


class LiveBeats:
    """Beats and tempo of a live sound from its median onset envelope (hop rate, 512 samples);
    see the module docstring."""

    def __init__(self, sr: int = SAMPLE_RATE, beats_per_bar: int = 4):
        self.sr, self.beats_per_bar = sr, beats_per_bar
        self.window: deque[float] = deque(maxlen=int(librosa.time_to_frames(BEAT_WINDOW_S, sr=sr, hop_length=HOP)))
        self.hops = 0  # values pushed so far; value k belongs to sample 512 k
        self.next_run = round(BEAT_START_S * sr / HOP)
        self.bpm = 0.0
        self.anchor: int | None = None  # hop of the last beat the tracker found
        self.period = 0.0  # hops per beat
        self.tempo = 0.0  # the last estimate, and the hop count at which the next one is due
        self.next_tempo = 0
        self.count = -1  # beats counted so far, minus one: beat 0 is the first downbeat
        self.counted: int | None = None  # the frame of the last beat counted
        self.downbeat: int | None = None  # the frame of the last downbeat

    def push(self, median_onsets: np.ndarray) -> None:
        """Take the next onset values; the tracker runs when its next turn is reached."""
        self.window.extend(float(v) for v in median_onsets)
        self.hops += len(median_onsets)
        if self.hops >= self.next_run:
            self.next_run = self.hops + round(BEAT_UPDATE_S * self.sr / HOP)
            self._track()

    def _track(self) -> None:
        self._track_window(np.array(self.window))

    def _track_window(self, onsets: np.ndarray) -> None:
        if len(onsets) < 2 or not onsets.any():
            self.bpm, self.anchor, self.tempo = 0.0, None, 0.0
            return
        if self.tempo <= 0 or self.hops >= self.next_tempo:
            self.tempo = float(np.atleast_1d(librosa.feature.tempo(onset_envelope=onsets, sr=self.sr,
                                                                   hop_length=HOP))[0])
            self.next_tempo = self.hops + round(TEMPO_UPDATE_S * self.sr / HOP)
        tempo = self.tempo
        _, beats = librosa.beat.beat_track(onset_envelope=onsets, sr=self.sr, hop_length=HOP, bpm=tempo)
        if tempo <= 0 or not len(beats):
            self.bpm, self.anchor = 0.0, None
            return
        self.bpm, self.period = tempo, 60.0 / tempo * self.sr / HOP
        self.anchor = self.hops - len(onsets) + int(beats[-1])

    def frame(self, index: int, end: int, fps: Fraction) -> tuple[float, float, float]:
        """(``beat``, ``bar``, ``beat_in_bar``) on frame ``index``, whose samples end (exclusive) at
        sample ``end``; frames must come in order, each once (the beats are counted here). ``beat``
        is 1 on the frame of the latest predicted beat, falling to 0 over one beat's frames; 0
        without a tempo (see the module docstring for the bars)."""
        in_bar = float(max(0, self.count) % self.beats_per_bar)
        if self.anchor is None:
            return 0.0, 0.0, in_bar
        last_hop = (end - 1) / HOP
        beat_hop = self.anchor + max(0, math.floor((last_hop - self.anchor) / self.period)) * self.period
        beat_frame = math.floor(beat_hop * HOP * fps / self.sr)
        gap = max(1, round(self.period * HOP * fps / self.sr))
        # a beat the tracker moved by a frame or two is the same beat, not a new one
        if self.counted is None or beat_frame - self.counted > gap // 2:
            self.count += 1
            self.counted = beat_frame
            in_bar = float(self.count % self.beats_per_bar)
            if in_bar == 0:
                self.downbeat = beat_frame
        beat = max(0.0, 1.0 - (index - beat_frame) / gap)
        bar = 0.0 if self.downbeat is None else max(0.0, 1.0 - (index - self.downbeat) / (gap * self.beats_per_bar))
        return beat, bar, in_bar


def warm_up_beat_tracker(sr: int = SAMPLE_RATE) -> None:
    """Run :class:`LiveBeats`' tracker once on made-up onsets (a pulse every 0.5 s), so that
    librosa compiles it (seconds, on its first use) before the first live pictures."""
    beats = LiveBeats(sr)
    pulses = np.zeros(beats.window.maxlen)
    pulses[:: max(1, round(0.5 * sr / HOP))] = 1.0
    beats._track_window(pulses)


class LiveGrid:
    """``beat``, ``bar`` and ``beat_in_bar`` of the exact ``grid`` at ``fps``, by frame index: the
    file's :func:`~sounddiffusion.sound.beats.grid_beats` and
    :func:`~sounddiffusion.sound.beats.beat_envelopes`, computed for :data:`GRID_CHUNK_S` seconds
    of frames at a time over a stretch reaching a bar and a beat further either side, so that every
    frame's ramps see the beats and downbeats around it (the next ones too: a grid's future is known)."""

    def __init__(self, grid: BeatGrid, fps: float | Fraction, sr: int = SAMPLE_RATE):
        self.grid, self.fps, self.sr = grid, fps_fraction(fps), sr
        self.margin = (grid.beats_per_bar + 1) * (math.ceil(grid.period * self.fps) + 1)
        self.chunk = max(1, math.ceil(GRID_CHUNK_S * self.fps))
        self.first: int | None = None  # the first frame of :attr:`values`
        self.values: dict[str, np.ndarray] = {}

    def at(self, index: int) -> tuple[float, float, float]:
        """(``beat``, ``bar``, ``beat_in_bar``) on frame ``index``."""
        if self.first is None or not self.first <= index < self.first + self.chunk:
            self._compute(index - index % self.chunk)
        k = index - self.first
        return float(self.values["beat"][k]), float(self.values["bar"][k]), float(self.values["beat_in_bar"][k])

    def _compute(self, first: int) -> None:
        low, high = max(0, first - self.margin), first + self.chunk + self.margin
        starts = frame_starts(high - low, self.fps, self.sr, first=low)
        ramps = beat_envelopes(grid_beats(self.grid, starts, self.sr), high - low, float(self.fps))
        self.first = first
        self.values = {name: values[first - low: first - low + self.chunk] for name, values in ramps.items()}


class LiveEnvelopes:
    """Envelopes at ``fps`` frames per second of a sound at ``sr`` fed block by block with :meth:`push`.

    ``smoothing`` changes :data:`~sounddiffusion.sound.analysis.DEFAULT_SMOOTHING` for the
    envelopes it names (:func:`~sounddiffusion.sound.analysis.parse_smoothing`); ``grid`` sets
    the beats (None: tracked, in bars of ``beats_per_bar``). After a push, :attr:`frames` frames
    are complete, :attr:`values` holds the last one's envelopes (floats in [0, 1] by name,
    :data:`~sounddiffusion.sound.analysis.ENVELOPE_NAMES`), :attr:`bars` its ``bar`` and
    ``beat_in_bar``, :attr:`raw` the envelopes' raw values before smoothing, :attr:`last_slice`
    its samples and :attr:`bpm` the tempo (the grid's, or 0 while none is known);
    :attr:`pending_start` is the sample where the next frame begins."""

    def __init__(self, fps: float | Fraction, sr: int = SAMPLE_RATE, smoothing: Mapping[str, Smoothing] | None = None,
                 *, grid: BeatGrid | None = None, beats_per_bar: int = 4):
        self.fps, self.sr = fps_fraction(fps), sr
        self.frames = 0
        self.values = {name: 0.0 for name in ENVELOPE_NAMES}
        self.bars = {name: 0.0 for name in GRID_NAMES}
        self.raw = dict(self.values)
        self.grid = LiveGrid(grid, self.fps, sr) if grid is not None else None
        self.bpm = float(grid.bpm) if grid is not None else 0.0
        # the longest frame's length, as a file's analysis pads every frame's FFT to
        self.measures = FrameFeatures(-(-sr * self.fps.denominator // self.fps.numerator), sr)
        self.onsets = OnsetStream(None, sr)
        self.onset_mean = np.zeros(0)  # hop values from hop onset_start on, not yet past
        self.onset_start = 0
        self.beats = LiveBeats(sr, beats_per_bar) if grid is None else None
        chosen = {**DEFAULT_SMOOTHING, **(smoothing or {})}
        self.smoothers = {name: CausalSmoother(chosen[name], self.fps) for name in ENVELOPE_NAMES}
        self.last_slice = np.zeros(0, np.float32)  # the last complete frame's samples
        self.pending = np.zeros(0, np.float32)  # samples from pending_start on, in no complete frame yet
        self.pending_start = 0

    def push(self, samples: np.ndarray) -> int:
        """Take the next samples (mono float32); returns how many frames they completed."""
        self.pending = np.concatenate([self.pending, np.asarray(samples, np.float32)])
        done = 0
        while True:
            start, end = frame_bounds(self.frames, self.fps, self.sr)
            if self.pending_start + len(self.pending) < end:
                return done
            piece = self.pending[start - self.pending_start: end - self.pending_start]
            self.pending, self.pending_start = self.pending[end - self.pending_start:], end
            self._frame(piece, start, end)
            done += 1

    def _frame(self, piece: np.ndarray, start: int, end: int) -> None:
        self.onsets.push(piece)
        mean, median = self.onsets.take()
        if self.beats is not None:
            self.beats.push(median)
        self.onset_mean = np.concatenate([self.onset_mean, mean])
        raw = self.measures.push(piece)[0]
        # the largest onset whose hop lies in the frame (all are known now); else the latest known
        hops = self.onset_start + np.arange(len(self.onset_mean))
        inside = self.onset_mean[(hops * HOP >= start) & (hops * HOP < end)]
        raw["onset"] = float(inside.max()) if len(inside) else float(self.onset_mean[-1]) if len(self.onset_mean) else 0.0
        later = np.flatnonzero(hops * HOP >= end)  # the next frames' hops, and always the latest
        keep = min(int(later[0]) if len(later) else len(hops), max(0, len(hops) - 1))
        self.onset_mean, self.onset_start = self.onset_mean[keep:], self.onset_start + keep
        if self.grid is not None:
            raw["beat"], bar, in_bar = self.grid.at(self.frames)
        else:
            raw["beat"], bar, in_bar = self.beats.frame(self.frames, end, self.fps)
            self.bpm = self.beats.bpm
        self.bars = {"bar": bar, "beat_in_bar": in_bar}
        self.raw, self.last_slice = raw, piece
        self.values = {name: self.smoothers[name].step(raw[name]) for name in ENVELOPE_NAMES}
        self.frames += 1

    def variables(self, index: int, max_f: float) -> dict[str, float]:
        """What a schedule may read on frame ``index`` (see
        :meth:`sounddiffusion.sound.analysis.Envelopes.variables`): the current envelopes, ``bar``,
        ``beat_in_bar``, ``bpm``, ``t`` = ``index``, ``s`` its time, ``fps`` and ``max_f``."""
        return {**self.values, **self.bars, "bpm": self.bpm, "t": float(index), "s": float(index / self.fps),
                "fps": float(self.fps), "max_f": float(max_f)}
