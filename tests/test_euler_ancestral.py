"""EulerAncestralSampler against diffusers' EulerAncestralDiscreteScheduler(timestep_spacing="trailing"),
SD-Turbo's scheduler, driving diffusers' UNet over the same tiny weights (eps: tiny-v1, v: tiny-v2-v):
txt2img and img2img in 1, 2 and 4 steps, guidance 0 (one conditional call) and 2 (guided)."""
import numpy as np
import pytest
import torch

from diffusers_reference import (
    SD_BETAS,
    TINY_V1,
    TINY_V2_V,
    compvis_model,
    counting_calls,
    diffusers_output,
    diffusers_unet,
    relative_error,
)
from ldm.models.diffusion.euler_ancestral import EulerAncestralSampler, trailing_timesteps


pytestmark = pytest.mark.usefixtures("no_gradients")  # sampling runs without autograd

TOL = 1e-4  # relative (../shared/tools' measure); the UNets agree to ~3e-6 per call
SHAPE = (1, 4, 8, 8)


@pytest.fixture(scope="module", params=["eps", "v"])
def models(request):
    pytest.importorskip("diffusers", reason="the reference is diffusers: pip install -r requirements-dev.txt")
    folder = TINY_V1 if request.param == "eps" else TINY_V2_V
    model = compvis_model(folder)
    return request.param, model, diffusers_unet(folder)


@pytest.fixture(scope="module")
def v1_model():
    return compvis_model(TINY_V1)


def inputs(model, seed=0):
    """cond, uncond (1, 77, D), x_T, init latent, init noise (1, 4, 8, 8): seeded normal draws."""
    g = torch.Generator().manual_seed(seed)
    width = 48 if model.parameterization == "v" else 32  # tiny-v2-v's and tiny-v1's context widths
    return (torch.randn(1, 77, width, generator=g), torch.randn(1, 77, width, generator=g),
            torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g))


def diffusers_euler_a(unet, prediction, steps, cond, scale, uncond, seed, x_T=None, init=None, init_noise=None,
                      strength=1.0):
    """What StableDiffusion(Img2Img)Pipeline does with this scheduler, from the latents on."""
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing",
                                                prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if init is None:
        x = x_T * scheduler.init_noise_sigma
    else:  # the img2img pipeline's get_timesteps and prepare_latents
        t_start = steps - min(int(steps * strength), steps)
        timesteps = timesteps[t_start:]
        scheduler.set_begin_index(t_start)
        x = scheduler.add_noise(init, init_noise, timesteps[:1])
    generator = torch.Generator().manual_seed(seed)
    for t in timesteps:
        out = diffusers_output(unet, scheduler.scale_model_input(x, t), t, cond, scale, uncond)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def drawn(seed, count):
    """The first ``count`` draws of a generator seeded ``seed``, as diffusers' step draws them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(count)]


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("scale", [0.0, 2.0])
def test_txt2img_matches_diffusers(models, steps, scale):
    prediction, model, unet = models
    cond, uncond, x_T, _, _ = inputs(model)
    ref = diffusers_euler_a(unet, prediction, steps, cond, scale, uncond, seed=7, x_T=x_T)
    sampler = EulerAncestralSampler(model)
    ours, _ = sampler.sample(S=steps, batch_size=1, shape=SHAPE[1:], conditioning=cond, x_T=x_T, verbose=False,
                             unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                             noise=drawn(7, steps - 1))
    assert relative_error(ours, ref) <= TOL
    # the same noise drawn by the sampler from an equally seeded generator
    again, _ = sampler.sample(S=steps, batch_size=1, shape=SHAPE[1:], conditioning=cond, x_T=x_T, verbose=False,
                              unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                              generator=torch.Generator().manual_seed(7))
    assert torch.equal(again, ours)


@pytest.mark.parametrize("steps,strength", [(1, 1.0), (2, 0.5), (4, 0.5), (4, 0.75)])
def test_img2img_matches_diffusers(models, steps, strength):
    prediction, model, unet = models
    cond, uncond, _, init, init_noise = inputs(model)
    ref = diffusers_euler_a(unet, prediction, steps, cond, 0.0, None, seed=3, init=init, init_noise=init_noise,
                            strength=strength)
    count = int(steps * strength)
    ours = EulerAncestralSampler(model).img2img(init, cond, S=steps, strength=strength, init_noise=init_noise,
                                                noise=drawn(3, count - 1), unconditional_guidance_scale=0.0,
                                                verbose=False)
    assert relative_error(ours, ref) <= TOL


def test_trailing_timesteps_are_diffusers():
    from_diffusers = pytest.importorskip("diffusers").EulerAncestralDiscreteScheduler(**SD_BETAS,
                                                                                      timestep_spacing="trailing")
    for steps in [*range(1, 60), 61, 250, 1000]:
        from_diffusers.set_timesteps(steps)
        # diffusers' float range runs one step over for some S (61: a 62nd timestep -1); the first S agree
        assert trailing_timesteps(steps).tolist() == from_diffusers.timesteps[:steps].long().tolist()
    assert trailing_timesteps(4).tolist() == [999, 749, 499, 249]


def test_schedule_formulas(v1_model):
    model = v1_model
    timesteps, sigmas = EulerAncestralSampler(model).schedule(4, 0.5)
    assert timesteps.tolist() == [499, 249]  # the last int(4 * 0.5) = 2 of 999, 749, 499, 249
    a = model.alphas_cumprod.double().numpy()
    np.testing.assert_allclose(sigmas, [((1 - a[499]) / a[499]) ** 0.5, ((1 - a[249]) / a[249]) ** 0.5, 0.0])


@pytest.mark.parametrize("steps,strength", [(4, 0.2), (1, 0.5), (3, 0.3)])
def test_img2img_refuses_zero_steps(v1_model, steps, strength):
    with pytest.raises(ValueError, match=rf"int\({steps} x {strength}\) = 0 steps"):
        EulerAncestralSampler(v1_model).img2img(torch.zeros(SHAPE), torch.zeros(1, 77, 32), S=steps, strength=strength)


def test_guidance_0_makes_one_call_per_step_with_batch_1(v1_model):
    model = v1_model
    cond, uncond, x_T, _, _ = inputs(model)
    calls = counting_calls(model)
    sampler = EulerAncestralSampler(model)
    sampler.sample(S=4, batch_size=1, shape=SHAPE[1:], conditioning=cond, x_T=x_T, verbose=False,
                   unconditional_guidance_scale=0.0, unconditional_conditioning=uncond)
    assert calls == [1, 1, 1, 1]
    calls.clear()
    sampler.sample(S=2, batch_size=1, shape=SHAPE[1:], conditioning=cond, x_T=x_T, verbose=False,
                   unconditional_guidance_scale=3.0, unconditional_conditioning=uncond)
    assert calls == [2, 2]  # guided: [uncond; cond] in one batch
    calls.handle.remove()


def test_noise_list_must_fit_the_steps(v1_model):
    model = v1_model
    cond, _, x_T, _, _ = inputs(model)
    with pytest.raises(ValueError, match="2 noise tensors given for 3 noisy steps"):
        EulerAncestralSampler(model).sample(S=4, batch_size=1, shape=SHAPE[1:], conditioning=cond, x_T=x_T,
                                            verbose=False, noise=drawn(0, 2))
