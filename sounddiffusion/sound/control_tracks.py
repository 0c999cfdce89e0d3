"""Control tracks: other sounds (a song's stems: drums, bass, vocals) that steer a video made to
the main sound, each analysed as the main sound is and read by schedules as ``NAME.ENVELOPE``
(``drums.onset``, ``bass.low``, ``vox.rms``; numpy + librosa).

A track is given as ``NAME=FILE`` (``--control``, repeatable). It is analysed over exactly the
main sound's samples (:func:`track_envelopes`): decoded at the same 44.1 kHz whatever its own rate,
cut at the main sound's end when longer, continued with silence (and one warning) when shorter,
so that its frame ``i`` is the main sound's frame ``i``. Its beats are tracked on their own
unless a grid is set (the grid is the song's, so every track shares it); sections belong to the
main sound only.
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from sounddiffusion.errors import AudioError, ParameterError
from sounddiffusion.sound.analysis import ENVELOPE_NAMES, GRID_NAMES, Envelopes, Smoothing, envelopes
from sounddiffusion.sound.audio import SAMPLE_RATE, frame_count, sound_blocks
from sounddiffusion.sound.beats import BeatGrid

log = logging.getLogger(__name__)

TRACK_VARIABLES = (*ENVELOPE_NAMES, *GRID_NAMES, "bpm")
"""What a schedule may read of a control track NAME, as ``NAME.onset``, ``NAME.bpm`` ..."""
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ControlTrack:
    """A control track: its ``name`` (what schedules call it) and its sound file ``path``."""

    name: str
    path: Path

    @property
    def flag(self) -> str:
        return f"--control {self.name}={self.path}"


def parse_control_tracks(specs: Sequence[str]) -> tuple[ControlTrack, ...]:
    """The tracks of ``--control NAME=FILE`` texts, each file opened and its first samples decoded
    (a missing or unreadable file fails here, before anything else loads). Raises
    :class:`ParameterError` for a malformed text or a name given twice, :class:`AudioError` naming
    the flag for a file that cannot be read."""
    tracks: list[ControlTrack] = []
    for spec in specs:
        name, equals, path = spec.partition("=")
        name = name.strip()
        if not equals or not path:
            raise ParameterError(f"--control {spec}: give NAME=FILE, e.g. --control drums=stems/drums.wav")
        if not _NAME.fullmatch(name):
            raise ParameterError(f"--control {spec}: the name {name!r} must be letters, digits and _ and start "
                                 f"with a letter (schedules read it as {name or 'NAME'}.onset), e.g. drums")
        if any(track.name == name for track in tracks):
            raise ParameterError(f"--control {spec}: the name {name} is given twice; give each track its own name")
        track = ControlTrack(name, Path(path))
        blocks = sound_blocks(track.path)
        try:
            next(blocks, None)
        except AudioError as err:
            raise AudioError(f"{track.flag}: {err}") from None
        finally:
            blocks.close()
        tracks.append(track)
    return tuple(tracks)


def track_envelopes(track: ControlTrack, *, fps: float | Fraction, n_samples: int, sr: int = SAMPLE_RATE,
                    smoothing: Mapping[str, Smoothing] | None = None, grid: BeatGrid | None = None,
                    beats_per_bar: int = 4) -> Envelopes:
    """The envelopes of ``track`` over the main sound's ``n_samples`` samples (module docstring),
    with one warning when the track ends before the last video frame."""
    try:
        result = envelopes(track.path, fps=fps, sr=sr, smoothing=smoothing, grid=grid,
                           beats_per_bar=beats_per_bar, n_samples=n_samples)
    except AudioError as err:
        raise AudioError(f"{track.flag}: {err}") from None
    if frame_count(result.sound_samples, fps, sr) < result.n_frames:  # it ends before the last frame
        log.warning("control track %s (%s) is %.2f s long, the main sound %.2f s: it is silent after its end",
                    track.name, track.path, result.sound_samples / sr, n_samples / sr)
    return result


def track_variables(tracks: Mapping[str, Envelopes]) -> dict[str, np.ndarray | float]:
    """``{"NAME.onset": values, ..., "NAME.bpm": tempo}`` of every track, for schedules."""
    result: dict[str, np.ndarray | float] = {}
    for name, analysed in tracks.items():
        result.update({f"{name}.{key}": analysed.values[key] for key in (*ENVELOPE_NAMES, *GRID_NAMES)})
        result[f"{name}.bpm"] = float(analysed.bpm)
    return result


def track_names(names: Sequence[str]) -> tuple[str, ...]:
    """Every ``NAME.VARIABLE`` a schedule may read of the tracks called ``names``."""
    return tuple(f"{name}.{key}" for name in names for key in TRACK_VARIABLES)


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of the SHA-256 of the file's bytes, read in pieces: a sound is
    recorded by its content, so that ``--resume`` notices a changed file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for piece in iter(lambda: file.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()[:16]
