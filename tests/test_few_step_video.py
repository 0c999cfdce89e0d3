"""audio2video with a few-step sampler and TAESD on the demo model: a 4-step LCM video that
resumes to the frames of an uninterrupted render and whose schedule CSV holds every frame's
sampler steps; ``--vae taesd:PATH`` (random weights in madebyollin/taesd's file layout) decoding
the frames, recorded and checked by --resume; its mistakes as one line before sampling."""
import csv
import json
import re
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from cli_checks import assert_one_line_error, decoded_frames, stop_at_frame, write_sound
from conftest import DATA
from ldm.models.taesd import load_taesd, tiny_decoder, tiny_encoder
from sounddiffusion.video import loop

LCM = ["--demo", "--H", "64", "--W", "64", "--sampler", "lcm", "--ddim_steps", "4", "--scale", "1", "--seed", "5",
       "--fps", "4"]
STRENGTH = "0.3 + 0.4*onset"  # a schedule over an envelope: the sound is analysed and the CSV written


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return write_sound(tmp_path_factory.mktemp("song") / "song.wav", seconds=2.0, kind="noise")


def recorded_settings(video) -> dict:
    """The settings JSON a finished MP4 carries in its comment tag (ffmpeg's metadata dump; it
    escapes = ; # \\ and newlines with a backslash)."""
    dump = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(video), "-f", "ffmetadata", "-"],
                          capture_output=True, text=True, check=True).stdout
    line = next(line for line in dump.splitlines() if line.startswith("comment="))
    return json.loads(re.sub(r"\\(.)", r"\1", line.removeprefix("comment=")))


