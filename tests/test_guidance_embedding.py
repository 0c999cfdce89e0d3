"""LCM-distilled UNets (diffusers' ``time_cond_proj_dim``): the guidance embedding, the UNet with
its projection against diffusers' UNet2DConditionModel on the same weights, checkpoint loading
that detects the projection's key, and an LCM run with the embedding against diffusers'
LCMScheduler driving that UNet."""
import copy

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from diffusers_reference import (
    GUIDANCE_PROJECTION,
    SD_BETAS,
    TINY_V1,
    compvis_model,
    counting_calls,
    diffusers_unet,
    relative_error,
)
from ldm.checkpoint_keys import unet_params_of_keys
from ldm.errors import CheckpointError
from ldm.models.diffusion.lcm import LCMSampler
from ldm.modules.diffusionmodules.util import guidance_scale_embedding


pytestmark = pytest.mark.usefixtures("no_gradients")  # sampling runs without autograd

DIM = 256  # LCM Dreamshaper's time_cond_proj_dim
TOL = 1e-4
SHAPE = (1, 4, 8, 8)


def diffusers_embedding(w, dim=DIM):
    """diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding(w - 1), as its pipelines call it."""
    from diffusers import LatentConsistencyModelPipeline

    offset = torch.tensor(w - 1).repeat(1)
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, offset, embedding_dim=dim)


@pytest.fixture(scope="module")
def lcm_checkpoint(tmp_path_factory):
    """tiny-v1's weights plus a random guidance projection (model_channels 32 x 256), as a file
    converted from a diffusers LCM UNet names it; returns (path, its state dict)."""
    from safetensors.torch import load_file

    state_dict = load_file(TINY_V1 / "model.safetensors")
    state_dict[GUIDANCE_PROJECTION] = (0.1 * torch.randn(32, DIM, generator=torch.Generator().manual_seed(4))).half()
    path = tmp_path_factory.mktemp("lcm") / "tiny-lcm.safetensors"
    save_file(state_dict, path)
    return path, state_dict


@pytest.fixture(scope="module")
def lcm_model(lcm_checkpoint):
    return compvis_model(TINY_V1, ckpt=lcm_checkpoint[0])


@pytest.fixture(scope="module")
def lcm_unet(lcm_checkpoint):
    pytest.importorskip("diffusers", reason="the reference is diffusers: pip install -r requirements-dev.txt")
    return diffusers_unet(TINY_V1, lcm_checkpoint[1], time_cond_proj_dim=DIM)


@pytest.mark.parametrize("w", [1.0, 1.5, 8.5])
@pytest.mark.parametrize("dim", [DIM, 7])
def test_embedding_is_diffusers(w, dim):
    pytest.importorskip("diffusers")
    ours = guidance_scale_embedding(torch.tensor([w - 1.0]), dim)
    assert ours.shape == (1, dim)
    assert torch.allclose(ours, diffusers_embedding(w, dim), atol=1e-5)


def test_embedding_formula():
    # [sin(1000 (w - 1) f_k) | cos(...)], f_k = 10000^(-k / (dim/2 - 1)); w = 1 gives [0...0 | 1...1]
    half = 4
    offset = torch.tensor([0.0, 0.002])
    freqs = torch.tensor([10000.0 ** (-k / (half - 1)) for k in range(half)])
    want = torch.cat([torch.sin(2.0 * freqs), torch.cos(2.0 * freqs)])
    ours = guidance_scale_embedding(offset, 2 * half)
    assert torch.equal(ours[0], torch.cat([torch.zeros(half), torch.ones(half)]))
    assert torch.allclose(ours[1], want, atol=1e-6)


def test_loading_detects_the_projection(lcm_checkpoint, lcm_model):
    unet = lcm_model.model.diffusion_model
    assert lcm_model.guidance_embedding_dim == unet.time_cond_proj_dim == DIM
    assert torch.equal(unet.time_embedding["cond_proj"].weight, lcm_checkpoint[1][GUIDANCE_PROJECTION].float())
    assert unet_params_of_keys({GUIDANCE_PROJECTION: (320, 256)}) == {"time_cond_proj_dim": 256}
    assert unet_params_of_keys({"model.diffusion_model.time_embed.0.weight": (1280, 320)}) == {}


