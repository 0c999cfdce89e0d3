"""``scripts/benchmark.py --samplers``: few-step sampling and TAESD against the defaults, side by side
in one run on one device.

1. Frames per second of audio2video with the default sampler (PLMS, 25 steps, guidance 7.5), LCM
   (``--sampler lcm --ddim_steps 4 --scale 1``) and Euler ancestral (``--sampler euler_a
   --ddim_steps 2 --scale 0``), all at the same strength and picture size, on the ``--demo`` model
   (or ``--ckpt``), measured two ways:

   * the render loop: ``sounddiffusion.video.loop.sample_frames`` with the real ``FrameWriter``
     into a real ``VideoRender`` (conditioning, sampling, decoding, H.264 segments, resume
     checkpoints: a frame's whole work), after one warm-up frame, best of ``--rounds`` rounds
     with the ways interleaved (the machine may be shared);
   * the whole command: ``audio2video.py`` as a user runs it on the sound, one process per way,
     wall-clock from start to the finished MP4 (interpreter start, model build, sound analysis
     and the mux included), frames / seconds, best of ``--rounds`` rounds (ways interleaved).

2. Decoding one 512x512 picture (``--decode_size``; latents (1, 4, 64, 64)) with the full-size SD v1 KL autoencoder
   and with TAESD, both with random weights (the time does not depend on the values), as the
   Engine runs them (float32 with oneDNN pre-packed weights on a CPU, fp16 on CUDA):
   ``ldm.models.taesd.decode_seconds``.

The report's last line: ``lcm_vs_default=X euler_a_vs_default=Y`` (the render loop's frames/s
ratios), ``whole_command_lcm_vs_default=Z`` and ``taesd_decode_speedup=W``.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Way:
    """One sampler setting: its row name and audio2video's flags for it."""

    name: str
    sampler: str
    steps: int
    scale: float

    def flags(self) -> list[str]:
        return ["--sampler", self.sampler, "--ddim_steps", str(self.steps), "--scale", f"{self.scale:g}"]


WAYS = (Way("default: PLMS 25 steps, scale 7.5", "plms", 25, 7.5),
        Way("LCM 4 steps, scale 1", "lcm", 4, 1.0),
        Way("Euler ancestral 2 steps, scale 0", "euler_a", 2, 0.0))


@dataclass
class Measured:
    way: Way
    loop_seconds: list[float] = field(default_factory=list)  # per frame, one value per round
    command_seconds: list[float] = field(default_factory=list)  # the whole audio2video.py process, per round
    command_frames: int = 0
    steps: int = 0  # sampler steps of a timed frame
    unet_evals: int = 0  # UNet evaluations (batch rows) of a timed frame

    @property
    def loop_fps(self) -> float:
        return 1.0 / min(self.loop_seconds)

    @property
    def command_fps(self) -> float | None:
        return self.command_frames / min(self.command_seconds) if self.command_seconds else None


def video_settings(way: Way, options, sound: Path):
    from sounddiffusion.settings import VideoSettings

    return VideoSettings(audio=str(sound), fps=options.fps, strength=options.strength, sampler=way.sampler,
                         ddim_steps=way.steps, scale=way.scale, H=options.size, W=options.size,
                         textprompt=options.prompt, seed=options.seed)


def time_render_loop(engine, way: Way, options, sound: Path, workdir: Path, init_rgb: np.ndarray) -> float:
    """Seconds per frame of ``options.frames`` img2img frames through the render loop (after one
    untimed warm-up frame), as ``audio2video.py`` renders them."""
    from scripts.benchmark_parts import synchronize
    from sounddiffusion.video.frame_chain import ChainState
    from sounddiffusion.video.frame_writer import FrameWriter
    from sounddiffusion.video.loop import plan_frames, sample_frames
    from sounddiffusion.video.render import VideoRender

    settings = video_settings(way, options, sound)
    plan = plan_frames(settings)
    chain = ChainState(0, engine.encode_image(init_rgb[None]))

    def block(start: int, stop: int, chain: ChainState, name: str) -> tuple[ChainState, float]:
        render = VideoRender.open(workdir / f"{way.sampler}-{name}.mp4", fps=plan.fps, width=options.size,
                                  height=options.size, settings={})
        writer = FrameWriter(engine, render, frames_dir=None, preview_frames=0, audio_path=str(sound))
        started = time.perf_counter()
        try:
            chain = sample_frames(engine, plan, settings, writer, start=start, stop=stop, chain=chain)
            writer.close()
            synchronize(engine.device)
        finally:
            render.close()
        return chain, time.perf_counter() - started

    run = time.monotonic_ns()  # every round renders into new files
    chain, _ = block(1, 2, chain, f"warmup-{run}")
    _, seconds = block(2, 2 + options.frames, chain, f"timed-{run}")
    return seconds / options.frames