def random_taesd(folder, seed=0, encoder=True):
    """TAESD files as madebyollin/taesd publishes them (taesd_encoder.pth, taesd_decoder.pth: bare
    state dicts of the two Sequentials), filled with random weights ~ N(0, 1 / fan-in), biases ~ N(0, 0.1^2):
    decoded pictures then spread over [-1, 1] (most pixels unsaturated)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    halves = {"taesd_decoder.pth": tiny_decoder()}
    if encoder:
        halves["taesd_encoder.pth"] = tiny_encoder()
    for name, network in halves.items():
        state = {key: (torch.randn(t.shape, generator=generator) / t[0].numel() ** 0.5 if t.ndim > 1
                       else 0.1 * torch.randn(t.shape, generator=generator))
                 for key, t in network.state_dict().items()}
        torch.save(state, folder / name)
    return folder


@pytest.mark.slow
def test_lcm_video_resumes_to_the_same_frames_and_reports_its_steps(run_tool, tmp_path, song, monkeypatch):
    args = ["--path", song, *LCM, "--strength", STRENGTH]
    status, _, err = run_tool("audio2video", [*args, "--output", tmp_path / "whole" / "song.mp4"])
    assert status == 0, err
    whole = decoded_frames(tmp_path / "whole" / "song.mp4")
    assert len(whole) == 8 and np.abs(np.diff(whole.astype(int), axis=0)).mean() > 0.5  # frames change

    real = loop.next_latent
    monkeypatch.setattr(loop, "next_latent", stop_at_frame(real, 5))
    output = tmp_path / "parts" / "song.mp4"
    assert run_tool("audio2video", [*args, "--output", output])[0] == 130
    monkeypatch.setattr(loop, "next_latent", real)
    status, _, err = run_tool("audio2video", [*args, "--output", output, "--resume"])
    assert status == 0, err
    assert np.array_equal(decoded_frames(output), whole)

    comment = recorded_settings(output)
    assert (comment["sampler"], comment["ddim_steps"], comment["scale"]) == ("lcm", 4, "1")

    with open(tmp_path / "parts" / "song.schedule.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    strengths = [float(row["strength"]) for row in rows]
    assert np.ptp(strengths) > 0.1  # the steps below follow a strength that moves
    for row, strength in zip(rows, strengths):
        assert float(row["strength"]) == pytest.approx(0.3 + 0.4 * float(row["onset"]))
        assert float(row["sampler_steps"]) == 4 and float(row["unet_evals"]) == 4  # guidance 1: batch of 1
        # frame 0 is txt2img from t = 999; then LCM's first step is the grid point 20 int(50 r) - 1
        first = 999 if row["frame"] == "0" else 20 * int(50 * strength) - 1
        assert float(row["first_timestep"]) == first


def test_resume_refuses_another_sampler(run_tool, tmp_path, song, monkeypatch):
    monkeypatch.setattr(loop, "next_latent", stop_at_frame(loop.next_latent, 2))
    args = ["--path", song, "--output", tmp_path / "song.mp4", "--strength", "0.5"]
    assert run_tool("audio2video", [*args, *LCM])[0] == 130
    status, _, err = run_tool("audio2video", [*args, *LCM[:6], "euler_a", *LCM[7:], "--resume"])
    assert_one_line_error(status, err, "audio2video", "sampler: 'lcm' then, 'euler_a' now")


@pytest.mark.slow
def test_taesd_decodes_the_frames(run_tool, tmp_path, song, monkeypatch):
    taesd = random_taesd(tmp_path / "taesd")
    args = ["--path", song, *LCM, "--strength", "0.5", "--save_frames"]
    for name, extra in (("kl", []), ("taesd", ["--vae", f"taesd:{taesd}"])):
        status, _, err = run_tool("audio2video", [*args, *extra, "--output", tmp_path / name / "song.mp4"])
        assert status == 0, err
    kl, tiny = (decoded_frames(tmp_path / name / "song.mp4").astype(int) for name in ("kl", "taesd"))
    assert kl.shape == tiny.shape == (8, 64, 64, 3)
    assert np.abs(kl - tiny).mean() > 10  # random TAESD weights draw other pictures than the block-mean VAE

    comment = recorded_settings(tmp_path / "taesd" / "song.mp4")
    assert comment["vae"] == f"taesd:{taesd}" and len(comment["vae_hash"]) == 16
    assert recorded_settings(tmp_path / "kl" / "song.mp4")["vae_hash"] is None

    # a resume with other TAESD weights (same file names) is refused
    monkeypatch.setattr(loop, "next_latent", stop_at_frame(loop.next_latent, 3))
    output = tmp_path / "parts" / "song.mp4"
    assert run_tool("audio2video", [*args, "--vae", f"taesd:{taesd}", "--output", output])[0] == 130
    random_taesd(taesd, seed=1)
    status, _, err = run_tool("audio2video", [*args, "--vae", f"taesd:{taesd}", "--output", output, "--resume"])
    assert_one_line_error(status, err, "audio2video", "vae_hash")


def test_engine_decode_is_taesds(tmp_path):
    from sounddiffusion.model.loading import load_engine
    from sounddiffusion.settings import ModelSettings

    folder = random_taesd(tmp_path / "taesd")
    engine = load_engine(ModelSettings(demo=True, device="cpu", vae=f"taesd:{folder}"))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pixels = load_taesd(folder).decode(latents)  # (B, 3, 64, 64) in about [-1, 1]
    assert (pixels.abs() < 1).float().mean() > 0.5  # mostly unclamped: the comparison tells decoders apart
    want = ((pixels.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    pictures = engine.decode(latents)
    # the engine pre-packs TAESD's weights for oneDNN on a CPU: the same sums in another order
    assert pictures.dtype == np.uint8 and np.abs(pictures - want).max() <= 1
    with torch.no_grad():
        want = load_taesd(folder).encode(torch.tensor(pictures).permute(0, 3, 1, 2) / 127.5 - 1)
    assert torch.allclose(engine.encode_image(pictures), want, atol=1e-4)


@pytest.mark.parametrize("vae,words", [
    ("taesd:{tmp}/nowhere", ["--vae taesd:", "does not exist", "madebyollin/taesd"]),
    ("tiny:{tmp}/taesd", ["--vae tiny:", "taesd:PATH"]),
    ("taesd:{data}/tiny-v1/model.safetensors", ["--vae taesd:{data}/tiny-v1/model.safetensors"]),
])
@pytest.mark.parametrize("tool", ["txt2img", "audio2video"])
def test_bad_vae_is_one_line_before_the_model_loads(run_tool, tmp_path, sound, monkeypatch, vae, words, tool):
    from sounddiffusion.model import loading

    monkeypatch.setattr(loading, "build_demo_model", lambda: pytest.fail("the model loaded"))
    random_taesd(tmp_path / "taesd")
    vae = vae.format(tmp=tmp_path, data=DATA)
    inputs = ["--path", sound, "--output", tmp_path / "out" / "o.mp4"] if tool == "audio2video" else [
        "--outdir", tmp_path / "out"]
    status, _, err = run_tool(tool, [*inputs, "--vae", vae, *LCM[:5]])
    assert_one_line_error(status, err, tool, *[w.format(tmp=tmp_path, data=DATA) for w in words])
    if tool == "audio2video":
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool,flags,why", [
    ("audio2video", ["--color_coherence", "lab"], "--color_coherence"),
    ("audio2video", ["--init-img", "IMAGE"], "--init-img"),
    ("audio2video", ["--pixel_roundtrip"], "--pixel_roundtrip"),
    ("audio2video", ["--zoom", "1.02"], "camera motion with --motion_space pixel"),  # the default space: decode, warp, encode
    ("img2img", [], "img2img's --init-img")])
def test_decoder_only_taesd_cannot_encode(run_tool, tmp_path, sound, image, monkeypatch, tool, flags, why):
    from sounddiffusion.model import loading

    decoder_only = random_taesd(tmp_path / "taesd", encoder=False) / "taesd_decoder.pth"
    monkeypatch.setattr(loop, "next_latent", lambda *a: pytest.fail("a frame was sampled"))
    monkeypatch.setattr(loading, "build_demo_model", lambda: pytest.fail("the model loaded"))  # refused before
    inputs = ["--path", sound] if tool == "audio2video" else ["--init-img", image]
    flags = [image if flag == "IMAGE" else flag for flag in flags]
    status, _, err = run_tool(tool, [*inputs, *flags, "--outdir", tmp_path / "out", "--vae", f"taesd:{decoder_only}",
                                     *LCM[:9]])
    assert_one_line_error(status, err, tool, "holds only TAESD's decoder", f"but {why}", "needs the encoder")
    if tool == "audio2video":
        assert not (tmp_path / "out").exists()
    # decoding alone is fine with it
    if tool == "audio2video" and "--color_coherence" in flags:
        monkeypatch.undo()
        status, _, err = run_tool(tool, [*inputs, "--outdir", tmp_path / "out", "--vae", f"taesd:{decoder_only}", *LCM])
        assert status == 0, err
