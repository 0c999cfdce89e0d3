"""Helpers shared by the diffusion model, the UNet and the samplers (CompVis names and semantics)."""
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2):
    """The per-step noise variances of the forward diffusion process.

    Only the "linear" schedule of Stable Diffusion exists: betas evenly spaced in sqrt-space,
    `linspace(sqrt(start), sqrt(end), n) ** 2`, computed in float64.
    Returns a float64 numpy array of shape (n_timestep,).
    """
    if schedule != "linear":
        raise ValueError(f"beta_schedule {schedule!r} is not supported; Stable Diffusion v1 uses 'linear'")
    # on the CPU whatever the default device (e.g. "meta"): the result goes to numpy
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
    return betas.numpy()


def make_ddim_timesteps(ddim_discr_method, num_ddim_timesteps, num_ddpm_timesteps, verbose=True):
    """The S DDPM timesteps a DDIM sampler visits, in ascending order (an int numpy array).

    "uniform" takes every (T // S)-th step starting at 0, then adds 1, as CompVis does (so the
    steps are 1, 1 + T//S, ...). When S does not divide T, CompVis's range held more than S
    steps (and for some S a step past T, which crashed); here it is cut to the S asked for.
    "quad" spaces the steps quadratically over the first 80% of T, as CompVis does.
    """
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"{num_ddim_timesteps} DDIM steps: use 1 to {num_ddpm_timesteps}")
    if ddim_discr_method == "uniform":
        stride = num_ddpm_timesteps // num_ddim_timesteps
        steps = np.arange(0, num_ddpm_timesteps, stride)[:num_ddim_timesteps]
    elif ddim_discr_method == "quad":
        steps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(int)
    else:
        raise ValueError(f"ddim_discretize {ddim_discr_method!r} is not supported; use 'uniform' or 'quad'")
    ddim_timesteps = steps + 1
    if verbose:
        logger.info("DDIM timesteps: %s", ddim_timesteps)
    return ddim_timesteps


def make_ddim_sampling_parameters(alphacums, ddim_timesteps, eta, verbose=True):
    """The DDIM schedule for a subset of timesteps.

    alphacums: (T,) cumulative alpha products (numpy array or tensor); ddim_timesteps: (S,) int array.
    Returns (sigmas, alphas, alphas_prev), each (S,) numpy: the noise scale of each step
    (eta * the DDPM posterior std), alpha-bar at each step and at the step before it
    (alpha-bar at index 0 for the first step).
    """
    if isinstance(alphacums, torch.Tensor):
        alphacums = alphacums.detach().cpu().numpy()
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    if verbose:
        logger.info("DDIM alphas: %s; alphas_prev: %s; sigmas (eta=%s): %s", alphas, alphas_prev, eta, sigmas)
    return sigmas, alphas, alphas_prev


def extract_into_tensor(a, t, x_shape):
    """Picks `a[t]` per batch item and shapes it to broadcast against x.

    a: (T,) schedule; t: (B,) int64 timesteps; x_shape: the shape (B, ...) to broadcast to.
    Returns (B, 1, ..., 1) with len(x_shape) dimensions.
    """
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal timestep embeddings, [cos | sin] as in CompVis/OpenAI.

    timesteps: (B,) timesteps (may be fractional); dim: embedding width.
    Returns (B, dim) float32; frequencies run from 1 down to 1/max_period.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def guidance_scale_embedding(offset, dim):
    """Sinusoidal embedding of the classifier-free guidance scale w, the input of the guidance
    projection of LCM-distilled UNets (diffusers' ``get_guidance_scale_embedding``).

    offset: (B,) w - 1 (0 = no guidance; the UNet subtracts the 1); dim: embedding width.
    With s = 1000 offset and f_k = 10000 ** (-k / (dim/2 - 1)), k = 0 .. dim/2 - 1:
    embedding = [sin(s f_k) | cos(s f_k)] (sin first, unlike ``timestep_embedding``), a zero column
    appended for odd dim. Returns (B, dim) float32 on offset's device.
    """
    half = dim // 2
    if half < 2:
        raise ValueError(f"a guidance embedding of width {dim} is too narrow: use 4 or more")
    # float32 operations in diffusers' order: the arguments reach thousands of radians
    step = torch.log(torch.tensor(10000.0, device=offset.device)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=offset.device) * -step)
    args = (offset.float() * 1000.0)[:, None] * freqs[None]
    embedding = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module):
    """Zeroes all parameters of `module` in place (so a residual branch starts as identity); returns it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and returns the input's dtype (stable in float16)."""

    def forward(self, x):
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


def normalization(channels):
    """The UNet's normalization layer: 32-group GroupNorm (eps 1e-5) over `channels`."""
    return GroupNorm32(32, channels)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def conv_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D convolution module (torch.nn.ConvNd arguments)."""
    return _CONV[dims](*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D average-pooling module (torch.nn.AvgPoolNd arguments)."""
    return _AVG_POOL[dims](*args, **kwargs)


def linear(*args, **kwargs):
    """A linear layer (torch.nn.Linear arguments)."""
    return nn.Linear(*args, **kwargs)
