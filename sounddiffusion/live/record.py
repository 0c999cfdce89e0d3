"""``--record OUT.mp4``: what the page showed, with the sound that drove it, through the file renderer's
encoder and mux (:mod:`sounddiffusion.video.ffmpeg`).

The recording's clock is the sound's: video frame ``j`` (at ``fps``) shows the picture that was on
show ``j / fps`` seconds after the first sample was captured (black before the first picture),
so a picture appears in the recording as late after its sound as it did on the page. Pictures
made faster than ``fps`` are shown for their share of a frame only (the later one wins). Frames
are written only as far as the sound has come: a picture ready after the sound so far waits for
it, and one ready after the sound's end is not in the recording, so the video is as long as the
sound. The sound is written as it comes (a WAV beside the encoder's segment) and muxed in at the end, cut to
the video's length. The MP4 appears only when complete, under a new name if ``OUT.mp4`` exists.
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections import deque
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile

from sounddiffusion.files import ensure_output_dir, publish_file, unique_output_path
from sounddiffusion.settings import DEFAULT_CRF
from sounddiffusion.sound.audio import SAMPLE_RATE, fps_fraction
from sounddiffusion.video.ffmpeg import SegmentEncoder, mux_segments

log = logging.getLogger(__name__)


class LiveRecorder:
    """Records into ``path`` at ``fps`` frames per second, pictures (height, width, 3) uint8."""

    def __init__(self, path: str | Path, fps: float | Fraction, width: int, height: int, *, crf: int = DEFAULT_CRF):
        self.path = Path(path)
        self.fps = fps_fraction(fps)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.live-", dir=ensure_output_dir(self.path.parent)))
        self.sound_path = self.folder / "sound.wav"
        self.sound = soundfile.SoundFile(self.sound_path, "w", SAMPLE_RATE, 1, "FLOAT")
        self.encoder = SegmentEncoder(self.folder, 0, self.fps, width, height, crf=crf)
        self.showing = np.zeros((height, width, 3), np.uint8)
        self.waiting: deque[tuple[int, np.ndarray]] = deque()  # (first video frame, picture) not on show yet
        self.frames = 0  # video frames written
        self.samples = 0
        self.start: float | None = None  # time.monotonic() of the first sample

    def add_sound(self, samples: np.ndarray, captured: float) -> None:
        """The next ``samples`` (mono float32), the last captured at ``captured`` (``time.monotonic()``)."""
        if self.start is None:
            self.start = captured - len(samples) / SAMPLE_RATE
        self.sound.write(samples)
        self.samples += len(samples)

    def show(self, rgb: np.ndarray, at: float) -> None:
        """``rgb`` is on show from ``at`` (``time.monotonic()``) on: from video frame
        ``first = ceil((at - start) fps)``. The frames before ``first`` that the sound has reached
        are written (those after wait: a later picture may be ready before their time)."""
        if self.start is None:
            self.showing = rgb
            return
        first = math.ceil((at - self.start) * self.fps)
        self.waiting.append((first, rgb))
        self._fill(min(first, self._sound_frames()))

    def _sound_frames(self) -> int:
        """Video frames that the sound so far reaches into: ``ceil(samples fps / SAMPLE_RATE)``."""
        return math.ceil(self.samples * self.fps / SAMPLE_RATE)

    def _fill(self, frames: int) -> None:
        """Write frames until the video holds ``frames``, each with the picture on show at its time."""
        while self.frames < frames:
            while self.waiting and self.waiting[0][0] <= self.frames:
                self.showing = self.waiting.popleft()[1]
            self.encoder.write(self.showing)
            self.frames += 1

    def finish(self) -> Path | None:
        """Write the MP4 (video as long as the sound) and return its path; None without sound."""
        try:
            self._fill(self._sound_frames())
            self.sound.close()
            if not self.frames:
                self.encoder.abort()
                log.warning("--record %s: no sound came in, nothing recorded", self.path)
                return None
            segment = self.encoder.finish(self.folder / "video.mp4")
            temp = mux_segments([segment], self.folder, self.fps, self.frames, self.sound_path, output_path=self.path)
            final = publish_file(temp, unique_output_path(self.path))
        finally:
            self.abort()
        log.debug("recorded %s (%d frames, %.1f s)", final, self.frames, self.frames / self.fps)
        return final

    def abort(self) -> None:
        """Stop without a recording; the temporary files go."""
        if not self.sound.closed:
            self.sound.close()
        if self.encoder.process.poll() is None:
            self.encoder.abort()
        shutil.rmtree(self.folder, ignore_errors=True)
