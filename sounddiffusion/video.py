"""Music videos: frames piped into ffmpeg, in-progress previews, resumable renders, the final mux.

ffmpeg comes from ``imageio_ffmpeg.get_ffmpeg_exe()``, so users need no system ffmpeg.

A render of ``song.mp4`` owns the state folder ``song.mp4.render/`` beside it::

    settings.json                     fps, size and the frame-affecting settings it started with
    segment-000000-000040.mp4         finished H.264 segments: frames [0, 40), [40, 80), ...
    frame-000080.png, ...             lossless copies of the frames of the unfinished segment
    checkpoint.npz                    the caller's resume data for the last finished frame
    lock                              locked while a process renders into the folder

Every file there is written under a temporary name and renamed when complete, and a frame
counts as finished once its PNG and its checkpoint are on disk. So a kill at any moment
(Ctrl-C, SIGTERM, SIGKILL, power cut) loses no finished frame: ``VideoRender.open(...,
resume=True)`` re-feeds the PNGs of the unfinished segment into a new encoder and the caller
continues from :meth:`VideoRender.load_checkpoint`. Frames are encoded by a child ffmpeg process
while the caller computes the next one. :meth:`VideoRender.finish` joins the segments without
re-encoding, adds the sound as AAC, gives the MP4 its final name only when it is complete and
removes the state folder.

Video: H.264 (libx264, CRF 18, preset medium, no B-frames), yuv420p, BT.709 limited range,
in MP4. Sound: AAC 192 kb/s. The video lasts ``frames / fps`` seconds and the sound is cut to
that length, so a caller that renders ``ceil(sound duration * fps)`` frames gets a video as
long as the sound within one frame.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import Mapping, NamedTuple

import imageio_ffmpeg
import numpy as np
from PIL import Image

from sounddiffusion.errors import OutputError, ParameterError
from sounddiffusion.images import (create_temp_file, ensure_output_dir, output_error,
                                   publish_file, read_rgb, write_atomically)

log = logging.getLogger(__name__)

STATE_SUFFIX = ".render"
PREVIEW_SUFFIX = ".preview"
DEFAULT_SEGMENT_SECONDS = 4.0
STATE_FORMAT = 1
RESUME_HINT = "run again with --resume"

# No B-frames: their decoding delay differs between short and long segments, which would
# leave jumps in the joined video's timestamps (a wrong track length, frames shown twice).
VIDEO_CODEC = ["-c:v", "libx264", "-preset", "medium", "-crf", "18", "-bf", "0"]
# Convert RGB with the BT.709 matrix and say so in the stream, so players show the same colours.
VIDEO_FILTER = ("scale=out_color_matrix=bt709:out_range=tv,"
                "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv,"
                "format=yuv420p")
AUDIO_CODEC = ["-c:a", "aac", "-b:a", "192k"]

_SETTINGS_FILE = "settings.json"
_CHECKPOINT_FILE = "checkpoint.npz"
_LOCK_FILE = "lock"
_CONCAT_LIST = "segments.ffconcat"
_SEGMENT_NAME = re.compile(r"segment-(\d{6})-(\d{6})\.mp4")
_FRAME_NAME = re.compile(r"frame-(\d{6})\.png")
# Checkpoint entries that are not the caller's arrays.
_INDEX_KEY, _EXTRA_KEY = "__frame_index__", "__extra__"
_LOG_TAIL_LINES = 12


def ffmpeg_exe() -> str:
    """The path of the ffmpeg program bundled with imageio-ffmpeg."""
    return imageio_ffmpeg.get_ffmpeg_exe()


def unique_output_path(path: str | os.PathLike) -> Path:
    """``path`` if no file has that name, else the first free ``STEM-0001.SUFFIX``, ``-0002``..."""
    path = Path(path)
    candidate, number = path, 0
    while os.path.lexists(candidate):
        number += 1
        candidate = path.with_name(f"{path.stem}-{number:04d}{path.suffix}")
    return candidate


class Checkpoint(NamedTuple):
    """The caller's resume data saved with a finished frame: ``(frame_index, arrays, extra)``.

    ``frame_index`` is the 0-based index of that frame, ``arrays`` the numpy arrays (e.g. the
    frame's latent (1, 4, H/8, W/8) float32 and RNG states as uint8), ``extra`` a JSON object.
    """

    frame_index: int
    arrays: dict[str, np.ndarray]
    extra: dict


class _StateLock:
    """An exclusive lock on a file, held by this process until :meth:`release` or its end
    (the operating system lets go of it when the process dies, even by SIGKILL)."""

    def __init__(self, handle):
        self._handle = handle

    @classmethod
    def acquire(cls, path: Path) -> _StateLock:
        """Lock ``path`` (created if missing); raises BlockingIOError when another holds it."""
        handle = open(path, "a+b")
        try:
            if os.name == "nt":
                import msvcrt

                handle.seek(0)
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                except OSError as err:
                    raise BlockingIOError(*err.args) from err
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            handle.close()
            raise
        return cls(handle)

    def release(self) -> None:
        # Closing the file lets go of the lock on every system.
        self._handle.close()


class VideoRender:
    """A resumable render of RGB frames into an MP4 with sound; see the module docstring.

    Make one with :meth:`open`; use it as a context manager (or call :meth:`close`) so that an
    error or Ctrl-C stops the encoder and keeps the state for ``--resume``::

        with VideoRender.open("out/song.mp4", fps, 512, 512, settings, resume) as render:
            start = render.frames_done          # 0, or where the last run stopped
            ...                                 # continue from render.load_checkpoint()
            render.add_frame(rgb, {"latent": z}, {"seed": seed})
            render.write_preview("song.wav")    # every --preview_every seconds of video
            path = render.finish("song.wav")
    """

    def __init__(self, output_path: Path, fps: Fraction, width: int, height: int,
                 segment_frames: int):
        """Internal: use :meth:`open`."""
        self.output_path = output_path
        self.fps = fps
        self.width = width
        self.height = height
        self.segment_frames = segment_frames
        self.state_dir = output_path.with_name(output_path.name + STATE_SUFFIX)
        self.preview_path = output_path.with_name(
            f"{output_path.stem}{PREVIEW_SUFFIX}{output_path.suffix}")
        self._frames_done = 0
        # Frames [0, _encoded) are in finished segments, [_encoded, _frames_done) in PNGs.
        self._encoded = 0
        self._segments: list[Path] = []
        self._encoder: _SegmentEncoder | None = None
        self._lock: _StateLock | None = None

    @classmethod
    def open(cls, output_path: str | os.PathLike, fps: float | Fraction, width: int,
             height: int, settings: Mapping, resume: bool = False,
             segment_frames: int | None = None) -> VideoRender:
        """Start a render of ``output_path`` or, with ``resume=True``, continue an unfinished one.

        ``fps``: frames per second, a float (7.5, 29.97 are taken as exact decimals) or a
        Fraction (30000/1001). ``width``, ``height``: frame size in pixels, both even.
        ``settings``: a JSON object of every setting that changes the frames (prompt, seed,
        strength, checkpoint hash, ...), but not those that don't (preview interval, paths);
        a resume with other settings, fps or size is refused with :class:`ParameterError`.
        ``segment_frames``: frames per encoded segment, by default ``DEFAULT_SEGMENT_SECONDS``
        of video; choose ``fps * preview interval`` so that segment ends meet preview points.

        The final file is named at :meth:`finish` by :func:`unique_output_path`, so an existing
        ``output_path`` is never overwritten; the state folder and preview are named after
        ``output_path``. Raises :class:`OutputError` when a fresh render finds an unfinished
        one (its state folder) or a resume finds none, or when the folder cannot be written.
        """
        output_path = Path(output_path)
        fps = _as_fraction(fps)
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ParameterError(f"video frames must have an even width and height, "
                                 f"got {width}x{height}: use multiples of 64")
        if segment_frames is None:
            segment_frames = max(1, round(fps * Fraction(str(DEFAULT_SEGMENT_SECONDS))))
        if segment_frames < 1:
            raise ValueError(f"segment_frames must be at least 1, got {segment_frames}")
        ensure_output_dir(output_path.parent)
        render = cls(output_path, fps, width, height, segment_frames)
        record = {"format": STATE_FORMAT, "fps": str(fps), "width": width, "height": height,
                  "settings": json.loads(json.dumps(settings))}
        try:
            if resume:
                render._check_resumable(record)
                render._recover()
            else:
                render._create_state(record)
        except BaseException:
            render.close()
            raise
        return render

    @property
    def frames_done(self) -> int:
        """How many frames are finished (the index of the next frame to add)."""
        return self._frames_done

    def load_checkpoint(self) -> Checkpoint | None:
        """The resume data saved with the last finished frame, or None before the first frame."""
        path = self.state_dir / _CHECKPOINT_FILE
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {key: stored[key] for key in stored.files
                          if key not in (_INDEX_KEY, _EXTRA_KEY)}
                return Checkpoint(int(stored[_INDEX_KEY]), arrays,
                                  json.loads(str(stored[_EXTRA_KEY])))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise self._damaged(f"{path.name} cannot be read ({err})") from err

    def add_frame(self, rgb: np.ndarray, arrays: Mapping[str, np.ndarray] | None = None,
                  extra: Mapping | None = None) -> None:
        """Append frame number :attr:`frames_done` and the resume data to continue after it.

        ``rgb``: (height, width, 3) uint8. ``arrays``: numpy arrays by name (names must not
        start with ``__``); ``extra``: a JSON object; both come back from
        :meth:`load_checkpoint`. When this returns the frame is safe on disk. Raises
        :class:`OutputError` when the disk is full or ffmpeg fails; the frame is then not
        counted, and it can be added again or the render resumed later.
        """
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"expected a ({self.height}, {self.width}, 3) uint8 frame, "
                             f"got {rgb.shape} {rgb.dtype}")
        index = self._frames_done
        picture = Image.fromarray(rgb, mode="RGB")
        # Level 1: these PNGs live only until their segment is encoded, so speed beats size.
        write_atomically(self._frame_path(index),
                         lambda f: picture.save(f, format="PNG", compress_level=1),
                         overwrite=True, retry=RESUME_HINT)
        try:
            self._current_encoder().write(rgb)
            self._save_checkpoint(index, arrays or {}, extra or {})
        except BaseException:
            # The encoder may hold this unfinished frame; the next one starts again from PNGs.
            self.close()
            raise
        self._frames_done = index + 1
        if self._frames_done - self._encoded >= self.segment_frames:
            self._close_segment()

    def write_preview(self, audio_path: str | os.PathLike | None) -> Path | None:
        """Replace the preview MP4 (``STEM.preview.mp4``) with the frames finished so far.

        The preview has the matching stretch of the sound at ``audio_path`` (None: silent).
        The current segment is closed so that every finished frame is in it. Returns the
        preview's path, or None while no frame is finished.
        """
        if self._frames_done == 0:
            return None
        self._close_segment()
        temp = self._mux(audio_path)
        return publish_file(temp, self.preview_path, overwrite=True, retry=RESUME_HINT)

    def finish(self, audio_path: str | os.PathLike | None) -> Path:
        """Write the complete video with the sound at ``audio_path`` (None: silent).

        The MP4 appears under :func:`unique_output_path` of the requested name only when
        complete; then the preview and the state folder are removed. Returns the final path.
        """
        if self._frames_done == 0:
            raise OutputError(f"no frames were rendered for {self.output_path}: nothing to write")
        self._close_segment()
        temp = self._mux(audio_path)
        final = publish_file(temp, unique_output_path(self.output_path), retry=RESUME_HINT)
        self.preview_path.unlink(missing_ok=True)
        self.close()  # Windows deletes no file that is open
        shutil.rmtree(self.state_dir, ignore_errors=True)
        log.info("wrote %s (%d frames)", final, self._frames_done)
        return final

    def close(self) -> None:
        """Stop the encoder of the unfinished segment and let go of the state folder; the
        state stays for ``--resume``."""
        if self._encoder is not None:
            self._encoder.abort()
            self._encoder = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> VideoRender:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _create_state(self, record: dict) -> None:
        """Make the state folder of a fresh render and store its settings.

        A state folder left by a render that stopped before finishing a frame holds nothing to
        continue from, so it is emptied and reused; one with finished frames, or one that another
        process is rendering into, is never touched."""
        try:
            self.state_dir.mkdir(exist_ok=True)
        except OSError as err:
            raise output_error(err, self.state_dir) from err
        self._take_lock()
        if self._has_finished_frames():
            raise OutputError(
                f"an unfinished render of {self.output_path} exists: add --resume to continue "
                f"it, or delete {self.state_dir} to start again")
        leftovers = [path for path in self.state_dir.iterdir() if path.name != _LOCK_FILE]
        if leftovers:
            log.info("an earlier render of %s stopped before its first frame: starting again", self.output_path)
            for path in leftovers:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        text = json.dumps(record, indent=2, sort_keys=True).encode()
        try:
            write_atomically(self.state_dir / _SETTINGS_FILE, lambda f: f.write(text))
        except BaseException:
            # A state folder without settings could never be resumed: leave nothing.
            shutil.rmtree(self.state_dir, ignore_errors=True)
            raise

    def _take_lock(self) -> None:
        """Hold the state folder's lock until :meth:`close`, or raise :class:`OutputError`
        when another process renders into it (two writers would mix their frames)."""
        try:
            self._lock = _StateLock.acquire(self.state_dir / _LOCK_FILE)
        except BlockingIOError as err:
            raise OutputError(f"another process is rendering {self.output_path} now ({self.state_dir} "
                              f"is in use): wait for it to end, or choose another --output") from err
        except OSError as err:
            raise output_error(err, self.state_dir) from err

    def _has_finished_frames(self) -> bool:
        """Whether the state folder holds a finished frame (a checkpoint or a segment)."""
        return ((self.state_dir / _CHECKPOINT_FILE).exists()
                or any(self.state_dir.glob("segment-*.mp4")))

    def _check_resumable(self, record: dict) -> None:
        """Refuse to resume a render that does not exist or was started with other settings."""
        if not self.state_dir.is_dir():
            raise OutputError(
                f"there is no unfinished render of {self.output_path} to resume "
                f"({self.state_dir} does not exist): run without --resume")
        self._take_lock()
        try:
            stored = json.loads((self.state_dir / _SETTINGS_FILE).read_text())
        except (OSError, ValueError) as err:
            raise self._damaged(f"{_SETTINGS_FILE} cannot be read ({err})") from err
        if stored.get("format") != STATE_FORMAT:
            raise self._damaged(f"{_SETTINGS_FILE} has an unknown format")
        now = {"fps": record["fps"], "size": f"{record['width']}x{record['height']}",
               **record["settings"]}
        then = {"fps": stored.get("fps"), "size": f"{stored.get('width')}x{stored.get('height')}",
                **stored.get("settings", {})}
        differences = [f"{key}: {then.get(key)!r} then, {now.get(key)!r} now"
                       for key in sorted(now.keys() | then.keys()) if now.get(key) != then.get(key)]
        if differences:
            raise ParameterError(
                f"cannot resume the render of {self.output_path} with other settings "
                f"({'; '.join(differences)}): resume with the settings it was started with, "
                f"or delete {self.state_dir} to start again")

    def _recover(self) -> None:
        """Find where a stopped render ended, from its segments, PNGs and checkpoint.

        A frame is finished when its checkpoint is written: PNGs beyond the checkpoint and
        leftovers of interrupted writes are deleted, PNGs already in a segment are too. The
        remaining PNGs are encoded again when the next frame comes.
        """
        for leftover in self.state_dir.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        checkpoint = self.load_checkpoint()
        self._frames_done = 0 if checkpoint is None else checkpoint.frame_index + 1
        for path in sorted(self.state_dir.glob("segment-*.mp4")):
            match = _SEGMENT_NAME.fullmatch(path.name)
            if match is None or int(match.group(1)) != self._encoded:
                raise self._damaged(f"segment {path.name} does not follow frame {self._encoded}")
            self._encoded = int(match.group(2))
            self._segments.append(path)
        if self._encoded > self._frames_done:
            raise self._damaged(f"frames up to {self._encoded} are encoded but the checkpoint "
                                f"is for frame {self._frames_done - 1}")
        for path in self.state_dir.glob("frame-*.png"):
            match = _FRAME_NAME.fullmatch(path.name)
            if match and not self._encoded <= int(match.group(1)) < self._frames_done:
                path.unlink()
        for index in range(self._encoded, self._frames_done):
            if not self._frame_path(index).exists():
                raise self._damaged(f"frame {index} ({self._frame_path(index).name}) is missing")
        log.info("resuming %s after %d finished frames", self.output_path, self._frames_done)

    def _current_encoder(self) -> _SegmentEncoder:
        """The encoder of the unfinished segment; a new one is first fed the segment's PNGs."""
        if self._encoder is None:
            encoder = _SegmentEncoder(self.state_dir, self._encoded, self.fps, self.width,
                                      self.height)
            try:
                for index in range(self._encoded, self._frames_done):
                    encoder.write(read_rgb(self._frame_path(index)))
            except BaseException:
                encoder.abort()
                raise
            self._encoder = encoder
        return self._encoder

    def _close_segment(self) -> None:
        """Encode the finished frames not yet in a segment into one, then drop their PNGs."""
        if self._frames_done == self._encoded:
            return
        encoder, self._encoder = self._current_encoder(), None
        start, end = self._encoded, self._frames_done
        self._segments.append(encoder.finish(self.state_dir / f"segment-{start:06d}-{end:06d}.mp4"))
        self._encoded = end
        for index in range(start, end):
            self._frame_path(index).unlink(missing_ok=True)

    def _save_checkpoint(self, index: int, arrays: Mapping[str, np.ndarray],
                         extra: Mapping) -> None:
        """Store the resume data of frame ``index`` (replacing the previous frame's)."""
        reserved = [name for name in arrays if name.startswith("__")]
        if reserved:
            raise ValueError(f"checkpoint array names must not start with '__': {reserved}")
        entries = {**{name: np.asarray(value) for name, value in arrays.items()},
                   _INDEX_KEY: np.int64(index), _EXTRA_KEY: np.str_(json.dumps(extra))}
        write_atomically(self.state_dir / _CHECKPOINT_FILE,
                         lambda f: np.savez(f, allow_pickle=False, **entries),
                         overwrite=True, retry=RESUME_HINT)

    def _mux(self, audio_path: str | os.PathLike | None) -> Path:
        """Join the segments (no re-encoding) and add the sound, cut to the video's length.

        Returns a temporary MP4 in the state folder for :func:`publish_file`.
        """
        lines = ["ffconcat version 1.0", *(f"file '{path.name}'" for path in self._segments)]
        text = "\n".join(lines).encode() + b"\n"
        concat_list = write_atomically(self.state_dir / _CONCAT_LIST, lambda f: f.write(text),
                                       overwrite=True, retry=RESUME_HINT)
        fd, temp = create_temp_file(self.state_dir, ".mux.mp4")
        os.close(fd)
        duration = Fraction(self._frames_done) / self.fps
        command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "warning", "-y",
                   "-f", "concat", "-i", str(concat_list)]
        if audio_path is not None:
            command += ["-i", str(audio_path), "-map", "0:v:0", "-map", "1:a:0", *AUDIO_CODEC]
        command += ["-c:v", "copy", "-t", f"{float(duration):.6f}", "-movflags", "+faststart",
                    "-f", "mp4", str(temp)]
        result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, errors="replace",
                                start_new_session=True)
        if result.returncode != 0:
            temp.unlink(missing_ok=True)
            raise _ffmpeg_error(result.stderr, f"writing the video {self.output_path}")
        return temp

    def _frame_path(self, index: int) -> Path:
        return self.state_dir / f"frame-{index:06d}.png"

    def _damaged(self, why: str) -> OutputError:
        return OutputError(f"the render state in {self.state_dir} is damaged: {why}; "
                           f"delete {self.state_dir} and start again")


