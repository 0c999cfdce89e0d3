"""Music videos: frames piped into ffmpeg, in-progress previews, resumable renders, the final mux.

A render of ``song.mp4`` keeps everything it needs to continue in the state folder
``song.mp4.render/`` beside it (see :mod:`sounddiffusion.video.render_state`): the settings it started
with, finished H.264 segments, lossless PNGs of the frames of the unfinished segment and the
caller's checkpoint for the last finished frame, under a lock while a process renders into it.

Every file there is written under a temporary name and renamed when complete, and a frame
counts as finished once its PNG and its checkpoint are on disk. So a kill at any moment
(Ctrl-C, SIGTERM, SIGKILL, power cut) loses no finished frame: ``VideoRender.open(...,
resume=True)`` re-feeds the PNGs of the unfinished segment into a new encoder and the caller
continues from :meth:`VideoRender.load_checkpoint`. Frames are encoded by a child ffmpeg process
(:mod:`sounddiffusion.video.ffmpeg`) while the caller computes the next one.

Segments start at fixed frame numbers, multiples of ``segment_frames`` (4 s of video by default,
kept in the state folder), whatever the previews and interruptions: a resumed render encodes
the interrupted segment again from its first frame, so it gives the same MP4, byte for byte, as
an uninterrupted one (with the same ffmpeg on the same machine). A preview encodes the frames of
the unfinished segment into a file of its own, used for that preview only.
:meth:`VideoRender.finish` joins the segments without re-encoding, adds the sound as AAC, gives
the MP4 its final name only when it is complete and removes the state folder.

Video: H.264 (libx264, CRF 18 or the ``crf`` chosen, preset medium, no B-frames), yuv420p,
BT.709 limited range, in MP4. Sound: AAC 192 kb/s. The video lasts ``frames / fps`` seconds and the sound is cut to
that length, so a caller that renders ``ceil(sound duration * fps)`` frames gets a video as
long as the sound within one frame.
"""
from __future__ import annotations

import json
import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Mapping

import numpy as np

from sounddiffusion.errors import OutputError, ParameterError
from sounddiffusion.files import ensure_output_dir, publish_file, unique_output_path
from sounddiffusion.logs import counted
from sounddiffusion.settings import DEFAULT_CRF
from sounddiffusion.sound.audio import fps_fraction
from sounddiffusion.video.ffmpeg import SegmentEncoder, mux_segments
from sounddiffusion.video.render_state import Checkpoint, RESUME_HINT, RenderState, STATE_FORMAT

log = logging.getLogger(__name__)

PREVIEW_SUFFIX = ".preview"
DEFAULT_SEGMENT_SECONDS = 4.0


