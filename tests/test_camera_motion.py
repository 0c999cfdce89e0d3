"""Camera motion in audio2video on the demo model: pure motion with --strength 0 (measured by phase
correlation), the camera path through --cadence in-betweens, a still camera's bytes, a scheduled
zoom that resumes and reaches the CSV, and bad values as one line before the model loads."""

import json

import numpy as np
import pytest
import torch
from skimage.registration import phase_cross_correlation

from cli_checks import DEMO, assert_one_line_error, click_track, decoded_frames, stop_at_frame
from sounddiffusion.errors import ParameterError
from sounddiffusion.model.loading import load_engine
from sounddiffusion.settings import ModelSettings, VideoSettings
from sounddiffusion.video import loop
from sounddiffusion.video.camera import Camera
from sounddiffusion.video.frame_chain import ChainState
from sounddiffusion.video.frame_plan import plan_frames
from sounddiffusion.video.motion import Motion2D, motion_matrix
from sounddiffusion.video.video_stats import video_stats

FAST = [*DEMO, "--fps", "8", "--seed", "5"]
PURE_MOTION = ["--demo", "--H", "128", "--W", "128", "--ddim_steps", "2", "--fps", "8", "--seed", "5",
               "--strength", "0"]


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
    return click_track(tmp_path_factory.mktemp("clicks") / "clicks.wav", seconds=3.0)


@pytest.fixture(scope="module")
def short_clicks(tmp_path_factory):
    return click_track(tmp_path_factory.mktemp("short") / "clicks.wav", seconds=2.0)


def content_shifts(frames: np.ndarray) -> np.ndarray:
    """(N - 1, 2): how far the content moved (x right, y down) between consecutive frames, by
    skimage's phase correlation on the grey pictures (independent of the project's measure)."""
    grey = frames.astype(np.float64).mean(axis=3)
    shifts = [phase_cross_correlation(grey[k - 1], grey[k], upsample_factor=20)[0] for k in range(1, len(grey))]
    return -np.array(shifts)[:, ::-1]


@pytest.mark.parametrize("space, cadence, blend", [
    ("pixel", "1", "latent"), ("latent", "1", "latent"), ("pixel", "3", "latent"), ("pixel", "3", "pixel"),
])
def test_strength_0_is_pure_motion_six_pixels_a_frame(run_tool, short_clicks, tmp_path, space, cadence, blend):
    """img2img at strength 0 keeps its start: the video is the camera alone, 6 px to the right on
    every frame, the in-betweens of --cadence 3 included (wrap: nothing comes in at the edges to
    be told apart from the content)."""
    output = tmp_path / "pan.mp4"
    status, _, err = run_tool("audio2video", ["--path", short_clicks, *PURE_MOTION, "--translation_x", "6",
                                              "--border", "wrap", "--motion_space", space, "--cadence", cadence,
                                              "--cadence_blend", blend, "--output", output])
    assert status == 0, err
    frames = decoded_frames(output)
    assert len(frames) == 16
    shifts = content_shifts(frames)
    # Each step is decode -> warp -> encode (or a latent warp) and H.264: a few tenths of a pixel
    # per frame, none near a still frame or a double step (measured: 5.3 .. 7.7 px, medians 5.9 .. 6.2).
    assert np.median(shifts[:, 0]) == pytest.approx(6, abs=0.3)
    assert np.abs(np.median(shifts[:, 1])) < 0.3
    assert shifts[:, 0].min() > 4.5 and shifts[:, 0].max() < 8
    summary = video_stats(output).summary()
    assert summary["shift_x_median"] == pytest.approx(6, abs=0.5)
    assert abs(summary["shift_y_median"]) < 0.3 and abs(summary["rotation_median"]) < 0.3
    assert summary["scale_median"] == pytest.approx(1, abs=0.005)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--cadence", "2", "--color_coherence", "lab", "--contrast", "0.98"]])
def test_identity_motion_flags_give_the_same_bytes(run_tool, clicks, tmp_path, extra):
    plain = tmp_path / "plain.mp4"
    assert run_tool("audio2video", ["--path", clicks, *FAST, *extra, "--output", plain])[0] == 0
    still = tmp_path / "still.mp4"
    status, _, err = run_tool("audio2video", [
        "--path", clicks, *FAST, *extra, "--output", still, "--zoom", "1.0", "--angle", "0", "--translation_x", "0",
        "--translation_y", "-0", "--transform_center_x", "0.2", "--transform_center_y", "0.9", "--border", "wrap",
        "--perspective_flip_theta", "0", "--perspective_flip_fv", "40", "--motion_space", "latent"])
    assert status == 0, err
    assert plain.read_bytes() == still.read_bytes()


