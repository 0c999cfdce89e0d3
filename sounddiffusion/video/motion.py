"""2D camera motion between video frames: Deforum's "2D" animation warp.

One frame's motion (:class:`Motion2D`) is a zoom and rotation about a centre, a translation and an
optional perspective flip, turned into one 3x3 matrix by :func:`motion_matrix`. That matrix maps a
point of the previous frame to where it lands in the next one (coordinates in pixels, pixel centres
at integers, x right, y down), as the matrix Deforum's ``anim_frame_warp_2d`` hands to
``cv2.warpPerspective``:

    M = F @ R @ T
    T = [[1, 0, tx], [0, 1, ty], [0, 0, 1]]                  translation in pixels
    R = [[a, b, (1 - a) cx - b cy], [-b, a, b cx + (1 - a) cy], [0, 0, 1]]
        a = zoom cos(angle), b = zoom sin(angle), (cx, cy) = (W center_x, H center_y)
        (cv2.getRotationMatrix2D: angle in degrees, counter-clockwise on screen; zoom > 1 flies in)
    F = Deforum's perspective flip (identity when its three angles are 0)

Deforum drops T whenever the flip is on (``np.matmul(bM, rot_mat, trans_mat)`` takes T as ``out``);
here the three are multiplied. Each output pixel p takes the bilinear sample of the input at
M^-1 p; outside the picture the border rule decides: "replicate" (the edge pixel), "wrap"
(coordinates modulo the size) or "reflect" (mirrored about the outermost pixel centres, as
OpenCV's BORDER_REFLECT_101 and torch's "reflection" with ``align_corners=True``).

:func:`warp_2d` warps an (H, W, 3) uint8 picture with numpy; :func:`warp_2d_torch` warps a batch of
(B, C, H, W) float tensors (pictures or latents) by one motion on their device with ``grid_sample``.
Both return their input itself when the motion is the identity. :func:`warp_matrix_torch`, which
the frame loop uses, does the same warp for any forward map, such as the product of several frames'
matrices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from sounddiffusion.errors import ParameterError

BORDERS = ("replicate", "wrap", "reflect")
# Deforum's default field of view for the perspective flip, degrees.
DEFAULT_FLIP_FV = 53.0
# A flip that turns the picture's plane to within this many degrees of edge-on is refused: the
# plane then (nearly) passes through the flip's camera, the picture is a line and its homography
# singular (at 90 degrees exactly) or numerical noise (at 270, cos is 1.8e-16, not 0).
EDGE_ON_DEGREES = 0.1
# Sampling coordinates are kept within this many pixels so that extreme perspective (the plane
# seen edge-on) gives edge pixels instead of integer overflow.
_COORDINATE_LIMIT = 1e6


@dataclass(frozen=True)
class Motion2D:
    """The camera motion from one frame to the next (Deforum's 2D animation keys).

    zoom: scale factor about the centre, > 0 (1.04 flies in 4 % a frame, 0.9 flies out).
    angle: rotation about the centre, degrees, counter-clockwise on screen.
    translation_x, translation_y: shift in pixels of the picture (right, down), after zoom/rotation
        in the sense of ``M = R @ T`` (the translation is applied to the picture first).
    center_x, center_y: centre of zoom and rotation as fractions 0..1 of the width and height.
    perspective_flip_theta, _phi, _gamma: rotations of the picture's plane in 3D, degrees, about
        the axis towards the viewer, the horizontal axis and the vertical axis; 0, 0, 0 is off.
    perspective_flip_fv: field of view of the flip's camera, degrees, in (0, 180).

    Raises :class:`ParameterError` for a non-finite value, zoom <= 0, a centre outside 0..1, a
    field of view outside (0, 180) or a flip whose phi and gamma turn the plane edge-on
    (:func:`edge_on`).
    """

    zoom: float = 1.0
    angle: float = 0.0
    translation_x: float = 0.0
    translation_y: float = 0.0
    center_x: float = 0.5
    center_y: float = 0.5
    perspective_flip_theta: float = 0.0
    perspective_flip_phi: float = 0.0
    perspective_flip_gamma: float = 0.0
    perspective_flip_fv: float = DEFAULT_FLIP_FV

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ParameterError(f"motion {field.name} {value!r} is not a number: give a finite number") from None
            if not math.isfinite(number):
                raise ParameterError(f"motion {field.name} is {number}: give a finite number")
            object.__setattr__(self, field.name, number)
        if self.zoom <= 0:
            raise ParameterError(f"zoom {self.zoom:g} must be above 0: 1 keeps the size, above 1 flies in, "
                                 f"below 1 flies out")
        for name in ("center_x", "center_y"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ParameterError(f"{name} {getattr(self, name):g} is outside 0..1: it is a fraction of the "
                                     f"picture, 0.5 is the middle")
        if not 0.0 < self.perspective_flip_fv < 180.0:
            raise ParameterError(f"perspective_flip_fv {self.perspective_flip_fv:g} is outside (0, 180) degrees: "
                                 f"Deforum's default is {DEFAULT_FLIP_FV:g}")
        if edge_on(self.perspective_flip_phi, self.perspective_flip_gamma):
            raise ParameterError(f"perspective_flip_phi {self.perspective_flip_phi:g} with perspective_flip_gamma "
                                 f"{self.perspective_flip_gamma:g} turns the picture's plane edge-on to the camera "
                                 f"(a line, nothing to warp): keep phi and gamma more than {EDGE_ON_DEGREES:g} "
                                 f"degrees away from 90 and 270")

    @property
    def has_perspective_flip(self) -> bool:
        return (self.perspective_flip_theta, self.perspective_flip_phi, self.perspective_flip_gamma) != (0, 0, 0)

    @property
    def is_identity(self) -> bool:
        """True when the warp changes nothing (the centre and field of view then do not matter)."""
        return (self.zoom == 1 and self.angle == 0 and self.translation_x == 0 and self.translation_y == 0
                and not self.has_perspective_flip)


def edge_on(phi: float | np.ndarray, gamma: float | np.ndarray) -> bool | np.ndarray:
    """Whether a perspective flip of ``phi``, ``gamma`` (degrees; numbers or arrays) turns the
    picture's plane to within :data:`EDGE_ON_DEGREES` of edge-on. The flip turns the plane's
    normal to ``Rx(phi) Ry(gamma) e_z``, whose component along the view axis is
    ``cos(phi) cos(gamma)``; the plane is edge-on (it passes through the flip's camera) where that
    is 0, and within d degrees of it where ``|cos(phi) cos(gamma)| < sin(d)``. theta turns the
    plane in itself and does not matter."""
    facing = np.abs(np.cos(np.radians(phi)) * np.cos(np.radians(gamma)))
    return facing < math.sin(math.radians(EDGE_ON_DEGREES))


def check_border(border: str) -> str:
    """``border`` if it is one of :data:`BORDERS`, else :class:`ParameterError`."""
    if border not in BORDERS:
        raise ParameterError(f"border {border!r} is unknown: use one of {', '.join(BORDERS)}")
    return border


def motion_matrix(motion: Motion2D, width: int, height: int, pixels_per_unit: float = 1.0) -> np.ndarray:
    """The (3, 3) float64 forward map ``M = F @ R @ T`` (module docstring) of ``motion``.

    ``width``, ``height``: size of the array being warped; ``pixels_per_unit``: picture pixels per
    element of that array (1 for a picture, 8 for a Stable Diffusion latent). The motion is defined
    on the picture of size (width * ppu, height * ppu); for ppu != 1 the matrix is carried to the
    array's coordinates by ``S^-1 M S``, ``S`` mapping element u to picture pixel ``ppu u + (ppu - 1) / 2``
    (the centre of the ppu x ppu block it stands for), so a latent moves the picture's distance.
    """
    if not pixels_per_unit > 0:  # before the picture's size is computed from it
        raise ParameterError(f"pixels_per_unit {pixels_per_unit} must be above 0: 1 for pictures, 8 for latents")
    picture_w, picture_h = width * pixels_per_unit, height * pixels_per_unit
    cx, cy = picture_w * motion.center_x, picture_h * motion.center_y
    angle = math.radians(motion.angle)
    a, b = motion.zoom * math.cos(angle), motion.zoom * math.sin(angle)
    rotation = np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy], [0.0, 0.0, 1.0]])
    translation = np.array([[1.0, 0.0, motion.translation_x], [0.0, 1.0, motion.translation_y], [0.0, 0.0, 1.0]])
    matrix = rotation @ translation
    if motion.has_perspective_flip:
        matrix = perspective_flip_matrix(picture_w, picture_h, motion.perspective_flip_theta,
                                         motion.perspective_flip_phi, motion.perspective_flip_gamma,
                                         motion.perspective_flip_fv) @ matrix
    return array_matrix(matrix, pixels_per_unit)


def array_matrix(matrix: np.ndarray, pixels_per_unit: float) -> np.ndarray:
    """A (3, 3) forward map in picture pixels carried to the coordinates of an array whose element
    stands for a ``pixels_per_unit`` square of pixels: ``S^-1 M S`` (see :func:`motion_matrix`)."""
    if not pixels_per_unit > 0:
        raise ParameterError(f"pixels_per_unit {pixels_per_unit} must be above 0: 1 for pictures, 8 for latents")
    if pixels_per_unit == 1:
        return matrix
    offset = (pixels_per_unit - 1) / 2
    to_picture = np.array([[pixels_per_unit, 0.0, offset], [0.0, pixels_per_unit, offset], [0.0, 0.0, 1.0]])
    return np.linalg.inv(to_picture) @ matrix @ to_picture


def perspective_flip_matrix(width: float, height: float, theta: float, phi: float, gamma: float,
                            fv: float) -> np.ndarray:
    """Deforum's 2D perspective flip as a (3, 3) float64 forward map on a width x height picture.

    The picture is a plane through the origin, centred, with corners (+-W/2, +-H/2, 0); it turns
    by ``R = Rx(phi) Ry(gamma) Rz(theta)`` (degrees), then a camera of field of view ``fv`` at
    distance ``h = d / (2 sin(fv/2))``, ``d = sqrt(W^2 + H^2)``, sees it: a corner (x, y, z)
    projects to ``n = x / (tan(fv/2) (h - z + 1))`` (likewise y; the + 1 is Deforum's: its
    projection matrix keeps the identity's 1 in its last corner), placed at ``(n + 1) s / 2`` with
    ``s = d / cos(fv/2)``. ``K`` is the homography taking the corners (0, 0) ... (W, H) to those
    four points and the flip is ``K @ [[1, 0, (W - s)/2], [0, 1, (H - s)/2], [0, 0, 1]]``, in
    Deforum's order (so the flip turns about (s/2, s/2), not the picture's centre).
    """
    half_fv = math.radians(fv / 2)
    diagonal = math.hypot(width, height)
    side = diagonal / math.cos(half_fv)
    distance = diagonal / (2 * math.sin(half_fv))
    rotation = _rotation_x(phi) @ _rotation_y(gamma) @ _rotation_z(theta)
    corners = np.array([[-width / 2, height / 2, 0.0], [width / 2, height / 2, 0.0],
                        [width / 2, -height / 2, 0.0], [-width / 2, -height / 2, 0.0]])
    turned = corners @ rotation.T
    projected = turned[:, :2] / (math.tan(half_fv) * (distance - turned[:, 2:] + 1))
    homography = _homography(corners[:, :2] + [width / 2, height / 2], (projected + 1) * side / 2)
    shift = np.array([[1.0, 0.0, (width - side) / 2], [0.0, 1.0, (height - side) / 2], [0.0, 0.0, 1.0]])
    return homography @ shift


def _rotation_x(degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rotation_y(degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rotation_z(degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _homography(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The (3, 3) matrix H, H[2, 2] = 1, with H (x, y, 1) ~ (u, v, 1) for four point pairs (4, 2)."""
    rows, values = [], []
    for (x, y), (u, v) in zip(source, target):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        values += [u, v]
    return np.append(np.linalg.solve(np.array(rows), np.array(values)), 1.0).reshape(3, 3)


def warp_2d(rgb: np.ndarray, zoom: float = 1.0, angle: float = 0.0, translation_x: float = 0.0,
            translation_y: float = 0.0, center_x: float = 0.5, center_y: float = 0.5,
            border: str = "replicate", *, perspective_flip_theta: float = 0.0, perspective_flip_phi: float = 0.0,
            perspective_flip_gamma: float = 0.0, perspective_flip_fv: float = DEFAULT_FLIP_FV) -> np.ndarray:
    """``rgb`` moved by one frame of 2D camera motion, as Deforum's ``anim_frame_warp_2d`` does.

    ``rgb``: (H, W, C) uint8 picture. The motion parameters are :class:`Motion2D`'s (call with
    ``**dataclasses.asdict(motion)``), ``border`` one of :data:`BORDERS`. Bilinear samples at the
    inverse map of every pixel centre, rounded to the nearest level. Returns (H, W, C) uint8:
    ``rgb`` itself (not a copy) when the motion is the identity.
    """
    check_border(border)
    motion = Motion2D(zoom, angle, translation_x, translation_y, center_x, center_y, perspective_flip_theta,
                      perspective_flip_phi, perspective_flip_gamma, perspective_flip_fv)
    if rgb.ndim != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"the picture must be (H, W, C) uint8, got {rgb.shape} {rgb.dtype}")
    if motion.is_identity:
        return rgb
    height, width, channels = rgb.shape
    inverse = np.linalg.inv(motion_matrix(motion, width, height))
    xs, ys = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)[:, None]
    rows = 3 if motion.has_perspective_flip else 2  # an affine map's third row is (0, 0, 1)
    source = [inverse[i, 0] * xs + inverse[i, 1] * ys + inverse[i, 2] for i in range(rows)]
    if motion.has_perspective_flip:
        with np.errstate(divide="ignore", invalid="ignore"):
            source = [np.nan_to_num(source[0] / source[2]), np.nan_to_num(source[1] / source[2])]
    x0, x1, fx = _neighbours(source[0], width, border)
    y0, y1, fy = _neighbours(source[1], height, border)
    y0, y1 = y0 * width, y1 * width
    flat = rgb.reshape(-1, channels)

    def at(rows, columns):  # np.take is several times faster than fancy indexing here
        return np.take(flat, rows + columns, axis=0).astype(np.float32)

    fx, fy = fx[..., None], fy[..., None]
    out = _lerp(_lerp(at(y0, x0), at(y0, x1), fx), _lerp(at(y1, x0), at(y1, x1), fx), fy)
    return np.clip(np.rint(out, out=out), 0, 255, out=out).astype(np.uint8)


