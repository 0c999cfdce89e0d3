"""Pieces the benchmark scripts share: timing on a device, a frame writer that keeps nothing, the
picture every way starts from, and writing a report table.

Imported by the scripts in this folder as ``scripts.benchmark_parts`` (each puts the repository
on ``sys.path`` first)."""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import torch

from sounddiffusion.files import write_new_text

REPO = Path(__file__).resolve().parents[1]


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work, so that a timer read next measures it (CUDA runs it later)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DiscardingWriter:
    """A frame writer (``submit(index, latent, chain)``, as the frame loop calls it) that keeps
    nothing: the tables measure sampling, not decoding and encoding."""

    def submit(self, index, latent, chain):
        pass


def init_picture(size: int, seed: int) -> np.ndarray:
    """A smooth colourful (size, size, 3) uint8 picture to start every way from."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    phases = rng.uniform(0, 2 * np.pi, size=3)
    channels = [0.5 + 0.5 * np.sin(2 * np.pi * (x * (k + 1) + y * (2 - k)) + phases[k]) for k in range(3)]
    return (np.stack(channels, axis=-1) * 255).round().astype(np.uint8)


def write_report(lines: list[str], out: str | Path | None, name: str, started: datetime.datetime) -> Path:
    """Write the report ``lines`` (markdown) to ``out``, or to outputs/NAME-YYYYmmdd-HHMMSS.md (the
    start time) in the repository, never replacing a file; print it and where it went."""
    text = "\n".join(lines) + "\n"
    path = write_new_text(out or REPO / "outputs" / f"{name}-{started:%Y%m%d-%H%M%S}.md", text)
    print(text, end="")
    print(f"written to {path}")
    return path
