"""video_stats on synthetic videos written with the project's own writer, and scripts/video_stats.py."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from skimage.color import deltaE_ciede2000, rgb2lab

from conftest import load_module
from sounddiffusion.errors import ParameterError
from sounddiffusion.video.render import VideoRender
from sounddiffusion.video.video_stats import onset_per_frame, pearson, video_stats

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "video_stats.py"
SIZE = 64
FPS = 8
RATE = 44100


def smooth_texture(level: float) -> np.ndarray:
    """A (64, 64, 3) float picture: a gentle diagonal gradient around grey ``level``."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    gradient = (x + y) / (2 * SIZE) * 40 - 20
    return np.stack([level + gradient, level + 0.5 * gradient, level - 0.5 * gradient], axis=-1)


def write_video(path: Path, frames, audio: Path | None = None) -> Path:
    with VideoRender.open(path, FPS, SIZE, SIZE, settings={}, resume=False) as render:
        for frame in frames:
            render.add_frame(np.clip(np.rint(frame), 0, 255).astype(np.uint8))
        return render.finish(audio)


def test_constant_video_has_no_drift_and_no_flicker(tmp_path):
    stats = video_stats(write_video(tmp_path / "still.mp4", [smooth_texture(120)] * 12))
    assert stats.frames == 12 and stats.fps == FPS and (stats.width, stats.height) == (SIZE, SIZE)
    # H.264 (CRF 18, yuv420p) may change a static picture by a rounding step between frames
    # (measured: drift 0.08, hist_drift 0.12, flicker 0.03, flicker_hf 0).
    assert stats.drift.max() < 0.3
    assert stats.hist_drift.max() < 0.5
    assert stats.flicker.max() < 0.2 and stats.flicker_hf.max() < 0.1
    assert stats.flicker[0] == 0 and stats.flicker_hf[0] == 0 and stats.flicker_hf[-1] == 0
    summary = stats.summary()
    assert summary["has_audio"] is False and summary["onset_correlation"] is None


def test_colour_ramp_drift_matches_ciede2000_of_the_colours(tmp_path):
    start, end = np.array([200.0, 60.0, 40.0]), np.array([90.0, 110.0, 190.0])
    colours = [start + (end - start) * k / 9 for k in range(10)]
    stats = video_stats(write_video(tmp_path / "ramp.mp4",
                                    [np.broadcast_to(c, (SIZE, SIZE, 3)) for c in colours]))
    lab = rgb2lab(np.rint(np.array(colours))[None] / 255.0)[0]
    expected = deltaE_ciede2000(np.broadcast_to(lab[0], lab.shape), lab)
    assert expected[-1] > 30  # a strong drift, so the tolerance below means something
    # yuv420p at limited range moves a flat colour by up to ~2 of 255 per channel: < 1 ΔE00
    # (measured: 0.43 at most).
    np.testing.assert_allclose(stats.drift, expected, atol=1.0)
    # A flat picture's distribution is one point: its EMD is the L1 distance of the Lab colours.
    np.testing.assert_allclose(stats.hist_drift, np.abs(lab - lab[0]).sum(axis=1), atol=2.0)
    assert stats.summary()["drift_final"] == pytest.approx(expected[-1], abs=1.0)


def test_alternating_frames_flicker_at_high_frequency(tmp_path):
    frames = [smooth_texture(160 if k % 2 else 60) for k in range(10)]
    stats = video_stats(write_video(tmp_path / "alternate.mp4", frames))
    assert stats.flicker[1:] == pytest.approx(100, abs=1)
    assert stats.flicker_hf[1:-1] == pytest.approx(100, abs=1)


def test_steady_brightening_flickers_at_low_frequency_only(tmp_path):
    frames = [smooth_texture(60 + 6 * k) for k in range(12)]
    stats = video_stats(write_video(tmp_path / "fade.mp4", frames))
    assert stats.flicker[1:] == pytest.approx(6, abs=0.5)
    assert stats.flicker_hf.max() < 0.1
    assert stats.saturation[0] > stats.saturation[-1] > 0  # same spread on a brighter picture


