"""The image jobs' sampling call (sample_images) and sound lists (list_sounds).

A picture must not depend on the pictures sampled beside it: row b of a batch is the picture a call
with that row alone gives, for every sampler, the ones that add fresh noise at each step included
(LCM, Euler ancestral, DDIM with eta > 0), in txt2img and in img2img.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.models.diffusion.sampling import randn
from sounddiffusion.errors import PromptFileError
from sounddiffusion.jobs.image_jobs import list_sounds, read_prompts, sample_images
from sounddiffusion.model.engine import step_generator
from sounddiffusion.model.loading import load_engine
from sounddiffusion.settings import ImageSettings, ModelSettings, PromptImageSettings, SoundImageSettings


@pytest.fixture(scope="module")
def demo():
    return load_engine(ModelSettings(demo=True, device="cpu"))


def test_a_list_of_generators_draws_each_row_as_a_batch_of_one():
    rows = randn((3, 4, 2, 2), "cpu", torch.float32, [step_generator(seed) for seed in (5, 6, 7)])
    for row, seed in zip(rows, (5, 6, 7)):
        alone = torch.randn((1, 4, 2, 2), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(row[None], alone)
    assert len(step_generator([1, 2])) == 2
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn((3, 4), "cpu", torch.float32, step_generator([1, 2]))


# The samplers that add noise at each step, at the guidance they are used with.
NOISY = [("lcm", 0.0, 1.0), ("euler_a", 0.0, 0.0), ("ddim", 1.0, 7.5)]


@pytest.mark.parametrize("sampler, eta, scale", [*NOISY, ("ddim", 0.0, 7.5), ("plms", 0.0, 7.5)])
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_row_of_a_batch_is_the_picture_its_seed_gives_alone(demo, no_gradients, sampler, eta, scale, img2img):
    settings = ImageSettings(sampler=sampler, ddim_eta=eta, ddim_steps=4, scale=scale, H=64, W=64,
                             strength=0.75)
    g = torch.Generator().manual_seed(0)
    conds = torch.randn(3, 77, demo.context_dim, generator=g)
    init = torch.randn(1, 4, 8, 8, generator=g) if img2img else None
    seeds = [11, 12, 13]
    batch = sample_images(demo, conds, seeds, settings, init)
    for row, seed in enumerate(seeds):
        alone = sample_images(demo, conds[row:row + 1], [seed], settings, init)[0]
        assert np.array_equal(batch[row], alone), (sampler, row)
    # and the seeds matter: another seed gives another picture
    assert not np.array_equal(sample_images(demo, conds[:1], [99], settings, init)[0], batch[0])


@pytest.mark.parametrize("sampler, eta, scale", NOISY)
def test_the_step_noise_follows_the_row_seed(demo, no_gradients, sampler, eta, scale):
    """Same start noise, other step seeds: the picture changes (the step noise is drawn per row)."""
    cond = torch.randn(2, 77, demo.context_dim, generator=torch.Generator().manual_seed(1))[:1].expand(2, -1, -1)
    x_T = demo.noise(demo.latent_shape(1, 64, 64), 3).expand(2, -1, -1, -1)
    latents = demo.txt2img(cond, x_T=x_T, sampler=sampler, steps=3, scale=scale, eta=eta, seed=[4, 5])
    again = demo.txt2img(cond[:1], x_T=x_T[:1], sampler=sampler, steps=3, scale=scale, eta=eta, seed=5)
    # batched arithmetic may round differently in the last bits; another seed moves the latent by O(0.1)
    assert torch.allclose(latents[1:], again, atol=1e-5)
    assert (latents[0] - latents[1]).abs().max() > 1e-2


def test_a_sound_list_from_windows_with_indented_comments(tmp_path):
    """A byte-order mark is no part of the first path; '#' as a line's first non-blank character
    starts a comment; a '#' after a path belongs to the file's name."""
    listed = tmp_path / "sounds.txt"
    listed.write_bytes("\ufeffkick.wav\r\n  # the snares\r\n\t#hat.wav\r\n\r\n  take #2.wav  \r\nsub/a.wav\r\n"
                       .encode("utf-8"))
    assert list_sounds(SoundImageSettings(from_file=str(listed))) == [
        Path("kick.wav"), Path("take #2.wav"), Path("sub/a.wav")]
    listed.write_bytes("\ufeff# only comments\n   # here\n".encode("utf-8"))
    with pytest.raises(PromptFileError, match="holds no path"):
        list_sounds(SoundImageSettings(from_file=str(listed)))


def test_a_prompt_list_with_a_byte_order_mark_and_a_line_that_is_not_utf8(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffa red sky\nblue\n".encode("utf-8"))
    assert read_prompts(PromptImageSettings(from_file=str(prompts))) == ["a red sky", "blue"]
    prompts.write_bytes("\ufeffa\nb\n".encode("utf-8") + b"caf\xe9\n")
    with pytest.raises(PromptFileError, match="line 3: not UTF-8"):
        read_prompts(PromptImageSettings(from_file=str(prompts)))
