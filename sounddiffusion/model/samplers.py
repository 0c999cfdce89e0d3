"""What each sampler runs, told without the model: the checks the command lines make before the
model loads, and the steps a video's schedule CSV reports.

Samplers (``--sampler``, :data:`sounddiffusion.settings.SAMPLERS`); S = ``--ddim_steps``, r = the
img2img strength:

* ``ddim``, ``plms`` (CompVis): img2img runs n = int(S r) of the S steps (n = 0 keeps the picture;
  n = S is txt2img). PLMS evaluates the UNet twice in its first step. Guidance: one UNet call on
  the batch [uncond; cond] per step unless the scale is exactly 1.
* ``lcm`` (:class:`ldm.models.diffusion.lcm.LCMSampler`): img2img runs all S steps, spread over
  the part of the 50-step distillation grid at or below r (diffusers' strength rule), so it
  needs int(50 r) >= S; at most 50 steps. Guidance: one conditional call per step at scale <= 1
  (LCM-LoRA: 1) or with a UNet that embeds the scale; above 1 the batch of 2.
* ``euler_a`` (:class:`ldm.models.diffusion.euler_ancestral.EulerAncestralSampler`): trailing
  spacing; img2img runs the last n = int(S r) steps and needs n >= 1. Guidance: one conditional
  call per step at scale <= 1 (SD-Turbo: 0), above 1 the batch of 2.

For every sampler, strength 0 keeps the picture (no step runs) and strength 1 is txt2img from
the frame's noise. DDIM's ``--ddim_eta`` is DDIM's own: the others refuse eta > 0.
"""
from __future__ import annotations

import numpy as np

from ldm.models.diffusion.euler_ancestral import trailing_timesteps
from ldm.models.diffusion.lcm import lcm_timesteps
from ldm.modules.diffusionmodules.util import make_ddim_timesteps

from sounddiffusion.errors import ParameterError

FEW_STEP = ("lcm", "euler_a")
"""The samplers that take a whole picture in 1 to 8 steps (their own classes, not DDIM's loop)."""
TRAINING_TIMESTEPS = 1000  # of every SD v1.x / 2.x model
LCM_GRID = 50  # LCMSampler's original_inference_steps
NAMES = {"ddim": "DDIM", "plms": "PLMS", "lcm": "LCM", "euler_a": "Euler ancestral"}


def check_sampling(sampler: str, steps: int, eta: float, to_ddim: str = "use --sampler ddim") -> None:
    """Raises ParameterError (one line) for steps or eta that ``sampler`` cannot run. ``to_ddim``:
    how this command switches to DDIM ("leave out --plms", "add --ddim"), for the advice."""
    if eta > 0 and sampler == "plms":
        raise ParameterError(f"--ddim_eta {eta:g}: PLMS is deterministic and needs eta 0; {to_ddim} to sample "
                             f"with DDIM for eta > 0")
    if eta > 0 and sampler != "ddim":
        raise ParameterError(f"--ddim_eta {eta:g}: {NAMES[sampler]} adds its own noise at every step and takes no "
                             f"eta; leave out --ddim_eta, or {to_ddim} to sample with DDIM for eta > 0")
    if sampler == "lcm" and steps > LCM_GRID:
        raise ParameterError(f"--ddim_steps {steps}: LCM runs at most {LCM_GRID} steps (its distillation grid); "
                             f"use 2 to 8 (4 is typical)")


def img2img_kind(sampler: str, steps: int, strength: float) -> str:
    """What img2img at ``strength`` does, the one rule the Engine and the reports follow:
    "txt2img" (strength >= 1, or DDIM/PLMS with int(S r) = S: sampled from the frame's noise),
    "keep" (no step runs: strength <= 0, or DDIM/PLMS with int(S r) = 0) or "img2img"."""
    if strength >= 1 or (sampler not in FEW_STEP and int(strength * steps) >= steps):
        return "txt2img"
    if strength <= 0 or (sampler not in FEW_STEP and int(strength * steps) == 0):
        return "keep"
    return "img2img"


