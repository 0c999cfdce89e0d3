"""Exponential-moving-average weights as stored in CompVis checkpoints (`model_ema.*`)."""
import torch
from torch import nn


class LitEma(nn.Module):
    """Holds an EMA copy of a model's trainable parameters as buffers.

    Buffers: `decay`, `num_updates` and one per parameter, named like the parameter without its
    dots (`diffusion_model.out.0.weight` -> `diffusion_modelout0weight`), so checkpoints with EMA
    weights load into it. Only the inference side exists: swapping the EMA weights in and out.
    """

    def __init__(self, model, decay=0.9999, use_num_updates=True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay {decay} must be between 0 and 1")
        self._initial_counters = (decay, use_num_updates)
        for name, value in self.computed_buffers().items():
            self.register_buffer(name, value)
        self.m_name2s_name = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone())
        self.collected_params = []

    def computed_buffers(self) -> dict:
        """The counters' initial values, ``decay`` and ``num_updates``, as CPU scalar tensors."""
        decay, use_num_updates = self._initial_counters
        return {"decay": torch.tensor(decay, dtype=torch.float32, device="cpu"),
                "num_updates": torch.tensor(0 if use_num_updates else -1, dtype=torch.int, device="cpu")}

    @torch.no_grad()
    def copy_to(self, model):
        """Overwrites the parameters of `model` that have EMA weights with them.

        Unlike upstream this does not look at `requires_grad`: loaded models are frozen for
        inference, and their EMA weights must still apply.
        """
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.m_name2s_name:
                p.copy_(shadow[self.m_name2s_name[name]])

    def store(self, parameters):
        """Saves copies of `parameters` (an iterable of tensors) to put back with `restore`."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters):
        """Puts back the values saved by `store` into `parameters` (the same iterable order)."""
        for saved, p in zip(self.collected_params, parameters):
            p.copy_(saved)
        self.collected_params = []
