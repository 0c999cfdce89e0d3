"""PNG outputs: numbered names, embedded generation parameters, grids, init images, safe writes.

Every file written here and in :mod:`sounddiffusion.video` goes through
:func:`write_atomically` or :func:`publish_file`: the bytes land under a temporary name in the
destination folder, are flushed to disk and only then take their final name, so a crash, a kill
or a full disk never leaves a half-written file under a name a user would open.

Generation parameters are stored in each PNG as one text chunk named ``parameters`` that holds
a JSON object (keys sorted, two-space indent, UTF-8). JSON keeps numbers, lists and nested
values exact, so :func:`read_png_parameters` gives back the very dict that was saved. The caller
puts in it everything needed to make the image again from itself: every command-line flag, the
checkpoint's file name and hash, and the seed.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from sounddiffusion.errors import OutputError, ParameterError

log = logging.getLogger(__name__)

PARAMETERS_KEY = "parameters"
GRID_PADDING = 2
# Fixed zlib level so the same pixels and parameters always give the same bytes.
PNG_COMPRESS_LEVEL = 6
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
        raise OutputError(
            f"cannot create output folder {folder} ({err.strerror or err}): "
            "choose another folder or create it yourself") from err
    try:
        fd, probe = create_temp_file(folder, ".write-test")
    except OSError as err:
        raise OutputError(
            f"output folder {folder} is not writable ({err.strerror or err}): "
            "choose another folder or fix its permissions") from err
    os.close(fd)
    probe.unlink()
    return folder


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


def save_png(image: np.ndarray, path: str | os.PathLike,
             parameters: Mapping | None = None) -> Path:
    """Write ``image`` (H, W, 3) uint8 RGB to ``path`` as a PNG, atomically, never overwriting.

    ``parameters`` (a JSON-serialisable mapping) is stored in the ``parameters`` text chunk
    (see the module docstring); ``None`` stores no chunk. The same inputs always give the same
    bytes. Raises :class:`OutputError` when ``path`` exists or cannot be written (nothing is
    left behind), ``ValueError`` for an image of the wrong shape or type.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True, indent=2,
                                                 ensure_ascii=False))
    picture = Image.fromarray(image, mode="RGB")
    return write_atomically(path, lambda f: picture.save(
        f, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL))


def read_png_parameters(path: str | os.PathLike) -> dict:
    """The ``parameters`` dict saved in the PNG at ``path`` by :func:`save_png`.

    Returns ``{}`` when the file has no such chunk. Raises :class:`ParameterError` when the file
    cannot be read as an image or its chunk is not a JSON object.
    """
    with _open_image(path, "image") as picture:
        picture.load()  # text chunks may also follow the pixels
        text = picture.info.get(PARAMETERS_KEY)
    if text is None:
        return {}
    try:
        parameters = json.loads(text)
    except json.JSONDecodeError as err:
        raise ParameterError(f"the parameters stored in {path} are not JSON: {err}") from err
    if not isinstance(parameters, dict):
        raise ParameterError(f"the parameters stored in {path} are not a JSON object")
    return parameters


def make_grid(images: list[np.ndarray], n_rows: int) -> np.ndarray:
    """Tile equally sized (H, W, 3) uint8 images into one (H', W', 3) uint8 grid image.

    Laid out like upstream Stable Diffusion's ``torchvision.utils.make_grid(x, nrow=n_rows)``:
    ``n_rows`` images per row (the last row may be short), rows filled left to right, a
    2-pixel black border around and between the tiles, so
    ``H' = rows * (H + 2) + 2`` and ``W' = min(n_rows, len(images)) * (W + 2) + 2``.
    As in torchvision, a single image is returned unchanged, without border.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if n_rows < 1:
        raise ParameterError(f"--n_rows must be at least 1, got {n_rows}")
    height, width, channels = images[0].shape
    if any(image.shape != images[0].shape for image in images):
        raise ValueError("make_grid needs images of one size")
    if len(images) == 1:
        return images[0]
    columns = min(n_rows, len(images))
    rows = -(-len(images) // columns)
    pad = GRID_PADDING
    grid = np.zeros((rows * (height + pad) + pad, columns * (width + pad) + pad, channels),
                    dtype=np.uint8)
    for index, image in enumerate(images):
        top = (index // columns) * (height + pad) + pad
        left = (index % columns) * (width + pad) + pad
        grid[top:top + height, left:left + width] = image
    return grid


def load_init_image(path: str | os.PathLike, width: int, height: int) -> np.ndarray:
    """Read an image file as RGB and fit it to exactly (height, width, 3) uint8.

    The picture is turned upright by its EXIF orientation, scaled (Lanczos) so that it covers
    ``width`` x ``height`` pixels, and the overflow is cropped equally from both sides. Raises
    :class:`ParameterError` when ``path`` is missing, a folder, unreadable or not an image.
    """
    with _open_image(path, "init image") as picture:
        try:
            upright = ImageOps.exif_transpose(picture).convert("RGB")
            fitted = ImageOps.fit(upright, (width, height), method=Image.Resampling.LANCZOS)
        except OSError as err:
            raise ParameterError(
                f"init image {path} is damaged or truncated ({err}): give another image") from err
    return np.asarray(fitted, dtype=np.uint8)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """The pixels of an image file as (H, W, 3) uint8 RGB, at its own size."""
    with _open_image(path, "image") as picture:
        return np.asarray(picture.convert("RGB"), dtype=np.uint8)


def _open_image(path: str | os.PathLike, what: str) -> Image.Image:
    """Open ``path`` with PIL, raising :class:`ParameterError` that says what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise ParameterError(f"{what} {path} is a folder: give the path of a PNG or JPEG file")
    if not path.exists():
        raise ParameterError(f"{what} {path} does not exist: check the path")
    try:
        return Image.open(path)
    except (Image.UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ParameterError(
            f"{what} {path} is not an image this program can read ({err}): "
            "give a PNG or JPEG file") from err
    except OSError as err:
        raise ParameterError(f"cannot read {what} {path}: {err.strerror or err}") from err


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
