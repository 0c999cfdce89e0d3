"""The live frame loop: audio2video's chain (img2img from the previous picture) on the newest sound.

The sound comes in blocks (:mod:`sounddiffusion.live.input`) and is cut into frames at ``--fps``
as a file would be; every frame's envelopes are computed as it completes, in the listener's
thread (:mod:`sounddiffusion.live.listener`). When the loop is free it samples the newest complete frame
only (:func:`sounddiffusion.video.loop.diffuse_slice`, the file renderer's step), with the numbers
its schedules give over the envelopes now (:func:`sounddiffusion.live.controls.live_frame`): frames
of the sound that completed while a picture was being made are dropped, never queued, so the
latency stays that of one picture. While no envelope has changed by more than ``--rest`` since the
last picture (silence, a held note) and the controls are unchanged, the loop rests: the gate is
on the sound, not on the picture.

The pictures are made in the caller's thread (Ctrl-C lands here); the web server, the sound
input and the listener run in their own. :func:`run_live` ties them together and returns a :class:`LiveSummary`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sounddiffusion.control.bending_specs import check_block
from sounddiffusion.errors import ParameterError
from sounddiffusion.files import ensure_output_dir
from sounddiffusion.live.controls import LiveControls, live_frame
from sounddiffusion.live.envelopes import warm_up_beat_tracker
from sounddiffusion.live.input import open_input
from sounddiffusion.live.listener import Heard, Listener
from sounddiffusion.live.music import LiveMusic, live_music_flags
from sounddiffusion.live.record import LiveRecorder
from sounddiffusion.live.server import LiveServer
from sounddiffusion.live.state import LiveState
from sounddiffusion.model.engine import Engine
from sounddiffusion.model.loading import load_engine, unet_skeleton
from sounddiffusion.model.lora_specs import parse_lora_specs
from sounddiffusion.settings import LiveSettings, ModelSettings
from sounddiffusion.sound.analysis import ENVELOPE_NAMES, parse_smoothing
from sounddiffusion.sound.audio import SAMPLE_RATE
from sounddiffusion.video.frame_chain import ChainState, block_specs, stream_generator
from sounddiffusion.video.camera import repeated_move
from sounddiffusion.video.loop import block_bender, diffuse_slice

log = logging.getLogger(__name__)

JPEG_QUALITY = 90
WAIT_S = 0.25  # how long the loop waits for a frame of sound before it looks again


@dataclass
class LiveSummary:
    """What a live run did: ``frames`` shown over ``seconds`` of sound, frames ``rested`` and
    ``dropped``, every picture's latency (ms) and the ``recording`` written (or None)."""

    frames: int = 0
    seconds: float = 0.0
    rested: int = 0
    dropped: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    recording: Path | None = None

    def line(self) -> str:
        rate = self.frames / self.seconds if self.seconds else 0.0
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return (f"{self.frames} pictures in {self.seconds:.1f} s of sound ({rate:.2f} frames/s), latency mean "
                f"{lat.mean():.0f} ms, 95th percentile {np.percentile(lat, 95):.0f} ms; {self.rested} frames "
                f"rested, {self.dropped} dropped")


ONCE_LOGGERS = ("sounddiffusion.control.schedules", __name__)
"""The loggers that say each distinct message once in a run (a schedule clipped, a frame skipped: on every frame)."""


