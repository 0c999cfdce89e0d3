"""What CompVis's DDIM and PLMS samplers share, as plain functions plus one base class.

* ``make_ddim_schedule`` -> a ``DDIMSchedule`` of per-index tensors (index 0 = least noisy step);
* ``guided_eps``: the model's output with classifier-free guidance (one batched call);
  ``make_eps_fn`` binds the conditioning and turns that output into a noise prediction (eps)
  whatever the model predicts (``parameterization`` "eps" or "v"); ``output_to_x0`` turns it
  into a clean-latent prediction (the LCM sampler's);
* ``ddim_step``: one DDIM update x_t -> x_prev from a noise prediction (PLMS uses it too);
* noise helpers (``randn``, ``make_step_noise``) and ``timestep_batch``;
* ``DiffusionSampler``: schedule, ``stochastic_encode``, ``sample``/``decode`` argument handling;
  the subclasses (``ddim.DDIMSampler``, ``plms.PLMSSampler``) only pick their loop.

The schedule of the last ``make_schedule`` call is kept on the sampler, as upstream (``decode``
uses it), but each ``sample``/``decode`` call runs on its own local copy.
"""
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ldm.modules.diffusionmodules.util import (
    extract_into_tensor,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DDIMSchedule:
    """The steps a sampler visits, by index i = 0 (least noisy) .. S-1 (noisiest).

    timesteps: (S,) int numpy, the DDPM timestep of each index (kept on the host: no syncs).
    alphas, alphas_prev, sigmas, sqrt_one_minus_alphas: (S,) float32 tensors on the model's device:
    alpha-bar at the index, alpha-bar of the index below (alpha-bar[0] for index 0), the noise std
    of the step from the index down (eta times the DDPM posterior std), and sqrt(1 - alpha-bar).
    """

    timesteps: np.ndarray
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor
    eta: float
    key: tuple = ()  # what make_schedule was asked for, to reuse an equal schedule

    def __len__(self):
        return len(self.timesteps)

    def to(self, device) -> "DDIMSchedule":
        move = {name: getattr(self, name).to(device)
                for name in ("alphas", "alphas_prev", "sigmas", "sqrt_one_minus_alphas")}
        return DDIMSchedule(timesteps=self.timesteps, eta=self.eta, key=self.key, **move)


def _float32(values, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=torch.float32).to(device)


def make_ddim_schedule(alphas_cumprod, num_steps, discretize="uniform", eta=0.0, verbose=True) -> DDIMSchedule:
    """DDIM schedule of ``num_steps`` steps (which timesteps: make_ddim_timesteps).

    alphas_cumprod: (T,) the model's alpha-bar buffer; the schedule lands on its device.
    """
    timesteps = make_ddim_timesteps(ddim_discr_method=discretize, num_ddim_timesteps=num_steps,
                                    num_ddpm_timesteps=alphas_cumprod.shape[0], verbose=verbose)
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(
        alphacums=alphas_cumprod.float().cpu(), ddim_timesteps=timesteps, eta=eta, verbose=verbose)
    device = alphas_cumprod.device
    alphas = _float32(alphas, device)
    # upstream: np.sqrt(1. - ddim_alphas), in float32
    return DDIMSchedule(timesteps=np.asarray(timesteps), alphas=alphas, alphas_prev=_float32(alphas_prev, device),
                        sigmas=_float32(sigmas, device), sqrt_one_minus_alphas=torch.sqrt(1.0 - alphas),
                        eta=float(eta), key=(num_steps, discretize, float(eta), str(device)))


def make_ddpm_schedule(model, eta=0.0) -> DDIMSchedule:
    """Every one of the model's T timesteps as a DDIM schedule (upstream's use_original_steps)."""
    alphas = model.alphas_cumprod.float()
    alphas_prev = model.alphas_cumprod_prev.float()
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return DDIMSchedule(timesteps=np.arange(alphas.shape[0]), alphas=alphas, alphas_prev=alphas_prev,
                        sigmas=sigmas, sqrt_one_minus_alphas=torch.sqrt(1.0 - alphas), eta=float(eta))


def _cat_cond(uncond, cond):
    """[uncond; cond] along the batch: tensors, or dicts of tensors / lists of tensors."""
    if isinstance(cond, dict):
        return {k: [torch.cat([u, c]) for u, c in zip(uncond[k], cond[k])] if isinstance(cond[k], list)
                else torch.cat([uncond[k], cond[k]]) for k in cond}
    return torch.cat([uncond, cond])


def guided_eps(model, x, t, cond, scale=1.0, uncond=None):
    """The model's output (B, C, H, W) for x (B, C, H, W) at timesteps t (B,): its noise
    prediction, or v for v-models (``output_to_eps`` converts).

    With ``uncond`` and ``scale`` != 1 this is classifier-free guidance,
    eps_u + scale * (eps_c - eps_u), from one ``apply_model`` call on the batch [x; x].
    """
    if uncond is None or scale == 1.0:
        return model.apply_model(x, t, cond)
    eps_uncond, eps_cond = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(uncond, cond)).chunk(2)
    return eps_uncond + scale * (eps_cond - eps_uncond)


