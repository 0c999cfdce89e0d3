"""The sound taken as it comes, in its own thread: recorded, cut into frames, its envelopes computed.

:class:`Listener` takes every block the input hands on (cut at ``--seconds``), writes it to the
recording, feeds it with the control tracks' samples of the same time to
:class:`~sounddiffusion.live.music.LiveMusic` and keeps the newest
complete frame as a :class:`Heard` for the frame loop, which takes it when it is free (older ones
are replaced, never queued). The analysis runs beside the picture being made: on a CPU torch has
all cores but one, and this thread the one left.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import numpy as np

from sounddiffusion.live.input import Block, SoundInput
from sounddiffusion.live.music import LiveMusic
from sounddiffusion.live.record import LiveRecorder
from sounddiffusion.live.state import LiveState
from sounddiffusion.sound.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often the thread looks whether it is asked to stop while no sound comes


@dataclass(frozen=True)
class Heard:
    """Frame ``index`` of the sound (at ``--fps``): its ``samples``, what schedules read on it
    (``variables``: :meth:`LiveMusic.variables`, the control tracks' too), and when its last sample
    was captured (``time.monotonic()``)."""

    index: int
    samples: np.ndarray
    variables: dict[str, float]
    captured: float


class Listener:
    """See the module docstring. ``music``: the analysis to feed; ``limit``: samples to take at
    most (None: no end); ``max_f``: the schedules' ``max_f``. :attr:`samples` counts the samples
    taken, :attr:`ended` says the sound has ended (or reached ``limit``)."""

    def __init__(self, source: SoundInput, music: LiveMusic, *, limit: int | None, max_f: float, state: LiveState,
                 recorder: LiveRecorder | None):
        self.source, self.limit, self.max_f, self.state, self.recorder = source, limit, max_f, state, recorder
        self.music = music
        self.samples = 0
        self.ended = False
        self._newest: Heard | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._listen, name="live-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Take what has come in so far, then stop (waits for the thread)."""
        self._stop.set()
        self._thread.join()

    def newest(self, after: int, timeout: float) -> Heard | None:
        """The newest frame if it is later than frame ``after``, waiting up to ``timeout`` s for one;
        None when there is none (yet, or any more: see :attr:`ended`). Raises what the thread met."""
        with self._changed:
            self._changed.wait_for(lambda: self._later(after) or self.ended or self._error, timeout)
            if self._error is not None:
                raise self._error
            return self._newest if self._later(after) else None

    def _later(self, after: int) -> bool:
        return self._newest is not None and self._newest.index > after

    def _listen(self) -> None:
        try:
            while not self.ended:
                try:  # once asked to stop, only what has come in already
                    block = (self.source.blocks.get_nowait() if self._stop.is_set()
                             else self.source.blocks.get(timeout=POLL_S))
                except queue.Empty:
                    if self._stop.is_set():
                        break
                    continue
                self._take(block)
        except BaseException as exc:  # noqa: BLE001 - handed to the frame loop's thread
            log.debug("listener stopped", exc_info=True)
            self._error = exc
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def _take(self, block: Block | None) -> None:
        """One block of sound (None: the end), cut at ``limit``: recorded, analysed, announced."""
        if block is None:
            self.ended = True
            return
        piece = block.samples if self.limit is None else block.samples[: max(0, self.limit - self.samples)]
        piece_end = block.captured - (len(block.samples) - len(piece)) / SAMPLE_RATE  # its last sample's
        self.samples += len(piece)
        if self.recorder is not None:
            self.recorder.add_sound(piece, piece_end)
        music, main = self.music, self.music.main
        if music.push(piece, block.start):
            index = main.frames - 1
            heard = Heard(index, main.last_slice, music.variables(index, self.max_f),
                          piece_end - (self.samples - main.pending_start) / SAMPLE_RATE)
            with self._changed:
                self._newest = heard
                self._changed.notify_all()
            self.state.hear(main.values, main.bars, main.bpm, self.samples / SAMPLE_RATE, music.track_values())
        if self.limit is not None and self.samples >= self.limit:
            with self._changed:
                self.ended = True
                self._changed.notify_all()
