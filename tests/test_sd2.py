"""SD 2.x through the command lines: the config picked from a checkpoint's family, one-line
mismatch errors, and txt2img, audio2img and audio2video end to end on the tiny SD-2-shaped models
(tests/data/tiny-v2: eps, tiny-v2-v: v-prediction; 48-wide OpenCLIP text tower, so D = 48)."""

import logging
import shutil
from dataclasses import replace

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import save_file

from cli_checks import assert_one_line_error, stop_at_frame
from conftest import DATA, REPO
from ldm.checkpoint import checkpoint_family
from sounddiffusion.model import configs, loading
from sounddiffusion.model.configs import config_for_family
from sounddiffusion.model.loading import load_engine
from sounddiffusion.video import loop
from sounddiffusion.video.frame_chain import ChainState
from video_probe import probe_video
from sounddiffusion.settings import DEFAULT_CONFIG, ModelSettings, V2_CONFIG, V2_V_CONFIG, VideoSettings

TINY_V2, TINY_V2_V = DATA / "tiny-v2", DATA / "tiny-v2-v"
SIZE = ["--H", "64", "--W", "64"]
V_MODEL = ["--config", TINY_V2_V / "config.yaml", "--ckpt", TINY_V2_V / "model.safetensors", *SIZE,
           "--ddim_steps", "4", "--strength", "0.5", "--seed", "3"]


def _fake_checkpoint(path, text_key):
    """A few-byte safetensors file whose header has one text-tower key of a family."""
    save_file({text_key: torch.zeros(2, 2)}, path)
    return path


V2_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
V1_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"


@pytest.mark.parametrize("name,key,expected", [
    ("v2-1_768-ema-pruned.safetensors", V2_KEY, V2_V_CONFIG),
    ("v2-1_512-ema-pruned.safetensors", V2_KEY, V2_CONFIG),
    ("768-v-ema.safetensors", V2_KEY, V2_V_CONFIG),
    ("sd-v1-4.safetensors", V1_KEY, DEFAULT_CONFIG),
    ("sd-v1-768.safetensors", V1_KEY, DEFAULT_CONFIG),  # 768 in a v1 name means nothing
    ("vae.safetensors", "first_stage_model.encoder.conv_in.weight", DEFAULT_CONFIG),  # unknown: v1, as before
])
def test_default_config_follows_the_family_and_the_name(tmp_path, name, key, expected):
    path = _fake_checkpoint(tmp_path / name, key)
    assert config_for_family(checkpoint_family(path), path.name) == expected
    assert expected.is_file()


def test_config_for_family_table():
    assert config_for_family("sd-v2", "x-768.ckpt") == V2_V_CONFIG
    assert config_for_family("sd-v2", "model.ckpt") == V2_CONFIG
    assert config_for_family("sd-v1", "model.ckpt") == config_for_family(None, "model.ckpt") == DEFAULT_CONFIG


@pytest.fixture
def tiny_configs_as_defaults(monkeypatch):
    """The tiny models' configs stand in for the full-size SD 2.x ones the auto-pick chooses."""
    monkeypatch.setattr(configs, "V2_CONFIG", TINY_V2 / "config.yaml")
    monkeypatch.setattr(configs, "V2_V_CONFIG", TINY_V2_V / "config.yaml")


def test_txt2img_without_config_picks_v2_and_says_so(run_tool, tmp_path, caplog, tiny_configs_as_defaults):
    caplog.set_level(logging.INFO, logger="sounddiffusion")
    status, _, err = run_tool("txt2img", ["--prompt", "a bell", "--ckpt", TINY_V2 / "model.safetensors",
                                          "--outdir", tmp_path, *SIZE, "--ddim_steps", "2", "--n_samples", "1",
                                          "--n_iter", "1"])
    assert status == 0, err
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config ")]
    assert len(notes) == 1 and "tiny-v2/config.yaml" in notes[0] and "SD 2.x" in notes[0]
    assert "--config" in notes[0] and "tiny-v2-v/config.yaml" in notes[0]  # how to take the v config
    pictures = list(tmp_path.rglob("*.png"))
    assert pictures and np.asarray(Image.open(pictures[0])).std() > 1


def test_a_768_name_picks_the_v_config(run_tool, tmp_path, caplog, tiny_configs_as_defaults):
    caplog.set_level(logging.INFO, logger="sounddiffusion")
    renamed = tmp_path / "tiny-768-v.safetensors"
    shutil.copy(TINY_V2_V / "model.safetensors", renamed)
    status, _, err = run_tool("txt2img", ["--prompt", "a bell", "--ckpt", renamed, "--outdir", tmp_path / "out",
                                          *SIZE, "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1"])
    assert status == 0, err
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config ")]
    assert len(notes) == 1 and "tiny-v2-v/config.yaml" in notes[0] and "768" in notes[0]


