"""What the few-step samplers (``lcm.LCMSampler``, ``euler_ancestral.EulerAncestralSampler``) share.

* ``conditional_output``: the model's output under the guidance rule of diffusers' pipelines:
  classifier-free guidance only for a scale above 1 (SD-Turbo runs at 0, LCM-LoRA at 1, both
  with one conditional UNet call per step and no unconditional batch);
* ``step_noise_source``: the fresh noise of each step, given (a list, so that runs compare exactly
  with another implementation) or drawn from a generator;
* ``run_steps``: the loop around a sampler's step, with the hooks of the DDIM/PLMS samplers
  (``before_step``, ``callback``, ``img_callback``) and a progress bar;
* ``check_strength``, ``unsupported_options``: argument checks with one-line messages.
"""
import logging

import torch
from tqdm import tqdm

from ldm.models.diffusion.sampling import guided_eps, randn

logger = logging.getLogger(__name__)


def conditional_output(model, x, t, cond, scale=1.0, uncond=None):
    """The model's output (B, C, H, W) (eps, or v for v-models) for x (B, C, H, W) at t (B,).

    scale > 1 with ``uncond``: out_u + scale (out_c - out_u) from one call on the batch [x; x]
    (``guided_eps``); otherwise (scale 0 or 1, as SD-Turbo and LCM-LoRA are run, or no uncond)
    one conditional call on the batch B, as diffusers' pipelines guide only above 1.
    """
    if scale > 1 and uncond is not None:
        return guided_eps(model, x, t, cond, scale, uncond)
    return model.apply_model(x, t, cond)


def step_noise_source(noise, count, generator=None):
    """``noise_for(i, x)``: the standard normal noise (like x) that noisy step i (0 .. count - 1) adds.

    noise: None (drawn with ``generator``, or torch's global generator without one, in x's dtype
    on the generator's device, as diffusers' ``randn_tensor`` draws), or exactly ``count``
    tensors of x's shape, used as they are (cast to x's device and dtype).
    """
    if noise is None:
        return lambda i, x: randn(x.shape, x.device, x.dtype, generator)
    noise = list(noise)
    if len(noise) != count:
        raise ValueError(f"{len(noise)} noise tensors given for {count} noisy steps: give one per step but the "
                         f"last ({count}), or none to draw them")

    def noise_for(i, x):
        if tuple(noise[i].shape) != tuple(x.shape):
            raise ValueError(f"noise tensor {i} has shape {tuple(noise[i].shape)}, the latent {tuple(x.shape)}")
        return noise[i].to(device=x.device, dtype=x.dtype)

    return noise_for


def run_steps(step, x, timesteps, *, desc, verbose=True, before_step=None, callback=None, img_callback=None,
              intermediates=None):
    """x after ``step(i, x, t) -> (x, pred_x0)`` for i, timestep in enumerate(timesteps).

    x: (B, C, H, W); timesteps: ints, descending; t is the (B,) int64 batch of the timestep.
    before_step(x, t) -> x runs first in each step; then callback(i), img_callback(pred_x0, i);
    intermediates: a dict of lists "x_inter", "pred_x0" that every step appends to.
    """
    for i, timestep in enumerate(tqdm(timesteps, desc=desc, disable=not verbose)):
        t = torch.full((x.shape[0],), int(timestep), device=x.device, dtype=torch.long)
        if before_step is not None:
            x = before_step(x, t)
        x, pred_x0 = step(i, x, t)
        if callback is not None:
            callback(i)
        if img_callback is not None:
            img_callback(pred_x0, i)
        if intermediates is not None:
            intermediates["x_inter"].append(x)
            intermediates["pred_x0"].append(pred_x0)
    return x


def check_strength(strength):
    """img2img strength must lie in (0, 1]; returns it as a float."""
    strength = float(strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength {strength}: use a value in (0, 1] (1 redraws the picture, small values keep "
                         f"it)")
    return strength


# DDIM/PLMS sample() options that change the result and that the few-step samplers cannot honour
_UNSUPPORTED = ("mask", "x0", "score_corrector", "quantize_x0")


def unsupported_options(name, options):
    """Raises ValueError for DDIM/PLMS ``sample`` options the sampler ``name`` would silently drop
    (inpainting masks, score correctors); logs the neutral rest (eta, log_every_t...) at debug level."""
    used = [key for key in _UNSUPPORTED if options.get(key) is not None and options.get(key) is not False]
    if used:
        raise ValueError(f"the {name} sampler does not support {', '.join(used)}: use the DDIM sampler for them")
    ignored = sorted(key for key in options if key not in _UNSUPPORTED)
    if ignored:
        logger.debug("%s.sample ignores %s", name, ignored)
