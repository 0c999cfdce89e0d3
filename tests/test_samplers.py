"""DDIM and PLMS samplers: img2img for PLMS, reproducible noise, schedules that change between
calls, batched classifier-free guidance. A toy model stands in for LatentDiffusion (the samplers
only use its schedule buffers and apply_model), so these run in a blink; the numbers against the
original CompVis code are checked on the tiny SD model in test_engine_golden.py."""
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.util import make_beta_schedule

SHAPE = [4, 8, 8]


class ToyDiffusion(torch.nn.Module):
    """LatentDiffusion's sampler-facing surface: the noise schedule and an apply_model that logs
    (batch size, timesteps) of each call and predicts a smooth function of x, t and cond."""

    def __init__(self):
        super().__init__()
        alphas_cumprod = torch.cumprod(1 - torch.tensor(make_beta_schedule("linear", 1000, 0.00085, 0.012)), 0)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("alphas_cumprod_prev", torch.cat([torch.ones(1), alphas_cumprod[:-1].float()]))
        self.num_timesteps = 1000
        self.parameterization = "eps"
        self.gain = torch.nn.Parameter(torch.tensor(0.7))
        self.calls = []

    def apply_model(self, x, t, cond):
        self.calls.append((x.shape[0], t.clone()))
        shift = cond.mean(dim=(1, 2))[:, None, None, None] + t[:, None, None, None] / 1000
        return torch.tanh(self.gain * x + shift)


@pytest.fixture
def model():
    return ToyDiffusion()


def conds(batch=1):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 77, 8, generator=generator), torch.randn(batch, 77, 8, generator=generator)


def noise(seed, batch=1):
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))


def sample(sampler, steps, x_T=None, **options):
    c, uc = conds(x_T.shape[0] if x_T is not None else 1)
    latent, _ = sampler.sample(S=steps, batch_size=c.shape[0], shape=SHAPE, conditioning=c, verbose=False,
                               unconditional_guidance_scale=5.0, unconditional_conditioning=uc, x_T=x_T, **options)
    return latent


def img2img(sampler, x0, steps, t_enc):
    c, uc = conds()
    sampler.make_schedule(ddim_num_steps=steps, verbose=False)
    z_enc = sampler.stochastic_encode(x0, torch.tensor([t_enc]), noise=noise(2))
    return sampler.decode(z_enc, c, t_enc, unconditional_guidance_scale=5.0, unconditional_conditioning=uc)


def test_plms_stochastic_encode_is_ddims(model):
    x0 = noise(3)
    for t_enc in (0, 4, 9):
        encoded = []
        for sampler in (DDIMSampler(model), PLMSSampler(model)):
            sampler.make_schedule(ddim_num_steps=10, verbose=False)
            encoded.append(sampler.stochastic_encode(x0, torch.tensor([t_enc]), noise=noise(2)))
        assert torch.equal(*encoded)
    # the level of DDIM index t_enc: sqrt(alpha-bar) x0 + sqrt(1 - alpha-bar) noise at timestep 100 t_enc + 1
    a = model.alphas_cumprod[901]
    assert torch.allclose(encoded[1], a.sqrt() * x0 + (1 - a).sqrt() * noise(2), atol=1e-6)


@pytest.mark.parametrize("sampler_class", [DDIMSampler, PLMSSampler])
def test_no_img2img_steps_return_the_latent_unchanged(sampler_class, model):
    x0 = noise(3)
    sampler = sampler_class(model)
    sampler.make_schedule(ddim_num_steps=10, verbose=False)
    c, uc = conds()
    assert torch.equal(sampler.decode(x0, c, 0, unconditional_guidance_scale=5.0, unconditional_conditioning=uc), x0)
    assert model.calls == []


def test_plms_img2img_runs_t_enc_steps_from_index_t_enc_minus_1(model):
    sampler = PLMSSampler(model)
    out = img2img(sampler, noise(3), steps=10, t_enc=4)
    # indices 3, 2, 1, 0 = timesteps 301, 201, 101, 1; the warm-up evaluates the next timestep too
    assert [t.tolist() for _, t in model.calls] == [[301, 301], [201, 201], [201, 201], [101, 101], [1, 1]]
    assert out.shape == (1, *SHAPE) and torch.isfinite(out).all()