def test_without_config_the_full_size_v2_config_is_named_in_the_error(run_tool, tmp_path, caplog):
    """Not patched: the tiny file gets the real v2-inference.yaml, which it does not fit."""
    caplog.set_level(logging.INFO, logger="sounddiffusion")
    status, _, err = run_tool("txt2img", ["--prompt", "a bell", "--ckpt", TINY_V2 / "model.safetensors",
                                          "--outdir", tmp_path, *SIZE, "--ddim_steps", "2"])
    line = assert_one_line_error(status, err, "txt2img", "v2-inference.yaml", "does not fit")
    assert any("config configs/stable-diffusion/v2-inference.yaml" in r.getMessage() for r in caplog.records), line


@pytest.mark.parametrize("ckpt,config,family,fitting", [
    (DATA / "tiny-v1" / "model.safetensors", TINY_V2 / "config.yaml", "SD v1", "v1-inference.yaml"),
    (TINY_V2 / "model.safetensors", DATA / "tiny-v1" / "config.yaml", "SD 2.x", "v2-inference.yaml"),
    ("x-768.safetensors", REPO / "configs" / "stable-diffusion" / "v1-inference.yaml", "SD 2.x",
     "v2-inference-v.yaml"),
])
def test_mismatch_is_one_short_line(run_tool, tmp_path, ckpt, config, family, fitting):
    if isinstance(ckpt, str):  # a (header-only) SD 2.x 768 file with the full-size v1 config
        ckpt = _fake_checkpoint(tmp_path / ckpt, V2_KEY)
    status, _, err = run_tool("txt2img", ["--prompt", "a bell", "--ckpt", ckpt, "--config", config,
                                          "--outdir", tmp_path / "out", *SIZE])
    line = assert_one_line_error(status, err, "txt2img", f"is an {family} checkpoint", f"--config configs/stable-diffusion/{fitting}")
    assert len(line) < 300, line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.png"))


def test_checkpoint_found_in_the_v2_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "CHECKPOINT_DIR", tmp_path / "v1")
    monkeypatch.setattr(loading, "V2_CHECKPOINT_DIR", tmp_path / "v2")
    (tmp_path / "v2").mkdir()
    only = _fake_checkpoint(tmp_path / "v2" / "v2-1_768-ema-pruned.safetensors", V2_KEY)
    (tmp_path / "v2" / "notes.txt").write_text("not a checkpoint")
    assert loading.resolve_checkpoint(None) == only
    _fake_checkpoint(tmp_path / "v2" / "v2-1_512-ema-pruned.safetensors", V2_KEY)
    with pytest.raises(loading.ModelError, match="holds 2 checkpoints .*--ckpt"):
        loading.resolve_checkpoint(None)
    (tmp_path / "v1").mkdir()
    v1 = _fake_checkpoint(tmp_path / "v1" / "model.safetensors", V1_KEY)
    assert loading.resolve_checkpoint(None) == v1  # the v1 folder first, as before


# ------------------------------------------------------------------------------------------ audio


def _tone_then_noise(path, sr=44100):
    t = np.arange(2 * sr) / sr
    y = 0.05 * np.sin(2 * np.pi * 220 * t)
    y[sr:] = 0.8 * np.random.default_rng(0).uniform(-1, 1, sr)
    sf.write(path, y.astype(np.float32), sr)
    return path


def _decoded_frames(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])


def test_audio2img_on_v2(run_tool, tmp_path, tiny_configs_as_defaults):
    sound = _tone_then_noise(tmp_path / "song.wav")
    status, _, err = run_tool("audio2img", ["--audio", sound, "--ckpt", TINY_V2 / "model.safetensors",
                                            "--outdir", tmp_path / "out", "--feature", "melspectrogram",
                                            *SIZE, "--ddim_steps", "2"])
    assert status == 0, err
    image = np.asarray(Image.open(tmp_path / "out" / "song" / "melspectrogram-00000.png"))
    assert image.shape == (64, 64, 3) and image.std() > 1


@pytest.fixture(scope="module")
def v_engine():
    return load_engine(ModelSettings(config=str(TINY_V2_V / "config.yaml"),
                                     ckpt=str(TINY_V2_V / "model.safetensors"), device="cpu"))


