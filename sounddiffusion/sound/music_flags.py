"""The flags of the music analysis that a render and a live mode share, declared once: control
tracks (``--control``), the beat grid (``--bpm``, ``--beat_offset``, ``--beats_per_bar``) and the
song's sections (``--sections``), with :func:`beat_grid` reading the grid they set.

Their settings are fields of the same names in :mod:`sounddiffusion.settings`.
"""
from __future__ import annotations

from sounddiffusion.errors import ParameterError
from sounddiffusion.flags import Flag, FlagGroup
from sounddiffusion.sound.beats import BeatGrid

MUSIC_FLAGS = FlagGroup(
    "music analysis",
    (
        Flag(("--control",), "a control track, repeatable: another sound (a stem: drums, bass, vocals) whose "
             "envelopes schedules read as NAME.onset, NAME.rms, NAME.low ... while the video keeps the sound "
             "and length of --path; analysed over the main sound's time (cut, or silent after its end); "
             "none by default",
             default=[], action="append", metavar="NAME=FILE"),
        Flag(("--bpm",), "set an exact beat grid at this tempo instead of tracking the beats (the tracker's "
             "tempo and first beat are printed, to copy here)", type=float, metavar="N"),
        Flag(("--beat_offset",), "with --bpm: the time of a downbeat in seconds (default 0)", type=float,
             metavar="SECONDS"),
        Flag(("--beats_per_bar",), "beats in a bar, for the bar and beat_in_bar envelopes", default=4, type=int,
             metavar="N"),
        Flag(("--sections",), "the song's sections, for the section and section_start envelopes: a file of "
             "'M:SS label' lines (as prompt files), or auto (found in the sound; auto:N for N sections)",
             metavar="FILE|auto"),
    ),
    "Stems as control tracks, a beat grid you set, sections (README: Music-reactive control)")


def beat_grid(bpm: float | None, beat_offset: float | None, beats_per_bar: int) -> BeatGrid | None:
    """The grid of ``--bpm --beat_offset --beats_per_bar`` (None without ``--bpm``: the tracker's
    beats). Raises :class:`ParameterError` (one line naming the flag) for a bad value and for
    ``--beat_offset`` without ``--bpm``; ``beats_per_bar`` is checked either way."""
    if bpm is None:
        if beat_offset is not None:
            raise ParameterError(f"--beat_offset {beat_offset:g} places the grid of --bpm: give --bpm N too, "
                                 f"e.g. --bpm 120 --beat_offset {beat_offset:g}")
        BeatGrid(120.0, 0.0, beats_per_bar)  # the bars of tracked beats need a valid count too
        return None
    return BeatGrid(float(bpm), float(beat_offset or 0.0), beats_per_bar)