@pytest.mark.slow
def test_scheduled_zoom_renders_resumes_and_is_recorded(run_tool, clicks, tmp_path, monkeypatch):
    base = ["--path", clicks, *FAST, "--strength", "0.3", "--cadence", "2", "--plot"]
    args = [*base, "--zoom", "1 + 0.06*onset", "--angle", "0:(0), 12:(3)"]
    whole = tmp_path / "whole.mp4"
    status, _, err = run_tool("audio2video", [*args, "--output", whole])
    assert status == 0, err
    real = loop.next_latent
    monkeypatch.setattr(loop, "next_latent", stop_at_frame(real, 10))  # frames 0..8 done (9 is an in-between)
    parts = tmp_path / "parts.mp4"
    assert run_tool("audio2video", [*args, "--output", parts])[0] == 130
    recorded = json.loads((tmp_path / "parts.mp4.render" / "settings.json").read_text())["settings"]
    assert recorded["zoom"] == "1 + 0.06*onset" and recorded["border"] == "replicate"
    monkeypatch.setattr(loop, "next_latent", real)
    changed = [*base, "--zoom", "1 + 0.05*onset", "--angle", "0:(0), 12:(3)"]
    status, _, err = run_tool("audio2video", [*changed, "--output", parts, "--resume"])
    assert status == 2 and "zoom" in err
    status, _, err = run_tool("audio2video", [*args, "--output", parts, "--resume"])
    assert status == 0, err
    assert parts.read_bytes() == whole.read_bytes()  # the renderer's promise, with the camera moving too
    frames = decoded_frames(whole)
    # the per-frame values as used, beside the envelopes they come from
    rows = np.genfromtxt(tmp_path / "whole.schedule.csv", delimiter=",", names=True)
    np.testing.assert_array_equal(rows["zoom"], 1 + 0.06 * rows["onset"])
    np.testing.assert_allclose(rows["angle"][[0, 6, 12, 23]], [0, 1.5, 3, 3])
    assert (tmp_path / "whole.schedule.png").exists()
    # and the camera moved: the same render with a still camera differs
    status, _, err = run_tool("audio2video", [*base, "--output", tmp_path / "still.mp4"])
    assert status == 0, err
    assert not np.array_equal(decoded_frames(tmp_path / "still.mp4"), frames)


def test_zoom_pulses_with_the_clicks_in_video_stats(run_tool, clicks, tmp_path):
    """With --strength 0 the picture only zooms, by 1 + 0.05 onset: video_stats sees the pulses."""
    output = tmp_path / "pulse.mp4"
    status, _, err = run_tool("audio2video", ["--path", clicks, *PURE_MOTION, "--zoom", "1 + 0.05*onset",
                                              "--output", output])
    assert status == 0, err
    stats = video_stats(output)
    zoom = np.genfromtxt(tmp_path / "pulse.schedule.csv", delimiter=",", names=True)["zoom"]
    assert stats.zoom_onset_correlation > 0.8
    assert np.corrcoef(stats.scale[1:], zoom[1:])[0, 1] > 0.9
    # The demo autoencoder redraws each frame on its fixed 8x8 block grid, which holds part of
    # the picture still: the measured zoom is 0.5 to 1 times the scheduled one, never more.
    pulses = zoom[1:] > 1.02
    ratio = (stats.scale[1:][pulses] - 1) / (zoom[1:][pulses] - 1)
    assert ratio.min() > 0.5 and ratio.max() < 1.1, ratio


