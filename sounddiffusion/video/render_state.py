"""The state folder of a resumable video render: settings, lock, frames, checkpoint, recovery.

A render of ``song.mp4`` owns the state folder ``song.mp4.render/`` beside it::

    settings.json                     fps, size, segment length, the frame-affecting settings
    segment-000000-000040.mp4         finished H.264 segments: frames [0, 40), [40, 80), ...
    preview-part.mp4                  the unfinished segment's frames while a preview is made
    frame-000080.png, ...             lossless copies of the frames of the unfinished segment
    checkpoint.npz                    the caller's resume data for the last finished frame
    lock                              locked while a process renders into the folder

Every file there is written under a temporary name and renamed when complete, and a frame
counts as finished once its PNG and its checkpoint are on disk, so a kill at any moment loses
no finished frame. :class:`RenderState` creates a fresh folder (emptying one that stopped
before its first frame), refuses to resume with other settings, finds where a stopped render
ended (:meth:`RenderState.recover`) and reads and writes the frames and the checkpoint.
Encoding the segments is :mod:`sounddiffusion.video.ffmpeg`'s business, ordering it all
:class:`sounddiffusion.video.render.VideoRender`'s.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
from PIL import Image

from sounddiffusion.errors import OutputError, ParameterError
from sounddiffusion.files import output_error, write_atomically
from sounddiffusion.images import read_rgb

log = logging.getLogger(__name__)

STATE_SUFFIX = ".render"
STATE_FORMAT = 1
RESUME_HINT = "run again with --resume"

_SETTINGS_FILE = "settings.json"
_CHECKPOINT_FILE = "checkpoint.npz"
_LOCK_FILE = "lock"
_PREVIEW_PART = "preview-part.mp4"
_SEGMENT_NAME = re.compile(r"segment-(\d{6})-(\d{6})\.mp4")
_FRAME_NAME = re.compile(r"frame-(\d{6})\.png")
# Checkpoint entries that are not the caller's arrays.
_INDEX_KEY, _EXTRA_KEY = "__frame_index__", "__extra__"


class Checkpoint(NamedTuple):
    """The caller's resume data saved with a finished frame: ``(frame_index, arrays, extra)``.

    ``frame_index`` is the 0-based index of that frame, ``arrays`` the numpy arrays (e.g. the
    frame's latent (1, 4, H/8, W/8) float32 and RNG states as uint8), ``extra`` a JSON object.
    """

    frame_index: int
    arrays: dict[str, np.ndarray]
    extra: dict


class Progress(NamedTuple):
    """Where a stopped render ended: frames [0, encoded) are in ``segments`` (in order),
    frames [encoded, frames_done) in PNGs of the state folder."""

    frames_done: int
    encoded: int
    segments: list[Path]


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


class RenderState:
    """The state folder ``OUTPUT.render/`` of a render of ``output_path`` (see the module
    docstring). :meth:`create` or :meth:`check_resumable` lock it for this process until
    :meth:`release`."""

    def __init__(self, output_path: Path):
        self.output_path = output_path
        self.folder = output_path.with_name(output_path.name + STATE_SUFFIX)
        self._lock: _StateLock | None = None

    def create(self, record: dict) -> None:
        """Make the state folder of a fresh render and store its ``record`` (a JSON object
        with ``format``, ``fps``, ``width``, ``height`` and ``settings``).

        A state folder left by a render that stopped before finishing a frame holds nothing to
        continue from, so it is emptied and reused; one with finished frames, or one that another
        process is rendering into, is never touched (:class:`OutputError`)."""
        try:
            self.folder.mkdir(exist_ok=True)
        except OSError as err:
            raise output_error(err, self.folder) from err
        self._take_lock()
        if self._has_finished_frames():
            raise self._unfinished()
        leftovers = [path for path in self.folder.iterdir() if path.name != _LOCK_FILE]
        if leftovers:
            log.info("an earlier render of %s stopped before its first frame: starting again", self.output_path)
            for path in leftovers:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        text = json.dumps(record, indent=2, sort_keys=True).encode()
        try:
            write_atomically(self.folder / _SETTINGS_FILE, lambda f: f.write(text))
        except BaseException:
            # A state folder without settings could never be resumed: leave nothing.
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def check_resumable(self, record: dict) -> dict:
        """Lock the folder and refuse to resume a render that does not exist
        (:class:`OutputError`) or was started with another ``record`` (:class:`ParameterError`
        listing each difference in fps, size or settings). Returns the stored record."""
        if not self.folder.is_dir():
            raise OutputError(
                f"there is no unfinished render of {self.output_path} to resume "
                f"({self.folder} does not exist): run without --resume")
        self._take_lock()
        try:
            stored = json.loads((self.folder / _SETTINGS_FILE).read_text())
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
                f"or delete {self.folder} to start again")
        return stored

    def check_startable(self, record: dict, resume: bool) -> None:
        """Refuse now, changing nothing, what :meth:`create` (``resume`` False) or
        :meth:`check_resumable` would refuse: an unfinished render where a fresh one starts, no
        render or one of other settings to resume, a render another process holds. For a check
        before the model loads; the lock is not kept."""
        try:
            if resume:
                self.check_resumable(record)
            elif self.folder.is_dir():
                self._take_lock()
                if self._has_finished_frames():
                    raise self._unfinished()
        finally:
            self.release()

    def recover(self) -> Progress:
        """Find where a stopped render ended, from its segments, PNGs and checkpoint.

        A frame is finished when its checkpoint is written: PNGs beyond the checkpoint and
        leftovers of interrupted writes are deleted, PNGs already in a segment are too. The
        remaining PNGs are for the caller to encode again. Raises :class:`OutputError` when
        the files do not fit together.
        """
        for leftover in [*self.folder.glob(".*.tmp"), *self.folder.glob(_PREVIEW_PART)]:
            leftover.unlink(missing_ok=True)
        checkpoint = self.load_checkpoint()
        frames_done = 0 if checkpoint is None else checkpoint.frame_index + 1
        encoded, segments = 0, []
        for path in sorted(self.folder.glob("segment-*.mp4")):
            match = _SEGMENT_NAME.fullmatch(path.name)
            if match is None or int(match.group(1)) != encoded:
                raise self._damaged(f"segment {path.name} does not follow frame {encoded}")
            encoded = int(match.group(2))
            segments.append(path)
        if encoded > frames_done:
            raise self._damaged(f"frames up to {encoded} are encoded but the checkpoint "
                                f"is for frame {frames_done - 1}")
        for path in self.folder.glob("frame-*.png"):
            match = _FRAME_NAME.fullmatch(path.name)
            if match and not encoded <= int(match.group(1)) < frames_done:
                path.unlink()
        for index in range(encoded, frames_done):
            if not self.frame_path(index).exists():
                raise self._damaged(f"frame {index} ({self.frame_path(index).name}) is missing")
        log.info("resuming %s after %d finished frames", self.output_path, frames_done)
        return Progress(frames_done, encoded, segments)

    def load_checkpoint(self) -> Checkpoint | None:
        """The resume data saved with the last finished frame, or None before the first frame."""
        path = self.folder / _CHECKPOINT_FILE
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

    def save_checkpoint(self, index: int, arrays: Mapping[str, np.ndarray],
                        extra: Mapping) -> None:
        """Store the resume data of frame ``index`` (replacing the previous frame's): numpy
        ``arrays`` by name (not starting with ``__``) and ``extra``, a JSON object."""
        reserved = [name for name in arrays if name.startswith("__")]
        if reserved:
            raise ValueError(f"checkpoint array names must not start with '__': {reserved}")
        entries = {**{name: np.asarray(value) for name, value in arrays.items()},
                   _INDEX_KEY: np.int64(index), _EXTRA_KEY: np.str_(json.dumps(extra))}
        write_atomically(self.folder / _CHECKPOINT_FILE,
                         lambda f: np.savez(f, allow_pickle=False, **entries),
                         overwrite=True, retry=RESUME_HINT)

    def save_frame(self, index: int, rgb: np.ndarray) -> None:
        """Keep frame ``index`` ((H, W, 3) uint8) as a PNG until its segment is encoded."""
        picture = Image.fromarray(rgb, mode="RGB")
        # Level 1: these PNGs live only until their segment is encoded, so speed beats size.
        write_atomically(self.frame_path(index),
                         lambda f: picture.save(f, format="PNG", compress_level=1),
                         overwrite=True, retry=RESUME_HINT)

    def read_frame(self, index: int) -> np.ndarray:
        """The kept PNG of frame ``index`` as (H, W, 3) uint8."""
        return read_rgb(self.frame_path(index))

    def drop_frames(self, start: int, end: int) -> None:
        """Delete the PNGs of frames [start, end), once a segment holds them."""
        for index in range(start, end):
            self.frame_path(index).unlink(missing_ok=True)

    def frame_path(self, index: int) -> Path:
        return self.folder / f"frame-{index:06d}.png"

    def preview_part_path(self) -> Path:
        """Where a preview puts the unfinished segment's frames while it is made (then deleted)."""
        return self.folder / _PREVIEW_PART

    def segment_path(self, start: int, end: int) -> Path:
        """The name of the finished segment of frames [start, end)."""
        return self.folder / f"segment-{start:06d}-{end:06d}.mp4"

    def release(self) -> None:
        """Let go of the folder's lock (if this process holds it); the files stay."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def remove(self) -> None:
        """Delete the state folder (after the render is finished and released)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _take_lock(self) -> None:
        """Hold the state folder's lock until :meth:`release`, or raise :class:`OutputError`
        when another process renders into it (two writers would mix their frames)."""
        try:
            self._lock = _StateLock.acquire(self.folder / _LOCK_FILE)
        except BlockingIOError as err:
            raise OutputError(f"another process is rendering {self.output_path} now ({self.folder} "
                              f"is in use): wait for it to end, or choose another --output") from err
        except OSError as err:
            raise output_error(err, self.folder) from err

    def _has_finished_frames(self) -> bool:
        """Whether the state folder holds a finished frame (a checkpoint or a segment)."""
        return ((self.folder / _CHECKPOINT_FILE).exists()
                or any(self.folder.glob("segment-*.mp4")))

    def _unfinished(self) -> OutputError:
        return OutputError(f"an unfinished render of {self.output_path} exists: add --resume to continue "
                           f"it, or delete {self.folder} to start again")

    def _damaged(self, why: str) -> OutputError:
        return OutputError(f"the render state in {self.folder} is damaged: {why}; "
                           f"delete {self.folder} and start again")
