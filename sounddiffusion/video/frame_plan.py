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

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from sounddiffusion.control.bending_specs import BendSpec
from sounddiffusion.control.frame_schedules import (MOTION_SCHEDULES, VideoSchedules, evaluate_lora_weights,
                                                    evaluate_schedules, parse_video_schedules, plain_variables)
from sounddiffusion.control.music_analysis import analyse_music, music_request
from sounddiffusion.control.prompts import (negative_weights_at, parse_prompt_file, prompt_weights_at,
                                            split_negative, start_end_schedule)
from sounddiffusion.errors import ParameterError
from sounddiffusion.settings import VideoSettings
from sounddiffusion.sound.analysis import Envelopes, parse_smoothing, snap_times
from sounddiffusion.sound.audio import (fps_fraction, frame_count, sound_blocks, sound_extent, sound_warning,
                                        stream_frame_slices)
from sounddiffusion.video.motion import EDGE_ON_DEGREES, Motion2D, check_border, edge_on


MOTION_SPACES = ("pixel", "latent")
"""Where ``--motion_space`` warps the previous frame: its decoded picture, or its latent."""

log = logging.getLogger(__name__)


def frame_seed(seed: int, index: int) -> int:
    """The seed of frame ``index``'s noise: independent streams per frame, derived from ``seed``."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(1, np.uint64)[0]) >> 1


@dataclass(frozen=True)
class Frame:
    """Frame ``index`` of a render: its time (s), the numbers its img2img step uses, its noise
    seed, the prompts mixed in with their weights, each bend's amount, whether it is diffused
    (else made between its diffused neighbours) and whether its colours are matched first; the
    negative prompts guidance pushes away from, with the prompts' weights ("": the empty prompt),
    each ``--lora``'s weight, and the camera's ``motion`` from the previous frame to this one (the
    identity on frame 0)."""

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
    negative_weights: list[tuple[str, float]] = field(default_factory=list)
    lora_weights: tuple[float, ...] = ()
    motion: Motion2D = Motion2D()


def frame_of(index: int, time: float, values: Mapping[str, float], *, noise_seed: int,
             prompt_weights: list[tuple[str, float]], bend_amounts: tuple[float, ...], diffused: bool = True,
             match_colors: bool = False, negative_weights: list[tuple[str, float]] | None = None,
             lora_weights: tuple[float, ...] = (), motion: Motion2D = Motion2D()) -> Frame:
    """Frame ``index`` at ``time`` seconds from the values of the scheduled flags on it (by flag
    name, :data:`~sounddiffusion.control.frame_schedules.SCHEDULED`), for a file's plan or a live frame."""
    return Frame(index=index, time=time, strength=values["strength"], scale=values["scale"],
                 textstrength=values["textstrength"], rms_bend=values["rms_bend"],
                 latent_noise=values["latent_noise"], contrast=values["contrast"],
                 color_coherence_strength=values["color_coherence_strength"], noise_seed=noise_seed,
                 prompt_weights=prompt_weights, bend_amounts=bend_amounts, diffused=diffused,
                 match_colors=match_colors, negative_weights=negative_weights or [], lora_weights=lora_weights,
                 motion=motion)