def test_dry_run_writes_the_motion_columns_without_a_model(run_tool, clicks, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "load_engine", lambda *a: pytest.fail("--dry_run loaded the model"))
    status, _, err = run_tool("audio2video", ["--path", clicks, "--zoom", "1 + 0.04*onset", "--translation_x",
                                              "3*beat", "--angle", "0.5", "--dry_run", "--plot", "--outdir", tmp_path])
    assert status == 0, err
    header = (tmp_path / "clicks.schedule.csv").read_text().splitlines()[0].split(",")
    assert "zoom" in header and "translation_x" in header and "angle" not in header  # constants stay out
    assert (tmp_path / "clicks.schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flag, value, words", [
    ("--zoom", "0", ["--zoom 0 is outside (0, inf)", "flies in"]),
    ("--zoom", "-1.5", ["--zoom -1.5 is outside (0, inf)"]),
    ("--zoom", "1 - 2*onset", ["--zoom", "1 - 2*onset", "on frame", "(0, inf)"]),
    ("--zoom", "0:(1.02), 12:(0)", ["--zoom", "0 on frame 12"]),
    ("--border", "mirror", ["--border", "invalid choice", "mirror"]),
    ("--motion_space", "both", ["--motion_space", "invalid choice"]),
    ("--transform_center_x", "1.5", ["--transform_center_x 1.5 is outside [0, 1]"]),
    ("--transform_center_y", "-0.2", ["--transform_center_y -0.2 is outside [0, 1]"]),
    ("--perspective_flip_fv", "180", ["--perspective_flip_fv 180 is outside (0, 180)"]),
    # edge-on planes: a singular homography at 90, numerical noise at 270 (cos 270 is 1.8e-16), a
    # schedule reaching it on one frame
    ("--perspective_flip_phi", "90", ['--perspective_flip_phi "90"', "are 90 and 0 on frame 1", "edge-on"]),
    ("--perspective_flip_gamma", "270", ['--perspective_flip_gamma "270"', "are 0 and 270 on frame 1", "edge-on"]),
    ("--perspective_flip_gamma", "0:(0), 8:(-90)", ["are 0 and -90 on frame 8", "(16 of 24 frames)", "away from 90"]),
    ("--angle", "2 +* beat", ["--angle", "column", "expected"]),
    ("--translation_x", "3*loudness", ["--translation_x", "loudness"]),
    ("--translation_y", "__import__('os')", ["--translation_y", "column"]),
])
def test_bad_motion_values_are_one_line_before_the_model_loads(run_tool, clicks, tmp_path, monkeypatch, flag,
                                                              value, words):
    monkeypatch.setattr(loop, "load_engine", lambda *a: pytest.fail("the model was loaded"))
    status, _, err = run_tool("audio2video", ["--path", clicks, flag, value, "--outdir", tmp_path, *FAST])
    assert_one_line_error(status, err, "audio2video", *words)
    assert not list(tmp_path.glob("*.mp4*"))


def test_settings_in_code_are_checked_when_planned(clicks):
    with pytest.raises(ParameterError, match="border 'mirror' is unknown"):
        plan_frames(VideoSettings(audio=str(clicks), fps=8, border="mirror"))
    with pytest.raises(ParameterError, match="motion_space 'pixels' is unknown"):
        plan_frames(VideoSettings(audio=str(clicks), fps=8, motion_space="pixels"))
    plan = plan_frames(VideoSettings(audio=str(clicks), fps=8, zoom=1.05, translation_y="2*t"))
    assert plan.motions[0] == Motion2D()  # frame 0 has no frame before it
    assert plan.frame(5).motion == Motion2D(zoom=1.05, translation_y=10)


def test_a_still_camera_records_no_motion_and_a_moving_one_all_of_it():
    still = VideoSettings(audio="a.wav", zoom="1.0", transform_center_x="0.3", border="wrap", motion_space="latent")
    assert not still.camera_moves()
    assert not set(VideoSettings.MOTION_FIELDS) & set(still.parameters())
    for moving in (VideoSettings(audio="a.wav", angle=0.5), VideoSettings(audio="a.wav", zoom="1 + 0*onset"),
                   VideoSettings(audio="a.wav", perspective_flip_phi="2")):
        assert moving.camera_moves()
        assert set(VideoSettings.MOTION_FIELDS) <= set(moving.parameters())
    assert VideoSettings(audio="a.wav", zoom=1.02).parameters()["zoom"] == "1.02"