class _SegmentEncoder:
    """One ffmpeg process that encodes raw RGB frames from a pipe into an H.264 MP4 segment.

    ffmpeg's messages go to a log file, not a pipe, so a chatty ffmpeg can never block while
    we write frames into it.
    """

    def __init__(self, folder: Path, start: int, fps: Fraction, width: int, height: int):
        self.start = start
        self.frame_count = 0
        # Unique names: an orphaned ffmpeg of a killed run may still be writing its own file.
        fd, self.temp = create_temp_file(folder, f".segment-{start:06d}.mp4")
        os.close(fd)
        self.log_path = self.temp.with_suffix(".log.tmp")
        command = [ffmpeg_exe(), "-hide_banner", "-loglevel", "warning", "-y",
                   "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
                   "-framerate", f"{fps.numerator}/{fps.denominator}", "-i", "pipe:0",
                   "-an", "-vf", VIDEO_FILTER, *VIDEO_CODEC, "-f", "mp4", str(self.temp)]
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
            raise _ffmpeg_error(message, f"encoding frame {self.start + self.frame_count}") \
                from err
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
            raise _ffmpeg_error(message, f"encoding {path.name}")
        self.log_path.unlink(missing_ok=True)
        return publish_file(self.temp, path, retry=RESUME_HINT)

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