@dataclass
class FramePlan:
    """Every frame's numbers, indexed by frame; see the module docstring.

    ``audio`` is the sound file and ``n_samples`` its length in mono 44.1 kHz samples;
    ``values`` the scheduled flags' (n_frames,) arrays; ``bend_amounts`` (n_bends, n_frames);
    ``diffused`` (n_frames,) bool; ``schedule`` the prompt schedule, a list of (seconds, prompt)
    (a prompt may end with ``--neg NEGATIVE``; ``negative_prompt`` is the others' negative);
    ``lora_weights`` (n_loras, n_frames); ``motions`` each frame's camera motion from the frame before
    (:func:`frame_motions`); ``envelopes`` the sound's analysis when it was needed, else None, and
    ``tracks`` its control tracks' by name; ``snapped``: (asked, snapped) seconds of each prompt moved
    by ``--snap_prompts`` (empty when none were)."""

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
    tracks: Mapping[str, Envelopes] = field(default_factory=dict)
    snapped: tuple[tuple[float, float], ...] = ()
    negative_prompt: str = ""
    lora_weights: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    _slices: Iterator[np.ndarray] | None = field(default=None, repr=False)
    _next_index: int = field(default=0, repr=False)

    def time_of(self, index: int) -> float:
        """The time of frame ``index`` in seconds."""
        return float(index / self.fps)

    def frame(self, index: int) -> Frame:
        prompts, negatives = negative_weights_at(prompt_weights_at(self.schedule, self.time_of(index)),
                                                 self.negative_prompt)
        return frame_of(index, self.time_of(index), {name: float(values[index]) for name, values in self.values.items()},
                        noise_seed=int(self.noise_seeds[index]), prompt_weights=prompts,
                        bend_amounts=tuple(float(a) for a in self.bend_amounts[:, index]),
                        diffused=bool(self.diffused[index]), match_colors=bool(self.color_frames[index]),
                        negative_weights=negatives,
                        lora_weights=tuple(float(w) for w in self.lora_weights[:, index]) if len(self.lora_weights) else (),
                        motion=self.motions[index])

    def negative_prompts(self) -> list[str]:
        """The negative prompts frames push away from (``--negative_prompt``, ``--neg``), each once."""
        found = [self.negative_prompt, *(split_negative(prompt)[1] or "" for _, prompt in self.schedule)]
        return list(dict.fromkeys(text for text in found if text))

    def next_diffused(self, index: int) -> int:
        """The first diffused frame after ``index`` (the last frame is always diffused)."""
        return index + 1 + int(np.argmax(self.diffused[index + 1:]))

    def audio_slice(self, index: int) -> np.ndarray:
        """Frame ``index``'s samples, as ``audio.frame_slice`` cuts them from the whole sound.

        Read forward from the file (frames skipped by ``--cadence`` are read past); asking for
        an earlier frame than the next one reads anew from the start."""
        if self._slices is None or index < self._next_index:
            blocks = sound_blocks(self.audio, warn_non_finite=False)  # sound_extent has warned
            self._slices, self._next_index = stream_frame_slices(blocks, self.n_samples, self.fps, start=index), index
        for _ in range(index - self._next_index):
            next(self._slices)
        self._next_index = index + 1
        return next(self._slices)


def plan_frames(settings: VideoSettings, *, analyse: bool = False,
                loras: Sequence[tuple[str, str]] = ()) -> FramePlan:
    """The plan of a render. Parses every schedule and checks the music flags first (a mistake
    fails before anything is read; a control track's file is opened), decodes the sound once to
    know its length and, when a schedule reads an envelope, prompts are snapped (or ``analyse``),
    analyses it and its control tracks. ``loras``: (file, weight text) of each ``--lora``, whose
    weights the plan evaluates per frame as it does the other schedules.

    Raises ScheduleError/ParameterError for a bad schedule or value, AudioError for a sound that
    cannot be read and PromptFileError for a bad prompt or sections file."""
    schedules = parse_video_schedules(settings, loras)
    request = music_request(settings)
    _warn_unread_tracks(schedules, [track.name for track in request.tracks])
    check_border(settings.border)
    if settings.motion_space not in MOTION_SPACES:
        raise ParameterError(f"motion_space {settings.motion_space!r} is unknown: use one of {', '.join(MOTION_SPACES)}")
    smoothing = parse_smoothing(settings.smoothing) if settings.smoothing else None
    fps = fps_fraction(settings.fps)
    n_samples, peak = sound_extent(settings.audio)
    warning = sound_warning(settings.audio, n_samples, peak)
    if warning:
        log.warning("%s", warning)
    n_frames = frame_count(n_samples, fps)
    analysed = None
    if analyse or schedules.needs_analysis() or settings.snap_prompts != "none":
        analysed = analyse_music(settings.audio, request, fps=fps, n_samples=n_samples, smoothing=smoothing)
    variables = analysed.variables() if analysed is not None else plain_variables(n_frames, float(fps))
    values, jumps, amounts = evaluate_schedules(schedules, settings, variables, n_frames)
    diffused = cadence_frames(values["cadence"])
    schedule, snapped = prompt_schedule(settings, n_frames, fps, analysed.mix if analysed is not None else None)
    return FramePlan(audio=Path(settings.audio), n_samples=n_samples, fps=fps, n_frames=n_frames, values=values,
                     noise_seeds=noise_seeds(settings.seed, jumps, hold=settings.seed_jump is not None),
                     bends=tuple(spec for spec, _ in schedules.bends), bend_amounts=amounts, diffused=diffused,
                     color_frames=color_frames(settings, diffused), schedule=schedule, schedules=schedules,
                     seed_jumps=jumps, envelopes=analysed.mix if analysed is not None else None,
                     tracks=dict(analysed.tracks) if analysed is not None else {}, snapped=snapped,
                     negative_prompt=settings.negative_prompt,
                     lora_weights=evaluate_lora_weights(schedules, variables, n_frames),
                     motions=frame_motions(values, n_frames, settings))


