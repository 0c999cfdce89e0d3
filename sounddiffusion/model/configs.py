"""Which CompVis config builds a checkpoint's model: picked from the checkpoint's family (SD v1 or
2.x, told by its keys) when ``--config`` is not given, checked against it when it is, and read
with one-line errors."""
from __future__ import annotations

import logging
from pathlib import Path

from ldm.checkpoint_keys import SD_V1, SD_V2

from sounddiffusion.errors import ModelError
from sounddiffusion.settings import DEFAULT_CONFIG, V2_CONFIG, V2_V_CONFIG, shown_path

log = logging.getLogger(__name__)

FAMILY_NAMES = {SD_V1: "SD v1", SD_V2: "SD 2.x"}


def config_for_family(family: str | None, checkpoint_name: str) -> Path:
    """The config for a checkpoint of ``family`` ("sd-v1", "sd-v2" or None) named ``checkpoint_name``.

    SD 2.x: ``v2-inference-v.yaml`` (v-prediction) when the name contains "768" (the 768-v and 512
    base files have the same keys, only the name tells them apart), else ``v2-inference.yaml``;
    SD v1 and unknown files: ``v1-inference.yaml``."""
    if family == SD_V2:
        return V2_V_CONFIG if "768" in checkpoint_name else V2_CONFIG
    return DEFAULT_CONFIG


def config_family(config) -> str | None:
    """"sd-v1", "sd-v2" or None for a loaded config, from its text encoder (OpenCLIP: SD 2.x)."""
    target = str(config.model.get("params", {}).get("cond_stage_config", {}).get("target", ""))
    if target.endswith(".FrozenOpenCLIPEmbedder"):
        return SD_V2
    if target.endswith(".FrozenCLIPEmbedder"):
        return SD_V1
    return None


def _picked_config_note(config: Path, family: str | None, checkpoint: Path) -> str:
    """The one line that says which config was picked for ``checkpoint``, and how to choose another."""
    shown = shown_path(config)
    if family is None:
        return (f"config {shown}: the model family of {shown_path(checkpoint)} cannot be told from its keys; "
                f"pass --config for another")
    why = f"{shown_path(checkpoint)} is {FAMILY_NAMES[family]}"
    if config == V2_V_CONFIG:
        return (f"config {shown} ({why}, v-prediction as its name says 768); "
                f"pass --config {shown_path(V2_CONFIG)} if it is not a 768-v model")
    if config == V2_CONFIG:
        return f"config {shown} ({why}); for a 768-v model pass --config {shown_path(V2_V_CONFIG)}"
    return f"config {shown} ({why}); pass --config for another"


def model_config_for(checkpoint: Path, config: str | Path | None):
    """The loaded config to build ``checkpoint``'s model from.

    ``config`` None: :func:`config_for_family` of the file's family, named in a log line. Given: it
    must build the file's family; otherwise ModelError says which family the file is and which config
    to pass. Raises CheckpointError for a file whose keys cannot be read."""
    from ldm.checkpoint import checkpoint_family

    family = checkpoint_family(checkpoint)
    if config is None:
        chosen = config_for_family(family, checkpoint.name)
        log.info("%s", _picked_config_note(chosen, family, checkpoint))
        return load_config(chosen)
    model_config = load_config(config)
    builds = config_family(model_config)
    if family and builds and family != builds:
        fitting = shown_path(config_for_family(family, checkpoint.name))
        raise ModelError(f"{shown_path(checkpoint)} is an {FAMILY_NAMES[family]} checkpoint but {config} "
                         f"builds {FAMILY_NAMES[builds]}: pass --config {fitting} (or leave out --config)")
    return model_config


def load_config(path: str | Path):
    """Read a CompVis-format YAML config. Raises ModelError when missing or not valid YAML."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"config {path} is missing: leave out --config for the default "
                         f"({shown_path(DEFAULT_CONFIG)}) or pass the path of an existing config")
    try:
        config = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ModelError(f"config {path} is not valid YAML ({reason}): fix it or use "
                         f"configs/stable-diffusion/v1-inference.yaml") from None
    if not hasattr(config, "get") or "model" not in config or "target" not in config.model:
        raise ModelError(f"config {path} has no 'model: target: ...' section: it is not a "
                         f"Stable Diffusion config; use configs/stable-diffusion/v1-inference.yaml")
    config.source_path = str(path)
    return config
