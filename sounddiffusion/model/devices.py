"""Where the model runs and in what precision: ``--device``, ``--precision``, ``--cuda_graphs``
checked against this machine."""
from __future__ import annotations

import torch

from sounddiffusion.errors import DeviceError, ParameterError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA, else Apple MPS, else CPU. Raises DeviceError for an unavailable device."""
    from ldm.util import default_device

    if name in (None, "auto"):
        return default_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda, but PyTorch sees no CUDA GPU here: install a CUDA build "
                          "of torch (see README), or use --device cpu")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError("--device mps, but Apple MPS is not available here: use --device cpu")
    return torch.device(name)


def weight_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the weights are cast to for ``--precision`` on ``device``."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision in ("full", "autocast"):
        return torch.float32
    if device.type == "mps":
        raise ParameterError(f"--precision {precision}: Apple MPS runs float32; use --precision full")
    if precision == "fp16":
        if device.type != "cuda":
            raise ParameterError("--precision fp16 needs a CUDA GPU: on CPU use full (or bf16)")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    raise ParameterError(f"--precision {precision}: use one of auto, full, autocast, fp16, bf16")


def check_cuda_graphs(cuda_graphs: bool, device: torch.device) -> None:
    """Raises ParameterError when ``--cuda_graphs`` is asked for on a device other than CUDA."""
    if cuda_graphs and device.type != "cuda":
        raise ParameterError(f"--cuda_graphs needs a CUDA GPU, but the model runs on {device.type}: "
                             f"leave --cuda_graphs out")
