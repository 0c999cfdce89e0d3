"""audio2video's schedules end to end on the demo model: numbers as before, expressions over the
envelopes, seed jumps, prompts snapped to beats, the schedule CSV and plot, --dry_run, bad
schedules, and a scheduled render that resumes to the same frames."""

import csv

import numpy as np
import pytest

from cli_checks import DEMO, assert_one_line_error, click_track, decoded_frames, stop_at_frame
from sounddiffusion.settings import ModelSettings, VideoSettings
from sounddiffusion.video import loop
from sounddiffusion.video.frame_plan import frame_seed, plan_frames

FAST = [*DEMO, "--fps", "8", "--seed", "5"]


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
    return click_track(tmp_path_factory.mktemp("clicks") / "clicks.wav")


@pytest.mark.slow
def test_a_number_in_code_and_on_the_command_line_give_the_same_bytes(run_tool, clicks, tmp_path):
    status, _, err = run_tool("audio2video", ["--path", clicks, "--strength", "0.5", "--output", tmp_path / "cli.mp4",
                                              *FAST])
    assert status == 0, err
    settings = VideoSettings(audio=str(clicks), strength=0.5, fps=8, seed=5, H=64, W=64, ddim_steps=2,
                             output=str(tmp_path / "code.mp4"))
    loop.run_audio2video(settings, ModelSettings(demo=True))
    assert (tmp_path / "cli.mp4").read_bytes() == (tmp_path / "code.mp4").read_bytes()


