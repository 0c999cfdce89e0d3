"""Sound coming in as it plays: a microphone or line input (PortAudio through ``sounddevice``), or a
sound file played in real time, so that live mode can be tried and tested without a sound card.

Both hand :class:`Block` s to a queue from their own thread (PortAudio's callback, or the player's),
each stamped with the moment its last sample was captured (``time.monotonic()``), which is where
the latency the page shows starts, and with where it begins in the sound (a file's sample, from 0
again on each pass of ``--loop``; a device's count since the capture began), which is where the
control tracks are read. Samples are mono float32 at
:data:`~sounddiffusion.sound.audio.SAMPLE_RATE`. ``sounddevice`` is imported only when a device is
used: a missing package or PortAudio library, or a missing device, is one :class:`DeviceError`
line that says what to install or choose.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from sounddiffusion.errors import AudioError, DeviceError, ParameterError
from sounddiffusion.sound.audio import SAMPLE_RATE, sound_blocks

log = logging.getLogger(__name__)

BLOCK = 1024
"""Samples per block handed on (23 ms at 44.1 kHz), a usual sound-card buffer."""
MIC = "mic"


@dataclass(frozen=True)
class Block:
    """``samples`` (mono float32) whose last one was captured at ``captured`` (``time.monotonic()``)
    and whose first one is sample ``start`` of the sound (see the module docstring)."""

    samples: np.ndarray
    captured: float
    start: int


class SoundInput:
    """A source of :class:`Block` s in :attr:`blocks`; None there means the sound has ended.
    ``start()`` begins the capture (or playback), ``stop()`` ends it; also a context manager."""

    def __init__(self):
        self.blocks: queue.Queue[Block | None] = queue.Queue()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> SoundInput:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class FilePlayer(SoundInput):
    """The sound file ``path`` released in :data:`BLOCK`-sample blocks at the pace it plays (each when
    its last sample would have been heard), again from the start with ``loop``. Checked at once
    (AudioError for a file that cannot be read)."""

    def __init__(self, path: str | Path, *, loop: bool = False):
        super().__init__()
        self.path, self.loop = Path(path), loop
        next(iter(sound_blocks(self.path)))  # a missing or unreadable file fails here, before the model loads
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._play, name="sound-file-player", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _play(self) -> None:
        start, released = time.monotonic(), 0
        try:
            while not self._stop.is_set():
                position = 0  # in this pass of the file
                for piece in _rechunked(sound_blocks(self.path, warn_non_finite=released == 0), BLOCK):
                    released += len(piece)
                    due = start + released / SAMPLE_RATE
                    if self._stop.wait(max(0.0, due - time.monotonic())):
                        return
                    self.blocks.put(Block(piece, time.monotonic(), position))
                    position += len(piece)
                if not self.loop:
                    break
        except Exception as exc:  # noqa: BLE001 - the loop reads the end and logs why
            log.error("%s: %s", self.path, exc)
        self.blocks.put(None)


def _rechunked(blocks, size: int):
    """The samples of ``blocks`` again in pieces of ``size`` (the last one shorter)."""
    held = np.zeros(0, np.float32)
    for block in blocks:
        held = np.concatenate([held, block])
        while len(held) >= size:
            yield held[:size]
            held = held[size:]
    if len(held):
        yield held


def import_sounddevice():
    """The ``sounddevice`` module; DeviceError saying what to install when it or PortAudio is missing."""
    try:
        import sounddevice
    except ImportError:
        raise DeviceError("--input mic needs the sounddevice package: pip install sounddevice "
                          "(or play a file with --input FILE)") from None
    except OSError:  # sounddevice raises it when the PortAudio library is not found
        raise DeviceError("--input mic needs the PortAudio library: install it (Debian/Ubuntu: apt-get install "
                          "libportaudio2; macOS: brew install portaudio) or play a file with --input FILE") from None
    return sounddevice


def list_devices() -> str:
    """The input devices PortAudio sees, one a line: index, name, channels, default rate; the
    default one marked with ``*``."""
    sd = import_sounddevice()
    default = sd.default.device[0]
    lines = [f"{'*' if index == default else ' '} {index:3d}  {device['name']}  ({device['max_input_channels']} "
             f"in, {device['default_samplerate']:g} Hz)"
             for index, device in enumerate(sd.query_devices()) if device["max_input_channels"] > 0]
    return "\n".join(lines) if lines else "no input devices found (connect a microphone or a line input)"


class Microphone(SoundInput):
    """The input device ``device_index`` (None: the default one) through PortAudio, mixed to mono
    and resampled to 44.1 kHz when the device runs at another rate. Checked at once: the stream is
    opened here (so a busy device or a rate it refuses fails before the model loads), and closed by
    :meth:`stop`, which may be called any number of times, started or not."""

    def __init__(self, device_index: int | None = None):
        super().__init__()
        sd = import_sounddevice()
        self._refused = (ValueError, sd.PortAudioError)
        self.which = f"--device_index {device_index}" if device_index is not None else "the default input device"
        with self._device_errors():
            info = sd.query_devices(device_index, "input")
        self.rate = int(info["default_samplerate"]) or SAMPLE_RATE
        self.channels = max(1, min(2, int(info["max_input_channels"])))
        self._resampler = (soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32")
                           if self.rate != SAMPLE_RATE else None)
        with self._device_errors():
            self._stream = sd.InputStream(device=device_index, channels=self.channels, samplerate=self.rate,
                                          blocksize=BLOCK, dtype="float32", callback=self._captured)
        self._taken = 0  # samples handed on so far

    @contextlib.contextmanager
    def _device_errors(self):
        """PortAudio's refusals (a missing or busy device, a rate it cannot take) as one DeviceError line."""
        try:
            yield
        except self._refused as exc:
            raise DeviceError(f"{self.which} cannot record ({exc}): see live.py --list_devices, or play a file "
                              f"with --input FILE") from None

    def _captured(self, data: np.ndarray, frames: int, time_info, status) -> None:
        captured = time.monotonic()
        if status:
            log.debug("input: %s", status)
        mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0].copy()
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono)
        self.blocks.put(Block(mono, captured, self._taken))
        self._taken += len(mono)

    def start(self) -> None:
        with self._device_errors():
            self._stream.start()

    def stop(self) -> None:
        if not self._stream.closed:
            self._stream.stop()  # sounddevice ignores PortAudio's complaint about a stream never started
            self._stream.close()
            self.blocks.put(None)


def open_input(source: str, *, loop: bool = False, device_index: int | None = None) -> SoundInput:
    """``--input``: :data:`MIC` (a device) or the path of a sound file. Raises AudioError or
    DeviceError (one line) when it cannot be used, ParameterError for ``loop`` with :data:`MIC`."""
    if source == MIC:
        if loop:
            raise ParameterError("--loop plays --input FILE again and again: leave it out with --input mic")
        return Microphone(device_index)
    if device_index is not None:
        raise DeviceError(f"--device_index {device_index} chooses a microphone: leave it out with --input FILE")
    if not Path(source).exists():
        raise AudioError(f"--input {source}: no such sound file; give a sound file, or 'mic' for the microphone")
    return FilePlayer(source, loop=loop)
