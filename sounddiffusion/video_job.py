"""The frame loop behind audio2video.py.

Frame 0 is txt2img from the first slice's conditioning (or img2img from ``--init-img``); frame i
is img2img from frame i-1's latent under slice i's conditioning. The chain stays in latent space
on the device; decoding and writing frame i runs in a worker thread while frame i+1 samples.
Each frame's noise comes from a seed derived from ``(--seed, i)``, so a resumed render needs only
the last finished latent to continue exactly as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .audio import frame_count, slice_rms, sound_blocks, sound_length, stream_frame_slices
from .conditioning import (blend_conditionings, condition, parse_prompt_file, prompt_weights_at,
                           start_end_schedule)
from .cli import engine_from_args
from .engine import Engine
from .features import featurize
from .images import ensure_output_dir, load_init_image, save_png
from .video import VideoRender, unique_output_path

log = logging.getLogger(__name__)

# Flags that change the frames; a resumed render must have the same values.
FRAME_SETTINGS = ("fps", "strength", "feature", "normalize", "textprompt", "textpromptend",
                  "textstrength", "rms_bend", "ddim", "ddim_steps", "ddim_eta", "scale", "seed", "H",
                  "W", "precision", "pixel_roundtrip", "demo")


def frame_seed(seed: int, index: int) -> int:
    """The seed of frame ``index``'s noise: independent streams per frame, derived from ``seed``."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(1, np.uint64)[0]) >> 1


@dataclass
class FramePlan:
    """What the loop needs besides the model: the sound, its slicing and the prompt schedule.

    ``audio`` is the sound file and ``n_samples`` its length in mono 44.1 kHz samples;
    ``schedule`` a list of (seconds, prompt). The samples are read from the file as the frames
    advance (:meth:`audio_slice`), so memory stays the same whatever the length of the sound."""

    audio: Path
    n_samples: int
    fps: float
    n_frames: int
    schedule: list[tuple[float, str]]
    _slices: Iterator[np.ndarray] | None = field(default=None, repr=False)
    _next_index: int = field(default=0, repr=False)

    def time_of(self, index: int) -> float:
        return index / self.fps

    def audio_slice(self, index: int) -> np.ndarray:
        """Frame ``index``'s samples, as ``audio.frame_slice`` cuts them from the whole sound.

        Read in order from the file; asking for another frame than the next one reads anew."""
        if self._slices is None or index != self._next_index:
            blocks = sound_blocks(self.audio, warn_non_finite=False)  # plan_frames has warned
            self._slices = stream_frame_slices(blocks, self.n_samples, self.fps, start=index)
        self._next_index = index + 1
        return next(self._slices)


def plan_frames(args: argparse.Namespace) -> FramePlan:
    n_samples = sound_length(args.audio)  # decodes the sound once without keeping it; errors show here
    n_frames = frame_count(n_samples, args.fps)
    if args.prompt_file:
        schedule = parse_prompt_file(args.prompt_file)
    else:
        schedule = start_end_schedule(args.textprompt, args.textpromptend, (n_frames - 1) / args.fps)
    return FramePlan(audio=Path(args.audio), n_samples=n_samples, fps=args.fps, n_frames=n_frames,
                     schedule=schedule)


def frame_conditioning(engine: Engine, plan: FramePlan, index: int,
                       args: argparse.Namespace) -> tuple[torch.Tensor, float]:
    """Slice ``index``'s (77, D) conditioning and its RMS loudness."""
    audio_slice = plan.audio_slice(index)
    features = featurize(audio_slice, args.feature, dim=engine.context_dim)
    weights = prompt_weights_at(plan.schedule, plan.time_of(index))
    text_cond = blend_conditionings(weights, engine.text_conditioning) if weights else None
    cond = condition(features, mode=args.normalize, text_cond=text_cond,
                     empty_cond=engine.text_conditioning(""), textstrength=args.textstrength)
    return cond, slice_rms(audio_slice)