class _Once(logging.Filter):
    """Lets each distinct message through once, numbers aside (a schedule clipped or undefined on
    every frame warns once, naming the first frame)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = re.sub(r"\d+", "#", record.getMessage())
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def jpeg_of(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def warm_up(engine: Engine, settings: LiveSettings, controls: LiveControls, music: LiveMusic) -> None:
    """One txt2img and one img2img picture on silence (the variables of ``music`` before any
    sound) and a run of the beat tracker (unless ``--bpm`` set a grid), so that the first live
    pictures do not pay for first calls (kernel choices, the text conditionings, the sampler's
    schedule, librosa compiling its tracker)."""
    if music.main.beats is not None:
        warm_up_beat_tracker()
    current, schedules, _ = controls.current()
    silence = np.zeros(math.ceil(SAMPLE_RATE / settings.fps), np.float32)
    variables = music.variables(0, 0.0)
    chain = ChainState()
    try:
        for index in range(2):
            frame, _ = live_frame(current, schedules, variables, index, 0)
            chain = ChainState(index, diffuse_slice(engine, silence, (), current, chain, frame, None), None)
    except ParameterError:  # a schedule undefined on silence (log(onset)): the first pictures pay instead
        return
    engine.decode(chain.latent)


class LiveLoop:
    """Makes pictures with ``engine`` of the frames ``listener`` hears until its sound ends
    (:meth:`run`); see the module docstring."""

    def __init__(self, engine: Engine, controls: LiveControls, listener: Listener, state: LiveState,
                 recorder: LiveRecorder | None):
        self.engine, self.controls, self.listener, self.state, self.recorder = engine, controls, listener, state, recorder
        settings, schedules, _ = controls.current()
        self.specs = tuple(spec for spec, _ in schedules.bends)  # the bends are those of the start
        self.now = {"index": 0, "seed": settings.seed}  # what the block bends' generators read
        self.blocks = block_bender(engine, self.specs,
                                   lambda i: stream_generator(self.now["seed"], self.now["index"], i + 1))
        self.chain, self.last_jump, self.last_heard = ChainState(), 0, -1
        self.shown_values: np.ndarray | None = None
        self.shown_version = -1

    def run(self) -> None:
        with self.blocks if self.blocks is not None else contextlib.nullcontext():
            while True:
                heard = self.listener.newest(after=self.last_heard, timeout=WAIT_S)
                if heard is not None:
                    self.picture(heard)
                elif self.listener.ended:
                    return

    def picture(self, heard: Heard) -> None:
        """The picture of frame ``heard``, unless the sound has stood still since the last one."""
        settings, schedules, version = self.controls.current()
        # the input's envelopes and the control tracks' (NAME.onset ...): any of them may drive a schedule
        values = np.array([value for name, value in heard.variables.items()
                           if name.rpartition(".")[2] in ENVELOPE_NAMES])
        waiting, self.last_heard = heard.index - self.last_heard, heard.index
        if (settings.rest > 0 and self.shown_values is not None and version == self.shown_version
                and np.max(np.abs(values - self.shown_values)) <= settings.rest):
            self.state.count(rested=waiting)
            return
        self.state.count(dropped=waiting - 1)
        try:
            frame, self.last_jump = live_frame(settings, schedules, heard.variables, heard.index, self.last_jump)
        except ParameterError as exc:  # a schedule undefined here, a zoom of 0...: the show goes on
            log.warning("a frame is skipped (and so is each later one that fails alike, counted as dropped): %s",
                        exc)
            self.state.count(dropped=1)
            return
        self.now.update(index=heard.index, seed=settings.seed)
        move = repeated_move(frame.motion, heard.index - self.chain.index, settings.W, settings.H, settings.border,
                             settings.motion_space) if self.chain.latent is not None else None
        latent = diffuse_slice(self.engine, heard.samples, self.specs, settings, self.chain, frame, self.blocks,
                               move=move)
        rgb = self.engine.decode(latent)[0]
        reference = self.chain.reference
        if reference is None and settings.color_coherence != "none":
            reference = rgb  # the first picture's colours are what the show keeps
        self.chain = ChainState(heard.index, latent, reference)
        jpeg = jpeg_of(rgb)
        ready = time.monotonic()
        self.state.publish(jpeg, ready, (ready - heard.captured) * 1000.0)
        if self.recorder is not None:
            self.recorder.show(rgb, ready)
        self.shown_values, self.shown_version = values, version


def run_live(settings: LiveSettings, model: ModelSettings, *, engine: Engine | None = None,
             announce=print) -> LiveSummary:
    """Serve pictures of ``settings.input`` until its sound ends, ``--seconds`` pass or Ctrl-C;
    returns what was done. Everything a user can get wrong (the input, the schedules, the bends'
    blocks, the recording's folder, the port) fails before the model loads, as one UserError.
    ``announce(line)``: where the page's address and the summary go (stdout)."""
    loras = parse_lora_specs(model.lora, schedules=True)  # the files are checked before anything loads
    controls = LiveControls(settings, [(str(spec.path), spec.weight) for spec in loras])
    for spec in block_specs(tuple(spec for spec, _ in controls.current()[1].bends)):
        check_block(spec, unet_skeleton(model))
    grid, tracks = live_music_flags(settings)
    if settings.record:
        ensure_output_dir(Path(settings.record).parent)
    state = LiveState(width=settings.W, height=settings.H)
    state.set_controls(controls.values())
    server = LiveServer(state, controls, host=settings.host, port=settings.port)
    summary = LiveSummary()
    recorder = None
    music = LiveMusic(settings.fps, smoothing=parse_smoothing(settings.smoothing) if settings.smoothing else None,
                      grid=grid, beats_per_bar=settings.beats_per_bar, tracks=tracks)
    source = open_input(settings.input, loop=settings.loop, device_index=settings.device_index)
    filter_once = _Once()
    for name in ONCE_LOGGERS:
        logging.getLogger(name).addFilter(filter_once)
    try:  # the microphone is open from here on: whatever happens next, the finally closes it
        server.bind()
        engine = engine or load_engine(model, loras=loras)
        set_cpu_threads(engine.device)
        warm_up(engine, settings, controls, music)
        for line in server.start():
            announce(line)
        recorder = LiveRecorder(settings.record, settings.fps, settings.W, settings.H) if settings.record else None
        state.started = time.monotonic()
        listener = Listener(source, music, limit=round(settings.seconds * SAMPLE_RATE) if settings.seconds else None,
                            max_f=math.ceil(settings.seconds * settings.fps) if settings.seconds else 0.0,
                            state=state, recorder=recorder)
        try:
            with source:
                listener.start()
                try:
                    LiveLoop(engine, controls, listener, state, recorder).run()
                finally:
                    listener.stop()  # with the sound heard while the last picture was on show
        except KeyboardInterrupt:
            log.info("stopped")
        summary.seconds = listener.samples / SAMPLE_RATE
        if recorder is not None:
            recorder, finishing = None, recorder
            summary.recording = finishing.finish()
    finally:
        if recorder is not None:
            recorder.abort()
        music.close()
        server.stop()
        source.stop()
        for name in ONCE_LOGGERS:
            logging.getLogger(name).removeFilter(filter_once)
    status = state.status()
    summary.frames, summary.rested, summary.dropped = status["frames"], status["rested"], status["dropped"]
    summary.latencies_ms = state.latencies()
    announce(f"live: {summary.line()}")
    if summary.recording is not None:
        announce(f"live: recorded {summary.recording}")
    return summary


def set_cpu_threads(engine_device: torch.device) -> None:
    """On a CPU, torch uses all cores but one: the sound and the server need one to keep up
    (unless OMP_NUM_THREADS says how many)."""
    if engine_device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
