"""audio2video.py end to end on the demo model: the MP4 ffmpeg reads, sound-driven frames, resume."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from cli_checks import decoded_frames, stop_at_frame
from sounddiffusion.video import loop
from video_probe import probe_video
from sounddiffusion.model.loading import load_engine
from sounddiffusion.settings import ModelSettings, VideoSettings

FAST = ["--demo", "--H", "64", "--W", "64", "--ddim_steps", "4", "--strength", "0.5", "--seed", "3"]


def _tone_then(path, second_half, sr=44100):
    """1 s of a quiet tone, then 1 s of ``second_half`` ("tone" or "noise"), at 44.1 kHz so that
    no resampling filter smears the change across the boundary."""
    t = np.arange(2 * sr) / sr
    y = 0.05 * np.sin(2 * np.pi * 220 * t)
    if second_half == "noise":
        y[sr:] = 0.8 * np.random.default_rng(0).uniform(-1, 1, sr)
    sf.write(path, y.astype(np.float32), sr)
    return path


def _tone_then_noise(path):
    return _tone_then(path, "noise")


@pytest.mark.parametrize("fps", [4, 7.5])
def test_video_has_right_frames_rate_and_sound(run_tool, tmp_path, audio_dir, fps):
    sound = audio_dir / "Beethoven_chord1.wav"  # 1.29 s
    status, _, err = run_tool("audio2video", ["--path", sound, "--fps", fps, "--outdir", tmp_path, *FAST])
    assert status == 0, err
    info = probe_video(tmp_path / "Beethoven_chord1.mp4")
    duration = sf.info(sound).duration
    assert info["frames"] == math.ceil(duration * fps)
    assert info["fps"] == pytest.approx(fps, rel=1e-3)
    assert info["has_audio"] and info["audio_codec"] == "aac"
    assert abs(info["audio_duration"] - duration) <= 1 / fps
    assert abs(info["duration"] - duration) <= 1 / fps
    assert (info["width"], info["height"], info["pix_fmt"]) == (64, 64, "yuv420p")
    assert not list(tmp_path.glob("*.render"))  # the resume state is gone once the video is complete


def test_frames_follow_the_sound(run_tool, tmp_path):
    """Two sounds that agree for 1 s and then differ: same frames while they agree, not after."""
    videos = {}
    for second_half in ("tone", "noise"):
        sound = _tone_then(tmp_path / f"{second_half}.wav", second_half)
        status, _, err = run_tool("audio2video", ["--path", sound, "--fps", 4, "--outdir", tmp_path,
                                                  "--feature", "melspectrogram", "--save_frames", *FAST])
        assert status == 0, err
        # The saved PNGs are the exact frames (the encoder's rate control looks ahead).
        pngs = sorted((tmp_path / f"{second_half}-frames").glob("frame-*.png"))
        videos[second_half] = [np.asarray(Image.open(p)).astype(int) for p in pngs]
    assert len(videos["tone"]) == len(videos["noise"]) == 8
    difference = [np.abs(a - b).mean() for a, b in zip(videos["tone"], videos["noise"])]
    assert max(difference[:4]) == 0  # frames 0-3 come from identical slices
    assert min(difference[4:]) > 0.5  # frames 4-7 from different ones


def test_short_sound_and_no_overwrite(run_tool, tmp_path):
    sound = tmp_path / "blip.wav"
    sf.write(sound, (0.5 * np.sin(np.arange(6615) / 10)).astype(np.float32), 22050)  # 0.3 s
    existing = tmp_path / "blip.mp4"
    existing.write_bytes(b"an older video")
    status, _, err = run_tool("audio2video", ["--path", sound, "--fps", 12, "--outdir", tmp_path, *FAST])
    assert status == 0, err
    assert existing.read_bytes() == b"an older video"
    info = probe_video(tmp_path / "blip-0001.mp4")
    assert info["frames"] == 4 and info["has_audio"]


def test_seed_reproduces_the_video(run_tool, tmp_path):
    sound = _tone_then_noise(tmp_path / "s.wav")
    for name in ("a.mp4", "b.mp4"):
        status, _, err = run_tool("audio2video", ["--path", sound, "--fps", 2, "--output", tmp_path / name, *FAST])
        assert status == 0, err
    assert np.array_equal(decoded_frames(tmp_path / "a.mp4"), decoded_frames(tmp_path / "b.mp4"))


@pytest.mark.slow
def test_interrupted_render_resumes_to_the_same_frames(run_tool, tmp_path, monkeypatch):
    sound = _tone_then_noise(tmp_path / "song.wav")
    args = ["--path", sound, "--fps", 4, "--save_frames", *FAST]
    status, _, err = run_tool("audio2video", [*args, "--output", tmp_path / "whole" / "song.mp4"])
    assert status == 0, err

    real_next_latent = loop.next_latent

    monkeypatch.setattr(loop, "next_latent", stop_at_frame(real_next_latent, 5))
    output = tmp_path / "parts" / "song.mp4"
    status, _, err = run_tool("audio2video", [*args, "--output", output])
    assert status == 130 and not output.exists()
    assert (tmp_path / "parts" / "song.mp4.render").is_dir()

    monkeypatch.setattr(loop, "next_latent", real_next_latent)
    status, _, err = run_tool("audio2video", [*args, "--output", output])
    assert status == 2 and "--resume" in err  # a fresh start must not clobber the unfinished render
    status, _, err = run_tool("audio2video", [*args, "--output", output, "--resume"])
    assert status == 0, err
    assert output.read_bytes() == (tmp_path / "whole" / "song.mp4").read_bytes()  # metadata and all
    saved = sorted(p.name for p in (tmp_path / "parts" / "song-frames").glob("*.png"))
    assert saved == [f"frame-{i:06d}.png" for i in range(8)]


def test_resume_with_other_settings_is_refused(run_tool, tmp_path, monkeypatch):
    sound = _tone_then_noise(tmp_path / "song.wav")
    monkeypatch.setattr(loop, "next_latent", stop_at_frame(loop.next_latent, 1))
    output = tmp_path / "song.mp4"
    assert run_tool("audio2video", ["--path", sound, "--fps", 4, "--output", output, *FAST])[0] == 130
    status, _, err = run_tool("audio2video", ["--path", sound, "--fps", 4, "--output", output, "--resume",
                                              *FAST[:-1], "4"])
    assert status == 2 and "seed" in err and "Traceback" not in err


def test_prompt_file_interpolates(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("0:00 red\n0:02: blue\n")
    sound = _tone_then_noise(tmp_path / "s.wav")
    settings = VideoSettings(audio=str(sound), fps=2, prompt_file=str(prompts), normalize="clip",
                             textstrength=1.0, H=64, W=64)
    engine = load_engine(ModelSettings(demo=True, device="cpu"))
    plan = loop.plan_frames(settings)
    red, blue = engine.text_conditioning("red"), engine.text_conditioning("blue")
    # textstrength 1 in clip mode: text only, so the conditioning is the blended prompt.
    for index, weight in ((0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75)):
        cond = loop.frame_conditioning(engine, plan.audio_slice(index), plan.frame(index), settings)
        torch.testing.assert_close(cond, (1 - weight) * red + weight * blue, atol=1e-5, rtol=1e-5)


def test_textpromptend_reaches_the_end_prompt(tmp_path):
    sound = _tone_then_noise(tmp_path / "s.wav")
    settings = VideoSettings(audio=str(sound), fps=2, textprompt="dawn", textpromptend="dusk",
                             textstrength=1.0, H=64, W=64)
    engine = load_engine(ModelSettings(demo=True, device="cpu"))
    plan = loop.plan_frames(settings)
    last_index = plan.n_frames - 1
    first = loop.frame_conditioning(engine, plan.audio_slice(0), plan.frame(0), settings)
    last = loop.frame_conditioning(engine, plan.audio_slice(last_index), plan.frame(last_index), settings)
    torch.testing.assert_close(first, engine.text_conditioning("dawn"))
    torch.testing.assert_close(last, engine.text_conditioning("dusk"))


def test_preview_is_playable(run_tool, tmp_path, monkeypatch):
    sound = _tone_then_noise(tmp_path / "song.wav")
    monkeypatch.setattr(loop, "next_latent",
                        stop_at_frame(loop.next_latent, 6))
    output = tmp_path / "song.mp4"
    status, _, _ = run_tool("audio2video", ["--path", sound, "--fps", 4, "--output", output,
                                            "--preview_every", "1", *FAST])
    assert status == 130
    info = probe_video(tmp_path / "song.preview.mp4")
    assert info["frames"] == 4 and info["has_audio"]


def _edit_checkpoint_extra(state, **changes):
    """Change the JSON extra of a render's checkpoint.npz, as a hand or a script could."""
    with np.load(state / "checkpoint.npz") as saved:
        entries = {key: saved[key] for key in saved.files}
    extra = json.loads(str(entries["__extra__"]))
    entries["__extra__"] = np.str_(json.dumps({**extra, **changes}))
    np.savez(state / "checkpoint.npz", allow_pickle=False, **entries)
    return extra


