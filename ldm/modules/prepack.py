"""Faster CPU inference: convolution and linear weights pre-packed for oneDNN, once.

PyTorch's eager CPU convolutions and oneDNN linear layers reorder their weight into oneDNN's
blocked layout on every call. For SD v1's UNet that is ~3.4 GB of weights rewritten, into freshly
allocated memory, at every denoising step: at the small latent sizes of CPU renders this costs more
than the arithmetic. :func:`prepack_weights` turns the ``nn.Conv2d``/``nn.Linear`` layers of a
module into :class:`PrepackedConv2d`/:class:`PrepackedLinear`, which pack their weight once per
input shape and reuse it.

The dense weights stay the parameters (state dicts, ``.to()``, training are unchanged); the packed
copy is a cache beside them (as much memory again), used only for float32 CPU inference without
autograd or autocast. Anything else runs the layer's ordinary forward.
"""
import torch
import torch.nn.functional as F
from torch import nn


def prepack_supported() -> bool:
    """Whether this PyTorch build has oneDNN and the packed-weight operators."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_convolution_pointwise", "_reorder_convolution_weight",
                                        "_linear_pointwise", "_reorder_linear_weight"))


def _packable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Float32 CPU inference: no gradient to record and no autocast to honour."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.is_autocast_enabled("cpu"))


class _PackedWeight:
    """The packed copy of one weight for the last input shape it served.

    Keyed on the input shape (oneDNN picks the layout for it) and on the weight's storage and
    version counter, so that loading or editing the weight repacks it."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, weight: torch.Tensor, shape: tuple, pack) -> torch.Tensor:
        key = (shape, weight.data_ptr(), weight._version)
        if key != self.key:
            self.key, self.value = None, None  # free the old copy before making the new one
            with torch.no_grad():
                self.value = pack(weight.detach())
            self.key = key
        return self.value


class PrepackedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose float32 CPU inference uses a weight packed once per input shape."""

    def forward(self, x):
        """x: (B, C_in, H, W) -> (B, C_out, H', W'), as ``nn.Conv2d``."""
        if not (_packable(x, self.weight) and self.padding_mode == "zeros" and isinstance(self.padding, tuple)):
            return super().forward(x)
        padding, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)
        packed = self._packed_weight.get(
            self.weight, tuple(x.shape),
            lambda w: torch.ops.mkldnn._reorder_convolution_weight(w, padding, stride, dilation, self.groups,
                                                                   list(x.shape)))
        return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, padding, stride, dilation,
                                                       self.groups, "none", [], "")


class PrepackedLinear(nn.Linear):
    """``nn.Linear`` whose float32 CPU inference uses a weight packed once per number of rows."""

    def forward(self, x):
        """x: (..., in_features) -> (..., out_features), as ``nn.Linear``."""
        if not _packable(x, self.weight) or x.dim() < 2:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        packed = self._packed_weight.get(
            self.weight, tuple(rows.shape),
            lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows.shape[0]))
        out = torch.ops.mkldnn._linear_pointwise(rows, packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


_PREPACKED = {nn.Conv2d: PrepackedConv2d, nn.Linear: PrepackedLinear}


def prepack_bytes(module: nn.Module) -> int:
    """How much memory the packed copies of ``module``'s layers will take, in bytes."""
    return sum(layer.weight.numel() * layer.weight.element_size()
               for layer in module.modules() if type(layer) in _PREPACKED or type(layer) in _PREPACKED.values())


def prepack_weights(module: nn.Module) -> int:
    """Turns every plain ``nn.Conv2d`` and ``nn.Linear`` inside ``module`` into its pre-packed
    variant, in place (same parameters, same state dict). Returns how many layers changed;
    0 when :func:`prepack_supported` is false."""
    if not prepack_supported():
        return 0
    changed = 0
    for layer in module.modules():
        packed_class = _PREPACKED.get(type(layer))
        if packed_class is not None:
            layer.__class__ = packed_class
            layer._packed_weight = _PackedWeight()
            changed += 1
    return changed