def _warn_unread_tracks(schedules: VideoSchedules, names: list[str]) -> None:
    """One warning per control track that no schedule reads (a typo in a name, a forgotten flag)."""
    read = {name.partition(".")[0] for schedule in schedules.all() for name in schedule.names_used}
    for name in names:
        if name not in read:
            log.warning("control track %s: no schedule reads it (%s.onset, %s.rms ...)", name, name, name)


def frame_motions(values: dict[str, np.ndarray], n_frames: int, settings: VideoSettings) -> tuple[Motion2D, ...]:
    """Each frame's camera motion from the frame before, from the motion flags' per-frame values
    (``--zoom`` ... ``--perspective_flip_fv``, in :data:`MOTION_SCHEDULES` order); frame 0 has no
    frame before it and keeps the picture it starts from (an ``--init-img`` is not moved).

    Raises ParameterError naming the flags (their texts from ``settings``), the first frame and
    its values when a perspective flip turns the picture edge-on on a frame (the angles can be
    schedules: checked here, on every frame, before the model loads)."""
    phi, gamma = values["perspective_flip_phi"][1:n_frames], values["perspective_flip_gamma"][1:n_frames]
    bad = np.flatnonzero(edge_on(phi, gamma))
    if len(bad):
        first = int(bad[0])
        raise ParameterError(
            f'--perspective_flip_phi "{settings.perspective_flip_phi}" and --perspective_flip_gamma '
            f'"{settings.perspective_flip_gamma}" are {phi[first]:g} and {gamma[first]:g} on frame {first + 1} '
            f"({len(bad)} of {n_frames} frames): the picture's plane is then edge-on to the camera, a line with "
            f"nothing to warp; keep both more than {EDGE_ON_DEGREES:g} degrees away from 90 and 270")
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


def color_frames(settings: VideoSettings, diffused: np.ndarray, start: int = 0) -> np.ndarray:
    """The frames whose previous picture is colour-matched before img2img: diffused frames after
    the first, every ``color_coherence_every``-th of them (by frame number; ``diffused`` starts at
    frame ``start``)."""
    frames = np.zeros(len(diffused), dtype=bool)
    if settings.color_coherence != "none":
        index = np.arange(start, start + len(diffused))
        frames = diffused & (index > 0) & (index % settings.color_coherence_every == 0)
    return frames


def prompt_schedule(settings: VideoSettings, n_frames: int, fps: Fraction, analysed: Envelopes | None
                    ) -> tuple[list[tuple[float, str]], tuple[tuple[float, float], ...]]:
    """The (seconds, prompt) schedule of ``--prompt_file`` (times snapped to beats, bars or
    sections with ``--snap_prompts``, one line each: asked, snapped) or of
    ``--textprompt``/``--textpromptend``; and the (asked, snapped) times of the snapped prompts."""
    if settings.prompt_file:
        schedule = parse_prompt_file(settings.prompt_file)
        if settings.snap_prompts == "none":
            return schedule, ()
        asked = [time for time, _ in schedule]
        times = snap_times(asked, analysed, settings.snap_prompts)
        for before, after, (_, prompt) in zip(asked, times, schedule):
            log.info("--snap_prompts %s: %r asked at %.3f s, snapped to %.3f s", settings.snap_prompts, prompt,
                     before, after)
        return [(time, prompt) for time, (_, prompt) in zip(times, schedule)], tuple(zip(asked, times))
    return start_end_schedule(settings.textprompt, settings.textpromptend, float((n_frames - 1) / fps)), ()
