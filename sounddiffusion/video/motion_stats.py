"""The global camera motion between two video frames, measured by phase correlation.

:func:`global_motion` (and :class:`MotionMeter`, frame after frame) estimates how the whole picture
moved from one frame to the next as a similarity about the picture's centre c: a scale
(``scale`` > 1: the content grew, the camera flew in, as ``--zoom``), a rotation (``rotation``,
degrees, counter-clockwise on screen, as ``--angle``) and a shift (``shift_x`` right, ``shift_y``
down, pixels, as ``--translation_x/_y``), so that the content at p in the first frame is near

    c + A (p - c) + (shift_x, shift_y)        A = scale · (turn by rotation)

in the second. Every step is a phase correlation (``skimage.registration.phase_cross_correlation``,
to 1/20 of a sample):

1. rotation and scale, roughly, from the magnitudes of the frames' Fourier transforms (a shift
   does not change them; weighted by the frequency, in log-polar coordinates about the zero
   frequency, where a turn is a shift along the angle and a scale a shift along log-radius:
   Reddy & Chatterji 1996);
2. the shift between the frames, the second turned and scaled back by that estimate;
3. :data:`_ROUNDS` times: what is left of rotation and scale, from log-polar images about the
   picture's centre of the frames' edges (gradient magnitude), the second moved back by the
   estimate so far, then what is left of the shift;
4. the estimate is kept only where the second frame moved back by it matches the first better
   (normalized cross-correlation) than the second frame unmoved; else steps 2-3 start again from
   no rotation and scale, and where that does not match better either, the frames count as still
   (0, 0, 0, 1). Pictures whose content changes more than the camera moves it (img2img at a high
   strength) so read as still rather than as a random motion.

The frames are reduced to luma, to at most :data:`MOTION_SIDE` pixels a side (block means; shifts
are given in the video's pixels), blurred by one pixel and, for the shift, windowed (Hann), so
edges and fine block patterns do not decide the peaks. Accuracy on pictures with some detail
(tests/test_video_stats.py): about 0.1 px of shift, 0.2 degree and 0.3 % of scale for motions
of a few pixels, degrees or per cent per frame; larger motions than about a tenth of the picture
per frame, and pictures without detail, are not measured reliably.
"""
from __future__ import annotations

import math

import numpy as np

MOTION_SIDE = 192
"""Frames are measured at most this many pixels a side (block means of larger ones)."""
_UPSAMPLE = 20  # phase correlation to 1/20 of a sample
_ROUNDS = 2
_ANGLES = 360  # rows of the log-polar images: 1 degree each before upsampling
_INNER = 0.1  # the log-polar images start at this fraction of the radius (the centre has few pixels)
_BLUR = 1.0  # Gaussian sigma, pixels at the measured size


def global_motion(before: np.ndarray, after: np.ndarray) -> tuple[float, float, float, float]:
    """(shift_x, shift_y, rotation, scale) of the whole picture from ``before`` to ``after``.

    Both (H, W) luma or (H, W, 3) pictures (averaged to grey), any dtype, the same size. Units:
    pixels of the given frames, degrees counter-clockwise on screen, a size ratio (see the
    module). Frames without any detail give (0, 0, 0, 1)."""
    meter = MotionMeter()
    meter.measure(before)
    return meter.measure(after)


class MotionMeter:
    """The motion of a sequence of frames, one at a time: :meth:`measure` returns the motion from
    the frame before (``(0, 0, 0, 1)`` for the first), preparing each frame once."""

    def __init__(self):
        self._last: _Prepared | None = None
        self._geometry: _Geometry | None = None

    def measure(self, frame: np.ndarray) -> tuple[float, float, float, float]:
        """(shift_x, shift_y, rotation, scale) from the previous frame to ``frame``."""
        picture, factor = _reduced(frame)
        if self._geometry is None or self._geometry.shape != picture.shape:
            self._geometry = _Geometry(picture.shape)
        current = _Prepared(picture, self._geometry)
        first, self._last = self._last, current
        if first is None or first.flat or current.flat:
            return 0.0, 0.0, 0.0, 1.0
        geometry = self._geometry
        still = (np.zeros(2), 0.0, 1.0)
        best, best_match = still, _match(first.picture, picture)
        for start in (geometry.spectrum_turn(first.spectrum_polar, current.spectrum_polar), (0.0, 1.0)):
            estimate = self._refined(first, picture, *start)
            match = _match(first.picture, _moved_back(picture, *estimate))
            if match > best_match:
                best, best_match = estimate, match
            if best is not still:  # the rough rotation and scale led somewhere better than no motion
                break
        shift, rotation, scale = best
        return float(shift[1] * factor), float(shift[0] * factor), float(rotation), float(scale)

    def _refined(self, first: _Prepared, picture: np.ndarray, rotation: float, scale: float
                 ) -> tuple[np.ndarray, float, float]:
        """(shift (row, column), rotation, scale) from a start for rotation and scale: the shift,
        then :data:`_ROUNDS` times what is left of rotation and scale, and of the shift."""
        geometry = self._geometry
        shift = np.zeros(2)
        for round_ in range(_ROUNDS + 1):
            if round_ > 0:
                moved = _moved_back(picture, shift, rotation, scale)
                turn, grow = geometry.edge_turn(first.edge_polar, np.fft.fft2(geometry.edge_polar(moved)))
                rotation, scale = rotation + turn, scale * grow
            moved = np.fft.fft2(geometry.windowed(_moved_back(picture, shift, rotation, scale)))
            shift = shift + _linear(rotation, scale) @ _shift(first.transform, moved)
        return shift, rotation, scale


