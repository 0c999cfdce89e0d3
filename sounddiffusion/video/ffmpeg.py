"""The ffmpeg program: encoding frames into H.264 segments, joining them with sound.

ffmpeg comes from ``imageio_ffmpeg.get_ffmpeg_exe()``, so users need no system ffmpeg.

Video: H.264 (libx264, CRF 18 unless chosen, preset medium, no B-frames), yuv420p, BT.709
limited range, in MP4. Sound: AAC 192 kb/s. :func:`mux_segments` joins segments without re-encoding; the
video lasts ``frames / fps`` seconds and the sound is cut to that length.

Every file is made under a temporary name (:func:`sounddiffusion.files.create_temp_file`) in
the folder it belongs to, for :func:`sounddiffusion.files.publish_file` to name when complete.
"""
from __future__ import annotations

import logging
import os
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Mapping, Sequence

import imageio_ffmpeg
import numpy as np

from sounddiffusion.errors import OutputError, ParameterError
from sounddiffusion.files import create_temp_file, publish_file, write_atomically
from sounddiffusion.settings import CRF_RANGE, DEFAULT_CRF

log = logging.getLogger(__name__)

# No B-frames: their decoding delay differs between short and long segments, which would
# leave jumps in the joined video's timestamps (a wrong track length, frames shown twice).
# The quality is added as "-crf N" (settings.DEFAULT_CRF = 18 looks like the frames to most eyes
# at a modest size; 0 is the best and largest, 51 the worst).
VIDEO_CODEC = ["-c:v", "libx264", "-preset", "medium", "-bf", "0"]
# Convert RGB with the BT.709 matrix and say so in the stream, so players show the same colours.
VIDEO_FILTER = ("scale=out_color_matrix=bt709:out_range=tv,"
                "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv,"
                "format=yuv420p")
AUDIO_CODEC = ["-c:a", "aac", "-b:a", "192k"]

_CONCAT_LIST = "segments.ffconcat"
_LOG_TAIL_LINES = 12


def ffmpeg_exe() -> str:
    """The path of the ffmpeg program bundled with imageio-ffmpeg."""
    return imageio_ffmpeg.get_ffmpeg_exe()


class SegmentEncoder:
    """One ffmpeg process that encodes raw RGB frames from a pipe into an H.264 MP4 segment.

    ffmpeg's messages go to a log file, not a pipe, so a chatty ffmpeg can never block while
    we write frames into it. ``retry`` ends the disk-full message (see :func:`ffmpeg_error`).
    """

    def __init__(self, folder: Path, start: int, fps: Fraction, width: int, height: int, *,
                 crf: int = DEFAULT_CRF, retry: str = "run again"):
        """Start ffmpeg for the segment whose first frame is number ``start``, writing into
        ``folder``; frames are (height, width, 3) uint8 at ``fps`` frames per second, encoded at
        quality ``crf`` (see :data:`CRF_RANGE`; lower is better and larger)."""
        if not CRF_RANGE[0] <= crf <= CRF_RANGE[1]:
            raise ParameterError(f"--crf {crf}: use {CRF_RANGE[0]} (best, largest) to {CRF_RANGE[1]} "
                                 f"(worst, smallest); {DEFAULT_CRF} is the default")
        self.start = start
        self.frame_count = 0
        self.retry = retry
        # Unique names: an orphaned ffmpeg of a killed run may still be writing its own file.
        fd, self.temp = create_temp_file(folder, f".segment-{start:06d}.mp4")
        os.close(fd)
        self.log_path = self.temp.with_suffix(".log.tmp")
        command = [ffmpeg_exe(), "-hide_banner", "-loglevel", "warning", "-y",
                   "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
                   "-framerate", f"{fps.numerator}/{fps.denominator}", "-i", "pipe:0",
                   "-an", "-vf", VIDEO_FILTER, *VIDEO_CODEC, "-crf", str(crf), "-f", "mp4", str(self.temp)]
        try:
            with open(self.log_path, "wb") as log_file:
                self.process = subprocess.Popen(command, stdin=subprocess.PIPE,
                                                stdout=subprocess.DEVNULL, stderr=log_file,
                                                start_new_session=True)
        except OSError as err:
            self._remove_files()
            raise OutputError(f"cannot start ffmpeg ({ffmpeg_exe()}): {err}") from err

    def write(self, rgb: np.ndarray) -> None:
        """Send one (H, W, 3) uint8 frame; ffmpeg encodes it while the caller goes on."""
        try:
            self.process.stdin.write(np.ascontiguousarray(rgb).data)
        except OSError as err:  # BrokenPipeError: ffmpeg has stopped
            self.process.wait()
            message = self._log_text()
            self._remove_files()
            raise ffmpeg_error(message, f"encoding frame {self.start + self.frame_count}",
                               retry=self.retry) from err
        self.frame_count += 1

    def finish(self, path: Path) -> Path:
        """Wait for ffmpeg to encode the frames sent and name the segment ``path``."""
        try:
            self.process.stdin.close()
        except OSError:
            log.debug("ffmpeg closed its input early; its exit status tells why")
        if self.process.wait() != 0:
            message = self._log_text()
            self._remove_files()
            raise ffmpeg_error(message, f"encoding {path.name}", retry=self.retry)
        self.log_path.unlink(missing_ok=True)
        return publish_file(self.temp, path, retry=self.retry)

    def abort(self) -> None:
        """Stop ffmpeg at once and delete the unfinished segment (its frames are in PNGs)."""
        self.process.kill()
        try:
            self.process.stdin.close()
        except OSError:
            log.debug("ffmpeg's input was already closed")
        self.process.wait()
        self._remove_files()

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _remove_files(self) -> None:
        self.temp.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)


