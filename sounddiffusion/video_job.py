"""The frame loop behind audio2video.py.

Frame 0 is txt2img from the first slice's conditioning (or img2img from ``--init-img``); frame i
is img2img from frame i-1's latent under slice i's conditioning. The chain stays in latent space
on the device; decoding and writing frame i runs in a worker thread while frame i+1 samples.
Each frame's noise comes from a seed derived from ``(--seed, i)``, so a resumed render needs only
the last finished latent to continue exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .audio import slice_rms
from .conditioning import blend_conditionings, condition
from .engine import Engine
from .features import featurize
from .frame_plan import Frame, FramePlan, plan_frames
from .files import ensure_output_dir, unique_output_path
from .images import load_init_image, save_png
from .loading import load_engine
from .settings import ModelSettings, VideoSettings
from .video import VideoRender

log = logging.getLogger(__name__)


def frame_conditioning(engine: Engine, audio_slice: np.ndarray, frame: Frame,
                       settings: VideoSettings) -> torch.Tensor:
    """The (77, D) conditioning of ``frame``: its ``audio_slice``'s features mixed with its prompts."""
    features = featurize(audio_slice, settings.feature, dim=engine.context_dim)
    weights = frame.prompt_weights
    text_cond = blend_conditionings(weights, engine.text_conditioning) if weights else None
    return condition(features, mode=settings.normalize, text_cond=text_cond,
                     empty_cond=engine.text_conditioning(""), textstrength=frame.textstrength)


def next_latent(engine: Engine, previous: torch.Tensor | None, cond: torch.Tensor, frame: Frame,
                loudness: float, settings: VideoSettings) -> torch.Tensor:
    """Frame ``frame``'s latent (1, 4, h, w): txt2img without a previous latent, else img2img.

    ``loudness`` is the RMS of the frame's slice (its bend is ``loudness * frame.rms_bend``)."""
    noise = engine.noise(engine.latent_shape(1, settings.H, settings.W), frame.noise_seed)
    common = dict(sampler=settings.sampler, steps=settings.ddim_steps, scale=frame.scale,
                  eta=settings.ddim_eta, seed=frame.noise_seed + 1)
    if previous is None:
        return engine.txt2img(cond[None], x_T=noise, **common)
    return engine.img2img(previous, cond[None], noise=noise, strength=frame.strength,
                          latent_offset=loudness * frame.rms_bend, **common)


class FrameWriter:
    """Decodes latents and hands the frames to the video in a worker thread.

    ``submit(index, latent)`` returns at once; the worker decodes, writes the frame (and its PNG
    with --save_frames), records the latent as the render's resume point and, every
    ``preview_frames`` frames, writes a preview with ``audio_path``'s sound. Errors in the worker
    are raised again in the caller at the next ``submit`` or at ``close``.

    Saved frames carry ``png_parameters`` (the render's settings, as audio2img's PNGs carry
    theirs) plus ``frame`` (the index) and ``time`` (its start in seconds: index / the render's
    fps) in their ``parameters`` chunk."""

    def __init__(self, engine: Engine, render: VideoRender, *, frames_dir: Path | None,
                 preview_frames: int, audio_path: str, png_parameters: dict | None = None):
        self.engine, self.render, self.frames_dir = engine, render, frames_dir
        self.preview_frames, self.audio_path = preview_frames, audio_path
        self.png_parameters = png_parameters or {}
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="frame-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            index, latent = item
            try:
                rgb = self.engine.decode(latent)[0]
                frame_png = self.frames_dir / f"frame-{index:06d}.png" if self.frames_dir else None
                # A resumed render may redo a frame whose PNG was saved: it is the same picture.
                if frame_png is not None and not frame_png.exists():
                    save_png(rgb, frame_png, {**self.png_parameters, "frame": index,
                                              "time": round(float(index / self.render.fps), 6)})
                self.render.add_frame(rgb, {"latent": latent.float().cpu().numpy()},
                                      {"frame": index, "frames_dir": str(self.frames_dir) if self.frames_dir else None})
                if self.preview_frames and (index + 1) % self.preview_frames == 0:
                    self.render.write_preview(self.audio_path)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self._error = exc

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, index: int, latent: torch.Tensor) -> None:
        self._raise_pending()
        self._queue.put((index, latent))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_pending()


