"""The live frame loop: audio2video's chain (img2img from the previous picture) on the newest sound.

The sound comes in blocks (:mod:`sounddiffusion.live.input`) and is cut into frames at ``--fps``
as a file would be; every frame's envelopes are computed as it completes
(:mod:`sounddiffusion.live.envelopes`). When the loop is free it samples the newest complete frame
only (:func:`sounddiffusion.video.loop.diffuse_slice`, the file renderer's step), with the numbers
its schedules give over the envelopes now (:func:`sounddiffusion.live.controls.live_frame`): frames
of the sound that completed while a picture was being made are dropped, never queued, so the
latency stays that of one picture. While no envelope has changed by more than ``--rest`` since the
last picture (silence, a held note) and the controls are unchanged, the loop rests: the gate is
on the sound, not on the picture.

Everything runs in the caller's thread (Ctrl-C lands here); the web server and the sound input
run in their own. :func:`run_live` ties them together and returns a :class:`LiveSummary`.
"""
from __future__ import annotations

import io
import logging
import math
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sounddiffusion.control.bending_specs import check_block
from sounddiffusion.errors import ScheduleError
from sounddiffusion.files import ensure_output_dir
from sounddiffusion.live.controls import LiveControls, live_frame
from sounddiffusion.live.envelopes import LiveBeats, LiveEnvelopes
from sounddiffusion.live.input import SoundInput, open_input
from sounddiffusion.live.record import LiveRecorder
from sounddiffusion.live.server import LiveServer
from sounddiffusion.live.state import LiveState
from sounddiffusion.model.engine import Engine
from sounddiffusion.model.loading import load_engine, unet_skeleton
from sounddiffusion.settings import LiveSettings, ModelSettings
from sounddiffusion.sound.analysis import parse_smoothing
from sounddiffusion.sound.audio import SAMPLE_RATE
from sounddiffusion.video.frame_chain import ChainState, block_specs, stream_generator
from sounddiffusion.video.loop import block_bender, diffuse_slice

log = logging.getLogger(__name__)

JPEG_QUALITY = 90
WAIT_S = 0.25  # how long the loop waits for sound before it looks at the clock again


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


