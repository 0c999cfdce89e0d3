"""Renders with ``--lora`` through the entry points: weight 0 is no LoRA, two files add, a scheduled weight
changes only the frames where it differs, a LoRA render resumes to the same frames and records each file
by content, batches and Ray workers apply it as a single run does.

LoRA files are made here from seeded random tensors under names written out by hand: for the tiny
SD-v1-shaped model of tests/data (cli_checks.TINY) and for the demo model's own (narrower) layers."""
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_checks import DEMO, TINY, click_track, decoded_frames, stop_at_frame, write_sound
from lora_makers import kohya, random_pair, save
from sounddiffusion.images import read_png_parameters
from sounddiffusion.video import loop

pytestmark = pytest.mark.slow  # renders and Ray jobs with LoRA files: python -m pytest -m slow (CI runs them)

REPO = Path(__file__).resolve().parents[1]
TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
MID_Q = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
TEXT_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def tiny_lora(path: Path, seed: int = 0) -> Path:
    """tiny-v1: cross-attention keys (32 <- 32), mid self-attention queries (64 <- 64), text queries (32 <- 32)."""
    return save(path, {**kohya(TO_K, *random_pair(32, 32, 4, seed=seed), alpha=2),
                       **kohya(MID_Q, *random_pair(64, 64, 4, seed=seed + 1)),
                       **kohya(TEXT_Q, *random_pair(32, 32, 4, seed=seed + 2))})


def demo_lora(path: Path) -> Path:
    """The demo model's layers: its first level's cross-attention keys (32 <- 64) and its 64-wide text encoder."""
    return save(path, {**kohya(TO_K, *random_pair(32, 64, 4)), **kohya(TEXT_Q, *random_pair(64, 64, 8, seed=1))})


def frames_of(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("frame-*.png"))]


def video(run_tool, sound, output, *extra) -> list[np.ndarray]:
    """audio2video at 4 fps with --save_frames; the exact frames (PNGs) in order."""
    status, _, err = run_tool("audio2video", ["--path", sound, "--fps", 4, "--output", output, "--save_frames",
                                              "--seed", 3, *extra])
    assert status == 0, err
    return frames_of(output.with_name(output.stem + "-frames"))


# ----------------------------------------------------------------------------- weights

def test_weight_zero_gives_the_frames_of_no_lora_on_the_demo_model(run_tool, tmp_path):
    sound = click_track(tmp_path / "clicks.wav", seconds=1.5)
    lora = demo_lora(tmp_path / "demo-style.safetensors")
    common = [*DEMO, "--textprompt", "a forest at dawn"]
    plain = video(run_tool, sound, tmp_path / "plain.mp4", *common)
    zero = video(run_tool, sound, tmp_path / "zero.mp4", *common, "--lora", f"{lora}:0")
    scheduled_zero = video(run_tool, sound, tmp_path / "zero-s.mp4", *common, "--lora", f"{lora}:0*onset")
    full = video(run_tool, sound, tmp_path / "full.mp4", *common, "--lora", f"{lora}:1")
    assert len(plain) == 6
    assert all(np.array_equal(a, b) for a, b in zip(plain, zero)) and len(zero) == len(plain)
    assert all(np.array_equal(a, b) for a, b in zip(plain, scheduled_zero))
    assert not np.array_equal(plain[0], full[0])  # the file does change the demo's pictures


def test_two_loras_add_as_one_file_holding_both(run_tool, tmp_path):
    """W + 0.7 up_a down_a + 0.7 up_b down_b = W + 0.7 [up_a up_b] [down_a; down_b]: one rank-8 file."""
    down_a, up_a = random_pair(32, 32, 4, seed=10)
    down_b, up_b = random_pair(32, 32, 4, seed=20)
    a = save(tmp_path / "a.safetensors", kohya(TO_K, down_a, up_a))
    b = save(tmp_path / "b.safetensors", kohya(TO_K, down_b, up_b))
    both = save(tmp_path / "both.safetensors", kohya(TO_K, torch.cat([down_a, down_b]), torch.cat([up_a, up_b], 1)))
    pictures = {}
    for name, loras in (("none", []), ("a", [a]), ("a+b", [a, b]), ("both", [both])):
        argv = ["--outdir", tmp_path / name, *TINY, "--prompt", "a red house"]
        for path in loras:
            argv += ["--lora", f"{path}:0.7"]
        status, _, err = run_tool("txt2img", argv)
        assert status == 0, err
        pictures[name] = np.asarray(Image.open(tmp_path / name / "samples" / "sample-00000.png")).astype(int)
    assert np.abs(pictures["a+b"] - pictures["both"]).max() <= 1  # float rounding of the sum's order
    assert np.abs(pictures["a+b"] - pictures["a"]).max() > 8 and np.abs(pictures["a"] - pictures["none"]).max() > 8
    recorded = read_png_parameters(tmp_path / "a+b" / "samples" / "sample-00000.png")["lora"]
    assert [(r["name"], r["weight"]) for r in recorded] == [("a", "0.7"), ("b", "0.7")]


