"""LCMSampler: the reference tensors of ../shared/reference/lcm (diffusers' LCMScheduler driving the
original CompVis tiny-v1), and diffusers' LCMScheduler driving diffusers' UNet over the same tiny
weights (eps: tiny-v1, v: tiny-v2-v): txt2img and img2img, guidance 1 (one conditional call per step)
and 1.5 (guided); its timestep schedule and refusals; the UNet calls it makes."""
import json

import pytest
import torch
from safetensors.torch import load_file

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
from ldm.models.diffusion.lcm import LCMSampler, boundary_scalings, lcm_timesteps


pytestmark = pytest.mark.usefixtures("no_gradients")  # sampling runs without autograd

TOL = 1e-4  # relative (../shared/tools' measure); the UNets agree to ~3e-6 per call
SHAPE = (1, 4, 8, 8)


@pytest.fixture(scope="module")
def v1_model():
    return compvis_model(TINY_V1)


@pytest.fixture(scope="module", params=["eps", "v"])
def models(request, v1_model):
    pytest.importorskip("diffusers", reason="the reference is diffusers: pip install -r requirements-dev.txt")
    folder = TINY_V1 if request.param == "eps" else TINY_V2_V
    model = v1_model if request.param == "eps" else compvis_model(folder)
    return request.param, model, diffusers_unet(folder)


def inputs(model, seed=0):
    """cond, uncond (1, 77, D), x_T, init latent, init noise (1, 4, 8, 8): seeded normal draws."""
    g = torch.Generator().manual_seed(seed)
    width = 48 if model.parameterization == "v" else 32  # tiny-v2-v's and tiny-v1's context widths
    return (torch.randn(1, 77, width, generator=g), torch.randn(1, 77, width, generator=g),
            torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g))


def diffusers_lcm(unet, prediction, steps, cond, scale, uncond, seed, x_T=None, init=None, init_noise=None,
                  strength=1.0, timestep_cond=None):
    """What diffusers' LCM pipelines do with LCMScheduler (N = 50, s = 10), from the latents on."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(**SD_BETAS, original_inference_steps=50, timestep_scaling=10.0,
                             prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    scheduler.set_timesteps(steps, strength=strength)
    x = x_T if init is None else scheduler.add_noise(init, init_noise, scheduler.timesteps[:1])
    generator = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        out = diffusers_output(unet, x, t, cond, scale, uncond, timestep_cond)
        x, denoised = scheduler.step(out, t, x, generator=generator, return_dict=False)
    return denoised


def drawn(seed, count):
    """The first ``count`` draws of a generator seeded ``seed``, as diffusers' step draws them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(count)]


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_txt2img_matches_diffusers(models, steps, scale):
    prediction, model, unet = models
    cond, uncond, x_T, _, _ = inputs(model)
    ref = diffusers_lcm(unet, prediction, steps, cond, scale, uncond, seed=5, x_T=x_T)
    sampler = LCMSampler(model)
    ours, _ = sampler.sample(S=steps, batch_size=1, shape=SHAPE[1:], conditioning=cond, x_T=x_T, verbose=False,
                             unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                             noise=drawn(5, steps - 1))
    assert relative_error(ours, ref) <= TOL
    again, _ = sampler.sample(S=steps, batch_size=1, shape=SHAPE[1:], conditioning=cond, x_T=x_T, verbose=False,
                              unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                              generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, ours)  # the same noise drawn from an equally seeded generator


@pytest.mark.parametrize("steps,strength,scale", [(4, 0.5, 1.0), (2, 0.3, 1.0), (3, 0.8, 1.5)])
def test_img2img_matches_diffusers(models, steps, strength, scale):
    prediction, model, unet = models
    cond, uncond, _, init, init_noise = inputs(model)
    ref = diffusers_lcm(unet, prediction, steps, cond, scale, uncond, seed=9, init=init, init_noise=init_noise,
                        strength=strength)
    ours = LCMSampler(model).img2img(init, cond, S=steps, strength=strength, init_noise=init_noise,
                                     noise=drawn(9, steps - 1), unconditional_guidance_scale=scale,
                                     unconditional_conditioning=uncond, verbose=False)
    assert relative_error(ours, ref) <= TOL