@pytest.mark.parametrize("sampler_class", [DDIMSampler, PLMSSampler])
def test_decoding_all_steps_is_sampling_from_that_latent(sampler_class, model):
    """decode(x, t_start = S) and sample(x_T = x) run the same S steps."""
    x = noise(4)
    sampler = sampler_class(model)
    sampler.make_schedule(ddim_num_steps=10, verbose=False)
    c, uc = conds()
    decoded = sampler.decode(x, c, 10, unconditional_guidance_scale=5.0, unconditional_conditioning=uc)
    assert torch.equal(decoded, sample(sampler_class(model), 10, x_T=x))


@pytest.mark.parametrize("sampler_class", [DDIMSampler, PLMSSampler])
def test_successive_calls_with_other_step_counts_match_fresh_samplers(sampler_class, model):
    shared = sampler_class(model)
    for steps in (10, 7, 25, 10):
        assert torch.equal(sample(shared, steps, x_T=noise(5)), sample(sampler_class(model), steps, x_T=noise(5)))
        assert torch.equal(img2img(shared, noise(6), 8, 3), img2img(sampler_class(model), noise(6), 8, 3))
    assert not any(isinstance(v, (list, torch.Tensor)) for v in vars(shared).values())  # no per-call state kept


def test_a_generator_makes_noise_reproducible(model):
    sampler = DDIMSampler(model)
    runs = [sample(sampler, 10, eta=0.8, generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    sampler.make_schedule(ddim_num_steps=10, verbose=False)
    x0 = noise(3)
    encoded = [sampler.stochastic_encode(x0, torch.tensor([5]), generator=torch.Generator().manual_seed(seed))
               for seed in (7, 7, 8)]
    assert torch.equal(encoded[0], encoded[1]) and not torch.equal(encoded[0], encoded[2])


def test_ddim_eta_adds_noise_and_eta_zero_does_not(model):
    x_T = noise(5)
    deterministic = [sample(DDIMSampler(model), 10, x_T=x_T, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert torch.equal(*deterministic)
    noisy = sample(DDIMSampler(model), 10, x_T=x_T, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(noisy, deterministic[0])


def test_plms_refuses_eta(model):
    with pytest.raises(ValueError, match="eta"):
        sample(PLMSSampler(model), 10, x_T=noise(5), eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        PLMSSampler(model).make_schedule(ddim_num_steps=10, ddim_eta=0.1, verbose=False)


@pytest.mark.parametrize("sampler_class, evaluations", [(DDIMSampler, 10), (PLMSSampler, 11)])
def test_guidance_is_one_batched_model_call_per_evaluation(sampler_class, evaluations, model):
    sample(sampler_class(model), 10, x_T=noise(5, batch=3))
    assert len(model.calls) == evaluations and all(batch == 6 for batch, _ in model.calls)


def test_guided_prediction_combines_uncond_and_cond(model):
    """[uncond; cond] order and eps_u + s (eps_c - eps_u), checked against two separate calls."""
    from ldm.models.diffusion.sampling import guided_eps

    x, t = noise(5, batch=2), torch.tensor([11, 501])
    c, uc = conds(2)
    eps_c, eps_u = model.apply_model(x, t, c), model.apply_model(x, t, uc)
    assert torch.allclose(guided_eps(model, x, t, c, 7.5, uc), eps_u + 7.5 * (eps_c - eps_u), atol=1e-6)


def test_intermediates_hold_the_start_and_every_log_every_t_step(model):
    c, uc = conds()
    _, intermediates = DDIMSampler(model).sample(S=10, batch_size=1, shape=SHAPE, conditioning=c, verbose=False,
                                                 x_T=noise(5), log_every_t=4)
    # the start, then indices 9 (the first step), 8, 4 and 0
    assert [len(v) for v in intermediates.values()] == [5, 5] and list(intermediates) == ["x_inter", "pred_x0"]
    assert torch.equal(intermediates["x_inter"][0], noise(5))


def test_step_loops_never_read_tensor_values_on_the_host(model, monkeypatch):
    """On a GPU such a read (.item(), bool(tensor), ...) would stall every step."""
    samplers = DDIMSampler(model), PLMSSampler(model)
    for sampler in samplers:
        sampler.make_schedule(ddim_num_steps=10, verbose=False)  # may read values; the loops may not

    def refuse(*args):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    c, uc = conds()
    for sampler in samplers:
        eta = 0.5 if isinstance(sampler, DDIMSampler) else 0.0
        sampler.sample(S=10, batch_size=1, shape=SHAPE, conditioning=c, verbose=False, eta=eta,
                       unconditional_guidance_scale=5.0, unconditional_conditioning=uc)
        sampler.decode(noise(1), c, 5, unconditional_guidance_scale=5.0, unconditional_conditioning=uc)
