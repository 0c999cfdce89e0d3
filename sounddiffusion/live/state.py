"""Where a live run stands, shared between the frame loop (which writes it) and the web server (which
reads it): the newest picture as JPEG, counts, frames per second, latency and the envelopes.

The loop calls :meth:`LiveState.publish` once a picture is ready; listeners (the server's
streams) are told at once, from the loop's thread, and must only hand the news to their own.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_S = 2.0
"""Seconds over which frames per second and latency are averaged."""


@dataclass(frozen=True)
class Shown:
    """A picture on show: its ``number`` (1, 2, ... in order), ``jpeg`` bytes, the ``ready`` time
    (``time.monotonic()``) and its latency in ms (last sample of its sound captured -> ready)."""

    number: int
    jpeg: bytes
    ready: float
    latency_ms: float


@dataclass
class LiveState:
    """See the module docstring. All methods are thread-safe."""

    width: int = 0
    height: int = 0
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _shown: Shown | None = None
    _recent: deque = field(default_factory=deque, repr=False)  # (ready, latency_ms) of the last WINDOW_S
    _latencies: list = field(default_factory=list, repr=False)  # every frame's, for the summary
    _counts: dict = field(default_factory=lambda: {"rested": 0, "dropped": 0})
    _sound: dict = field(default_factory=lambda: {"envelopes": {}, "bpm": 0.0, "bar": 0.0, "beat_in_bar": 0,
                                                  "seconds": 0.0, "tracks": {}})
    _controls: dict = field(default_factory=dict)
    _listeners: list = field(default_factory=list, repr=False)

    def publish(self, jpeg: bytes, ready: float, latency_ms: float) -> Shown:
        """A new picture is on show."""
        with self._lock:
            number = self._shown.number + 1 if self._shown else 1
            self._shown = Shown(number, jpeg, ready, latency_ms)
            self._recent.append((ready, latency_ms))
            self._latencies.append(latency_ms)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(self._shown)
        return self._shown

    def count(self, *, rested: int = 0, dropped: int = 0) -> None:
        """Frames of the sound that got no picture: the loop rested, or was too late for them."""
        with self._lock:
            self._counts["rested"] += rested
            self._counts["dropped"] += dropped

    def hear(self, envelopes: dict[str, float], bars: dict[str, float], bpm: float, seconds: float,
             tracks: dict[str, dict[str, float]]) -> None:
        """The newest frame of the sound: its envelopes, its ``bar`` and ``beat_in_bar`` (``bars``),
        the tempo, the seconds of sound so far and each control track's envelopes by name."""
        with self._lock:
            self._sound = {"envelopes": dict(envelopes), "bpm": float(bpm), "bar": float(bars["bar"]),
                           "beat_in_bar": int(bars["beat_in_bar"]), "seconds": float(seconds),
                           "tracks": {name: dict(values) for name, values in tracks.items()}}

    def set_controls(self, controls: dict) -> None:
        with self._lock:
            self._controls = dict(controls)

    def newest(self) -> Shown | None:
        with self._lock:
            return self._shown

    def listen(self, listener: Callable[[Shown], None]) -> Callable[[], None]:
        """Call ``listener(shown)`` on every new picture; returns the function that stops it."""
        with self._lock:
            self._listeners.append(listener)
        return lambda: self._forget(listener)

    def _forget(self, listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def status(self, now: float | None = None) -> dict:
        """What ``GET /status`` answers: ``frames`` shown, ``fps`` (pictures per second over the last
        :data:`WINDOW_S` s), ``latency_ms`` (their mean latency, else the last picture's), ``rested``
        and ``dropped`` frames of the sound, ``envelopes``, ``bpm``, ``bar``, ``beat_in_bar``, ``seconds``
        of sound, ``tracks`` (each control track's envelopes by name), ``controls`` and the picture's
        ``width``/``height``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._recent and self._recent[0][0] < now - WINDOW_S:
                self._recent.popleft()
            shown, recent = self._shown, list(self._recent)
            span = min(WINDOW_S, now - self.started)
            return {"frames": shown.number if shown else 0,
                    "fps": round(len(recent) / span, 2) if span > 0 else 0.0,
                    "latency_ms": round(sum(l for _, l in recent) / len(recent) if recent
                                        else shown.latency_ms if shown else 0.0, 1),
                    **self._counts, **self._sound, "controls": dict(self._controls),
                    "width": self.width, "height": self.height}

    def latencies(self) -> list[float]:
        """Every picture's latency in ms, in order."""
        with self._lock:
            return list(self._latencies)