def output_to_eps(model, x, t, output):
    """The noise prediction (B, C, H, W) that a model's output (B, C, H, W) at x, t (B,) means:
    the output itself for ``parameterization`` "eps", ``model.predict_eps_from_z_and_v`` for "v"."""
    parameterization = getattr(model, "parameterization", "eps")
    if parameterization == "eps":
        return output
    if parameterization == "v":
        return model.predict_eps_from_z_and_v(x, t, output).to(output.dtype)
    raise ValueError(f"parameterization {parameterization!r}: the samplers handle 'eps' and 'v'")


def output_to_x0(model, x, t, output):
    """The clean-latent prediction (B, C, H, W) that a model's output at x, t (B,) means:
    (x - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t) for "eps" models,
    ``model.predict_start_from_z_and_v`` (sqrt(alpha-bar_t) x - sqrt(1 - alpha-bar_t) v) for "v"."""
    parameterization = getattr(model, "parameterization", "eps")
    if parameterization == "v":
        return model.predict_start_from_z_and_v(x, t, output).to(output.dtype)
    if parameterization != "eps":
        raise ValueError(f"parameterization {parameterization!r}: the samplers handle 'eps' and 'v'")
    alphas = extract_into_tensor(model.alphas_cumprod, t, x.shape)
    return ((x - (1.0 - alphas).sqrt() * output) / alphas.sqrt()).to(output.dtype)


def make_eps_fn(model, cond, scale=1.0, uncond=None, score_corrector=None, corrector_kwargs=None):
    """``eps_fn(x, t)``: ``guided_eps`` with the conditioning bound, as a noise prediction
    (``output_to_eps``: v-models are converted, as the reference DDIM does), then the optional
    score corrector. The DDIM and PLMS updates then work on eps for every model."""
    if score_corrector is not None and model.parameterization != "eps":
        raise ValueError(f"score_corrector needs an eps-parameterized model, not {model.parameterization!r}")

    def eps_fn(x, t):
        eps = output_to_eps(model, x, t, guided_eps(model, x, t, cond, scale, uncond))
        if score_corrector is not None:
            eps = score_corrector.modify_score(model, eps, x, t, cond, **(corrector_kwargs or {}))
        return eps

    return eps_fn


def ddim_step(x, eps, schedule, index, noise=None, denoised_fn=None):
    """One DDIM update from index ``index`` to the one below.

    x, eps: (B, C, H, W) the current latent and its noise prediction; noise: standard normal
    noise of x's shape (scaled here by the step's sigma), or None when eta is 0.
    denoised_fn: applied to the x0 prediction first (upstream's quantize_denoised).
    Returns (x_prev, pred_x0), both (B, C, H, W).
    """
    a_t, a_prev, sigma_t = schedule.alphas[index], schedule.alphas_prev[index], schedule.sigmas[index]
    pred_x0 = (x - schedule.sqrt_one_minus_alphas[index] * eps) / a_t.sqrt()
    if denoised_fn is not None:
        pred_x0 = denoised_fn(pred_x0)
    dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * eps
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma_t * noise
    return x_prev, pred_x0