def next_latent(engine: Engine, previous: torch.Tensor | None, cond: torch.Tensor, rms: float,
                index: int, args: argparse.Namespace) -> torch.Tensor:
    """Frame ``index``'s latent (1, 4, h, w): txt2img without a previous latent, else img2img."""
    seed = frame_seed(args.seed, index)
    noise = engine.noise(engine.latent_shape(1, args.H, args.W), seed)
    sampler = "ddim" if args.ddim else "plms"
    common = dict(sampler=sampler, steps=args.ddim_steps, scale=args.scale, eta=args.ddim_eta, seed=seed + 1)
    if previous is None:
        return engine.txt2img(cond[None], x_T=noise, **common)
    return engine.img2img(previous, cond[None], noise=noise, strength=args.strength,
                          latent_offset=rms * args.rms_bend, **common)


class FrameWriter:
    """Decodes latents and hands the frames to the video in a worker thread.

    ``submit(index, latent)`` returns at once; the worker decodes, writes the frame (and its PNG
    with --save_frames), records the latent as the render's resume point and, every
    ``preview_frames`` frames, writes a preview with ``audio_path``'s sound. Errors in the worker
    are raised again in the caller at the next ``submit`` or at ``close``."""

    def __init__(self, engine: Engine, render: VideoRender, *, frames_dir: Path | None,
                 preview_frames: int, audio_path: str):
        self.engine, self.render, self.frames_dir = engine, render, frames_dir
        self.preview_frames, self.audio_path = preview_frames, audio_path
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
                    save_png(rgb, frame_png, None)
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


def sample_frames(engine: Engine, plan: FramePlan, args: argparse.Namespace, writer: FrameWriter, *,
                  start: int, stop: int, latent: torch.Tensor | None, progress: tqdm | None = None
                  ) -> torch.Tensor | None:
    """Samples frames ``start`` .. ``stop - 1`` and hands each latent to ``writer.submit``.

    ``latent`` (1, 4, h, w) is frame ``start - 1``'s (None: frame ``start`` is txt2img). Returns
    the last frame's latent. The render loop and scripts/benchmark.py both run frames through here."""
    for index in range(start, stop):
        cond, rms = frame_conditioning(engine, plan, index, args)
        latent = next_latent(engine, latent, cond, rms, index, args)
        if args.pixel_roundtrip:
            latent = engine.encode_image(engine.decode(latent))
        writer.submit(index, latent)
        if progress is not None:
            progress.update(1)
    return latent


def render_settings(args: argparse.Namespace, engine: Engine, plan: FramePlan) -> dict:
    """The settings a resumed render must share with the first run."""
    settings = {name: getattr(args, name) for name in FRAME_SETTINGS}
    settings.update(audio=str(Path(args.audio).resolve()), audio_samples=plan.n_samples,
                    n_frames=plan.n_frames, schedule=plan.schedule, checkpoint=engine.checkpoint,
                    checkpoint_hash=engine.checkpoint_hash,
                    init_img=_file_digest(args.init_img) if args.init_img else None)
    return settings


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def requested_output(args: argparse.Namespace) -> Path:
    """--output, or OUTDIR/<sound name>.mp4. The render numbers the final file if this one is taken."""
    return Path(args.output) if args.output else Path(args.outdir) / (Path(args.audio).stem + ".mp4")


def run_audio2video(args: argparse.Namespace) -> Path:
    """Render the video of ``args.audio``; returns the path of the finished MP4."""
    plan = plan_frames(args)
    init_rgb = load_init_image(args.init_img, args.W, args.H) if args.init_img else None
    path = requested_output(args)
    ensure_output_dir(path.parent)  # before the model loads, so that a wrong folder fails at once
    engine = engine_from_args(args)
    preview_frames = max(1, round(args.preview_every * args.fps)) if args.preview_every > 0 else 0
    render = VideoRender.open(path, fps=args.fps, width=args.W, height=args.H,
                              settings=render_settings(args, engine, plan), resume=args.resume,
                              segment_frames=preview_frames or None)
    start, latent, frames_dir = _resume_point(render, engine, init_rgb)
    if args.save_frames and frames_dir is None:
        frames_dir = ensure_output_dir(unique_output_path(path.with_name(path.stem + "-frames")))
    writer = FrameWriter(engine, render, frames_dir=frames_dir, preview_frames=preview_frames,
                         audio_path=args.audio)
    try:
        with tqdm(total=plan.n_frames, initial=start, unit="frame", desc="rendering",
                  dynamic_ncols=True) as bar:
            sample_frames(engine, plan, args, writer, start=start, stop=plan.n_frames, latent=latent,
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
    return render.finish(args.audio)


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
