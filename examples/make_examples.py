"""Synthesize the example sounds in examples/audio/ with numpy (deterministic: same bytes every run).

    python examples/make_examples.py [--outdir examples/audio]

Five mono 16-bit WAV files at 22.05 kHz, 3-4 s each (about 0.8 MB together):
a struck bell, a I-V-vi-IV chord progression, a drum pattern, a logarithmic sine sweep, and the
drums and chords played together (a mix whose stems are those two files).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile

RATE = 22050
"""Sample rate of the examples: half of 44.1 kHz keeps them small and loads without surprises."""

PEAK = 0.8
"""Every example is scaled to this peak level (full scale is 1.0)."""

SEED = 2022
"""Seed of the noise in the drum sounds."""

log = logging.getLogger("make_examples")


def _time(seconds: float) -> np.ndarray:
    """Sample times ``(n,)`` in seconds for ``seconds`` of sound at :data:`RATE`."""
    return np.arange(round(seconds * RATE)) / RATE


def _fade(y: np.ndarray, seconds: float = 0.01) -> np.ndarray:
    """``y`` with linear fades of ``seconds`` at both ends, so no file starts or stops with a click."""
    n = round(seconds * RATE)
    ramp = np.linspace(0.0, 1.0, n)
    y = y.copy()
    y[:n] *= ramp
    y[-n:] *= ramp[::-1]
    return y


def bell() -> np.ndarray:
    """A church-bell strike, 3.5 s: inharmonic partials (hum, prime, minor third, fifth, nominal ...)
    on 220 Hz, each decaying exponentially, the higher ones faster."""
    t = _time(3.5)
    ratios = (0.5, 1.0, 1.19, 1.51, 2.0, 2.51, 2.66, 3.01, 4.16)
    levels = (0.5, 0.7, 0.6, 0.3, 0.8, 0.25, 0.3, 0.2, 0.15)
    y = np.zeros_like(t)
    for ratio, level in zip(ratios, levels):
        decay_seconds = 2.5 / ratio
        y += level * np.exp(-t / decay_seconds) * np.sin(2 * np.pi * 220.0 * ratio * t)
    return y


def chords() -> np.ndarray:
    """C major I-V-vi-IV (C, G, Am, F), 1 s per chord: three voices of a soft sawtooth-like tone
    (six harmonics falling off as 1/k^2) with 50 ms attack and a gentle release."""
    chord_notes = ((60, 64, 67), (59, 62, 67), (57, 60, 64), (57, 60, 65))  # MIDI notes, close voicing
    t = _time(1.0)
    envelope = np.minimum(t / 0.05, 1.0) * np.exp(-1.5 * t) * np.minimum((1.0 - t) / 0.1, 1.0)
    bars = []
    for notes in chord_notes:
        bar = np.zeros_like(t)
        for note in notes:
            frequency = 440.0 * 2 ** ((note - 69) / 12)
            bar += sum(np.sin(2 * np.pi * k * frequency * t) / k**2 for k in range(1, 7))
        bars.append(bar * envelope)
    return np.concatenate(bars)


def drums() -> np.ndarray:
    """Two bars of a rock beat at 120 bpm, 4 s: kick on 1 and 3, snare on 2 and 4, closed hi-hat on
    every eighth note. Kick: sine gliding 150 -> 50 Hz; snare: 180 Hz tone plus noise; hat: the
    difference of white noise (a crude high-pass), all with exponential decays."""
    rng = np.random.default_rng(SEED)
    t = _time(0.4)
    kick = np.sin(2 * np.pi * (50.0 * t + 100.0 * 0.04 * (1 - np.exp(-t / 0.04)))) * np.exp(-t / 0.12)
    snare = (0.4 * np.sin(2 * np.pi * 180.0 * t) + 0.8 * rng.standard_normal(t.size)) * np.exp(-t / 0.06)
    hat = 0.3 * np.diff(rng.standard_normal(t.size + 1)) * np.exp(-t / 0.015)
    eighth = RATE // 4  # samples per eighth note at 120 bpm
    y = np.zeros(16 * eighth + t.size)
    for step in range(16):
        hits = [hat]
        if step % 4 == 0:
            hits.append(kick)
        if step % 4 == 2:
            hits.append(snare)
        for hit in hits:
            y[step * eighth:step * eighth + t.size] += hit
    return y[:16 * eighth]


def sweep() -> np.ndarray:
    """A logarithmic sine sweep from 50 Hz to 10 kHz over 3 s (the same time per octave)."""
    t = _time(3.0)
    f0, f1, duration = 50.0, 10000.0, 3.0
    rate = np.log(f1 / f0) / duration
    return np.sin(2 * np.pi * f0 * (np.exp(rate * t) - 1) / rate)


def band() -> np.ndarray:
    """The finished drums and chords examples played together, 4 s: a mix whose stems are
    ``drums.wav`` and ``chords.wav`` (for ``audio2video.py --control``)."""
    drums_part, chords_part = example_samples("drums"), example_samples("chords")
    return chords_part + np.pad(drums_part, (0, len(chords_part) - len(drums_part)))  # drums end 8 samples early


SOUNDS: dict[str, Callable[[], np.ndarray]] = {
    "bell": bell,
    "chords": chords,
    "drums": drums,
    "sweep": sweep,
    "band": band,
}
"""Example name -> function making its samples ``(n,)`` at :data:`RATE` (any level)."""


def example_samples(name: str) -> np.ndarray:
    """The finished samples ``(n,)`` float64 of example ``name``: faded in/out and scaled to :data:`PEAK`."""
    y = _fade(SOUNDS[name]())
    return PEAK * y / np.abs(y).max()


def write_examples(outdir: Path) -> list[Path]:
    """Write every example as ``outdir/NAME.wav`` (mono, 16-bit PCM, :data:`RATE`); returns the paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SOUNDS:
        path = outdir / f"{name}.wav"
        soundfile.write(path, example_samples(name), RATE, subtype="PCM_16", format="WAV")
        log.info("wrote %s", path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", type=Path, default=Path(__file__).resolve().parent / "audio",
                        help="folder to write the WAV files into (default: examples/audio next to this script)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_examples(args.outdir)


if __name__ == "__main__":
    main()