def test_a_scheduled_weight_changes_only_the_frames_where_it_differs_from_a_constant(run_tool, tmp_path):
    sound = write_sound(tmp_path / "tone.wav", seconds=2.0)
    lora = tiny_lora(tmp_path / "style.safetensors")
    constant = video(run_tool, sound, tmp_path / "constant.mp4", *TINY, "--lora", f"{lora}:0.5")
    stepped = video(run_tool, sound, tmp_path / "stepped.mp4", *TINY, "--lora", f"{lora}:0.5 + 0.5*(t >= 4)")
    assert len(constant) == len(stepped) == 8
    assert all(np.array_equal(constant[i], stepped[i]) for i in range(4))  # merged once = set per frame, bit for bit
    assert not np.array_equal(constant[4], stepped[4])


def test_the_schedule_csv_has_the_lora_weight_per_frame(run_tool, tmp_path):
    sound = click_track(tmp_path / "clicks.wav", seconds=2.0)
    lora = tiny_lora(tmp_path / "style.safetensors")
    status, _, err = run_tool("audio2video", ["--path", sound, "--fps", 8, "--output", tmp_path / "v.mp4", "--dry_run",
                                              *TINY, "--lora", f"{lora}:0.2 + 0.8*onset", "--lora", f"{lora}:-0.5"])
    assert status == 0, err
    lines = [line.split(",") for line in (tmp_path / "v.schedule.csv").read_text().splitlines()]
    header, rows = lines[0], np.array(lines[1:], dtype=float)
    assert [name for name in header if name.startswith("lora")] == ["lora style"]  # the constant one has no column
    onset, weight = rows[:, header.index("onset")], rows[:, header.index("lora style")]
    np.testing.assert_allclose(weight, 0.2 + 0.8 * onset, rtol=1e-9)
    assert onset.min() < 0.5 < onset.max()


# ----------------------------------------------------------------------------- resume and metadata

def test_a_lora_render_resumes_to_the_same_frames_and_refuses_other_loras(run_tool, tmp_path, monkeypatch):
    sound = click_track(tmp_path / "clicks.wav", seconds=2.0)
    lora = tiny_lora(tmp_path / "style.safetensors")
    weight = "0.2 + 0.8*onset"
    args = ["--path", sound, "--fps", 4, "--seed", 3, "--save_frames", *TINY]
    status, _, err = run_tool("audio2video", [*args, "--output", tmp_path / "whole" / "v.mp4", "--lora", f"{lora}:{weight}"])
    assert status == 0, err

    output = tmp_path / "parts" / "v.mp4"
    real_next_latent = loop.next_latent
    monkeypatch.setattr(loop, "next_latent", stop_at_frame(real_next_latent, 5))
    assert run_tool("audio2video", [*args, "--output", output, "--lora", f"{lora}:{weight}"])[0] == 130
    monkeypatch.setattr(loop, "next_latent", real_next_latent)

    (tmp_path / "other").mkdir()
    other_file = tiny_lora(tmp_path / "other" / "style.safetensors", seed=5)  # same name, other content
    for other, word in ((f"{lora}:0.8", "'weight': '0.8'"), (f"{other_file}:{weight}", "sha256")):
        status, _, err = run_tool("audio2video", [*args, "--output", output, "--resume", "--lora", other])
        assert status == 2 and "cannot resume" in err and "lora" in err and word in err, err
    status, _, err = run_tool("audio2video", [*args, "--output", output, "--resume"])
    assert status == 2 and "lora" in err

    moved = tmp_path / "elsewhere" / "style.safetensors"  # the same file at another path: by content, the same
    moved.parent.mkdir()
    shutil.move(lora, moved)
    status, _, err = run_tool("audio2video", [*args, "--output", output, "--resume", "--lora", f"{moved}:{weight}"])
    assert status == 0, err
    assert np.array_equal(decoded_frames(output), decoded_frames(tmp_path / "whole" / "v.mp4"))
    recorded = read_png_parameters(tmp_path / "parts" / "v-frames" / "frame-000007.png")["lora"]
    digest = hashlib.sha256(moved.read_bytes()).hexdigest()
    assert recorded == [{"name": "style", "sha256": digest, "short_hash": recorded[0]["short_hash"], "weight": weight}]
    assert "ckpt" in read_png_parameters(tmp_path / "parts" / "v-frames" / "frame-000007.png")
    assert str(moved) not in json.dumps(read_png_parameters(tmp_path / "parts" / "v-frames" / "frame-000007.png"))


