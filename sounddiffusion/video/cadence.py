"""The frames between two diffused frames of ``--cadence N``: latents by slerp
(``--cadence_blend latent``) or pictures cross-faded (``--cadence_blend pixel``).

Both return exact copies of their ends at t = 0 and t = 1.
"""
from __future__ import annotations

import numpy as np
import torch

# Below this angle (radians) between two latents, slerp is lerp within float32 precision.
_PARALLEL_ANGLE = 1e-3


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from latent ``a`` (t = 0) to latent ``b`` (t = 1).

    The tensors (any equal shape, e.g. (1, 4, H/8, W/8)) are treated as single vectors:
    ``sin((1-t) θ)/sin θ · a + sin(t θ)/sin θ · b`` with θ the angle between them. For two
    latents of equal norm every result has that norm, where lerp would shrink it towards the
    middle (by 1/√2 for orthogonal ones, as independent Gaussian noise is) and wash the
    decoded picture out. Nearly parallel latents (θ < 1e-3, or an undefined θ: a zero latent)
    are lerped. t = 0 and t = 1 return copies of ``a`` and ``b`` exactly. Computed in float32 at
    least, returned in ``a``'s dtype. Lerp or slerp is chosen on the device (``torch.where``), so
    nothing is read back to the host: on CUDA the in-between frames never wait for the GPU.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    work = torch.promote_types(a.dtype, torch.float32)
    x, y = a.to(work), b.to(work)
    cosine = torch.sum(x * y) / (torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y))
    theta = torch.arccos(cosine.clamp(-1.0, 1.0))
    parallel = ~torch.isfinite(theta) | (theta < _PARALLEL_ANGLE)
    sine = torch.sin(theta)
    mixed = (torch.sin((1 - t) * theta) / sine) * x + (torch.sin(t * theta) / sine) * y
    return torch.where(parallel, torch.lerp(x, y, t), mixed).to(a.dtype)


def cross_fade(rgb_a: np.ndarray, rgb_b: np.ndarray, t: float) -> np.ndarray:
    """``(1 - t) · rgb_a + t · rgb_b`` rounded, for ``--cadence_blend pixel``.

    (H, W, 3) uint8 in and out; t = 0 gives ``rgb_a`` and t = 1 ``rgb_b`` exactly.
    """
    if rgb_a.shape != rgb_b.shape:
        raise ValueError(f"cross_fade needs equal shapes, got {rgb_a.shape} and {rgb_b.shape}")
    mixed = (1.0 - t) * rgb_a.astype(np.float64) + t * rgb_b.astype(np.float64)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