def _ffmpeg_error(stderr: str, what: str) -> OutputError:
    """An :class:`OutputError` for a failed ffmpeg run, with the last lines it printed."""
    if "No space left on device" in stderr:
        return OutputError(f"disk full while {what}: free some space and {RESUME_HINT}")
    tail = "\n".join(stderr.strip().splitlines()[-_LOG_TAIL_LINES:])
    return OutputError(f"ffmpeg failed while {what}:\n{tail}")


def probe_video(path: str | os.PathLike) -> dict:
    """Describe a video file, for tests and users (imageio-ffmpeg has no ffprobe).

    Returns a dict: ``frames`` (int, counted by decoding), ``fps`` (float, as ffmpeg prints
    it, 2 decimals), ``duration`` (s, the container's), ``video_duration`` (s, decoded),
    ``width``, ``height`` (px), ``video_codec``, ``pix_fmt`` (str), ``has_audio`` (bool) and,
    with sound, ``audio_codec`` (str), ``sample_rate`` (Hz) and ``audio_duration`` (s, from the
    count of decoded samples). The stream facts come from the text of ``ffmpeg -i``. Raises
    :class:`ParameterError` when ffmpeg cannot read ``path`` as a video.
    """
    path = Path(path)
    header = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, errors="replace").stderr
    duration = re.search(r"Duration: (\d+):(\d+):(\d+\.\d+)", header)
    video = re.search(r"Stream #\d+:\d+.*?: Video: (\w+)[^,]*, (\w+)(?:\([^)]*\))?, "
                      r"(\d+)x(\d+).*?([\d.]+) fps", header)
    if duration is None or video is None:
        raise ParameterError(f"{path} is not a video ffmpeg can read:\n{header.strip()}")
    frames, video_seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    info = {"frames": frames, "fps": float(video.group(5)),
            "duration": _seconds(*duration.groups()), "video_duration": video_seconds,
            "width": int(video.group(3)), "height": int(video.group(4)),
            "video_codec": video.group(1), "pix_fmt": video.group(2), "has_audio": False}
    audio = re.search(r"Stream #\d+:\d+.*?: Audio: (\w+)[^,]*, (\d+) Hz", header)
    if audio:
        sample_rate = int(audio.group(2))
        samples = subprocess.run(
            [ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-i", str(path), "-map", "0:a:0",
             "-ac", "1", "-f", "s16le", "pipe:1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
        info.update(has_audio=True, audio_codec=audio.group(1), sample_rate=sample_rate,
                    audio_duration=len(samples) / 2 / sample_rate)
    return info


def _seconds(hours: str, minutes: str, seconds: str) -> float:
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _as_fraction(fps: float | Fraction) -> Fraction:
    """Frames per second as an exact fraction: floats are read as the decimal they print as."""
    rate = Fraction(repr(fps)) if isinstance(fps, float) else Fraction(fps)
    if rate <= 0:
        raise ParameterError(f"--fps must be positive, got {fps}")
    return rate
