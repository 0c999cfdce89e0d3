"""The 2D camera-motion warp: Deforum's pictures (OpenCV) from ../shared, pixel formulas, torch vs numpy.

tests/data/motion_flip_deforum.json and .png (the perspective flip's matrices and one flipped
picture, as Deforum computes them with OpenCV) are made by tests/data/make_motion_flip_deforum.py,
whose docstring says how; it needs opencv-python-headless, which the tests do not."""
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sounddiffusion.errors import ParameterError
from sounddiffusion.video.motion import (Motion2D, motion_matrix, perspective_flip_matrix, warp_2d,
                                         warp_2d_torch)

DATA = Path(__file__).resolve().parent / "data"
BORDERS = ("replicate", "wrap", "reflect")


@pytest.fixture(scope="module")
def references(reference_dir):
    meta = json.loads((reference_dir / "motion" / "warp.json").read_text())
    return meta["cases"], dict(np.load(reference_dir / "motion" / "warp.npz"))


@pytest.fixture(scope="module")
def noise():
    """A 40x48 picture of random pixels: every sub-pixel error shows."""
    return np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)


def to_tensor(rgb):
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float()


def to_picture(x):
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def split(case):
    case = dict(case)
    return Motion2D(**{k: v for k, v in case.items() if k != "border"}), case.get("border", "replicate")


def assert_close_to(out, want, name):
    """check_motion.py's tolerance (mean 0.5, 99.5 % within 3 levels), and the 1 level seen here:
    a half-pixel error in the centre or the pixel-centre convention passes the first but not this."""
    diff = np.abs(out.astype(int) - want.astype(int))
    assert out.shape == want.shape and out.dtype == np.uint8, name
    assert diff.mean() <= 0.5 and np.percentile(diff, 99.5) <= 3, (name, diff.mean())
    assert diff.max() <= 1, (name, diff.max())


def test_numpy_warp_matches_deforums_opencv_pictures(references):
    cases, pictures = references
    for name, case in cases.items():
        out = warp_2d(pictures["input"].copy(), **case)
        if name == "identity":
            assert np.array_equal(out, pictures["identity"])
        assert_close_to(out, pictures[name], name)


def test_torch_warp_matches_deforums_opencv_pictures(references):
    cases, pictures = references
    for name, case in cases.items():
        motion, border = split(case)
        assert_close_to(to_picture(warp_2d_torch(to_tensor(pictures["input"]), motion, border=border)),
                        pictures[name], name)


def test_perspective_flip_matrix_is_deforums():
    for case in json.loads((DATA / "motion_flip_deforum.json").read_text())["cases"]:
        mine = perspective_flip_matrix(case["width"], case["height"], case["theta"], case["phi"], case["gamma"],
                                       case["fv"])
        want = np.array(case["matrix"])
        # Deforum solves in float32; compare the maps at the picture's corners and centre.
        for x, y in [(0, 0), (case["width"], 0), (0, case["height"]), (case["width"] / 2, case["height"] / 2)]:
            p, q = mine @ [x, y, 1], want @ [x, y, 1]
            assert np.allclose(p[:2] / p[2], q[:2] / q[2], atol=2e-3), case


def test_perspective_flip_with_translation_matches_opencv_and_keeps_the_translation(references):
    _, pictures = references
    meta = json.loads((DATA / "motion_flip_deforum.json").read_text())["picture"]
    want = np.asarray(Image.open(DATA / meta["file"]).convert("RGB"))
    motion = Motion2D(**meta["motion"])
    out = warp_2d(pictures["input"], **asdict(motion), border=meta["border"])
    assert_close_to(out, want, "flip")
    assert_close_to(to_picture(warp_2d_torch(to_tensor(pictures["input"]), motion)), want, "flip torch")
    # Deforum's own product (translation dropped) gives a picture several levels away.
    dropped = warp_2d(pictures["input"], **dict(asdict(motion), translation_x=0, translation_y=0))
    assert np.abs(dropped.astype(int) - want).mean() > 3


def test_flip_after_a_whole_pixel_translation_equals_flip_with_that_translation(noise):
    flip = dict(perspective_flip_theta=4, perspective_flip_phi=-6, perspective_flip_gamma=9)
    shifted = warp_2d(noise, translation_x=3, translation_y=-2)
    both = warp_2d(noise, translation_x=3, translation_y=-2, **flip)
    # Away from the edges, where the shifted picture lost its far columns and rows to the border.
    inside = (slice(8, -8), slice(8, -8))
    assert np.abs(warp_2d(shifted, **flip)[inside].astype(int) - both[inside]).max() <= 1
    assert np.abs(warp_2d(noise, **flip)[inside].astype(int) - both[inside]).mean() > 20


