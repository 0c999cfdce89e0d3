"""The music a live run is steered by: the main input's envelopes and its control tracks', in step.

A control track (``--control NAME=FILE``, parsed as audio2video parses it:
:func:`~sounddiffusion.sound.control_tracks.parse_control_tracks`) is a sound file played along
with the main input: for every block of main sound the listener takes, :class:`TrackReader` reads
the same number of samples of the file at the same time (decoded at 44.1 kHz as files are; after
its end silence, with one warning once a frame of the input lies wholly after it, as audio2video
warns when a track ends before the last frame). Time is the main input's: a looping ``--input FILE`` starts
every pass again at 0, and so does each track (a track longer than the input is cut there, as in
audio2video); with a microphone it counts from the start of the capture. Each track has its own
:class:`~sounddiffusion.live.envelopes.LiveEnvelopes`, so schedules read ``NAME.onset``,
``NAME.rms`` ... as in audio2video. The beat grid of ``--bpm`` is the song's: every track shares it.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction

import numpy as np

from sounddiffusion.errors import AudioError, ParameterError
from sounddiffusion.live.envelopes import LiveEnvelopes
from sounddiffusion.settings import LiveSettings
from sounddiffusion.sound.analysis import ENVELOPE_NAMES, Smoothing
from sounddiffusion.sound.audio import SAMPLE_RATE, frame_bounds, frame_count, sound_blocks
from sounddiffusion.sound.beats import BeatGrid
from sounddiffusion.sound.control_tracks import TRACK_VARIABLES, ControlTrack, parse_control_tracks
from sounddiffusion.sound.music_flags import beat_grid

log = logging.getLogger(__name__)

def live_music_flags(settings: LiveSettings) -> tuple[BeatGrid | None, tuple[ControlTrack, ...]]:
    """(the grid of ``--bpm --beat_offset --beats_per_bar`` or None, the ``--control`` tracks with
    their files opened): a bad value or an unreadable file is one line (ParameterError /
    AudioError) before the model loads."""
    if settings.sections:
        raise ParameterError(f"--sections {settings.sections}: live.py cannot take sections; use keyframes "
                             f"over t or s")
    return beat_grid(settings.bpm, settings.beat_offset, settings.beats_per_bar), parse_control_tracks(settings.control)


class TrackReader:
    """The samples of a control ``track`` at the main input's time (mono float32 at ``sr``, in
    frames at ``fps``), decoded as they are asked for; see the module docstring."""

    def __init__(self, track: ControlTrack, fps: float | Fraction, sr: int = SAMPLE_RATE):
        self.track, self.fps, self.sr = track, fps, sr
        self.position = 0  # the sample the next read starts at
        self.silent_from: int | None = None  # once its end is known: the first sample of the first frame after it
        self.warned = False
        self._blocks: Iterator[np.ndarray] | None = None
        self._held = np.zeros(0, np.float32)  # decoded samples from position on
        self._ended = False
        self._length = 0  # samples in the file, once its end is known
        self._passes = 0

    def read(self, start: int, n: int) -> np.ndarray:
        """Samples ``[start, start + n)`` of the track, zeros past its end. A ``start`` before
        the last read's end plays the track again from its beginning (a looping input)."""
        if start < self.position:
            self._rewind()
        while self.position < start:  # samples the main input skipped (none so far): skip them too
            self._take(min(start - self.position, 1 << 16))
        piece = self._take(n)
        if self.silent_from is not None and start + n > self.silent_from and not self.warned:
            self.warned = True
            log.warning("control track %s (%s) ended after %.2f s of sound: it is silent from there on",
                        self.track.name, self.track.path, self._length / self.sr)
        return piece

    def _rewind(self) -> None:
        if self._blocks is not None:
            self._blocks.close()
        self._blocks, self._held, self._ended, self.position = None, np.zeros(0, np.float32), False, 0

    def _take(self, n: int) -> np.ndarray:
        while len(self._held) < n and not self._ended:
            if self._blocks is None:
                self._passes += 1
                self._blocks = sound_blocks(self.track.path, self.sr, warn_non_finite=self._passes == 1)
            try:
                block = next(self._blocks, None)
            except AudioError as err:
                raise AudioError(f"{self.track.flag}: {err}") from None
            if block is None:
                self._ended, self._length = True, self.position + len(self._held)
                self.silent_from = frame_bounds(frame_count(self._length, self.fps, self.sr), self.fps, self.sr)[0]
            else:
                self._held = np.concatenate([self._held, block])
        piece, self._held = self._held[:n], self._held[n:]
        self.position += n
        return piece if len(piece) == n else np.pad(piece, (0, n - len(piece)))

    def close(self) -> None:
        if self._blocks is not None:
            self._blocks.close()


class LiveMusic:
    """The main input's :class:`LiveEnvelopes` (:attr:`main`) and each control track's
    (:attr:`tracks`, by name), all at ``fps`` with the same ``smoothing`` and ``grid`` (None:
    tracked beats in bars of ``beats_per_bar``), fed in step by :meth:`push`."""

    def __init__(self, fps: float | Fraction, *, smoothing: Mapping[str, Smoothing] | None = None,
                 grid: BeatGrid | None = None, beats_per_bar: int = 4, tracks: Sequence[ControlTrack] = (),
                 sr: int = SAMPLE_RATE):
        def analysis() -> LiveEnvelopes:
            return LiveEnvelopes(fps, sr, smoothing, grid=grid, beats_per_bar=beats_per_bar)

        self.main = analysis()
        self.readers = {track.name: TrackReader(track, fps, sr) for track in tracks}
        self.tracks = {track.name: analysis() for track in tracks}

    def push(self, samples: np.ndarray, start: int) -> int:
        """Take the main input's next ``samples`` (mono float32), which begin at sample ``start``
        of its sound, and the tracks' samples at the same time; returns how many frames they
        completed (the same for every track)."""
        for name, reader in self.readers.items():
            self.tracks[name].push(reader.read(start, len(samples)))
        return self.main.push(samples)

    def variables(self, index: int, max_f: float) -> dict[str, float]:
        """What a schedule may read on frame ``index``: the main input's
        (:meth:`LiveEnvelopes.variables`) and ``NAME.onset``, ``NAME.bar``, ``NAME.bpm`` ... of
        every track (:data:`~sounddiffusion.sound.control_tracks.TRACK_VARIABLES`)."""
        result = self.main.variables(index, max_f)
        for name, envelopes in self.tracks.items():
            own = envelopes.variables(index, max_f)
            result.update({f"{name}.{key}": own[key] for key in TRACK_VARIABLES})
        return result

    def track_values(self) -> dict[str, dict[str, float]]:
        """Each track's newest envelopes (:data:`ENVELOPE_NAMES`, in [0, 1]) by track name."""
        return {name: {key: envelopes.values[key] for key in ENVELOPE_NAMES} for name, envelopes in self.tracks.items()}

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
