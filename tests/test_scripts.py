"""scripts/txt2img.py, img2img.py, png_parameters.py and video_stats.py's errors; the example shell scripts."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLE_SCRIPTS, REPO
from sounddiffusion.images import read_png_parameters

FAST = ["--demo", "--H", "64", "--W", "64", "--ddim_steps", "4", "--seed", "11"]


@pytest.mark.parametrize("sampler", [[], ["--plms"]])
def test_txt2img_writes_samples_and_grid(run_tool, tmp_path, sampler):
    status, _, err = run_tool("txt2img", ["--prompt", "a red apple", "--outdir", tmp_path, "--n_samples", "2",
                                          "--n_iter", "2", *sampler, *FAST])
    assert status == 0, err
    samples = sorted((tmp_path / "samples").glob("sample-*.png"))
    assert len(samples) == 4
    assert Image.open(tmp_path / "grid-0000.png").size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)
    assert [read_png_parameters(p)["seed"] for p in samples] == [11, 12, 13, 14]
    assert read_png_parameters(samples[0])["prompt"] == "a red apple"


def test_txt2img_prompts_from_file_and_fixed_code(run_tool, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    status, _, err = run_tool("txt2img", ["--from-file", prompts, "--outdir", tmp_path / "out", "--n_iter", "2",
                                          "--fixed_code", "--skip_grid", *FAST])
    assert status == 0, err
    samples = sorted((tmp_path / "out" / "samples").glob("*.png"))
    params = [read_png_parameters(p) for p in samples]
    assert [(p["prompt"], p["seed"]) for p in params] == [("a cat", 11), ("a cat", 11), ("a dog", 11), ("a dog", 11)]
    # --fixed_code: the same start noise in every round, so the same picture.
    assert np.array_equal(np.asarray(Image.open(samples[0])), np.asarray(Image.open(samples[1])))


def _picture(path, kind):
    """A 96x80 test picture: a grey ramp, or coloured stripes."""
    if kind == "ramp":
        rgb = np.stack([np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (80, 1))] * 3, axis=-1)
    else:
        rgb = np.zeros((80, 96, 3), np.uint8)
        rgb[:, ::16, 0] = 255
        rgb[::10, :, 2] = 200
    Image.fromarray(rgb).save(path)
    return path


@pytest.mark.parametrize("sampler", [[], ["--plms"]])
def test_img2img_uses_the_init_image(run_tool, tmp_path, sampler):
    from sounddiffusion.images import load_init_image
    from sounddiffusion.model.loading import load_engine
    from sounddiffusion.settings import ModelSettings

    def img2img(init, strength):
        outdir = tmp_path / f"{init.stem}-{strength}"
        status, _, err = run_tool("img2img", ["--init-img", init, "--prompt", "a sunset", "--strength", strength,
                                              "--outdir", outdir, "--skip_grid", *sampler, *FAST])
        assert status == 0, err
        return np.asarray(Image.open(outdir / "samples" / "sample-00000.png")).astype(int)

    ramp, stripes = _picture(tmp_path / "ramp.png", "ramp"), _picture(tmp_path / "stripes.png", "stripes")
    # Strength 0 keeps the init latent: the picture is decode(encode(init)), computed here apart.
    engine = load_engine(ModelSettings(demo=True, device="cpu"))
    fitted = load_init_image(ramp, 64, 64)
    expected = engine.decode(engine.encode_image(fitted[None]))[0].astype(int)
    assert np.abs(img2img(ramp, "0.0") - expected).max() <= 1
    # Another init image, same seed and prompt: another picture.
    assert np.abs(img2img(ramp, "0.5") - img2img(stripes, "0.5")).mean() > 2


@pytest.mark.slow
def test_help_of_every_entry_point():
    for script in ("audio2img.py", "audio2video.py", "scripts/txt2img.py", "scripts/img2img.py"):
        result = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert "--demo" in result.stdout and "--seed" in result.stdout


@pytest.mark.parametrize("script", EXAMPLE_SCRIPTS)
def test_example_shell_scripts_are_valid_and_use_bundled_files(script):
    path = REPO / "scripts" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    for referenced in re.findall(r"(examples/[\w./-]+)", text):
        assert (REPO / referenced).exists(), referenced
    entry = re.search(r"python (\S+\.py)", text).group(1)
    assert (REPO / entry).exists()


def test_txt2img_with_a_checkpoint_and_config(run_tool, tmp_path, tiny_dir):
    """The path real weights take: --config and --ckpt through ldm.util.load_model_from_config."""
    status, _, err = run_tool("txt2img", ["--config", tiny_dir / "config.yaml", "--ckpt", tiny_dir / "model.safetensors",
                                          "--prompt", "a red juicy apple floating in outer space, like a planet",
                                          "--plms", "--H", "64", "--W", "64", "--ddim_steps", "4",
                                          "--outdir", tmp_path])
    assert status == 0, err
    params = read_png_parameters(tmp_path / "samples" / "sample-00000.png")
    assert params["checkpoint"] == "model.safetensors" and len(params["checkpoint_hash"]) == 10


@pytest.mark.slow
def test_default_config_is_found_from_another_folder(tmp_path, tiny_dir):
    """The default config belongs to the installation, not to the working folder: run from
    elsewhere, a checkpoint is checked against it (the tiny one does not fit the full-size config)."""
    status = subprocess.run([sys.executable, str(REPO / "scripts" / "txt2img.py"), "--ckpt",
                             str(tiny_dir / "model.safetensors"), "--H", "64", "--W", "64", "--outdir", "out"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert status.returncode == 2, status.stderr
    assert "does not fit" in status.stderr and "is missing" not in status.stderr, status.stderr


def test_make_demo_lora_writes_a_file_every_layer_of_the_demo_takes(run_tool, tmp_path):
    from conftest import load_module

    lora = tmp_path / "demo-style.safetensors"
    assert load_module(REPO / "scripts" / "make_demo_lora.py", "make_demo_lora").main([str(lora)]) == 0
    pictures = {}
    for weight in ("0", "1"):
        status, _, err = run_tool("txt2img", ["--prompt", "a forest", "--outdir", tmp_path / weight,
                                              "--lora", f"{lora}:{weight}", *FAST])
        assert status == 0 and "match no layer" not in err, err  # every module of the file names a demo layer
        pictures[weight] = np.asarray(Image.open(tmp_path / weight / "samples" / "sample-00000.png")).astype(int)
    assert np.abs(pictures["1"] - pictures["0"]).mean() > 5


def test_png_parameters_works_from_any_folder(tmp_path):
    """The README's way to read a PNG's parameters, run from another folder without PYTHONPATH."""
    from sounddiffusion.images import save_png

    parameters = {"seed": 42, "feature": "fft", "prompt": "caf\u00e9 at dawn", "sound": "sounds/a.wav"}
    save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "made.png", parameters)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    env = {key: value for key, value in __import__("os").environ.items() if key != "PYTHONPATH"}
    script = str(REPO / "scripts" / "png_parameters.py")
    run = subprocess.run([sys.executable, script, "made.png"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == parameters
    run = subprocess.run([sys.executable, script, "missing.png"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("png_parameters.py: error:") and "missing.png" in run.stderr
    run = subprocess.run([sys.executable, script, "plain.png"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert (run.returncode, run.stdout, run.stderr) == (1, "", "png_parameters.py: plain.png carries no parameters\n")


def test_video_stats_of_a_sound_or_junk_says_so_in_a_line_of_its_own(run_script_tool, tmp_path):
    """No raw ffmpeg text reaches the user (it is logged at debug level)."""
    from cli_checks import write_sound

    sound = write_sound(tmp_path / "song.wav", seconds=0.5)
    junk = tmp_path / "video.mp4"
    junk.write_text("not a video")
    for path, words in ((sound, "holds sound but no pictures"), (junk, "is not a video ffmpeg can read")):
        status, out, err = run_script_tool("video_stats", [path])
        assert status == 2 and out == "", err
        assert err == f"video_stats.py: error: {path} {words}" + err.split(words, 1)[1] and err.count("\n") == 1, err
        assert "Stream" not in err and "@ 0x" not in err and len(err) < 200, err


@pytest.fixture
def run_script_tool(capsys):
    """Run scripts/NAME.py in this process through cli.run: (status, stdout, stderr)."""
    from conftest import load_module
    from sounddiffusion import cli

    def run(name, argv):
        module = load_module(REPO / "scripts" / f"{name}.py", f"script_{name}")
        capsys.readouterr()
        status = cli.run(module.main, module.build_parser(), [str(a) for a in argv])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run
