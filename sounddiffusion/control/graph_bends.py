"""Bending operators whose amounts are read from a device tensor, for UNet block bends that a CUDA
graph replays (``--cuda_graphs`` with ``--bend OP=A@input_blocks.N|middle_block|output_blocks.N``).

A CUDA graph replays the kernels recorded while it was captured: Python code (a forward hook, a
float amount, an ``if`` on it, a random draw on the host) runs only at capture. An operator applied
with a Python float amount would bend every later frame by the captured frame's amount, and an
identity amount at capture (which :func:`sounddiffusion.control.bending.apply` skips) would record
no bend at all. Here the host derives each bend's **parameters** from its amount (checked as
:func:`~sounddiffusion.control.bending.apply` checks it), the caller copies them into a float32
device tensor before each frame, and :func:`apply_parameters` reads them from that tensor, at
identity amounts too. Seeded operators add ``p0 * noise`` where ``noise`` is a tensor the caller
drew on the host (:func:`~sounddiffusion.control.bending.operator_noise`) into a static buffer.

| op | parameters (p0, p1, p2, p3) | formula |
| --- | --- | --- |
| `add`, `subtract`, `multiply` | (r) | x + p0, x - p0, x * p0 |
| `threshold` | (r) | x where abs(x) >= p0, else 0 |
| `soft_threshold` | (r) | sign(x) * max(abs(x) - p0, 0) |
| `invert` | (1/r) | p0 - x |
| `log` | (log r) | log(abs(x)) / p0 |
| `power` | (r, 1 if r is whole else 0) | x ** p0 where p1 = 1, else sign(x) * abs(x) ** p0 |
| `abs` | () | abs(x) |
| `clamp` | (abs(r)) | min(max(x, -p0), p0) |
| `rescale` | (r) | (x - min) / (max - min) * 2 p0 - p0 per batch item (0 for a constant item) |
| `rotate_x/y/z` | (cos r, sin r) | c_i' = p0 c_i - p1 c_j, c_j' = p1 c_i + p0 c_j in each group of 4 channels |
| `reflect` | the sign of channels 0..3 (-1 for channel floor(r + 0.5)) | each group of 4 times those signs |
| `sparse_add`, `noise` | (r) | x + p0 * noise |
| `gaussian_blob` | (r) | x + p0 * the bump of :func:`~sounddiffusion.control.bending.gaussian_bump` |

These are :func:`~sounddiffusion.control.bending.apply`'s formulas (in float32 the same numbers,
tests/test_bending_specs.py); at an identity amount they return ``x``'s values unchanged (for finite
``x``), computed. ``erode`` and ``dilate`` are not here: their window size is the amount, a shape a
graph cannot vary, so those block bends run only without ``--cuda_graphs``
(:data:`GRAPH_OPERATORS`, :func:`sounddiffusion.control.bending_specs.check_graph_bends`).
"""
from __future__ import annotations

import math

import torch

from sounddiffusion.control.bending import (OPERATORS, check_amount, gaussian_bump, groups_of_four, reflected_channel,
                                           rescale, rotate_channels)

PARAMETERS = 4
"""The parameter columns of a bend: a bender keeps a (n_bends, PARAMETERS) float32 device tensor."""

GRAPH_OPERATORS = tuple(op for op in OPERATORS if op not in ("erode", "dilate"))
"""The operators whose amount a captured CUDA graph can take from a tensor (the window of
``erode``/``dilate`` is a shape)."""


def bend_parameters(op: str, amount: float) -> tuple[float, ...]:
    """The parameters of ``op`` (one of :data:`GRAPH_OPERATORS`) at ``amount``, a host float;
    ParameterError (one line) for an amount outside the operator's domain. At most
    :data:`PARAMETERS` numbers; see the module's table."""
    r = check_amount(op, amount)
    if op not in GRAPH_OPERATORS:
        raise ValueError(f"{op} cannot take its amount from a tensor; use one of {', '.join(GRAPH_OPERATORS)}")
    if op == "invert":
        return (1.0 / r,)
    if op == "log":
        return (math.log(r),)
    if op == "power":
        return (r, 1.0 if r == int(r) else 0.0)
    if op == "clamp":
        return (abs(r),)
    if op == "abs":
        return ()
    if op.startswith("rotate_"):
        return (math.cos(r), math.sin(r))
    if op == "reflect":
        channel = reflected_channel(r)
        return tuple(-1.0 if c == channel else 1.0 for c in range(4))
    return (r,)


def apply_parameters(op: str, x: torch.Tensor, parameters: torch.Tensor,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """``op`` applied to ``x`` (B, C, H, W) with its ``parameters`` (a float32 tensor of at least
    the :func:`bend_parameters` count, on ``x``'s device). ``noise``: for ``sparse_add`` and
    ``noise``, the drawn numbers, ``x``'s shape, dtype and device. Returns a new tensor of ``x``'s
    shape, dtype and device; reads nothing back to the host, so it can be captured in a CUDA graph."""
    p = parameters
    if op in ("add", "subtract", "multiply"):
        return {"add": torch.add, "subtract": torch.sub, "multiply": torch.mul}[op](x, p[0])
    if op == "threshold":
        return torch.where(x.abs() >= p[0], x, torch.zeros_like(x))
    if op == "soft_threshold":
        return torch.sign(x) * torch.clamp_min(x.abs() - p[0], 0)
    if op == "invert":
        return p[0] - x
    if op == "log":
        return torch.log(x.abs()) / p[0]
    if op == "power":
        return torch.where(p[1] > 0, torch.pow(x, p[0]), torch.sign(x) * torch.pow(x.abs(), p[0]))
    if op == "abs":
        return x.abs()
    if op == "clamp":
        return torch.clamp(x, -p[0], p[0])
    if op == "rescale":
        return rescale(x, p[0])
    if op.startswith("rotate_"):
        return rotate_channels(op, x, p[0], p[1])
    if op == "reflect":
        return _reflect(x, p[:4])
    if op in ("sparse_add", "noise"):
        if noise is None or noise.shape != x.shape:
            raise ValueError(f"{op} needs its drawn noise of shape {tuple(x.shape)}")
        return x + noise * p[0]
    if op == "gaussian_blob":
        return x + (gaussian_bump(x.shape[2], x.shape[3], device=x.device) * p[0]).to(x.dtype)
    raise ValueError(f"{op} cannot take its amount from a tensor; use one of {', '.join(GRAPH_OPERATORS)}")


def _reflect(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    groups = groups_of_four(x, "reflect")
    tail = torch.ones(x.shape[1] - 4 * groups, dtype=signs.dtype, device=signs.device)
    return x * torch.cat([signs.repeat(groups), tail]).to(x.dtype).view(1, -1, 1, 1)