def timestep_batch(schedule, index, batch_size, device) -> torch.Tensor:
    """(B,) int64 tensor of the DDPM timestep at ``index`` (filled from the host: no sync)."""
    return torch.full((batch_size,), int(schedule.timesteps[index]), device=device, dtype=torch.long)


def randn(shape, device, dtype, generator=None) -> torch.Tensor:
    """Standard normal noise; drawn on the generator's device when one is given, then moved.

    generator: None (torch's global one), a ``torch.Generator``, or a list of ``shape[0]``
    generators: row b is then drawn from generator b alone, the numbers a batch of one draws from
    it, so that a row's noise does not depend on the rows beside it.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per row")
        return torch.cat([randn((1, *shape[1:]), device, dtype, g) for g in generator])
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def make_step_noise(schedule, generator=None, temperature=1.0, noise_dropout=0.0):
    """``step_noise(x)`` for the loops: temperature-scaled standard normal noise (with dropout),
    or None when the schedule's eta is 0 and steps add no noise."""
    if schedule.eta == 0:
        return None

    def step_noise(x):
        noise = randn(x.shape, x.device, x.dtype, generator) * temperature
        return torch.nn.functional.dropout(noise, p=noise_dropout) if noise_dropout > 0 else noise

    return step_noise


class DiffusionSampler:
    """What CompVis's DDIM and PLMS samplers share; subclasses supply ``_loop``."""

    name = "sampler"

    def __init__(self, model, schedule="linear", **kwargs):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule  # upstream's name for the model's beta schedule; kept for compatibility
        self._ddim = None  # the DDIMSchedule of the last make_schedule call

    # -- schedule

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True) -> DDIMSchedule:
        """Computes (or reuses) the schedule for ``ddim_num_steps`` steps and keeps it for
        ``stochastic_encode``/``decode``. Returns it."""
        alphas_cumprod = self.model.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("alphas have to be defined for each timestep")
        key = (ddim_num_steps, ddim_discretize, float(ddim_eta), str(alphas_cumprod.device))
        if self._ddim is None or self._ddim.key != key:
            self._ddim = make_ddim_schedule(alphas_cumprod, ddim_num_steps, ddim_discretize, ddim_eta, verbose)
        return self._ddim

    def _current(self, use_original_steps=False) -> DDIMSchedule:
        if self._ddim is None:
            raise RuntimeError(f"call make_schedule(ddim_num_steps=...) on the {self.name} sampler first")
        if use_original_steps:
            return make_ddpm_schedule(self.model, self._ddim.eta)
        return self._ddim

    # CompVis attribute names, read by scripts written against upstream
    @property
    def ddim_timesteps(self):
        return self._current().timesteps

    @property
    def ddim_alphas(self):
        return self._current().alphas

    @property
    def ddim_alphas_prev(self):
        return self._current().alphas_prev

    @property
    def ddim_sigmas(self):
        return self._current().sigmas

    @property
    def ddim_sqrt_one_minus_alphas(self):
        return self._current().sqrt_one_minus_alphas

    # -- img2img

    @torch.no_grad()
    def stochastic_encode(self, x0, t, use_original_steps=False, noise=None, *, generator=None):
        """x0 (B, C, H, W) noised to the level of schedule index t (B,) (or one index for all):
        sqrt(alpha-bar) * x0 + sqrt(1 - alpha-bar) * noise. Needs make_schedule first.

        With the DDIM schedule index t is DDPM timestep ``ddim_timesteps[t]``, so img2img with
        ``t_enc`` then runs ``decode(..., t_start=t_enc)`` from index t_enc - 1 (upstream's quirk).
        """
        schedule = self._current(use_original_steps).to(x0.device)
        t = torch.as_tensor(t, dtype=torch.long, device=x0.device).reshape(-1).expand(x0.shape[0])
        if noise is None:
            noise = randn(x0.shape, x0.device, x0.dtype, generator)
        encoded = (extract_into_tensor(schedule.alphas.sqrt(), t, x0.shape) * x0
                   + extract_into_tensor(schedule.sqrt_one_minus_alphas, t, x0.shape) * noise)
        return encoded.to(x0.dtype)

    @torch.no_grad()
    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               use_original_steps=False, *, generator=None, verbose=True, before_step=None):
        """``t_start`` steps from schedule index t_start - 1 down to 0, starting at x_latent (B, C, H, W)
        (usually ``stochastic_encode(x0, t_start)``). t_start = 0 returns x_latent unchanged.
        With eta > 0 in make_schedule each step adds noise, drawn with ``generator``.
        ``verbose`` shows a progress bar of the steps. ``before_step(x, t) -> x`` is called with
        the latent before each step (e.g. to bend it)."""
        schedule = self._current(use_original_steps).to(x_latent.device)
        if not 0 <= t_start <= len(schedule):
            raise ValueError(f"t_start={t_start}: must lie in 0..{len(schedule)} for this schedule")
        logger.debug("%s: decoding with %d of %d steps", self.name, t_start, len(schedule))
        eps_fn = make_eps_fn(self.model, cond, unconditional_guidance_scale, unconditional_conditioning)
        return self._loop(eps_fn, x_latent, schedule, t_start - 1, step_noise=make_step_noise(schedule, generator),
                          before_step=before_step, desc="Decoding image", verbose=verbose)

    # -- txt2img

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, img_callback=None,
               quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0, noise_dropout=0.0,
               score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1.0, unconditional_conditioning=None, *, generator=None, **kwargs):
        """``S`` steps from noise to a latent of shape (batch_size, *shape).

        conditioning: (B, 77, D) (or a dict for hybrid models); x_T: the start noise
        (default: drawn with ``generator``); mask, x0: keep x0 where mask is 1 (inpainting).
        Returns (samples (B, C, H, W), {'x_inter': [...], 'pred_x0': [...]}), the lists holding
        the start and every ``log_every_t``-th step's latent and x0 prediction.
        """
        if kwargs:
            logger.debug("%s.sample ignores %s", self.name, sorted(kwargs))
        _check_batch(conditioning, batch_size)
        schedule = self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        device = self.model.alphas_cumprod.device
        dtype = weight_dtype(self.model)
        size = (batch_size, *shape)
        x = randn(size, device, dtype, generator) if x_T is None else x_T
        schedule = schedule.to(x.device)
        logger.debug("%s: %d steps, shape %s, eta %s", self.name, len(schedule), size, eta)

        intermediates = {"x_inter": [x], "pred_x0": [x]}
        last_index = len(schedule) - 1

        def after_step(i, index, x, pred_x0):
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == last_index:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)

        before_step = None
        if mask is not None:
            if x0 is None:
                raise ValueError("mask needs x0, the latent whose masked part is kept")

            def before_step(x, t):
                known = self.model.q_sample(x0, t, noise=randn(x0.shape, x0.device, x0.dtype, generator))
                return known * mask + (1.0 - mask) * x

        denoised_fn = None
        if quantize_x0:
            def denoised_fn(pred_x0):
                return self.model.first_stage_model.quantize(pred_x0)[0]

        eps_fn = make_eps_fn(self.model, conditioning, unconditional_guidance_scale, unconditional_conditioning,
                             score_corrector, corrector_kwargs)
        step_noise = make_step_noise(schedule, generator, temperature, noise_dropout)
        samples = self._loop(eps_fn, x, schedule, last_index, step_noise=step_noise, denoised_fn=denoised_fn,
                             before_step=before_step, after_step=after_step, verbose=verbose)
        return samples, intermediates

    def _loop(self, eps_fn, x, schedule, last_index, **options):
        raise NotImplementedError


def _check_batch(conditioning, batch_size):
    if conditioning is None:
        return
    first = next(iter(conditioning.values())) if isinstance(conditioning, dict) else conditioning
    if isinstance(first, list):
        first = first[0]
    if first.shape[0] != batch_size:
        logger.warning("conditioning has batch size %d but batch_size=%d", first.shape[0], batch_size)


def weight_dtype(model) -> torch.dtype:
    """The dtype of the model's floating-point weights (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