def test_strength_follows_its_expression_exactly(run_tool, clicks, tmp_path):
    status, _, err = run_tool("audio2video", ["--path", clicks, "--strength", "0.35 + 0.4*onset", "--dry_run",
                                              "--output", tmp_path / "clicks.mp4", *FAST])
    assert status == 0, err
    with open(tmp_path / "clicks.schedule.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24  # 3 s at 8 fps
    onset = np.array([float(r["onset"]) for r in rows])
    strength = np.array([float(r["strength"]) for r in rows])
    np.testing.assert_array_equal(strength, 0.35 + 0.4 * onset)
    assert onset.max() == 1.0 and strength.max() > 0.7  # the clicks show
    assert not (tmp_path / "clicks.mp4").exists()


def test_dry_run_plot_needs_no_checkpoint(run_tool, clicks, tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("--dry_run loaded the model")

    monkeypatch.setattr(loop, "load_engine", must_not_load)
    status, _, err = run_tool("audio2video", ["--path", clicks, "--strength", "0:(0.3), 16:(0.3 + 0.4*beat)",
                                                "--bend", "rotate_z=0.5*beat@step=0.5", "--dry_run", "--plot",
                                                "--outdir", tmp_path])
    assert status == 0, err
    header = (tmp_path / "clicks.schedule.csv").read_text().splitlines()[0].split(",")
    assert header[:10] == ["frame", "time", "rms", "onset", "beat", "low", "mid", "high", "centroid", "flux"]
    assert "strength" in header and "bend rotate_z=0.5*beat@step=0.5" in header
    assert (tmp_path / "clicks.schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keyframes_hold_and_interpolate(clicks):
    plan = plan_frames(VideoSettings(audio=str(clicks), fps=8, strength="0:(0.2), 10:(0.6), 20:(0.3 + 0*t)"))
    np.testing.assert_allclose(plan.values["strength"][[0, 5, 10, 15, 20, 23]], [0.2, 0.4, 0.6, 0.45, 0.3, 0.3])


def test_seed_jump_holds_the_noise_between_beats(clicks):
    plan = plan_frames(VideoSettings(audio=str(clicks), fps=8, seed=5, seed_jump="beat == 1"))
    beats = np.flatnonzero(plan.seed_jumps)
    assert len(beats) >= 4
    for first, second in zip(beats, beats[1:]):
        assert set(plan.noise_seeds[first:second]) == {frame_seed(5, int(first))}
    plain = plan_frames(VideoSettings(audio=str(clicks), fps=8, seed=5))
    assert list(plain.noise_seeds) == [frame_seed(5, i) for i in range(plain.n_frames)]


def test_seed_jumps_where_the_condition_is_above_one_half(clicks):
    # exactly 0.5 on frame 3 is no jump; just above on frame 5 and 1 on frame 9 are
    condition = "where(t == 3, 0.5, 0) + where(t == 5, 0.5000001, 0) + (t == 9)"
    plan = plan_frames(VideoSettings(audio=str(clicks), fps=8, seed=5, seed_jump=condition))
    assert np.flatnonzero(plan.seed_jumps).tolist() == [5, 9]


def test_prompt_times_snap_to_beats(clicks, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("0:00 red\n0:01.1 blue\n")
    plan = plan_frames(VideoSettings(audio=str(clicks), fps=8, prompt_file=str(prompts), snap_prompts="beat"))
    beat_times = plan.envelopes.beat_frames / 8
    assert plan.schedule[1][1] == "blue" and min(abs(beat_times - plan.schedule[1][0])) == 0
    assert plan.schedule[1][0] != 1.1


@pytest.mark.parametrize("text,words", [
    ("0.4 +* onset", ["--strength", "column 6", "expected"]),
    ("0.4 + loudness", ["--strength", "loudness"]),
    ("onset.__class__", ["--strength", "column"]),
    ("__import__('os').system('true')", ["--strength", "column"]),
    ("exec(1)", ["--strength", "exec"]),
    ("0:(0.4), 0:(0.5)", ["--strength", "column"]),
    # hostile texts that raised RecursionError or TypeError, or were read as numbers
    ("(" * 198 + "onset" + ")" * 198, ["--strength", "column 101", "nested too deeply", "at most 100"]),
    ("-" * 498 + "onset", ["--strength", "column 101", "nested too deeply"]),
    ("0:(0.4), 99999999999999999999:(0.5)", ["--strength", "column 10", "past the largest frame number"]),
    ("0.\u0665", ["--strength", "column 3", "only ASCII is read", "U+0665"]),
    ("0.4\u00a0+ onset", ["--strength", "column 4", "only ASCII is read", "U+00A0"]),
    ("1" * 40000 + "*onset", ["--strength", "column 1", "(40000 characters) is too large"]),
    ("0.1 + " + "onset + " * 700 + "+* 1", ["--strength", "column 5608", "expected a number"]),
])
def test_bad_schedule_is_one_line_before_the_model_loads(run_tool, clicks, tmp_path, monkeypatch, text, words):
    monkeypatch.setattr(loop, "load_engine", lambda *a: pytest.fail("the model was loaded"))
    status, _, err = run_tool("audio2video", ["--path", clicks, f"--strength={text}", "--outdir", tmp_path, *FAST])
    line = assert_one_line_error(status, err, "audio2video", *words)
    assert len(line) < 300, len(line)  # a long text is shown as an excerpt around the column


@pytest.mark.slow
def test_hostile_schedules_in_a_real_process(clicks, tmp_path):
    """Through the real interpreter stack: the deepest nesting allowed runs, one level more is
    one line and exit status 2 (it was a RecursionError traceback); a 499-term sum is read."""
    import subprocess
    import sys

    from conftest import REPO

    deepest = "(" * 99 + "0.3 + 0.1*onset" + ")" * 99
    command = [sys.executable, "audio2video.py", "--path", str(clicks), "--dry_run", "--output",
               str(tmp_path / "deep.mp4"), *map(str, FAST)]
    allowed = subprocess.run([*command, f"--strength={deepest}", f"--scale={'-' * 98 + '7'}",
                              f"--textstrength={' + '.join(['0.001'] * 499)}"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 0, allowed.stderr
    refused = subprocess.run([*command, f"--strength=({deepest})"], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert_one_line_error(refused.returncode, refused.stderr, "audio2video", "--strength", "column 101",
                          "nested too deeply")


def test_constant_out_of_range_is_refused_and_a_schedule_is_clipped(run_tool, clicks, tmp_path, caplog):
    status, _, err = run_tool("audio2video", ["--path", clicks, "--textstrength", "1.5", "--outdir", tmp_path, *FAST])
    assert_one_line_error(status, err, "audio2video", "--textstrength 1.5", "[0, 1]")
    status, _, err = run_tool("audio2video", ["--path", clicks, "--strength", "2*onset", "--dry_run",
                                              "--outdir", tmp_path, *FAST])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert status == 0 and warnings == ["--strength: 6 of 24 frames lie outside [0, 1] and were clipped to it"]


@pytest.mark.slow
def test_scheduled_render_resumes_to_the_same_frames(run_tool, clicks, tmp_path, monkeypatch):
    args = ["--path", clicks, "--strength", "0.3 + 0.5*onset", "--seed_jump", "beat == 1", "--scale", "5 + 4*beat",
            "--bend", "noise=0.5*onset", "--bend", "rotate_z=beat@step=0.5", *FAST]
    status, _, err = run_tool("audio2video", [*args, "--output", tmp_path / "whole.mp4"])
    assert status == 0, err
    real = loop.next_latent

    monkeypatch.setattr(loop, "next_latent", stop_at_frame(real, 9))
    assert run_tool("audio2video", [*args, "--output", tmp_path / "parts.mp4"])[0] == 130
    monkeypatch.setattr(loop, "next_latent", real)
    status, _, err = run_tool("audio2video", [*args, "--output", tmp_path / "parts.mp4", "--resume"])
    assert status == 0, err
    whole, parts = decoded_frames(tmp_path / "whole.mp4"), decoded_frames(tmp_path / "parts.mp4")
    assert np.array_equal(whole, parts)
    # and the schedule was used: the same render with constant numbers differs
    status, _, err = run_tool("audio2video", ["--path", clicks, *FAST, "--output", tmp_path / "plain.mp4"])
    assert not np.array_equal(decoded_frames(tmp_path / "plain.mp4"), whole)
