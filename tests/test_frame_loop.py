"""The frame loop (sounddiffusion.video.loop.sample_frames) on the demo model: the init image starts
the chain, --rms_bend adds exactly loudness x F, --pixel_roundtrip re-encodes every frame, --compile
gives the eager frames."""

import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from sounddiffusion.images import load_init_image
from sounddiffusion.model.configs import load_config
from sounddiffusion.model.loading import engine_for_model, load_engine
from sounddiffusion.settings import ModelSettings, VideoSettings
from sounddiffusion.sound.audio import SAMPLE_RATE, frame_bounds
from sounddiffusion.video import loop
from sounddiffusion.video.frame_chain import ChainState
from sounddiffusion.video.frame_plan import plan_frames

SIZE = 64


class Captured:
    """Stands in for the FrameWriter: keeps each submitted latent by frame index."""

    def __init__(self):
        self.latents: dict[int, torch.Tensor] = {}

    def submit(self, index, latent, chain):
        self.latents[index] = latent.clone()


@pytest.fixture(scope="module")
def engine():
    return load_engine(ModelSettings(demo=True, device="cpu"))


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    """2 s at 44.1 kHz: a quiet tone, then a loud one, so that loudness differs between frames."""
    t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    y = np.where(t < 1, 0.05, 0.6) * np.sin(2 * np.pi * 330 * t)
    path = tmp_path_factory.mktemp("song") / "song.wav"
    sf.write(path, y.astype(np.float32), SAMPLE_RATE, subtype="FLOAT")
    return path, y.astype(np.float32)


def settings(song_path, **changes) -> VideoSettings:
    base = dict(audio=str(song_path), fps=4, strength=0.5, ddim_steps=4, seed=3, H=SIZE, W=SIZE)
    return VideoSettings(**{**base, **changes})


def render(engine, video, frames, latent=None) -> Captured:
    captured = Captured()
    loop.sample_frames(engine, plan_frames(video), video, captured, start=0, stop=frames,
                            chain=ChainState(-1, latent))
    return captured


def test_init_image_starts_the_chain(engine, song, tmp_path):
    ramp = np.tile(np.linspace(0, 255, SIZE, dtype=np.uint8), (SIZE, 1))
    pictures = {"ramp": np.stack([ramp] * 3, axis=-1), "red": np.zeros((SIZE, SIZE, 3), np.uint8)}
    pictures["red"][..., 0] = 220
    first = {}
    for name, rgb in pictures.items():
        path = tmp_path / f"{name}.png"
        Image.fromarray(rgb).save(path)
        init_latent = engine.encode_image(load_init_image(path, SIZE, SIZE)[None])
        # Strength 0 keeps the previous latent: frame 0 is the init image's own latent.
        kept = render(engine, settings(song[0], strength=0.0), 1, init_latent).latents[0]
        torch.testing.assert_close(kept, init_latent)
        first[name] = engine.decode(render(engine, settings(song[0]), 1, init_latent).latents[0])[0].astype(int)
    assert np.abs(first["ramp"] - first["red"]).mean() > 2


def test_rms_bend_adds_loudness_times_f(engine, song):
    path, samples = song
    bend = 0.8
    bent = render(engine, settings(path, rms_bend=bend), 6).latents
    plain = render(engine, settings(path), 6).latents
    torch.testing.assert_close(bent[0], plain[0], rtol=0, atol=0)  # txt2img: nothing to bend
    video = settings(path, rms_bend=bend)
    plan = plan_frames(video)
    for index in (1, 5):  # a quiet frame and a loud one
        start, end = frame_bounds(index, 4)
        rms = float(np.sqrt(np.mean(np.square(samples[start:end], dtype=np.float64))))
        frame = plan.frame(index)
        cond = loop.frame_conditioning(engine, plan.audio_slice(index), frame, video)
        noise = engine.noise(engine.latent_shape(1, SIZE, SIZE), frame.noise_seed)
        expected = engine.img2img(bent[index - 1], cond[None], noise=noise, strength=0.5, sampler="plms", steps=4,
                                  scale=7.5, seed=frame.noise_seed + 1, bend_noised=lambda z: z + rms * bend)
        torch.testing.assert_close(bent[index], expected, rtol=0, atol=0)
    assert not torch.equal(bent[5], plain[5])


def test_pixel_roundtrip_reencodes_every_frame(engine, song, monkeypatch):
    raw = {}
    real_next_latent = loop.next_latent

    def recording(engine, previous, cond, frame, bends, settings):
        raw[frame.index] = real_next_latent(engine, previous, cond, frame, bends, settings)
        return raw[frame.index]

    monkeypatch.setattr(loop, "next_latent", recording)
    submitted = render(engine, settings(song[0], pixel_roundtrip=True), 3).latents
    for index in range(3):
        expected = engine.encode_image(engine.decode(raw[index]))
        torch.testing.assert_close(submitted[index], expected, rtol=0, atol=0)
        assert not torch.equal(submitted[index], raw[index])


@pytest.mark.slow
def test_compiled_unet_gives_the_eager_frames(song, tiny_dir):
    """On the tiny reference model: compiling the demo model's UNet takes minutes on a CPU."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("torch.compile on a CPU needs a C++ compiler, and this machine has none")
    from ldm.util import load_model_from_config

    def tiny_engine(compile):
        model = load_model_from_config(load_config(tiny_dir / "config.yaml"), str(tiny_dir / "model.safetensors"),
                                       device="cpu")
        return engine_for_model(model, device="cpu", compile=compile)

    video = settings(song[0], ddim_steps=2)
    eager, fast = render(tiny_engine(False), video, 2).latents, render(tiny_engine(True), video, 2).latents
    for index in range(2):
        torch.testing.assert_close(fast[index], eager[index], rtol=1e-3, atol=1e-3)
