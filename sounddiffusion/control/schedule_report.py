"""What the music and the schedules do, frame by frame: ``NAME.schedule.csv`` and the
``NAME.schedule.png`` plot (matplotlib, imported only when a plot is asked for).

Both are written atomically (:func:`sounddiffusion.files.write_atomically`): a crash never
leaves half a file under the final name.
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sounddiffusion.files import write_atomically
from sounddiffusion.sound.analysis import ENVELOPE_NAMES, GRID_NAMES, Envelopes
from sounddiffusion.sound.sections import SECTION_NAMES

# Colours of the envelope traces and the parameter panels (matplotlib's tab10, colour-blind safe order).
_COLOURS = ("#1f77b4", "#ff7f0e", "#d62728", "#8c564b", "#2ca02c", "#17becf", "#9467bd", "#e377c2", "#7f7f7f")
_PROMPT_COLOUR = "#6a3d9a"
_LANES = (*ENVELOPE_NAMES, "bar")


def music_columns(envelopes: Envelopes, tracks: Mapping[str, Envelopes] | None = None,
                  snapped: Sequence[tuple[float, float]] = ()) -> dict[str, np.ndarray]:
    """The CSV's columns after the envelopes, float64 ``(n_frames,)`` each: ``bar``,
    ``beat_in_bar``; ``section``, ``section_start`` (with sections); ``grid_bpm`` and
    ``grid_beat_offset``, the beat grid set or fitted to the tracked beats (what ``--bpm`` and
    ``--beat_offset`` take; 0 without a pulse); ``prompt_asked`` and ``prompt_snapped``, 1 on the
    frame of each prompt time as asked and as snapped (with ``--snap_prompts``); then every control
    track's envelopes, ``NAME.rms`` ... ``NAME.beat_in_bar``."""
    n = envelopes.n_frames
    columns = {name: envelopes.values[name] for name in (*GRID_NAMES, *SECTION_NAMES) if name in envelopes.values}
    grid = envelopes.grid
    columns["grid_bpm"] = np.full(n, grid.bpm if grid is not None else 0.0)
    columns["grid_beat_offset"] = np.full(n, grid.offset if grid is not None else 0.0)
    if snapped:
        for name, times in (("prompt_asked", [a for a, _ in snapped]), ("prompt_snapped", [s for _, s in snapped])):
            marks = np.zeros(n)
            marks[np.clip(np.floor(np.array(times) * float(envelopes.fps) + 1e-9).astype(int), 0, n - 1)] = 1.0
            columns[name] = marks
    for track, analysed in (tracks or {}).items():
        columns.update({f"{track}.{key}": analysed.values[key] for key in (*ENVELOPE_NAMES, *GRID_NAMES)})
    return columns


def schedule_columns(envelopes: Envelopes, parameters: Mapping[str, np.ndarray],
                     music: Mapping[str, np.ndarray] | None = None) -> list[str]:
    """The CSV header: ``frame``, ``time``, the envelopes, the ``music`` columns
    (:func:`music_columns`), then the parameters in their order."""
    before = ["frame", "time", *ENVELOPE_NAMES, *(music or {})]
    clash = sorted(set(parameters) & set(before))
    if clash:
        raise ValueError(f"parameter names {clash} clash with the envelope columns")
    return [*before, *parameters]


