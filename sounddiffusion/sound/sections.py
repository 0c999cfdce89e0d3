"""A song's sections (intro, verse, chorus ...) as envelopes, from the user's times or found in the
sound (numpy + librosa; scikit-learn through :func:`librosa.segment.agglomerative`).

``section``
    The index of the section a frame lies in: 0, 1, 2 ... (a count, not in [0, 1]).
``section_start``
    1 on the first frame of every section (frame 0 starts section 0), else 0.

Sections start at the times given (``--sections FILE``, lines ``M:SS label`` read as prompt files
are); the first starts at 0 s whatever the file says, unlabelled when the file starts later.

Found sections (``--sections auto``, :func:`find_sections`): the sound is cut into rows of about
0.19 s (at least 1/1000 of its length); each row holds its chroma (12 pitch classes of a
4096-sample Hann spectrum, divided by their largest) and 13 MFCCs (40 mel bands; each
coefficient standardized over the song), averaged over the row. librosa's
:func:`~librosa.segment.agglomerative` (Ward clustering of neighbouring rows) splits the rows
into ``k`` runs; ``k`` is given (``auto:N``) or the one that minimises ``W(k)/W(1) +``
:data:`SECTION_COST` ``* k``, ``W(k)`` being the rows' squared distance to their section's mean:
a section must explain at least that share of the song's variation to be worth its boundary.
With ``auto`` every section lasts at least :data:`MIN_SECTION_SECONDS` (a ``k`` whose clustering
makes one shorter is passed over). ``auto:N`` gives N sections, N capped at the number of
:data:`MIN_SECTION_SECONDS` that fit in the sound, but not that length: the clustering may make a
section shorter.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from fractions import Fraction

import librosa
import numpy as np
import scipy.fft

from sounddiffusion.errors import ParameterError
from sounddiffusion.sound.audio import SAMPLE_RATE, frame_starts
from sounddiffusion.sound.beats import frames_of_samples

log = logging.getLogger(__name__)

SECTION_NAMES = ("section", "section_start")
SECTION_COST = 0.12
"""The share of the song's feature variation a found section must explain (see the docstring)."""
MIN_SECTION_SECONDS = 2.0
MAX_AUTO_SECTIONS = 12
WINDOW = 4096
N_MFCC = 13
N_MELS = 40
MAX_ROWS = 1000

Sections = list[tuple[float, str]]
"""``(start in seconds, label)`` of each section, starts increasing, the first at 0."""


def section_starts(times: Sequence[tuple[float, str]], duration: float, what: str) -> Sections:
    """The sections of ``times`` (``(seconds, label)``, increasing) over a sound of ``duration``
    seconds: a first unlabelled section at 0 when the first time is later, and times at or after
    the end left out with a warning (``what`` names their source in it)."""
    sections = [(float(t), label) for t, label in times]
    beyond = [t for t, _ in sections if t >= duration]
    if beyond:
        log.warning("%s: %d section start%s at or after the sound's end (%.2f s) left out", what, len(beyond),
                    "s" * (len(beyond) != 1), duration)
        sections = [(t, label) for t, label in sections if t < duration]
    if not sections or sections[0][0] > 0:
        sections.insert(0, (0.0, ""))
    return sections


def section_envelopes(sections: Sections, fps: float | Fraction, n_frames: int,
                      sr: int = SAMPLE_RATE) -> dict[str, np.ndarray]:
    """``section`` and ``section_start`` (float64 ``(n_frames,)``) of ``sections``: a start lies on
    the frame holding its sample (``round(seconds * sr)``). Raises :class:`ParameterError` when two
    starts fall on the same frame."""
    starts = frame_starts(n_frames, fps, sr)
    frames = frames_of_samples(np.round(np.array([t for t, _ in sections]) * sr).astype(np.int64), starts)
    same = np.flatnonzero(np.diff(frames) == 0)
    if len(same):
        (t0, a), (t1, b) = sections[same[0]], sections[same[0] + 1]
        raise ParameterError(f"--sections: the sections at {t0:g} s ({a or 'start'}) and {t1:g} s ({b}) start "
                             f"on the same video frame {frames[same[0]]}; space them at least one frame apart")
    start = np.zeros(n_frames)
    start[frames] = 1.0
    return {"section": np.cumsum(start) - 1.0, "section_start": start}


def with_sections(envelopes, sections: Sections):
    """``envelopes`` (an :class:`~sounddiffusion.sound.analysis.Envelopes`) with the ``section`` and
    ``section_start`` envelopes of ``sections`` added, and ``sections`` kept."""
    values = {**envelopes.values, **section_envelopes(sections, envelopes.fps, envelopes.n_frames)}
    return replace(envelopes, values=values, sections=tuple(sections))


