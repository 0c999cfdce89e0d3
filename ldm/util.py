"""Building models from CompVis configs and loading their checkpoints.

``instantiate_from_config`` / ``get_obj_from_str`` keep CompVis's names and meaning;
``load_model_from_config`` is the one way this project turns a config plus a checkpoint file
into a ready model (strict key checks, no arbitrary pickle code, see ``ldm.checkpoint``).
"""
import copy
import importlib
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ldm import checkpoint
from ldm.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["CheckpointError", "UnsafeCheckpointError", "default_device", "get_obj_from_str",
           "instantiate_from_config", "load_model_from_config", "fill_computed_buffers"]

logger = logging.getLogger(__name__)


def get_obj_from_str(string, reload=False):
    """The object named by a dotted path, e.g. "ldm.models.autoencoder.AutoencoderKL"."""
    module_name, name = string.rsplit(".", 1)
    module = importlib.import_module(module_name)
    if reload:
        module = importlib.reload(module)
    return getattr(module, name)


def instantiate_from_config(config):
    """``target(**params)`` for a config node with ``target`` and optional ``params``.

    As upstream, the placeholders "__is_first_stage__" and "__is_unconditional__" give None.
    """
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


def default_device() -> torch.device:
    """CUDA if available, else Apple MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def fill_computed_buffers(model: torch.nn.Module) -> None:
    """Gives every buffer of ``model`` still on the meta device its computed value, on the CPU.

    A model built under ``torch.device("meta")`` gets its weights from the checkpoint
    (``load_state_dict(..., assign=True)``); buffers computed in ``__init__`` that the file may
    not hold (the noise schedule, CLIP's position ids, EMA counters) are recomputed here by the
    modules that own them: a module with such buffers has a ``computed_buffers()`` method
    returning ``{dotted name below the module: CPU tensor}``. Values the file held are kept.
    Raises CheckpointError naming what is still without a value afterwards.
    """
    for module in model.modules():
        compute = getattr(module, "computed_buffers", None)
        if compute is None:
            continue
        for name, value in compute().items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if owner._buffers[leaf] is not None and owner._buffers[leaf].is_meta:
                owner._buffers[leaf] = value
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise CheckpointError(f"{len(empty)} tensors of the model got no value ({', '.join(empty[:3])}): "
                              f"the checkpoint lacks them and nothing computes them")


def _read_config(config) -> tuple[DictConfig, str]:
    """(config, how to name it in messages) from a YAML path, a dict or an OmegaConf node.

    A config loaded elsewhere may carry its file in ``source_path`` (the engine sets it)."""
    if isinstance(config, (str, Path)):
        return OmegaConf.load(config), str(config)
    if not isinstance(config, DictConfig):
        config = OmegaConf.create(config)
    return config, str(config.get("source_path") or "the config")


def _fit_unet_params(config: DictConfig, state_dict: dict, ckpt) -> DictConfig:
    """``config``, or a copy whose UNet params gain what the checkpoint's keys imply and the config
    leaves unset (``checkpoint.unet_params_of_keys``: an LCM-distilled UNet's time_cond_proj_dim)."""
    implied = checkpoint.unet_params_of_keys({k: t.shape for k, t in state_dict.items()})
    unet = OmegaConf.select(config, "model.params.unet_config")
    if unet is None or not implied:
        return config
    params = unet.get("params") or {}
    unset = {k: v for k, v in implied.items() if params.get(k) is None}
    if not unset:
        return config
    config = copy.deepcopy(config)
    for key, value in unset.items():
        OmegaConf.update(config, f"model.params.unet_config.params.{key}", value, force_add=True)
    logger.info("%s: a UNet with a guidance-scale embedding (LCM-distilled); set %s", ckpt,
                ", ".join(f"{k}: {v}" for k, v in unset.items()))
    return config


def load_model_from_config(config, ckpt, device=None, verbose=False):
    """A model built from ``config`` with the weights of the checkpoint file ``ckpt``.

    config: an OmegaConf node or dict with a top-level ``model`` section, or a path to a YAML file.
    ckpt: a ``.safetensors`` or torch ``.ckpt``/``.pt``/``.pth`` file (see ``ldm.checkpoint``).
    device: where the model goes (default: ``default_device()``).
    UNet params the file's keys imply and the config leaves out are added (an LCM-distilled UNet's
    ``time_cond_proj_dim``, see ``ldm.checkpoint_keys.unet_params_of_keys``).
    Returns the model in eval mode with ``requires_grad`` off, in the dtype the config builds
    (weights stored as float16 are cast). Raises CheckpointError (UnsafeCheckpointError for a
    pickle that would run code) when the file is unusable or does not fit the config.
    """
    config, config_name = _read_config(config)
    if "model" not in config:
        raise ValueError(f"{config_name} has no top-level 'model' section: it is not a CompVis model config")
    # Read the file first: a bad file should fail before seconds are spent building the model.
    state_dict = checkpoint.read_state_dict(ckpt)
    config = _fit_unet_params(config, state_dict, ckpt)
    # Built on the meta device: no memory and no random initialization for weights the file replaces.
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    state_dict = checkpoint.fit_state_dict(state_dict, model.state_dict(), ckpt_name=str(ckpt),
                                           config_name=config_name)
    # fit_state_dict checked every key and shape and cast to the model's dtypes; the file's tensors
    # become the model's (no copy).
    model.load_state_dict(state_dict, strict=False, assign=True)
    fill_computed_buffers(model)
    (logger.info if verbose else logger.debug)("loaded %d tensors from %s", len(state_dict), ckpt)
    del state_dict
    model.eval().requires_grad_(False)
    return model.to(default_device() if device is None else device)
