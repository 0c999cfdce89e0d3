"""``--negative_prompt`` on every entry point and ``prompt --neg negative`` lines of audio2video's prompt files:
classifier-free guidance eps_n + s (eps_c - eps_n) pushes away from the negative prompt's prediction eps_n
instead of the empty prompt's; recorded in the metadata; a warning when the scale leaves it without effect."""
import numpy as np
import pytest
import torch
from PIL import Image

from cli_checks import DEMO, TINY, click_track, write_sound
from sounddiffusion.control.prompts import negative_weights_at, parse_prompt_file, split_negative
from sounddiffusion.images import read_png_parameters
from sounddiffusion.model.loading import load_engine
from sounddiffusion.settings import ModelSettings, VideoSettings
from sounddiffusion.video import loop


def picture(run_tool, tool, outdir, *argv) -> tuple[np.ndarray, dict]:
    """The first picture of a txt2img/img2img/audio2img run, as int array, and its parameters."""
    status, _, err = run_tool(tool, ["--outdir", outdir, *argv])
    assert status == 0, err
    path = sorted(p for p in outdir.rglob("*.png") if "grid" not in p.name)[0]
    return np.asarray(Image.open(path)).astype(int), read_png_parameters(path)


@pytest.mark.parametrize("tool", ["txt2img", "img2img", "audio2img"])
def test_a_negative_prompt_changes_the_picture_and_is_recorded(run_tool, tmp_path, image, tool):
    source = {"txt2img": ["--prompt", "a red house"], "img2img": ["--init-img", image, "--prompt", "a red house"],
              "audio2img": ["--audio", write_sound(tmp_path / "tone.wav", 0.5), "--textprompt", "a red house"]}[tool]
    plain, plain_parameters = picture(run_tool, tool, tmp_path / "plain", *TINY, *source)
    empty, _ = picture(run_tool, tool, tmp_path / "empty", *TINY, *source, "--negative_prompt", "")
    negative, parameters = picture(run_tool, tool, tmp_path / "neg", *TINY, *source, "--negative_prompt", "blurry, grey")
    assert np.array_equal(plain, empty)  # "" is the empty prompt's conditioning, as without the flag
    assert not np.array_equal(negative, plain)
    assert parameters["negative_prompt"] == "blurry, grey" and plain_parameters["negative_prompt"] == ""


def test_a_negative_prompt_equal_to_the_prompt_leaves_the_unguided_picture(run_tool, tmp_path):
    """eps_n + s (eps_c - eps_n) = eps_c when the negative is the prompt: the picture of --scale 1."""
    prompt = ["--prompt", "a lighthouse in fog"]
    unguided, _ = picture(run_tool, "txt2img", tmp_path / "s1", *TINY, *prompt, "--scale", 1)
    cancelled, _ = picture(run_tool, "txt2img", tmp_path / "same", *TINY, *prompt, "--scale", 7.5,
                           "--negative_prompt", "a lighthouse in fog")
    guided, _ = picture(run_tool, "txt2img", tmp_path / "guided", *TINY, *prompt, "--scale", 7.5)
    assert np.abs(cancelled - unguided).max() <= 2  # batch of two vs one UNet call: float rounding
    assert np.abs(guided - unguided).max() > 8


def test_on_the_demo_model_a_negative_prompt_takes_away_what_it_would_give(run_tool, tmp_path):
    """The demo's picture is the prior mean m(c) guided, m(n) + s (m(c) - m(n)) with m(empty) = 0 (grey):
    adding the negative prompt N moves the picture by -(s - 1) m(N), and N as the prompt gives s m(N),
    so the first change is -(s - 1) / s times the second, pixel for pixel (same seed, same texture)."""
    fast = [*DEMO[:-1], "10"]
    base, _ = picture(run_tool, "txt2img", tmp_path / "base", *fast, "--prompt", "a red apple")
    negative, _ = picture(run_tool, "txt2img", tmp_path / "neg", *fast, "--prompt", "a red apple",
                          "--negative_prompt", "a stormy sea")
    as_prompt, _ = picture(run_tool, "txt2img", tmp_path / "asp", *fast, "--prompt", "a stormy sea")
    empty, _ = picture(run_tool, "txt2img", tmp_path / "empty", *fast, "--prompt", "")
    taken, given = (negative - base).ravel().astype(float), (as_prompt - empty).ravel().astype(float)
    assert np.abs(given).max() > 10
    assert np.corrcoef(taken, given)[0, 1] < -0.99
    assert (taken @ given) / (given @ given) == pytest.approx(-6.5 / 7.5, abs=0.03)


