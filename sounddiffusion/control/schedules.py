"""Per-frame numbers from user text: a plain number, an expression over the music's envelopes, or
Deforum-style keyframes (numpy only; user text is parsed, never run with ``eval``/``exec``).

Three forms are accepted wherever a flag takes a schedule:

- a number, ``0.5`` or ``-1e-3``: exactly ``float(text)`` on every frame, so ``--strength 0.5``
  and ``--strength "0.5"`` give the same frames as before schedules existed;
- an expression, ``0.35 + 0.4*onset``, ``where(beat > 0.5, 0.8, 0.3)``, ``clip(0.2 + rms*2, 0, 1)``:
  ``+ - * / **``, unary minus, comparisons (``< <= > >= == !=``, 1 where true, 0 where false),
  parentheses, the functions ``sin cos tan abs min max clip floor ceil exp log sqrt where``, the
  constants ``pi e`` and the variable names the caller allows (for audio2video:
  :meth:`sounddiffusion.sound.analysis.Envelopes.variables`, and ``TRACK.ENVELOPE`` of each control
  track), evaluated for all frames at once;
- keyframes, ``0:(0.4), 96:(0.7 + 0.2*sin(t/12))``: ``FRAME: VALUE`` pairs, frames whole,
  0 or more and increasing, separated by commas. As in Deforum: a keyframe whose value is a
  plain number sets that frame; an expression keyframe gives its expression's value on every
  frame from its frame up to the next keyframe; the frames in between are linear between the
  nearest set frames; before the first keyframe the first value holds, after the last the last.
  (Unlike Deforum, a number keyframe after the last frame still pulls the line towards it.)

Every mistake is one :class:`ScheduleError` line naming the flag, the text, the 1-based column
and what was expected there, e.g. ``--strength "0.4 +* onset": column 6: expected a number,
a name or '(', found '*'``. A text longer than :data:`EXCERPT` characters is shown as an excerpt
around the column (``"...0.4*onset +* 1 + 0.2*b..."``); the column still counts from the start of
the whole text. Only ASCII is read (digits 0-9, plain spaces), parsing takes time linear in the
text's length, nesting is limited (see :mod:`sounddiffusion.control.schedule_grammar`) and
keyframe frames are at most :data:`MAX_KEYFRAME`.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from sounddiffusion.control.schedule_grammar import (NUMBER, Negate, Number, Parser, SyntaxProblem,
                                                     describe, names_in, shorten, tokenize)
from sounddiffusion.errors import ScheduleError

log = logging.getLogger(__name__)

_PLAIN_NUMBER = re.compile(rf"[+-]?{NUMBER}")
_ASCII_SPACE = " \t\n\r\f\v"

MAX_KEYFRAME = 10 ** 9
"""The largest keyframe frame number (about 16 months of video at 24 frames per second)."""

EXCERPT = 60
"""Texts longer than this many characters are shown in messages as an excerpt of about this size."""


@dataclass(frozen=True)
class Keyframe:
    """One ``FRAME: VALUE`` pair: ``node`` is the value's syntax tree; ``number`` is set when the
    value is a plain (signed) number, which interpolates, rather than an expression, which holds."""
    frame: int
    node: object
    number: float | None


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule for the flag ``flag``.

    ``names_used``: the variables it reads; ``is_constant``: the text is a plain number (then
    ``constant`` is ``float(text)``, else None). Evaluate with :meth:`evaluate`."""
    text: str
    flag: str
    names_used: frozenset
    is_constant: bool
    constant: float | None
    _expression: object = field(default=None, repr=False, compare=False)
    _keyframes: tuple = field(default=(), repr=False, compare=False)

    def evaluate(self, variables: Mapping[str, np.ndarray | float], n_frames: int) -> np.ndarray:
        """The value on each frame, float64 ``(n_frames,)``.

        ``variables`` maps each name in ``names_used`` to a float or an ``(n_frames,)`` array.
        Raises :class:`ScheduleError` naming the flag and the first frame whose value is not a
        finite number (``log(0)``, ``1/0``, ...)."""
        if self.is_constant:
            return np.full(n_frames, self.constant, dtype=np.float64)
        missing = sorted(self.names_used - set(variables))
        if missing:
            raise ScheduleError(f"{self._where()}: no value for {', '.join(missing)}")
        with np.errstate(all="ignore"):
            if self._keyframes:
                values = self._keyframe_values(variables, n_frames)
            else:
                values = _over_frames(self._expression.evaluate(variables), n_frames)
        self._check_finite(np.arange(n_frames), values)
        return values

    def value_at(self, variables: Mapping[str, float], index: int) -> float:
        """The value on frame ``index`` alone, for a sound that arrives as it plays: ``variables``
        hold each name's value on that frame (floats, ``t`` = ``index``). The same as
        ``evaluate(...)[index]`` over a whole sound whose variables had these values, except that
        the frames before an expression keyframe take its value with this frame's variables.
        Raises :class:`ScheduleError` as :meth:`evaluate` does."""
        if self.is_constant:
            return self.constant
        missing = sorted(self.names_used - set(variables))
        if missing:
            raise ScheduleError(f"{self._where()}: no value for {', '.join(missing)}")
        if not self._keyframes:
            with np.errstate(all="ignore"):
                value = _over_frames(self._expression.evaluate(variables), 1)
            self._check_finite(np.array([index]), value)  # the error names this frame, not frame 0
            return float(value[0])
        # keyframes count frames from 0: laid out up to this frame, but only at the frames the line
        # bends, so the cost grows with the keyframes, not with the frame numbers (up to MAX_KEYFRAME)
        with np.errstate(all="ignore"):
            frames, values = self._keyframe_points(variables, max(index, self._keyframes[-1].frame) + 1,
                                                   scalars=True)
        exact = np.flatnonzero(frames == index)
        value = values[exact[:1]] if len(exact) else np.interp([index], frames, values)
        self._check_finite(np.array([index]), value)  # interpolating between huge values can overflow
        return float(value[0])

    def _check_finite(self, frames: np.ndarray, values: np.ndarray) -> None:
        """ScheduleError naming the first of ``frames`` whose value is not a finite number."""
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise ScheduleError(f"{self._where()}: frame {frames[bad[0]]}: the value is {values[bad[0]]} "
                                f"(not a finite number); keep log and sqrt above 0 and divide by "
                                f"non-zero values")

    def _where(self) -> str:
        return f'{self.flag} "{excerpt(self.text)}"'

    def _keyframe_values(self, variables: Mapping, n_frames: int) -> np.ndarray:
        """Keyframes to per-frame values (rule in the module docstring)."""
        frames, values = self._keyframe_points(variables, n_frames)
        result = np.interp(np.arange(n_frames, dtype=np.float64), frames, values)
        inside = frames < n_frames
        result[frames[inside]] = values[inside]  # set frames exactly, not through interp
        return result

    def _keyframe_points(self, variables: Mapping, n_frames: int, scalars: bool = False
                         ) -> tuple[np.ndarray, np.ndarray]:
        """(frames, int64; values, float64) the keyframes set over ``n_frames`` frames, frames
        increasing: a number keyframe's frame, every frame of an expression keyframe up to the next
        keyframe. With ``scalars`` (every variable a float, the same on every frame) an expression
        keyframe gives its first and last frame only: interpolating between them gives the rest.
        Raises :class:`ScheduleError` for a value that is not finite or no keyframe before the end."""
        frames, values = [], []
        for k, key in enumerate(self._keyframes):
            end = min(self._keyframes[k + 1].frame if k + 1 < len(self._keyframes) else n_frames, n_frames)
            if key.number is not None:
                frames.append(np.array([key.frame]))
                values.append(np.array([key.number]))
            elif key.frame < end and scalars:
                frames.append(np.array([key.frame, end - 1]))
                values.append(_over_frames(key.node.evaluate(variables), 2))
            elif key.frame < end:
                part = {name: value if np.ndim(value) == 0 else np.asarray(value)[key.frame:end]
                        for name, value in variables.items()}
                frames.append(np.arange(key.frame, end))
                values.append(_over_frames(key.node.evaluate(part), end - key.frame))
        if not frames:
            raise ScheduleError(f"{self._where()}: every keyframe lies after the last frame "
                                f"{n_frames - 1}; start with a keyframe at frame 0")
        frames, values = np.concatenate(frames), np.concatenate(values)
        self._check_finite(frames, values)  # before interpolation spreads a bad value
        return frames, values


