"""Euler ancestral sampling (Karras et al. 2022, k-diffusion's ``sample_euler_ancestral``) over the
model's sigmas with "trailing" timestep spacing: diffusers' ``EulerAncestralDiscreteScheduler(
timestep_spacing="trailing")``, the scheduler of SD-Turbo (1 to 4 steps, guidance 0).

Sigmas of the DDPM schedule: sigma_t = sqrt((1 - a_t) / a_t) (a_t: alpha-bar). The latent x here
is the DDPM latent divided by sqrt(a_t), so x = x0 + sigma_t eps.

Timesteps of S steps ("trailing": the last step ends at the cleanest training step):
    timesteps[j] = round(T - j T / S) - 1,  j = 0 .. S-1  (numpy's float range, rounded half to even);  T = 1000
    sigmas = [sigma_{timesteps[0]}, ..., sigma_{timesteps[S-1]}, 0]
img2img at strength r runs the last n = int(S r) of them (n >= 1), from x = x_init + sigma z0.

One step from sigma to sigma' (model output out, for the input x / sqrt(sigma^2 + 1), the DDPM latent):
    eps      = out                                                      eps models
             = sqrt(a_t) out + sqrt(1 - a_t) x / sqrt(sigma^2 + 1)      v models (``output_to_eps``)
    x0       = x - sigma eps
    sigma_up = sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2),   sigma_down = sqrt(sigma'^2 - sigma_up^2)
    x'       = x + eps (sigma_down - sigma) + sigma_up z,   z ~ N(0, I) fresh (every step but the last,
                                                            where sigma' = 0 and sigma_up = 0)
txt2img starts from sigma_max x_T, x_T ~ N(0, I).

Guidance w (``unconditional_guidance_scale``): w <= 1 (SD-Turbo: 0) makes one conditional UNet
call per step with no unconditional batch; w > 1 guides as usual, out_u + w (out_c - out_u).
"""
import numpy as np
import torch

from ldm.models.diffusion.few_step import (
    check_strength,
    conditional_output,
    run_steps,
    step_noise_source,
    unsupported_options,
)
from ldm.models.diffusion.sampling import output_to_eps, randn, weight_dtype


def trailing_timesteps(num_steps, num_train_timesteps=1000) -> np.ndarray:
    """The (S,) int64 timesteps, descending, of S steps with trailing spacing (module doc)."""
    num_steps = int(num_steps)
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"{num_steps} Euler ancestral steps: use 1 to {num_train_timesteps} (1 to 4 for SD-Turbo)")
    # diffusers' float range, numpy's rounding of it included; cut to S (for some S it runs one over)
    timesteps = np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)[:num_steps]
    return (np.round(timesteps) - 1).astype(np.int64)