def test_loading_leaves_the_callers_config_alone(lcm_checkpoint):
    config = OmegaConf.load(TINY_V1 / "config.yaml")
    before = copy.deepcopy(OmegaConf.to_container(config))
    compvis_model(TINY_V1, ckpt=lcm_checkpoint[0], config=config)
    assert OmegaConf.to_container(config) == before


def test_a_config_with_a_projection_needs_it_in_the_file():
    config = OmegaConf.load(TINY_V1 / "config.yaml")
    config.model.params.unet_config.params.time_cond_proj_dim = DIM
    with pytest.raises(CheckpointError, match="1 weight missing such as model.diffusion_model.time_embedding.cond_pr"):
        compvis_model(TINY_V1, config=config)


def test_plain_unet_refuses_a_guidance_scale():
    model = compvis_model(TINY_V1)
    assert model.guidance_embedding_dim is None
    with pytest.raises(ValueError, match="no guidance embedding"):
        model.apply_model(torch.zeros(SHAPE), torch.tensor([10]), torch.zeros(1, 77, 32), guidance_scale=2.0)


@pytest.mark.parametrize("w", [1.0, 1.5, 8.0])
def test_unet_matches_diffusers(lcm_model, lcm_unet, w):
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    ours = lcm_model.apply_model(x, t, c, guidance_scale=w)
    ref = lcm_unet(x, t, encoder_hidden_states=c, timestep_cond=diffusers_embedding(w).repeat(2, 1)).sample
    assert relative_error(ours, ref) <= TOL
    # per-item scales as a tensor give the same
    assert torch.allclose(lcm_model.apply_model(x, t, c, guidance_scale=torch.tensor([w, w])), ours, atol=1e-6)
    # the projection matters: without it (as diffusers without timestep_cond) the output differs
    assert relative_error(lcm_model.apply_model(x, t, c), ours) > 10 * TOL
    assert relative_error(lcm_model.apply_model(x, t, c), lcm_unet(x, t, encoder_hidden_states=c).sample) <= TOL


@pytest.mark.parametrize("steps,w,strength", [(4, 1.5, 1.0), (1, 8.0, 1.0), (2, 1.0, 1.0), (3, 4.0, 0.6)])
def test_lcm_run_matches_diffusers(lcm_model, lcm_unet, steps, w, strength):
    from diffusers import LCMScheduler

    g = torch.Generator().manual_seed(2)
    cond, uncond, x_start = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g), \
        torch.randn(SHAPE, generator=g)
    init_noise = torch.randn(SHAPE, generator=g)
    noise_generator = torch.Generator().manual_seed(11)
    noise = [torch.randn(SHAPE, generator=noise_generator) for _ in range(steps - 1)]  # as the scheduler draws
    # diffusers' LatentConsistencyModel(Img2Img)Pipeline: one call per step with the embedding of w
    scheduler = LCMScheduler(**SD_BETAS, original_inference_steps=50, timestep_scaling=10.0)
    scheduler.set_timesteps(steps, strength=strength)
    x = x_start if strength == 1.0 else scheduler.add_noise(x_start, init_noise, scheduler.timesteps[:1])
    generator = torch.Generator().manual_seed(11)
    for t in scheduler.timesteps:
        out = lcm_unet(x, t, encoder_hidden_states=cond, timestep_cond=diffusers_embedding(w)).sample
        x, ref = scheduler.step(out, t, x, generator=generator, return_dict=False)

    calls = counting_calls(lcm_model)
    try:
        sampler = LCMSampler(lcm_model)
        if strength == 1.0:
            ours, _ = sampler.sample(S=steps, batch_size=1, shape=SHAPE[1:], conditioning=cond, x_T=x_start,
                                     verbose=False, unconditional_guidance_scale=w, unconditional_conditioning=uncond,
                                     noise=noise)
        else:
            ours = sampler.img2img(x_start, cond, S=steps, strength=strength, init_noise=init_noise, noise=noise,
                                   unconditional_guidance_scale=w, unconditional_conditioning=uncond, verbose=False)
    finally:
        calls.handle.remove()
    assert calls == [1] * steps  # no unconditional batch, whatever w
    assert relative_error(ours, ref) <= TOL
