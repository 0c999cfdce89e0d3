"""audio2video's per-frame numbers: which flags take a schedule, their ranges, and their values.

Every flag in :data:`SCHEDULED` takes a number (the same frames as before schedules existed) or a
schedule over the sound's envelopes (:mod:`sounddiffusion.control.schedules`, :mod:`sounddiffusion.sound.analysis`),
its sections' (with ``--sections``) and its control tracks' (``NAME.onset`` with ``--control NAME=FILE``).
:func:`parse_video_schedules` reads them all before the model loads, so a mistake is one line at
once; :func:`evaluate_schedules` gives their values on every frame, clipped to each flag's range
(a strict flag, such as ``--zoom``, refuses a schedule that leaves its range on any frame instead).
The bends of ``--bend`` are schedules too (their amounts), read with the same parser.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pathlib import Path

import numpy as np

from sounddiffusion.control.bending import check_amount
from sounddiffusion.control.bending_specs import BendSpec, parse_bend
from sounddiffusion.control.schedules import Schedule, clip_to_range, excerpt, parse_schedule
from sounddiffusion.errors import ParameterError
from sounddiffusion.flags import SCHEDULE_HELP, Flag, FlagGroup
from sounddiffusion.settings import VideoSettings
from sounddiffusion.sound.analysis import ENVELOPE_NAMES, GRID_NAMES
from sounddiffusion.sound.control_tracks import track_names
from sounddiffusion.sound.sections import SECTION_NAMES

PLAIN_NAMES = ("t", "s", "fps", "max_f")
"""Names that need no analysis of the sound."""

VARIABLES = (*ENVELOPE_NAMES, *GRID_NAMES, "bpm", *PLAIN_NAMES)
"""The names a schedule may always read (see :meth:`sounddiffusion.sound.analysis.Envelopes.variables`);
:func:`schedule_names` adds the sections' and the control tracks'."""

SECTIONS_HINT = "needs the song's sections: give --sections FILE (lines 'M:SS label') or --sections auto"


def schedule_names(settings: VideoSettings, section_hint: str = SECTIONS_HINT
                   ) -> tuple[tuple[str, ...], dict[str, str]]:
    """(the names the schedules of ``settings`` may read, hints for names that need a flag;
    ``section_hint`` for the sections' names without ``--sections``)."""
    tracks = [spec.partition("=")[0].strip() for spec in settings.control]
    sections = SECTION_NAMES if settings.sections else ()
    hints = {} if settings.sections else {name: section_hint for name in SECTION_NAMES}
    return (*VARIABLES, *sections, *track_names(tracks)), hints


@dataclass(frozen=True)
class Scheduled:
    """A flag that takes a schedule: its name, the range its values are clipped to (None: open)
    and what the range means, for the error a constant out of range gets. A ``strict`` flag's
    bounds are excluded and never clipped to: a value on or beyond them, on any frame, is an
    error (a zoom of 0 has no meaning to clip to)."""

    name: str
    low: float | None
    high: float | None
    meaning: str
    strict: bool = False


SCHEDULED = (
    Scheduled("strength", 0.0, 1.0, "0 keeps the previous frame, 1 ignores it completely"),
    Scheduled("scale", 0.0, None, "the guidance scale cannot be negative"),
    Scheduled("textstrength", 0.0, 1.0, "0 = sound only, 1 = text only"),
    Scheduled("rms_bend", None, None, ""),
    Scheduled("latent_noise", 0.0, None, "0 adds no noise"),
    Scheduled("contrast", 0.0, None, "1 keeps the contrast, 0 flattens the picture"),
    Scheduled("cadence", 1.0, None, "1 diffuses every frame, N every Nth"),
    Scheduled("color_coherence_strength", 0.0, 1.0, "0 leaves colours alone, 1 matches them fully"),
    Scheduled("zoom", 0.0, None, "1 keeps the size, above 1 flies in, below 1 flies out", strict=True),
    Scheduled("angle", None, None, ""),
    Scheduled("translation_x", None, None, ""),
    Scheduled("translation_y", None, None, ""),
    Scheduled("transform_center_x", 0.0, 1.0, "a fraction of the width, 0.5 is the middle"),
    Scheduled("transform_center_y", 0.0, 1.0, "a fraction of the height, 0.5 is the middle"),
    Scheduled("perspective_flip_theta", None, None, ""),
    Scheduled("perspective_flip_phi", None, None, ""),
    Scheduled("perspective_flip_gamma", None, None, ""),
    Scheduled("perspective_flip_fv", 0.0, 180.0, "the flip's field of view in degrees, Deforum's default is 53",
              strict=True),
)
"""The scheduled flags of audio2video and their ranges (``--seed_jump`` is a condition, unclipped)."""

MOTION_SCHEDULES = ("zoom", "angle", "translation_x", "translation_y", "transform_center_x", "transform_center_y",
                    "perspective_flip_theta", "perspective_flip_phi", "perspective_flip_gamma", "perspective_flip_fv")
"""The camera motion's scheduled flags (:class:`sounddiffusion.video.motion.Motion2D`'s keys, in order)."""


CHAIN_FLAGS = FlagGroup("frame chain", (
    Flag(("--strength",), "how much each frame departs from the previous one: 0 keeps it, 1.0 corresponds to full "
                          "destruction of information in the previous image" + SCHEDULE_HELP, default="0.5"),
    Flag(("--rms_bend",), "add loudness (slice RMS) x F to the noised latent ('network bending'; 0 = off, upstream "
                          "used 0.8); the same as --bend \"add=F*rms\"" + SCHEDULE_HELP, default="0", metavar="F"),
), "each frame is img2img from the previous one (audio2video.py, live.py)")
"""The img2img chain's own flags, shared by the entry points that chain frames."""


def text_range(settings: VideoSettings) -> Scheduled:
    """``--textstrength``'s range depends on ``--normalize``: text-range divides by it."""
    if settings.normalize == "text-range":
        return Scheduled("textstrength", 1e-3, None, "--normalize text-range divides by it; use a value > 0")
    return SCHEDULED[2]


def _flags(settings: VideoSettings) -> list[Scheduled]:
    return [text_range(settings) if s.name == "textstrength" else s for s in SCHEDULED]


@dataclass(frozen=True)
class VideoSchedules:
    """The parsed schedules of a render: one per scheduled flag, ``seed_jump`` (or None), the
    bends with their amount schedules, in the order given, and each ``--lora``'s weight by the
    file's name (numbers and schedules alike; weights are not clipped: negative ones are allowed)."""

    values: dict[str, Schedule]
    seed_jump: Schedule | None
    bends: tuple[tuple[BendSpec, Schedule], ...]
    loras: tuple[tuple[str, Schedule], ...] = ()

    def all(self) -> list[Schedule]:
        extra = [self.seed_jump] if self.seed_jump is not None else []
        return [*self.values.values(), *extra, *(amount for _, amount in self.bends),
                *(weight for _, weight in self.loras)]

    def needs_analysis(self) -> bool:
        """Whether a schedule reads an envelope (the sound must then be analysed)."""
        return any(schedule.names_used - set(PLAIN_NAMES) for schedule in self.all())


def parse_video_schedules(settings: VideoSettings, loras: Sequence[tuple[str, str]] = (), *,
                          section_hint: str = SECTIONS_HINT) -> VideoSchedules:
    """Parse every scheduled flag and bend of ``settings`` and the ``loras``' weights, (file, weight
    text) pairs; constants must lie in their range. ``section_hint``: what a schedule reading
    ``section`` without ``--sections`` is told.

    Raises ScheduleError / ParameterError (one line naming the flag) before anything is loaded."""
    names, hints = schedule_names(settings, section_hint)
    values = {}
    for flag in _flags(settings):
        schedule = parse_schedule(str(getattr(settings, flag.name)), flag=f"--{flag.name}", names=names,
                                  hints=hints)
        if schedule.is_constant:
            _check_constant(flag, schedule.constant)
        values[flag.name] = schedule
    seed_jump = (parse_schedule(settings.seed_jump, flag="--seed_jump", names=names, hints=hints)
                 if settings.seed_jump else None)
    bends = []
    for text in settings.bend:
        spec = parse_bend(text)
        bends.append((spec, parse_schedule(spec.amount, flag=f'--bend "{excerpt(text)}"', names=names, hints=hints)))
    weights = tuple((Path(path).stem, parse_schedule(text, flag=f"--lora {excerpt(path)}", names=names, hints=hints))
                    for path, text in loras)
    return VideoSchedules(values, seed_jump, tuple(bends), weights)


def _outside(flag: Scheduled, values: np.ndarray) -> np.ndarray:
    """Where ``values`` lie outside the flag's range (on a strict flag's bounds too), bool."""
    outside = np.zeros(np.shape(values), dtype=bool)
    if flag.low is not None:
        outside |= (values <= flag.low) if flag.strict else (values < flag.low)
    if flag.high is not None:
        outside |= (values >= flag.high) if flag.strict else (values > flag.high)
    return outside


def _range_text(flag: Scheduled) -> str:
    low = "-inf" if flag.low is None else f"{flag.low:g}"
    high = "inf" if flag.high is None else f"{flag.high:g}"
    return f"({low}, {high})" if flag.strict else f"[{low}, {high}]"


def _check_constant(flag: Scheduled, value: float) -> None:
    if _outside(flag, np.float64(value)):
        raise ParameterError(f"--{flag.name} {value:g} is outside {_range_text(flag)}: {flag.meaning}")


def _check_strict(flag: Scheduled, text: str, values: np.ndarray) -> None:
    """A strict flag's schedule must stay inside its range on every frame."""
    bad = np.flatnonzero(_outside(flag, values))
    if len(bad):
        frame = int(bad[0])
        raise ParameterError(f"--{flag.name} \"{text}\" is {values[frame]:g} on frame {frame} ({len(bad)} of "
                             f"{len(values)} frames outside {_range_text(flag)}): keep it inside, {flag.meaning}")


def plain_variables(n_frames: int, fps: float) -> dict[str, np.ndarray | float]:
    """The variables that need no analysis of the sound: ``t s fps max_f``."""
    frames = np.arange(n_frames, dtype=np.float64)
    return {"t": frames, "s": frames / fps, "fps": float(fps), "max_f": float(n_frames)}


def evaluate_schedules(schedules: VideoSchedules, settings: VideoSettings,
                       variables: Mapping[str, np.ndarray | float], n_frames: int
                       ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(each scheduled flag's values (n_frames,) clipped to its range, the seed-jump frames as a
    bool array (n_frames,), the bend amounts (n_bends, n_frames)).

    Raises ParameterError naming the bend and the first frame whose amount its operator refuses
    (:func:`sounddiffusion.control.bending.check_amount`; ``--rms_bend F`` is checked as an add of
    F), so that an amount no frame can use fails before the model loads."""
    values = {}
    for flag in _flags(settings):
        raw = schedules.values[flag.name].evaluate(variables, n_frames)
        if flag.strict:
            _check_strict(flag, str(getattr(settings, flag.name)), raw)
            values[flag.name] = raw
        else:
            values[flag.name] = clip_to_range(raw, low=flag.low, high=flag.high, flag=f"--{flag.name}")
    if schedules.seed_jump is not None:
        jumps = schedules.seed_jump.evaluate(variables, n_frames) > 0.5
    else:
        jumps = np.zeros(n_frames, dtype=bool)
    amounts = np.array([amount.evaluate(variables, n_frames) for _, amount in schedules.bends],
                       dtype=np.float64).reshape(len(schedules.bends), n_frames)
    _check_amounts("add", values["rms_bend"], "--rms_bend")
    for (spec, _), row in zip(schedules.bends, amounts):
        _check_amounts(spec.op, row, f"--bend {excerpt(spec.text or spec.op)!r}")
    return values, jumps, amounts


def _check_amounts(op: str, amounts: np.ndarray, flag: str) -> None:
    """ParameterError ``FLAG: frame N: ...`` at the first frame whose amount ``op`` refuses
    (each distinct amount is checked once)."""
    distinct, first = np.unique(amounts, return_index=True)
    for k in np.argsort(first):
        try:
            check_amount(op, float(distinct[k]))
        except ParameterError as problem:
            raise ParameterError(f"{flag}: frame {first[k]}: {problem}") from None


def evaluate_lora_weights(schedules: VideoSchedules, variables: Mapping[str, np.ndarray | float],
                          n_frames: int) -> np.ndarray:
    """Each ``--lora``'s weight on every frame, (n_loras, n_frames) float64, unclipped."""
    return np.array([weight.evaluate(variables, n_frames) for _, weight in schedules.loras],
                    dtype=np.float64).reshape(len(schedules.loras), n_frames)


def values_at(schedules: VideoSchedules, settings: VideoSettings, variables: Mapping[str, float], index: int
              ) -> tuple[dict[str, float], bool, tuple[float, ...]]:
    """One frame's numbers, for a live sound: (each scheduled flag's value clipped to its range,
    whether the seed jumps, each bend's amount), as :func:`evaluate_schedules` gives them for
    frame ``index`` (see :meth:`~sounddiffusion.control.schedules.Schedule.value_at`)."""
    values = {}
    for flag in _flags(settings):
        raw = np.array([schedules.values[flag.name].value_at(variables, index)])
        values[flag.name] = float(clip_to_range(raw, low=flag.low, high=flag.high, flag=f"--{flag.name}")[0])
    jump = schedules.seed_jump is not None and schedules.seed_jump.value_at(variables, index) > 0.5
    return values, jump, tuple(amount.value_at(variables, index) for _, amount in schedules.bends)


def report_columns(values: Mapping[str, np.ndarray], jumps: np.ndarray, amounts: np.ndarray,
                   schedules: VideoSchedules, lora_weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The scheduled values as used, by column name, for NAME.schedule.csv and its plot: the flags
    that are scheduled (not constant), the seed jumps, every bend's amount and the scheduled
    ``--lora`` weights (``lora_weights`` (n_loras, n_frames), columns "lora NAME")."""
    columns = {name: values[name] for name, schedule in schedules.values.items() if not schedule.is_constant}
    if schedules.seed_jump is not None:
        columns["seed_jump"] = jumps.astype(np.float64)
    for (spec, _), row in zip(schedules.bends, amounts):
        columns[f"bend {spec.text or spec.op}"] = row
    if lora_weights is not None:
        for number, ((name, weight), row) in enumerate(zip(schedules.loras, lora_weights), 1):
            if not weight.is_constant:
                key = f"lora {name}" if f"lora {name}" not in columns else f"lora {number} {name}"
                columns[key] = row
    return columns
