"""Per-frame measures of colour drift and flicker in any video, and how the change follows the sound.

:func:`video_stats` decodes an MP4 (or anything ffmpeg reads) frame by frame with the ffmpeg
bundled by imageio-ffmpeg. It streams: only frame 0's reference statistics and the luma of the
previous two frames are kept, so a video of any length fits in memory. Per frame ``k``:

``drift``       CIEDE2000 colour difference (ΔE00) between frame k's mean CIELAB colour and
                frame 0's. About 1 is the smallest difference people notice side by side; below
                about 5 over a whole video is barely visible; 10 and more is a clear colour cast.
``hist_drift``  how far the colours' distribution moved: the earth mover's distance (1-D
                Wasserstein) between frame k's histogram of L*, of a* and of b* and frame 0's,
                summed over the three channels, in Lab units. A uniform shift of L* by 5 gives 5;
                unlike ``drift`` it also grows when contrast builds up or washes out while the mean
                stays. Histograms with ``HIST_BIN`` (0.1) Lab-unit bins.
``flicker``     mean absolute change of luma (BT.709, 0..255) per pixel from frame k-1 to frame k;
                0 for frame 0. Motion counts too: this is all frame-to-frame change.
``flicker_hf``  the high-frequency part of that change: the change that reverses on the next
                frame. Per pixel, with ``d_k = Y_k - Y_(k-1)``: ``min(|d_k|, |d_(k+1)|)`` where
                ``d_k`` and ``d_(k+1)`` have opposite signs, else 0; the mean over pixels. A steady
                fade or a pan gives 0, a picture that jumps back and forth gives its full size.
                0 for the first and the last frame. Near 0 is good; a few units is visible shimmer.
``saturation``  mean HSV saturation, 0..1.
``clipped``     share of the pixels' channel values that are 0 or 255 (burnt-in or crushed).
``shift_x``, ``shift_y``, ``rotation``, ``scale``
                the global camera motion from frame k-1 to frame k (0, 0, 0, 1 for frame 0):
                pixels right and down, degrees counter-clockwise, size ratio (> 1 flies in),
                in audio2video's ``--translation_x/_y``, ``--angle`` and ``--zoom`` units
                (:mod:`sounddiffusion.video.motion_stats`, phase correlation).

With an audio stream, the sound (mono, 44.1 kHz) gives an onset envelope per frame
(:func:`onset_per_frame`) and ``onset_correlation`` is the Pearson correlation of ``flicker``
with it over frames 1.. (None when either is constant): near 1 when the picture changes on the
beats, near 0 when its changes do not follow the sound; ``zoom_onset_correlation`` the same for
``scale`` (near 1 when the zoom pulses with the kick).

Lab statistics are computed on every pixel of frames up to ``LAB_MAX_PIXELS``; larger frames are
subsampled on a regular grid for them (luma, saturation and clipping always use every pixel).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass, fields
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from sounddiffusion.errors import ParameterError
from sounddiffusion.logs import counted
from sounddiffusion.sound.audio import SAMPLE_RATE
from sounddiffusion.video.ffmpeg import ffmpeg_exe
from sounddiffusion.video.motion_stats import MotionMeter

log = logging.getLogger(__name__)

HIST_BIN = 0.1  # Lab units
_LAB_RANGES = ((0.0, 100.0), (-128.0, 128.0), (-128.0, 128.0))
LAB_MAX_PIXELS = 256 * 256
_LUMA_709 = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
_PROGRESS_SECONDS = 5.0


@dataclass
class VideoStats:
    """The measures of one video; every array has one float64 value per frame (see the module)."""

    path: str
    fps: float
    width: int
    height: int
    drift: np.ndarray
    hist_drift: np.ndarray
    flicker: np.ndarray
    flicker_hf: np.ndarray
    saturation: np.ndarray
    clipped: np.ndarray
    shift_x: np.ndarray
    shift_y: np.ndarray
    rotation: np.ndarray
    scale: np.ndarray
    onset: np.ndarray | None = None
    onset_correlation: float | None = None
    zoom_onset_correlation: float | None = None

    @property
    def frames(self) -> int:
        return len(self.drift)

    def summary(self) -> dict:
        """Plain numbers: frames, fps, seconds; mean/max/final drift and hist_drift; mean/max
        flicker and flicker_hf (over frames that have them); saturation first/final/mean; clipped
        mean/max; the medians of the camera motion between frames (shift_x, shift_y, rotation,
        scale; 0, 0, 0, 1 for a single frame); has_audio, onset_correlation and
        zoom_onset_correlation (None without sound or when undefined)."""
        moving = self.flicker[1:] if self.frames > 1 else np.zeros(1)
        motion = {name: float(np.median(getattr(self, name)[1:] if self.frames > 1 else getattr(self, name)))
                  for name in ("shift_x", "shift_y", "rotation", "scale")}
        reversing = self.flicker_hf[1:-1] if self.frames > 2 else np.zeros(1)
        return {
            "path": self.path, "frames": self.frames, "fps": self.fps,
            "seconds": self.frames / self.fps if self.fps > 0 else None,
            "width": self.width, "height": self.height,
            "drift_mean": float(self.drift.mean()), "drift_max": float(self.drift.max()),
            "drift_final": float(self.drift[-1]),
            "hist_drift_mean": float(self.hist_drift.mean()),
            "hist_drift_max": float(self.hist_drift.max()),
            "hist_drift_final": float(self.hist_drift[-1]),
            "flicker_mean": float(moving.mean()), "flicker_max": float(moving.max()),
            "flicker_hf_mean": float(reversing.mean()), "flicker_hf_max": float(reversing.max()),
            "saturation_first": float(self.saturation[0]),
            "saturation_final": float(self.saturation[-1]),
            "saturation_mean": float(self.saturation.mean()),
            "clipped_mean": float(self.clipped.mean()), "clipped_max": float(self.clipped.max()),
            **{f"{name}_median": value for name, value in motion.items()},
            "has_audio": self.onset is not None, "onset_correlation": self.onset_correlation,
            "zoom_onset_correlation": self.zoom_onset_correlation,
        }

    def per_frame(self) -> dict[str, list[float]]:
        """The per-frame arrays as lists, by name (``onset`` only with sound)."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: [float(v) for v in value] for name, value in arrays.items()
                if isinstance(value, np.ndarray)}

    def to_json(self, *, plot: str | os.PathLike | None = None) -> str:
        """``{"summary": summary(), "per_frame": per_frame()}`` as JSON text, with
        ``"plot": path`` when a plot was written."""
        document = {"summary": self.summary(), "per_frame": self.per_frame()}
        if plot is not None:
            document["plot"] = str(plot)
        return json.dumps(document, indent=2)