def _lerp(a: np.ndarray, b: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``a + (b - a) weight``, computed in place in ``a`` and ``b``."""
    b -= a
    b *= weight
    a += b
    return a


def _neighbours(coordinate: np.ndarray, size: int, border: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For sample positions along one axis (pixels): the two neighbouring indices in 0..size-1 and
    the weight (float32) of the second, after the border rule."""
    if border == "wrap":
        low = np.floor(np.clip(coordinate, -_COORDINATE_LIMIT, _COORDINATE_LIMIT))
        weight = coordinate - low
        low = low.astype(np.int64) % size
        return low, (low + 1) % size, weight.astype(np.float32)
    if border == "reflect":
        period = 2 * (size - 1)
        coordinate = np.abs(coordinate) % period if period else np.zeros_like(coordinate)
        coordinate = np.where(coordinate > size - 1, period - coordinate, coordinate)
    coordinate = np.clip(coordinate, 0, size - 1)
    low = np.floor(coordinate)
    weight = coordinate - low
    low = low.astype(np.int64)
    return low, np.minimum(low + 1, size - 1), weight.astype(np.float32)


def warp_2d_torch(x: torch.Tensor, motion: Motion2D, *, border: str = "replicate",
                  pixels_per_unit: float = 1.0) -> torch.Tensor:
    """A batch of tensors moved by one frame of 2D camera motion on their device, the warp of
    :func:`warp_2d` (:func:`warp_matrix_torch` of the motion's matrix).

    ``x``: (B, C, H, W) float (pictures on 0..255 or [-1, 1] with ``pixels_per_unit=1``, or latents
    (B, 4, h, w) with ``pixels_per_unit=8`` so that translations stay in picture pixels).
    ``border``: one of :data:`BORDERS`. Returns a new tensor like ``x``, or ``x`` itself when the
    motion is the identity.
    """
    _check_tensor(x, border)
    if motion.is_identity:
        return x
    height, width = x.shape[-2:]
    return _warp(x, np.linalg.inv(motion_matrix(motion, width, height, pixels_per_unit))[None], border)


def warp_matrix_torch(x: torch.Tensor, matrix: np.ndarray, *, border: str = "replicate",
                      pixels_per_unit: float = 1.0) -> torch.Tensor:
    """A batch of tensors moved by one forward map ``matrix`` (3, 3) in picture pixels, the
    warp of :func:`warp_2d_torch` for a motion that is no single :class:`Motion2D`: a product of
    several frames' :func:`motion_matrix` (``M_2 @ M_1``: M_1 first) or an inverse.

    ``x``: (B, C, H, W) float standing for a picture of (W ppu, H ppu) pixels; ``border`` one of
    :data:`BORDERS`. Returns a new tensor like ``x`` (the identity matrix too is sampled).

    Each element centre takes the bilinear ``grid_sample`` of ``x`` at its inverse map
    (``align_corners=True`` puts -1 and 1 on the outermost centres, the numpy path's convention);
    float16/bfloat16 are sampled in float32."""
    _check_tensor(x, border)
    inverse = np.linalg.inv(array_matrix(np.asarray(matrix, dtype=np.float64), pixels_per_unit))
    return _warp(x, inverse[None], border)


def _check_tensor(x: torch.Tensor, border: str) -> None:
    check_border(border)
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"the tensor to warp must be (B, C, H, W) float, got {tuple(x.shape)} {x.dtype}")


