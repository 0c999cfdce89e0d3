"""``--lora PATH[:WEIGHT]`` as the command lines take it: the file and its weight, checked before the
model loads, merged into the loaded model, and recorded by content in outputs' metadata.

WEIGHT is a number (1.0 when left out; negative allowed) or, on audio2video, a schedule over the
music (``style.safetensors:"0.2 + 0.8*low"``, evaluated per frame by
:mod:`sounddiffusion.control.frame_schedules`). Paths may hold colons (``C:\\loras\\style.safetensors``,
``a:b.safetensors``): the weight starts after the leftmost colon whose remainder reads as a weight
(a plain number; on audio2video also a schedule, whose keyframes hold colons themselves), and a
text that names an existing file is that file at weight 1.

Constant weights are merged once (:func:`~sounddiffusion.model.lora.apply_loras`); when a weight is
scheduled all files are loaded with :func:`~sounddiffusion.model.lora.load_loras` so the frame loop
can change weights per frame (scheduled ones start at 0 until the first frame sets them).
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from sounddiffusion.control.frame_schedules import VARIABLES
from sounddiffusion.control.schedules import parse_schedule
from sounddiffusion.errors import ParameterError, ScheduleError
from sounddiffusion.model.lora import LoraInfo, LoraPatch, apply_loras, load_loras
from sounddiffusion.model.lora_files import lora_info, lora_modules, read_lora

log = logging.getLogger(__name__)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora``: ``path``, ``weight`` the weight's text ("1.0" when left out), ``constant``
    its value when it is a number (None: a schedule, audio2video only), ``info`` the file's hashes
    (taken once, when parsed: outputs' records and the merge reuse them)."""

    path: Path
    weight: str
    constant: float | None
    info: LoraInfo


def _weight(text: str, *, schedules: bool, flag: str) -> float | None | bool:
    """The weight's value for a number, None for a valid schedule (``schedules`` only), False for
    text that is neither."""
    text = text.strip()
    if _NUMBER.fullmatch(text):
        value = float(text)
        return value if math.isfinite(value) else False
    if not schedules or not text:
        return False
    try:
        schedule = parse_schedule(text, flag=flag, names=VARIABLES)
    except ScheduleError:
        return False
    return schedule.constant if schedule.is_constant else None


def parse_lora_spec(text: str, *, schedules: bool = False) -> LoraSpec:
    """``PATH[:WEIGHT]`` -> :class:`LoraSpec` (the module docstring says where the weight starts).

    The file must exist and be a LoRA file of a known format (:func:`check_lora_file`).
    Raises ParameterError/ScheduleError for a weight that is not a number (or, with ``schedules``,
    a valid schedule), ModelError for the file; one line each, before any model loads."""
    text = str(text)
    whole = Path(text)
    path, weight, constant = (whole, "1.0", 1.0) if _is_file(whole) or ":" not in text else _split(
        text, schedules=schedules)
    return LoraSpec(path, weight, constant, check_lora_file(path))


def _split(text: str, *, schedules: bool) -> tuple[Path, str, float | None]:
    """(path, weight's text, constant) of a text with a colon that does not name a file as a whole."""
    colons = [i for i, c in enumerate(text) if c == ":" and 0 < i < len(text) - 1]
    for i in colons:
        path, weight = text[:i], text[i + 1:]
        value = _weight(weight, schedules=schedules, flag=f"--lora {path}")
        if value is not False:
            return Path(path), weight.strip(), value
    for i in colons:  # no weight reads: if the text before a colon is a file, its weight is wrong
        path, weight = text[:i], text[i + 1:]
        if _is_file(Path(path)):
            if schedules:  # the schedule's own error names the column
                parse_schedule(weight, flag=f"--lora {path}", names=VARIABLES)
            raise ParameterError(f"--lora {text}: the weight {weight!r} is not a number; give PATH:WEIGHT "
                                 f"such as {path}:0.8" + ("" if schedules else
                                                         " (a schedule as the weight: audio2video.py only)"))
    return Path(text), "1.0", 1.0  # a missing file: check_lora_file says so


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a file; False for a text no file can have (a name too long, say)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def parse_lora_specs(texts: Sequence[str], *, schedules: bool = False) -> tuple[LoraSpec, ...]:
    """Every ``--lora`` of a run, in order (see :func:`parse_lora_spec`)."""
    return tuple(parse_lora_spec(text, schedules=schedules) for text in texts)


def check_lora_file(path: Path) -> LoraInfo:
    """Reads ``path`` as a LoRA and returns its :class:`LoraInfo`: ModelError (one line) for a
    missing file, a folder, a file of no known format, a truncated one, a pickle that would run code,
    a file without LoRA weights, an SDXL or LyCORIS (non-LoRA) file. Whether it fits the model is
    checked once the model is loaded."""
    tensors, metadata = read_lora(path)
    lora_modules(path, tensors, metadata)
    return lora_info(path)


def merge_loras(model: nn.Module, specs: Sequence[LoraSpec]) -> LoraPatch | None:
    """Merges ``specs`` into ``model`` (on its device and dtype): constant weights once, or, when a
    weight is scheduled, all files through a patch whose ``set_weights`` the frame loop calls
    (scheduled weights start at 0). None without LoRAs."""
    if not specs:
        return None
    pairs = [(spec.path, spec.constant if spec.constant is not None else 0.0) for spec in specs]
    infos = [spec.info for spec in specs]  # hashed when parsed: not again
    if all(spec.constant is not None for spec in specs):
        return apply_loras(model, pairs, infos=infos)
    patch = load_loras(model, pairs, infos=infos)
    for spec, info in zip(specs, patch.files):
        if spec.constant is None:
            log.info("LoRA %s: weight %s, set on every frame", info.name, spec.weight)
    return patch


def lora_record(specs: Sequence[LoraSpec]) -> list[dict]:
    """What outputs record of the LoRAs: per file its name, sha256, A1111's short hash and the
    weight's text, by content (a moved or renamed copy of the same file records the same, but for
    the name), so that ``--resume`` refuses other files or weights and accepts a moved file."""
    return [{"name": spec.info.name, "sha256": spec.info.sha256, "short_hash": spec.info.short_hash,
             "weight": spec.weight} for spec in specs]