def write_schedule_csv(path: str | os.PathLike, envelopes: Envelopes,
                       parameters: Mapping[str, np.ndarray], *, tracks: Mapping[str, Envelopes] | None = None,
                       snapped: Sequence[tuple[float, float]] = (), overwrite: bool = False) -> Path:
    """Write one row per frame: ``frame,time`` (start in seconds), every envelope, the columns of
    :func:`music_columns` (``tracks``: the control tracks' envelopes; ``snapped``: (asked, snapped)
    prompt times), then every parameter's value as used (``parameters[name]``: ``(n_frames,)``).
    Numbers are written in the shortest form that reads back to the same float64. Returns ``path``."""
    music = music_columns(envelopes, tracks, snapped)
    columns = schedule_columns(envelopes, parameters, music)
    n = envelopes.n_frames
    table = [np.arange(n), envelopes.times(), *(envelopes.values[name] for name in ENVELOPE_NAMES),
             *music.values()]
    for name, values in parameters.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (n,):
            raise ValueError(f"parameter {name} has shape {values.shape}, expected ({n},)")
        table.append(values)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")  # quotes a name holding a comma (a bend, a LoRA's name)
    writer.writerow(columns)
    columns_as_lists = [column.tolist() for column in table]
    writer.writerows([repr(value) for value in row] for row in zip(*columns_as_lists))
    data = text.getvalue().encode()
    return write_atomically(path, lambda f: f.write(data), overwrite=overwrite)


