#!/usr/bin/env python
"""Colour drift, flicker and camera motion of a video, frame by frame (any MP4: ours or anyone's).

    python scripts/video_stats.py outputs/song.mp4            # summary table
    python scripts/video_stats.py outputs/song.mp4 --json     # summary and per-frame numbers
    python scripts/video_stats.py outputs/song.mp4 --plot     # + curves in song.mp4.stats.png

What good looks like: drift (ΔE00 of the mean colour from frame 0) below about 5 over the whole
video is barely visible, 10 and more is a colour cast; flicker_hf (change that reverses on the
next frame) near 0, a few units is visible shimmer; clipped near 0 (burn-in pushes it up). With
sound, onset_correlation near 1 means the picture changes on the beats. The camera motion between
frames (median shift, rotation and scale, by phase correlation) is in --zoom/--angle/--translation
units; zoom_onset_correlation near 1 means the zoom pulses with the onsets.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sounddiffusion import cli  # noqa: E402

# name in summary(), what it measures, what good looks like
ROWS = [
    ("frames", "frames decoded", ""),
    ("seconds", "length of the video (s)", ""),
    ("drift_mean", "mean colour change from frame 0 (CIEDE2000)", "< 5 barely visible"),
    ("drift_final", "... at the last frame", "< 5 barely visible"),
    ("drift_max", "... largest", "> 10 a colour cast"),
    ("hist_drift_final", "colour distribution change from frame 0 (Lab EMD)", "low; grows with contrast too"),
    ("flicker_mean", "mean luma change between frames (0..255)", "motion counts too"),
    ("flicker_max", "... largest", "big jumps = cuts or pops"),
    ("flicker_hf_mean", "change that reverses on the next frame (0..255)", "near 0; > 2 shimmer"),
    ("flicker_hf_max", "... largest", ""),
    ("saturation_first", "HSV saturation of frame 0 (0..1)", ""),
    ("saturation_final", "... of the last frame", "close to frame 0's"),
    ("clipped_mean", "share of channel values at 0 or 255", "near 0; growing = burn-in"),
    ("onset_correlation", "correlation of flicker with the sound's onsets", "near 1: moves on the beats"),
    ("shift_x_median", "camera motion per frame: shift right (px)", "as --translation_x"),
    ("shift_y_median", "... shift down (px)", "as --translation_y"),
    ("rotation_median", "... rotation (degrees, counter-clockwise)", "as --angle"),
    ("scale_median", "... scale (> 1 flies in)", "as --zoom"),
    ("zoom_onset_correlation", "correlation of the scale with the sound's onsets", "near 1: zoom pulses on the beats"),
]


def build_parser():
    parser = cli.make_parser("video_stats.py", __doc__)
    parser.add_argument("video", metavar="VIDEO", help="the video to measure")
    parser.add_argument("--json", action="store_true",
                        help="print the summary and the per-frame numbers as JSON instead of a table")
    parser.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                        help="also draw the curves into PNG (default: VIDEO.stats.png beside the video; "
                             "an existing file is never overwritten, a number is added instead)")
    return parser


def summary_table(summary: dict) -> str:
    """The summary as an aligned text table: measure, value, meaning, what good looks like."""
    lines = [f"{summary['path']}: {summary['width']}x{summary['height']}, {summary['fps']:g} fps"]
    for name, meaning, good in ROWS:
        value = summary[name]
        if name.endswith("onset_correlation") and not summary["has_audio"]:
            shown = "no sound"
        elif value is None:
            shown = "n/a"
        elif isinstance(value, int):
            shown = str(value)
        else:
            shown = f"{value:.3f}"
        lines.append(f"{name:<22} {shown:>9}  {meaning:<52} {good}")
    return "\n".join(lines)


def main(args):
    from sounddiffusion.files import unique_output_path
    from sounddiffusion.video.video_stats import video_stats

    stats = video_stats(args.video, progress=not args.json)
    plot = None
    if args.plot is not None:
        from sounddiffusion.video.video_stats_plot import plot_video_stats

        plot = plot_video_stats(stats, unique_output_path(args.plot or f"{args.video}.stats.png"))
    if args.json:
        print(stats.to_json(plot=plot))
    else:
        print(summary_table(stats.summary()))
        if plot is not None:
            cli.log.info("wrote %s", plot)

if __name__ == "__main__":
    cli.main_entry(build_parser, main)
