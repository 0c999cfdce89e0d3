"""What every frame of a video uses, decided before the first one is sampled.

:func:`plan_frames` turns a :class:`~sounddiffusion.settings.VideoSettings` and the sound into a
:class:`FramePlan`: per-frame arrays (strength, guidance scale, text strength, loudness bend,
anti-burn amounts, bend amounts, noise seed, which frames are diffused) and the prompt schedule.
The frame loop asks ``plan.frame(i)`` for frame ``i`` and nothing else; schedules
(:mod:`sounddiffusion.control.frame_schedules`) only fill the arrays differently. The sound itself is
read slice by slice as the frames advance (:meth:`FramePlan.audio_slice`), so memory stays flat
whatever its length; it is analysed (:mod:`sounddiffusion.sound.analysis`, also streaming) only when a
schedule reads an envelope or a report is asked for.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from sounddiffusion.control.bending_specs import BendSpec
from sounddiffusion.control.frame_schedules import (MOTION_SCHEDULES, VideoSchedules, envelopes_of,
                                                    evaluate_schedules, parse_video_schedules)
from sounddiffusion.control.prompts import parse_prompt_file, prompt_weights_at, start_end_schedule
from sounddiffusion.errors import ParameterError
from sounddiffusion.settings import VideoSettings
from sounddiffusion.sound.analysis import Envelopes, envelopes, parse_smoothing, snap_to_beats
from sounddiffusion.sound.audio import (fps_fraction, frame_count, sound_blocks, sound_length,
                                        stream_frame_slices)
from sounddiffusion.video.motion import Motion2D, check_border


MOTION_SPACES = ("pixel", "latent")
"""Where ``--motion_space`` warps the previous frame: its decoded picture, or its latent."""


def frame_seed(seed: int, index: int) -> int:
    """The seed of frame ``index``'s noise: independent streams per frame, derived from ``seed``."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(1, np.uint64)[0]) >> 1


@dataclass(frozen=True)
class Frame:
    """Frame ``index`` of a render: its time (s), the numbers its img2img step uses, its noise
    seed, the prompts mixed in with their weights, each bend's amount, whether it is diffused
    (else made between its diffused neighbours), whether its colours are matched first, and the
    camera's ``motion`` from the previous frame to this one (the identity on frame 0)."""

    index: int
    time: float
    strength: float
    scale: float
    textstrength: float
    rms_bend: float
    latent_noise: float
    contrast: float
    color_coherence_strength: float
    noise_seed: int
    prompt_weights: list[tuple[str, float]]
    bend_amounts: tuple[float, ...]
    diffused: bool
    match_colors: bool
    motion: Motion2D = Motion2D()


@dataclass
class FramePlan:
    """Every frame's numbers, indexed by frame; see the module docstring.

    ``audio`` is the sound file and ``n_samples`` its length in mono 44.1 kHz samples;
    ``values`` the scheduled flags' (n_frames,) arrays; ``bend_amounts`` (n_bends, n_frames);
    ``diffused`` (n_frames,) bool; ``schedule`` the prompt schedule, a list of (seconds, prompt);
    ``motions`` each frame's camera motion from the frame before (:func:`frame_motions`);
    ``envelopes`` the sound's analysis when it was needed, else None."""

    audio: Path
    n_samples: int
    fps: Fraction
    n_frames: int
    values: dict[str, np.ndarray]
    noise_seeds: np.ndarray
    bends: tuple[BendSpec, ...]
    bend_amounts: np.ndarray
    diffused: np.ndarray
    color_frames: np.ndarray
    schedule: list[tuple[float, str]]
    schedules: VideoSchedules
    seed_jumps: np.ndarray
    motions: tuple[Motion2D, ...] = ()
    envelopes: Envelopes | None = None
    _slices: Iterator[np.ndarray] | None = field(default=None, repr=False)
    _next_index: int = field(default=0, repr=False)

    def time_of(self, index: int) -> float:
        """The time of frame ``index`` in seconds."""
        return float(index / self.fps)

    def frame(self, index: int) -> Frame:
        value = {name: float(values[index]) for name, values in self.values.items()}
        return Frame(index=index, time=self.time_of(index), strength=value["strength"], scale=value["scale"],
                     textstrength=value["textstrength"], rms_bend=value["rms_bend"],
                     latent_noise=value["latent_noise"], contrast=value["contrast"],
                     color_coherence_strength=value["color_coherence_strength"],
                     noise_seed=int(self.noise_seeds[index]),
                     prompt_weights=prompt_weights_at(self.schedule, self.time_of(index)),
                     bend_amounts=tuple(float(a) for a in self.bend_amounts[:, index]),
                     diffused=bool(self.diffused[index]), match_colors=bool(self.color_frames[index]),
                     motion=self.motions[index])

    def next_diffused(self, index: int) -> int:
        """The first diffused frame after ``index`` (the last frame is always diffused)."""
        return index + 1 + int(np.argmax(self.diffused[index + 1:]))

    def audio_slice(self, index: int) -> np.ndarray:
        """Frame ``index``'s samples, as ``audio.frame_slice`` cuts them from the whole sound.

        Read forward from the file (frames skipped by ``--cadence`` are read past); asking for
        an earlier frame than the next one reads anew from the start."""
        if self._slices is None or index < self._next_index:
            blocks = sound_blocks(self.audio, warn_non_finite=False)  # sound_length has warned
            self._slices, self._next_index = stream_frame_slices(blocks, self.n_samples, self.fps, start=index), index
        for _ in range(index - self._next_index):
            next(self._slices)
        self._next_index = index + 1
        return next(self._slices)