def plot_schedule(path: str | os.PathLike, envelopes: Envelopes, parameters: Mapping[str, np.ndarray],
                  *, title: str, tracks: Mapping[str, Envelopes] | None = None,
                  snapped: Sequence[tuple[float, float, str]] = (), overwrite: bool = False) -> Path:
    """Write a PNG against time in seconds: the waveform, the envelopes stacked in one panel, one
    such panel per control track (``tracks``), and one panel per scheduled parameter; every beat
    a dashed line, every downbeat a solid one, sections shaded and named, and each snapped prompt
    (``snapped``: asked seconds, snapped seconds, prompt) a line from where it was asked to where it
    went. Returns ``path``."""
    from matplotlib.figure import Figure  # drawn with Agg, without pyplot or a window

    tracks = tracks or {}
    times = envelopes.times()
    step = 1.0 / float(envelopes.fps)
    lanes = [name for name in _LANES if name in envelopes.values]
    heights = [1.2, 0.55 * len(lanes), *(0.4 * len(lanes) for _ in tracks), *(1.0 for _ in parameters)]
    figure = Figure(figsize=(13, 1.2 + 1.1 * sum(heights)), dpi=100, layout="constrained")
    axes = figure.subplots(len(heights), 1, sharex=True, gridspec_kw={"height_ratios": heights}, squeeze=False)[:, 0]
    figure.suptitle(f"{title}  ({envelopes.n_frames} frames at {float(envelopes.fps):g} fps, "
                    f"{_beats_title(envelopes)})", fontsize=13)
    _plot_waveform(axes[0], envelopes, times, step)
    _plot_envelopes(axes[1], envelopes, lanes, times, step, "envelopes\n(each 0 to 1)")
    for axis, (name, analysed) in zip(axes[2:], tracks.items()):
        _plot_envelopes(axis, analysed, lanes, times, step, f"{name}\n(control track)")
    for k, (name, values) in enumerate(parameters.items()):
        axis = axes[2 + len(tracks) + k]
        axis.step(*_held(times, step, values), where="post", color=_COLOURS[k % len(_COLOURS)], linewidth=1.4)
        axis.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=11)
        axis.grid(axis="y", alpha=0.3)
    end = max(times[-1] + step if len(times) else step, step)
    _mark_time(axes, envelopes, end)
    _mark_prompts(axes, snapped)
    axes[-1].set_xlabel("time (s)   ·   dashed lines: beats, solid: downbeats"
                        + ("   ·   shaded: sections" if envelopes.sections else "")
                        + ("   ·   purple: prompts, dotted where asked" if snapped else ""), fontsize=11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = buffer.getvalue()
    return write_atomically(path, lambda f: f.write(data), overwrite=overwrite)


def _beats_title(envelopes: Envelopes) -> str:
    grid = envelopes.grid
    if grid is None:  # the tracker found no pulse (a grid set or fitted is always there otherwise)
        return "no steady pulse"
    source = "grid" if envelopes.beats_pinned else "tracked"
    return f"{source}: {grid.bpm:g} bpm, first beat {grid.offset:g} s, {grid.beats_per_bar} a bar"


def _mark_time(axes, envelopes: Envelopes, end: float) -> None:
    """Beats (dashed), downbeats (solid), sections (shaded, named on the first axis)."""
    fps = float(envelopes.fps)
    downbeats = set(np.flatnonzero(envelopes.values.get("bar", np.zeros(0)) == 1.0).tolist())
    starts = [t for t, _ in envelopes.sections] + [end]
    for axis in axes:
        for frame in envelopes.beat_frames.tolist():
            solid = frame in downbeats
            axis.axvline(frame / fps, color="0.3" if solid else "0.4", linewidth=1.1 if solid else 0.8,
                         linestyle="-" if solid else (0, (2, 2)), zorder=0)
        for k, (start, stop) in enumerate(zip(starts, starts[1:])):
            if k % 2:
                axis.axvspan(start, stop, color="#fdbf6f", alpha=0.18, linewidth=0, zorder=-1)
        axis.set_xlim(0, end)
    for (start, label), stop in zip(envelopes.sections, starts[1:]):
        axes[0].text(start + 0.01 * (stop - start), 0.95, label or "(start)", transform=axes[0].get_xaxis_transform(),
                     fontsize=10, va="top", color="#b15928", fontweight="bold")


def _mark_prompts(axes, snapped: Sequence[tuple[float, float, str]]) -> None:
    for asked, moved, prompt in snapped:
        for axis in axes:
            axis.axvline(moved, color=_PROMPT_COLOUR, linewidth=1.6, zorder=3)
            if asked != moved:
                axis.axvline(asked, color=_PROMPT_COLOUR, linewidth=1.0, linestyle=":", zorder=3)
        axes[0].annotate(prompt[:40], xy=(moved, 0.05), xycoords=axes[0].get_xaxis_transform(),
                         xytext=(3, 0), textcoords="offset points", fontsize=9, color=_PROMPT_COLOUR)


def _held(times: np.ndarray, step: float, values) -> tuple[np.ndarray, np.ndarray]:
    """``times`` and ``values`` with the last value repeated at the end of the last frame, so that
    a post-step line shows every frame for its whole duration."""
    values = np.asarray(values, dtype=np.float64)
    if not len(times):
        return times, values
    return np.append(times, times[-1] + step), np.append(values, values[-1:])


def _plot_waveform(axis, envelopes: Envelopes, times: np.ndarray, step: float) -> None:
    edges, low = _held(times, step, envelopes.peaks[:, 0])
    _, high = _held(times, step, envelopes.peaks[:, 1])
    axis.fill_between(edges, low, high, step="post", color="0.35", linewidth=0)
    top = max(float(np.abs(envelopes.peaks).max(initial=0.0)), 1e-3)
    axis.set_ylim(-1.05 * top, 1.05 * top)
    axis.set_yticks([])
    axis.set_ylabel("waveform", rotation=0, ha="right", va="center", fontsize=11)


def _plot_envelopes(axis, envelopes: Envelopes, lanes: Sequence[str], times: np.ndarray, step: float,
                    label: str) -> None:
    """Each envelope in its own lane (top: rms, bottom: the last), filled from the lane's floor."""
    for k, name in enumerate(lanes):
        floor = len(lanes) - 1 - k
        edges, values = _held(times, step, floor + 0.9 * envelopes.values[name])
        axis.fill_between(edges, floor, values, step="post", color=_COLOURS[k], alpha=0.35, linewidth=0)
        axis.step(edges, values, where="post", color=_COLOURS[k], linewidth=1.0)
        axis.axhline(floor, color="0.85", linewidth=0.6)
    axis.set_ylim(0, len(lanes))
    axis.set_yticks(np.arange(len(lanes)) + 0.45, list(reversed(lanes)), fontsize=10)
    axis.tick_params(axis="y", length=0)
    axis.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=11)