def test_clipping_and_saturation(tmp_path):
    half_white = np.zeros((SIZE, SIZE, 3))
    half_white[:, : SIZE // 2] = 255
    grey = np.full((SIZE, SIZE, 3), 128.0)
    red = np.broadcast_to(np.array([200.0, 0, 0]), (SIZE, SIZE, 3))
    stats = video_stats(write_video(tmp_path / "tones.mp4", [half_white, grey, red]))
    assert stats.clipped[0] > 0.95 and stats.clipped[1] == 0
    assert stats.saturation[1] < 0.02 and stats.saturation[2] > 0.95


def click_track(path: Path, click_frames: list[int], n_frames: int) -> Path:
    """A WAV of silence with a 10 ms noise burst 20 ms into each of ``click_frames``."""
    samples = np.zeros(int(n_frames * RATE / FPS), np.float32)
    burst = np.random.default_rng(1).standard_normal(441).astype(np.float32) * np.linspace(0.8, 0, 441)
    for frame in click_frames:
        start = int((frame / FPS + 0.02) * RATE)
        samples[start:start + len(burst)] = burst
    soundfile.write(path, samples, RATE)
    return path


def test_picture_changing_on_the_clicks_correlates_with_the_onsets(tmp_path):
    n_frames, clicks = 48, [3, 7, 12, 16, 20, 27, 31, 36, 40, 45]
    levels, level = [], 80.0
    for k in range(n_frames):
        if k in clicks:
            level = 200.0 - level  # a jump on every click, still otherwise
        levels.append(level)
    path = write_video(tmp_path / "clicks.mp4", [smooth_texture(v) for v in levels],
                       audio=click_track(tmp_path / "clicks.wav", clicks, n_frames))
    stats = video_stats(path)
    assert stats.onset is not None and stats.onset.shape == (n_frames,)
    assert set(np.argsort(stats.onset)[-len(clicks):]) == set(clicks)
    assert stats.onset_correlation > 0.5
    assert stats.summary()["onset_correlation"] == stats.onset_correlation


def test_onset_per_frame_puts_each_click_in_its_frame():
    clicks = [2, 5, 9]
    samples = np.zeros(int(12 * RATE / FPS), np.float32)
    for frame in clicks:
        start = int((frame / FPS + 0.03) * RATE)
        samples[start:start + 200] = 0.9
    onsets = onset_per_frame(samples, FPS, 12)
    assert onsets.shape == (12,) and (onsets >= 0).all()
    assert set(np.argsort(onsets)[-3:]) == set(clicks)
    # Sound shorter than the video counts as silence; fps above the envelope rate still works.
    assert onset_per_frame(samples[:1000], 200, 300).shape == (300,)


def test_pearson_against_hand_computed_values_and_undefined_cases():
    # x - mean = (-1.5, -0.5, 1.5, 0.5), y - mean = (-1, -2, 2, 1): products sum to 6, squares to 5
    # and 10, so r = 6 / sqrt(5 * 10) = 3 sqrt(2) / 5 (without centring it would be 36 / sqrt(30 * 46))
    x, y = np.array([1.0, 2, 4, 3]), np.array([2.0, 1, 5, 4])
    assert pearson(x, y) == pytest.approx(3 * math.sqrt(2) / 5, rel=1e-12)
    assert pearson(x, -y) == pytest.approx(-3 * math.sqrt(2) / 5, rel=1e-12)
    assert pearson([1.0, 2, 3], [7.0, 9, 11]) == pytest.approx(1.0, rel=1e-12)  # y = 2x + 5
    assert pearson([1.0, 2, 3, 4], [1.0, -1, -1, 1]) == pytest.approx(0.0, abs=1e-15)  # orthogonal
    assert pearson(x, np.ones(4)) is None and pearson([1.0], [2.0]) is None


def test_unreadable_paths_are_parameter_errors(tmp_path):
    with pytest.raises(ParameterError, match="does not exist"):
        video_stats(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(ParameterError, match="not a video") as caught:
        video_stats(text)
    assert "\n" not in str(caught.value)


@pytest.fixture
def run_script(capsys):
    """Run scripts/video_stats.py in this process through cli.run, as its __main__ does:
    ``run_script(*argv) -> (status, stdout, stderr)``."""
    from sounddiffusion import cli

    module = load_module(SCRIPT, "video_stats_script")

    def run(*argv):
        capsys.readouterr()
        status = cli.run(module.main, module.build_parser(), [str(a) for a in argv])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def test_script_table_json_plot_and_errors(tmp_path, run_script):
    video = write_video(tmp_path / "fade.mp4", [smooth_texture(60 + 6 * k) for k in range(6)])
    status, out, err = run_script(video)
    assert status == 0, err
    assert "drift_final" in out and "no sound" in out

    status, out, err = run_script(video, "--json", "--plot")
    assert status == 0, err
    document = json.loads(out)
    assert document["summary"]["frames"] == 6
    assert len(document["per_frame"]["flicker"]) == 6
    assert Path(document["plot"]) == tmp_path / "fade.mp4.stats.png"
    assert Path(document["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    status, out, err = run_script(video, "--json", "--plot")
    assert Path(json.loads(out)["plot"]) == tmp_path / "fade.mp4.stats-0001.png"  # never overwritten

    status, out, err = run_script(tmp_path / "missing.mp4")
    assert status == 2 and err.count("\n") == 1 and "missing.mp4" in err
    status, out, err = run_script("--no-such-flag", video)
    assert status == 2 and err.count("\n") == 1


def test_script_runs_as_a_program(tmp_path):
    """The real command line: exit status 2 and one line for a file that is not there."""
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "missing.mp4")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("video_stats.py: error: ") and result.stderr.count("\n") == 1


def textured(size: int = 128) -> np.ndarray:
    """A (size, size, 3) uint8 picture of seeded blurred noise: detail at every scale up to ~10 px."""
    from scipy.ndimage import gaussian_filter

    noise = np.random.default_rng(4).standard_normal((size, size, 3))
    return np.clip(gaussian_filter(noise, (2.5, 2.5, 0)) * 500 + 128, 0, 255).astype(np.uint8)


def test_global_motion_recovers_the_warp_formulas():
    """Each motion applied by warp_2d (Deforum's convention) is read back in its own units; for
    zoom z and angle a about the centre after a shift t, the content moves by z Rot(a) t."""
    from sounddiffusion.video.motion import warp_2d
    from sounddiffusion.video.motion_stats import global_motion

    picture = textured()
    for motion in (dict(translation_x=6), dict(translation_y=-3.5), dict(angle=2), dict(angle=-5),
                   dict(zoom=1.05), dict(zoom=0.97), dict(angle=0.5), dict(zoom=1.01),
                   dict(zoom=1.04, angle=-3, translation_x=6, translation_y=4)):
        zoom, angle = motion.get("zoom", 1.0), np.radians(motion.get("angle", 0.0))
        tx, ty = motion.get("translation_x", 0.0), motion.get("translation_y", 0.0)
        # cv2.getRotationMatrix2D's linear part [[z cos, z sin], [-z sin, z cos]] applied to t
        want = (zoom * (np.cos(angle) * tx + np.sin(angle) * ty), zoom * (-np.sin(angle) * tx + np.cos(angle) * ty),
                motion.get("angle", 0.0), zoom)
        got = global_motion(picture, warp_2d(picture, **motion))
        np.testing.assert_allclose(got[:3], want[:3], atol=0.2, err_msg=str(motion))
        assert got[3] == pytest.approx(want[3], abs=0.003), motion
    assert global_motion(np.zeros((32, 32)), np.ones((32, 32))) == (0.0, 0.0, 0.0, 1.0)


def test_motion_per_frame_pulses_with_the_clicks(tmp_path):
    """A picture that pans 3 px a frame and zooms by 4 % on each click, in an H.264 video with
    the clicks as its sound: the per-frame motion, the medians and the zoom's correlation."""
    from sounddiffusion.video.motion import warp_2d

    n_frames, clicks = 32, [3, 7, 12, 16, 20, 27]
    frames, zooms = [textured()], [1.0]
    for k in range(1, n_frames):
        zooms.append(1.04 if k in clicks else 1.0)
        frames.append(warp_2d(frames[-1], zoom=zooms[-1], translation_x=3, border="wrap"))
    path = tmp_path / "motion.mp4"
    with VideoRender.open(path, FPS, 128, 128, settings={}, resume=False) as render:
        for frame in frames:
            render.add_frame(frame)
        render.finish(click_track(tmp_path / "clicks.wav", clicks, n_frames))
    stats = video_stats(path)
    assert (stats.shift_x[0], stats.rotation[0], stats.scale[0]) == (0.0, 0.0, 1.0)
    # the pan of frame k is zoom_k x 3 px (the zoom acts after the shift)
    np.testing.assert_allclose(stats.shift_x[1:], 3 * np.array(zooms[1:]), atol=0.3)
    np.testing.assert_allclose(stats.scale[1:], zooms[1:], atol=0.006)
    assert np.abs(stats.rotation[1:]).max() <= 0.3 and np.abs(stats.shift_y[1:]).max() <= 0.3
    summary = stats.summary()
    assert summary["shift_x_median"] == pytest.approx(3, abs=0.1)
    assert summary["scale_median"] == pytest.approx(1, abs=0.002)
    assert stats.zoom_onset_correlation > 0.8 and summary["zoom_onset_correlation"] == stats.zoom_onset_correlation
    per_frame = stats.per_frame()
    assert len(per_frame["scale"]) == len(per_frame["shift_x"]) == n_frames
