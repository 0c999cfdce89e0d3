"""The UNet's evaluation replayed from captured CUDA graphs (``--cuda_graphs``).

An eager UNet call launches about a thousand kernels, one Python dispatch each; on a fast GPU the
GPU then waits for the host. A CUDA graph records those launches once and replays them with one
call. A graph reads and writes fixed memory, so :class:`StaticShapeCalls` keeps, per distinct
input signature (:class:`Signature`), static buffers for the latent batch ``x``, the timesteps and
the conditioning ``context``; every call copies its inputs into them (device-to-device, no host
sync), replays, and returns a copy of the static output. The timesteps are an input, so a change
of step count, strength or sampler reuses the same graph.

**Signatures.** A graph is captured per: the shape of ``x`` (batch, 4, h, w), of the timesteps and
of ``context`` (batch, tokens, D: a conditioning of another length or width, e.g. an SD 2.x model's
D = 1024, is another graph), their dtypes, the device, inference mode, and the forward hooks on the
UNet's modules (:func:`hook_ids`: hooks are Python, which a replay does not run, so a
graph captured with ``--bend ...@middle_block`` is never replayed without it, nor the other way).
With classifier-free guidance the batch is [uncond; cond], 2B; a frame whose ``--scale`` is 1
calls the UNet with the conditional batch alone, B: **``--scale 1`` is its own signature**.

**How many graphs.** Each graph holds a private memory pool (the allocations of one captured UNet
forward; not yet measured on a GPU). When a call brings a new latent size (h, w) or another set of
hooks, the graphs of other sizes or hooks are released at once with their static buffers (a render
never returns to them; PyTorch frees a released graph's pool when it next releases cached memory:
``torch.cuda.empty_cache()``, or an allocation that would not fit otherwise); at most
:data:`MAX_SIGNATURES` are kept in any case. So a render keeps **one graph**, two when its
``--scale`` schedule is 1 on some frames and not on others; an image job one per batch size.

How a call is recorded and replayed is injected (``capture``): :func:`cuda_graph_capture` on a
GPU; on a CPU, tests/graph_recorder.py records the call's operations and replays them without
running Python, as a graph does. Before capturing, the call runs once eagerly on the static
inputs (lazy state such as a block bend's noise buffers is made then, never while capturing).
What cannot be captured (autocast, autograd, other inputs, another device, a capture that
raises) runs eagerly, with one debug log per reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

Replay = Callable[[], None]
Capture = Callable[[Callable[[], torch.Tensor]], "tuple[Replay, torch.Tensor]"]
MAX_SIGNATURES = 8  # each graph keeps its own memory pool: bound how many are held at once
WARMUP_CALLS = 2  # eager calls on a side stream before capturing (cuDNN/cuBLAS choose their kernels)


def cuda_graph_capture(run: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
    """Record ``run`` (which reads the static inputs) in a ``torch.cuda.CUDAGraph``.

    ``run`` first runs :data:`WARMUP_CALLS` times on a side stream, as PyTorch's graph notes
    ask; the graph gets its own memory pool. Returns (graph.replay, the graph's static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = run()
    return graph.replay, output


@dataclass
class StaticCall:
    """One captured signature: its input buffers (x, timesteps, context), output and replay."""

    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    output: torch.Tensor
    replay: Replay


class Signature(NamedTuple):
    """What a captured call depends on besides the values of its inputs."""

    x_shape: tuple[int, ...]
    x_dtype: torch.dtype
    timesteps_shape: tuple[int, ...]
    timesteps_dtype: torch.dtype
    context_shape: tuple[int, ...]
    context_dtype: torch.dtype
    device: str
    inference_mode: bool
    hooks: tuple[int, ...]

    def outlives(self, other: Signature) -> bool:
        """Whether a graph of this signature may still be called once ``other`` is: same latent
        size (h, w) and same hooks (batch, context, dtype may differ)."""
        return self.x_shape[2:] == other.x_shape[2:] and self.hooks == other.hooks


def hook_ids(module: torch.nn.Module) -> Callable[[], tuple[int, ...]]:
    """A function giving the handle ids of the forward (pre-)hooks registered now on ``module``, its
    submodules and globally. Ids never repeat in a process, so a hook removed and another registered
    give another tuple. The hook dicts are gathered once (modules keep theirs): a call costs about
    66 us for SD v1's 821 modules (5,000 calls on the meta-device UNet of v1-inference.yaml, a busy
    2-core CPU), no Python loop per module."""
    from torch.nn.modules import module as module_globals

    dicts = [module_globals._global_forward_pre_hooks, module_globals._global_forward_hooks]
    dicts += [hooks for m in module.modules() for hooks in (m._forward_pre_hooks, m._forward_hooks)]
    return lambda: tuple(chain.from_iterable(filter(None, dicts)))


class StaticShapeCalls:
    """``fn(x, timesteps, context=...)`` (the UNet's forward) through static buffers, one captured
    call per :class:`Signature`, graphs made stale by a new size or new hooks released.

    ``capture``: records a call, see :func:`cuda_graph_capture`; ``device_type``: the only device
    whose tensors it captures ('cuda' for graphs); ``hooks``: the ids of the hooks that run inside
    ``fn`` (:func:`hook_ids` of the UNet; none by default)."""

    def __init__(self, fn: Callable[..., torch.Tensor], *, capture: Capture, device_type: str = "cuda",
                 max_signatures: int = MAX_SIGNATURES, hooks: Callable[[], tuple[int, ...]] = tuple):
        self.fn = fn
        self.capture = capture
        self.device_type = device_type
        self.max_signatures = max_signatures
        self.hooks = hooks
        self.calls: dict[Signature, StaticCall] = {}
        self.refused: dict[Signature, str] = {}  # signatures whose capture failed, with the reason
        self._logged: set[str] = set()

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        reason = self._refusal(x, timesteps, context, kwargs)
        call = None
        if reason is None:
            key = self.signature(x, timesteps, context)
            call = self.calls.get(key)
            if call is None:
                call, reason = self._new_call(key, x, timesteps, context)
        if call is None:
            self._log_once(reason)
            return self.fn(x, timesteps, context=context, **kwargs)
        for buffer, value in zip(call.inputs, (x, timesteps, context)):
            buffer.copy_(value)
        call.replay()
        return call.output.clone()  # the next replay overwrites the static output

    def signature(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> Signature:
        """The :class:`Signature` of a call with these inputs, under the current hooks and mode."""
        return Signature(tuple(x.shape), x.dtype, tuple(timesteps.shape), timesteps.dtype, tuple(context.shape),
                         context.dtype, str(x.device), torch.is_inference_mode_enabled(), self.hooks())

    def _refusal(self, x, timesteps, context, kwargs) -> str | None:
        """Why this call cannot be replayed from a captured one, or None."""
        if kwargs or context is None:
            return "inputs other than (x, timesteps, context)"
        tensors = (x, timesteps, context)
        if not all(isinstance(t, torch.Tensor) and t.device.type == self.device_type for t in tensors):
            return f"inputs not all on {self.device_type}"
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return "gradients enabled (graphs are replayed for inference only)"
        if torch.is_autocast_enabled(x.device.type):
            return "autocast (--precision autocast) is on"
        return None

    def release_stale(self, key: Signature) -> int:
        """Drop the captured calls (and refusals) that a call of signature ``key`` made stale
        (:meth:`Signature.outlives`); returns how many graphs were released."""
        stale = [old for old in self.calls if not old.outlives(key)]
        for old in stale:
            del self.calls[old]  # the last reference to its graph: its memory pool is freed with it
        self.refused = {old: why for old, why in self.refused.items() if old.outlives(key)}
        if stale:
            log.debug("released %d CUDA graph(s) of another picture size or other hooks", len(stale))
        return len(stale)

    def _new_call(self, key, x, timesteps, context) -> tuple[StaticCall | None, str | None]:
        if key in self.refused:
            return None, self.refused[key]
        self.release_stale(key)
        if len(self.calls) >= self.max_signatures:
            return None, f"more than {self.max_signatures} input shapes captured already"
        inputs = tuple(value.clone() for value in (x, timesteps, context))

        def run() -> torch.Tensor:
            return self.fn(inputs[0], inputs[1], context=inputs[2])

        run()  # eagerly first: lazy state (kernel choices, bend noise buffers) is made outside the capture
        try:
            replay, output = self.capture(run)
        except RuntimeError as exc:  # CUDA errors (a host sync while capturing, out of memory) included
            self.refused[key] = f"capture failed for shape {tuple(x.shape)} ({type(exc).__name__}: {exc})"
            return None, self.refused[key]
        call = StaticCall(inputs=inputs, output=output, replay=replay)
        self.calls[key] = call
        log.debug("captured the UNet call for x %s, context %s (%d captured)", tuple(x.shape),
                  tuple(context.shape), len(self.calls))
        return call, None

    def _log_once(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.debug("UNet call runs eagerly, not from a CUDA graph: %s", reason)


def use_static_calls(unet: torch.nn.Module, *, capture: Capture = cuda_graph_capture,
                     device_type: str = "cuda") -> StaticShapeCalls:
    """Route ``unet``'s forward (already compiled or not) through :class:`StaticShapeCalls`, with
    the hooks on ``unet``'s modules in the signature. Returns the wrapper (its ``calls`` show what
    was captured)."""
    wrapper = StaticShapeCalls(unet.forward, capture=capture, device_type=device_type, hooks=hook_ids(unet))
    unet.forward = wrapper
    return wrapper
