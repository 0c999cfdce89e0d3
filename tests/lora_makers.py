"""LoRA files for the LoRA tests, made from seeded random tensors (not a test module).

Names are written out by the tests themselves (kohya ``lora_unet_down_blocks_0_...``, diffusers'
dotted names), never produced by the code under test."""
import torch
from safetensors.torch import save_file


def random_pair(out: int, inp: int, rank: int, kernel: int = 0, seed: int = 0):
    """(down, up) of a module of the given size: down (rank, in) for a linear layer, (rank, in, k, k)
    for a k x k convolution (kernel=k), up (out, rank) or (out, rank, 1, 1) to go with it."""
    g = torch.Generator().manual_seed(seed)
    if kernel:
        down = torch.randn(rank, inp, kernel, kernel, generator=g) * 0.3
        up = torch.randn(out, rank, 1, 1, generator=g) * 0.3
    else:
        down = torch.randn(rank, inp, generator=g) * 0.3
        up = torch.randn(out, rank, generator=g) * 0.3
    return down, up


def kohya(stem: str, down, up, alpha=None) -> dict:
    tensors = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    if alpha is not None:
        tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return tensors


def peft(name: str, down, up) -> dict:
    return {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}


def save(path, tensors: dict, metadata: dict | None = None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def update(down, up, scale: float, shape) -> torch.Tensor:
    """scale * up @ down as a weight of ``shape``, in float64: the merge written out independently."""
    product = up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)
    return (scale * product).reshape(shape)