def img2img_step_count(sampler: str, steps: int, strength: float) -> int:
    """How many sampler steps img2img at ``strength`` runs (:func:`img2img_kind`): txt2img's
    ``steps``, 0 to keep the picture, else S for LCM and int(S r) for the others."""
    kind = img2img_kind(sampler, steps, strength)
    if kind != "img2img":
        return steps if kind == "txt2img" else 0
    return steps if sampler == "lcm" else int(strength * steps)


def check_strength(sampler: str, steps: int, strength: float, where: str = "") -> None:
    """Raises ParameterError when img2img at ``strength`` cannot run with ``sampler`` and
    ``steps`` (LCM: int(50 r) < S; Euler ancestral: int(S r) = 0). ``where``: what the
    message adds after the strength (", frame 12 at 1.00 s")."""
    if sampler not in FEW_STEP or img2img_kind(sampler, steps, strength) != "img2img":
        return
    if sampler == "lcm" and int(LCM_GRID * strength) < steps:
        least = steps / LCM_GRID
        raise ParameterError(f"--strength {strength:g}{where}: LCM with {steps} steps needs a strength of at least "
                             f"{least:g} (its steps lie on the {int(LCM_GRID * strength)} grid points of "
                             f"50 below the strength); raise it, use fewer --ddim_steps, or strength 0 to keep the "
                             f"picture")
    if sampler == "euler_a" and int(steps * strength) < 1:
        raise ParameterError(f"--strength {strength:g}{where}: Euler ancestral img2img runs int({steps} x "
                             f"{strength:g}) = 0 of the {steps} steps; use a strength of at least {1 / steps:g}, "
                             f"at least {int(np.ceil(1 / strength))} --ddim_steps, or strength 0 to keep the picture")


def check_strengths(sampler: str, steps: int, frames: np.ndarray, strengths: np.ndarray, times: np.ndarray) -> None:
    """:func:`check_strength` for img2img frames ``frames`` (indices, (n,)) at ``strengths``
    (n,) and ``times`` (n,) seconds: the message names the earliest frame that cannot run."""
    failing = []
    for value in np.unique(strengths):
        try:
            check_strength(sampler, steps, float(value))
        except ParameterError:
            failing.append(value)
    if failing:
        first = int(np.flatnonzero(np.isin(strengths, failing))[0])
        check_strength(sampler, steps, float(strengths[first]),
                       where=f" (scheduled: frame {int(frames[first])} at {float(times[first]):.2f} s)")


def timesteps_run(sampler: str, steps: int, strength: float = 1.0) -> np.ndarray:
    """The (n,) int64 DDPM timesteps, noisiest first, that a picture at ``strength`` runs through
    (strength >= 1: txt2img; empty when it keeps the picture). Raises ValueError where
    :func:`check_strength` refuses."""
    count = img2img_step_count(sampler, steps, strength)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if sampler == "lcm":
        return lcm_timesteps(steps, min(strength, 1.0), LCM_GRID, TRAINING_TIMESTEPS)
    if sampler == "euler_a":
        return trailing_timesteps(steps, TRAINING_TIMESTEPS)[steps - count:]
    ddim = make_ddim_timesteps("uniform", steps, TRAINING_TIMESTEPS, verbose=False)
    return ddim[:count][::-1].astype(np.int64)


def unet_evaluations(sampler: str, step_count: int, scale: float, embeds_guidance: bool = False) -> int:
    """UNet evaluations (batch rows) of ``step_count`` steps at guidance ``scale``: the cost of
    a picture. ``embeds_guidance``: an LCM-distilled UNet that takes the scale as an input."""
    if step_count == 0:
        return 0
    if sampler in FEW_STEP:
        rows = 1 if scale <= 1 or (sampler == "lcm" and embeds_guidance) else 2
    else:
        rows = 1 if scale == 1 else 2
    calls = step_count + (1 if sampler == "plms" else 0)  # PLMS's first step evaluates twice
    return calls * rows