def video_stats(path: str | os.PathLike, *, progress: bool = False) -> VideoStats:
    """Measure the video at ``path`` (see the module docstring for every measure).

    ``progress``: log a note with the frames done every few seconds. Raises
    :class:`ParameterError` when ffmpeg cannot read ``path`` as a video with at least one frame.
    """
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"{path} does not exist or is not a file: give the path of a video")
    frames = _read_frames(path)
    meta = next(frames)
    fps = float(meta.get("fps") or 0)
    width, height = meta["size"]
    colour: list[tuple[float, float, float, float]] = []
    motion: list[tuple[float, float, float, float]] = []
    meter = MotionMeter()
    flicker: list[float] = []
    flicker_hf: list[float] = []
    reference = None
    luma_before = luma_last = None  # frames k-2 and k-1
    last_note = time.monotonic()
    for rgb in frames:
        luma = rgb.astype(np.float32) @ _LUMA_709
        if reference is None:
            reference = _lab_reference(rgb)
        colour.append(_colour_measures(rgb, reference))
        motion.append(meter.measure(luma))
        flicker.append(_flicker(luma_last, luma))
        flicker_hf.append(0.0)  # known when the next frame comes
        if luma_before is not None:
            flicker_hf[-2] = _reversing_change(luma_before, luma_last, luma)
        luma_before, luma_last = luma_last, luma
        if progress and time.monotonic() - last_note > _PROGRESS_SECONDS:
            log.info("%s: %s measured", path.name, counted(len(flicker), "frame"))
            last_note = time.monotonic()
    if not flicker:
        raise ParameterError(f"{path} has no video frames ffmpeg can decode: give a video file")
    drift, hist_drift, saturation_, clipped = np.array(colour, dtype=np.float64).T
    shift_x, shift_y, rotation, scale = np.array(motion, dtype=np.float64).T
    stats = VideoStats(str(path), fps, width, height, drift, hist_drift,
                       np.array(flicker), np.array(flicker_hf), saturation_, clipped, shift_x, shift_y, rotation, scale)
    samples = decode_audio(path)
    if samples is not None and fps > 0:
        stats.onset = onset_per_frame(samples, fps, stats.frames)
        stats.onset_correlation = pearson(stats.flicker[1:], stats.onset[1:])
        stats.zoom_onset_correlation = pearson(stats.scale[1:], stats.onset[1:])
    return stats


def _read_frames(path: Path):
    """A generator: first imageio-ffmpeg's meta dict, then (H, W, 3) uint8 RGB frames.

    Raises :class:`ParameterError` when ffmpeg cannot open ``path``."""
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as err:
        reader.close()
        log.debug("ffmpeg cannot open %s: %s", path, err)  # its own words, for --debug
        if re.search(r"Stream #\S+: Audio", str(err)) and not re.search(r"Stream #\S+: Video", str(err)):
            raise ParameterError(f"{path} holds sound but no pictures: give a video file (MP4, MOV, ...)") from err
        raise ParameterError(f"{path} is not a video ffmpeg can read (damaged, or another kind of file): "
                             f"give an MP4 or another video file") from err
    width, height = meta["size"]
    yield meta
    try:
        for buffer in reader:
            yield np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3)
    except (OSError, RuntimeError) as err:
        log.debug("ffmpeg stopped decoding %s: %s", path, err)
        raise ParameterError(f"ffmpeg stopped decoding {path}: the file may be damaged or incomplete") from err
    finally:
        reader.close()