def sample_frames(engine: Engine, plan: FramePlan, settings: VideoSettings, writer: FrameWriter, *,
                  start: int, stop: int, latent: torch.Tensor | None, progress: tqdm | None = None
                  ) -> torch.Tensor | None:
    """Samples frames ``start`` .. ``stop - 1`` and hands each latent to ``writer.submit``.

    ``latent`` (1, 4, h, w) is frame ``start - 1``'s (None: frame ``start`` is txt2img). Returns
    the last frame's latent. The render loop and scripts/benchmark.py both run frames through here."""
    for index in range(start, stop):
        frame = plan.frame(index)
        audio_slice = plan.audio_slice(index)
        cond = frame_conditioning(engine, audio_slice, frame, settings)
        latent = next_latent(engine, latent, cond, frame, slice_rms(audio_slice), settings)
        if settings.pixel_roundtrip:
            latent = engine.encode_image(engine.decode(latent))
        writer.submit(index, latent)
        if progress is not None:
            progress.update(1)
    return latent


def render_settings(settings: VideoSettings, model: ModelSettings, engine: Engine, plan: FramePlan) -> dict:
    """The settings a resumed render must share with the first run, also stored in the MP4."""
    return {**settings.parameters(), **model.parameters(), "audio": str(Path(settings.audio).resolve()),
            "audio_samples": plan.n_samples, "n_frames": plan.n_frames, "schedule": plan.schedule,
            "checkpoint": engine.checkpoint, "checkpoint_hash": engine.checkpoint_hash,
            "init_img": _file_digest(settings.init_img) if settings.init_img else None}


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def run_audio2video(settings: VideoSettings, model: ModelSettings) -> Path:
    """Render the video of ``settings.audio``; returns the path of the finished MP4."""
    plan = plan_frames(settings)
    init_rgb = load_init_image(settings.init_img, settings.W, settings.H) if settings.init_img else None
    path = settings.requested_output()
    ensure_output_dir(path.parent)  # before the model loads, so that a wrong folder fails at once
    engine = load_engine(model)
    preview_frames = max(1, round(settings.preview_every * plan.fps)) if settings.preview_every > 0 else 0
    recorded = render_settings(settings, model, engine, plan)
    render = VideoRender.open(path, fps=plan.fps, width=settings.W, height=settings.H,
                              settings=recorded, resume=settings.resume,
                              segment_frames=preview_frames or None, crf=settings.crf)
    start, latent, frames_dir = _resume_point(render, engine, init_rgb)
    if settings.save_frames and frames_dir is None:
        frames_dir = ensure_output_dir(unique_output_path(path.with_name(path.stem + "-frames")))
    writer = FrameWriter(engine, render, frames_dir=frames_dir, preview_frames=preview_frames,
                         audio_path=settings.audio, png_parameters=recorded)
    try:
        with tqdm(total=plan.n_frames, initial=start, unit="frame", desc="rendering",
                  dynamic_ncols=True) as bar:
            sample_frames(engine, plan, settings, writer, start=start, stop=plan.n_frames, latent=latent,
                          progress=bar)
        writer.close()
    except BaseException as exc:
        try:
            writer.close()
        finally:
            render.close()
        if isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt(f"{render.frames_done} of {plan.n_frames} frames are saved; continue "
                                    f"with the same command and --resume") from None
        raise
    # The MP4 carries the same settings as the resume check, as JSON in its comment tag.
    return render.finish(settings.audio, metadata={"comment": json.dumps(recorded, sort_keys=True)})


def _resume_point(render: VideoRender, engine: Engine, init_rgb: np.ndarray | None
                  ) -> tuple[int, torch.Tensor | None, Path | None]:
    """The first frame to render, the latent it starts from and the --save_frames folder in use."""
    saved = render.load_checkpoint()
    if saved is not None:
        last_index, arrays, extra = saved
        log.info("resuming after frame %d", last_index)
        frames_dir = Path(extra["frames_dir"]) if extra.get("frames_dir") else None
        return last_index + 1, torch.from_numpy(arrays["latent"]).to(engine.device, engine.dtype), frames_dir
    if init_rgb is not None:
        return 0, engine.encode_image(init_rgb[None]), None
    return 0, None, None