@pytest.mark.parametrize("scale,words", [(1, "has no effect"), (0.5, "mixed into the picture")])
def test_at_a_scale_of_1_or_less_a_negative_prompt_gets_one_warning(run_tool, tmp_path, scale, words):
    status, _, err = run_tool("txt2img", ["--outdir", tmp_path / "a", *TINY, "--scale", scale,
                                          "--negative_prompt", "blurry"])
    warnings = [line for line in err.splitlines() if "--negative_prompt" in line]
    assert status == 0 and len(warnings) == 1 and words in warnings[0] and "above 1" in warnings[0], err
    status, _, err = run_tool("txt2img", ["--outdir", tmp_path / "b", *TINY, "--scale", scale])
    assert status == 0 and "negative" not in err
    status, _, err = run_tool("txt2img", ["--outdir", tmp_path / "c", *TINY, "--scale", 1.5, "--negative_prompt", "x"])
    assert status == 0 and "negative" not in err


# ----------------------------------------------------------------------------- audio2video

@pytest.mark.parametrize("line,expected", [
    ("a city at night --neg blurry, text", ("a city at night", "blurry, text")),
    ("a city at night--neg blurry", ("a city at night", "blurry")),
    ("a city at night", ("a city at night", None)),
    ("a forest --neg ", ("a forest", "")),
])
def test_deforum_neg_lines_split(line, expected):
    assert split_negative(line) == expected


def test_a_prompt_file_with_neg_lines_blends_negatives_as_it_blends_prompts(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("0:00 red --neg grey\n0:02 blue\n")
    assert parse_prompt_file(prompts) == [(0.0, "red --neg grey"), (2.0, "blue")]
    assert negative_weights_at([("red --neg grey", 0.25), ("blue", 0.75)], "dull") == (
        [("red", 0.25), ("blue", 0.75)], [("grey", 0.25), ("dull", 0.75)])
    sound = write_sound(tmp_path / "s.wav", seconds=2.0)
    settings = VideoSettings(audio=str(sound), fps=2, prompt_file=str(prompts), negative_prompt="dull",
                             textstrength=1.0, H=64, W=64)
    engine = load_engine(ModelSettings(demo=True, device="cpu"))
    plan = loop.plan_frames(settings)
    assert plan.negative_prompts() == ["dull", "grey"]
    text = engine.text_conditioning
    for index, weight in ((0, 0.0), (1, 0.25), (3, 0.75)):
        frame = plan.frame(index)
        cond = loop.frame_conditioning(engine, plan.audio_slice(index), frame, settings)
        torch.testing.assert_close(cond, (1 - weight) * text("red") + weight * text("blue"), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loop.frame_negative(engine, frame),
                                   (1 - weight) * text("grey") + weight * text("dull"), atol=1e-5, rtol=1e-5)
    plain = loop.plan_frames(VideoSettings(audio=str(sound), fps=2, textprompt="red", H=64, W=64))
    assert loop.frame_negative(engine, plain.frame(1)) is None and plain.negative_prompts() == []


def test_audio2video_negative_prompt_changes_frames_and_is_recorded(run_tool, tmp_path):
    sound = click_track(tmp_path / "clicks.wav", seconds=1.0)
    args = ["--path", sound, "--fps", 4, *DEMO, "--textprompt", "a forest", "--save_frames"]
    frames = {}
    for name, extra in (("plain", []), ("neg", ["--negative_prompt", "a stormy sea"])):
        status, _, err = run_tool("audio2video", [*args, "--output", tmp_path / f"{name}.mp4", *extra])
        assert status == 0, err
        frames[name] = [tmp_path / f"{name}-frames" / f"frame-{i:06d}.png" for i in range(4)]
    assert not np.array_equal(np.asarray(Image.open(frames["plain"][0])), np.asarray(Image.open(frames["neg"][0])))
    assert read_png_parameters(frames["neg"][3])["negative_prompt"] == "a stormy sea"
    assert read_png_parameters(frames["plain"][3])["negative_prompt"] == ""
