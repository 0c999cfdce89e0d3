"""Latent Consistency Model sampling (Luo et al. 2023): pictures in 1 to 8 steps from an
LCM-distilled UNet (LCM Dreamshaper...) or from Stable Diffusion with an LCM-LoRA merged in.

The math of diffusers' ``LCMScheduler`` (defaults original_inference_steps N = 50,
timestep_scaling s = 10, sigma_data = 0.5) over the model's alpha-bar schedule (T = 1000 steps).

Timesteps of S steps at img2img strength r (r = 1: txt2img):
    k = T // N;   origin = [k - 1, 2k - 1, ..., floor(N r) k - 1]     (the distillation's grid, r cuts it)
    timesteps[j] = reversed(origin)[floor(j len(origin) / S)],  j = 0 .. S-1   (descending)
refused (ValueError, as diffusers refuses) when len(origin) // S < 1 or S > N.

One step at timestep t, the next one t' (alpha-bar a_t, a_t'), model output out:
    x0       = (x - sqrt(1 - a_t) out) / sqrt(a_t)          eps models
             = sqrt(a_t) x - sqrt(1 - a_t) out                v models (SD 2.x 768-v)
    c_skip   = sigma_data^2 / ((s t)^2 + sigma_data^2),   c_out = s t / sqrt((s t)^2 + sigma_data^2)
    denoised = c_out x0 + c_skip x                            (the consistency function's boundary condition)
    x'       = sqrt(a_t') denoised + sqrt(1 - a_t') z,  z ~ N(0, I) fresh    (every step but the last)
The last step returns ``denoised``. txt2img starts from x_T ~ N(0, I); img2img from
sqrt(a_t0) x_init + sqrt(1 - a_t0) z0 at the first timestep t0.

Guidance w (``unconditional_guidance_scale``): w <= 1 makes one conditional UNet call per step (no
unconditional batch: LCM-LoRA runs at w = 1); w > 1 guides as usual, out_u + w (out_c - out_u).
A UNet with a guidance embedding (``time_cond_proj_dim``, LCM-distilled) takes w as an input
instead (``apply_model(..., guidance_scale=w)``) and always makes one call with no unconditional batch.
"""
import logging

import numpy as np
import torch

from ldm.models.diffusion.few_step import (
    check_strength,
    conditional_output,
    run_steps,
    step_noise_source,
    unsupported_options,
)
from ldm.models.diffusion.sampling import output_to_x0, randn, weight_dtype

logger = logging.getLogger(__name__)


def lcm_timesteps(num_steps, strength=1.0, original_steps=50, num_train_timesteps=1000) -> np.ndarray:
    """The (S,) int64 timesteps, descending, of ``num_steps`` LCM steps at img2img ``strength``
    (see the module doc). Raises ValueError for the combinations diffusers' LCMScheduler refuses
    (fewer grid points than steps, more steps than ``original_steps``) and for S < 1 or a
    strength outside (0, 1]."""
    strength = check_strength(strength)
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f"{num_steps} LCM steps: use 1 to {original_steps} (4 is typical)")
    if original_steps > num_train_timesteps:
        raise ValueError(f"original_inference_steps {original_steps} exceeds the {num_train_timesteps} "
                         f"training timesteps")
    if num_steps > num_train_timesteps:
        raise ValueError(f"{num_steps} LCM steps exceed the model's {num_train_timesteps} timesteps")
    k = num_train_timesteps // original_steps
    origin = np.arange(1, int(original_steps * strength) + 1) * k - 1
    if len(origin) // num_steps < 1:
        raise ValueError(f"{num_steps} LCM steps at strength {strength} are more than the "
                         f"{len(origin)} timesteps left of the {original_steps}-step grid: use at most "
                         f"{len(origin)} steps, or a strength of at least {num_steps / original_steps:g}")
    if num_steps > original_steps:
        raise ValueError(f"{num_steps} LCM steps: use at most original_inference_steps = {original_steps}")
    origin = origin[::-1]
    indices = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return origin[indices].astype(np.int64)


def boundary_scalings(timestep, timestep_scaling=10.0, sigma_data=0.5) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency function at ``timestep`` (see the module doc)."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def noised_to(alphas_cumprod, x0, timestep, noise):
    """x0 (B, C, H, W) at the noise level of ``timestep``: sqrt(a_t) x0 + sqrt(1 - a_t) noise, in x0's dtype."""
    a = float(alphas_cumprod[timestep])
    return (a**0.5 * x0 + (1.0 - a) ** 0.5 * noise.to(x0)).to(x0.dtype)


