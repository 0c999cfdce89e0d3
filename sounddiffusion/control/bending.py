"""Network bending: operators that transform a latent, or a UNet block's activations, by an amount.

The operators are those of the network-bending research (Dzwonczyk, DAFx 2024 / JAES 2025,
``dzluke/JAES2025`` ``utils/bending.py``). Where that code defines an operator, :func:`apply` gives
its numbers (checked by ``../shared/tools/check_bending.py`` against outputs of that code).
Every operator takes ``x`` of shape (B, C, H, W), batch first, acts on each batch item alike and
returns a new tensor of ``x``'s dtype and device; ``r`` below is the amount (a Python float).

| op | formula | the amount r means | identity |
| --- | --- | --- | --- |
| `add` | x + r | the offset added to every element | r = 0 |
| `subtract` | x - r | the offset taken from every element | r = 0 |
| `multiply` | r * x | the gain | r = 1 |
| `threshold` | x where abs(x) >= r, else 0 | the magnitude below which elements become 0 | r <= 0 |
| `soft_threshold` | sign(x) * max(abs(x) - r, 0) | how far every magnitude shrinks towards 0 | r = 0 |
| `invert` | 1/r - x | x is mirrored about 1/(2r); r = 0 is an error | none |
| `log` | log(abs(x)) / log(r) | the base (r > 0, r != 1, else an error); x = 0 gives -inf | none |
| `power` | x ** r; sign(x) * abs(x) ** r when r is not a whole number | the exponent | r = 1 |
| `abs` | abs(x) | ignored (the research code ignores it too) | none |
| `clamp` | min(max(x, -abs(r)), abs(r)) | the bound: values are clipped to [-r, r] | r = +inf |
| `rescale` | (x - min) / (max - min) * 2r - r, min and max over each batch item | the half-width of the new range [-r, r]; a constant item becomes 0 | none |
| `rotate_x` | channels (1, 2) of each group of 4 rotated by r radians: c1' = c1 cos r - c2 sin r, c2' = c1 sin r + c2 cos r | the angle in radians | r = 0 |
| `rotate_y` | channels (0, 2): c0' = c0 cos r + c2 sin r, c2' = -c0 sin r + c2 cos r | the angle in radians | r = 0 |
| `rotate_z` | channels (0, 1): c0' = c0 cos r - c1 sin r, c1' = c0 sin r + c1 cos r | the angle in radians | r = 0 |
| `reflect` | channel K of each group of 4 negated, K = floor(r + 0.5) | which channel, 0 to 3 (else an error) | none |
| `sparse_add` | x + r * (u < 0.05), u uniform in [0, 1) per element, seeded | the value added to a random 5 % of the elements | r = 0 |
| `noise` | x + r * n, n standard normal per element, seeded | the noise's standard deviation | r = 0 |
| `gaussian_blob` | x + r * exp(-(X^2 + Y^2) / (2 * 1.5^2)) / (2 pi 1.5^2), X and Y spanning [-5, 5] over the width and height | the bump's volume: its peak, at the centre, is 0.0707 r; its width sigma is 15 % of the side | r = 0 |
| `erode` | minimum over a k x k window (stride 1, same size, per channel), k = 2 * floor(r + 0.5) + 1 | the window's radius in pixels (a window wider than the tensor is the whole tensor) | r < 0.5 |
| `dilate` | maximum over the same window | the window's radius in pixels (the same) | r < 0.5 |

Amounts: :func:`check_amount` refuses, with one line, an amount outside an operator's domain
(NaN or infinite, ``invert`` 0, ``log`` base <= 0 or 1, ``reflect`` outside 0-3) and one so large
that every bent value would lie beyond float32's range (``add``, ``subtract``, ``multiply``,
``sparse_add``, ``noise``, ``gaussian_blob`` beyond 3.4e38, ``rescale`` beyond half that,
``invert`` nearer 0 than 1/3.4e38); the frame loop checks every frame's amounts so before the
model loads. Amounts that only overflow for some inputs (``multiply=1e30``, ``power=100``) are
found after the bend, by the frame loop's check that each frame's latent is finite.

Channel operators (``rotate_*``, ``reflect``) use the research code's 4x4 matrices on the channel
axis. The latent has exactly 4 channels; inside UNet blocks (320 to 1280 channels) they act on
consecutive groups of 4 channels (0-3, 4-7, ...), each group as a latent; channels past the last
whole group of 4 are left unchanged, and fewer than 4 channels is an error.

Identity amounts return ``x`` itself (no copy, no computation, no random draw), so a bend that is
quiet in silence leaves those frames bit for bit untouched. ``x`` is never modified in place.

Seeded operators (``sparse_add``, ``noise``) draw their float32 random numbers on the CPU from
``generator`` (torch's global CPU generator when None) and move them to ``x``'s device (to CUDA
through pinned memory, without blocking), so the same generator state gives the same numbers on
every device. Nothing in :func:`apply` reads device data back to the host or waits for the device:
amounts are Python floats, every check is on them, and the other operators' constants are Python
scalars or made on the device.

Where: ``--bend OP=AMOUNT[@WHERE]`` bends the noised ``latent`` of each frame (the default), the
latent before denoising step K (``step=K``, or a fraction such as ``step=0.8``), or a UNet block's
output activations (``input_blocks.N``, ``middle_block``, ``output_blocks.N``) through forward
hooks: see :mod:`sounddiffusion.control.bending_specs`.

Where the research code differs: its ``soft_threshold`` gives NaN at x = 0 (0 here); its ``power``
gives NaN for negative x and a fractional exponent (the sign is kept here); its ``gaussian_blob``
is fixed at 64x64 (any size here, the same numbers at 64x64); its erosion/dilation (commented out
there) took the kernel size itself as the amount.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sounddiffusion.errors import ParameterError

OPERATORS = ("add", "multiply", "subtract", "threshold", "soft_threshold", "invert", "log", "power",
             "abs", "clamp", "rescale", "rotate_x", "rotate_y", "rotate_z", "reflect", "sparse_add",
             "noise", "gaussian_blob", "erode", "dilate")
"""The operator names :func:`apply` knows, in the order the documentation lists them."""

FLOAT32_MAX = float(torch.finfo(torch.float32).max)

# How large r makes the bent values at the most, for operators that add or scale by r.
_AMOUNT_GAIN = {"add": 1.0, "subtract": 1.0, "multiply": 1.0, "sparse_add": 1.0, "noise": 1.0,
                "gaussian_blob": 1.0, "rescale": 2.0}

SEEDED_OPERATORS = ("sparse_add", "noise")
"""Operators that draw random numbers (from the ``generator`` given to :func:`apply`)."""

SPARSE_FRACTION = 0.05
"""The fraction of elements ``sparse_add`` changes (the research code's 5 %)."""

BLOB_SIGMA = 1.5
BLOB_HALF_SPAN = 5.0
"""``gaussian_blob``: sigma of the bump on a grid spanning [-5, 5] over each side (research values)."""

ROTATION_PLANES = {"rotate_x": (1, 2), "rotate_y": (2, 0), "rotate_z": (0, 1)}
"""The two channels (i, j) each rotation mixes: c_i' = c_i cos r - c_j sin r, c_j' = c_i sin r + c_j cos r.
rotate_y is written (2, 0) so that its matrix is the research code's [[c, 0, s], [0, 1, 0], [-s, 0, c]]."""


def identity_amount(op: str) -> float | None:
    """The amount at which ``op`` leaves its input unchanged, None for operators that have none.

    (``threshold`` is also the identity for any amount <= 0, ``erode``/``dilate`` for any < 0.5.)"""
    _check_op(op)
    return {"add": 0.0, "subtract": 0.0, "multiply": 1.0, "threshold": 0.0, "soft_threshold": 0.0,
            "power": 1.0, "clamp": math.inf, "rotate_x": 0.0, "rotate_y": 0.0, "rotate_z": 0.0,
            "sparse_add": 0.0, "noise": 0.0, "gaussian_blob": 0.0, "erode": 0.0,
            "dilate": 0.0}.get(op)


def is_identity(op: str, amount: float) -> bool:
    """Whether ``op`` at ``amount`` leaves every input unchanged (:func:`apply` then returns ``x``)."""
    if op == "threshold":
        return amount <= 0
    if op in ("erode", "dilate"):
        return morphology_radius(amount) <= 0
    return amount == identity_amount(op)


def morphology_radius(amount: float) -> int:
    """The window radius of ``erode``/``dilate``: the amount rounded half up; the window is 2 * radius + 1."""
    return math.floor(amount + 0.5)


def apply(op: str, x: torch.Tensor, amount: float, *, generator: torch.Generator | None = None
          ) -> torch.Tensor:
    """Operator ``op`` (one of :data:`OPERATORS`) at ``amount`` applied to ``x`` (B, C, H, W).

    Returns a tensor of ``x``'s shape, dtype and device (``x`` itself at identity amounts, see
    :func:`is_identity`). ``generator``: the CPU generator ``sparse_add`` and ``noise`` draw from.
    Raises ParameterError for an unknown operator or an amount :func:`check_amount` refuses."""
    if x.ndim != 4:
        _check_op(op)
        raise ValueError(f"bending needs a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    amount = check_amount(op, amount)
    if is_identity(op, amount):
        return x
    return _OPERATIONS[op](x, amount, generator)


def check_amount(op: str, amount: float) -> float:
    """``amount`` as a float when ``op`` (one of :data:`OPERATORS`) can take it; else ParameterError (one
    line, starting ``bend OP:``): an unknown operator, a NaN or infinite amount (``clamp`` takes inf),
    ``invert`` at 0, a ``log`` base <= 0 or 1, a ``reflect`` channel outside 0-3, or an amount that puts
    every bent value beyond float32's range (see the module docstring). Host floats only."""
    _check_op(op)
    amount = float(amount)
    if math.isnan(amount) or (math.isinf(amount) and op != "clamp"):
        raise ParameterError(f"bend {op}: the amount is {amount}; it must be a finite number")
    if op == "invert" and amount == 0:
        raise ParameterError("bend invert: the amount is 0, but invert computes 1/amount - x; "
                             "keep the amount away from 0 (e.g. 0.5+rms)")
    if op == "log" and (amount <= 0 or amount == 1):
        raise ParameterError(f"bend log: the amount is the logarithm's base, got {amount:g}; "
                             f"it must be > 0 and not 1 (e.g. 2 or 1.5+rms)")
    if op == "reflect" and not 0 <= reflected_channel(amount) <= 3:
        raise ParameterError(f"bend reflect: the amount is the channel to flip, 0 to 3; got {amount:g}")
    reach = abs(amount) * _AMOUNT_GAIN[op] if op in _AMOUNT_GAIN else 0.0
    if op == "invert" and abs(amount) * FLOAT32_MAX < 1:
        reach = math.inf
    if reach > FLOAT32_MAX:
        raise ParameterError(f"bend {op}: the amount {amount:g} would put the values beyond float32's range "
                             f"(+-{FLOAT32_MAX:.3g}) and the picture would be lost; use a smaller amount")
    return amount


def reflected_channel(amount: float) -> int:
    """The channel ``reflect`` negates in each group of four: the amount rounded half up."""
    return math.floor(amount + 0.5)


def operator_noise(op: str, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """The random numbers seeded operator ``op`` adds (times the amount) to a tensor of ``shape``:
    float32 on the CPU, drawn from ``generator`` (torch's global CPU generator when None).
    ``sparse_add``: 1 where a uniform draw is below :data:`SPARSE_FRACTION`, else 0; ``noise``:
    standard normal."""
    if op == "sparse_add":
        return (torch.rand(shape, generator=generator, dtype=torch.float32) < SPARSE_FRACTION).float()
    if op == "noise":
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    raise ValueError(f"{op} draws no random numbers; seeded operators: {', '.join(SEEDED_OPERATORS)}")


def _check_op(op: str) -> None:
    if op not in OPERATORS:
        raise ParameterError(f"unknown bending operator {op!r}; use one of {', '.join(OPERATORS)}")


# ----------------------------------------------------------------------------- element-wise

def _invert(x: torch.Tensor, r: float, _generator) -> torch.Tensor:
    return (1.0 / r) - x


def _log(x: torch.Tensor, r: float, _generator) -> torch.Tensor:
    return torch.log(x.abs()) / math.log(r)


def _power(x: torch.Tensor, r: float, _generator) -> torch.Tensor:
    if x.dtype in (torch.float16, torch.bfloat16) and abs(r) > torch.finfo(x.dtype).max:
        return _power(x.float(), r, _generator).to(x.dtype)  # torch cannot hold such an exponent in x's dtype
    if r == int(r):
        return torch.pow(x, r)
    return torch.sign(x) * torch.pow(x.abs(), r)


def _clamp(x: torch.Tensor, r: float, _generator) -> torch.Tensor:
    bound = min(abs(r), torch.finfo(x.dtype).max)  # a bound past the dtype's range clips only inf
    return torch.clamp(x, -bound, bound)


def rescale(x: torch.Tensor, r: float | torch.Tensor) -> torch.Tensor:
    """``rescale``: (x - min) / (max - min) * 2r - r, min and max over each batch item of ``x``
    (B, C, H, W), 0 for a constant item; ``r`` a Python float or a 0-d tensor on ``x``'s device
    (:mod:`sounddiffusion.control.graph_bends` reads it from a tensor)."""
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    span = x.amax(dim=(1, 2, 3), keepdim=True) - low
    scaled = (x - low) / span * (2 * r) - r
    return torch.where(span > 0, scaled, torch.zeros_like(x))


def _rescale(x: torch.Tensor, r: float, _generator) -> torch.Tensor:
    return rescale(x, r)


# ----------------------------------------------------------------------------- channels

def groups_of_four(x: torch.Tensor, op: str) -> int:
    """How many whole groups of four channels ``x`` (B, C, H, W) has; ParameterError (naming
    ``op``) below four."""
    if x.shape[1] < 4:
        raise ParameterError(f"bend {op}: needs at least 4 channels, the tensor has {x.shape[1]}")
    return x.shape[1] // 4


def rotate_channels(op: str, x: torch.Tensor, cos: float | torch.Tensor, sin: float | torch.Tensor
                    ) -> torch.Tensor:
    """``rotate_x/y/z`` (``op``): channels (i, j) = ``ROTATION_PLANES[op]`` of each whole group of
    four channels of ``x`` (B, C, H, W) rotated, c_i' = cos c_i - sin c_j, c_j' = sin c_i + cos c_j;
    ``cos``, ``sin`` Python floats or 0-d tensors on ``x``'s device. A new tensor."""
    i, j = ROTATION_PLANES[op]
    end = 4 * groups_of_four(x, op)
    first, second = x[:, i:end:4], x[:, j:end:4]
    rotated = x.clone()  # keeps x's memory layout (UNet activations may be channels_last)
    rotated[:, i:end:4] = cos * first - sin * second
    rotated[:, j:end:4] = sin * first + cos * second
    return rotated


def _rotate(op: str):
    def rotate(x: torch.Tensor, r: float, _generator) -> torch.Tensor:
        return rotate_channels(op, x, math.cos(r), math.sin(r))
    return rotate


def _reflect(x: torch.Tensor, r: float, _generator) -> torch.Tensor:
    groups = groups_of_four(x, "reflect")
    channel = reflected_channel(r)
    reflected = x.clone()
    reflected[:, channel:4 * groups:4] = -x[:, channel:4 * groups:4]
    return reflected


# ----------------------------------------------------------------------------- seeded

def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU ``values`` on ``device``; to CUDA through pinned memory, so the copy does not stall the host."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def _seeded(op: str):
    def add_drawn(x: torch.Tensor, r: float, generator) -> torch.Tensor:
        return x + _to_device(operator_noise(op, tuple(x.shape), generator).to(x.dtype), x.device) * r
    return add_drawn


# ----------------------------------------------------------------------------- spatial

def gaussian_bump(height: int, width: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``gaussian_blob`` bump for amount 1, float32 (height, width) on ``device``: a normal
    density with sigma 1.5 on a grid spanning [-5, 5] across each side, centred (the research
    code's at 64x64). Made on the device itself: nothing is copied from the host."""
    span = dict(dtype=torch.float32, device=device)
    rows = torch.linspace(-BLOB_HALF_SPAN, BLOB_HALF_SPAN, height, **span)[:, None]
    cols = torch.linspace(-BLOB_HALF_SPAN, BLOB_HALF_SPAN, width, **span)[None, :]
    sigma2 = BLOB_SIGMA ** 2
    return torch.exp((rows ** 2 + cols ** 2) * (-0.5 / sigma2)) * (1 / (2 * math.pi * sigma2))


def _gaussian_blob(x: torch.Tensor, r: float, _generator) -> torch.Tensor:
    return x + (gaussian_bump(x.shape[2], x.shape[3], device=x.device) * r).to(x.dtype)


def _dilate(x: torch.Tensor, r: float, _generator) -> torch.Tensor:
    radius = morphology_radius(r)
    if radius >= max(x.shape[2], x.shape[3]) - 1:
        # the window covers the whole tensor from every pixel: each channel's maximum everywhere
        # (max_pool2d would need a kernel of 2 * radius + 1, refused past int64 and slow long before)
        return x.amax(dim=(2, 3), keepdim=True).expand_as(x).clone()
    return F.max_pool2d(x, 2 * radius + 1, stride=1, padding=radius)


def _erode(x: torch.Tensor, r: float, _generator) -> torch.Tensor:
    return -_dilate(-x, r, _generator)


_OPERATIONS = {
    "add": lambda x, r, g: x + r, "subtract": lambda x, r, g: x - r, "multiply": lambda x, r, g: x * r,
    "threshold": lambda x, r, g: torch.where(x.abs() >= r, x, torch.zeros_like(x)),
    "soft_threshold": lambda x, r, g: torch.sign(x) * torch.clamp_min(x.abs() - r, 0),
    "invert": _invert, "log": _log, "power": _power, "abs": lambda x, r, g: x.abs(),
    "clamp": _clamp, "rescale": _rescale,
    "rotate_x": _rotate("rotate_x"), "rotate_y": _rotate("rotate_y"), "rotate_z": _rotate("rotate_z"),
    "reflect": _reflect, "sparse_add": _seeded("sparse_add"), "noise": _seeded("noise"), "gaussian_blob": _gaussian_blob,
    "erode": _erode, "dilate": _dilate,
}

