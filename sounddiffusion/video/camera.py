"""Camera motion in audio2video: the motion flags, and the camera's move between any two frames.

Frame i's :class:`~sounddiffusion.video.motion.Motion2D` (the plan's ``motions[i]``, from the
schedules of ``--zoom``, ``--angle``, ...) moves the camera from frame i-1 to frame i: its matrix
``m_i`` (:func:`~sounddiffusion.video.motion.motion_matrix`) maps a point of frame i-1's picture
to where it lands in frame i's. The camera's move from frame a to frame b is the product

    M(a -> b) = m_b @ ... @ m_(a+2) @ m_(a+1)        (a < b; M(b -> a) = M(a -> b)^-1)

so the camera follows the same path at any ``--cadence``, and a pulse of the zoom lands on the
frame its schedule puts it on.

Where the moves are used (Deforum's order: warp, then colour coherence, contrast, noise, img2img):

- A diffused frame b starts img2img from the previous diffused frame a's latent moved by
  ``M(a -> b)``: ``m_b`` alone at cadence 1, exactly Deforum's 2D animation.
- An in-between frame i (a < i < b) is made from the two diffused frames around it. Both are
  first brought to frame i's camera, frame a forward by ``M(a -> i)`` and frame b back by
  ``M(b -> i)``, then blended with ``t = (i - a) / (b - a)`` (slerp of the latents, or the pictures
  cross-faded with ``--cadence_blend pixel``). Blending them unmoved would dissolve between two
  camera positions; moving only frame a would jump at frame b. Moved this way, each in-between is
  ``t`` of the way between two pictures that show the same view, the camera moves by ``m_i`` on
  every frame, and the blend reaches frame b's own picture at t = 1: the path is continuous
  through the diffused frames. For a zoom z and angle r that stay the same over the span (about
  one centre), ``M(a -> i)`` is the single motion of zoom ``z ** (i - a)`` and angle ``(i - a) r``:
  the share t of the span's ``z ** (b - a)`` and ``(b - a) r``, and ``M(b -> i)`` the rest
  undone (a translation is turned and zoomed by the frames after it, so it adds up to no share);
  unlike a share of the span's motion, the product also follows a schedule that changes within
  the span. With ``--strength 0`` (img2img keeps its start) frame b is frame
  a moved, both ends agree inside the picture and the in-betweens are pure camera motion.

``--motion_space pixel`` moves the decoded picture (decode, warp, encode; sharp edges, one
autoencoder round trip per move), ``latent`` moves the latent itself with the picture's distances
(no round trip, faster, softer: bilinear sampling of 8x8-pixel cells). With ``--cadence_blend
pixel`` the in-betweens' two decoded pictures are always moved as pictures.
A move whose frames all keep the camera still is None: nothing is decoded, warped or encoded, so a
still camera renders the same bytes as before camera motion existed.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sounddiffusion.flags import Flag, FlagGroup
from sounddiffusion.model.engine import LATENT_SCALE, Engine
from sounddiffusion.settings import VideoSettings
from sounddiffusion.video.frame_plan import MOTION_SPACES, FramePlan
from sounddiffusion.video.motion import BORDERS, DEFAULT_FLIP_FV, Motion2D, motion_matrix, warp_matrix_torch

_SCHEDULE = " (a number or a schedule)"

MOTION_FLAGS = FlagGroup(
    "camera motion",
    (
        Flag(("--zoom",), "scale per frame about the centre: 1 still, above 1 flies in (1.02), below 1 flies out"
                          + _SCHEDULE, default="1", metavar="Z"),
        Flag(("--angle",), "rotation per frame about the centre, degrees, counter-clockwise" + _SCHEDULE,
             default="0", metavar="DEG"),
        Flag(("--translation_x",), "shift per frame to the right, pixels at the render size" + _SCHEDULE,
             default="0", metavar="PX"),
        Flag(("--translation_y",), "shift per frame downwards, pixels at the render size" + _SCHEDULE,
             default="0", metavar="PX"),
        Flag(("--transform_center_x",), "centre of zoom and rotation, fraction 0..1 of the width" + _SCHEDULE,
             default="0.5", metavar="F"),
        Flag(("--transform_center_y",), "centre of zoom and rotation, fraction 0..1 of the height" + _SCHEDULE,
             default="0.5", metavar="F"),
        Flag(("--border",), "what comes in at the edges: the edge pixels, the other side, or a mirror image",
             default="replicate", choices=BORDERS),
        Flag(("--perspective_flip_theta",), "perspective flip: turn of the picture's plane about the axis "
                                            "towards the viewer, degrees per frame (Deforum's 2D flip)" + _SCHEDULE,
             default="0", metavar="DEG"),
        Flag(("--perspective_flip_phi",), "perspective flip: tilt about the horizontal axis, degrees per frame"
                                          + _SCHEDULE, default="0", metavar="DEG"),
        Flag(("--perspective_flip_gamma",), "perspective flip: turn about the vertical axis, degrees per frame"
                                            + _SCHEDULE, default="0", metavar="DEG"),
        Flag(("--perspective_flip_fv",), "perspective flip: field of view, degrees in (0, 180)" + _SCHEDULE,
             default=f"{DEFAULT_FLIP_FV:g}", metavar="DEG"),
        Flag(("--motion_space",), "move the decoded picture (sharp; a decode and encode per move) or the latent "
                                  "(faster, softer); README: Camera motion", default="pixel", choices=MOTION_SPACES),
    ),
    "Deforum's 2D camera: each frame's picture is moved before img2img turns it into the next one; "
    "every number takes a schedule, e.g. --zoom \"1 + 0.04*onset\" (README: Camera motion)",
)
"""audio2video's camera-motion flags (VideoSettings fields of the same names); a still camera by default."""