def _warp(source: torch.Tensor, inverses: np.ndarray, border: str) -> torch.Tensor:
    """``source`` (N, C, H, W) sampled bilinearly at the inverse map (1, 3, 3) float64 of its
    element centres; float16/bfloat16 are sampled in float32 and returned in their dtype."""
    height, width = source.shape[-2:]
    # float32 on the host first: MPS has no float64.
    inverses = torch.from_numpy(inverses.astype(np.float32)).to(source.device)
    sample_dtype = source.dtype if source.dtype in (torch.float32, torch.float64) else torch.float32
    grid = _sample_grid(inverses, height, width, border).to(sample_dtype)
    grid = grid.expand(source.shape[0], -1, -1, -1)
    padded = source.to(sample_dtype)
    if border == "wrap":
        # One more row and column, copies of the first ones, hold the neighbours across the seam.
        padded = F.pad(padded, (0, 1, 0, 1), mode="circular")
    padding = {"replicate": "border", "wrap": "border", "reflect": "reflection"}[border]
    warped = F.grid_sample(padded, grid, mode="bilinear", padding_mode=padding, align_corners=True)
    return warped.to(source.dtype)


def _sample_grid(inverses: torch.Tensor, height: int, width: int, border: str) -> torch.Tensor:
    """(N, H, W, 2) grid_sample coordinates (align_corners=True) of the source of every element
    centre, for N inverse matrices (N, 3, 3) float32. For "wrap" the coordinates are reduced modulo
    the size and scaled for the tensor padded by one row and column."""
    device = inverses.device
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device),
                            torch.arange(width, dtype=torch.float32, device=device), indexing="ij")
    points = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.ones_like(xs).reshape(-1)])
    source = inverses @ points
    coordinates = source[:, :2] / source[:, 2:]
    coordinates = torch.nan_to_num(coordinates).clamp(-_COORDINATE_LIMIT, _COORDINATE_LIMIT)
    if border == "wrap":
        sizes = torch.tensor([width, height], dtype=torch.float32, device=device)[:, None]
        coordinates = torch.remainder(coordinates, sizes)
        spans = sizes
    else:
        spans = torch.tensor([max(width - 1, 1), max(height - 1, 1)], dtype=torch.float32, device=device)[:, None]
    normalized = coordinates * (2 / spans) - 1
    return normalized.reshape(-1, 2, height, width).permute(0, 2, 3, 1)
