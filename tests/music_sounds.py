"""Synthesized sounds for the music-analysis tests (not a test module): hits whose onsets are known
to the sample, held pads and drones with no pulse, and a sound of three different parts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf

SR = 44100


def hits(positions, n_samples: int, *, hz: float = 1500.0, level: float = 0.8, sr: int = SR) -> np.ndarray:
    """Silence with a short decaying tone burst (50 ms) starting exactly at each sample of ``positions``."""
    y = np.zeros(n_samples, np.float32)
    burst = level * np.exp(-np.arange(sr // 20) / (sr / 200)) * np.sin(2 * np.pi * hz * np.arange(sr // 20) / sr)
    for p in positions:
        n = min(len(burst), n_samples - p)
        y[p:p + n] += burst[:n].astype(np.float32)
    return y


def saw(hz: float, t: np.ndarray, harmonics: int = 12) -> np.ndarray:
    return sum(np.sin(2 * np.pi * hz * k * t) / k for k in range(1, harmonics + 1))


def detuned_pad(seconds: float = 6.0, sr: int = SR) -> np.ndarray:
    """A held A minor chord of detuned sawtooth voices (±7 cents: slow beating), 0.8 s attack."""
    t = np.arange(int(seconds * sr)) / sr
    y = sum(saw(hz * 2 ** (cents / 1200), t) for hz in (220.0, 261.63, 329.63) for cents in (-7, 0, 7))
    return (0.04 * y * np.minimum(1.0, t / 0.8)).astype(np.float32)


def tremolo_pad(seconds: float = 6.0, rate: float = 172 / 60, sr: int = SR) -> np.ndarray:
    """A held two-note sawtooth pad whose level swings by 30 % at ``rate`` Hz (172 bpm by default)."""
    t = np.arange(int(seconds * sr)) / sr
    y = (saw(196.0, t) + saw(246.94, t)) * (1 - 0.3 * (0.5 + 0.5 * np.sin(2 * np.pi * rate * t)))
    return (0.12 * y * np.minimum(1.0, t / 0.5)).astype(np.float32)


def noise_drone(seconds: float = 6.0, sr: int = SR) -> np.ndarray:
    """Band-passed (200-2000 Hz) noise, steady."""
    noise = np.random.default_rng(0).standard_normal(int(seconds * sr))
    b, a = scipy.signal.butter(2, [200 / (sr / 2), 2000 / (sr / 2)], "band")
    y = scipy.signal.lfilter(b, a, noise)
    return (0.3 * y / np.abs(y).max()).astype(np.float32)


def held_sine(seconds: float = 6.0, sr: int = SR) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * 110.0 * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


HELD = {"detuned pad": detuned_pad, "tremolo pad (172 bpm)": tremolo_pad, "noise drone": noise_drone,
        "held sine": held_sine}


def click_train(bpm: float, first: float, seconds: float, sr: int = SR) -> tuple[np.ndarray, np.ndarray]:
    """(samples, click positions): a click every beat of ``bpm`` from ``first`` seconds, over a quiet tone."""
    n = int(seconds * sr)
    positions = np.round(np.arange(first, seconds - 0.05, 60.0 / bpm) * sr).astype(int)
    y = hits(positions, n) + (0.05 * np.sin(2 * np.pi * 220 * np.arange(n) / sr)).astype(np.float32)
    return y, positions


def three_parts(part_seconds: float = 3.0, sr: int = SR) -> np.ndarray:
    """Noise hits every 0.25 s, then a held C major chord, then a high whistle with vibrato."""
    n = int(part_seconds * sr)
    t = np.arange(n) / sr
    rng = np.random.default_rng(1)
    drums = np.zeros(n)
    for start in np.arange(0, part_seconds, 0.25):
        i, m = int(start * sr), sr // 10
        drums[i:i + m] += rng.uniform(-1, 1, m)[: n - i] * np.exp(-np.arange(m) / (sr / 60))[: n - i] * 0.6
    chord = sum(0.15 * np.sin(2 * np.pi * hz * t) for hz in (261.63, 329.63, 392.0))
    whistle = 0.4 * np.sin(2 * np.pi * (880 + 200 * np.sin(2 * np.pi * 1.5 * t)) * t)
    return np.concatenate([drums, chord, whistle]).astype(np.float32)


def write(path: Path, y: np.ndarray, sr: int = SR) -> Path:
    sf.write(path, y, sr, subtype="FLOAT")
    return path