def test_reference_tensors(reference_dir, v1_model):
    """The cases of ../shared/reference/lcm, as ../shared/tools/check_lcm.py runs them."""
    meta = json.loads((reference_dir / "lcm" / "golden.json").read_text())
    golden = load_file(reference_dir / "lcm" / "golden.safetensors")
    sampler = LCMSampler(v1_model)
    for key, want in meta["timesteps"].items():
        steps, strength = key.split("@")
        assert sampler.timesteps(int(steps), float(strength)).tolist() == want, key
    for name, case in meta["cases"].items():
        noise = [golden[f"{name}_noise{i}"] for i in range(case["noises"])]
        if case["strength"] == 1.0:
            ours, _ = sampler.sample(S=case["steps"], batch_size=1, shape=list(golden["x_T"].shape[1:]),
                                     conditioning=golden["cond"], x_T=golden["x_T"], verbose=False, noise=noise,
                                     unconditional_guidance_scale=case["guidance"],
                                     unconditional_conditioning=golden["uncond"])
        else:
            ours = sampler.img2img(golden["init_latent"], golden["cond"], S=case["steps"], strength=case["strength"],
                                   init_noise=golden[f"{name}_init_noise"], noise=noise, verbose=False,
                                   unconditional_guidance_scale=case["guidance"])
        assert relative_error(ours, golden[f"{name}_latent"]) <= 2e-3, name


def test_timesteps_and_refusals_are_diffusers():
    diffusers = pytest.importorskip("diffusers", reason="the reference is diffusers (requirements-dev.txt)")
    scheduler = diffusers.LCMScheduler(**SD_BETAS, original_inference_steps=50, timestep_scaling=10.0)
    for strength in (1.0, 0.8, 0.5, 0.3, 0.25, 0.1, 0.02):
        for steps in (*range(1, 12), 16, 25, 26, 49, 50, 51, 100):
            try:
                scheduler.set_timesteps(steps, strength=strength)
                want = scheduler.timesteps.tolist()
            except ValueError:
                with pytest.raises(ValueError):
                    lcm_timesteps(steps, strength)
                continue
            assert lcm_timesteps(steps, strength).tolist() == want, (steps, strength)
    assert lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    with pytest.raises(ValueError, match="at most 25 steps, or a strength of at least 0.6"):
        lcm_timesteps(30, 0.5)
    for steps, strength in ((0, 1.0), (4, 0.0), (4, 1.5)):
        with pytest.raises(ValueError):
            lcm_timesteps(steps, strength)


def test_boundary_scalings_formula():
    # c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25)
    assert boundary_scalings(0) == (1.0, 0.0)
    c_skip, c_out = boundary_scalings(259)
    assert c_skip == pytest.approx(0.25 / (2590**2 + 0.25), rel=1e-12)
    assert c_out == pytest.approx(2590 / (2590**2 + 0.25) ** 0.5, rel=1e-12)


@pytest.mark.parametrize("scale,batch", [(1.0, 1), (1.5, 2)])
def test_guidance_1_makes_one_call_per_step_with_batch_1(v1_model, scale, batch):
    cond, uncond, x_T, init, _ = inputs(v1_model)
    calls = counting_calls(v1_model)
    try:
        LCMSampler(v1_model).sample(S=4, batch_size=1, shape=SHAPE[1:], conditioning=cond, x_T=x_T, verbose=False,
                                    unconditional_guidance_scale=scale, unconditional_conditioning=uncond)
        assert calls == [batch] * 4
        calls.clear()
        LCMSampler(v1_model).img2img(init, cond, S=3, strength=0.5, unconditional_guidance_scale=scale,
                                     unconditional_conditioning=uncond, verbose=False)
        assert calls == [batch] * 3
    finally:
        calls.handle.remove()


def test_hooks_and_bad_arguments(v1_model):
    cond, _, x_T, _, _ = inputs(v1_model)
    seen = []
    sampler = LCMSampler(v1_model)
    latent, intermediates = sampler.sample(S=2, batch_size=1, shape=SHAPE[1:], conditioning=cond, x_T=x_T,
                                           verbose=False, callback=seen.append,
                                           img_callback=lambda x0, i: seen.append(x0.shape))
    assert seen == [0, SHAPE, 1, SHAPE]
    assert len(intermediates["x_inter"]) == 3 and torch.equal(intermediates["x_inter"][-1], latent)
    with pytest.raises(ValueError, match="2 noise tensors given for 3 noisy steps"):
        sampler.sample(S=4, batch_size=1, shape=SHAPE[1:], conditioning=cond, x_T=x_T, verbose=False,
                       noise=drawn(0, 2))
    with pytest.raises(ValueError, match="does not support mask"):
        sampler.sample(S=4, batch_size=1, shape=SHAPE[1:], conditioning=cond, x_T=x_T, verbose=False,
                       mask=torch.ones(SHAPE), x0=x_T)
