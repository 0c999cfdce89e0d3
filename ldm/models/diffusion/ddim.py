"""DDIM sampling (Song et al. 2021) behind CompVis's ``DDIMSampler`` interface.

The numerics follow CompVis exactly: ``ddim_loop`` runs ``ddim_step`` (ldm.models.diffusion.sampling)
from one schedule index down to 0; ``DDIMSampler`` is the shared ``DiffusionSampler`` with that loop.
"""
from tqdm import tqdm

from ldm.models.diffusion.sampling import DiffusionSampler, ddim_step, timestep_batch


def ddim_loop(eps_fn, x, schedule, last_index, *, step_noise=None, denoised_fn=None, before_step=None,
              after_step=None, desc="DDIM Sampler", verbose=True):
    """DDIM from index ``last_index`` down to 0, starting at x (B, C, H, W); returns the final x.

    step_noise(x): the standard normal noise of a step (None: no noise, eta = 0).
    before_step(x, t) -> x: e.g. re-imposing known pixels; after_step(i, index, x, pred_x0): hooks.
    """
    for i, index in enumerate(tqdm(range(last_index, -1, -1), desc=desc, total=last_index + 1,
                                   disable=not verbose)):
        t = timestep_batch(schedule, index, x.shape[0], x.device)
        if before_step is not None:
            x = before_step(x, t)
        noise = step_noise(x) if step_noise is not None else None
        x, pred_x0 = ddim_step(x, eps_fn(x, t), schedule, index, noise, denoised_fn)
        if after_step is not None:
            after_step(i, index, x, pred_x0)
    return x


class DDIMSampler(DiffusionSampler):
    """CompVis's DDIM sampler: ``make_schedule``, ``sample``, ``stochastic_encode``, ``decode``."""

    name = "DDIM"

    def _loop(self, eps_fn, x, schedule, last_index, desc="DDIM Sampler", **options):
        return ddim_loop(eps_fn, x, schedule, last_index, desc=desc, **options)
