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
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile
import soxr

from sounddiffusion.errors import AudioAccessError, AudioError, ParameterError

log = logging.getLogger(__name__)

SAMPLE_RATE = 44100
"""Samples per second of everything :func:`load_audio` returns by default."""

AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
    ".m4a", ".aac", ".wma", ".webm", ".caf", ".w64", ".au",
})
"""Lower-case file name suffixes :func:`find_audio_files` treats as sound files."""

BLOCK_SAMPLES = 1 << 16
"""Samples per block when a sound is decoded piece by piece (about 1.5 s at 44.1 kHz)."""

# A frame rate given as a float (29.97, 23.976, 30000/1001) is read as the nearest fraction with
# a denominator up to this, so slice boundaries are exact integers rather than float roundings.
_MAX_FPS_DENOMINATOR = 10000


def find_audio_files(folder: str | Path) -> list[Path]:
    """The sound files directly inside ``folder`` (by suffix: :data:`AUDIO_EXTENSIONS`), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)


def sounds_in_folder(folder: str | Path, what: str = "sound files") -> list[Path]:
    """:func:`find_audio_files` of ``--input_folder`` ``folder``; :class:`AudioError` naming the
    folder when it is none or holds no sound (``what``: "sound files", "songs", in the message)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AudioError(f"--input_folder {folder} is not a folder: give a folder of {what}")
    sounds = find_audio_files(folder)
    if not sounds:
        raise AudioError(f"--input_folder {folder} holds no sound files "
                         f"(looked for {', '.join(sorted(AUDIO_EXTENSIONS))})")
    return sounds


MIN_SOUND_SECONDS = 0.1  # shorter sounds get a warning (sound_warning)


