"""The music a render is steered by: the main sound's envelopes with its beat grid and sections,
and its control tracks' envelopes, read from the settings of :mod:`sounddiffusion.sound.music_flags`.

:func:`music_request` checks those flags (before anything loads: a bad value, a missing control
file, an unreadable sections file is one line); :func:`analyse_music` analyses the sounds and
says in one line each what their beats are, so a user can copy a tracked tempo into ``--bpm``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from sounddiffusion.control.prompts import parse_timed_file
from sounddiffusion.errors import ParameterError
from sounddiffusion.settings import VideoSettings
from sounddiffusion.sound.analysis import Envelopes, Smoothing, envelopes
from sounddiffusion.sound.audio import SAMPLE_RATE
from sounddiffusion.sound.beats import BeatGrid
from sounddiffusion.sound.control_tracks import ControlTrack, parse_control_tracks, track_envelopes, track_variables
from sounddiffusion.sound.music_flags import beat_grid
from sounddiffusion.sound.sections import SectionFeatures, auto_count, section_starts, sections_of, with_sections

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MusicRequest:
    """What the flags ask of the analysis: the ``grid`` (None: track the beats), the bars'
    ``beats_per_bar``, the control ``tracks``, and the sections: ``section_times`` read from a file,
    or ``auto_sections`` (with ``section_count`` None: as many as found)."""

    grid: BeatGrid | None = None
    beats_per_bar: int = 4
    tracks: tuple[ControlTrack, ...] = ()
    section_times: tuple[tuple[float, str], ...] | None = None
    auto_sections: bool = False
    section_count: int | None = None
    sections_source: str = ""

    @property
    def wants_sections(self) -> bool:
        return self.auto_sections or self.section_times is not None


def music_request(settings: VideoSettings) -> MusicRequest:
    """The checked music flags of ``settings``: the grid's values, ``--sections`` (a file is read
    now), ``--snap_prompts`` only with a prompt file (``section`` with sections too), and every
    control track's file opened.
    Raises ParameterError / AudioError / PromptFileError, one line each."""
    grid = beat_grid(settings.bpm, settings.beat_offset, settings.beats_per_bar)
    if settings.snap_prompts == "section" and not settings.sections:
        raise ParameterError("--snap_prompts section moves prompts to the song's sections: give --sections FILE "
                             "(lines 'M:SS label') or --sections auto")
    if settings.snap_prompts != "none" and not settings.prompt_file:
        raise ParameterError(f"--snap_prompts {settings.snap_prompts} moves the times of --prompt_file's prompts: "
                             f"give --prompt_file FILE (lines 'M:SS prompt'), or leave --snap_prompts out")
    times, auto, count = None, False, None
    if settings.sections:
        auto, count = auto_count(settings.sections)
        if not auto:
            times = tuple(parse_timed_file(settings.sections, "sections file", "label"))
    return MusicRequest(grid, settings.beats_per_bar, parse_control_tracks(settings.control), times, auto, count,
                        settings.sections or "")


@dataclass(frozen=True, eq=False)
class MusicAnalysis:
    """The main sound's :class:`Envelopes` (``mix``, with ``section`` and ``section_start`` when
    sections were asked for) and each control track's, by name (``tracks``)."""

    mix: Envelopes
    tracks: Mapping[str, Envelopes]

    def variables(self) -> dict[str, np.ndarray | float]:
        """What schedules read: the mix's variables and ``NAME.ENVELOPE`` of every track."""
        return {**self.mix.variables(), **track_variables(self.tracks)}


def analyse_music(audio: str | Path, request: MusicRequest, *, fps: Fraction, n_samples: int,
                  smoothing: Mapping[str, Smoothing] | None = None, sr: int = SAMPLE_RATE) -> MusicAnalysis:
    """Analyse the main sound ``audio`` (``n_samples`` samples) and every control track over its
    time, with the grid and sections of ``request``; one line each on the beats (and the sections)."""
    name = Path(audio).name
    features = SectionFeatures(n_samples, sr) if request.auto_sections else None  # fed as the envelopes decode
    mix = envelopes(audio, fps=fps, sr=sr, smoothing=smoothing, grid=request.grid,
                    beats_per_bar=request.beats_per_bar, n_samples=n_samples,
                    on_block=features.push if features is not None else None)
    log.info("%s %s", name, mix.beat_note)
    if request.wants_sections:
        duration = n_samples / sr
        if features is not None:
            found = sections_of(features, request.section_count)
            sections = section_starts(found, duration, f"--sections {request.sections_source}")
        else:
            sections = section_starts(request.section_times, duration, f"--sections {request.sections_source}")
        mix = with_sections(mix, sections)
        log.info("%s sections: %s", name, ", ".join(f"{_clock(t)} {label}".rstrip() for t, label in sections))
    tracks = {}
    for track in request.tracks:
        tracks[track.name] = track_envelopes(track, fps=fps, n_samples=n_samples, sr=sr, smoothing=smoothing,
                                             grid=request.grid, beats_per_bar=request.beats_per_bar)
        if request.grid is None:
            log.info("control track %s %s", track.name, tracks[track.name].beat_note)
    return MusicAnalysis(mix, tracks)


def _clock(seconds: float) -> str:
    """``M:SS.ss`` as prompt and sections files write times."""
    minutes, rest = divmod(seconds, 60.0)
    return f"{int(minutes)}:{rest:05.2f}"
