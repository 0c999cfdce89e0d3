"""The UNet's evaluation replayed from captured CUDA graphs (``--cuda_graphs``).

An eager UNet call launches about a thousand kernels, one Python dispatch each; on a fast GPU the
GPU then waits for the host. A CUDA graph records those launches once and replays them with one
call. A graph reads and writes fixed memory, so :class:`StaticShapeCalls` keeps, per distinct
input signature (shapes, dtypes, device), static buffers for the latent batch ``x`` (2B, 4, h, w),
the timesteps (2B,) and the conditioning (2B, 77, D) (the guidance batch [uncond; cond]); every
call copies its inputs into them (device-to-device, no host sync), replays, and returns a copy of
the static output. The timesteps are an input, so a change of step count or strength reuses the
same graph; a new picture size (or batch) captures a new one.

How a call is recorded and replayed is injected (``capture``): :func:`cuda_graph_capture` on a
GPU, :func:`eager_capture` (runs the function again on the static buffers) where there is none,
which is how the buffer handling is tested on a CPU. What cannot be captured (autocast, autograd,
other inputs, another device, a capture that raises) runs eagerly, with one debug log per reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)

Replay = Callable[[], None]
Capture = Callable[[Callable[[], torch.Tensor]], "tuple[Replay, torch.Tensor]"]
MAX_SIGNATURES = 8  # each graph keeps its own memory pool: bound how many a process holds
WARMUP_CALLS = 2  # eager calls on a side stream before capturing (cuDNN/cuBLAS choose their kernels)


def eager_capture(run: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
    """``run`` once for the static output; each replay runs it again and copies into that output.

    Numerically the same as calling ``run`` (the stand-in for a graph where there is no GPU)."""
    output = run()

    def replay() -> None:
        output.copy_(run())

    return replay, output


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


def _signature(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> tuple:
    """What a captured call depends on besides values: shapes, dtypes, device, inference mode."""
    return (tuple(x.shape), x.dtype, tuple(timesteps.shape), timesteps.dtype, tuple(context.shape),
            context.dtype, str(x.device), torch.is_inference_mode_enabled())


class StaticShapeCalls:
    """``fn(x, timesteps, context=...)`` (the UNet's forward) through static buffers, one captured
    call per input signature, at most ``max_signatures`` of them.

    ``capture``: records a call, see :func:`cuda_graph_capture` / :func:`eager_capture`;
    ``device_type``: the only device whose tensors it captures ('cuda' for graphs)."""

    def __init__(self, fn: Callable[..., torch.Tensor], *, capture: Capture, device_type: str = "cuda",
                 max_signatures: int = MAX_SIGNATURES):
        self.fn = fn
        self.capture = capture
        self.device_type = device_type
        self.max_signatures = max_signatures
        self.calls: dict[tuple, StaticCall] = {}
        self.refused: dict[tuple, str] = {}  # signatures whose capture failed, with the reason
        self._logged: set[str] = set()

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        reason = self._refusal(x, timesteps, context, kwargs)
        call = None
        if reason is None:
            key = _signature(x, timesteps, context)
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

    def _new_call(self, key, x, timesteps, context) -> tuple[StaticCall | None, str | None]:
        if key in self.refused:
            return None, self.refused[key]
        if len(self.calls) >= self.max_signatures:
            return None, f"more than {self.max_signatures} input shapes captured already"
        inputs = tuple(value.clone() for value in (x, timesteps, context))
        try:
            replay, output = self.capture(lambda: self.fn(inputs[0], inputs[1], context=inputs[2]))
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
    """Route ``unet``'s forward (already compiled or not) through :class:`StaticShapeCalls`.
    Returns the wrapper (its ``calls`` show what was captured)."""
    wrapper = StaticShapeCalls(unet.forward, capture=capture, device_type=device_type)
    unet.forward = wrapper
    return wrapper
