"""Which sampler steps each frame of a render runs (:mod:`sounddiffusion.model.samplers` applied
to the :class:`~sounddiffusion.video.frame_plan.FramePlan`): the check of every frame's strength
before the model loads, and the sampler's columns of ``NAME.schedule.csv``.

A frame is sampled when it is diffused (not an in-between of ``--cadence``): frame 0 by txt2img
(all ``--ddim_steps``) unless ``--init-img`` is given, every other one by img2img at its strength.
"""
from __future__ import annotations

import numpy as np

from sounddiffusion.model.samplers import check_strengths, img2img_step_count, timesteps_run, unet_evaluations
from sounddiffusion.settings import VideoSettings
from sounddiffusion.video.frame_plan import FramePlan

SAMPLER_COLUMNS = ("sampler_steps", "unet_evals", "first_timestep")
"""The CSV columns: the sampler steps a frame runs, the UNet evaluations (batch rows) they cost,
and the noisiest of their timesteps (of 1000; empty, "nan", when the frame runs none)."""


def img2img_frames(plan: FramePlan, settings: VideoSettings) -> np.ndarray:
    """The indices (n,) of the frames made by img2img, in order."""
    index = np.arange(plan.n_frames)
    return np.flatnonzero(plan.diffused & ((index > 0) | bool(settings.init_img)))


def check_frame_strengths(plan: FramePlan, settings: VideoSettings) -> None:
    """Raises ParameterError (one line, naming the earliest frame and its time) when an img2img
    frame's strength cannot run with ``--sampler`` and ``--ddim_steps`` (LCM, Euler ancestral)."""
    frames = img2img_frames(plan, settings)
    check_strengths(settings.sampler, settings.ddim_steps, frames, plan.values["strength"][frames],
                    frames / float(plan.fps))


def sampler_columns(plan: FramePlan, settings: VideoSettings, embeds_guidance: bool = False
                    ) -> dict[str, np.ndarray]:
    """:data:`SAMPLER_COLUMNS` by name, each (n_frames,) float64. ``embeds_guidance``: the UNet
    takes the guidance scale as an input (an LCM-distilled checkpoint: one evaluation per step)."""
    steps = np.zeros(plan.n_frames)
    evaluations = np.zeros(plan.n_frames)
    first = np.full(plan.n_frames, np.nan)
    strengths = np.ones(plan.n_frames)
    img2img = img2img_frames(plan, settings)
    strengths[img2img] = plan.values["strength"][img2img]
    for index in np.flatnonzero(plan.diffused):
        count = img2img_step_count(settings.sampler, settings.ddim_steps, strengths[index])
        steps[index] = count
        evaluations[index] = unet_evaluations(settings.sampler, count, float(plan.values["scale"][index]),
                                              embeds_guidance)
        if count:
            first[index] = timesteps_run(settings.sampler, settings.ddim_steps, strengths[index])[0]
    return dict(zip(SAMPLER_COLUMNS, (steps, evaluations, first)))