def _lab_pixels(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) CIELAB values of the pixels (a regular subsample of at most LAB_MAX_PIXELS)."""
    from skimage.color import rgb2lab

    height, width, _ = rgb.shape
    stride = max(1, math.ceil(math.sqrt(height * width / LAB_MAX_PIXELS)))
    return rgb2lab(rgb[::stride, ::stride]).reshape(-1, 3)


def _lab_reference(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame 0's mean Lab colour (3,) and the cumulative histograms of its channels."""
    lab = _lab_pixels(rgb)
    return lab.mean(axis=0), _cumulative_histograms(lab)


def _cumulative_histograms(lab: np.ndarray) -> list[np.ndarray]:
    """Per channel of (N, 3) Lab values: the share of pixels in each HIST_BIN-wide bin and
    those below it (L* over 0..100, a* and b* over -128..128; values outside go to the ends)."""
    cumulative = []
    for channel, (low, high) in enumerate(_LAB_RANGES):
        bins = int(round((high - low) / HIST_BIN))
        index = np.clip(((lab[:, channel] - low) / HIST_BIN).astype(np.int64), 0, bins - 1)
        cumulative.append(np.cumsum(np.bincount(index, minlength=bins)) / len(lab))
    return cumulative


def _colour_measures(rgb: np.ndarray, reference) -> tuple[float, float, float, float]:
    """(drift, hist_drift, saturation, clipped) of one frame against frame 0's reference."""
    from skimage.color import deltaE_ciede2000

    mean_lab, reference_cumulative = reference
    lab = _lab_pixels(rgb)
    drift = float(deltaE_ciede2000(mean_lab, lab.mean(axis=0)))
    # The 1-D earth mover's distance is the area between the two cumulative histograms.
    hist_drift = sum(float(np.abs(mine - theirs).sum()) * HIST_BIN for mine, theirs
                     in zip(_cumulative_histograms(lab), reference_cumulative))
    return drift, hist_drift, saturation(rgb), clipped_share(rgb)


def saturation(rgb: np.ndarray) -> float:
    """Mean HSV saturation (max - min) / max of an (H, W, 3) uint8 picture, 0..1 (0 for black)."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    top = np.maximum(np.maximum(red, green), blue).astype(np.float32)
    spread = top - np.minimum(np.minimum(red, green), blue)
    return float(np.divide(spread, top, out=np.zeros_like(top), where=top > 0).mean())


def clipped_share(rgb: np.ndarray) -> float:
    """Share of the channel values of an (H, W, 3) uint8 picture that are 0 or 255."""
    return float(np.count_nonzero((rgb == 0) | (rgb == 255)) / rgb.size)


def _flicker(luma_last: np.ndarray | None, luma: np.ndarray) -> float:
    """Mean absolute luma change (0..255) from the previous frame; 0 without one."""
    return 0.0 if luma_last is None else float(np.abs(luma - luma_last).mean())


def _reversing_change(luma_before: np.ndarray, luma: np.ndarray, luma_after: np.ndarray) -> float:
    """flicker_hf of the middle frame: per pixel min(|d_k|, |d_k+1|) where the signs differ."""
    into, out_of = luma - luma_before, luma_after - luma
    reverses = (into * out_of) < 0
    return float(np.where(reverses, np.minimum(np.abs(into), np.abs(out_of)), 0).mean())


def decode_audio(path: str | os.PathLike, *, sr: int = SAMPLE_RATE) -> np.ndarray | None:
    """The first audio stream of ``path`` as mono float32 samples at ``sr`` Hz, or None without one."""
    result = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
         "-map", "0:a:0?", "-vn", "-ac", "1", "-ar", str(sr), "-f", "f32le", "pipe:1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if result.returncode != 0 or not result.stdout:
        message = result.stderr.decode(errors="replace").strip()
        if message and "does not contain any stream" not in message:
            log.warning("the sound of %s cannot be decoded, measuring the picture only: %s",
                        path, message.splitlines()[-1])
        return None
    return np.frombuffer(result.stdout, dtype="<f4").astype(np.float32)


def onset_per_frame(samples: np.ndarray, fps: float, n_frames: int, *,
                    sr: int = SAMPLE_RATE) -> np.ndarray:
    """The onset envelope of each video frame's stretch of sound, shape (n_frames,), in [0, 1].

    ``samples``: mono float audio at ``sr`` Hz; frame k covers [k/fps, (k+1)/fps). This is the
    ``onset`` envelope audio2video's schedules read (:func:`sounddiffusion.sound.analysis.envelopes`), so
    the correlation measures how a video follows what its schedules could see. Sound shorter
    than the video counts as silence."""
    from sounddiffusion.sound.analysis import envelopes

    samples = np.asarray(samples, dtype=np.float32)
    needed = int(math.ceil(n_frames * sr / fps))
    if len(samples) < needed:
        samples = np.concatenate([samples, np.zeros(needed - len(samples), np.float32)])
    return envelopes(samples, fps=fps, sr=sr).values["onset"][:n_frames]


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation of two equally long series, or None when either is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])