def time_command(way: Way, options, sound: Path, workdir: Path) -> float:
    """Wall-clock seconds of ``audio2video.py`` rendering the whole sound with ``way``."""
    model = ["--ckpt", options.ckpt] if options.ckpt else ["--demo"]
    command = [sys.executable, str(REPO / "audio2video.py"), "--path", str(sound), "--fps", f"{options.fps:g}",
               "--strength", f"{options.strength:g}", "--H", str(options.size), "--W", str(options.size),
               "--textprompt", options.prompt, "--seed", str(options.seed), "--device", options.device,
               "--output", str(workdir / f"command-{way.sampler}.mp4"), *model, *way.flags()]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip().splitlines()[-1:]}")
    return seconds


def decode_times(device: torch.device, repeats: int, size: int = 512) -> tuple[float, float]:
    """(KL seconds, TAESD seconds) of decoding one size x size picture, full-size SD v1 weights at random."""
    from ldm.models.taesd import TinyAutoencoder, decode_seconds
    from ldm.modules.prepack import prepack_weights
    from ldm.util import instantiate_from_config
    from sounddiffusion.model.configs import load_config
    from sounddiffusion.model.devices import weight_dtype
    from sounddiffusion.model.loading import init_random_weights

    config = load_config(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml")
    dtype = weight_dtype("auto", device)
    kl = instantiate_from_config(config.model.params.first_stage_config)
    init_random_weights(kl)
    tiny = TinyAutoencoder()
    init_random_weights(tiny)
    scale_factor = float(config.model.params.scale_factor)
    for module in (kl, tiny):
        module.eval().requires_grad_(False).to(device, dtype)
        if device.type == "cpu" and dtype == torch.float32:
            prepack_weights(module)  # as engine_for_model does
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return (decode_seconds(lambda z: kl.decode(z / scale_factor), latents, repeats),
            decode_seconds(tiny.decode, latents, repeats))


def run(options, machine: list[str], command: str) -> str:
    """Measure every way (see the module doc) and return the markdown report."""
    from scripts.benchmark_parts import init_picture
    from sounddiffusion.model.loading import load_engine
    from sounddiffusion.model.samplers import img2img_step_count, unet_evaluations
    from sounddiffusion.settings import ModelSettings
    from sounddiffusion.sound.audio import fps_fraction, frame_count, sound_length

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    sound = Path(options.sound)
    device = torch.device(options.device)
    engine = load_engine(ModelSettings(demo=not options.ckpt, ckpt=options.ckpt, device=options.device))
    results = [Measured(way) for way in WAYS]
    init_rgb = init_picture(options.size, options.seed)
    with tempfile.TemporaryDirectory(prefix="sd-benchmark-samplers-") as workdir:
        for round_index in range(options.rounds):
            for result in results:
                seconds = time_render_loop(engine, result.way, options, sound, Path(workdir), init_rgb)
                result.loop_seconds.append(seconds)
                print(f"round {round_index + 1}: {result.way.name}: {seconds:.3f} s/frame", file=sys.stderr)
        frames = frame_count(sound_length(sound), fps_fraction(options.fps))
        for result in results:
            way = result.way
            result.steps = img2img_step_count(way.sampler, way.steps, options.strength)
            result.unet_evals = unet_evaluations(way.sampler, result.steps, way.scale, engine.embeds_guidance)
            result.command_frames = frames
        for round_index in range(options.rounds if options.whole_command else 0):
            for result in results:
                result.command_seconds.append(time_command(result.way, options, sound, Path(workdir)))
                print(f"command round {round_index + 1}: {result.way.name}: {result.command_seconds[-1]:.1f} s",
                      file=sys.stderr)
    kl_s, tiny_s = decode_times(device, options.decode_repeats, options.decode_size)
    return report(results, (kl_s, tiny_s), options, machine, command, started,
                  (load_before, os.getloadavg()), engine.checkpoint)


def report(results: list[Measured], decode: tuple[float, float], options, machine: list[str], command: str,
           started: datetime.datetime, loads, model: str) -> str:
    default = results[0]
    (load_start, load_end), (kl_s, tiny_s) = loads, decode
    lines = [f"# Few-step samplers and TAESD: {options.device}", "",
             f"- Date: {started:%Y-%m-%d %H:%M} UTC",
             f"- Command: `{command}`",
             *[f"- {line}" for line in machine],
             f"- Load average (1, 5, 15 min) at the start: {_load(load_start)}; at the end: {_load(load_end)}",
             f"- Work: audio2video on the {model} model, {options.size}x{options.size}, strength "
             f"{options.strength:g}, {options.fps:g} fps, sound {_shown(Path(options.sound))}, prompt mixed in; "
             f"render loop: 1 warm-up frame then {options.frames} timed img2img frames per way and round, best "
             f"of {options.rounds} rounds (ways interleaved); whole command: "
             f"{'best of ' + str(options.rounds) + ' runs per way (ways interleaved)' if options.whole_command else 'not run'}", "",
             "| way | steps per frame | UNet evaluations per frame | render loop s/frame | render loop frames/s "
             "| vs default | whole command s | whole command frames/s | vs default |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        command_cells = ["-", "-", "-"]
        if result.command_fps:
            command_cells = [f"{min(result.command_seconds):.1f}", f"{result.command_fps:.2f}",
                             f"{result.command_fps / default.command_fps:.2f}x"]
        lines.append(f"| {result.way.name} | {result.steps} | {result.unet_evals} | {min(result.loop_seconds):.3f} | "
                     f"{result.loop_fps:.2f} | {result.loop_fps / default.loop_fps:.2f}x | " + " | ".join(command_cells) + " |")
    side = options.decode_size
    lines += ["", f"Decoding one {side}x{side} picture (full-size SD v1 autoencoders, random weights, median of "
                  f"{options.decode_repeats} after a warm-up): KL {kl_s:.3f} s, TAESD {tiny_s:.3f} s "
                  f"({kl_s / tiny_s:.1f}x faster).", "",
              "Steps per frame: the sampler steps an img2img frame runs (PLMS: int(25 x strength); LCM: all 4, "
              "spread below the strength; Euler ancestral: int(2 x strength)). UNet evaluations: batch rows "
              "(guidance above 1 evaluates the conditional and unconditional rows; PLMS's first step twice). "
              "Render loop: the frame's whole work in sounddiffusion.video.loop.sample_frames with the real "
              "writer thread (decode, H.264, resume checkpoint). Whole command: audio2video.py on the whole "
              f"sound ({results[0].command_frames} frames), interpreter start, model build, sound analysis and "
              "mux included: a fixed cost that a longer sound spreads over more frames.", "", _ratio_line(results, decode)]
    return "\n".join(lines) + "\n"


def _ratio_line(results: list[Measured], decode: tuple[float, float]) -> str:
    default, lcm, euler = results
    whole = (f"{lcm.command_fps / default.command_fps:.2f}" if lcm.command_fps and default.command_fps else "n/a")
    return (f"lcm_vs_default={lcm.loop_fps / default.loop_fps:.2f} "
            f"euler_a_vs_default={euler.loop_fps / default.loop_fps:.2f} "
            f"whole_command_lcm_vs_default={whole} taesd_decode_speedup={decode[0] / decode[1]:.1f}")


def _load(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    # This module is the body of benchmark.py's --samplers mode: run that, with the flags given here.
    print("scripts/benchmark_samplers.py is run as: python scripts/benchmark.py --samplers ...", file=sys.stderr)
    sys.exit(subprocess.call([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--samplers", *sys.argv[1:]]))