def mux_segments(segments: Sequence[Path], folder: Path, fps: Fraction, frame_count: int,
                 audio_path: str | os.PathLike | None, *, output_path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None, retry: str = "run again") -> Path:
    """Join the MP4 ``segments`` (all in ``folder``, no re-encoding) and add the sound.

    ``fps``: the segments' frame rate; the video is cut to ``frame_count / fps`` seconds and
    the sound at ``audio_path`` (None: silent) is encoded as AAC and cut to the same length.
    ``metadata``: container tags written with ``-metadata KEY=VALUE`` (e.g. ``comment``);
    without it the MP4 gets ffmpeg's own tags only. ``output_path``: the video being made,
    named in error messages; ``retry`` ends the disk-full message.

    Returns a temporary MP4 in ``folder`` for :func:`sounddiffusion.files.publish_file`.
    Raises :class:`OutputError` when ffmpeg fails (the temporary file is then removed).
    """
    tags = [] if metadata is None else _metadata_options(metadata)
    lines = ["ffconcat version 1.0", *(f"file '{Path(path).name}'" for path in segments)]
    text = "\n".join(lines).encode() + b"\n"
    concat_list = write_atomically(folder / _CONCAT_LIST, lambda f: f.write(text),
                                   overwrite=True, retry=retry)
    fd, temp = create_temp_file(folder, ".mux.mp4")
    os.close(fd)
    duration = Fraction(frame_count) / fps
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "warning", "-y",
               "-f", "concat", "-i", str(concat_list)]
    if audio_path is not None:
        command += ["-i", str(audio_path), "-map", "0:v:0", "-map", "1:a:0", *AUDIO_CODEC]
    command += ["-c:v", "copy", "-t", f"{float(duration):.6f}", *tags, "-movflags", "+faststart",
                "-f", "mp4", str(temp)]
    result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)
    if result.returncode != 0:
        temp.unlink(missing_ok=True)
        raise ffmpeg_error(result.stderr, f"writing the video {output_path}", retry=retry)
    return temp


def _metadata_options(metadata: Mapping[str, str]) -> list[str]:
    """``-metadata KEY=VALUE`` for each tag; ValueError for a key ffmpeg would misread."""
    options = []
    for key, value in metadata.items():
        if not key or "=" in key or not key.isprintable():
            raise ValueError(f"metadata key {key!r} must be a non-empty name without '='")
        options += ["-metadata", f"{key}={value}"]
    return options


def ffmpeg_error(stderr: str, what: str, *, retry: str = "run again") -> OutputError:
    """An :class:`OutputError` for a failed ffmpeg run, with the last lines it printed.

    ``what``: what ffmpeg was doing ("encoding frame 12"); ``retry`` ends the disk-full
    message, e.g. ``"run again with --resume"``.
    """
    if "No space left on device" in stderr:
        return OutputError(f"disk full while {what}: free some space and {retry}")
    tail = "\n".join(stderr.strip().splitlines()[-_LOG_TAIL_LINES:])
    return OutputError(f"ffmpeg failed while {what}:\n{tail}")
