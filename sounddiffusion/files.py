"""Safe writes: every output file appears under its final name only when it is complete.

Every file the package writes (PNGs, videos, the render state) goes through
:func:`write_atomically` or :func:`publish_file`: the bytes land under a temporary name in the
destination folder, are flushed to disk and only then take their final name, so a crash, a kill
or a full disk never leaves a half-written file under a name a user would open. Names are chosen
by :func:`next_numbered_path` (``PREFIX-NNNNN.png``) or :func:`unique_output_path`
(``song.mp4``, ``song-0001.mp4``, ...); an existing file is never overwritten.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

from sounddiffusion.errors import OutputError

log = logging.getLogger(__name__)

# Errors of os.link that mean "this file system has no hard links", not "the name is taken".
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def output_error(err: OSError, path: str | os.PathLike, retry: str = "run again") -> OutputError:
    """Turn an operating-system error met while writing ``path`` into an :class:`OutputError`.

    ``retry`` ends the disk-full message, e.g. ``"run again with --resume"``.
    """
    path = Path(path)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"disk full while writing {path}: free some space and {retry}")
    if err.errno in (errno.EACCES, errno.EPERM):
        return OutputError(
            f"no permission to write {path}: choose another output folder or make "
            f"{path.parent} writable")
    if err.errno == errno.EROFS:
        return OutputError(
            f"{path.parent} is on a read-only file system: choose another output folder")
    return OutputError(f"cannot write {path}: {err.strerror or err}")


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` (with its parents) and check that files can be written in it.

    Returns the folder as a :class:`Path`. Raises :class:`OutputError` naming the folder when
    it cannot be created (a file is in the way, no permission, read-only disk) or is not
    writable. Writability is tested by creating and removing a temporary file, which also
    catches read-only file systems and works for users (like root) that ignore permissions.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output folder {folder} is a file: remove it or choose another folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _folder_error(folder, err, f"cannot create output folder {folder} ({err.strerror or err}): "
                                         "choose another folder or create it yourself") from err
    try:
        fd, probe = create_temp_file(folder, ".write-test")
    except OSError as err:
        raise _folder_error(folder, err, f"output folder {folder} is not writable ({err.strerror or err}): "
                                         "choose another folder or fix its permissions") from err
    os.close(fd)
    probe.unlink()
    return folder


def _folder_error(folder: Path, err: OSError, otherwise: str) -> OutputError:
    """Why no file can be made in ``folder``: a read-only or a virtual file system, else ``otherwise``.

    A virtual file system (``/proc``, ``/sys``: no disk blocks behind it) refuses new files with
    "No such file or directory" or "Permission denied", which would send a user looking for a
    missing folder or a permission; it is named as what it is."""
    if err.errno == errno.EROFS:
        return OutputError(f"output folder {folder} is on a read-only file system: choose another folder")
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), None)
    statvfs = getattr(os, "statvfs", None)  # POSIX only
    if existing is not None and statvfs is not None:
        try:
            virtual = statvfs(existing).f_blocks == 0
        except OSError:
            virtual = False
        if virtual:
            return OutputError(f"output folder {folder} is on a virtual file system ({existing}: kernel "
                               f"views, not disk space) that cannot hold files: choose another folder")
    return OutputError(otherwise)


def create_temp_file(folder: str | os.PathLike, stem: str) -> tuple[int, Path]:
    """Create a new empty file ``folder/STEM.RANDOM.tmp``; returns its open descriptor and path.

    Unlike :func:`tempfile.mkstemp` the file gets the usual permissions (0666 less the umask),
    so the outputs renamed from it are readable like any other file the user makes.
    """
    while True:
        path = Path(folder) / f"{stem}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def next_numbered_path(folder: str | os.PathLike, prefix: str, ext: str = ".png",
                       digits: int = 5) -> Path:
    """The next free name ``folder/PREFIX-NNNNN.ext``, numbered after the highest existing one.

    Numbers start at 0 and continue after the highest number already present among files named
    ``PREFIX-<digits>.ext`` (any width), so deleting an earlier image never makes a name come
    back. Other files are ignored; a missing folder counts as empty.
    """
    folder = Path(folder)
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+){re.escape(ext)}")
    highest = -1
    if folder.is_dir():
        for entry in folder.iterdir():
            match = pattern.fullmatch(entry.name)
            if match:
                highest = max(highest, int(match.group(1)))
    return folder / f"{prefix}-{highest + 1:0{digits}d}{ext}"


def unique_output_path(path: str | os.PathLike) -> Path:
    """``path`` if no file has that name, else the first free ``STEM-0001.SUFFIX``, ``-0002``..."""
    path = Path(path)
    candidate, number = path, 0
    while os.path.lexists(candidate):
        number += 1
        candidate = path.with_name(f"{path.stem}-{number:04d}{path.suffix}")
    return candidate


def write_new_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path``, or to :func:`unique_output_path`'s free name when that
    one is taken, creating the folder; never replaces a file. Returns the path written.
    For reports and tables the scripts write; OS errors become :class:`OutputError`."""
    path = unique_output_path(ensure_output_dir(Path(path).parent) / Path(path).name)
    return write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def publish_file(temp: str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = False,
                 retry: str = "run again") -> Path:
    """Give the finished file ``temp`` its final name ``path`` (same folder or file system).

    The file is flushed to disk first. With ``overwrite=False`` an existing ``path`` is never
    replaced (a hard link claims the name atomically; file systems without hard links fall back
    to check-then-rename) and :class:`OutputError` is raised. ``temp`` is gone afterwards,
    whatever happens. OS errors become :class:`OutputError` (see :func:`output_error`).
    """
    temp, path = Path(temp), Path(path)
    try:
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(temp, path)
        else:
            _claim_name(temp, path)
        _fsync_dir(path.parent)
    except FileExistsError as err:
        raise OutputError(f"{path} already exists: not overwriting it; move it away") from err
    except OSError as err:
        raise output_error(err, path, retry) from err
    finally:
        temp.unlink(missing_ok=True)
    return path


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None], *,
                     overwrite: bool = False, retry: str = "run again") -> Path:
    """Write a file through ``write(binary_file)`` so that ``path`` appears only when complete.

    The bytes go to a temporary file in the same folder, which :func:`publish_file` then moves
    to ``path``. On any error or interrupt the temporary file is removed and nothing is left
    under ``path``; OS errors become :class:`OutputError`.
    """
    path = Path(path)
    try:
        fd, temp = create_temp_file(path.parent, f".{path.name}")
    except OSError as err:
        raise output_error(err, path, retry) from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise output_error(err, path, retry) from err
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return publish_file(temp, path, overwrite=overwrite, retry=retry)


def _claim_name(temp: Path, path: Path) -> None:
    """Move ``temp`` to ``path`` unless ``path`` exists (then raise FileExistsError)."""
    try:
        os.link(temp, path)
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
        # No hard links here (FAT, some network shares): a check right before the rename.
        if path.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from err
        os.replace(temp, path)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries so a rename survives a power cut (POSIX; skipped elsewhere)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        log.debug("cannot fsync folder %s", folder)
    finally:
        os.close(fd)
