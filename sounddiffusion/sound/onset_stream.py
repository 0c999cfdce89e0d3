"""librosa's onset strength, computed on a sound that arrives piece by piece (numpy + librosa's
mel filter bank; no torch).

:func:`librosa.onset.onset_strength` needs the whole sound; :class:`OnsetStream` gives the same
envelope from consecutive pieces while holding only one STFT window of samples: a centred
2048-sample Hann STFT with a hop of 512 samples (zeros before and after the sound), 128-band mel
power in dB, the positive difference to the previous STFT frame averaged over the bands (the
``mean`` envelope, librosa's default) and its median over the bands (the ``median`` envelope,
which :func:`librosa.beat.beat_track` uses), delayed by librosa's three frames so that value
``k`` belongs to sample ``k * 512``.

One difference, made so that the envelope can be streamed: librosa floors the dB spectrogram 80 dB
below its loudest bin over the whole sound; here the floor is 80 dB below the loudest bin so
far. It changes only the faint parts before the loudest note.

One addition: librosa has no value for the sound's very start (its first three values are 0), so a
hit at t = 0 makes no onset. Here the ``mean`` envelope's value 0 is the rise of the first STFT
frame (centred on sample 0) over silence, floored as librosa floors (80 dB below the loudest bin of
the whole sound), capped at the largest value the rest of the envelope reaches: the start of a
held chord rises from silence, far more than any later note rises from the one before, and
uncapped it would shrink every other onset when the envelope is divided by its peak. The
``median`` envelope (the beat tracker's) stays librosa's.

Value ``k`` needs only the samples before ``k * 512`` (the centred window of the later STFT frame of
the difference ends there), so a live sound gets it as soon as those samples are in: with
``n_samples=None`` the stream has no end and :meth:`OnsetStream.take` hands out the values as
they are completed.
"""
from __future__ import annotations

import librosa
import numpy as np

N_FFT = 2048
HOP = 512
N_MELS = 128
TOP_DB = 80.0
AMIN = 1e-10
# librosa's centred onset envelope lags the spectrogram difference by lag (1) + N_FFT // (2 * HOP).
DELAY = 1 + N_FFT // (2 * HOP)


class OnsetStream:
    """Feed the samples of a sound of ``n_samples`` samples at ``sr`` with :meth:`push` (any
    piece sizes; samples past ``n_samples`` must be zeros), then call :meth:`finish` once; or,
    for a sound without end (``n_samples=None``), call :meth:`take` after each push."""

    def __init__(self, n_samples: int | None, sr: int):
        # librosa's frame count for a centred STFT; unbounded for a live sound
        self.n_stft = 1 + n_samples // HOP if n_samples is not None else np.iinfo(np.int64).max
        self.window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
        self.mel = librosa.filters.mel(sr=sr, n_fft=N_FFT, n_mels=N_MELS, fmax=0.5 * sr).astype(np.float32)
        self.buffer = np.zeros(N_FFT // 2, np.float32)  # samples from padded position buffer_start on
        self.buffer_start = 0
        self.next_stft = 0
        self.previous_db = None
        self.first_db = None  # the first STFT frame's mel dB, for the onset at t = 0
        self.loudest_db = -np.inf
        self.mean_parts, self.median_parts = [], []
        self.taken = False

    def push(self, samples: np.ndarray) -> None:
        """Take the next samples and compute every STFT frame they complete."""
        self.buffer = np.concatenate([self.buffer, np.asarray(samples, np.float32)])
        available = (self.buffer_start + len(self.buffer) - N_FFT) // HOP + 1
        count = min(available, self.n_stft) - self.next_stft
        if count <= 0:
            return
        offset = self.next_stft * HOP - self.buffer_start
        windows = np.lib.stride_tricks.sliding_window_view(self.buffer[offset:], N_FFT)[::HOP][:count]
        self._differences(windows)
        self.next_stft += count
        drop = self.next_stft * HOP - self.buffer_start
        self.buffer, self.buffer_start = self.buffer[drop:], self.buffer_start + drop

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """The ``mean`` and ``median`` envelopes, float64 ``(1 + n_samples // 512,)``; value ``k``
        belongs to sample ``k * 512`` (``mean[0]``: the sound's start, see the module docstring)."""
        self.push(np.zeros(N_FFT, np.float32))
        envelopes = []
        for parts in (self.mean_parts, self.median_parts):
            differences = np.concatenate(parts) if parts else np.zeros(0)
            envelopes.append(np.concatenate([np.zeros(DELAY), differences])[: self.n_stft])
        mean = envelopes[0]
        if self.first_db is not None and len(mean):
            floor = self.loudest_db - TOP_DB
            start = float(np.mean(np.maximum(self.first_db, floor) - floor))
            mean[0] = max(mean[0], min(start, float(mean[1:].max(initial=0.0))))
        return mean, envelopes[1]

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """The ``mean`` and ``median`` values completed since the last call (float64, equal
        lengths; the first call starts with librosa's three leading zeros), value ``k`` of their
        concatenation over all calls belonging to sample ``k * 512``. That concatenation is what
        :meth:`finish` gives for those values (to float32 rounding: the STFT frames are computed in
        other batches) but for ``mean[0]``, which stays librosa's 0: :meth:`finish`'s onset at
        t = 0 is capped by the whole envelope's peak, which a stream without end never has.
        Use either this or :meth:`finish` on one stream."""
        lead = [] if self.taken else [np.zeros(DELAY)]
        self.taken = True
        mean = np.concatenate([*lead, *self.mean_parts]) if lead or self.mean_parts else np.zeros(0)
        median = np.concatenate([*lead, *self.median_parts]) if lead or self.median_parts else np.zeros(0)
        self.mean_parts, self.median_parts = [], []
        return mean, median

    def _differences(self, windows: np.ndarray) -> None:
        power = np.abs(np.fft.rfft(windows * self.window, axis=-1)) ** 2
        db = 10.0 * np.log10(np.maximum(AMIN, power.astype(np.float32) @ self.mel.T).astype(np.float64))
        loudest = np.maximum.accumulate(np.maximum(db.max(axis=1), self.loudest_db))
        self.loudest_db = loudest[-1]
        floor = (loudest - TOP_DB)[:, None]
        previous = db[:-1] if self.previous_db is None else np.vstack([self.previous_db[None], db[:-1]])
        self.previous_db = db[-1]
        if len(previous) < len(db):  # the very first STFT frame has nothing before it
            self.first_db = db[0]
            db, floor = db[1:], floor[1:]
        rise = np.maximum(0.0, np.maximum(db, floor) - np.maximum(previous, floor))
        self.mean_parts.append(rise.mean(axis=1))
        self.median_parts.append(np.median(rise, axis=1))
