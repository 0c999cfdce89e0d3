"""What the music and the schedules do, frame by frame: ``NAME.schedule.csv`` and the
``NAME.schedule.png`` plot (matplotlib, imported only when a plot is asked for).

Both are written atomically (:func:`sounddiffusion.files.write_atomically`): a crash never
leaves half a file under the final name.
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sounddiffusion.files import write_atomically
from sounddiffusion.sound.analysis import ENVELOPE_NAMES, Envelopes

# Colours of the envelope traces and the parameter panels (matplotlib's tab10, colour-blind safe order).
_COLOURS = ("#1f77b4", "#ff7f0e", "#d62728", "#8c564b", "#2ca02c", "#17becf", "#9467bd", "#e377c2")


def schedule_columns(envelopes: Envelopes, parameters: Mapping[str, np.ndarray]) -> list[str]:
    """The CSV header: ``frame``, ``time``, the envelopes, then the parameters in their order."""
    clash = sorted(set(parameters) & {"frame", "time", *ENVELOPE_NAMES})
    if clash:
        raise ValueError(f"parameter names {clash} clash with the envelope columns")
    return ["frame", "time", *ENVELOPE_NAMES, *parameters]


def write_schedule_csv(path: str | os.PathLike, envelopes: Envelopes,
                       parameters: Mapping[str, np.ndarray], *, overwrite: bool = False) -> Path:
    """Write one row per frame: ``frame,time`` (start in seconds), every envelope, then every
    parameter's value as used (``parameters[name]``: ``(n_frames,)``). Numbers are written in
    the shortest form that reads back to the same float64. Returns ``path``."""
    columns = schedule_columns(envelopes, parameters)
    n = envelopes.n_frames
    table = [np.arange(n), envelopes.times(), *(envelopes.values[name] for name in ENVELOPE_NAMES)]
    for name, values in parameters.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (n,):
            raise ValueError(f"parameter {name} has shape {values.shape}, expected ({n},)")
        table.append(values)
    text = io.StringIO()
    text.write(",".join(columns) + "\n")
    columns_as_lists = [column.tolist() for column in table]
    for row in zip(*columns_as_lists):
        text.write(",".join(repr(value) for value in row) + "\n")
    data = text.getvalue().encode()
    return write_atomically(path, lambda f: f.write(data), overwrite=overwrite)


def plot_schedule(path: str | os.PathLike, envelopes: Envelopes, parameters: Mapping[str, np.ndarray],
                  *, title: str, overwrite: bool = False) -> Path:
    """Write a PNG: the waveform, the envelopes stacked in one panel, and one panel per scheduled
    parameter, against time in seconds, with every beat marked by a vertical line. Returns ``path``."""
    from matplotlib.figure import Figure  # drawn with Agg, without pyplot or a window

    times = envelopes.times()
    step = 1.0 / float(envelopes.fps)
    heights = [1.2, 0.55 * len(ENVELOPE_NAMES)] + [1.0] * len(parameters)
    figure = Figure(figsize=(13, 1.2 + 1.1 * sum(heights)), dpi=100, layout="constrained")
    axes = figure.subplots(len(heights), 1, sharex=True, gridspec_kw={"height_ratios": heights})
    bpm = f"{envelopes.bpm:.1f} bpm" if envelopes.bpm > 0 else "no beat found"
    figure.suptitle(f"{title}  ({envelopes.n_frames} frames at {float(envelopes.fps):g} fps, {bpm})",
                    fontsize=13)
    _plot_waveform(axes[0], envelopes, times, step)
    _plot_envelopes(axes[1], envelopes, times, step)
    for k, (name, values) in enumerate(parameters.items()):
        axis = axes[2 + k]
        axis.step(*_held(times, step, values), where="post", color=_COLOURS[k % len(_COLOURS)], linewidth=1.4)
        axis.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=11)
        axis.grid(axis="y", alpha=0.3)
    beat_times = envelopes.beat_frames / float(envelopes.fps)
    for axis in axes:
        for beat in beat_times:
            axis.axvline(beat, color="0.4", linewidth=0.8, linestyle=(0, (2, 2)), zorder=0)
        axis.set_xlim(0, max(times[-1] + step if len(times) else step, step))
    axes[-1].set_xlabel("time (s)   ·   dashed lines: beats", fontsize=11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = buffer.getvalue()
    return write_atomically(path, lambda f: f.write(data), overwrite=overwrite)


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


def _plot_envelopes(axis, envelopes: Envelopes, times: np.ndarray, step: float) -> None:
    """Each envelope in its own lane (top: rms, bottom: flux), filled from the lane's floor."""
    lanes = len(ENVELOPE_NAMES)
    for k, name in enumerate(ENVELOPE_NAMES):
        floor = lanes - 1 - k
        edges, values = _held(times, step, floor + 0.9 * envelopes.values[name])
        axis.fill_between(edges, floor, values, step="post", color=_COLOURS[k], alpha=0.35, linewidth=0)
        axis.step(edges, values, where="post", color=_COLOURS[k], linewidth=1.0)
        axis.axhline(floor, color="0.85", linewidth=0.6)
    axis.set_ylim(0, lanes)
    axis.set_yticks(np.arange(lanes) + 0.45, list(reversed(ENVELOPE_NAMES)), fontsize=10)
    axis.tick_params(axis="y", length=0)
    axis.set_ylabel("envelopes\n(each 0 to 1)", rotation=0, ha="right", va="center", fontsize=11)
