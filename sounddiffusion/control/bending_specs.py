"""``--bend OP=AMOUNT[@WHERE]``: parsing, where a bend acts, and forward hooks for UNet block bends.

``WHERE`` is ``latent`` (the default: the noised latent of each frame, where ``--rms_bend`` acts),
``step=K`` (the latent before denoising step K of the frame, 0-based; K at or past the frame's last
step is the final latent before decoding; a fraction 0 <= f < 1 is a share of the frame's steps,
see :func:`step_index`; ``step=0.0`` and ``step=0`` are the same step), or a UNet block,
``input_blocks.N``, ``middle_block`` or ``output_blocks.N``: that block's output activations, bent for the whole batch (both halves of the
classifier-free guidance batch) by a forward hook (:class:`BlockBender`).
The operators themselves are in :mod:`sounddiffusion.control.bending`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from sounddiffusion.control.bending import OPERATORS, SEEDED_OPERATORS, apply, check_amount, operator_noise
from sounddiffusion.control.graph_bends import GRAPH_OPERATORS, PARAMETERS, apply_parameters, bend_parameters
from sounddiffusion.errors import ParameterError

PLACES = ("latent, step=K (an integer >= 0 or a fraction between 0 and 1), input_blocks.N, "
          "middle_block or output_blocks.N")
_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)|middle_block")


@dataclass(frozen=True)
class BendSpec:
    """One ``--bend OP=AMOUNT[@WHERE]``.

    ``op``: one of :data:`OPERATORS`; ``amount``: the amount's text (a number or a schedule
    expression, compiled elsewhere); ``where``: ``"latent"``, ``"step"`` or a UNet block name
    (``"input_blocks.N"``, ``"middle_block"``, ``"output_blocks.N"``); ``step``: for ``"step"``,
    a whole step index (0, 1, 2, ...; inf for one too large to write out) or a fraction 0 <= f < 1
    of the frame's steps, else None;
    ``text``: the ``--bend`` text as given, for messages."""

    op: str
    amount: str
    where: str = "latent"
    step: float | None = None
    text: str = field(default="", compare=False)

    @property
    def is_block(self) -> bool:
        """Whether this bend acts inside the UNet (on a block's output) rather than on the latent."""
        return self.where not in ("latent", "step")


def _spec_error(text: str, problem: str) -> ParameterError:
    shown = text if len(text) <= 60 else f"{text[:30]}...{text[-25:]}"
    return ParameterError(f"--bend {shown!r}: {problem}")


def parse_bend(text: str) -> BendSpec:
    """``OP=AMOUNT[@WHERE]`` -> :class:`BendSpec`; ParameterError (one line) when it is malformed.

    The amount is kept as text; only its presence is checked here."""
    op, equals, rest = text.partition("=")
    op = op.strip()
    if not equals:
        raise _spec_error(text, "expected OP=AMOUNT[@WHERE], e.g. rotate_z=0.8*beat@step=0.5")
    if op not in OPERATORS:
        raise _spec_error(text, f"unknown operator {op!r}; use one of {', '.join(OPERATORS)}")
    amount, at, where = rest.rpartition("@") if "@" in rest else (rest, "", "latent")
    amount, where = amount.strip(), where.strip()
    if not amount:
        raise _spec_error(text, f"the amount is missing; give a number or an expression after "
                                f"'{op}=', e.g. {op}=0.5*rms")
    if where == "latent":
        return BendSpec(op, amount, "latent", None, text)
    if where.startswith("step="):
        return BendSpec(op, amount, "step", _parse_step(text, where[len("step="):].strip()), text)
    if _BLOCK.fullmatch(where):
        return BendSpec(op, amount, where, None, text)
    if where.startswith(("input_blocks", "output_blocks", "middle_block")):
        raise _spec_error(text, f"bad block {where!r}; use input_blocks.N or output_blocks.N "
                                f"(N an integer >= 0) or middle_block")
    if not where:
        raise _spec_error(text, f"nothing after '@'; use {PLACES}")
    raise _spec_error(text, f"unknown place {where!r} after '@'; use {PLACES}")


def _parse_step(text: str, value: str) -> float:
    """K of ``step=K``: ASCII digits (a step index; inf when it is too large for a float), or a
    number 0 <= f < 1 (a fraction of the steps; 0.0 is step 0 either way)."""
    try:
        step = float(value) if value.isascii() else math.nan
    except ValueError:
        step = math.nan
    if step < 0:
        raise _spec_error(text, f"step {value} is negative; use an integer step >= 0 "
                                f"or a fraction between 0 and 1 (e.g. step=0.8)")
    if re.fullmatch(r"[0-9]+", value) or 0 <= step < 1:
        return step
    shown = value if len(value) <= 20 else f"{value[:17]}..."
    raise _spec_error(text, f"step {shown!r} is neither an integer >= 0 nor a fraction between 0 "
                            f"and 1; use e.g. step=3 or step=0.8")


def step_index(spec: BendSpec, n_steps: int) -> int:
    """The step of a frame of ``n_steps`` denoising steps before which a ``step=`` bend acts, 0 to n_steps.

    A whole step K gives min(K, n_steps); a fraction f gives floor(f * n_steps) (plus 1e-9 so
    that e.g. 0.29 * 100 is 29). ``n_steps`` means past the last step: the final latent, before
    decoding."""
    if spec.where != "step" or spec.step is None:
        raise ValueError(f"{spec.text or spec} is not a step=K bend")
    if 0 < spec.step < 1:
        return min(n_steps, math.floor(spec.step * n_steps + 1e-9))
    return int(min(n_steps, spec.step))


def check_block(spec: BendSpec, unet: torch.nn.Module) -> torch.nn.Module:
    """The block of ``unet`` (an ldm ``UNetModel``) a block bend hooks; ParameterError naming the
    valid blocks when the model has no such block."""
    name, _, index = spec.where.partition(".")
    blocks = getattr(unet, name, None)
    if name == "middle_block" and blocks is not None:
        return blocks
    if blocks is not None and index.isdigit() and int(index) < len(blocks):
        return blocks[int(index)]
    valid = (f"input_blocks.0 to input_blocks.{len(unet.input_blocks) - 1}, middle_block, "
             f"or output_blocks.0 to output_blocks.{len(unet.output_blocks) - 1}")
    raise _spec_error(spec.text or f"{spec.op}={spec.amount}@{spec.where}",
                      f"this model has no block {spec.where}; use {valid}")


def check_graph_bends(specs: Sequence[BendSpec]) -> None:
    """ParameterError (one line) for a block bend that a CUDA graph cannot replay: ``erode`` and
    ``dilate`` inside UNet blocks (their window size follows the amount; see
    :mod:`sounddiffusion.control.graph_bends`). Latent and step bends run outside the UNet: all fine."""
    for spec in specs:
        if spec.is_block and spec.op not in GRAPH_OPERATORS:
            raise _spec_error(spec.text or f"{spec.op}={spec.amount}@{spec.where}",
                              f"{spec.op} inside a UNet block cannot be replayed from CUDA graphs (its window "
                              f"size follows the amount): leave --cuda_graphs out, or bend the latent "
                              f"(@latent or @step=K)")


class BlockBender:
    """Forward hooks that bend UNet block outputs, as a context manager.

    ``specs``: all the run's bends (those not on a block are ignored here); on entering, one hook
    per block spec is registered on its block (in ``specs`` order, so bends on the same block
    apply in that order) and on exit all are removed. Call :meth:`set_amounts` with one amount
    per spec (Python floats) before each frame. Each hook replaces the block's output, for the
    whole batch (both halves of the guidance batch), by the operator at that amount.

    The hooks are safe to capture in a CUDA graph (``--cuda_graphs``), whose replays run no
    Python: they read each bend's parameters from a float32 device tensor (n_specs,
    :data:`~sounddiffusion.control.graph_bends.PARAMETERS`) that :meth:`set_amounts` overwrites in
    place (from pinned memory, without waiting for the device), and compute them at identity
    amounts too (same values), so a graph captured on a quiet frame bends the loud ones.
    Seeded operators add noise from static buffers, one per spec and activation shape, created at
    a hook's first call with that shape (never while a graph is being captured) and drawn again
    by every :meth:`set_amounts`: ``generator_for(i)`` gives the CPU generator of ``specs[i]``
    for the current frame (None: torch's global CPU generator), asked once per buffer and frame.
    ``erode``/``dilate`` hooks use the float amount at each call (no graphs for them:
    :func:`check_graph_bends`)."""

    def __init__(self, unet: torch.nn.Module, specs: Sequence[BendSpec],
                 generator_for: Callable[[int], torch.Generator] | None = None):
        self.unet = unet
        self.specs = tuple(specs)
        self.generator_for = generator_for
        self._blocks = {i: check_block(s, unet) for i, s in enumerate(self.specs) if s.is_block}
        device = next(unet.parameters()).device
        self._parameters = torch.zeros(len(self.specs), PARAMETERS, dtype=torch.float32, device=device)
        self._amounts: list[float] | None = None
        self._noise: dict[int, dict[tuple, torch.Tensor]] = {}  # spec -> (shape, strides, dtype) -> buffer
        self._handles: list = []

    def set_amounts(self, amounts: Sequence[float]) -> None:
        """The current amount of each spec, in ``specs`` order (those of non-block specs are
        unused); ParameterError when a block bend's amount is outside its operator's domain."""
        if len(amounts) != len(self.specs):
            raise ValueError(f"{len(amounts)} amounts for {len(self.specs)} bends")
        amounts = [float(a) for a in amounts]
        rows = torch.zeros(len(self.specs), PARAMETERS, dtype=torch.float32)
        for index in self._blocks:
            spec = self.specs[index]
            values = (bend_parameters(spec.op, amounts[index]) if spec.op in GRAPH_OPERATORS
                      else (check_amount(spec.op, amounts[index]),))
            rows[index, :len(values)] = torch.tensor(values, dtype=torch.float32)
        _copy_from_host(self._parameters, rows)
        self._amounts = amounts
        for index, buffers in self._noise.items():
            for buffer in buffers.values():
                self._draw(index, buffer)

    def __enter__(self) -> BlockBender:
        for index, block in self._blocks.items():
            self._handles.append(block.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _draw(self, index: int, buffer: torch.Tensor) -> None:
        generator = self.generator_for(index) if self.generator_for is not None else None
        _copy_from_host(buffer, operator_noise(self.specs[index].op, tuple(buffer.shape), generator))

    def _noise_for(self, index: int, output: torch.Tensor) -> torch.Tensor:
        buffers = self._noise.setdefault(index, {})
        key = (tuple(output.shape), output.stride(), output.dtype)
        if key not in buffers:
            if output.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"--bend {self.specs[index].text}: no noise buffer for shape {key[0]} "
                                   f"while a CUDA graph is captured (run the call once before capturing)")
            with torch.inference_mode(False):  # a normal tensor: set_amounts may overwrite it anywhere
                buffers[key] = torch.empty_like(output)  # output's layout: an identity add keeps it
            self._draw(index, buffers[key])
        return buffers[key]

    def _hook(self, index: int):
        spec = self.specs[index]

        def bend_output(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
            if self._amounts is None:
                raise RuntimeError("BlockBender.set_amounts must be called before the UNet runs")
            if spec.op not in GRAPH_OPERATORS:
                return apply(spec.op, output, self._amounts[index])
            noise = self._noise_for(index, output) if spec.op in SEEDED_OPERATORS else None
            return apply_parameters(spec.op, output, self._parameters[index], noise)
        return bend_output


def _copy_from_host(buffer: torch.Tensor, values: torch.Tensor) -> None:
    """Overwrite device tensor ``buffer`` with host tensor ``values``; to CUDA from pinned memory
    without blocking the host (the caching host allocator keeps that memory until the copy ran)."""
    values = values.to(buffer.dtype)
    if buffer.is_cuda:
        buffer.copy_(values.pin_memory(), non_blocking=True)
    else:
        buffer.copy_(values)