@pytest.mark.parametrize("border", BORDERS)
def test_torch_equals_numpy_on_random_pixels(noise, border):
    motions = [Motion2D(zoom=0.83, angle=31, translation_x=-6.3, translation_y=2.2, center_x=0.2, center_y=0.9),
               Motion2D(zoom=1.2, angle=-8, translation_x=3.5, perspective_flip_phi=10, perspective_flip_gamma=-6),
               Motion2D(translation_x=-50.25, translation_y=33.5)]
    pictures = [noise, noise[::-1].copy()]
    batch = torch.cat([to_tensor(picture) for picture in pictures])
    for motion in motions:
        warped = warp_2d_torch(batch, motion, border=border)  # one motion for the batch
        for picture, out in zip(pictures, warped):
            want = warp_2d(picture, **asdict(motion), border=border)
            # numpy rounds its float result to levels; the torch one is that float within float32 noise.
            assert np.abs(out.permute(1, 2, 0).numpy() - want).max() <= 0.51, (border, motion)


def test_whole_pixel_translation_moves_pixels_and_each_border_fills_the_edge(noise):
    k, j = 5, 3
    for border in BORDERS:
        out = warp_2d(noise, translation_x=k, translation_y=-j, border=border)
        assert np.array_equal(out[:-j, k:], noise[j:, :-k]), border
    rows = noise[j:]
    replicate = warp_2d(noise, translation_x=k, translation_y=-j)
    assert np.array_equal(replicate[:-j, :k], np.repeat(rows[:, :1], k, axis=1))
    assert np.array_equal(replicate[-j:, k:], np.repeat(noise[-1:, :-k], j, axis=0))
    wrap = warp_2d(noise, translation_x=k, translation_y=-j, border="wrap")
    assert np.array_equal(wrap[:-j, :k], rows[:, -k:])
    assert np.array_equal(wrap[-j:, k:], noise[:j, :-k])
    reflect = warp_2d(noise, translation_x=k, border="reflect")  # mirrored about column 0's centre
    assert np.array_equal(reflect[:, :k], noise[:, k:0:-1])


def test_zoom_keeps_the_centre_pixel_and_doubles_distances_from_it(noise):
    cx, cy = 20, 13  # a pixel centre: Deforum's centre (W center_x, H center_y) is in pixels
    out = warp_2d(noise, zoom=2.0, center_x=cx / 48, center_y=cy / 40)
    assert np.array_equal(out[cy, cx], noise[cy, cx])
    # out(c + 2d) = in(c + d)
    assert np.array_equal(out[cy - 12:cy + 13:2, cx - 18:cx + 27:2], noise[cy - 6:cy + 7, cx - 9:cx + 14])
    fly_in = warp_2d(noise, zoom=1.37, center_x=cx / 48, center_y=cy / 40)
    assert np.array_equal(fly_in[cy, cx], noise[cy, cx])


def test_rotation_by_90_degrees_about_the_middle_is_rot90_counter_clockwise():
    square = np.random.default_rng(2).integers(0, 256, (31, 31, 3), dtype=np.uint8)
    middle = 15 / 31  # the middle pixel's centre (15, 15)
    assert np.array_equal(warp_2d(square, angle=90, center_x=middle, center_y=middle), np.rot90(square))
    assert np.array_equal(warp_2d(square, angle=-90, center_x=middle, center_y=middle), np.rot90(square, -1))
    tensor = warp_2d_torch(to_tensor(square), Motion2D(angle=90, center_x=middle, center_y=middle))
    assert np.array_equal(to_picture(tensor), np.rot90(square))


def test_latent_warp_moves_a_blob_by_the_pictures_distance_over_8():
    latent = torch.zeros(1, 4, 24, 32)
    latent[:, :, 10:13, 14:16] = torch.arange(1.0, 5.0)[:, None, None]
    moved = warp_2d_torch(latent, Motion2D(translation_x=24, translation_y=-16), pixels_per_unit=8)
    assert torch.equal(moved[:, :, 8:11, 17:19], latent[:, :, 10:13, 14:16])
    assert moved.abs().sum() == latent.abs().sum()
    half_cell = warp_2d_torch(latent, Motion2D(translation_x=4), pixels_per_unit=8)
    assert torch.allclose(half_cell[0, :, 11, 16], latent[0, :, 11, 15] / 2)


