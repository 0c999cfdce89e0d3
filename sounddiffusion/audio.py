"""Loading sound files and cutting them into per-video-frame slices (numpy only, no torch).

Everything downstream works on mono float32 samples at :data:`SAMPLE_RATE` (44.1 kHz), the rate
the original Sound-Diffusion featurization was defined at.

Decoding goes through libsndfile (``soundfile``: WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...). Files
it cannot read (M4A/AAC, WebM, ...) are decoded by the ffmpeg binary that ``imageio-ffmpeg`` ships.
``librosa.load`` is not used: its audioread fallback is deprecated and floods the user with
FutureWarnings, and reading through libsndfile directly is as fast and gives the same samples.
"""
from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile
import soxr

from .errors import AudioError, ParameterError

log = logging.getLogger(__name__)

SAMPLE_RATE = 44100
"""Samples per second of everything :func:`load_audio` returns by default."""

AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
    ".m4a", ".aac", ".wma", ".webm", ".caf", ".w64", ".au",
})
"""Lower-case file name suffixes :func:`find_audio_files` treats as sound files."""

# A frame rate given as a float (29.97, 23.976, 30000/1001) is read as the nearest fraction with
# a denominator up to this, so slice boundaries are exact integers rather than float roundings.
_MAX_FPS_DENOMINATOR = 10000


def find_audio_files(folder: str | Path) -> list[Path]:
    """The sound files directly inside ``folder`` (by suffix: :data:`AUDIO_EXTENSIONS`), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)


def load_audio(path: str | Path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read a sound file as mono float32 samples ``(n_samples,)`` at ``sr`` samples per second.

    Full scale is 1.0. Several channels are averaged and other sample rates resampled, giving the
    samples of ``librosa.load(path, sr=sr)`` (soxr "HQ"). Non-finite samples (NaN/inf in float
    files) become 0 with a warning. Raises :class:`AudioError` (one line naming the file) when the
    file is missing, a folder, unreadable, not audio or holds no samples, and
    :class:`ParameterError` when ``sr`` is not a positive integer.
    """
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise ParameterError(f"sample rate {sr!r}: use a positive whole number of samples per second")
    path = Path(path)
    if not path.exists():
        raise AudioError(f"audio file {path} does not exist: check the path")
    if path.is_dir():
        raise AudioError(f"{path} is a folder, not an audio file: give the path of a sound file inside it")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file {path} is empty (0 bytes): give a file that contains sound")
    channels, file_sr = _decode(path, sr)
    if channels.shape[0] == 0:
        raise AudioError(f"audio file {path} holds no samples: give a file that contains sound")
    y = _zero_non_finite(_mix_to_mono(channels), path)
    if file_sr != sr:
        y = _resample(y, file_sr, sr)
    return np.ascontiguousarray(y, dtype=np.float32)


