"""Every entry point meets a user's mistake with exit status 2 and one line on stderr that says what
is wrong and what to do: no traceback, nothing written, nothing executed from a checkpoint.

The entry points run in this process through ``cli.run`` (the ``run_tool`` fixture), as on the
command line; a few checks in real processes make sure no traceback leaks through the interpreter.
"""
from __future__ import annotations

import builtins
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import load_file

from cli_checks import DEMO, TINY, assert_one_line_error, snapshot, stderr_lines, write_sound
from malicious_pickles import PAYLOADS
from sounddiffusion.model import engine as engine_module, loading
from sounddiffusion.model.conditioning import NORMALIZE_MODES, condition
from sounddiffusion.settings import ModelSettings
from sounddiffusion.sound.features import FEATURES, featurize
from video_probe import probe_video

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def outdir(tmp_path):
    """An output folder holding an earlier result that must survive every failed run unchanged."""
    folder = tmp_path / "out"
    (folder / "tone").mkdir(parents=True)
    (folder / "tone" / "fft-00000.png").write_bytes(b"an earlier image")
    (folder / "tone.mp4").write_bytes(b"an earlier video")
    return folder


def command(tool, sound, image, outdir, *extra):
    """A command line for ``tool`` that would work, plus ``extra``."""
    inputs = {"audio2img": ["--prompt", sound], "audio2video": ["--path", sound, "--fps", 4],
              "txt2img": [], "img2img": ["--init-img", image]}[tool]
    return [*inputs, "--outdir", outdir, *extra]


def assert_refused(run_tool, tool, argv, outdir, *words):
    """The run fails with one clear line holding ``words`` and leaves ``outdir`` as it was."""
    before = snapshot(outdir)
    status, _, err = run_tool(tool, argv)
    line = assert_one_line_error(status, err, tool, *words)
    assert snapshot(outdir) == before
    return line


# ------------------------------------------------------------------------------------------ sounds

def _missing(folder):
    return folder / "no such sound.wav"


def _folder(folder):
    (folder / "a folder.wav").mkdir()
    return folder / "a folder.wav"


def _text(folder):
    (folder / "notes.wav").write_text("these are not samples")
    return folder / "notes.wav"


def _zero_bytes(folder):
    (folder / "empty.wav").write_bytes(b"")
    return folder / "empty.wav"


def _no_samples(folder):
    sf.write(folder / "header only.wav", np.zeros(0, np.float32), 44100)
    return folder / "header only.wav"


BAD_SOUNDS = {
    "missing": (_missing, ["does not exist", "check the path"]),
    "folder": (_folder, ["is a folder", "sound file"]),
    "not audio": (_text, ["not an audio file", "convert it"]),
    "zero bytes": (_zero_bytes, ["empty", "contains sound"]),
    "no samples": (_no_samples, ["no samples", "contains sound"]),
}


@pytest.mark.parametrize("tool", ["audio2img", "audio2video"])
@pytest.mark.parametrize("case", list(BAD_SOUNDS))
def test_bad_sound_file(run_tool, tmp_path, image, outdir, tool, case):
    make, words = BAD_SOUNDS[case]
    path = make(tmp_path)
    assert_refused(run_tool, tool, command(tool, path, image, outdir, *DEMO), outdir, str(path), *words)