class _Once(logging.Filter):
    """Lets each distinct message through once (a schedule clipped on every frame warns once)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def jpeg_of(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def warm_up(engine: Engine, settings: LiveSettings, controls: LiveControls) -> None:
    """One txt2img and one img2img picture on silence and a run of the beat tracker, so that the
    first live pictures do not pay for first calls (kernel choices, the text conditionings, the
    sampler's schedule, librosa compiling its tracker)."""
    frame_at = live_frame
    LiveBeats().warm_up()
    current, schedules, _ = controls.current()
    silence = np.zeros(math.ceil(SAMPLE_RATE / settings.fps), np.float32)
    variables = LiveEnvelopes(settings.fps).variables(0, 0.0)
    chain = ChainState()
    try:
        for index in range(2):
            frame, _ = frame_at(current, schedules, variables, index, 0)
            chain = ChainState(index, diffuse_slice(engine, silence, (), current, chain, frame, None), None)
    except ScheduleError:  # a schedule undefined on silence (log(onset)): the first pictures pay instead
        return
    engine.decode(chain.latent)


def live_loop(engine: Engine, controls: LiveControls, source: SoundInput, state: LiveState,
              recorder: LiveRecorder | None) -> float:
    """Make pictures from ``source`` until its sound ends or ``--seconds`` of it have come;
    returns the seconds of sound taken. See the module docstring."""
    settings, _, _ = controls.current()
    envelopes = LiveEnvelopes(settings.fps, smoothing=parse_smoothing(settings.smoothing) if settings.smoothing else None)
    limit = round(settings.seconds * SAMPLE_RATE) if settings.seconds else None
    max_f = math.ceil(settings.seconds * settings.fps) if settings.seconds else 0.0
    specs = tuple(spec for spec, _ in controls.current()[1].bends)  # bends are set at the start
    now = {"index": 0, "seed": settings.seed}
    blocks = block_bender(engine, specs, lambda i: stream_generator(now["seed"], now["index"], i + 1))
    chain, last_jump, samples, waiting = ChainState(), 0, 0, 0
    shown_values, shown_version, frame_end_time = None, -1, 0.0
    ended = False
    if blocks is not None:
        blocks.__enter__()
    try:
        while not ended:
            try:
                block = source.blocks.get(timeout=WAIT_S)
            except queue.Empty:
                continue
            while block is not None:  # everything that has come in, newest last
                piece = block.samples if limit is None else block.samples[: max(0, limit - samples)]
                piece_end = block.captured - (len(block.samples) - len(piece)) / SAMPLE_RATE  # its last sample's
                samples += len(piece)
                if recorder is not None:
                    recorder.add_sound(piece, piece_end)
                completed = envelopes.push(piece)
                if completed:
                    waiting += completed
                    frame_end_time = piece_end - (samples - envelopes.pending_start) / SAMPLE_RATE
                if limit is not None and samples >= limit:
                    ended = True
                    break
                try:
                    block = source.blocks.get_nowait()
                except queue.Empty:
                    break
            else:
                ended = True
            state.hear(envelopes.values, envelopes.bpm, samples / SAMPLE_RATE)
            if not waiting:
                continue
            settings, schedules, version = controls.current()
            values = np.array(list(envelopes.values.values()))
            if (shown_values is not None and version == shown_version
                    and np.max(np.abs(values - shown_values)) <= settings.rest):
                state.count(rested=waiting)
                waiting = 0
                continue
            state.count(dropped=waiting - 1)
            waiting = 0
            index = envelopes.frames - 1
            try:
                frame, last_jump = live_frame(settings, schedules, envelopes.variables(index, max_f), index, last_jump)
            except ScheduleError as exc:
                log.warning("frame %d is skipped: %s", index, exc)
                state.count(dropped=1)
                continue
            now.update(index=index, seed=settings.seed)
            latent = diffuse_slice(engine, envelopes.last_slice, specs, settings, chain, frame, blocks)
            reference = chain.reference
            rgb = engine.decode(latent)[0]
            if reference is None and settings.color_coherence != "none":
                reference = rgb
            chain = ChainState(index, latent, reference)
            jpeg = jpeg_of(rgb)
            ready = time.monotonic()
            state.publish(jpeg, ready, (ready - frame_end_time) * 1000.0)
            if recorder is not None:
                recorder.show(rgb, ready)
            shown_values, shown_version = values, version
    finally:
        if blocks is not None:
            blocks.__exit__(None, None, None)
    return samples / SAMPLE_RATE


def run_live(settings: LiveSettings, model: ModelSettings, *, engine: Engine | None = None,
             announce=print) -> LiveSummary:
    """Serve pictures of ``settings.input`` until its sound ends, ``--seconds`` pass or Ctrl-C;
    returns what was done. Everything a user can get wrong (the input, the schedules, the bends'
    blocks, the recording's folder, the port) fails before the model loads, as one UserError.
    ``announce(line)``: where the page's address and the summary go (stdout)."""
    controls = LiveControls(settings)
    for spec in block_specs(tuple(spec for spec, _ in controls.current()[1].bends)):
        check_block(spec, unet_skeleton(model))
    if settings.record:
        ensure_output_dir(Path(settings.record).parent)
    source = open_input(settings.input, loop=settings.loop, device_index=settings.device_index)
    state = LiveState(width=settings.W, height=settings.H)
    state.set_controls(controls.values())
    server = LiveServer(state, controls, host=settings.host, port=settings.port)
    server.bind()
    summary = LiveSummary()
    filter_once = _Once()
    schedule_log = logging.getLogger("sounddiffusion.control.schedules")
    schedule_log.addFilter(filter_once)
    recorder = None
    try:
        engine = engine or load_engine(model)
        set_cpu_threads(engine.device)
        warm_up(engine, settings, controls)
        for line in server.start():
            announce(line)
        recorder = LiveRecorder(settings.record, settings.fps, settings.W, settings.H) if settings.record else None
        state.started = time.monotonic()
        try:
            with source:
                summary.seconds = live_loop(engine, controls, source, state, recorder)
        except KeyboardInterrupt:
            log.info("stopped")
        if recorder is not None:
            recorder, finishing = None, recorder
            summary.recording = finishing.finish()
    finally:
        if recorder is not None:
            recorder.abort()
        server.stop()
        schedule_log.removeFilter(filter_once)
    status = state.status()
    summary.frames, summary.rested, summary.dropped = status["frames"], status["rested"], status["dropped"]
    summary.seconds = summary.seconds or status["seconds"]
    summary.latencies_ms = state.latencies()
    announce(f"live: {summary.line()}")
    if summary.recording is not None:
        announce(f"live: recorded {summary.recording}")
    return summary


def set_cpu_threads(engine_device: torch.device) -> None:
    """On a CPU, torch uses all cores but one: the sound and the server need one to keep up."""
    import os

    if engine_device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