class _Geometry:
    """What every frame of one size shares: the window and the log-polar sampling positions."""

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape
        height, width = shape
        self.window = np.outer(np.hanning(height), np.hanning(width))
        side = min(height, width)
        self.square = (slice((height - side) // 2, (height - side) // 2 + side),
                       slice((width - side) // 2, (width - side) // 2 + side))
        self.square_window = np.outer(np.hanning(side), np.hanning(side))
        frequencies = np.fft.fftshift(np.fft.fftfreq(side)) * side
        self.frequency_weight = np.hypot(frequencies[:, None], frequencies[None, :])
        self.columns = side
        # Spectra: half the circle (a magnitude spectrum is symmetric), radius side/4 about the
        # zero frequency (side // 2 after fftshift). Pictures: the whole circle about the centre.
        self.spectrum_radius = side / 4
        self.spectrum_points = _log_polar_points((side // 2, side // 2), 1.0, self.spectrum_radius,
                                                 _ANGLES // 2, 180.0, self.columns)
        self.edge_radius = side / 2
        self.edge_points = _log_polar_points(((height - 1) / 2, (width - 1) / 2), _INNER * self.edge_radius,
                                             self.edge_radius, _ANGLES, 360.0, self.columns)
        self.taper = _tukey(self.columns)[None]

    def windowed(self, picture: np.ndarray) -> np.ndarray:
        return (picture - picture.mean()) * self.window

    def spectrum_polar(self, picture: np.ndarray) -> np.ndarray:
        """The frequency-weighted magnitude spectrum of the centred square in log-polar coordinates."""
        from scipy.ndimage import map_coordinates

        square = picture[self.square]
        spectrum = np.abs(np.fft.fftshift(np.fft.fft2((square - square.mean()) * self.square_window)))
        polar = map_coordinates(spectrum * self.frequency_weight, self.spectrum_points, order=1)
        return polar - polar.mean()

    def edge_polar(self, picture: np.ndarray) -> np.ndarray:
        """The picture's gradient magnitude in log-polar coordinates about its centre, tapered
        at the inner and outer radius (they meet nothing on the other side of a scale)."""
        from scipy.ndimage import map_coordinates, sobel

        edges = np.hypot(sobel(picture, 0, mode="nearest"), sobel(picture, 1, mode="nearest"))
        polar = map_coordinates(edges, self.edge_points, order=1, mode="nearest")
        return (polar - polar.mean()) * self.taper

    def spectrum_turn(self, first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
        """(degrees, size ratio) of the picture from two spectrum_polar transforms: the spectrum
        turns with the picture and shrinks as it grows."""
        turn, grow = _polar_shift(first, second, 180.0 / (_ANGLES // 2), self.spectrum_radius, self.columns)
        return turn, 1.0 / grow

    def edge_turn(self, first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
        """(degrees, size ratio) of the picture from two edge_polar transforms."""
        return _polar_shift(first, second, 360.0 / _ANGLES, 1 / _INNER, self.columns)


class _Prepared:
    """One frame, reduced: its picture, whether it is flat, the transform of its windowed picture,
    and the transforms of its spectrum's and its edges' log-polar images."""

    def __init__(self, picture: np.ndarray, geometry: _Geometry):
        self.picture = picture
        self.flat = bool(np.ptp(picture) == 0)
        self.transform = np.fft.fft2(geometry.windowed(picture))
        self.spectrum_polar = np.fft.fft2(geometry.spectrum_polar(picture))
        self.edge_polar = np.fft.fft2(geometry.edge_polar(picture))


def _log_polar_points(centre: tuple[float, float], inner: float, outer: float, angles: int, degrees: float,
                      columns: int) -> np.ndarray:
    """(2, angles, columns) sampling positions (row, column): row k at k · degrees / angles from
    +x, turning clockwise on screen (towards +y, down); column j at radius
    inner · (outer / inner)^(j / columns)."""
    theta = np.radians(np.arange(angles) * (degrees / angles))[:, None]
    radii = inner * np.exp(np.arange(columns)[None] * (math.log(outer / inner) / columns))
    return np.stack([centre[0] + radii * np.sin(theta), centre[1] + radii * np.cos(theta)])


def _polar_shift(first: np.ndarray, second: np.ndarray, degrees_per_row: float, ratio: float,
                 columns: int) -> tuple[float, float]:
    """(degrees counter-clockwise, size ratio) that take the content of the first log-polar image
    (Fourier transform) to the second: the rows run clockwise on screen, ``columns`` columns
    span the radius ratio ``ratio``; phase correlation reports the shift that moves the second
    back onto the first."""
    from skimage.registration import phase_cross_correlation

    (rows, shift), _, _ = phase_cross_correlation(first, second, upsample_factor=_UPSAMPLE, space="fourier",
                                                  normalization=None)
    turn = (float(rows) * degrees_per_row + 180.0) % 360.0 - 180.0
    return turn, math.exp(-float(shift) * math.log(ratio) / columns)


def _tukey(length: int, fraction: float = 0.2) -> np.ndarray:
    """A window that is 1 in the middle and falls as a half cosine over ``fraction / 2`` at each end."""
    edge = max(1, int(fraction * length / 2))
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(edge) + 0.5) / edge)
    window = np.ones(length)
    window[:edge], window[-edge:] = ramp, ramp[::-1]
    return window


def _reduced(frame: np.ndarray) -> tuple[np.ndarray, int]:
    """Grey float64, reduced by an integer factor to at most MOTION_SIDE a side, blurred by one
    pixel; and the factor."""
    from scipy.ndimage import gaussian_filter

    grey = np.asarray(frame, dtype=np.float64)
    if grey.ndim == 3:
        grey = grey.mean(axis=2)
    factor = max(1, math.ceil(max(grey.shape) / MOTION_SIDE))
    if factor > 1:
        height, width = (grey.shape[0] // factor) * factor, (grey.shape[1] // factor) * factor
        grey = grey[:height, :width].reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3))
    return gaussian_filter(grey, _BLUR, mode="nearest"), factor


def _match(first: np.ndarray, second: np.ndarray) -> float:
    """Normalized cross-correlation of two pictures inside a tenth of their size from the edges
    (where neither shows what came in at the border), -1..1."""
    height, width = first.shape
    inside = (slice(height // 10, height - height // 10), slice(width // 10, width - width // 10))
    a, b = first[inside] - first[inside].mean(), second[inside] - second[inside].mean()
    return float((a * b).sum() / math.sqrt(float((a * a).sum() * (b * b).sum()) + 1e-12))


def _linear(rotation: float, scale: float) -> np.ndarray:
    """A = scale · (turn by ``rotation`` degrees counter-clockwise on screen), in (row, column)."""
    angle = math.radians(rotation)
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[cos, -sin], [sin, cos]])


def _moved_back(picture: np.ndarray, shift: np.ndarray, rotation: float, scale: float) -> np.ndarray:
    """The second frame with the estimated motion undone: out(q) = picture(c + A (q - c) + shift),
    bilinear, edges repeated."""
    if rotation == 0 and scale == 1 and not shift.any():
        return picture
    from scipy.ndimage import affine_transform

    linear = _linear(rotation, scale)
    centre = (np.array(picture.shape, dtype=np.float64) - 1) / 2
    return affine_transform(picture, linear, offset=centre + shift - linear @ centre, order=1, mode="nearest")


def _shift(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """How far the content moved from the first to the second picture (Fourier transforms of the
    windowed pictures), (rows, columns)."""
    from skimage.registration import phase_cross_correlation

    shift, _, _ = phase_cross_correlation(first, second, upsample_factor=_UPSAMPLE, space="fourier")
    return -np.asarray(shift, dtype=np.float64)