class LCMSampler:
    """LCM sampling of a ``LatentDiffusion`` model: ``timesteps``, ``sample`` (txt2img), ``img2img``.

    model: what the samplers use of LatentDiffusion (``alphas_cumprod``, ``num_timesteps``,
    ``parameterization``, ``apply_model``; ``guidance_embedding_dim`` when present).
    """

    name = "LCM"

    def __init__(self, model, original_inference_steps=50, timestep_scaling=10.0, sigma_data=0.5):
        self.model = model
        self.original_inference_steps = int(original_inference_steps)
        self.timestep_scaling = float(timestep_scaling)
        self.sigma_data = float(sigma_data)

    def timesteps(self, S, strength=1.0) -> np.ndarray:
        """The (S,) int64 timesteps, descending, that ``S`` steps at ``strength`` visit (``lcm_timesteps``)."""
        return lcm_timesteps(S, strength, self.original_inference_steps, int(self.model.num_timesteps))

    # -- the loop

    def _output(self, x, t, cond, scale, uncond):
        if getattr(self.model, "guidance_embedding_dim", None) is not None:
            if uncond is not None and scale > 1:
                logger.debug("LCM: the UNet embeds the guidance scale; no unconditional batch")
            return self.model.apply_model(x, t, cond, guidance_scale=scale)
        return conditional_output(self.model, x, t, cond, scale, uncond)

    def _run(self, x, timesteps, cond, scale, uncond, noise, generator, desc, verbose=True, intermediates=None,
             **hooks):
        """``len(timesteps)`` LCM steps from x (B, C, H, W) at timesteps[0]; returns the last denoised."""
        timesteps = [int(t) for t in timesteps]
        noise_for = step_noise_source(noise, len(timesteps) - 1, generator)
        alphas = self.model.alphas_cumprod.detach().cpu().float()  # the coefficients as host numbers

        def step(i, x, t):
            out = self._output(x, t, cond, scale, uncond)
            c_skip, c_out = boundary_scalings(timesteps[i], self.timestep_scaling, self.sigma_data)
            denoised = c_out * output_to_x0(self.model, x, t, out) + c_skip * x
            if i == len(timesteps) - 1:
                return denoised, denoised
            a_next = float(alphas[timesteps[i + 1]])
            return a_next**0.5 * denoised + (1.0 - a_next) ** 0.5 * noise_for(i, denoised), denoised

        return run_steps(step, x, timesteps, desc=desc, verbose=verbose, intermediates=intermediates, **hooks)

    # -- txt2img

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, img_callback=None, verbose=True,
               x_T=None, unconditional_guidance_scale=1.0, unconditional_conditioning=None, *, noise=None,
               generator=None, before_step=None, **kwargs):
        """``S`` LCM steps from noise to a latent of shape (batch_size, *shape).

        conditioning: (B, 77, D); x_T: the start noise (default: drawn with ``generator``);
        noise: S - 1 tensors (B, *shape), the fresh noise of each step but the last (default: drawn
        with ``generator``); unconditional_guidance_scale: w (module doc); callback(i),
        img_callback(denoised, i), before_step(x, t) -> x: per-step hooks as for DDIM.
        Returns (samples (B, C, H, W), {'x_inter': [...], 'pred_x0': [...]}), the lists holding
        x_T and every step's latent and denoised latent.
        """
        unsupported_options(self.name, kwargs)
        timesteps = self.timesteps(S)
        size = (batch_size, *shape)
        x = randn(size, self.model.alphas_cumprod.device, weight_dtype(self.model), generator) if x_T is None else x_T
        intermediates = {"x_inter": [x], "pred_x0": [x]}
        samples = self._run(x, timesteps, conditioning, unconditional_guidance_scale, unconditional_conditioning,
                            noise, generator, "LCM Sampler", verbose, intermediates, callback=callback,
                            img_callback=img_callback, before_step=before_step)
        return samples, intermediates

    # -- img2img

    @torch.no_grad()
    def img2img(self, init_latent, conditioning, S, strength, init_noise=None, noise=None,
                unconditional_guidance_scale=1.0, unconditional_conditioning=None, *, generator=None,
                callback=None, img_callback=None, before_step=None, verbose=True):
        """The init latent (B, C, H, W) noised to the first of ``timesteps(S, strength)`` and
        denoised in those S steps (S of the strength-cut grid, not int(S * strength)).

        init_noise: (B, C, H, W) noise of that encoding, noise: S - 1 tensors for the steps (both
        drawn with ``generator`` when not given). Returns the latent (B, C, H, W).
        """
        timesteps = self.timesteps(S, strength)
        if init_noise is None:
            init_noise = randn(init_latent.shape, init_latent.device, init_latent.dtype, generator)
        x = noised_to(self.model.alphas_cumprod, init_latent, int(timesteps[0]), init_noise)
        return self._run(x, timesteps, conditioning, unconditional_guidance_scale,
                         unconditional_conditioning, noise, generator, "LCM img2img", verbose, callback=callback,
                         img_callback=img_callback, before_step=before_step)