class SectionFeatures:
    """Chroma and MFCC rows of a sound arriving piece by piece (:meth:`push`), each row the mean
    over ``windows_per_row`` consecutive 4096-sample windows; :meth:`rows` gives them."""

    def __init__(self, n_samples: int, sr: int = SAMPLE_RATE):
        self.sr = sr
        seconds = max(0.19, n_samples / sr / MAX_ROWS)
        self.windows_per_row = max(1, round(seconds * sr / WINDOW))
        self.window = np.hanning(WINDOW + 1)[:-1].astype(np.float32)
        self.chroma = librosa.filters.chroma(sr=sr, n_fft=WINDOW).astype(np.float32)
        self.mel = librosa.filters.mel(sr=sr, n_fft=WINDOW, n_mels=N_MELS).astype(np.float32)
        self.buffer = np.zeros(0, np.float32)
        self.parts: list[np.ndarray] = []

    @property
    def row_seconds(self) -> float:
        return self.windows_per_row * WINDOW / self.sr

    def push(self, samples: np.ndarray) -> None:
        self.buffer = np.concatenate([self.buffer, np.asarray(samples, np.float32)])
        whole = len(self.buffer) // WINDOW
        if not whole:
            return
        frames = self.buffer[: whole * WINDOW].reshape(whole, WINDOW) * self.window
        self.buffer = self.buffer[whole * WINDOW:]
        power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
        chroma = power @ self.chroma.T
        chroma /= np.maximum(chroma.max(axis=1, keepdims=True), 1e-10)
        mel_db = 10.0 * np.log10(np.maximum(power @ self.mel.T, 1e-10))
        self.parts.append(np.hstack([chroma, scipy.fft.dct(mel_db, axis=1, norm="ortho")[:, :N_MFCC]]))

    def rows(self) -> np.ndarray:
        """float64 ``(12 + 13, n_rows)``: chroma (weighted so that both halves count alike) over
        standardized MFCCs, one column per row of the sound."""
        windows = np.concatenate(self.parts) if self.parts else np.zeros((0, 12 + N_MFCC))
        n_rows = len(windows) // self.windows_per_row
        rows = windows[: n_rows * self.windows_per_row].reshape(n_rows, self.windows_per_row, -1).mean(axis=1)
        chroma, mfcc = rows[:, :12], rows[:, 12:]
        mfcc = (mfcc - mfcc.mean(axis=0)) / np.maximum(mfcc.std(axis=0), 1e-6) if n_rows else mfcc
        return np.hstack([chroma * math.sqrt(N_MFCC / 12), mfcc]).T.astype(np.float64)


def find_sections(pieces: Iterable[np.ndarray], n_samples: int, sr: int = SAMPLE_RATE,
                  count: int | None = None) -> Sections:
    """The sections found in a sound of ``n_samples`` samples at ``sr`` arriving as ``pieces``
    (see the module docstring); ``count`` sections exactly when given, as many as the sound allows
    at most. Labelled "0", "1", ... as their ``section`` index."""
    features = SectionFeatures(n_samples, sr)
    for piece in pieces:
        features.push(piece)
    return sections_of(features, count)


def sections_of(features: SectionFeatures, count: int | None = None) -> Sections:
    """:func:`find_sections` of the sound whose samples were pushed into ``features``."""
    rows = features.rows()
    min_rows = max(1, math.ceil(MIN_SECTION_SECONDS / features.row_seconds))
    most = max(1, min(MAX_AUTO_SECTIONS, rows.shape[1] // min_rows))
    if count is not None and count > most:
        log.warning("--sections auto:%d: the sound has room for %d section%s of at least %g s; found %d",
                    count, most, "s" * (most != 1), MIN_SECTION_SECONDS, most)
    candidates = [min(count, most)] if count else range(1, most + 1)
    total = _spread(rows, [0]) or 1.0
    best, best_cost = [0], math.inf
    for k in candidates:
        bounds = [0] if k == 1 else [int(b) for b in librosa.segment.agglomerative(rows, k)]
        if min(np.diff([*bounds, rows.shape[1]])) < min_rows and k > 1 and count is None:
            continue
        cost = _spread(rows, bounds) / total + SECTION_COST * k
        if cost < best_cost:
            best, best_cost = bounds, cost
    return [(round(b * features.row_seconds, 3), str(i)) for i, b in enumerate(best)]


def _spread(rows: np.ndarray, bounds: Sequence[int]) -> float:
    """The squared distance of ``rows``' columns to the mean of their run (runs start at ``bounds``)."""
    edges = [*bounds, rows.shape[1]]
    return float(sum(((rows[:, a:b] - rows[:, a:b].mean(axis=1, keepdims=True)) ** 2).sum()
                     for a, b in zip(edges, edges[1:]) if b > a))


def auto_count(text: str) -> tuple[bool, int | None]:
    """What ``--sections TEXT`` asks: ``(True, None)`` for "auto" (as many sections as found),
    ``(True, N)`` for "auto:N", ``(False, None)`` for a file. Raises :class:`ParameterError` for
    "auto:" without a whole number of 2 or more."""
    if text == "auto":
        return True, None
    if not text.startswith("auto:"):
        return False, None
    value = text[len("auto:"):]
    if not re.fullmatch("[0-9]+", value) or int(value) < 2:  # str.isdigit takes '²' and '٣'
        raise ParameterError(f"--sections {text}: give auto, auto:N with N a whole number of sections, 2 or "
                             f"more, or a file of 'M:SS label' lines")
    return True, int(value)
