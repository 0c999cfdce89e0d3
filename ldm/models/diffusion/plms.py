"""PLMS sampling (pseudo linear multistep, Liu et al. 2022) behind CompVis's ``PLMSSampler`` interface.

Each step applies the DDIM update (``ddim_step``, eta = 0) to a combination of the current noise
prediction and up to three earlier ones (Adams-Bashforth). The first step has no history and uses
a pseudo improved Euler step instead (a second model evaluation at the DDIM prediction of the next
timestep). Numerics follow CompVis exactly.

Beyond upstream, ``stochastic_encode`` and ``decode`` (img2img) exist here too: the encoding is
DDIM's, and ``decode(x, cond, t_enc)`` runs t_enc PLMS steps from index t_enc - 1 down to 0,
warm-up included.
"""
from tqdm import tqdm

from ldm.models.diffusion.sampling import DiffusionSampler, ddim_step, timestep_batch


def plms_eps(eps, old_eps):
    """The Adams-Bashforth combination of ``eps`` with the 1 to 3 previous predictions ``old_eps``
    (oldest first), all (B, C, H, W)."""
    if len(old_eps) == 1:
        return (3 * eps - old_eps[-1]) / 2
    if len(old_eps) == 2:
        return (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    return (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24


def plms_loop(eps_fn, x, schedule, last_index, *, step_noise=None, denoised_fn=None, before_step=None,
              after_step=None, desc="PLMS Sampler", verbose=True):
    """PLMS from index ``last_index`` down to 0, starting at x (B, C, H, W); returns the final x.

    Same hooks as ``ddim_loop``; ``step_noise`` must be None (PLMS is deterministic).
    """
    if step_noise is not None:
        raise ValueError("PLMS adds no noise: its schedule needs eta = 0")
    indices = list(range(last_index, -1, -1))
    old_eps = []  # the last (up to 3) noise predictions, oldest first
    for i, index in enumerate(tqdm(indices, desc=desc, disable=not verbose)):
        t = timestep_batch(schedule, index, x.shape[0], x.device)
        # upstream's "next" timestep of the last step is that step's own
        t_next = timestep_batch(schedule, indices[min(i + 1, len(indices) - 1)], x.shape[0], x.device)
        if before_step is not None:
            x = before_step(x, t)
        eps = eps_fn(x, t)
        if old_eps:
            eps_prime = plms_eps(eps, old_eps)
        else:
            x_euler, _ = ddim_step(x, eps, schedule, index, denoised_fn=denoised_fn)
            eps_prime = (eps + eps_fn(x_euler, t_next)) / 2
        x, pred_x0 = ddim_step(x, eps_prime, schedule, index, denoised_fn=denoised_fn)
        old_eps = (old_eps + [eps])[-3:]
        if after_step is not None:
            after_step(i, index, x, pred_x0)
    return x


class PLMSSampler(DiffusionSampler):
    """CompVis's PLMS sampler (eta must be 0), plus img2img via ``stochastic_encode``/``decode``."""

    name = "PLMS"

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        if ddim_eta != 0:
            raise ValueError(f"ddim_eta={ddim_eta}: the PLMS sampler is deterministic, use eta=0 "
                             f"(or the DDIM sampler for eta > 0)")
        return super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    def _loop(self, eps_fn, x, schedule, last_index, desc="PLMS Sampler", **options):
        return plms_loop(eps_fn, x, schedule, last_index, desc=desc, **options)

