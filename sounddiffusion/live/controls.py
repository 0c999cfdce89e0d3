"""What a live frame uses: the settings the page may change while it plays, and each frame's numbers.

:class:`LiveControls` holds the run's :class:`~sounddiffusion.settings.LiveSettings` with their parsed
schedules; a change from the page (:data:`CONTROLS`) is checked whole and then replaces them at
once, so the next frame uses all of it or, when any part is wrong, none. :func:`live_frame` gives
a frame its numbers from the schedules over the current envelopes, through the same functions a
file's plan uses (:func:`~sounddiffusion.control.frame_schedules.values_at`,
:func:`~sounddiffusion.video.frame_plan.frame_of`, the file's seeds and colour-frame rule).
"""
from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from sounddiffusion.control.frame_schedules import MOTION_SCHEDULES, VideoSchedules, parse_video_schedules, values_at
from sounddiffusion.control.prompts import negative_weights_at, prompt_weights_at, start_end_schedule
from sounddiffusion.errors import ParameterError
from sounddiffusion.settings import LiveSettings
from sounddiffusion.video.frame_plan import Frame, color_frames, frame_of, frame_seed
from sounddiffusion.video.motion import EDGE_ON_DEGREES, Motion2D, edge_on

CONTROLS = {"prompt": "textprompt", "textstrength": "textstrength", "strength": "strength", "seed": "seed"}
"""The controls of the page (``POST /settings`` keys) and the settings they change."""
MAX_PROMPT = 2000
SECTIONS_HINT = ("needs the song's sections (audio2video's --sections), which live.py does not take: use keyframes "
                 "over t or s")


def check_live_schedules(schedules: VideoSchedules, settings: LiveSettings) -> None:
    """ParameterError when a schedule reads ``max_f`` (the number of frames) of a sound without end,
    or when constant flip angles turn every picture edge-on (scheduled ones skip such frames)."""
    if settings.seconds is None and any("max_f" in schedule.names_used for schedule in schedules.all()):
        raise ParameterError("a schedule reads max_f, the number of frames, which a live sound has only with "
                             "--seconds N: give --seconds or leave max_f out")
    phi, gamma = schedules.values["perspective_flip_phi"], schedules.values["perspective_flip_gamma"]
    if phi.is_constant and gamma.is_constant and edge_on(phi.constant, gamma.constant):
        # Every picture would be skipped: the plane is edge-on on every frame.
        raise ParameterError(f"--perspective_flip_phi {phi.text} and --perspective_flip_gamma {gamma.text} turn the "
                             f"picture's plane edge-on to the camera on every frame: keep both more than "
                             f"{EDGE_ON_DEGREES:g} degrees away from 90 and 270")


def parse_live_schedules(settings: LiveSettings, loras: Sequence[tuple[str, str]] = ()) -> VideoSchedules:
    """The schedules of ``settings`` and of the ``loras``' weights ((file, weight text) of each
    ``--lora``), checked for live use (ScheduleError/ParameterError, one line)."""
    schedules = parse_video_schedules(settings, loras, section_hint=SECTIONS_HINT)
    check_live_schedules(schedules, settings)
    return schedules


class LiveControls:
    """The settings in force (thread-safe): :meth:`current` for the frame loop, :meth:`change` for
    the page. ``version`` counts the changes, so the loop knows when the picture must follow one
    even while the sound stands still."""

    def __init__(self, settings: LiveSettings, loras: Sequence[tuple[str, str]] = ()):
        self._lock = threading.Lock()
        self._loras = tuple(loras)
        self._settings, self._schedules = settings, parse_live_schedules(settings, self._loras)
        self.version = 0

    def current(self) -> tuple[LiveSettings, VideoSchedules, int]:
        with self._lock:
            return self._settings, self._schedules, self.version

    def values(self) -> dict:
        """The controls' current values by control name."""
        settings = self.current()[0]
        return {control: getattr(settings, name) for control, name in CONTROLS.items()}

    def change(self, changes: Mapping) -> dict:
        """Apply ``changes`` (control name -> value; strengths take numbers or schedule texts) from
        the next frame on; returns :meth:`values`. Raises ParameterError/ScheduleError (one line)
        and changes nothing when any of them is wrong."""
        if not isinstance(changes, Mapping) or not changes:
            raise ParameterError(f"send a JSON object with any of {', '.join(CONTROLS)}")
        fields = {}
        for control, value in changes.items():
            if control not in CONTROLS:
                raise ParameterError(f"unknown control {str(control)[:40]!r}: use {', '.join(CONTROLS)}")
            fields[CONTROLS[control]] = _checked(control, value)
        with self._lock:
            settings = replace(self._settings, **fields)
            schedules = parse_live_schedules(settings, self._loras)
            self._settings, self._schedules = settings, schedules
            self.version += 1
        return self.values()


def _checked(control: str, value) -> str | int:
    if control == "prompt":
        if not isinstance(value, str) or len(value) > MAX_PROMPT:
            raise ParameterError(f"prompt: send a text of at most {MAX_PROMPT} characters")
        return value
    if control == "seed":
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):  # ASCII digits only ("²" is a digit)
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
            raise ParameterError(f"seed {str(value)[:40]!r}: send a whole number from 0 to {2**32 - 1}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ParameterError(f"{control}: send a number or a schedule text such as \"0.3 + 0.5*onset\"")
    return value if isinstance(value, str) else repr(float(value))


def live_frame(settings: LiveSettings, schedules: VideoSchedules, variables: Mapping[str, float], index: int,
               last_jump: int) -> tuple[Frame, int]:
    """Frame ``index`` (frames counted at ``settings.fps`` since the sound began) with its numbers
    from ``schedules`` over ``variables`` (the envelopes now, as floats), and the frame of the last
    seed jump. ``last_jump``: that of the frame before (0 at first); with ``--seed_jump`` the
    noise seed holds from one jump to the next, as in a file. Raises ParameterError (a
    ScheduleError among them) when the frame's numbers cannot be used (a zoom of 0, say)."""
    values, jump, amounts = values_at(schedules, settings, variables, index)
    last_jump = index if jump else last_jump
    held = settings.seed_jump is not None
    weights, negatives = negative_weights_at(prompt_weights_at(start_end_schedule(settings.textprompt, None, 0.0), 0.0),
                                             settings.negative_prompt)
    match = bool(color_frames(settings, np.ones(1, dtype=bool), start=index)[0])
    frame = frame_of(index, float(index / settings.fps), values,
                     noise_seed=frame_seed(settings.seed, last_jump if held else index), prompt_weights=weights,
                     bend_amounts=amounts, match_colors=match, negative_weights=negatives,
                     lora_weights=tuple(weight.value_at(variables, index) for _, weight in schedules.loras),
                     motion=Motion2D(*(values[name] for name in MOTION_SCHEDULES)))
    return frame, last_jump