class EulerAncestralSampler:
    """Euler ancestral sampling of a ``LatentDiffusion`` model: ``schedule``, ``sample`` (txt2img), ``img2img``.

    model: what the samplers use of LatentDiffusion (``alphas_cumprod``, ``num_timesteps``,
    ``parameterization``, ``apply_model``).
    """

    name = "Euler ancestral"

    def __init__(self, model):
        self.model = model

    def schedule(self, S, strength=1.0) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps (n,) int64 descending, sigmas (n + 1,) float64 ending in 0) of the n steps that
        ``S`` steps at img2img ``strength`` run: n = int(S * strength), the last n of S.
        Raises ValueError when n < 1."""
        strength = check_strength(strength)
        alphas = self.model.alphas_cumprod.detach().cpu().double().numpy()
        timesteps = trailing_timesteps(S, len(alphas))
        count = min(int(int(S) * strength), int(S))
        if count < 1:
            raise ValueError(f"img2img with {S} steps at strength {strength} runs int({S} x {strength}) = 0 steps: "
                             f"raise the steps to at least {int(np.ceil(1 / strength))} or the strength to "
                             f"{1 / int(S):g}")
        timesteps = timesteps[len(timesteps) - count:]
        sigmas = np.sqrt((1.0 - alphas[timesteps]) / alphas[timesteps])
        return timesteps, np.append(sigmas, 0.0)

    def timesteps(self, S, strength=1.0) -> np.ndarray:
        """The timesteps ``S`` steps at ``strength`` visit (see ``schedule``)."""
        return self.schedule(S, strength)[0]

    def _run(self, x, timesteps, sigmas, cond, scale, uncond, noise, generator, desc, verbose=True,
             intermediates=None, **hooks):
        """The Euler ancestral steps from x (B, C, H, W) at sigmas[0]; returns the final x."""
        sigmas = [float(s) for s in sigmas]
        noise_for = step_noise_source(noise, len(timesteps) - 1, generator)

        def step(i, x, t):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            x_in = x / (sigma**2 + 1.0) ** 0.5  # the DDPM latent at t, what the UNet was trained on
            eps = output_to_eps(self.model, x_in, t, conditional_output(self.model, x_in, t, cond, scale, uncond))
            pred_x0 = x - sigma * eps
            sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
            sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
            x = x + eps * (sigma_down - sigma)
            if sigma_up > 0:
                x = x + sigma_up * noise_for(i, x)
            return x, pred_x0

        return run_steps(step, x, timesteps, desc=desc, verbose=verbose, intermediates=intermediates, **hooks)

    # -- txt2img

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, img_callback=None, verbose=True,
               x_T=None, unconditional_guidance_scale=1.0, unconditional_conditioning=None, *, noise=None,
               generator=None, before_step=None, **kwargs):
        """``S`` steps from noise to a latent of shape (batch_size, *shape).

        conditioning: (B, 77, D); x_T: standard normal start noise (default: drawn with
        ``generator``), scaled here by sigma_max; noise: S - 1 tensors (B, *shape), the fresh noise
        of each step but the last (default: drawn with ``generator``); unconditional_guidance_scale:
        w (module doc); callback(i), img_callback(pred_x0, i), before_step(x, t) -> x: per-step
        hooks as for DDIM (x is the sigma-scaled latent here).
        Returns (samples (B, C, H, W), {'x_inter': [...], 'pred_x0': [...]}), the lists holding
        the start and every step's latent and x0 prediction.
        """
        unsupported_options(self.name, kwargs)
        timesteps, sigmas = self.schedule(S)
        size = (batch_size, *shape)
        x_T = randn(size, self.model.alphas_cumprod.device, weight_dtype(self.model), generator) if x_T is None else x_T
        x = x_T * float(sigmas[0])
        intermediates = {"x_inter": [x], "pred_x0": [x]}
        samples = self._run(x, timesteps, sigmas, conditioning, unconditional_guidance_scale,
                            unconditional_conditioning, noise, generator, "Euler ancestral", verbose, intermediates,
                            callback=callback, img_callback=img_callback, before_step=before_step)
        return samples, intermediates

    # -- img2img

    @torch.no_grad()
    def img2img(self, init_latent, conditioning, S, strength, init_noise=None, noise=None,
                unconditional_guidance_scale=1.0, unconditional_conditioning=None, *, generator=None,
                callback=None, img_callback=None, before_step=None, verbose=True):
        """The init latent (B, C, H, W) noised to the first sigma of ``schedule(S, strength)``
        (x_init + sigma init_noise) and denoised in the int(S * strength) steps left.

        init_noise: (B, C, H, W), noise: int(S * strength) - 1 tensors for the steps (both drawn
        with ``generator`` when not given). Returns the latent (B, C, H, W).
        """
        timesteps, sigmas = self.schedule(S, strength)
        if init_noise is None:
            init_noise = randn(init_latent.shape, init_latent.device, init_latent.dtype, generator)
        x = init_latent + float(sigmas[0]) * init_noise.to(init_latent)
        return self._run(x, timesteps, sigmas, conditioning, unconditional_guidance_scale, unconditional_conditioning,
                         noise, generator, "Euler ancestral img2img", verbose, callback=callback,
                         img_callback=img_callback, before_step=before_step)
