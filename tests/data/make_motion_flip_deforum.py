#!/usr/bin/env python
"""Makes motion_flip_deforum.json and motion_flip_deforum.png, the perspective-flip references of
tests/test_motion.py, with OpenCV the way Deforum's 2D mode (sd-webui-deforum,
``scripts/deforum_helpers/animation.py``: ``warpMatrix``, ``get_flip_perspective_matrix``,
``anim_frame_warp_2d``) computes them. It is not run by the tests and OpenCV is no dependency of
the project; to make the files again (from the project root, ../shared beside it):

    pip install opencv-python-headless==5.1.0.95     # the version the checked-in files were made with
    python tests/data/make_motion_flip_deforum.py     # rewrites both files in tests/data/

(run so, it rewrites the JSON byte for byte and the PNG with the same pixels; PIL's compression
may give other bytes).

The matrix of a flip, as Deforum forms it (W x H picture, angles in degrees, fv the field of view):

1. the four corners (-W/2, H/2, 0), (W/2, H/2, 0), (W/2, -H/2, 0), (-W/2, -H/2, 0) are rotated by
   Rx(phi) Ry(gamma) Rz(theta) (4x4, homogeneous), moved by -h along z, h = d / (2 sin(fv/2)),
   d = sqrt(W^2 + H^2), and projected by the OpenGL-style matrix with 1/tan(fv/2) on the
   diagonal, near h - d/2, far h + d/2, P[3, 2] = -1 and P[3, 3] left at 1 (the "+ 1" that
   sounddiffusion's docstring mentions): the product P T R is applied by
   ``cv2.perspectiveTransform``;
2. ``cv2.getPerspectiveTransform`` from the corners shifted by (W/2, H/2) to the projected points
   mapped by (p + 1) s / 2, s = d / cos(fv/2), both as float32;
3. that 3x3 matrix times the float32 translation by ((W - s)/2, (H - s)/2).

The picture warps ../shared/reference/motion/warp.npz's "input" with ``cv2.warpPerspective``
(INTER_LINEAR, BORDER_REPLICATE) by flip @ rotation @ translation, the rotation being
``cv2.getRotationMatrix2D((W center_x, H center_y), angle, zoom)`` and the translation
(translation_x, translation_y) in pixels: Deforum's matrices, but with the translation kept
(Deforum's ``np.matmul(bM, rot_mat, trans_mat)`` passes the translation as ``out`` and drops it).
"""
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SHARED_MOTION = HERE.parents[2] / "shared" / "reference" / "motion"

CASES = [dict(width=160, height=96, theta=10, phi=0, gamma=0, fv=53),
         dict(width=160, height=96, theta=0, phi=12, gamma=0, fv=53),
         dict(width=160, height=96, theta=0, phi=0, gamma=-9, fv=40),
         dict(width=160, height=96, theta=5, phi=-7, gamma=8, fv=70),
         dict(width=512, height=512, theta=-20, phi=15, gamma=25, fv=53),
         dict(width=512, height=384, theta=3, phi=30, gamma=-4, fv=90)]
MOTION = dict(zoom=1.05, angle=6, translation_x=5.5, translation_y=-3, center_x=0.4, center_y=0.6,
              perspective_flip_theta=5, perspective_flip_phi=-7, perspective_flip_gamma=8, perspective_flip_fv=70)


def turn(axis: int, degrees: float) -> np.ndarray:
    """The 4x4 homogeneous rotation by ``degrees`` about axis 0 (x), 1 (y) or 2 (z)."""
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    matrix = np.eye(4)
    matrix[i, i] = matrix[j, j] = c
    matrix[i, j], matrix[j, i] = -s, s
    return matrix


def flip_matrix(width, height, theta, phi, gamma, fv) -> np.ndarray:
    """Steps 1 to 3 of the module docstring: the (3, 3) forward map of the flip."""
    half = np.deg2rad(fv / 2.0)
    diagonal = np.sqrt(width * width + height * height)
    side = diagonal / np.cos(half)
    distance = diagonal / (2.0 * np.sin(half))
    near, far = distance - diagonal / 2.0, distance + diagonal / 2.0
    move = np.eye(4)
    move[2, 3] = -distance
    project = np.eye(4)
    project[0, 0] = project[1, 1] = 1.0 / np.tan(half)
    project[2, 2] = -(far + near) / (far - near)
    project[2, 3] = -(2.0 * far * near) / (far - near)
    project[3, 2] = -1.0
    whole = project @ move @ turn(0, phi) @ turn(1, gamma) @ turn(2, theta)
    corners = np.array([[[-width / 2.0, height / 2.0, 0.0], [width / 2.0, height / 2.0, 0.0],
                         [width / 2.0, -height / 2.0, 0.0], [-width / 2.0, -height / 2.0, 0.0]]])
    seen = cv2.perspectiveTransform(corners, whole)[0, :, :2]
    source = (corners[0, :, :2] + [width / 2.0, height / 2.0]).astype(np.float32)
    target = ((seen + 1.0) * (0.5 * side)).astype(np.float32)
    shift = np.vstack([np.float32([[1, 0, (width - side) / 2], [0, 1, (height - side) / 2]]), [0, 0, 1]])
    return cv2.getPerspectiveTransform(source, target) @ shift


def flipped_picture(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    flip = flip_matrix(width, height, MOTION["perspective_flip_theta"], MOTION["perspective_flip_phi"],
                       MOTION["perspective_flip_gamma"], MOTION["perspective_flip_fv"])
    centre = (width * MOTION["center_x"], height * MOTION["center_y"])
    rotation = np.vstack([cv2.getRotationMatrix2D(centre, MOTION["angle"], MOTION["zoom"]), [0, 0, 1]])
    translation = np.vstack([np.float32([[1, 0, MOTION["translation_x"]], [0, 1, MOTION["translation_y"]]]),
                             [0, 0, 1]])
    return cv2.warpPerspective(rgb, flip @ rotation @ translation, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)


def main() -> int:
    rgb = np.load(SHARED_MOTION / "warp.npz")["input"]
    cases = [dict(case, matrix=flip_matrix(**case).tolist()) for case in CASES]
    about = ("Deforum's 2D perspective-flip matrix (sd-webui-deforum warpMatrix + get_flip_perspective_matrix: "
             "cv2.perspectiveTransform, cv2.getPerspectiveTransform on float32 corners, the float32 "
             f"post-translation), computed with opencv-python-headless {cv2.__version__}; forward map for "
             "cv2.warpPerspective, pixels.")
    picture = {"file": "motion_flip_deforum.png",
               "about": "cv2.warpPerspective (INTER_LINEAR, BORDER_REPLICATE) of ../shared/reference/motion/warp.npz "
                        "'input' by flip @ getRotationMatrix2D((W*center_x, H*center_y), angle, zoom) @ translation: "
                        "Deforum's matrices with the translation kept (Deforum's np.matmul(bM, rot_mat, trans_mat) "
                        "drops it)",
               "motion": MOTION, "border": "replicate"}
    (HERE / "motion_flip_deforum.json").write_text(json.dumps({"about": about, "cases": cases, "picture": picture},
                                                              indent=1))
    Image.fromarray(flipped_picture(rgb)).save(HERE / "motion_flip_deforum.png")
    print(f"wrote {HERE / 'motion_flip_deforum.json'} and {HERE / 'motion_flip_deforum.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