def test_conditioning_width_comes_from_the_model(v_engine, tmp_path):
    width = loading.load_config(TINY_V2_V / "config.yaml").model.params.unet_config.params.context_dim
    assert v_engine.context_dim == width == 48
    settings = VideoSettings(audio=str(_tone_then_noise(tmp_path / "s.wav")), fps=2, H=64, W=64)
    plan = loop.plan_frames(settings)
    for index in range(plan.n_frames):
        cond = loop.frame_conditioning(v_engine, plan.audio_slice(index), plan.frame(index), settings)
        assert tuple(cond.shape) == (77, 48) and torch.isfinite(cond).all()


def _first_img2img_frame(engine, settings, *, ddim):
    """Frame 0 by DDIM, then frame 1 (img2img from it) by DDIM or PLMS: (frame 0, frame 1) latents."""
    plan = loop.plan_frames(settings)
    start = loop.diffuse(engine, plan, replace(settings, sampler="ddim"), ChainState(), plan.frame(0), None)
    return start, loop.diffuse(engine, plan, replace(settings, sampler="ddim" if ddim else "plms"), ChainState(0, start), plan.frame(1),
                                    None)


def _update_cosine(a, b, start):
    return float(torch.nn.functional.cosine_similarity((a - start).flatten(), (b - start).flatten(), dim=0))


def test_plms_frames_follow_ddim_on_a_v_model(v_engine, tmp_path):
    """At strength 0.9, 10 steps, the PLMS frame is finite, bounded and moves the latent as DDIM's does
    (measured: cosine 0.996, max |z| 4.86 vs DDIM 4.51); PLMS taking v for eps (the reference's
    mistake) moves it elsewhere (cosine 0.65, max |z| 19.4), so the bounds can fail."""
    settings = VideoSettings(audio=str(_tone_then_noise(tmp_path / "s.wav")), fps=2, H=64, W=64,
                             ddim_steps=10, strength=0.9, seed=3)
    start, ddim = _first_img2img_frame(v_engine, settings, ddim=True)
    _, plms = _first_img2img_frame(v_engine, settings, ddim=False)
    assert torch.isfinite(plms).all()
    assert float(plms.abs().max()) <= 1.5 * float(ddim.abs().max())
    assert _update_cosine(plms, ddim, start) > 0.95
    v_engine.model.parameterization = "eps"
    try:
        _, wrong = _first_img2img_frame(v_engine, settings, ddim=False)
    finally:
        v_engine.model.parameterization = "v"
    assert _update_cosine(wrong, ddim, start) < 0.9 and float(wrong.abs().max()) > 2 * float(ddim.abs().max())


def test_rms_bend_changes_v2_frames(v_engine, tmp_path):
    sound = str(_tone_then_noise(tmp_path / "s.wav"))
    plain = VideoSettings(audio=sound, fps=2, H=64, W=64, ddim_steps=4, strength=0.5, seed=3)
    pictures = {}
    for bend in (0.0, 2.0):
        start, latent = _first_img2img_frame(v_engine, replace(plain, rms_bend=bend), ddim=False)
        assert torch.isfinite(latent).all()
        pictures[bend] = v_engine.decode(latent)[0].astype(int)
    assert np.abs(pictures[2.0] - pictures[0.0]).mean() > 1  # grey levels of 255


@pytest.mark.slow
def test_audio2video_on_v_model_end_to_end_and_resume(run_tool, tmp_path, monkeypatch):
    sound = _tone_then_noise(tmp_path / "song.wav")
    args = ["--path", sound, "--fps", 3, "--save_frames", *V_MODEL]
    whole = tmp_path / "whole" / "song.mp4"
    status, _, err = run_tool("audio2video", [*args, "--output", whole])
    assert status == 0, err
    info = probe_video(whole)
    assert info["frames"] == 6 and (info["width"], info["height"]) == (64, 64) and info["has_audio"]

    real_next_latent = loop.next_latent

    monkeypatch.setattr(loop, "next_latent", stop_at_frame(real_next_latent, 4))
    output = tmp_path / "parts" / "song.mp4"
    status, _, err = run_tool("audio2video", [*args, "--output", output])
    assert status == 130 and not output.exists()
    monkeypatch.setattr(loop, "next_latent", real_next_latent)
    status, _, err = run_tool("audio2video", [*args, "--output", output, "--resume"])
    assert status == 0, err
    assert np.array_equal(_decoded_frames(output), _decoded_frames(whole))
    saved = sorted((tmp_path / "parts" / "song-frames").glob("*.png"))
    whole_saved = sorted((tmp_path / "whole" / "song-frames").glob("*.png"))
    assert len(saved) == len(whole_saved) == 6
    for a, b in zip(saved, whole_saved):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