def _resample(y: np.ndarray, file_sr: int, sr: int) -> np.ndarray:
    """``y`` at ``file_sr`` resampled to ``sr``: ceil(len(y) * sr / file_sr) samples.

    The same samples as ``librosa.resample(res_type="soxr_hq")`` (soxr "HQ", length fixed up to
    the ceiling), without librosa's extra passes that take seconds on a 10-minute file."""
    length = -(-len(y) * sr // file_sr)
    resampled = soxr.resample(y, file_sr, sr, quality="HQ")
    if len(resampled) < length:
        resampled = np.pad(resampled, (0, length - len(resampled)))
    return resampled[:length]


def _mix_to_mono(channels: np.ndarray) -> np.ndarray:
    """The average of the columns of ``channels`` ``(n_samples, n_channels)``, float32 ``(n_samples,)``.

    Summed column by column: numpy's strided ``mean(axis=1)`` is several times slower on long files."""
    y = np.array(channels[:, 0], dtype=np.float32)
    for c in range(1, channels.shape[1]):
        y += channels[:, c]
    if channels.shape[1] > 1:
        y /= np.float32(channels.shape[1])
    return y


def _decode(path: Path, sr: int) -> tuple[np.ndarray, int]:
    """Samples ``(n_samples, n_channels)`` float32 and their rate: libsndfile first, then ffmpeg
    (which returns one channel at ``sr``)."""
    try:
        with path.open("rb") as file:
            samples, file_sr = soundfile.read(file, dtype="float32", always_2d=True)
        return samples, file_sr
    except PermissionError:
        raise AudioError(f"cannot read audio file {path}: permission denied; "
                         f"make it readable (chmod +r) or copy it somewhere you can read") from None
    except OSError as exc:
        raise AudioError(f"cannot read audio file {path} ({exc.strerror or exc}): "
                         f"check the disk and the file") from None
    except RuntimeError as exc:  # soundfile's errors; LibsndfileError carries libsndfile's own message
        reason = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__
    samples = _decode_with_ffmpeg(path, sr)
    if samples is None:
        raise AudioError(f"{path} is not an audio file that can be decoded ({reason.strip().rstrip('.')}): "
                         f"convert it to WAV, FLAC, OGG or MP3")
    return samples[:, None], sr


def _decode_with_ffmpeg(path: Path, sr: int) -> np.ndarray | None:
    """Mono float32 samples at ``sr`` decoded by ffmpeg, or None when ffmpeg cannot decode the file."""
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return None
    command = [exe, "-nostdin", "-v", "error", "-i", str(path), "-vn", "-map", "0:a:0",
               "-ac", "1", "-ar", str(sr), "-f", "f32le", "pipe:1"]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        return None
    return np.frombuffer(result.stdout, dtype="<f4").astype(np.float32)


def _zero_non_finite(y: np.ndarray, path: Path) -> np.ndarray:
    """``y`` with NaN and +-inf replaced by 0 (a warning names how many and the file)."""
    bad = ~np.isfinite(y)
    count = int(bad.sum())
    if count:
        log.warning("%s: %d non-finite samples (NaN or inf) replaced with silence", path, count)
        y = np.where(bad, np.float32(0), y)
    return y


def _fps_fraction(fps: float | Fraction, sr: int) -> Fraction:
    """``fps`` as an exact fraction; :class:`ParameterError` unless 0 < fps <= sr."""
    try:
        rate = Fraction(fps).limit_denominator(_MAX_FPS_DENOMINATOR)
    except (TypeError, ValueError, OverflowError):
        raise ParameterError(f"frame rate {fps!r}: use a positive number of frames per second") from None
    if rate <= 0:
        raise ParameterError(f"frame rate {fps!r}: use a positive number of frames per second")
    if rate > sr:
        raise ParameterError(f"frame rate {fps!r} is above the sample rate {sr}: a frame would hold "
                             f"less than one sample; use a lower frame rate")
    return rate


def frame_count(n_samples: int, fps: float | Fraction, sr: int = SAMPLE_RATE) -> int:
    """How many video frames cover ``n_samples`` at ``fps``: ceil(n_samples * fps / sr), exactly."""
    rate = _fps_fraction(fps, sr)
    return -(-n_samples * rate.numerator // (sr * rate.denominator))


def frame_bounds(i: int, fps: float | Fraction, sr: int = SAMPLE_RATE) -> tuple[int, int]:
    """Samples ``[start, end)`` of video frame ``i``: floor(i * sr / fps), floor((i + 1) * sr / fps)."""
    rate = _fps_fraction(fps, sr)
    step = sr * rate.denominator
    return i * step // rate.numerator, (i + 1) * step // rate.numerator


def frame_slice(y: np.ndarray, i: int, fps: float | Fraction, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The samples of video frame ``i`` (see :func:`frame_bounds`), shape ``(end - start,)``.

    A view into ``y`` where the frame lies inside it; a frame reaching past the end of the sound
    is a copy padded with zeros to full length.
    """
    start, end = frame_bounds(i, fps, sr)
    piece = y[start:end]
    if len(piece) < end - start:
        piece = np.pad(piece, (0, end - start - len(piece)))
    return piece


def iter_frame_slices(y: np.ndarray, fps: float | Fraction, sr: int = SAMPLE_RATE) -> Iterator[np.ndarray]:
    """Yield :func:`frame_slice` for frames 0 .. frame_count(len(y)) - 1, one at a time.

    For long renders: a 10-minute video never holds all its slices at once."""
    for i in range(frame_count(len(y), fps, sr)):
        yield frame_slice(y, i, fps, sr)


def frame_slices(y: np.ndarray, fps: float | Fraction, sr: int = SAMPLE_RATE) -> list[np.ndarray]:
    """All slices of ``y`` (mono samples at ``sr``) for a video at ``fps`` frames per second.

    Frame ``i`` covers samples ``[floor(i * sr / fps), floor((i + 1) * sr / fps))``; there are
    ``ceil(len(y) * fps / sr)`` frames so the whole sound is covered, the last zero-padded to full
    length. Fractional rates (7.5, 29.97, 30000/1001) are computed with exact fractions.
    Raises :class:`ParameterError` unless 0 < fps <= sr.
    """
    return list(iter_frame_slices(y, fps, sr))


def slice_rms(y: np.ndarray) -> float:
    """Root-mean-square level of the samples ``y`` (linear; 1.0 for a full-scale square wave).

    0 for silence and for no samples."""
    if len(y) == 0:
        return 0.0
    return float(np.sqrt(np.mean(np.square(y, dtype=np.float64))))