def test_latent_matrix_is_the_picture_matrix_seen_through_8x8_cells():
    motion = Motion2D(zoom=1.1, angle=12, translation_x=16, translation_y=-8, center_x=0.3, center_y=0.6)
    picture, latent = motion_matrix(motion, 512, 384), motion_matrix(motion, 64, 48, pixels_per_unit=8)
    for u, v in [(0, 0), (63, 0), (10, 47), (31.5, 23.5)]:
        p = picture @ [8 * u + 3.5, 8 * v + 3.5, 1]  # latent cell (u, v) covers pixels 8u..8u+7
        q = latent @ [u, v, 1]
        assert np.allclose([8 * q[0] + 3.5, 8 * q[1] + 3.5], p[:2])


def test_identity_returns_the_input_itself():
    rgb = np.zeros((4, 5, 3), np.uint8)
    assert warp_2d(rgb, center_x=0.1, perspective_flip_fv=20) is rgb
    x = torch.randn(2, 4, 6, 6, dtype=torch.float16)
    assert warp_2d_torch(x, Motion2D(center_y=0.9)) is x
    moved = warp_2d_torch(x, Motion2D(zoom=1.5), border="wrap")
    assert moved.dtype == torch.float16 and moved.shape == x.shape and not torch.equal(moved, x)


def test_edge_on_flips_are_those_whose_plane_normal_is_perpendicular_to_the_view():
    """The flip turns the plane by Rx(phi) Ry(gamma) Rz(theta) (scipy's intrinsic "XYZ"): it is
    refused where the normal's component along the view axis is below sin(0.1 degree)."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(3)
    angles = np.concatenate([rng.uniform(-400, 400, (200, 3)),
                             [[0, 90, 0], [10, 0, 270], [5, 89.95, 30], [5, 89.85, 0], [0, 45, 89.9]]])
    for theta, phi, gamma in angles:
        normal = Rotation.from_euler("XYZ", [phi, gamma, theta], degrees=True).apply([0.0, 0.0, 1.0])
        refused = abs(normal[2]) < np.sin(np.radians(0.1))
        try:
            Motion2D(perspective_flip_theta=theta, perspective_flip_phi=phi, perspective_flip_gamma=gamma)
        except ParameterError:
            assert refused, (theta, phi, gamma)
        else:
            assert not refused, (theta, phi, gamma)
    # just outside the margin the warp is still a picture
    out = warp_2d(np.full((32, 32, 3), 200, np.uint8), perspective_flip_phi=89.85)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("arguments, words", [
    (dict(zoom=0), "zoom 0 must be above 0"),
    (dict(zoom=-1.5), "zoom -1.5 must be above 0"),
    (dict(border="mirror"), "border 'mirror' is unknown: use one of replicate, wrap, reflect"),
    (dict(center_x=1.5), "center_x 1.5 is outside 0..1"),
    (dict(center_y=-0.1), "center_y -0.1 is outside 0..1"),
    (dict(angle=float("nan")), "motion angle is nan: give a finite number"),
    (dict(translation_x=float("inf")), "motion translation_x is inf"),
    (dict(perspective_flip_fv=180), "perspective_flip_fv 180 is outside (0, 180)"),
    (dict(perspective_flip_phi=90), "perspective_flip_phi 90 with perspective_flip_gamma 0 turns the picture's "
                                    "plane edge-on"),
    (dict(perspective_flip_theta=20, perspective_flip_gamma=-270.05), "perspective_flip_gamma -270.05 turns"),
])
def test_bad_parameters_raise_one_line_parameter_errors(arguments, words):
    with pytest.raises(ParameterError) as raised:
        warp_2d(np.zeros((4, 4, 3), np.uint8), **arguments)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_bad_pixels_per_unit_and_border_raise_parameter_errors():
    with pytest.raises(ParameterError, match="pixels_per_unit 0 must be above 0"):
        warp_2d_torch(torch.zeros(1, 4, 8, 8), Motion2D(zoom=1.1), pixels_per_unit=0)
    with pytest.raises(ParameterError, match="border 'zeros' is unknown"):
        warp_2d_torch(torch.zeros(1, 4, 8, 8), Motion2D(), border="zeros")