def test_camera_moves_compose_the_frames_between():
    motions = [Motion2D(), Motion2D(zoom=1.1), Motion2D(), Motion2D(angle=5, translation_x=3),
               Motion2D(translation_y=-2, center_x=0.2)]
    camera = Camera(motions, 40, 30, border="wrap", space="latent")
    matrix = {i: motion_matrix(m, 40, 30) for i, m in enumerate(motions)}
    # the map from frame 1 to frame 4: frame 2's motion, then 3's, then 4's (2 is still)
    np.testing.assert_allclose(camera.move(1, 4).matrix, matrix[4] @ matrix[3])
    np.testing.assert_allclose(camera.move(-1, 4).matrix, matrix[4] @ matrix[3] @ matrix[1])
    np.testing.assert_allclose(camera.move(4, 1).matrix, np.linalg.inv(matrix[4] @ matrix[3]))
    np.testing.assert_allclose(camera.move(3, 1).matrix @ camera.move(1, 3).matrix, np.eye(3), atol=1e-12)
    assert camera.move(1, 2) is None and camera.move(2, 1) is None and camera.move(-1, 0) is None
    move = camera.move(0, 3)
    assert (move.border, move.space) == ("wrap", "latent")
    # a point of frame 0 lands where the two moves one after the other put it
    point = np.array([7.0, 11.0, 1.0])
    np.testing.assert_allclose(move.matrix @ point, matrix[3] @ (matrix[1] @ point))


def test_a_steady_zoom_and_turn_moves_each_in_between_by_its_share_of_the_span():
    """The camera.py docstring's claim: with a constant zoom z and angle r, the move from diffused
    frame a to frame i is one zoom z ** (i - a) and turn (i - a) r about the same centre (the share
    t = (i - a) / (b - a) of the span's), and from b back to i the rest undone."""
    z, r, a, b = 1.06, 4.0, 2, 7
    steady = Motion2D(zoom=z, angle=r, center_x=0.3, center_y=0.65)
    camera = Camera([Motion2D()] + [steady] * 9, 48, 40)
    for i in range(a + 1, b):
        t = (i - a) / (b - a)
        share = Motion2D(zoom=(z ** (b - a)) ** t, angle=t * (b - a) * r, center_x=0.3, center_y=0.65)
        rest = Motion2D(zoom=(z ** (b - a)) ** (t - 1), angle=(t - 1) * (b - a) * r, center_x=0.3, center_y=0.65)
        np.testing.assert_allclose(camera.move(a, i).matrix, motion_matrix(share, 48, 40), atol=1e-9)
        np.testing.assert_allclose(camera.move(b, i).matrix, motion_matrix(rest, 48, 40), atol=1e-9)
    # a translation is turned by the frames after it: two steps are not one of twice the shift
    panned = Camera([Motion2D()] + [Motion2D(angle=r, translation_x=3)] * 2, 48, 40)
    assert not np.allclose(panned.move(0, 2).matrix, motion_matrix(Motion2D(angle=2 * r, translation_x=6), 48, 40))


class Discard:
    """Stands in for the FrameWriter (which decodes each frame for the video, in its own thread)."""

    def submit(self, index, latent, chain):
        pass


@pytest.mark.parametrize("cadence, color, decodes", [("3", "none", 4), ("3", "lab", 4), ("1", "lab", 9)])
def test_the_loop_decodes_each_diffused_frame_once(clicks, monkeypatch, cadence, color, decodes):
    """Picture motion: a diffused frame's picture serves its move to the next diffused frame, the
    colour match, frame 0's colour reference and the in-betweens' moves; frames 0..9 at --cadence 3
    diffuse 0, 3, 6, 9 (9's picture for the in-betweens 7 and 8), at --cadence 1 frames 0..8 move."""
    engine = load_engine(ModelSettings(demo=True, device="cpu"))
    inputs = []
    real = engine.decode
    monkeypatch.setattr(engine, "decode", lambda latent: inputs.append(latent.clone()) or real(latent))
    settings = VideoSettings(audio=str(clicks), fps=8, H=64, W=64, ddim_steps=4, strength=0.5, seed=5,
                             zoom="1.02 + 0.05*onset", angle=1, cadence=cadence, cadence_blend="latent",
                             color_coherence=color)
    loop.sample_frames(engine, plan_frames(settings), settings, Discard(), start=0, stop=10, chain=ChainState())
    repeated = [i for i, latent in enumerate(inputs) if any(torch.equal(latent, seen) for seen in inputs[:i])]
    assert (len(inputs), repeated) == (decodes, [])