def parse_schedule(text: str, *, flag: str, names: Collection[str], hints: Mapping[str, str] | None = None
                   ) -> Schedule:
    """Read ``text`` (a number, an expression or keyframes; see the module docstring) given to
    ``flag`` (e.g. ``"--strength"``), which may read the variables ``names`` (``hints``: what to
    do to have a name that is not among them, see :class:`~sounddiffusion.control.schedule_grammar.Parser`).

    Raises :class:`ScheduleError`: one line with the flag, the text, the 1-based column and what
    was expected there."""
    plain = text.strip(_ASCII_SPACE)
    if _PLAIN_NUMBER.fullmatch(plain) and np.isfinite(float(plain)):
        return Schedule(text, flag, frozenset(), True, float(plain))
    try:
        tokens = tokenize(text)
        parser = Parser(tokens, names, hints)
        if _is_keyframes(tokens):
            keyframes = _keyframes(parser)
            used = frozenset().union(*(names_in(key.node) for key in keyframes))
            return Schedule(text, flag, used, False, None, _keyframes=keyframes)
        expression = parser.expression()
        _expect_end(parser)
    except SyntaxProblem as problem:
        raise ScheduleError(f'{flag} "{excerpt(text, problem.offset)}": column {problem.offset + 1}: '
                            f"{problem.message}") from None
    return Schedule(text, flag, names_in(expression), False, None, _expression=expression)


