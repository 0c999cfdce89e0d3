"""A PNG of the curves of :class:`sounddiffusion.video.video_stats.VideoStats` (matplotlib, Agg)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sounddiffusion.files import write_atomically
from sounddiffusion.video.video_stats import VideoStats


def plot_video_stats(stats: VideoStats, path: str | os.PathLike) -> Path:
    """Draw drift, flicker (with the onset envelope when there is sound), saturation and
    clipping, and the camera motion between frames (with the onsets too) against time into a PNG at ``path`` (written atomically; an existing file is
    replaced, so pass a free name). Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    seconds = np.arange(stats.frames) / stats.fps if stats.fps > 0 else np.arange(stats.frames)
    unit = "time (s)" if stats.fps > 0 else "frame"
    figure = Figure(figsize=(9, 10.5), dpi=100, layout="constrained")
    drift_ax, flicker_ax, tone_ax, motion_ax = figure.subplots(4, 1, sharex=True)
    figure.suptitle(f"{Path(stats.path).name}: {stats.frames} frames, {stats.fps:g} fps")

    drift_ax.plot(seconds, stats.drift, label="drift: ΔE00 of the mean colour from frame 0")
    drift_ax.plot(seconds, stats.hist_drift, label="hist_drift: Lab histogram EMD from frame 0")
    drift_ax.axhline(5, color="grey", linestyle=":", label="ΔE00 5: barely visible")
    drift_ax.set_ylabel("Lab units")
    drift_ax.legend(loc="upper left", fontsize="small")

    flicker_ax.plot(seconds[1:], stats.flicker[1:], label="flicker: mean |luma change|")
    flicker_ax.plot(seconds[1:-1], stats.flicker_hf[1:-1], label="flicker_hf: change that reverses")
    flicker_ax.set_ylabel("luma (0..255)")
    if stats.onset is not None:
        onset_ax = flicker_ax.twinx()
        onset_ax.plot(seconds, stats.onset, color="tab:red", alpha=0.5, linewidth=0.8,
                      label="sound onset strength")
        onset_ax.set_ylabel("onset strength")
        correlation = ("n/a" if stats.onset_correlation is None
                       else f"{stats.onset_correlation:.2f}")
        onset_ax.legend(loc="upper right", fontsize="small", title=f"correlation {correlation}")
    flicker_ax.legend(loc="upper left", fontsize="small")

    tone_ax.plot(seconds, stats.saturation, label="saturation (HSV, 0..1)")
    tone_ax.plot(seconds, stats.clipped, label="clipped: share of values at 0 or 255")
    tone_ax.set_ylabel("share")
    tone_ax.legend(loc="upper left", fontsize="small")

    _plot_motion(motion_ax, stats, seconds)
    motion_ax.set_xlabel(unit)

    return write_atomically(path, lambda f: figure.savefig(f, format="png"), overwrite=True)


def _plot_motion(axis, stats: VideoStats, seconds: np.ndarray) -> None:
    """The camera motion from each frame to the next: zoom in per cent, rotation, shifts; the
    onsets on a second axis, so that a zoom that pulses with the kick shows."""
    axis.plot(seconds[1:], (stats.scale[1:] - 1) * 100, label="zoom: (scale - 1) x 100 %")
    axis.plot(seconds[1:], stats.rotation[1:], label="rotation (degrees, counter-clockwise)")
    axis.plot(seconds[1:], stats.shift_x[1:], label="shift_x (px, right)")
    axis.plot(seconds[1:], stats.shift_y[1:], label="shift_y (px, down)")
    axis.axhline(0, color="grey", linewidth=0.6)
    axis.set_ylabel("camera motion\nper frame")
    axis.legend(loc="upper left", fontsize="small")
    if stats.onset is not None:
        onset_ax = axis.twinx()
        onset_ax.plot(seconds, stats.onset, color="tab:red", alpha=0.5, linewidth=0.8, label="sound onset strength")
        onset_ax.set_ylabel("onset strength")
        correlation = "n/a" if stats.zoom_onset_correlation is None else f"{stats.zoom_onset_correlation:.2f}"
        onset_ax.legend(loc="upper right", fontsize="small", title=f"zoom ~ onset {correlation}")
