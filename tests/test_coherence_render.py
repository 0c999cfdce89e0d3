"""--cadence, --color_coherence, --latent_noise and --contrast in real renders on the demo model:
in-betweens keep the frame count and sync with a fraction of the UNet calls, colour coherence
lowers the measured drift, and every cure resumes to the same frames."""

import numpy as np
import pytest

from cli_checks import DEMO, click_track, decoded_frames
from ldm.models.diffusion.ddpm import LatentDiffusion
from sounddiffusion.video import loop
from video_probe import probe_video

FAST = [*DEMO, "--ddim_steps", "4", "--fps", "8", "--seed", "5", "--strength", "0.5"]


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
    return click_track(tmp_path_factory.mktemp("clicks") / "clicks.wav", seconds=3.0)


@pytest.fixture
def unet_calls(monkeypatch):
    """Counts the UNet evaluations (each evaluates the guidance batch once)."""
    calls = [0]
    real = LatentDiffusion.apply_model

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LatentDiffusion, "apply_model", counted)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("blend", ["latent", "pixel"])
def test_cadence_keeps_frames_and_sync_with_a_third_of_the_unet_calls(run_tool, clicks, tmp_path, unet_calls,
                                                                       blend):
    every = tmp_path / "every.mp4"
    assert run_tool("audio2video", ["--path", clicks, *FAST, "--output", every])[0] == 0
    calls_every, unet_calls[0] = unet_calls[0], 0
    third = tmp_path / "third.mp4"
    status, _, err = run_tool("audio2video", ["--path", clicks, *FAST, "--cadence", "3", "--cadence_blend", blend,
                                              "--output", third, "--save_frames"])
    assert status == 0, err
    a, b = probe_video(every), probe_video(third)
    assert a["frames"] == b["frames"] == 24 and a["fps"] == b["fps"]
    assert abs(a["audio_duration"] - b["audio_duration"]) < 1e-3
    # 24 frames: 0, 3, ..., 21 and the last (23) are diffused; the first is txt2img (4 steps),
    # the others img2img (2 steps); PLMS evaluates the UNet once more on its first step.
    assert calls_every == (4 + 1) + 23 * (2 + 1)
    assert unet_calls[0] == (4 + 1) + 8 * (2 + 1)
    frames = [np.asarray(__import__("PIL.Image").Image.open(p)).astype(int)
              for p in sorted(tmp_path.glob("third-frames/frame-*.png"))]
    for between, (left, right) in ((1, (0, 3)), (2, (0, 3)), (22, (21, 23))):
        assert np.abs(frames[between] - frames[left]).mean() > 0.1
        assert np.abs(frames[between] - frames[right]).mean() > 0.1


@pytest.mark.slow
def test_color_coherence_lowers_the_drift(run_tool, clicks, tmp_path):
    from sounddiffusion.video.video_stats import video_stats

    long_render = [*FAST, "--strength", "0.7", "--fps", "16"]
    drift = {}
    for mode in ("none", "lab"):
        output = tmp_path / f"{mode}.mp4"
        status, _, err = run_tool("audio2video", ["--path", clicks, *long_render, "--color_coherence", mode,
                                                  "--output", output])
        assert status == 0, err
        drift[mode] = float(np.mean(video_stats(output).drift))
    assert drift["lab"] < drift["none"], drift


@pytest.mark.slow
def test_every_cure_resumes_to_the_same_frames(run_tool, clicks, tmp_path, monkeypatch):
    args = ["--path", clicks, *FAST, "--cadence", "2 + 2*(1 - onset)", "--color_coherence", "hsv",
            "--color_coherence_every", "2", "--latent_noise", "0.2*beat", "--contrast", "0.97"]
    assert run_tool("audio2video", [*args, "--output", tmp_path / "whole.mp4"])[0] == 0
    real = loop.diffuse
    calls = [0]

    def stop_on_the_sixth(*a, **k):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "diffuse", stop_on_the_sixth)
    assert run_tool("audio2video", [*args, "--output", tmp_path / "parts.mp4"])[0] == 130
    monkeypatch.setattr(loop, "diffuse", real)
    status, _, err = run_tool("audio2video", [*args, "--output", tmp_path / "parts.mp4", "--resume"])
    assert status == 0, err
    assert np.array_equal(decoded_frames(tmp_path / "whole.mp4"), decoded_frames(tmp_path / "parts.mp4"))
