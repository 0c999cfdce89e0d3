"""A CPU stand-in for CUDA-graph capture (``sounddiffusion.model.cuda_graphs.Capture``) that behaves
like a graph where it matters for correctness: the tensor operations of one call are recorded
(at the ATen level, under a ``TorchDispatchMode``) and each replay runs those operations again on
the same tensors, without running any Python of the model. So, as with a real graph, a forward
hook runs only at capture, a Python float read at capture (an amount, a branch on it) is frozen,
an operation skipped at capture is never replayed, while the values in tensors captured by
reference (static inputs, weights, a bend's parameter and noise buffers) are read at each replay.

As a real capture would fail, recording raises RuntimeError for what a graph cannot hold: a
value read back to the host (``.item()``, ``if tensor:``), pinned host memory, a tensor made from
host data (``torch.tensor(...)``), a random draw from an explicit (host) generator.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

# What a capture on a GPU refuses: values read back to the host, pinned host memory, and tensors
# made from host data (``torch.tensor([...])`` inside the call: a host-to-device copy on a GPU; a
# Python number, as in ``x[:, 0] = 1.0``, is lifted to a 0-dim tensor too, but a kernel takes it by value).
_NOT_CAPTURABLE = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                   torch.ops.aten.equal.default, torch.ops.aten._pin_memory.default}


class _Slot:
    """A tensor made during the recorded call: the ``index``-th output of the recording."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []  # (op, args spec, flat args with _Slot for made tensors, output slots spec)
        self.slot_of: dict[int, int] = {}  # id(tensor made here) -> slot
        self.made: list[torch.Tensor] = []  # keeps every made tensor alive, so ids are not reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NOT_CAPTURABLE or (func is torch.ops.aten.lift_fresh.default and args[0].ndim > 0):
            raise RuntimeError(f"{func} moves data between host and device: not capturable in a CUDA graph")
        if kwargs.get("generator") is not None:
            raise RuntimeError(f"{func} draws from an explicit generator on the host: not capturable")
        flat, spec = tree_flatten((args, kwargs))
        recorded = [_Slot(self.slot_of[id(a)]) if isinstance(a, torch.Tensor) and id(a) in self.slot_of else a
                    for a in flat]
        out = func(*args, **kwargs)
        flat_out, _ = tree_flatten(out)
        slots = []
        for value in flat_out:
            if isinstance(value, torch.Tensor):
                self.slot_of[id(value)] = len(self.made)  # an in-place op's result too: the same tensor
                self.made.append(value)
                slots.append(self.slot_of[id(value)])
            else:
                slots.append(None)
        self.ops.append((func, spec, recorded, slots))
        return out


def recorded_capture(run: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """Record ``run``'s operations once; returns (replay, static output) like
    ``cuda_graph_capture``. Each replay re-runs the recorded operations (reading the tensors they
    captured as they are now) and copies the result into the static output."""
    recorder = _Recorder()
    with recorder:
        output = run()
    ops, out_slot = recorder.ops, recorder.slot_of[id(output)]
    recorder.made.clear()

    def replay() -> None:
        values: dict[int, torch.Tensor] = {}
        for func, spec, recorded, slots in ops:
            flat = [values[a.index] if isinstance(a, _Slot) else a for a in recorded]
            args, kwargs = tree_unflatten(flat, spec)
            flat_out, _ = tree_flatten(func(*args, **kwargs))
            for slot, value in zip(slots, flat_out):
                if slot is not None:
                    values[slot] = value
        output.copy_(values[out_slot])

    return replay, output


class CountingCapture:
    """``recorded_capture`` that counts captures and replays."""

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def __call__(self, run):
        self.captures += 1
        replay, output = recorded_capture(run)

        def counted():
            self.replays += 1
            replay()

        return counted, output