def load_audio(path: str | Path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read a sound file as mono float32 samples ``(n_samples,)`` at ``sr`` samples per second.

    Full scale is 1.0. Several channels are averaged and other sample rates resampled, giving the
    samples of ``librosa.load(path, sr=sr)`` (soxr "HQ"). Non-finite samples (NaN/inf in float
    files) become 0 with a warning. Raises :class:`AudioError` (one line naming the file) when the
    file is missing, a folder, unreadable, not audio or holds no samples, and
    :class:`ParameterError` when ``sr`` is not a positive integer.
    """
    return np.concatenate(list(sound_blocks(path, sr)))


def sound_length(path: str | Path, sr: int = SAMPLE_RATE) -> int:
    """``len(load_audio(path, sr))``, found by decoding the file block by block without keeping it.

    Raises what :func:`load_audio` raises; warns about non-finite samples as it does."""
    return sound_extent(path, sr)[0]


def sound_extent(path: str | Path, sr: int = SAMPLE_RATE) -> tuple[int, float]:
    """(``len(load_audio(path, sr))``, the largest absolute sample), found block by block as
    :func:`sound_length` does; raises and warns as it does."""
    n_samples, peak = 0, 0.0
    for block in sound_blocks(path, sr):
        n_samples += len(block)
        peak = max(peak, float(np.abs(block).max(initial=0.0)))
    return n_samples, peak


def sound_warning(path: str | Path, n_samples: int, peak: float, sr: int = SAMPLE_RATE) -> str | None:
    """One line for a sound its pictures cannot follow, else None: digital silence (``peak``,
    the largest absolute sample, is 0) or a sound shorter than :data:`MIN_SOUND_SECONDS`
    (``n_samples`` at ``sr``): a likely mistake that would still render without complaint."""
    if peak == 0:
        return (f"{path} is silent (every sample is 0): the pictures cannot follow it (a plain field); "
                f"check that it is the sound you meant")
    if n_samples < MIN_SOUND_SECONDS * sr:
        return (f"{path} lasts only {1000 * n_samples / sr:.1f} ms ({n_samples} samples): too short for the "
                f"pictures to follow it; check that it is the sound you meant")
    return None


def sound_blocks(path: str | Path, sr: int = SAMPLE_RATE, *, warn_non_finite: bool = True
                 ) -> Iterator[np.ndarray]:
    """The samples of :func:`load_audio` as consecutive mono float32 blocks, each from about
    :data:`BLOCK_SAMPLES` samples of the file, decoded (and resampled) only as they are asked for:
    a sound of any length takes the same memory. Their concatenation is ``load_audio(path, sr)``.

    The file is checked and opened at the first block; errors are those of :func:`load_audio`.
    With ``warn_non_finite`` the count of non-finite samples made silent is logged at the end.
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
    counts = {"samples": 0, "non_finite": 0}

    def finite_blocks() -> Iterator[tuple[int, np.ndarray]]:
        # Zeroed before resampling, so that no NaN reaches the filter.
        for file_sr, block in _decoded_blocks(path, sr):
            bad = ~np.isfinite(block)
            if bad.any():
                counts["non_finite"] += int(bad.sum())
                block[bad] = 0
            counts["samples"] += len(block)
            yield file_sr, block

    yield from _resampled(finite_blocks(), sr)
    if counts["samples"] == 0:
        raise AudioError(f"audio file {path} holds no samples: give a file that contains sound")
    if counts["non_finite"] and warn_non_finite:
        log.warning("%s: %d non-finite samples (NaN or inf) replaced with silence", path, counts["non_finite"])


def _resampled(decoded: Iterable[tuple[int, np.ndarray]], sr: int) -> Iterator[np.ndarray]:
    """The mono blocks of ``decoded`` ((file rate, block) pairs) at ``sr``.

    Resampled with soxr "HQ" as a stream, which gives the very samples of one call on the whole
    sound; the result is ceil(n * sr / file_sr) samples long for n samples in, cut or padded with
    zeros at the end as ``librosa.resample(..., fix=True)`` does."""
    stream, file_sr, n_in, n_out = None, sr, 0, 0
    held = np.zeros(0, np.float32)
    for file_sr, block in decoded:
        if file_sr == sr:
            yield block
            continue
        if stream is None:
            stream = soxr.ResampleStream(file_sr, sr, 1, dtype="float32", quality="HQ")
        n_in += len(block)
        # Samples before ceil(n_in * sr / file_sr) belong to the result whatever follows; later
        # ones wait, since the final length is known only at the end.
        held = np.concatenate([held, stream.resample_chunk(block)])
        ready = min(len(held), -(-n_in * sr // file_sr) - n_out)
        if ready > 0:
            n_out += ready
            yield held[:ready]
            held = held[ready:].copy()
    if stream is not None:
        rest = np.concatenate([held, stream.resample_chunk(np.zeros(0, np.float32), last=True)])
        length = -(-n_in * sr // file_sr) - n_out
        rest = np.pad(rest[:length], (0, max(0, length - len(rest))))
        if len(rest):
            yield rest


def _mix_to_mono(channels: np.ndarray) -> np.ndarray:
    """The average of the columns of ``channels`` ``(n_samples, n_channels)``, float32 ``(n_samples,)``.

    Summed column by column: numpy's strided ``mean(axis=1)`` is several times slower on long files."""
    y = np.array(channels[:, 0], dtype=np.float32)
    for c in range(1, channels.shape[1]):
        y += channels[:, c]
    if channels.shape[1] > 1:
        y /= np.float32(channels.shape[1])
    return y


def _decoded_blocks(path: Path, sr: int) -> Iterator[tuple[int, np.ndarray]]:
    """(sample rate, mono float32 block) pairs of the file: libsndfile first, then ffmpeg (which
    gives blocks at ``sr``)."""
    try:
        file = path.open("rb")
    except PermissionError:
        raise AudioAccessError(f"cannot read audio file {path}: permission denied; "
                               f"make it readable (chmod +r) or copy it somewhere you can read") from None
    except OSError as exc:
        raise AudioAccessError(f"cannot read audio file {path} ({exc.strerror or exc}): "
                               f"check the disk and the file") from None
    decoded = 0  # samples libsndfile has given
    with file:
        try:
            with soundfile.SoundFile(file) as sound:
                for block in sound.blocks(BLOCK_SAMPLES, dtype="float32", always_2d=True):
                    decoded += len(block)
                    yield sound.samplerate, _mix_to_mono(block)
                return
        except RuntimeError as exc:  # soundfile's errors; LibsndfileError carries libsndfile's own message
            reason = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__
            if decoded:
                raise AudioError(f"cannot decode audio file {path} after {decoded} samples ({reason}): "
                                 f"the file is damaged; convert or export it again") from None
    # libsndfile cannot read it (M4A, WebM, ...): ffmpeg may.
    yield from _ffmpeg_blocks(path, sr, reason.strip().rstrip("."))


def _ffmpeg_blocks(path: Path, sr: int, reason: str) -> Iterator[tuple[int, np.ndarray]]:
    """(sr, mono float32 block) pairs decoded by ffmpeg; AudioError when ffmpeg cannot decode the
    file (``reason`` says why libsndfile could not either)."""
    not_audio = AudioError(f"{path} is not an audio file that can be decoded ({reason}): "
                           f"convert it to WAV, FLAC, OGG or MP3")
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        raise not_audio from None
    command = [exe, "-nostdin", "-v", "error", "-i", str(path), "-vn", "-map", "0:a:0",
               "-ac", "1", "-ar", str(sr), "-f", "f32le", "pipe:1"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    try:
        while data := process.stdout.read(4 * BLOCK_SAMPLES):
            yield sr, np.frombuffer(data[: len(data) // 4 * 4], dtype="<f4").astype(np.float32)
        if process.wait() != 0:
            raise not_audio
    finally:
        process.kill()
        process.stdout.close()
        process.wait()


def fps_fraction(fps: float | Fraction) -> Fraction:
    """Frames per second as an exact fraction, the one reading of a frame rate everywhere.

    A float (29.97, 7.5, 30000/1001) becomes the nearest fraction whose denominator is at most
    10000 (2997/100, 15/2, 30000/1001), so frame boundaries and video timestamps are exact
    integers rather than float roundings; ints and Fractions are kept as they are. Raises
    :class:`ParameterError` unless ``fps`` is a number above 0.
    """
    try:
        rate = Fraction(fps).limit_denominator(_MAX_FPS_DENOMINATOR)
    except (TypeError, ValueError, OverflowError):
        raise ParameterError(f"frame rate {fps!r}: use a positive number of frames per second") from None
    if rate <= 0:
        raise ParameterError(f"frame rate {fps!r}: use a positive number of frames per second")
    return rate


def _audio_frame_rate(fps: float | Fraction, sr: int) -> Fraction:
    """:func:`fps_fraction`, and :class:`ParameterError` unless fps <= sr (a sample per frame)."""
    rate = fps_fraction(fps)
    if rate > sr:
        raise ParameterError(f"frame rate {fps!r} is above the sample rate {sr}: a frame would hold "
                             f"less than one sample; use a lower frame rate")
    return rate


def frame_count(n_samples: int, fps: float | Fraction, sr: int = SAMPLE_RATE) -> int:
    """How many video frames cover ``n_samples`` at ``fps``: ceil(n_samples * fps / sr), exactly."""
    rate = _audio_frame_rate(fps, sr)
    return -(-n_samples * rate.numerator // (sr * rate.denominator))


def frame_bounds(i: int, fps: float | Fraction, sr: int = SAMPLE_RATE) -> tuple[int, int]:
    """Samples ``[start, end)`` of video frame ``i``: floor(i * sr / fps), floor((i + 1) * sr / fps)."""
    rate = _audio_frame_rate(fps, sr)
    step = sr * rate.denominator
    return i * step // rate.numerator, (i + 1) * step // rate.numerator


def frame_starts(n_frames: int, fps: float | Fraction, sr: int = SAMPLE_RATE, first: int = 0) -> np.ndarray:
    """The first sample of frames ``first`` .. ``first + n_frames - 1`` and the end of the last
    (:func:`frame_bounds`): floor(k * sr / fps) for k = first .. first + n_frames, int64 ``(n_frames + 1,)``."""
    rate = _audio_frame_rate(fps, sr)
    return np.arange(first, first + n_frames + 1, dtype=np.int64) * (sr * rate.denominator) // rate.numerator


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


def stream_frame_slices(blocks: Iterable[np.ndarray], n_samples: int, fps: float | Fraction,
                        sr: int = SAMPLE_RATE, start: int = 0) -> Iterator[np.ndarray]:
    """Yield :func:`frame_slice` for frames ``start`` .. ``frame_count(n_samples) - 1`` of a sound of
    ``n_samples`` samples that arrive as consecutive ``blocks`` (e.g. from :func:`sound_blocks`).

    Only about one frame and one block are held at a time, so a sound of any length is sliced in
    the same memory. Each slice is a new float32 array, the last zero-padded to full length."""
    blocks = iter(blocks)
    buffer, offset = np.zeros(0, np.float32), 0  # buffer holds samples [offset, offset + len(buffer))
    for i in range(start, frame_count(n_samples, fps, sr)):
        lo, hi = frame_bounds(i, fps, sr)
        drop = min(max(lo - offset, 0), len(buffer))  # samples only earlier frames used
        buffer, offset = buffer[drop:], offset + drop
        while offset + len(buffer) < min(hi, n_samples) and (block := next(blocks, None)) is not None:
            if not len(buffer) and offset < lo:  # blocks before ``start``'s frame are skipped
                skip = min(lo - offset, len(block))
                block, offset = block[skip:], offset + skip
            buffer = np.concatenate([buffer, block])
        piece = np.array(buffer[: hi - lo], dtype=np.float32)
        yield np.pad(piece, (0, hi - lo - len(piece))) if len(piece) < hi - lo else piece


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
