"""Text prompts that change over time: ``(seconds, prompt)`` schedules from ``--textprompt`` /
``--textpromptend`` (:func:`start_end_schedule`) or a file of timed prompts (:func:`parse_prompt_file`),
and the prompts mixed at a given time (:func:`prompt_weights_at`). Files of other timed lines (a
song's sections) are read the same way (:func:`parse_timed_file`).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from sounddiffusion.errors import ParameterError, PromptFileError

Schedule = list[tuple[float, str]]
"""Text prompts in time: ``(seconds, prompt)`` pairs with strictly increasing times."""

# [[H:]M:]S[.s] in ASCII digits, then whitespace or a colon (upstream wrote "0:20: text"), then the prompt
_PROMPT_LINE = re.compile(
    r"(?:(?:(?P<h>[0-9]+):)?(?P<m>[0-9]+):)?(?P<s>[0-9]+(?:\.[0-9]+)?)(?::\s*|\s+)(?P<text>\S.*)"
)

MAX_PROMPT_SECONDS = 10 ** 6
"""The latest time a prompt file may give (about 278 hours)."""
_PROMPT_FORMAT = ("expected 'TIME prompt' with TIME as M:SS, M:SS.s, SS or SS.s "
                  "(optionally H:MM:SS, and a colon after TIME), e.g. '1:05 a stormy sea'")


def parse_prompt_file(path: str | Path) -> Schedule:
    """The schedule in a file of timestamped prompts, one per line: ``[(seconds, prompt), ...]``.

    Accepted lines: ``M:SS text``, ``M:SS.s text``, ``SS text``, ``SS.s text``, ``H:MM:SS text``,
    each also with a colon after the time (``0:20: text``), times in ASCII digits up to
    :data:`MAX_PROMPT_SECONDS`. Blank lines and lines starting with ``#`` are skipped. A prompt may
    end with ``--neg NEGATIVE`` (Deforum's convention, see :func:`split_negative`); the text is kept
    whole here. Times must increase strictly. The file is UTF-8, with or without a byte-order mark
    (as Windows editors save it). Raises :class:`PromptFileError` naming the file (and the line
    number) when the file cannot be read, a line does not fit, a time is too late, times do not
    increase or there is no prompt at all.
    """
    return parse_timed_file(path, "prompt file", "prompt")


def parse_timed_file(path: str | Path, what: str, item: str) -> Schedule:
    """``[(seconds, text), ...]`` of a file of timed lines read as :func:`parse_prompt_file` reads
    prompts; ``what`` names the file in messages ("sections file"), ``item`` one line's text
    ("section label")."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise PromptFileError(f"{what} {path} does not exist: check the path") from None
    except IsADirectoryError:
        raise PromptFileError(f"{what} {path} is a folder: give a text file of timed {item}s") from None
    except PermissionError:
        raise PromptFileError(f"cannot read {what} {path}: permission denied; make it readable") from None
    except UnicodeDecodeError as exc:
        number = exc.object.count(b"\n", 0, exc.start) + 1
        raise PromptFileError(f"{path}, line {number}: not UTF-8 text; save the {what} as UTF-8") from None
    except OSError as exc:
        raise PromptFileError(f"cannot read {what} {path} ({exc.strerror or exc})") from None
    schedule: Schedule = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        seconds, prompt = _parse_timed_line(line, path, number, item)
        if schedule and seconds <= schedule[-1][0]:
            raise PromptFileError(f"{path}, line {number}: time {seconds:g} s does not come after the previous "
                                  f"line's {schedule[-1][0]:g} s; list {item}s in increasing time")
        schedule.append((seconds, prompt))
    if not schedule:
        raise PromptFileError(f"{what} {path} holds no {item}: {_format(item)}")
    return schedule


def _format(item: str) -> str:
    """What a line should look like (the prompt files' form, for another ``item`` with its example)."""
    if item == "prompt":
        return _PROMPT_FORMAT
    return _PROMPT_FORMAT.replace("TIME prompt", f"TIME {item}").replace("a stormy sea", "chorus")


def _parse_timed_line(line: str, path: Path, number: int, item: str) -> tuple[float, str]:
    """``(seconds, text)`` of one stripped, non-comment line of a file of timed lines."""
    match = _PROMPT_LINE.fullmatch(line)
    shown = line if len(line) <= 60 else f"{line[:57]}..."
    if match is None:
        raise PromptFileError(f"{path}, line {number}: cannot read {shown!r}; {_format(item)}")
    h, m, s = match.group("h", "m", "s")
    # Whole parts longer than the limit are refused before int() (which refuses 4,300 digits)
    # and float() (which makes 10^400 infinite) read them.
    if any(len(whole.lstrip("0")) > len(str(MAX_PROMPT_SECONDS)) for whole in (h or "", m or "", s.split(".")[0])):
        raise _too_late(path, number, line[:match.start("text")])
    hours, minutes, seconds = int(h or 0), int(m or 0), float(s)
    if (m is not None and seconds >= 60) or (h is not None and minutes >= 60):
        raise PromptFileError(f"{path}, line {number}: {shown!r} has 60 or more seconds or minutes "
                              f"after a colon; {_format(item)}")
    total = hours * 3600 + minutes * 60 + seconds
    if total > MAX_PROMPT_SECONDS:
        raise _too_late(path, number, line[:match.start("text")])
    return total, match["text"]


def _too_late(path: Path, number: int, time: str) -> PromptFileError:
    time = time.rstrip(": \t")
    shown = time if len(time) <= 20 else f"{time[:8]}...{time[-8:]} ({len(time)} characters)"
    return PromptFileError(f"{path}, line {number}: time {shown} is later than {MAX_PROMPT_SECONDS} s "
                           f"(about 278 hours), the latest a prompt file takes; check the time")


NEGATIVE_MARK = "--neg"
"""Deforum's convention: in ``a city at night --neg blurry, text`` what follows the mark is the negative prompt."""


def split_negative(prompt: str) -> tuple[str, str | None]:
    """``(prompt, negative prompt)`` of a prompt written ``prompt --neg negative`` (Deforum's convention),
    both stripped; ``(prompt, None)`` when it holds no ``--neg``."""
    positive, mark, negative = prompt.partition(NEGATIVE_MARK)
    if not mark:
        return prompt, None
    return positive.strip(), negative.strip()


def negative_weights_at(weights: Sequence[tuple[str, float]], default: str
                        ) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The prompts mixed at a time (:func:`prompt_weights_at`) split into (positive prompts, negative
    prompts) with the same weights: a prompt without ``--neg`` has ``default`` (``--negative_prompt``)
    as its negative; "" stands for the empty prompt."""
    split = [(split_negative(prompt), weight) for prompt, weight in weights]
    return ([(positive, weight) for (positive, _), weight in split],
            [(default if negative is None else negative, weight) for (_, negative), weight in split])


def start_end_schedule(start: str, end: str | None, duration: float) -> Schedule:
    """The schedule of ``--textprompt start --textpromptend end`` over a video whose last frame is at ``duration`` s.

    ``start`` at 0 s, ``end`` at ``duration``: the conditioning moves linearly from one to the
    other across the video, as upstream. Without ``end`` (or when the video has a single frame,
    ``duration <= 0``) it is ``start`` throughout.
    """
    if end is None or duration <= 0:
        return [(0.0, start)]
    return [(0.0, start), (float(duration), end)]


def prompt_weights_at(schedule: Sequence[tuple[float, str]], t_seconds: float) -> list[tuple[str, float]]:
    """The prompts mixed at time ``t_seconds`` and their weights, which sum to 1.

    Before the first time: the first prompt alone; between two times: the two prompts with
    weights that move linearly from the earlier to the later; from the last time on: the last
    prompt alone. Prompts with weight 0 are left out.
    """
    if not schedule:
        raise ParameterError("a prompt schedule needs at least one (seconds, prompt) entry")
    if t_seconds <= schedule[0][0]:
        return [(schedule[0][1], 1.0)]
    for (t0, prompt0), (t1, prompt1) in zip(schedule, schedule[1:]):
        if t_seconds < t1:
            later = (t_seconds - t0) / (t1 - t0)
            return [(prompt, weight) for prompt, weight in ((prompt0, 1.0 - later), (prompt1, later)) if weight > 0]
    return [(schedule[-1][1], 1.0)]
