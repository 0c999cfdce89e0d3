"""Decoding and writing a render's frames in a worker thread while the next one samples.

The loop hands :meth:`FrameWriter.submit` a frame's picture — a latent (1, 4, h, w) to decode, or
a :class:`PixelBlend` of two latents for ``--cadence_blend pixel`` in-betweens — and the state
needed to resume after it (:class:`ChainState`). The worker decodes, writes the frame (and its PNG
with ``--save_frames``), records the resume state and, every ``preview_frames`` frames, writes a
preview. Errors in the worker are raised again in the caller at the next ``submit`` or at ``close``.
A latent that is not finite (inf or NaN, which would decode to a black picture) stops the render
with the error ``nonfinite_error(index)`` gives; the check is made here, where the picture is read
back to the host anyway, so the sampling thread never waits for it.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sounddiffusion.errors import ParameterError
from sounddiffusion.images import save_png
from sounddiffusion.model.engine import Engine
from sounddiffusion.video.cadence import cross_fade
from sounddiffusion.video.camera import CameraMove
from sounddiffusion.video.frame_chain import ChainState
from sounddiffusion.video.render import VideoRender


@dataclass(frozen=True)
class PixelBlend:
    """An in-between frame made by cross-fading the pictures of two latents: ``t`` of the way
    from ``first`` (frame ``first_index``) to ``second`` (frame ``second_index``), each picture
    moved to the in-between's camera first by ``first_move``/``second_move`` (None: not moved)."""

    first_index: int
    first: torch.Tensor
    second_index: int
    second: torch.Tensor
    t: float
    first_move: CameraMove | None = None
    second_move: CameraMove | None = None


class FrameWriter:
    """See the module docstring. ``frames_dir``: where ``--save_frames`` PNGs go (None: nowhere);
    ``frame_parameters``: the render's settings, stored in each saved PNG with the frame's number
    and time (``fps`` frames per second); ``nonfinite_error(index)``: the exception raised when
    frame ``index``'s latent is not finite (default: a ParameterError naming the frame)."""

    def __init__(self, engine: Engine, render: VideoRender, *, frames_dir: Path | None,
                 preview_frames: int, audio_path: str, frame_parameters: dict | None = None,
                 fps: float = 1.0, nonfinite_error: Callable[[int], BaseException] | None = None):
        self.nonfinite_error = nonfinite_error or (lambda index: ParameterError(
            f"frame {index}: the latent is infinite or NaN, which decodes to a black picture"))
        self.engine, self.render, self.frames_dir = engine, render, frames_dir
        self.preview_frames, self.audio_path = preview_frames, audio_path
        self.frame_parameters, self.fps = frame_parameters or {}, fps
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._decoded: dict[int, np.ndarray] = {}  # pictures of blend ends, by frame
        self._thread = threading.Thread(target=self._work, name="frame-writer", daemon=True)
        self._thread.start()

    def _decode(self, index: int, latent: torch.Tensor) -> np.ndarray:
        if not bool(torch.isfinite(latent).all()):
            raise self.nonfinite_error(index)
        return self.engine.decode(latent)[0]

    def _picture(self, index: int, picture: torch.Tensor | PixelBlend) -> np.ndarray:
        if not isinstance(picture, PixelBlend):
            return self._decode(index, picture)
        ends = []
        for index, latent, move in ((picture.first_index, picture.first, picture.first_move),
                                    (picture.second_index, picture.second, picture.second_move)):
            if index not in self._decoded:
                self._decoded = {k: v for k, v in self._decoded.items() if k >= picture.first_index}
                self._decoded[index] = self._decode(index, latent)
            end = self._decoded[index]
            ends.append(end if move is None else move.warp_pictures(end[None], self.engine.device)[0])
        return cross_fade(ends[0], ends[1], picture.t)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            index, picture, chain = item
            try:
                rgb = self._picture(index, picture)
                frame_png = self.frames_dir / f"frame-{index:06d}.png" if self.frames_dir else None
                # A resumed render may redo a frame whose PNG was saved: it is the same picture.
                if frame_png is not None and not frame_png.exists():
                    save_png(rgb, frame_png,
                             {**self.frame_parameters, "frame": index, "time": round(index / self.fps, 6)})
                arrays, extra = chain.resume_data()
                # Only the folder's name: it lies beside the video, wherever the state says.
                self.render.add_frame(rgb, arrays, {**extra, "frame": index,
                                                    "frames_dir": self.frames_dir.name if self.frames_dir else None})
                if self.preview_frames and (index + 1) % self.preview_frames == 0:
                    self.render.write_preview(self.audio_path)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self._error = exc

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, index: int, picture: torch.Tensor | PixelBlend, chain: ChainState) -> None:
        """Queue frame ``index``; ``chain``: the state to resume from once it is written."""
        self._raise_pending()
        self._queue.put((index, picture, chain))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_pending()