@dataclass(frozen=True)
class CameraMove:
    """The camera's move between two frames: ``matrix`` (3, 3) float64, the forward map in picture
    pixels (a point of the first frame's picture -> where it is in the second's), ``border`` one
    of :data:`~sounddiffusion.video.motion.BORDERS`, ``space`` "pixel" or "latent"."""

    matrix: np.ndarray
    border: str
    space: str

    def warp_pictures(self, rgb: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
        """Pictures (B, H, W, 3) uint8 moved (bilinear, on ``device``), rounded to uint8 again."""
        x = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(0, 3, 1, 2).float()
        warped = warp_matrix_torch(x, self.matrix, border=self.border)
        return warped.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def warp_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """A latent (B, 4, h, w) moved in latent space, each element standing for the autoencoder's
        ``LATENT_SCALE`` x ``LATENT_SCALE`` pixels (so it moves the picture's distance)."""
        return warp_matrix_torch(latent, self.matrix, border=self.border, pixels_per_unit=LATENT_SCALE)

    def apply(self, engine: Engine, latent: torch.Tensor, picture: np.ndarray | None = None) -> torch.Tensor:
        """``latent`` (1, 4, h, w) moved in this move's space: its decoded picture (``picture``,
        (1, H, W, 3) uint8, when already decoded) warped and encoded again, or the latent warped."""
        if self.space == "latent":
            return self.warp_latent(latent)
        if picture is None:
            picture = engine.decode(latent)
        return engine.encode_image(self.warp_pictures(picture, engine.device))


class Camera:
    """The camera path of a render: ``motions`` (one :class:`Motion2D` per frame, from the frame
    before) on a ``width`` x ``height`` picture, with the render's ``border`` and ``space``.

    :meth:`move` gives the move between two frames (module docstring). :meth:`picture` decodes
    a diffused frame's latent, keeping the pictures of the last two diffused frames (the ends of
    the span whose in-betweens are being made), so that each is decoded once: for its own move
    to the next diffused frame, the colour match, the in-betweens' moves (:meth:`moved`) and frame
    0's colour reference alike."""

    def __init__(self, motions: Sequence[Motion2D], width: int, height: int, border: str = "replicate",
                 space: str = "pixel"):
        self.motions, self.width, self.height = tuple(motions), width, height
        self.border, self.space = border, space
        self._matrices: dict[int, np.ndarray] = {}
        self._pictures: dict[int, np.ndarray] = {}

    @classmethod
    def of(cls, plan: FramePlan, settings: VideoSettings) -> Camera:
        """The camera of a render planned from ``settings``."""
        return cls(plan.motions, settings.W, settings.H, settings.border, settings.motion_space)

    def _matrix(self, index: int) -> np.ndarray:
        if index not in self._matrices:
            self._matrices[index] = motion_matrix(self.motions[index], self.width, self.height)
        return self._matrices[index]

    def move(self, start: int, end: int) -> CameraMove | None:
        """The move from frame ``start``'s camera to frame ``end``'s (either way round; frames
        before 0, such as an init picture's -1, share frame 0's camera); None when every frame
        between keeps the camera still."""
        first, last = sorted((max(start, 0), max(end, 0)))
        frames = [i for i in range(first + 1, last + 1) if not self.motions[i].is_identity]
        if not frames:
            return None
        matrix = np.eye(3)
        for index in frames:
            matrix = self._matrix(index) @ matrix
        if end < start:
            matrix = np.linalg.inv(matrix)
        return CameraMove(matrix, self.border, self.space)

    def picture(self, engine: Engine, index: int, latent: torch.Tensor) -> np.ndarray:
        """Diffused frame ``index``'s ``latent`` (1, 4, h, w) decoded, (1, H, W, 3) uint8: by
        ``engine`` the first time, then from the cache (not to be written to)."""
        if index not in self._pictures:  # keep the one decoded last: the other end of the span
            self._pictures = dict(list(self._pictures.items())[-1:])
            self._pictures[index] = engine.decode(latent)
        return self._pictures[index]

    def moved(self, engine: Engine, index: int, latent: torch.Tensor, to: int) -> torch.Tensor:
        """Diffused frame ``index``'s ``latent`` brought to frame ``to``'s camera (itself when
        the camera stands still between them)."""
        move = self.move(index, to)
        if move is None:
            return latent
        picture = self.picture(engine, index, latent) if move.space == "pixel" else None
        return move.apply(engine, latent, picture)


def repeated_move(motion: Motion2D, frames: int, width: int, height: int, border: str = "replicate",
                  space: str = "pixel") -> CameraMove | None:
    """The camera's move over ``frames`` frames that all have ``motion`` (``m ** frames`` of its
    matrix): live, where the picture of a frame follows one made ``frames`` frames before (those
    between were dropped), so that the camera keeps its speed in frames of sound whatever the
    pictures per second. None when the camera stays still."""
    if frames < 1 or motion.is_identity:
        return None
    matrix = np.linalg.matrix_power(motion_matrix(motion, width, height), frames)
    return CameraMove(matrix, border, space)