class VideoRender:
    """A resumable render of RGB frames into an MP4 with sound; see the module docstring.

    Make one with :meth:`open`; use it as a context manager (or call :meth:`close`) so that an
    error or Ctrl-C stops the encoder and keeps the state for ``--resume``::

        with VideoRender.open("out/song.mp4", fps, 512, 512, settings, resume) as render:
            start = render.frames_done          # 0, or where the last run stopped
            ...                                 # continue from render.load_checkpoint()
            render.add_frame(rgb, {"latent": z}, {"seed": seed})
            render.write_preview("song.wav")    # every --preview_every seconds of video
            path = render.finish("song.wav")
    """

    def __init__(self, output_path: Path, fps: Fraction, width: int, height: int,
                 segment_frames: int, crf: int = DEFAULT_CRF):
        """Internal: use :meth:`open`."""
        self.output_path = output_path
        self.crf = crf
        self.fps = fps
        self.width = width
        self.height = height
        self.segment_frames = segment_frames
        self._state = RenderState(output_path)
        self.state_dir = self._state.folder
        self.preview_path = output_path.with_name(
            f"{output_path.stem}{PREVIEW_SUFFIX}{output_path.suffix}")
        self._frames_done = 0
        # Frames [0, _encoded) are in finished segments, [_encoded, _frames_done) in PNGs.
        self._encoded = 0
        self._segments: list[Path] = []
        self._encoder: SegmentEncoder | None = None

    @classmethod
    def open(cls, output_path: str | os.PathLike, fps: float | Fraction, width: int,
             height: int, settings: Mapping, resume: bool = False,
             segment_frames: int | None = None, crf: int = DEFAULT_CRF) -> VideoRender:
        """Start a render of ``output_path`` or, with ``resume=True``, continue an unfinished one.

        ``fps``: frames per second, a float (7.5, 29.97: read by
        :func:`sounddiffusion.sound.audio.fps_fraction`, as the audio slices are) or a Fraction
        (30000/1001). ``width``, ``height``: frame size in pixels, both even.
        ``settings``: a JSON object of every setting that changes the frames (prompt, seed,
        strength, checkpoint hash, ...), but not those that don't (preview interval, paths);
        a resume with other settings, fps or size is refused with :class:`ParameterError`.
        ``segment_frames``: frames per encoded segment, by default ``DEFAULT_SEGMENT_SECONDS`` of
        video; segment k holds frames [k * segment_frames, (k + 1) * segment_frames). It is
        stored with the state, and a resume keeps the stored value whatever is passed.
        ``crf``: the H.264 quality (0 best .. 51 worst); segments of one video must share it, so
        put it in ``settings`` too for the resume check.

        The final file is named at :meth:`finish` by :func:`unique_output_path`, so an existing
        ``output_path`` is never overwritten; the state folder and preview are named after
        ``output_path``. Raises :class:`OutputError` when a fresh render finds an unfinished
        one (its state folder) or a resume finds none, or when the folder cannot be written.
        """
        output_path = Path(output_path)
        fps = fps_fraction(fps)
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ParameterError(f"video frames must have an even width and height, "
                                 f"got {width}x{height}: use multiples of 64")
        if segment_frames is None:
            segment_frames = max(1, round(fps * Fraction(str(DEFAULT_SEGMENT_SECONDS))))
        if segment_frames < 1:
            raise ValueError(f"segment_frames must be at least 1, got {segment_frames}")
        ensure_output_dir(output_path.parent)
        render = cls(output_path, fps, width, height, segment_frames, crf)
        record = {**_state_record(fps, width, height, settings), "segment_frames": segment_frames}
        try:
            if resume:
                stored = render._state.check_resumable(record)
                if isinstance(stored.get("segment_frames"), int) and stored["segment_frames"] >= 1:
                    render.segment_frames = stored["segment_frames"]
                render._frames_done, render._encoded, render._segments = render._state.recover()
            else:
                render._state.create(record)
        except BaseException:
            render.close()
            raise
        return render

    @staticmethod
    def check(output_path: str | os.PathLike, fps: float | Fraction, width: int, height: int,
              settings: Mapping, resume: bool = False) -> None:
        """Refuse now, changing nothing, what :meth:`open` with these arguments would refuse about
        the state folder (an unfinished render where a fresh one starts, no render or one with
        other settings to resume, one another process renders): a check before the model loads."""
        record = _state_record(fps_fraction(fps), width, height, settings)
        RenderState(Path(output_path)).check_startable(record, resume)

    @property
    def frames_done(self) -> int:
        """How many frames are finished (the index of the next frame to add)."""
        return self._frames_done

    def load_checkpoint(self) -> Checkpoint | None:
        """The resume data saved with the last finished frame, or None before the first frame."""
        return self._state.load_checkpoint()

    def add_frame(self, rgb: np.ndarray, arrays: Mapping[str, np.ndarray] | None = None,
                  extra: Mapping | None = None) -> None:
        """Append frame number :attr:`frames_done` and the resume data to continue after it.

        ``rgb``: (height, width, 3) uint8. ``arrays``: numpy arrays by name (names must not
        start with ``__``); ``extra``: a JSON object; both come back from
        :meth:`load_checkpoint`. When this returns the frame is safe on disk. Raises
        :class:`OutputError` when the disk is full or ffmpeg fails; the frame is then not
        counted, and it can be added again or the render resumed later.
        """
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"expected a ({self.height}, {self.width}, 3) uint8 frame, "
                             f"got {rgb.shape} {rgb.dtype}")
        index = self._frames_done
        self._state.save_frame(index, rgb)
        try:
            self._current_encoder().write(rgb)
            self._state.save_checkpoint(index, arrays or {}, extra or {})
        except BaseException:
            # The encoder may hold this unfinished frame; the next one starts again from PNGs.
            self.close()
            raise
        self._frames_done = index + 1
        if self._frames_done % self.segment_frames == 0:
            self._close_segment()

    def write_preview(self, audio_path: str | os.PathLike | None, *,
                      metadata: Mapping[str, str] | None = None) -> Path | None:
        """Replace the preview MP4 (``STEM.preview.mp4``) with the frames finished so far.

        The preview has the matching stretch of the sound at ``audio_path`` (None: silent).
        The finished segments are copied; the frames of the unfinished one are encoded from
        their PNGs into a segment for this preview only, so the segments of the video still
        start at their fixed frames. Returns the preview's path, or None while no frame is
        finished. ``metadata``: MP4 tags, as for :meth:`finish`.
        """
        if self._frames_done == 0:
            return None
        part = self._state.preview_part_path()
        segments = list(self._segments)
        try:
            if self._frames_done > self._encoded:
                part.unlink(missing_ok=True)
                segments.append(self._new_encoder().finish(part))
            temp = self._mux(segments, audio_path, metadata)
        finally:
            part.unlink(missing_ok=True)
        return publish_file(temp, self.preview_path, overwrite=True, retry=RESUME_HINT)

    def finish(self, audio_path: str | os.PathLike | None, *,
               metadata: Mapping[str, str] | None = None) -> Path:
        """Write the complete video with the sound at ``audio_path`` (None: silent).

        The MP4 appears under :func:`unique_output_path` of the requested name only when
        complete; then the preview and the state folder are removed. Returns the final path.
        ``metadata``: MP4 container tags by name (e.g. ``{"comment": json_text}``); None
        writes only ffmpeg's own.
        """
        if self._frames_done == 0:
            raise OutputError(f"no frames were rendered for {self.output_path}: nothing to write")
        self._close_segment()
        temp = self._mux(self._segments, audio_path, metadata)
        final = publish_file(temp, unique_output_path(self.output_path), retry=RESUME_HINT)
        self.preview_path.unlink(missing_ok=True)
        self.close()  # Windows deletes no file that is open
        self._state.remove()
        log.info("wrote %s (%s)", final, counted(self._frames_done, "frame"))
        return final

    def close(self) -> None:
        """Stop the encoder of the unfinished segment and let go of the state folder; the
        state stays for ``--resume``."""
        if self._encoder is not None:
            self._encoder.abort()
            self._encoder = None
        self._state.release()

    def __enter__(self) -> VideoRender:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _current_encoder(self) -> SegmentEncoder:
        """The encoder of the unfinished segment; a new one is first fed the segment's PNGs."""
        if self._encoder is None:
            self._encoder = self._new_encoder()
        return self._encoder

    def _new_encoder(self) -> SegmentEncoder:
        """An encoder of the unfinished segment, fed the PNGs of its frames finished so far."""
        encoder = SegmentEncoder(self.state_dir, self._encoded, self.fps, self.width,
                                 self.height, crf=self.crf, retry=RESUME_HINT)
        try:
            for index in range(self._encoded, self._frames_done):
                encoder.write(self._state.read_frame(index))
        except BaseException:
            encoder.abort()
            raise
        return encoder

    def _close_segment(self) -> None:
        """Encode the finished frames not yet in a segment into one, then drop their PNGs."""
        if self._frames_done == self._encoded:
            return
        encoder, self._encoder = self._current_encoder(), None
        start, end = self._encoded, self._frames_done
        self._segments.append(encoder.finish(self._state.segment_path(start, end)))
        self._encoded = end
        self._state.drop_frames(start, end)

    def _mux(self, segments: list[Path], audio_path: str | os.PathLike | None,
             metadata: Mapping[str, str] | None) -> Path:
        """Join ``segments`` (no re-encoding) and add the sound, cut to the video's length.

        Returns a temporary MP4 in the state folder for :func:`publish_file`.
        """
        return mux_segments(segments, self.state_dir, self.fps, self._frames_done,
                            audio_path, output_path=self.output_path, metadata=metadata,
                            retry=RESUME_HINT)


def _state_record(fps: Fraction, width: int, height: int, settings: Mapping) -> dict:
    """What the state folder records of a render and a resume must match (settings as JSON)."""
    return {"format": STATE_FORMAT, "fps": str(fps), "width": width, "height": height,
            "settings": json.loads(json.dumps(settings))}