def plan_frames(settings: VideoSettings, *, analyse: bool = False) -> FramePlan:
    """The plan of a render. Parses every schedule first (a mistake fails before anything is read),
    decodes the sound once to know its length and, when a schedule reads an envelope (or
    ``analyse``), analyses it.

    Raises ScheduleError/ParameterError for a bad schedule, AudioError for a sound that cannot be
    read and PromptFileError for a bad prompt file."""
    schedules = parse_video_schedules(settings)
    check_border(settings.border)
    if settings.motion_space not in MOTION_SPACES:
        raise ParameterError(f"motion_space {settings.motion_space!r} is unknown: use one of {', '.join(MOTION_SPACES)}")
    smoothing = parse_smoothing(settings.smoothing) if settings.smoothing else None
    fps = fps_fraction(settings.fps)
    n_samples = sound_length(settings.audio)
    n_frames = frame_count(n_samples, fps)
    analysed = None
    if analyse or schedules.needs_analysis() or settings.snap_prompts == "beat":
        analysed = envelopes(settings.audio, fps=fps, smoothing=smoothing)
    values, jumps, amounts = evaluate_schedules(schedules, settings, envelopes_of(analysed, n_frames, float(fps)),
                                                n_frames)
    diffused = cadence_frames(values["cadence"])
    return FramePlan(audio=Path(settings.audio), n_samples=n_samples, fps=fps, n_frames=n_frames, values=values,
                     noise_seeds=noise_seeds(settings.seed, jumps, hold=settings.seed_jump is not None),
                     bends=tuple(spec for spec, _ in schedules.bends), bend_amounts=amounts, diffused=diffused,
                     color_frames=color_frames(settings, diffused),
                     schedule=prompt_schedule(settings, n_frames, fps, analysed), schedules=schedules,
                     seed_jumps=jumps, motions=frame_motions(values, n_frames), envelopes=analysed)


def frame_motions(values: dict[str, np.ndarray], n_frames: int) -> tuple[Motion2D, ...]:
    """Each frame's camera motion from the frame before, from the motion flags' per-frame values
    (``--zoom`` ... ``--perspective_flip_fv``, in :data:`MOTION_SCHEDULES` order); frame 0 has no
    frame before it and keeps the picture it starts from (an ``--init-img`` is not moved)."""
    rows = np.stack([values[name] for name in MOTION_SCHEDULES], axis=1).tolist()
    return (Motion2D(), *(Motion2D(*row) for row in rows[1:n_frames]))


def noise_seeds(seed: int, jumps: np.ndarray, *, hold: bool) -> np.ndarray:
    """Each frame's noise seed (n_frames,) int64. Without ``hold`` every frame has its own
    (``frame_seed(seed, i)``); with it a frame reuses the seed of the last jump (``jumps``, bool)
    at or before it, so the noise holds still between jumps and changes on them."""
    frames = np.arange(len(jumps))
    if hold:
        frames = np.maximum.accumulate(np.where(jumps, frames, 0))
    return np.array([frame_seed(seed, int(i)) for i in frames], dtype=np.int64)


def cadence_frames(cadence: np.ndarray) -> np.ndarray:
    """Which frames are diffused (bool, n_frames): frame 0, then each next one ``round(cadence)``
    frames after the last (the value at that last diffused frame), and always the last frame."""
    n_frames = len(cadence)
    diffused = np.zeros(n_frames, dtype=bool)
    index = 0
    while index < n_frames:
        diffused[index] = True
        index += max(1, int(round(cadence[index])))
    diffused[-1] = True
    return diffused


def color_frames(settings: VideoSettings, diffused: np.ndarray) -> np.ndarray:
    """The frames whose previous picture is colour-matched before img2img: diffused frames after
    the first, every ``color_coherence_every``-th of them (by frame number)."""
    frames = np.zeros(len(diffused), dtype=bool)
    if settings.color_coherence != "none":
        index = np.arange(len(diffused))
        frames = diffused & (index > 0) & (index % settings.color_coherence_every == 0)
    return frames


def prompt_schedule(settings: VideoSettings, n_frames: int, fps: Fraction,
                    analysed: Envelopes | None) -> list[tuple[float, str]]:
    """The (seconds, prompt) schedule of ``--prompt_file`` (times snapped to beats with
    ``--snap_prompts beat``) or of ``--textprompt``/``--textpromptend``."""
    if settings.prompt_file:
        schedule = parse_prompt_file(settings.prompt_file)
        if settings.snap_prompts == "beat":
            times = snap_to_beats([time for time, _ in schedule], analysed)
            schedule = [(time, prompt) for time, (_, prompt) in zip(times, schedule)]
        return schedule
    return start_end_schedule(settings.textprompt, settings.textpromptend, float((n_frames - 1) / fps))
