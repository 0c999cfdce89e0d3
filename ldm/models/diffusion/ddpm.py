"""Stable Diffusion's latent diffusion model (inference side of CompVis's LatentDiffusion).

The module tree matches CompVis checkpoints: `model.diffusion_model.*` (the UNet),
`first_stage_model.*` (the autoencoder), `cond_stage_model.*` (the text encoder),
`model_ema.*` (EMA weights, only with use_ema) and the noise-schedule buffers.
Sampling lives in the samplers (`ldm.models.diffusion.ddim`, `.plms`).
"""
import logging
from contextlib import contextmanager

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` and feeds it the cross-attention conditioning."""

    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        if conditioning_key != "crossattn":
            raise ValueError(f"conditioning_key {conditioning_key!r} is not supported; SD v1 uses 'crossattn'")
        self.conditioning_key = conditioning_key
        self.diffusion_model = instantiate_from_config(diff_model_config)

    def forward(self, x, t, c_crossattn, guidance_scale=None):
        """x: (B, C, h, w); t: (B,); c_crossattn: list of (B, M_i, D), joined along M;
        guidance_scale: for UNets that embed it (``UNetModel.time_cond_proj_dim``). Returns (B, C, h, w)."""
        extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1), **extra)


def _frozen(module):
    """`module` in eval mode with gradients off (the pretrained stages are never trained here)."""
    module.eval()
    for param in module.parameters():
        param.requires_grad = False
    return module


class LatentDiffusion(pl.LightningModule):
    """Text-conditioned denoising diffusion in the latent space of an autoencoder.

    unet_config, first_stage_config, cond_stage_config: `target`/`params` configs of the UNet,
    the AutoencoderKL and the text encoder. timesteps, beta_schedule, linear_start, linear_end:
    the DDPM noise schedule. scale_factor: latents are multiplied by it after encoding (0.18215
    for SD v1); with scale_by_std it is a buffer (`scale_factor` in the state dict) as upstream.
    use_ema: keep EMA weights in `model_ema` (swapped in by `ema_scope`).
    parameterization: what the UNet predicts, "eps" (the noise) or "v" (SD 2.x 768-v models);
    the samplers convert v to eps (``predict_eps_from_z_and_v``).
    The other arguments are CompVis training settings: they are recorded as attributes, and the
    keys only training reads (monitor, scheduler_config, loss_type, ignore_keys, ...) are ignored.
    """

    def __init__(
        self,
        unet_config,
        first_stage_config,
        cond_stage_config,
        timesteps=1000,
        beta_schedule="linear",
        linear_start=1e-4,
        linear_end=2e-2,
        num_timesteps_cond=None,
        log_every_t=100,
        first_stage_key="image",
        cond_stage_key="image",
        image_size=256,
        channels=3,
        cond_stage_trainable=False,
        conditioning_key="crossattn",
        scale_factor=1.0,
        scale_by_std=False,
        use_ema=True,
        parameterization="eps",
        ckpt_path=None,
        **ignored,
    ):
        super().__init__()
        if parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization {parameterization!r} is not supported: use 'eps' (SD v1, SD 2.x "
                             f"512) or 'v' (SD 2.x 768-v)")
        if ckpt_path is not None:
            raise ValueError(
                f"ckpt_path={ckpt_path!r} in the model config is not supported; "
                "load weights with ldm.util.load_model_from_config"
            )
        num_timesteps_cond = 1 if num_timesteps_cond is None else num_timesteps_cond
        if not 1 <= num_timesteps_cond <= timesteps:
            raise ValueError(f"num_timesteps_cond {num_timesteps_cond} must be between 1 and timesteps {timesteps}")
        if ignored:
            logger.debug("LatentDiffusion ignores the training settings %s", sorted(ignored))
        self.parameterization = parameterization
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.cond_stage_key = cond_stage_key
        self.image_size = image_size
        self.channels = channels
        self.cond_stage_trainable = cond_stage_trainable

        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
        self.register_schedule(beta_schedule, timesteps, linear_start, linear_end)

        self.scale_by_std = scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        self.first_stage_model = _frozen(instantiate_from_config(first_stage_config))
        cond_stage_model = instantiate_from_config(cond_stage_config)
        if cond_stage_model is None:
            raise ValueError("cond_stage_config must build a text encoder; unconditional models are not supported")
        self.cond_stage_model = _frozen(cond_stage_model)

    def register_schedule(self, beta_schedule="linear", timesteps=1000, linear_start=1e-4, linear_end=2e-2):
        """Registers the float32 noise-schedule buffers, each (timesteps,), under CompVis's names.

        alphas_cumprod[t] is alpha-bar_t = prod_{s<=t} (1 - beta_s); the posterior_* buffers are
        the mean coefficients and variance of q(x_{t-1} | x_t, x_0). Computed in float64.
        """
        self.num_timesteps = int(timesteps)
        self.beta_schedule = beta_schedule
        self.linear_start = linear_start
        self.linear_end = linear_end
        for name, values in self.computed_buffers().items():
            self.register_buffer(name, values)

    def computed_buffers(self) -> dict:
        """The noise-schedule buffers, float32 (num_timesteps,) CPU tensors by name, computed in
        float64 from the schedule settings (``ldm.util.fill_computed_buffers`` reads them too)."""
        betas = make_beta_schedule(self.beta_schedule, self.num_timesteps, linear_start=self.linear_start,
                                   linear_end=self.linear_end)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        schedule = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            # the variance is 0 at t = 0, hence the clipping before the log
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        return {name: torch.tensor(values, dtype=torch.float32, device="cpu") for name, values in schedule.items()}

    @contextmanager
    def ema_scope(self, context=None):
        """Within the block the UNet runs on its EMA weights (when use_ema); `context` names the caller in logs."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    logger.info("%s: restored training weights", context)

    def get_learned_conditioning(self, c):
        """c: list of B prompts -> (B, 77, D) text conditioning (D = 768 for SD v1, 1024 for SD 2.x)."""
        return self.cond_stage_model.encode(c)

    @property
    def guidance_embedding_dim(self):
        """The width of the UNet's guidance-scale embedding (256 for LCM-distilled UNets, which
        take the guidance scale as an input: ``apply_model(..., guidance_scale=w)``), or None."""
        return getattr(self.model.diffusion_model, "time_cond_proj_dim", None)

    def apply_model(self, x_noisy, t, cond, guidance_scale=None):
        """The UNet's output: the noise prediction, or v for ``parameterization`` "v".

        x_noisy: (B, C, h, w) latents; t: (B,) int64 timesteps; cond: a (B, M, D) tensor, a list
        of them, or a dict {"c_crossattn": [tensor, ...]}; guidance_scale: w (a number or (B,)),
        only for UNets with a guidance embedding (``guidance_embedding_dim``). Returns (B, C, h, w).
        """
        if not isinstance(cond, dict):
            cond = {"c_crossattn": cond if isinstance(cond, list) else [cond]}
        if guidance_scale is not None:
            cond = {**cond, "guidance_scale": guidance_scale}
        return self.model(x_noisy, t, **cond)

    def q_sample(self, x_start, t, noise=None):
        """x_t drawn from q(x_t | x_0): sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) noise.

        x_start: (B, C, h, w); t: (B,) int64; noise: like x_start (standard normal if None).
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def predict_start_from_z_and_v(self, x_t, t, v):
        """x_0 from a v-prediction: sqrt(alpha-bar_t) x_t - sqrt(1 - alpha-bar_t) v.

        x_t, v: (B, C, h, w); t: (B,) int64. Returns (B, C, h, w)."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def predict_eps_from_z_and_v(self, x_t, t, v):
        """The noise from a v-prediction: sqrt(alpha-bar_t) v + sqrt(1 - alpha-bar_t) x_t.

        x_t, v: (B, C, h, w); t: (B,) int64. Returns (B, C, h, w)."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    def encode_first_stage(self, x):
        """x: (B, 3, H, W) image in [-1, 1] -> DiagonalGaussianDistribution over unscaled (B, 4, H/8, W/8)."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior, generator=None):
        """Scaled diffusion latent: a sample of the posterior (drawn with `generator`), or a given
        (B, 4, h, w) latent tensor, times scale_factor."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"expected a DiagonalGaussianDistribution or a tensor, got {type(encoder_posterior)}")
        return self.scale_factor * z

    def decode_first_stage(self, z):
        """z: (B, 4, h, w) scaled latent -> (B, 3, 8h, 8w) image, nominally in [-1, 1] (not clamped)."""
        return self.first_stage_model.decode((1.0 / self.scale_factor) * z)
