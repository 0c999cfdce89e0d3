"""Audio features as (77, D) matrices, the shape of a CLIP text conditioning (numpy + librosa, no torch).

Each feature turns mono samples ``y`` (float32, 44.1 kHz unless told otherwise) into a raw
float32 matrix of shape ``(77, dim)``: 77 rows in time order (CLIP's 77 token positions), ``dim``
columns (the model's context width, 768 for SD v1). Values are raw, before
:mod:`sounddiffusion.model.conditioning` brings them into the range of text conditionings.

``waveform`` and ``fft`` are exactly the original Sound-Diffusion definitions (checked against
``../shared/reference/features.safetensors``); ``melspectrogram`` and ``mfcc`` are defined here.

Time frames: the spectral features use ``hop_length = len(y) // 77 + 1`` with librosa's centred
frames, which gives ``1 + len(y) // hop_length`` frames. That is 77 for slices of about 6000
samples or more; shorter slices (a 441-sample slice gives 74, a 1-sample slice 2) are padded with
zero rows at the end up to 77, so every feature always has 77 rows.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import librosa
import numpy as np

from sounddiffusion.errors import ParameterError
from sounddiffusion.sound.audio import SAMPLE_RATE

ROWS = 77
"""Rows of every feature matrix: the number of token positions of a CLIP text conditioning."""

FEATURES = ("waveform", "fft", "melspectrogram", "mfcc")
"""The feature names :func:`featurize` accepts."""

_TOP_DB = 80.0  # dynamic range of the dB features, librosa's and upstream's default
_AMIN = 1e-10  # power floor of librosa.power_to_db; a mel power peak below it counts as silence
_MIN_MEL_N_FFT = 2048  # librosa's default window: never use a shorter one for mel features


def waveform_features(y: np.ndarray, *, dim: int) -> np.ndarray:
    """The first ``77 * dim`` samples of ``y``, zero-padded if shorter, as ``(77, dim)`` row-major.

    Row 0 holds samples ``0 .. dim - 1``, row 1 the next ``dim``, and so on; units are sample values.
    """
    y = _as_samples(y, dim)
    out = np.zeros(ROWS * dim, dtype=np.float32)
    n = min(len(y), out.size)
    out[:n] = y[:n]
    return out.reshape(ROWS, dim)


def fft_features(y: np.ndarray, *, dim: int) -> np.ndarray:
    """STFT magnitudes ``(77, dim)``: rows are time frames, columns the ``dim`` frequency bins 0 .. sr/2.

    ``abs(librosa.stft(y, n_fft=2 * dim - 2, hop_length=len(y) // 77 + 1)).T`` (Hann window,
    centred frames, zero padding at the edges), zero rows appended when fewer than 77 frames.
    Units are linear spectral magnitude. Needs ``dim >= 2`` (``n_fft = 2 * dim - 2``).
    """
    y = _as_samples(y, dim)
    if dim < 2:
        raise ParameterError(f"fft features need dim >= 2 (n_fft = 2 * dim - 2), got dim={dim}")
    return _fit_rows(_stft_magnitude(y, n_fft=2 * dim - 2, hop_length=_hop_length(len(y))).T)


def melspectrogram_features(y: np.ndarray, *, dim: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Mel spectrogram ``(77, dim)`` scaled into [0, 1]: rows are time frames, columns ``dim`` mel bands.

    Parameters: ``n_mels = dim`` bands (Slaney mel scale and area normalisation, librosa's
    defaults) from 0 Hz to ``sr / 2`` (the whole band, so cymbals and hats count as much as
    bass); power spectrum with ``hop_length = len(y) // 77 + 1`` and ``n_fft`` the smallest
    power of two, at least 2048, whose bin spacing is no wider than the narrowest mel band
    spacing (16384 at 44.1 kHz for 768 bands): every mel filter then covers at least two FFT bins,
    none is empty. Values are ``power_to_db(S, ref=max(S), top_db=80)`` mapped by
    ``(dB + 80) / 80`` and clipped to [0, 1], as upstream: 1 is the loudest band of the slice,
    0 is 80 dB below it or quieter. Silence (peak power below 1e-10) gives zeros.
    """
    y = _as_samples(y, dim)
    power = _mel_power(y, dim, sr)
    peak = float(power.max())
    if peak <= _AMIN:
        return np.zeros((ROWS, dim), dtype=np.float32)
    db = librosa.power_to_db(power, ref=peak, amin=_AMIN, top_db=_TOP_DB)
    return _fit_rows(np.clip((db + _TOP_DB) / _TOP_DB, 0.0, 1.0).T)


def mfcc_features(y: np.ndarray, *, dim: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Mel-frequency cepstral coefficients ``(77, dim)``: rows are time frames, columns coefficients 0 .. dim - 1.

    The DCT-II (orthonormal) of the log mel spectrogram ``power_to_db(S, ref=1, top_db=80)``
    with the same ``dim`` mel bands, ``n_fft`` and hop as :func:`melspectrogram_features`, so
    all ``dim`` coefficients are kept (``n_mfcc = n_mels = dim``); this is
    ``librosa.feature.mfcc(S=..., n_mfcc=dim)``. Units: dB-scaled cepstral coefficients.
    Silence gives -100 dB in every band, a finite constant spectrum.
    """
    y = _as_samples(y, dim)
    db = librosa.power_to_db(_mel_power(y, dim, sr), ref=1.0, amin=_AMIN, top_db=_TOP_DB)
    return _fit_rows(librosa.feature.mfcc(S=db, n_mfcc=dim).T)


_FEATURE_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "waveform": waveform_features,
    "fft": fft_features,
    "melspectrogram": melspectrogram_features,
    "mfcc": mfcc_features,
}


def featurize(y: np.ndarray, feature: str, dim: int = 768) -> np.ndarray:
    """Raw features ``(77, dim)`` float32 of the mono 44.1 kHz samples ``y`` ``(n_samples,)``.

    ``feature`` is one of :data:`FEATURES`; raises :class:`ParameterError` for another name, for
    ``dim < 1``, or for samples that are empty, not 1-D or not finite.
    """
    function = _FEATURE_FUNCTIONS.get(feature)
    if function is None:
        raise ParameterError(f"unknown feature {feature!r}: use one of {', '.join(FEATURES)}")
    return np.ascontiguousarray(function(y, dim=dim), dtype=np.float32)


def _as_samples(y: np.ndarray, dim: int) -> np.ndarray:
    """``y`` as float32 ``(n_samples,)`` after checking it and ``dim``."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ParameterError(f"feature width dim={dim!r}: use a whole number >= 1")
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 1 or y.size == 0:
        raise ParameterError(f"features need mono samples of shape (n_samples,) with n_samples >= 1, got {y.shape}")
    if not np.isfinite(y).all():
        raise ParameterError("audio samples contain NaN or inf: load sound with sounddiffusion.sound.audio.load_audio")
    return y


def _hop_length(n_samples: int) -> int:
    """The original hop: at most 77 centred frames cover ``n_samples``."""
    return n_samples // ROWS + 1


def _fit_rows(frames: np.ndarray) -> np.ndarray:
    """``frames`` ``(n_frames <= 77, dim)`` with zero rows appended up to ``(77, dim)``, float32."""
    frames = frames.astype(np.float32, copy=False)
    if len(frames) < ROWS:
        frames = np.pad(frames, ((0, ROWS - len(frames)), (0, 0)))
    return frames


def _stft_magnitude(y: np.ndarray, *, n_fft: int, hop_length: int) -> np.ndarray:
    """``abs(librosa.stft(y, n_fft, hop_length))`` ``(n_fft // 2 + 1, n_frames)``, linear magnitude."""
    with warnings.catch_warnings():
        # Slices shorter than the window are expected (a 1/24 s slice is 1837 samples, the mel
        # window 16384): centring zero-pads them, which is what the features define.
        warnings.filterwarnings("ignore", message=r"n_fft=\d+ is too large for input signal", category=UserWarning)
        return np.abs(librosa.stft(y, n_fft=n_fft, hop_length=hop_length))


def _mel_power(y: np.ndarray, dim: int, sr: int) -> np.ndarray:
    """Mel power spectrogram ``(dim, n_frames)`` of ``y`` with the parameters of :func:`melspectrogram_features`."""
    n_fft, filterbank = _mel_filterbank(dim, sr)
    return filterbank @ np.square(_stft_magnitude(y, n_fft=n_fft, hop_length=_hop_length(len(y))))


@functools.lru_cache(maxsize=8)
def _mel_filterbank(n_mels: int, sr: int) -> tuple[int, np.ndarray]:
    """``n_fft`` and the read-only mel filterbank ``(n_mels, n_fft // 2 + 1)`` for ``n_mels`` bands over 0 .. sr/2.

    Cached: a video featurizes every frame with the same filterbank, and building a 768-band one
    costs more than the rest of the feature."""
    edges = librosa.mel_frequencies(n_mels + 2, fmin=0.0, fmax=sr / 2)
    narrowest = float(np.diff(edges).min())
    n_fft = max(_MIN_MEL_N_FFT, 2 ** math.ceil(math.log2(sr / narrowest)))
    filterbank = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=sr / 2)
    filterbank.flags.writeable = False
    return n_fft, filterbank