@pytest.mark.parametrize("tool", ["audio2img", "audio2video"])
def test_unreadable_sound_file(run_tool, tmp_path, image, outdir, monkeypatch, tool):
    path = write_sound(tmp_path / "locked.wav")
    path.chmod(0)
    # Root reads any file whatever its mode: refuse the opening as the OS does for other users.
    real_open = io.open

    def open_denied(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", open_denied)
    monkeypatch.setattr(builtins, "open", open_denied)
    assert_refused(run_tool, tool, command(tool, path, image, outdir, *DEMO), outdir,
                   str(path), "permission denied", "chmod")


# Odd sounds that must work.

class FiniteSpy:
    """Wraps the engine's sampling and decoding to check that every conditioning that goes in and
    every latent that comes out is finite; counts the calls."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in ("txt2img", "img2img"):
            monkeypatch.setattr(engine_module.Engine, name, self._checked(getattr(engine_module.Engine, name)))

    def _checked(self, method):
        def wrapper(engine, *args, **kwargs):
            cond = args[1] if method.__name__ == "img2img" else args[0]
            assert torch.isfinite(cond).all()
            latents = method(engine, *args, **kwargs)
            assert torch.isfinite(latents).all()
            self.calls += 1
            return latents
        return wrapper


@pytest.fixture(scope="module")
def demo_engine():
    return loading.load_engine(ModelSettings(demo=True))


@pytest.mark.parametrize("feature", FEATURES)
def test_silence_gives_finite_conditioning_in_every_mode(demo_engine, feature):
    """All zeros, as a whole sound and as one 1/24 s video frame: finite features and
    conditionings for every normalization, with and without a text prompt."""
    empty, text = demo_engine.text_conditioning(""), demo_engine.text_conditioning("a quiet room")
    for silence in (np.zeros(44100, np.float32), np.zeros(1837, np.float32)):
        features = featurize(silence, feature, dim=demo_engine.context_dim)
        assert np.isfinite(features).all()
        for mode in NORMALIZE_MODES:
            for text_cond in (None, text):
                cond = condition(features, mode=mode, text_cond=text_cond, empty_cond=empty, textstrength=0.5)
                assert torch.isfinite(cond).all(), (feature, mode, text_cond is None)


@pytest.mark.parametrize("tool", ["audio2img", "audio2video"])
@pytest.mark.parametrize("kind", ["silent", "shorter than a frame", "a tone"])
def test_silent_or_very_short_sound_renders(run_tool, tmp_path, image, monkeypatch, tool, kind):
    """1 s of digital silence, or 200 samples (less than one 1/24 s frame): a picture, or a video
    with every frame and the sound, and finite numbers everywhere on the way; one warning line
    says that the pictures cannot follow such a sound (none for a second of a tone)."""
    if kind == "silent":
        sound, frames = write_sound(tmp_path / "quiet.wav", 1.0, kind="silence"), 24
    elif kind == "a tone":
        sound, frames = write_sound(tmp_path / "tone.wav", 1.0), 24
    else:
        sound, frames = tmp_path / "blip.wav", 1
        sf.write(sound, 0.5 * np.sin(np.arange(200) / 3), 44100)
    spy = FiniteSpy(monkeypatch)
    outdir = tmp_path / "out"
    argv = command(tool, sound, image, outdir, *DEMO, "--feature", "melspectrogram")
    if tool == "audio2video":
        argv[argv.index("--fps") + 1] = 24
        argv += ["--strength", "0.5"]  # 1 of the 2 steps: every frame samples
    status, _, err = run_tool(tool, argv)
    assert status == 0, err
    warnings = stderr_lines(err)
    if kind == "a tone":
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith(f"{sound} "), warnings
        assert ("is silent" if kind == "silent" else "lasts only 4.5 ms (200 samples)") in warnings[0]
    if tool == "audio2img":
        assert spy.calls == 1
        picture = np.asarray(Image.open(outdir / sound.stem / "melspectrogram-00000.png"))
        assert picture.shape == (64, 64, 3)
    else:
        assert spy.calls == frames
        info = probe_video(outdir / f"{sound.stem}.mp4")
        assert info["frames"] == frames and info["has_audio"]


# ------------------------------------------------------------------------------------------ numbers

NUMBERS = [
    ("audio2video", ["--fps", "0"], ["--fps 0", "above 0"]),
    ("audio2video", ["--fps", "-12"], ["--fps -12", "above 0"]),
    ("audio2video", ["--fps", "121"], ["--fps 121", "at most 120"]),
    ("audio2video", ["--fps", "nan"], ["--fps nan", "above 0"]),
    ("audio2video", ["--strength", "-0.1"], ["--strength -0.1", "[0, 1]"]),
    ("audio2video", ["--strength", "1.5"], ["--strength 1.5", "[0, 1]"]),
    ("img2img", ["--strength", "1.01"], ["--strength 1.01", "[0, 1]"]),
    ("img2img", ["--strength", "-1"], ["--strength -1", "[0, 1]"]),
    ("audio2video", ["--H", "100"], ["--H 100", "multiple of 64", "256", "512", "768"]),
    ("txt2img", ["--W", "500"], ["--W 500", "multiple of 64", "512"]),
    ("img2img", ["--W", "0"], ["--W 0", "multiple of 64"]),
    ("audio2img", ["--H", "-64"], ["--H -64", "multiple of 64"]),
    ("audio2video", ["--ddim_steps", "0"], ["--ddim_steps 0", "at least 1"]),
    ("txt2img", ["--ddim_steps", "-3"], ["--ddim_steps -3", "at least 1"]),
    ("txt2img", ["--n_samples", "0"], ["--n_samples 0", "at least 1"]),
    ("audio2img", ["--n_samples", "-1"], ["--n_samples -1", "at least 1"]),
    ("img2img", ["--n_iter", "0"], ["--n_iter 0", "at least 1"]),
    ("audio2img", ["--batch_size", "0"], ["--batch_size 0", "at least 1"]),
    ("txt2img", ["--scale", "-1"], ["--scale -1", "negative"]),
    ("audio2video", ["--scale", "-0.5"], ["--scale -0.5", "negative"]),
    # argparse's own mistakes are one line too, not the usage block.
    ("audio2video", ["--fps", "fast"], ["--fps", "invalid float value", "--help"]),
    ("txt2img", ["--H", "6.5"], ["--H", "invalid int value", "--help"]),
    ("audio2img", ["--bogus"], ["unrecognized arguments: --bogus", "--help"]),
    ("txt2img", ["--device", "tpu"], ["--device", "invalid choice", "--help"]),
    ("txt2img", ["--precision", "fp16", "--device", "cpu"], ["--precision fp16", "CUDA"]),
]


@pytest.mark.parametrize("tool,extra,words", NUMBERS, ids=[" ".join([t, *e]) for t, e, _ in NUMBERS])
def test_bad_number(run_tool, sound, image, outdir, tool, extra, words):
    assert_refused(run_tool, tool, command(tool, sound, image, outdir, *DEMO, *extra), outdir, *words)


def test_missing_required_argument(run_tool, outdir):
    assert_refused(run_tool, "audio2video", ["--outdir", outdir, *DEMO], outdir, "required", "--path")


# ------------------------------------------------------------------------------------------ model

@pytest.fixture(scope="module")
def tiny_state():
    return load_file(REPO / "tests" / "data" / "tiny-v1" / "model.safetensors")


def _tiny_args(ckpt, config="tests/data/tiny-v1/config.yaml"):
    args = list(TINY)
    args[args.index("--ckpt") + 1] = str(ckpt)
    args[args.index("--config") + 1] = str(config)
    return args


@pytest.mark.parametrize("tool", ["audio2img", "audio2video", "txt2img", "img2img"])
def test_no_checkpoint_says_where_how_and_demo(run_tool, tmp_path, sound, image, outdir, monkeypatch, tool):
    monkeypatch.setattr(loading, "CHECKPOINT_DIR", tmp_path / "models" / "ldm" / "stable-diffusion-v1")
    monkeypatch.setattr(loading, "V2_CHECKPOINT_DIR", tmp_path / "models" / "ldm" / "stable-diffusion-v2")
    line = assert_refused(run_tool, tool, command(tool, sound, image, outdir, "--H", "64", "--W", "64"),
                          outdir, "no checkpoint in", "models/ldm/stable-diffusion-v1", "model.ckpt",
                          "model.safetensors", "download", "sd-v1-4.ckpt", "--demo")
    assert "Getting the weights" in line


def test_checkpoint_path_that_does_not_exist(run_tool, tmp_path, sound, image, outdir):
    missing = tmp_path / "sd-v1-4.ckpt"
    assert_refused(run_tool, "txt2img", command("txt2img", sound, image, outdir, *_tiny_args(missing)),
                   outdir, str(missing), "does not exist", "download", "--ckpt", "--demo")


def _truncated_safetensors(tmp_path, tiny_state):
    data = (REPO / "tests" / "data" / "tiny-v1" / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.safetensors"


def _truncated_ckpt(tmp_path, tiny_state):
    torch.save({"state_dict": tiny_state}, tmp_path / "whole.ckpt")
    data = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) * 2 // 3])
    return tmp_path / "cut.ckpt"


def _random_bytes(tmp_path, tiny_state):
    (tmp_path / "noise.ckpt").write_bytes(np.random.default_rng(1).bytes(100_000))
    return tmp_path / "noise.ckpt"


def _html_page(tmp_path, tiny_state):
    # What a download link that needs a login gives you.
    (tmp_path / "model.safetensors").write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    return tmp_path / "model.safetensors"


BROKEN_CHECKPOINTS = {
    "truncated safetensors": (_truncated_safetensors, ["truncated", "download it again"]),
    "truncated ckpt": (_truncated_ckpt, ["truncated or corrupt", "download it again"]),
    "random bytes": (_random_bytes, ["neither a torch checkpoint nor a safetensors file"]),
    "html page": (_html_page, ["neither a torch checkpoint nor a safetensors file"]),
}


@pytest.mark.parametrize("case", list(BROKEN_CHECKPOINTS))
def test_broken_checkpoint(run_tool, tmp_path, tiny_state, sound, image, outdir, case):
    make, words = BROKEN_CHECKPOINTS[case]
    path = make(tmp_path, tiny_state)
    assert_refused(run_tool, "txt2img", command("txt2img", sound, image, outdir, *_tiny_args(path)),
                   outdir, str(path), *words)


def test_checkpoint_of_another_architecture(run_tool, sound, image, outdir):
    """The tiny model's weights with the demo model's config: names both files and the counts."""
    argv = command("audio2video", sound, image, outdir,
                   *_tiny_args("tests/data/tiny-v1/model.safetensors", "configs/stable-diffusion/v1-demo.yaml"))
    assert_refused(run_tool, "audio2video", argv, outdir, "tests/data/tiny-v1/model.safetensors",
                   "does not fit configs/stable-diffusion/v1-demo.yaml", "of another shape",
                   "pass the config made for this checkpoint with --config")


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
@pytest.mark.parametrize("layout", ["zip", "legacy pickle"])
def test_malicious_pickle_is_refused_and_nothing_runs(run_tool, tmp_path, tiny_state, sound, image, outdir,
                                                      payload, layout):
    """A .ckpt that runs a command when unpickled, its payload beside real weights: refused, and
    the command never runs (no marker file), for both torch layouts."""
    marker = tmp_path / "pwned"
    content = {"state_dict": tiny_state, "callbacks": payload(marker)}
    path = tmp_path / "model.ckpt"
    torch.save(content, path, _use_new_zipfile_serialization=layout == "zip")
    for tool in ("txt2img", "audio2img"):
        assert_refused(run_tool, tool, command(tool, sound, image, outdir, *_tiny_args(path)), outdir,
                       str(path), "unsafe", "can run arbitrary code", "refused", ".safetensors")
    assert not marker.exists()


def test_config_missing(run_tool, tmp_path, sound, image, outdir):
    missing = tmp_path / "v1-inference.yaml"
    argv = command("img2img", sound, image, outdir, *_tiny_args("tests/data/tiny-v1/model.safetensors", missing))
    assert_refused(run_tool, "img2img", argv, outdir, str(missing), "missing", "--config")


@pytest.mark.parametrize("text,words", [
    ("model:\n  target: [unclosed\n  params: {", ["not valid YAML", "line 2"]),
    ("model:\n\ttarget: x\n", ["not valid YAML"]),
    ("- just\n- a list\n", ["not a Stable Diffusion config"]),
    ("model:\n  params: {}\n", ["not a Stable Diffusion config"]),
])
def test_config_not_usable(run_tool, tmp_path, sound, image, outdir, text, words):
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    argv = command("audio2img", sound, image, outdir, *_tiny_args("tests/data/tiny-v1/model.safetensors", config))
    assert_refused(run_tool, "audio2img", argv, outdir, str(config), "v1-inference.yaml", *words)


# ------------------------------------------------------------------------------------------ other files

@pytest.mark.parametrize("tool", ["img2img", "audio2video"])
@pytest.mark.parametrize("case,words", [("missing", ["does not exist"]), ("text", ["not an image", "PNG"]),
                                        ("folder", ["is a folder", "PNG"]), ("cut", ["damaged or truncated"])])
def test_bad_init_image(run_tool, tmp_path, sound, image, outdir, tool, case, words):
    path = tmp_path / "init.png"
    if case == "text":
        path.write_text("not pixels")
    elif case == "folder":
        path.mkdir()
    elif case == "cut":
        data = image.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    argv = command(tool, sound, image, outdir, *DEMO)
    if tool == "audio2video":
        argv += ["--init-img", path]
    else:
        argv[argv.index("--init-img") + 1] = path
    assert_refused(run_tool, tool, argv, outdir, "init image", str(path), *words)


@pytest.mark.parametrize("lines,number,words", [
    (["0:00 a red dawn", "0:05 a blue noon", "half past three: tea"], 3, ["cannot read", "e.g."]),
    (["0:00 a red dawn", "0:10 late", "0:05 early"], 3, ["does not come after"]),
    (["0:00 a red dawn", "1:75 odd time"], 2, ["60 or more"]),
    (["0:00 a red dawn", "9" * 5000 + ":00:00 much later"], 2, ["later than 1000000 s", "5006 characters"]),
    (["0:00 a red dawn", "1" + "0" * 400 + " much later"], 2, ["later than 1000000 s"]),
])
def test_prompt_file_with_a_bad_line(run_tool, tmp_path, sound, image, outdir, lines, number, words):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(lines) + "\n")
    argv = command("audio2video", sound, image, outdir, *DEMO, "--prompt_file", prompts)
    assert_refused(run_tool, "audio2video", argv, outdir, f"{prompts}, line {number}", *words)


@pytest.mark.parametrize("tool,flag", [("audio2video", "--prompt_file"), ("txt2img", "--from-file"),
                                       ("audio2img", "--from-file")])
def test_text_file_with_a_line_that_is_not_utf8(run_tool, tmp_path, sound, image, outdir, tool, flag):
    listing = tmp_path / "list.txt"
    first = f"0:00 {sound}" if tool == "audio2video" else str(sound)
    listing.write_bytes(first.encode() + b"\n" + "0:01 caf\u00e9".encode("latin-1") + b"\n")
    argv = command(tool, sound, image, outdir, *DEMO, flag, listing)
    if tool == "audio2img":
        argv = argv[2:]  # --from-file replaces --prompt
    assert_refused(run_tool, tool, argv, outdir, f"{listing}, line 2", "UTF-8")


@pytest.mark.parametrize("tool", ["audio2img", "audio2video", "txt2img", "img2img"])
@pytest.mark.parametrize("below", [False, True])
def test_output_folder_cannot_be_created(run_tool, tmp_path, sound, image, tool, below):
    """A file is in the way of the output folder (or of a folder above it)."""
    in_the_way = tmp_path / "results"
    in_the_way.write_bytes(b"a file, not a folder")
    target = in_the_way / "today" if below else in_the_way
    status, _, err = run_tool(tool, command(tool, sound, image, target, *DEMO))
    assert_one_line_error(status, err, tool, str(target), "choose another folder")
    assert in_the_way.read_bytes() == b"a file, not a folder"


@pytest.mark.parametrize("tool", ["audio2img", "audio2video", "txt2img", "img2img"])
def test_output_folder_not_writable(run_tool, tmp_path, sound, image, outdir, monkeypatch, tool):
    """The folder exists but refuses new files (a read-only mount, another user's folder): every
    file creation in it fails with EACCES, as the OS does for anyone but root."""
    real_open = os.open

    def no_new_files(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and pathlib.Path(path).resolve().is_relative_to(outdir.resolve()):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_new_files)
    assert_refused(run_tool, tool, command(tool, sound, image, outdir, *DEMO), outdir,
                   str(outdir), "not writable", "choose another folder")


# ------------------------------------------------------------------------------------------ devices

@pytest.mark.parametrize("tool", ["audio2video", "txt2img"])
def test_cuda_requested_without_cuda(run_tool, sound, image, outdir, monkeypatch, tool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_refused(run_tool, tool, command(tool, sound, image, outdir, *DEMO, "--device", "cuda"), outdir,
                   "--device cuda", "no CUDA GPU", "--device cpu")


def test_mps_requested_without_mps(run_tool, sound, image, outdir, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert_refused(run_tool, "img2img", command("img2img", sound, image, outdir, *DEMO, "--device", "mps"),
                   outdir, "--device mps", "not available", "--device cpu")


# ------------------------------------------------------------------------------------------ real processes

@pytest.mark.slow
def test_no_traceback_reaches_a_real_terminal(tmp_path, sound, image):
    """The same mistakes in real processes (all at once): one line on stderr, status 2, and
    ``--debug`` shows the traceback instead. A mistake found while the model loads comes after
    the "loading ..." note, which goes to stdout: stderr still holds the one line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as conftest sets it
    data = (REPO / "tests" / "data" / "tiny-v1" / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    script = {"audio2img": "audio2img.py", "audio2video": "audio2video.py", "txt2img": "scripts/txt2img.py",
              "img2img": "scripts/img2img.py"}
    cases = [
        ("audio2video", ["--path", tmp_path / "missing.wav", "--demo"], "does not exist"),
        ("img2img", ["--init-img", sound, "--demo", "--fps", "3"], "unrecognized arguments"),
        ("txt2img", ["--H", "100", "--demo"], "multiple of 64"),
        ("audio2video", ["--path", sound, "--config", "tests/data/tiny-v1/config.yaml",
                         "--ckpt", tmp_path / "cut.safetensors", "--outdir", tmp_path / "loaded"], "truncated"),
    ]
    runs = [subprocess.Popen([sys.executable, script[tool], "--outdir", tmp_path / "out", *map(str, argv)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for tool, argv, _ in cases]
    debug = subprocess.Popen([sys.executable, "audio2video.py", "--path", tmp_path / "missing.wav", "--demo",
                              "--debug"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for (tool, _, words), process in zip(cases, runs):
        out, err = process.communicate(timeout=300)
        assert_one_line_error(process.returncode, err, tool, words)
        if words == "truncated":
            assert out.startswith("loading ") and out.strip().endswith("cut.safetensors"), out
        else:
            assert out == ""
    _, err = debug.communicate(timeout=300)
    assert debug.returncode != 0 and "Traceback" in err and "AudioError" in err
    assert not (tmp_path / "out").exists()
    assert [p for p in (tmp_path / "loaded").rglob("*") if p.is_file()] == []