def test_resume_writes_frames_only_beside_the_video_whatever_the_state_says(run_tool, tmp_path, monkeypatch):
    """The --save_frames folder comes from the video's name: a state file edited to point
    elsewhere is refused in one line, and nothing is written there."""
    from cli_checks import assert_one_line_error

    sound = _tone_then_noise(tmp_path / "song.wav")
    (tmp_path / "song-frames").mkdir()  # taken: this render's frames go to song-frames-0001
    args = ["--path", sound, "--fps", 4, "--output", tmp_path / "song.mp4", "--save_frames", *FAST]
    real_next_latent = loop.next_latent
    monkeypatch.setattr(loop, "next_latent", stop_at_frame(real_next_latent, 3))
    assert run_tool("audio2video", args)[0] == 130
    monkeypatch.setattr(loop, "next_latent", real_next_latent)
    state = tmp_path / "song.mp4.render"
    assert _edit_checkpoint_extra(state)["frames_dir"] == "song-frames-0001"  # a name, not a path
    elsewhere = tmp_path / "elsewhere"
    for stored in (str(elsewhere / "song-frames-0001"), "../song-frames-0001", "song.mp4.render"):
        _edit_checkpoint_extra(state, frames_dir=stored)
        status, _, err = run_tool("audio2video", [*args, "--resume"])
        assert_one_line_error(status, err, "audio2video", "damaged", "frames folder", str(state))
        assert not elsewhere.exists() and not (tmp_path.parent / "song-frames-0001").exists()
    # A full path beside the video (as earlier versions stored it) is still followed.
    _edit_checkpoint_extra(state, frames_dir=str(tmp_path / "song-frames-0001"))
    status, _, err = run_tool("audio2video", [*args, "--resume"])
    assert status == 0, err
    assert sorted(p.name for p in (tmp_path / "song-frames-0001").iterdir()) == [f"frame-{i:06d}.png" for i in range(8)]
    assert not any((tmp_path / "song-frames").iterdir())


