"""PNG outputs: embedded generation parameters, grids, init images.

PNGs are written atomically and never overwrite a file (see :mod:`sounddiffusion.files`).

Generation parameters are stored in each PNG as one text chunk named ``parameters`` that holds
a JSON object (keys sorted, two-space indent, UTF-8). JSON keeps numbers, lists and nested
values exact, so :func:`read_png_parameters` gives back the very dict that was saved. The caller
puts in it everything needed to make the image again from itself: every command-line flag, the
checkpoint's file name and hash, and the seed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from sounddiffusion.errors import ParameterError
from sounddiffusion.files import write_atomically

PARAMETERS_KEY = "parameters"
GRID_PADDING = 2
# Fixed zlib level so the same pixels and parameters always give the same bytes.
PNG_COMPRESS_LEVEL = 6


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
