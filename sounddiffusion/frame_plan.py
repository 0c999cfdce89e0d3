"""What every frame of a video uses, decided before the first one is sampled.

:func:`plan_frames` turns a :class:`~sounddiffusion.settings.VideoSettings` and the sound into a
:class:`FramePlan`: per-frame arrays (strength, guidance scale, text strength, loudness bend,
noise seed) and the prompt schedule. The frame loop asks ``plan.frame(i)`` for frame ``i`` and
nothing else, so a schedule that makes these numbers change over time only fills the arrays
differently. The sound itself is read slice by slice as the frames advance
(:meth:`FramePlan.audio_slice`), so memory stays flat whatever its length.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from .audio import fps_fraction, frame_count, sound_blocks, sound_length, stream_frame_slices
from .conditioning import parse_prompt_file, prompt_weights_at, start_end_schedule
from .settings import VideoSettings


def frame_seed(seed: int, index: int) -> int:
    """The seed of frame ``index``'s noise: independent streams per frame, derived from ``seed``."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(1, np.uint64)[0]) >> 1


@dataclass(frozen=True)
class Frame:
    """Frame ``index`` of a render: its time (s), img2img strength, guidance scale, text strength,
    loudness bend factor, noise seed and the prompts mixed in with their weights."""

    index: int
    time: float
    strength: float
    scale: float
    textstrength: float
    rms_bend: float
    noise_seed: int
    prompt_weights: list[tuple[str, float]]


@dataclass
class FramePlan:
    """Every frame's numbers, indexed by frame; see the module docstring.

    ``audio`` is the sound file and ``n_samples`` its length in mono 44.1 kHz samples; the
    arrays are (n_frames,); ``schedule`` is the prompt schedule, a list of (seconds, prompt)."""

    audio: Path
    n_samples: int
    fps: Fraction
    n_frames: int
    strength: np.ndarray
    scale: np.ndarray
    textstrength: np.ndarray
    rms_bend: np.ndarray
    noise_seeds: np.ndarray
    schedule: list[tuple[float, str]]
    _slices: Iterator[np.ndarray] | None = field(default=None, repr=False)
    _next_index: int = field(default=0, repr=False)

    def time_of(self, index: int) -> float:
        """The time of frame ``index`` in seconds."""
        return float(index / self.fps)

    def frame(self, index: int) -> Frame:
        return Frame(index=index, time=self.time_of(index), strength=float(self.strength[index]),
                     scale=float(self.scale[index]), textstrength=float(self.textstrength[index]),
                     rms_bend=float(self.rms_bend[index]), noise_seed=int(self.noise_seeds[index]),
                     prompt_weights=prompt_weights_at(self.schedule, self.time_of(index)))

    def audio_slice(self, index: int) -> np.ndarray:
        """Frame ``index``'s samples, as ``audio.frame_slice`` cuts them from the whole sound.

        Read in order from the file; asking for another frame than the next one reads anew."""
        if self._slices is None or index != self._next_index:
            blocks = sound_blocks(self.audio, warn_non_finite=False)  # sound_length has warned
            self._slices = stream_frame_slices(blocks, self.n_samples, self.fps, start=index)
        self._next_index = index + 1
        return next(self._slices)

    def columns(self) -> dict[str, np.ndarray]:
        """The per-frame numbers by name, for reports."""
        return {"strength": self.strength, "scale": self.scale, "textstrength": self.textstrength,
                "rms_bend": self.rms_bend}


def plan_frames(settings: VideoSettings) -> FramePlan:
    """The plan of a render: decodes the sound once (without keeping it) to know its length.

    Raises AudioError for a sound that cannot be read and PromptFileError for a bad prompt file."""
    fps = fps_fraction(settings.fps)
    n_samples = sound_length(settings.audio)
    n_frames = frame_count(n_samples, fps)
    if settings.prompt_file:
        schedule = parse_prompt_file(settings.prompt_file)
    else:
        schedule = start_end_schedule(settings.textprompt, settings.textpromptend,
                                      float((n_frames - 1) / fps))
    constant = lambda value: np.full(n_frames, value, dtype=np.float64)  # noqa: E731
    return FramePlan(audio=Path(settings.audio), n_samples=n_samples, fps=fps, n_frames=n_frames,
                     strength=constant(settings.strength), scale=constant(settings.scale),
                     textstrength=constant(settings.textstrength), rms_bend=constant(settings.rms_bend),
                     noise_seeds=np.array([frame_seed(settings.seed, i) for i in range(n_frames)], dtype=np.int64),
                     schedule=schedule)