def test_a_batch_digest_follows_the_lora_weight(run_tool, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sounddiffusion")
    songs = tmp_path / "songs"
    songs.mkdir()
    write_sound(songs / "a.wav", seconds=0.5)
    lora = tiny_lora(tmp_path / "style.safetensors")
    argv = ["--input_folder", songs, "--outdir", tmp_path / "out", "--fps", 2, *TINY]
    for weight, made in (("0.5", "1 song made"), ("0.5", "0 songs made"), ("0.9 * rms", "1 song made")):
        caplog.clear()
        status, _, err = run_tool("audio2video", [*argv, "--lora", f"{lora}:{weight}"])
        assert status == 0 and made in caplog.text, (weight, err, caplog.text)


def test_audio2img_on_ray_workers_applies_the_lora_as_a_single_run(run_tool, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (requirements-cluster.txt)")
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    for i in range(2):
        write_sound(sounds / f"s{i}.wav", seconds=0.3 + 0.2 * i)
    lora = tiny_lora(tmp_path / "style.safetensors")
    argv = [*TINY, "--skip_grid", "--lora", f"{lora}:-0.8"]
    for i in range(2):
        status, _, err = run_tool("audio2img", ["--audio", sounds / f"s{i}.wav", "--outdir", tmp_path / "single", *argv])
        assert status == 0, err
    status, _, err = run_tool("audio2img", ["--audio", sounds / "s0.wav", "--outdir", tmp_path / "plain", *TINY])
    assert status == 0, err
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    try:
        status, _, err = run_tool("audio2img", ["--input_folder", sounds, "--outdir", tmp_path / "ray", *argv,
                                                "--ray", "--ray_workers", "1"])
    finally:
        ray.shutdown()
    assert status == 0, err
    for i in range(2):
        single = tmp_path / "single" / f"s{i}" / "fft-00000.png"
        on_ray = tmp_path / "ray" / f"s{i}" / "fft-00000.png"
        assert np.array_equal(np.asarray(Image.open(single)), np.asarray(Image.open(on_ray)))
        assert read_png_parameters(single) == read_png_parameters(on_ray)
    plain = np.asarray(Image.open(tmp_path / "plain" / "s0" / "fft-00000.png"))
    assert not np.array_equal(plain, np.asarray(Image.open(tmp_path / "ray" / "s0" / "fft-00000.png")))


# ----------------------------------------------------------------------------- the engine between frames

def test_a_text_encoder_weight_set_per_frame_reaches_the_prompts_conditioning(tmp_path):
    from sounddiffusion.model.loading import load_engine
    from sounddiffusion.model.lora_specs import parse_lora_specs
    from sounddiffusion.settings import ModelSettings

    lora = tiny_lora(tmp_path / "style.safetensors")
    model = ModelSettings(config=TINY[1], ckpt=TINY[3], device="cpu")
    scheduled = load_engine(model, loras=parse_lora_specs([f"{lora}:0.5*onset"], schedules=True))
    before = scheduled.text_conditioning("a red house").clone()
    scheduled.set_lora_weights([1.0])
    constant = load_engine(ModelSettings(config=TINY[1], ckpt=TINY[3], device="cpu", lora=(f"{lora}:1",)))
    assert torch.equal(scheduled.text_conditioning("a red house"), constant.text_conditioning("a red house"))
    assert not torch.equal(before, constant.text_conditioning("a red house"))
    scheduled.set_lora_weights([0.0])
    assert torch.equal(scheduled.text_conditioning("a red house"), before)


def test_the_demo_keeps_its_grey_empty_prompt_picture_under_a_text_encoder_lora(run_tool, tmp_path):
    """The demo measures pictures against the empty prompt's conditioning: a LoRA on its text encoder
    changes that conditioning, and the demo measures against the new one (else the empty prompt would
    no longer give the plain field)."""
    text_only = save(tmp_path / "text.safetensors", kohya(TEXT_Q, *random_pair(64, 64, 8, seed=1)))
    pictures = {}
    for name, extra in (("plain", []), ("lora", ["--lora", text_only])):
        status, _, err = run_tool("txt2img", ["--outdir", tmp_path / name, *DEMO[:-1], "10", "--prompt", "", *extra])
        assert status == 0, err
        pictures[name] = np.asarray(Image.open(tmp_path / name / "samples" / "sample-00000.png")).astype(int)
    # Measured against the old empty prompt: 8 levels off; against the new one only the random UNet's share moves.
    assert np.abs(pictures["lora"] - pictures["plain"]).max() <= 2