@pytest.mark.slow
def test_resumed_render_is_the_same_mp4_whatever_the_previews(run_tool, tmp_path, monkeypatch):
    """5 s at 4 fps: segments of 16 frames (4 s) whatever --preview_every. A render with a
    preview every second, stopped in its second segment and resumed without previews, gives the
    bytes of an uninterrupted render without previews: the same frames, segments and metadata."""
    sound = tmp_path / "song.wav"
    sf.write(sound, (0.3 * np.sin(np.arange(5 * 44100) / 9)).astype(np.float32), 44100)
    args = ["--path", sound, "--fps", 4, *FAST]
    whole = tmp_path / "whole.mp4"
    status, _, err = run_tool("audio2video", [*args, "--output", whole])
    assert status == 0, err
    real_next_latent = loop.next_latent
    monkeypatch.setattr(loop, "next_latent", stop_at_frame(real_next_latent, 18))
    output = tmp_path / "parts.mp4"
    status, _, _ = run_tool("audio2video", [*args, "--output", output, "--preview_every", "1"])
    assert status == 130
    assert probe_video(tmp_path / "parts.preview.mp4")["frames"] == 16
    segments = sorted(p.name for p in (tmp_path / "parts.mp4.render").glob("segment-*"))
    assert segments == ["segment-000000-000016.mp4"]
    monkeypatch.setattr(loop, "next_latent", real_next_latent)
    status, _, err = run_tool("audio2video", [*args, "--output", output, "--resume"])
    assert status == 0, err
    assert output.read_bytes() == whole.read_bytes()
    assert probe_video(output)["frames"] == 20
