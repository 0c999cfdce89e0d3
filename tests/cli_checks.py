"""Helpers for the bad-input, fault and load tests of the command lines (not a test module).

What "a clear error" means here: exit status 2, no traceback, and exactly one line on stderr
besides progress bars, starting with ``PROG: error:``.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 44100
# The demo model at its smallest: every image and frame costs a fraction of a second on a CPU.
DEMO = ["--demo", "--H", "64", "--W", "64", "--ddim_steps", "2"]
TINY = ["--config", "tests/data/tiny-v1/config.yaml", "--ckpt", "tests/data/tiny-v1/model.safetensors",
        "--H", "64", "--W", "64", "--ddim_steps", "2"]
PROGS = {"audio2img": "audio2img.py", "audio2video": "audio2video.py", "txt2img": "txt2img.py",
         "img2img": "img2img.py", "live": "live.py"}
_PROGRESS = re.compile(r"^[\w ]+: +\d+%\|")


def stderr_lines(err: str) -> list[str]:
    """The lines a terminal would show for ``err``, without tqdm's progress bars."""
    shown = (line.rsplit("\r", 1)[-1].strip() for line in err.split("\n"))
    return [line for line in shown if line and not _PROGRESS.match(line)]


def assert_one_line_error(status: int, err: str, tool: str, *words: str) -> str:
    """Exit status 2 and exactly one line on stderr, ``PROG: error: ...`` holding every one of
    ``words`` (case-insensitive). Returns the line."""
    assert "Traceback" not in err, err
    lines = stderr_lines(err)
    assert status == 2, (status, err)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"{PROGS[tool]}: error: "), line
    for word in words:
        assert word.lower() in line.lower(), (word, line)
    return line


def write_sound(path: Path, seconds: float = 1.0, sr: int = SR, kind: str = "tone",
                channels: int = 1, subtype: str = "PCM_16") -> Path:
    """A sound file: a decaying tone, noise or silence, ``seconds`` long."""
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    if kind == "tone":
        y = 0.5 * np.sin(2 * np.pi * 330 * t) * np.exp(-t % 1.0)
    elif kind == "noise":
        y = 0.3 * np.random.default_rng(len(str(path))).uniform(-1, 1, n)
    else:
        y = np.zeros(n)
    sf.write(path, np.repeat(y[:, None], channels, axis=1).astype(np.float32), sr, subtype=subtype)
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256), to prove nothing was changed or added."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def decoded_frames(path: Path) -> np.ndarray:
    """The frames of a video as decoded by ffmpeg, (N, H, W, 3) uint8."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    width, height = next(reader)["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])


def frames_done(state: Path) -> int:
    """Finished frames of a running video render, from the checkpoint in its state folder
    (``NAME.mp4.render``); 0 while there is none."""
    try:
        with np.load(state / "checkpoint.npz") as saved:
            return int(saved["__frame_index__"]) + 1
    except (OSError, ValueError, KeyError, EOFError):
        return 0


def click_track(path: Path, seconds: float = 3.0, bpm: float = 120.0) -> Path:
    """A quiet tone with a loud click on every beat, at 44.1 kHz: sharp onsets and beats."""
    t = np.arange(int(seconds * SR)) / SR
    y = 0.05 * np.sin(2 * np.pi * 220 * t)
    for start in np.arange(0.25, seconds, 60.0 / bpm):
        i = int(start * SR)
        n = min(len(y) - i, SR // 20)
        y[i:i + n] += 0.8 * np.exp(-np.arange(n) / (SR / 200)) * np.sin(2 * np.pi * 1500 * t[:n])
    sf.write(path, y.astype(np.float32), SR, subtype="FLOAT")
    return path


def stop_at_frame(next_latent, index: int):
    """``loop.next_latent`` that raises KeyboardInterrupt (as Ctrl-C would) when frame
    ``index`` is about to be sampled, so a render stops after frames 0 .. index - 1."""
    def wrapped(engine, previous, cond, frame, bends, settings):
        if frame.index == index:
            raise KeyboardInterrupt
        return next_latent(engine, previous, cond, frame, bends, settings)
    return wrapped
