"""The --demo model listens: its autoencoder reconstructs pictures, different recordings give
pictures far apart next to what two seeds of one recording give, and text and the feature
change the picture. The figures quoted in README come from scripts/demo_figure.py."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ldm.modules.diffusionmodules.demo_denoiser import course_descriptors, prior_mean
from sounddiffusion.audio import load_audio
from sounddiffusion.image_jobs import sample_images, sound_conditioning
from sounddiffusion.loading import load_engine
from sounddiffusion.settings import ModelSettings, SoundImageSettings

RECORDINGS = ("Beethoven_chord1.wav", "JK_Organ2_120-F.wav", "Toms_diner.wav", "synth_chords_short.wav")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # bundled with scikit-image


@pytest.fixture(scope="module")
def engine():
    return load_engine(ModelSettings(demo=True, device="cpu"))


def picture(engine, samples, seed: int, **settings) -> np.ndarray:
    """One 128x128 audio2img picture (10 DDIM steps, guidance 7.5) as float (H, W, 3) in 0..255."""
    settings = SoundImageSettings(H=128, W=128, ddim_steps=10, **settings)
    cond = sound_conditioning(engine, samples, settings)
    return sample_images(engine, cond[None], [seed], settings)[0].astype(np.float64)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_autoencoder_reconstructs_photographs(engine):
    import skimage.data
    from skimage.transform import resize

    errors = {}
    for name in PHOTOS:
        photo = resize(getattr(skimage.data, name)(), (256, 256), anti_aliasing=True)  # floats in 0..1
        restored = engine.decode(engine.encode_image((photo * 255).round().astype(np.uint8)[None]))[0]
        errors[name] = mad(restored.astype(np.float64), photo * 255)
    # Measured: astronaut 16.1, coffee 10.4, chelsea 8.2, rocket 5.6 (mean 10.1) of 255.
    assert max(errors.values()) < 18 and np.mean(list(errors.values())) < 12, errors


def test_autoencoder_keeps_flat_colours(engine):
    flat = np.zeros((1, 64, 96, 3), dtype=np.uint8) + np.array([200, 40, 90], dtype=np.uint8)
    restored = engine.decode(engine.encode_image(flat))
    assert np.abs(restored.astype(int) - flat).max() <= 1


def test_the_empty_prompt_asks_for_a_plain_field(engine):
    null = engine.model.model.diffusion_model.null_context
    assert torch.equal(prior_mean(null[None], null, 8, 12), torch.zeros(1, 4, 8, 12))
    text = engine.text_conditioning("a red apple")
    asked = prior_mean(text[None], null, 8, 12)
    assert asked.abs().max() > 0.01  # a prompt asks for something else


def test_descriptors_do_not_depend_on_the_columns_scale():
    rows = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(3))
    rescaled = rows * torch.linspace(0.1, 10, 64) + torch.linspace(-5, 5, 64)
    torch.testing.assert_close(course_descriptors(rows), course_descriptors(rescaled), atol=1e-4, rtol=1e-4)


def test_two_recordings_differ_far_more_than_two_seeds(engine, audio_dir):
    sounds = {name: load_audio(audio_dir / name) for name in RECORDINGS}
    pictures = {(name, seed): picture(engine, samples, seed) for name, samples in sounds.items() for seed in (1, 2)}
    seeds = [mad(pictures[name, 1], pictures[name, 2]) for name in RECORDINGS]
    recordings = [mad(pictures[a, 1], pictures[b, 1]) for a, b in itertools.combinations(RECORDINGS, 2)]
    assert min(recordings) > 2 * max(seeds), (recordings, seeds)


def test_text_and_feature_change_the_picture(engine, audio_dir):
    samples = load_audio(audio_dir / RECORDINGS[2])
    plain = picture(engine, samples, 1)
    seeds = mad(plain, picture(engine, samples, 2))
    with_text = picture(engine, samples, 1, textprompt="a red apple", textstrength=0.5)
    assert mad(plain, with_text) > seeds
    for feature in ("melspectrogram", "mfcc"):
        assert mad(plain, picture(engine, samples, 1, feature=feature)) > seeds, feature
