"""The frame loop (``sounddiffusion.video.loop.sample_frames``) driven with a stand-in for the
frame writer, as tests/test_cuda.py runs it on a GPU and tests/test_cuda_graphs.py on the CPU
(which also checks that :class:`FrameCollector.submit` takes what ``FrameWriter.submit`` takes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from sounddiffusion.settings import VideoSettings
from sounddiffusion.sound.audio import SAMPLE_RATE
from sounddiffusion.video import loop
from sounddiffusion.video.frame_chain import ChainState
from sounddiffusion.video.frame_plan import plan_frames

SIZE = 64


class FrameCollector:
    """Stands in for the FrameWriter: keeps each submitted latent, float32 on the CPU, by frame."""

    def __init__(self):
        self.latents: dict[int, torch.Tensor] = {}

    def submit(self, index: int, picture: torch.Tensor, chain: ChainState) -> None:
        assert isinstance(chain, ChainState)
        self.latents[index] = picture.float().cpu()


def rising_tone(path: Path) -> Path:
    """Writes 1 s at 44.1 kHz of a 330 Hz tone getting louder to ``path``; returns it."""
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    sf.write(path, (np.linspace(0.05, 0.6, t.size) * np.sin(2 * np.pi * 330 * t)).astype(np.float32), SAMPLE_RATE,
             subtype="FLOAT")
    return path


def render_frames(engine, song: Path, count: int = 3, **changes) -> dict[int, torch.Tensor]:
    """The latents of frames 0 .. count - 1 of ``song`` at 4 fps, SIZE x SIZE, 4 steps x 0.5,
    seed 3 (``changes``: other VideoSettings fields), from a fresh chain (frame 0 is txt2img)."""
    video = VideoSettings(**{**dict(audio=str(song), fps=4, strength=0.5, ddim_steps=4, seed=3, H=SIZE, W=SIZE),
                             **changes})
    collector = FrameCollector()
    loop.sample_frames(engine, plan_frames(video), video, collector, start=0, stop=count, chain=ChainState())
    return collector.latents
