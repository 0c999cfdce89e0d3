"""Building models from CompVis configs and loading their checkpoints.

``instantiate_from_config`` / ``get_obj_from_str`` keep CompVis's names and meaning;
``load_model_from_config`` is the one way this project turns a config plus a checkpoint file
into a ready model (strict key checks, no arbitrary pickle code, see ``ldm.checkpoint``).
"""
import importlib
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint file that cannot be used: missing, unreadable, or not fitting the config."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint that asks to call code able to run commands; refused before anything ran."""


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


_RANDOM_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                 "xavier_uniform_", "xavier_normal_", "orthogonal_")


@contextmanager
def _random_init_skipped():
    """While building a model whose every weight is then loaded, ``torch.nn.init``'s random fills
    (called by the layers' reset_parameters) do nothing: for SD v1 they cost ~10 s on a CPU.

    The weights hold uninitialized memory until loaded; load_model_from_config's strict check
    guarantees each one is overwritten. Buffers computed in __init__ (noise schedule) are unaffected.
    """
    saved = {name: getattr(torch.nn.init, name) for name in _RANDOM_INITS}

    def unchanged(tensor, *args, **kwargs):
        return tensor

    try:
        for name in _RANDOM_INITS:
            setattr(torch.nn.init, name, unchanged)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _read_config(config) -> tuple[DictConfig, str]:
    """(config, how to name it in messages) from a YAML path, a dict or an OmegaConf node.

    A config loaded elsewhere may carry its file in ``source_path`` (the engine sets it)."""
    if isinstance(config, (str, Path)):
        return OmegaConf.load(config), str(config)
    if not isinstance(config, DictConfig):
        config = OmegaConf.create(config)
    return config, str(config.get("source_path") or "the config")


def load_model_from_config(config, ckpt, device=None, verbose=False):
    """A model built from ``config`` with the weights of the checkpoint file ``ckpt``.

    config: an OmegaConf node or dict with a top-level ``model`` section, or a path to a YAML file.
    ckpt: a ``.safetensors`` or torch ``.ckpt``/``.pt``/``.pth`` file (see ``ldm.checkpoint``).
    device: where the model goes (default: ``default_device()``).
    Returns the model in eval mode with ``requires_grad`` off, in the dtype the config builds
    (weights stored as float16 are cast). Raises CheckpointError (UnsafeCheckpointError for a
    pickle that would run code) when the file is unusable or does not fit the config.
    """
    from ldm.checkpoint import fit_state_dict, read_state_dict

    config, config_name = _read_config(config)
    if "model" not in config:
        raise ValueError(f"{config_name} has no top-level 'model' section: it is not a CompVis model config")
    # Read the file first: a bad file should fail before seconds are spent building the model.
    state_dict = read_state_dict(ckpt)
    with _random_init_skipped():
        model = instantiate_from_config(config.model)
    state_dict = fit_state_dict(state_dict, model.state_dict(), ckpt_name=str(ckpt), config_name=config_name)
    model.load_state_dict(state_dict, strict=False)  # fit_state_dict already checked every key and shape
    (logger.info if verbose else logger.debug)("loaded %d tensors from %s", len(state_dict), ckpt)
    del state_dict
    model.eval().requires_grad_(False)
    return model.to(default_device() if device is None else device)