def clip_to_range(values: np.ndarray, *, low: float | None, high: float | None, flag: str) -> np.ndarray:
    """``values`` limited to ``[low, high]`` (None: no limit on that side), float64.

    When any frame lies outside, one warning names ``flag``, how many frames were clipped and
    the range."""
    values = np.asarray(values, dtype=np.float64)
    low_value = -np.inf if low is None else low
    high_value = np.inf if high is None else high
    outside = int(np.count_nonzero((values < low_value) | (values > high_value)))
    if not outside:
        return values
    log.warning("%s: %d of %d frames lie outside [%s, %s] and were clipped to it", flag, outside,
                len(values), "-inf" if low is None else f"{low:g}", "inf" if high is None else f"{high:g}")
    return np.clip(values, low_value, high_value)


def _is_keyframes(tokens) -> bool:
    """Whether the text starts like ``FRAME:`` (or ``-FRAME:``, which is then reported)."""
    first = 1 if tokens[0].text == "-" else 0
    return (len(tokens) > first + 1 and tokens[first].kind == "number"
            and tokens[first + 1].text == ":")


def _keyframes(parser: Parser) -> tuple[Keyframe, ...]:
    """``FRAME: VALUE, FRAME: VALUE, ...`` (a trailing comma allowed)."""
    keyframes = []
    while True:
        token = parser.current
        if token.kind != "number" or not token.text.isdigit():
            raise SyntaxProblem(token.offset, f"expected a keyframe's frame number (a whole number, 0 or "
                                f"more), found {describe(token)}")
        parser.advance()
        digits = token.text.lstrip("0")
        if len(digits) > len(str(MAX_KEYFRAME)) or int(digits or "0") > MAX_KEYFRAME:
            raise SyntaxProblem(token.offset, f"keyframe {shorten(token.text)} is past the largest frame "
                                f"number, {MAX_KEYFRAME}")
        frame = int(digits or "0")
        if keyframes and frame <= keyframes[-1].frame:
            raise SyntaxProblem(token.offset, f"keyframe {frame} does not come after keyframe "
                                f"{keyframes[-1].frame}: list keyframes in increasing frame order")
        parser.expect(":", "':' after the frame number")
        node = parser.expression()
        keyframes.append(Keyframe(frame, node, _number_of(node)))
        if parser.at(","):
            parser.advance()
            if parser.current.kind == "end":
                break
        elif parser.current.kind == "end":
            break
        else:
            raise SyntaxProblem(parser.current.offset, f"expected ',' or the end after a keyframe's value, "
                                f"found {describe(parser.current)}")
    return tuple(keyframes)


def _number_of(node) -> float | None:
    """The value of a plain (signed, maybe parenthesised) number, else None."""
    if isinstance(node, Number):
        return node.value
    if isinstance(node, Negate) and isinstance(node.operand, Number):
        return -node.operand.value
    return None


def _expect_end(parser: Parser) -> None:
    token = parser.current
    if token.kind == "end":
        return
    hint = "; keyframes look like 0:(0.4), 96:(0.7)" if token.text == ":" else ""
    raise SyntaxProblem(token.offset, f"expected an operator or the end, found {describe(token)}{hint}")


def _over_frames(value, n_frames: int) -> np.ndarray:
    """A float or per-frame array as a new float64 array ``(n_frames,)``."""
    return np.array(np.broadcast_to(np.asarray(value, dtype=np.float64), (n_frames,)))


def excerpt(text: str, offset: int = 0) -> str:
    """``text`` as shown in a one-line message: line breaks and tabs as spaces and other characters
    a terminal would not print (a no-break space, control codes) as ``?``, one for one so that
    columns hold, and, when it is longer than :data:`EXCERPT` characters, only about that many
    around the 0-based ``offset``, with ``...`` where text was left out."""
    text = "".join(" " if char in _ASCII_SPACE else char if char.isprintable() else "?" for char in text)
    if len(text) <= EXCERPT:
        return text
    start = max(0, min(offset - EXCERPT // 2, len(text) - EXCERPT))
    end = start + EXCERPT
    return f"{'...' if start > 0 else ''}{text[start:end]}{'...' if end < len(text) else ''}"

