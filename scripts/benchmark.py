#!/usr/bin/env python
"""Speed of an audio2video frame, measured three ways in one run on the same weights and settings.

1. this project: ``Engine`` + ``sounddiffusion.video.loop.sample_frames`` (the render loop itself:
   latent chain, cached text conditionings, decoding in the writer thread);
2. the upstream flow: every frame decoded, written as PNG, read back and encoded again by the VAE,
   the text conditionings recomputed every frame, DDIM, einsum attention, in ``--precision
   autocast`` (bfloat16 on a CPU, float16 on CUDA) and ``full``;
3. diffusers' ``StableDiffusionImg2ImgPipeline`` built from the same weights (converted here to
   diffusers' layout), the conditioning passed as ``prompt_embeds``, DDIM, same steps, strength
   and guidance; the previous frame's latents are its ``image`` (no re-encoding, as for us) and
   every frame is decoded to a picture.

Every way starts from the same picture and runs 1 warm-up frame (one denoising step, every code
path at full size), then the timed frames. The model is the full-size SD v1 architecture
(configs/stable-diffusion/v1-inference.yaml) with random weights: nothing is downloaded, and the
time of a frame does not depend on the values.

On a CPU without native bfloat16 (no AVX-512 BF16 / AMX), PyTorch runs autocast's bfloat16
convolutions on its reference path (``_slow_conv2d_forward``): with torch 2.13 on a 2-core AVX2
CPU, one VAE decode of a 128x128 picture took 479 s in autocast (all of it in that function).
A frame of upstream-autocast then takes hours, so by default it is not rendered there; the
benchmark measures one UNet evaluation in autocast and in float32 instead, which shows which
precision is upstream's faster one (the ratio is against that one). ``--ways upstream-autocast``
renders its frames anyway.

    python scripts/benchmark.py --device cpu --quick     # 128x128, 20 steps x 0.5, 2 frames
    python scripts/benchmark.py --device cpu             # 256x256, 50 steps x 0.5, 3 frames
    python scripts/benchmark.py --device cuda            # 512x512 fp16, 50 steps x 0.5, 20 frames
    python scripts/benchmark.py --device cuda --quick    # the same work, 4 frames per way (< 3 min)
    python scripts/benchmark.py --device cuda --ways ours --cuda_graphs   # ours with CUDA graphs

``--samplers`` measures something else: frames/s of audio2video with the default sampler (PLMS 25
steps) against LCM (4 steps, scale 1) and Euler ancestral (2 steps, scale 0) at the same strength on
the demo model, and the decode time of the KL autoencoder against TAESD (scripts/benchmark_samplers.py):

    python scripts/benchmark.py --samplers --device cpu      # demo model 128x128, then SD v1 decoders at 512
    python scripts/benchmark.py --samplers --device cuda --size 512 --ckpt model.safetensors

``--device cuda --quick`` keeps the full mode's work per frame (512x512, 25 denoising steps) and
times 4 frames per way: on one H200 (2026-11-29) building the model took about 30 s and 10
frames per way of all four ways about 130 s in all, of which about 50 s were timed frames, so 4
frames should take about 100 s with the building (estimated, not yet run in this form).

Prints a markdown table, also written to outputs/benchmark-<mode>-<UTC time>.md (or --out), whose
last line is ``ratio_vs_diffusers=X ratio_vs_upstream=Y``: their seconds per frame divided by ours
(upstream in its faster precision). Needs diffusers (requirements-bench.txt) for way 3.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.modules.attention import set_attention_backend  # noqa: E402
from scripts.benchmark_parts import init_picture, synchronize  # noqa: E402
from scripts.diffusers_conversion import diffusers_ddim, diffusers_unet, diffusers_vae  # noqa: E402
from sounddiffusion.files import write_new_text  # noqa: E402

log = logging.getLogger("benchmark")

FULL_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
SOUND = REPO / "examples" / "audio" / "chords.wav"
PROMPT = "a neon city at night, synthwave"
FPS = 12

# (size, steps, strength, timed frames) of each mode; guidance 7.5 and batch 1 everywhere.
MODES = {
    "cpu": dict(size=256, steps=50, frames=3),
    "cpu-quick": dict(size=128, steps=20, frames=2),
    "cuda": dict(size=512, steps=50, frames=20),
    "cuda-quick": dict(size=512, steps=50, frames=4),
}
WAYS = ("ours", "upstream-autocast", "upstream-full", "diffusers")


# ----------------------------------------------------------------------------- weights

def build_weights(config_path: Path = FULL_CONFIG) -> tuple[torch.nn.Module, object]:
    """The full-size SD v1 ``LatentDiffusion`` with the engine's deterministic random weights, on
    the CPU in float32, and its config."""
    from sounddiffusion.model.configs import load_config
    from sounddiffusion.model.loading import random_weights_model

    config = load_config(config_path)
    return random_weights_model(config).eval().requires_grad_(False), config


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same weight storage (no copy of the values).

    Its Parameters are new objects, so casting or moving one tree leaves the other as it is."""
    memo = {id(p): torch.nn.Parameter(p.data, requires_grad=False) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


# ----------------------------------------------------------------------------- measuring

class PeakMemory:
    """Peak memory of the process while a way runs: resident set (VmHWM, reset through
    /proc/self/clear_refs) on a CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.note = "max allocated" if device.type == "cuda" else "peak RSS"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.note = "peak RSS since start"  # the kernel keeps a lifetime peak only

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        status = Path("/proc/self/status")
        if status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@dataclass
class Result:
    way: str
    precision: str
    seconds: list[float] = field(default_factory=list)  # per timed frame (ours: the block / frames)
    peak_bytes: int = 0
    cpu_seconds: float = 0.0  # process CPU time per timed frame
    warmup_seconds: float = 0.0  # from the way's start (weights cast/moved/converted) to its timed frames

    @property
    def s_per_frame(self) -> float:
        return sum(self.seconds) / len(self.seconds)


# ----------------------------------------------------------------------------- the three ways

@dataclass
class Job:
    """What every way renders: frames ``first`` .. ``first + warmup + frames - 1`` of SOUND.

    The warm-up frames run every code path at the job's sizes (one-time costs: allocations,
    oneDNN primitives and packed weights, compilation) with a single denoising step each."""

    device: torch.device
    size: int
    steps: int
    strength: float
    scale: float
    frames: int
    seed: int
    init_rgb: np.ndarray  # (size, size, 3) uint8: the picture before the first frame
    warmup: int = 1
    first: int = 1  # frame 0 would be txt2img in a render; every benchmarked frame is img2img

    @property
    def t_enc(self) -> int:
        return int(self.strength * self.steps)

    @property
    def warmup_strength(self) -> float:
        """The strength that makes ``int(strength * steps)`` one step."""
        return 1.5 / self.steps

    def indices(self):
        """(warm-up frame indices, timed frame indices)."""
        start = self.first + self.warmup
        return range(self.first, start), range(start, start + self.frames)


def video_settings(job: Job, strength: float):
    """audio2video.py's settings for the job (its defaults for everything else)."""
    from sounddiffusion.settings import VideoSettings

    return VideoSettings(audio=str(SOUND), fps=FPS, strength=strength, ddim=True, ddim_steps=job.steps,
                         scale=job.scale, H=job.size, W=job.size, textprompt=PROMPT, seed=job.seed)


def run_ours(model, job: Job, compile: bool, memory: PeakMemory, workdir: Path, cuda_graphs: bool = False) -> Result:
    """This project's loop as a user gets it: Engine + loop.sample_frames with the real
    FrameWriter into a real, resumable VideoRender (ffmpeg pipe, render state, no previews)."""
    from sounddiffusion.model.loading import engine_for_model
    from sounddiffusion.video.frame_chain import ChainState
    from sounddiffusion.video.frame_writer import FrameWriter
    from sounddiffusion.video.loop import plan_frames, sample_frames
    from sounddiffusion.video.render import VideoRender

    started = time.perf_counter()
    settings = video_settings(job, job.strength)
    engine = engine_for_model(sharing_copy(model), device=str(job.device), precision="auto", compile=compile,
                              cuda_graphs=cuda_graphs)
    plan = plan_frames(settings)
    warmup, timed = job.indices()
    result = Result("this project (Engine + loop.sample_frames)", _dtype_name(engine.dtype))

    def block(indices, chain, settings, name):
        render = VideoRender.open(workdir / f"ours-{name}.mp4", fps=plan.fps, width=job.size, height=job.size,
                                  settings={})
        writer = FrameWriter(engine, render, frames_dir=None, preview_frames=0, audio_path=str(SOUND))
        try:
            chain = sample_frames(engine, plan, settings, writer, start=indices.start, stop=indices.stop,
                                  chain=chain)
            writer.close()
            synchronize(job.device)
        finally:
            render.close()
        return chain

    start = ChainState(job.first - 1, engine.encode_image(job.init_rgb[None]))
    chain = block(warmup, start, video_settings(job, job.warmup_strength), "warmup")
    result.warmup_seconds = time.perf_counter() - started
    memory.reset()
    cpu0, t0 = time.process_time(), time.perf_counter()
    block(timed, chain, settings, "timed")
    elapsed = time.perf_counter() - t0
    result.cpu_seconds = (time.process_time() - cpu0) / job.frames
    result.seconds = [elapsed / job.frames] * job.frames
    result.peak_bytes = memory.peak()
    return result


def run_upstream(model, job: Job, precision: str, memory: PeakMemory, workdir: Path) -> Result:
    """The upstream flow, frame by frame as its img2img did it (see the module docstring)."""
    from PIL import Image

    from ldm.models.diffusion.ddim import DDIMSampler
    from sounddiffusion.model.conditioning import condition
    from sounddiffusion.sound.audio import frame_slice, load_audio
    from sounddiffusion.sound.features import featurize

    started = time.perf_counter()
    settings = video_settings(job, job.strength)
    samples = load_audio(SOUND)
    model = sharing_copy(model).to(job.device)
    set_attention_backend(model, "einsum")
    # As upstream loaded it: the UNet's weights require grad (only the autoencoder and CLIP are
    # frozen), so within a frame's autocast region each weight is cast to half precision once
    # and cached, not at every step.
    model.model.requires_grad_(True)
    sampler = DDIMSampler(model)
    dtype = torch.float16 if job.device.type == "cuda" else torch.bfloat16
    scope = (lambda: torch.autocast(job.device.type, dtype=dtype)) if precision == "autocast" else contextlib.nullcontext
    torch.manual_seed(job.seed)
    previous = workdir / "upstream-init.png"
    Image.fromarray(job.init_rgb).save(previous)

    def frame(index: int, t_enc: int) -> Path:
        with torch.no_grad(), scope():
            rgb = np.asarray(Image.open(previous).convert("RGB"), dtype=np.float32) / 255.0
            image = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(job.device) * 2.0 - 1.0
            init_latent = model.get_first_stage_encoding(model.encode_first_stage(image))
            uc = model.get_learned_conditioning([""])
            c_text = model.get_learned_conditioning([PROMPT])
            features = featurize(frame_slice(samples, index, FPS), settings.feature, dim=uc.shape[-1])
            c = condition(features, mode=settings.normalize, text_cond=c_text[0], empty_cond=uc[0],
                          textstrength=float(settings.textstrength))[None]
            sampler.make_schedule(ddim_num_steps=job.steps, ddim_eta=0.0, verbose=False)
            z_enc = sampler.stochastic_encode(init_latent, torch.tensor([t_enc], device=job.device))
            latent = sampler.decode(z_enc, c, t_enc, unconditional_guidance_scale=job.scale,
                                    unconditional_conditioning=uc)
            x = torch.clamp((model.decode_first_stage(latent) + 1.0) / 2.0, 0.0, 1.0)
            picture = (255.0 * x[0].permute(1, 2, 0).float().cpu().numpy()).astype(np.uint8)
        path = workdir / f"upstream-{precision}-{index:05d}.png"
        Image.fromarray(picture).save(path)
        return path

    warmup, timed = job.indices()
    for index in warmup:
        previous = frame(index, 1)
    synchronize(job.device)
    result = Result("upstream flow (PNG round trip, text re-encoded, einsum)", precision_label(precision, job),
                    warmup_seconds=time.perf_counter() - started)
    memory.reset()
    cpu0 = time.process_time()
    for index in timed:
        t0 = time.perf_counter()
        previous = frame(index, job.t_enc)
        synchronize(job.device)
        result.seconds.append(time.perf_counter() - t0)
    result.cpu_seconds = (time.process_time() - cpu0) / job.frames
    result.peak_bytes = memory.peak()
    return result


def run_diffusers(model, config, job: Job, memory: PeakMemory) -> Result:
    """diffusers' img2img pipeline over the same weights, the previous frame's latents as its image."""
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline

    from sounddiffusion.model.conditioning import condition
    from sounddiffusion.model.devices import weight_dtype
    from sounddiffusion.sound.audio import frame_slice, load_audio
    from sounddiffusion.sound.features import featurize

    started = time.perf_counter()
    settings = video_settings(job, job.strength)
    samples = load_audio(SOUND)
    dtype = weight_dtype("auto", job.device)
    unet = diffusers_unet(model, config).to(job.device, dtype)
    vae = diffusers_vae(model, config).to(job.device, dtype)
    # The prompt is encoded once, with the same CLIP weights, as a diffusers user passing
    # prompt_embeds would; the pipeline itself then needs neither text encoder nor tokenizer.
    with torch.no_grad():
        empty = model.get_learned_conditioning([""])[0].float()
        text = model.get_learned_conditioning([PROMPT])[0].float()
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                          scheduler=diffusers_ddim(model), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    negative = empty[None].to(job.device, dtype)
    with torch.no_grad():
        pixels = torch.from_numpy(job.init_rgb).permute(2, 0, 1)[None].to(job.device, dtype) / 127.5 - 1.0
        latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor

    def frame(index: int, latents: torch.Tensor, strength: float) -> tuple[torch.Tensor, np.ndarray]:
        features = featurize(frame_slice(samples, index, FPS), settings.feature, dim=empty.shape[-1])
        cond = condition(features, mode=settings.normalize, text_cond=text, empty_cond=empty,
                         textstrength=float(settings.textstrength))
        generator = torch.Generator().manual_seed(job.seed + index)
        latents = pipe(prompt_embeds=cond[None].to(job.device, dtype), negative_prompt_embeds=negative,
                       image=latents, strength=strength, num_inference_steps=job.steps,
                       guidance_scale=job.scale, eta=0.0, generator=generator, output_type="latent").images
        with torch.no_grad():
            decoded = vae.decode(latents / vae.config.scaling_factor).sample
        picture = np.asarray(pipe.image_processor.postprocess(decoded, output_type="pil")[0])
        return latents, picture

    warmup, timed = job.indices()
    for index in warmup:
        latents, _ = frame(index, latents, job.warmup_strength)
    synchronize(job.device)
    result = Result(f"diffusers {diffusers.__version__} StableDiffusionImg2ImgPipeline", _dtype_name(dtype),
                    warmup_seconds=time.perf_counter() - started)
    memory.reset()
    cpu0 = time.process_time()
    for index in timed:
        t0 = time.perf_counter()
        latents, _ = frame(index, latents, job.strength)
        synchronize(job.device)
        result.seconds.append(time.perf_counter() - t0)
    result.cpu_seconds = (time.process_time() - cpu0) / job.frames
    result.peak_bytes = memory.peak()
    return result


def probe_unet_precisions(model, job: Job) -> tuple[float, float]:
    """Seconds of one UNet evaluation as upstream ran it (einsum attention, conditional and
    unconditional in one batch of 2, at the job's latent size): (autocast bfloat16, float32),
    each timed after one untimed call."""
    unet = sharing_copy(model).model.to(job.device)
    set_attention_backend(unet, "einsum")
    generator = torch.Generator().manual_seed(job.seed)
    latent = job.size // 8
    x = torch.randn(2, 4, latent, latent, generator=generator).to(job.device)
    t = torch.full((2,), 500, device=job.device)
    with torch.no_grad():
        context = model.get_learned_conditioning(["", PROMPT]).to(job.device)

    def seconds(scope) -> float:
        with torch.no_grad(), scope():
            unet(x, t, c_crossattn=[context])
            t0 = time.perf_counter()
            unet(x, t, c_crossattn=[context])
            synchronize(job.device)
            return time.perf_counter() - t0

    return (seconds(lambda: torch.autocast(job.device.type, dtype=torch.bfloat16)),
            seconds(contextlib.nullcontext))


def autocast_probe_note(autocast_s: float, full_s: float, job: Job, full: Result | None) -> str:
    """The report line that stands for upstream-autocast's row on a CPU without native bfloat16."""
    bound = autocast_s * job.t_enc
    note = (f"upstream-autocast not rendered: this CPU has no native bfloat16, so PyTorch runs its "
            f"bfloat16 convolutions on the reference path (see scripts/benchmark.py). Measured instead: "
            f"one UNet evaluation (batch 2, {job.size}x{job.size}) took {autocast_s:.2f} s in autocast "
            f"(bfloat16) and {full_s:.2f} s in float32, so the {job.t_enc} evaluations of a frame alone "
            f"take {bound:.1f} s in autocast")
    if full is not None:
        slower = bound > full.s_per_frame
        note += (f", {'more' if slower else 'less'} than upstream-full's whole frame ({full.s_per_frame:.1f} s): "
                 + ("upstream's faster precision is full" if slower
                    else "render it with --ways upstream-autocast to compare"))
    return note + "."


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "full (float32)", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]


def precision_label(precision: str, job: Job) -> str:
    if precision == "full":
        return "full (float32)"
    return "autocast (float16)" if job.device.type == "cuda" else "autocast (bfloat16)"


# ----------------------------------------------------------------------------- report

def machine_description(device: torch.device) -> list[str]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text)
    lines = [f"CPU: {cpu}, {os.cpu_count()} cores ({flags}); torch threads: {torch.get_num_threads()}",
             f"Software: Python {platform.python_version()}, torch {torch.__version__}, "
             f"{_diffusers_version()}, {platform.system()} {platform.release()}"]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    return lines


def _diffusers_version() -> str:
    try:
        import diffusers
    except ImportError:
        return "diffusers not installed"
    return f"diffusers {diffusers.__version__}"


def ratio_line(results: dict[str, Result]) -> str:
    ours = results.get("ours")

    def ratio(keys):
        theirs = [results[k].s_per_frame for k in keys if k in results]
        if ours is None or not theirs:
            return "n/a"
        return f"{min(theirs) / ours.s_per_frame:.2f}"

    return (f"ratio_vs_diffusers={ratio(['diffusers'])} "
            f"ratio_vs_upstream={ratio(['upstream-autocast', 'upstream-full'])}")


def report(results: dict[str, Result], job: Job, mode: str, memory_note: str, command: str,
           started: datetime.datetime, extra: list[str], model_name: str) -> str:
    per_frame = job.t_enc
    lines = [f"# audio2video frame speed: {mode}", "",
             f"- Date: {started:%Y-%m-%d %H:%M} UTC",
             f"- Command: `{command}`",
             *[f"- {line}" for line in machine_description(job.device)],
             f"- Work: {model_name} with random weights, {job.size}x{job.size}, "
             f"{job.steps} steps x strength {job.strength} = {per_frame} denoising steps per frame "
             f"(DDIM, eta 0), guidance {job.scale} (conditional and unconditional in one batch of 2), "
             f"batch 1; {job.warmup} warm-up frame (1 denoising step) then {job.frames} timed frames "
             f"per way; sound "
             f"{SOUND.relative_to(REPO)} at {FPS} fps, fft features, prompt mixed in.",
             *[f"- {line}" for line in extra],
             "",
             f"| way | precision | timed frames | s/frame | frames/s | CPU s/frame | {memory_note} (GiB) | warm-up (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for result in results.values():
        lines.append(f"| {result.way} | {result.precision} | {len(result.seconds)} | {result.s_per_frame:.2f} | "
                     f"{1 / result.s_per_frame:.3f} | {result.cpu_seconds:.1f} | {result.peak_bytes / 2**30:.2f} | "
                     f"{result.warmup_seconds:.1f} |")
    lines += ["", "s/frame: wall-clock seconds per timed frame (ours: the whole block of frames, including "
              "its writer thread finishing, divided by their number). CPU s/frame: process CPU time "
              "(all threads) per frame. Memory: the process's peak while the way ran; the weights "
              "every way uses are resident throughout. Warm-up: wall-clock seconds from the way's "
              "start (its copy of the weights cast and moved, converted for diffusers) to the end of its "
              "warm-up frame (one-time costs: allocations, kernel choices, compilation, graph capture).", "", ratio_line(results)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true",
                        help="CPU: 128x128, 20 steps x 0.5, 2 frames (< 10 min on 2 cores); CUDA: the full "
                             "mode's 512x512, 50 steps x 0.5, 4 frames per way (about 100 s on an H200 by estimate from a "
                             "longer run, not yet timed itself)")
    parser.add_argument("--frames", type=int, default=None, help="timed frames per way (default: by mode)")
    parser.add_argument("--size", type=int, default=None, help="picture side in pixels (default: by mode)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps before strength (default: by mode)")
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--ways", default=None,
                        help=f"comma-separated subset of {','.join(WAYS)} (default: all; on a CPU without "
                             f"native bfloat16, upstream-autocast is measured by one UNet evaluation)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our UNet (as audio2video --compile)")
    parser.add_argument("--cuda_graphs", action="store_true",
                        help="CUDA only: replay our UNet calls from CUDA graphs (as audio2video --cuda_graphs)")
    parser.add_argument("--config", default=str(FULL_CONFIG.relative_to(REPO)),
                        help="model config, filled with random weights (smaller ones are for tests)")
    parser.add_argument("--out", default=None, help="markdown file (default: outputs/benchmark-<mode>-<UTC time>.md)")
    few = parser.add_argument_group("--samplers: few-step samplers and TAESD against the defaults")
    few.add_argument("--samplers", action="store_true",
                     help="frames/s of audio2video at PLMS 25 steps, LCM 4 steps and Euler ancestral 2 steps "
                          "(--size default 128, --frames default 12 per round), and KL vs TAESD decode time")
    few.add_argument("--rounds", type=int, default=2,
                     help="rounds of the render loop and of the whole command, ways interleaved; the best counts")
    few.add_argument("--no_whole_command", dest="whole_command", action="store_false",
                     help="skip timing audio2video.py itself on the whole sound")
    few.add_argument("--decode_repeats", type=int, default=3, help="timed decodes per autoencoder")
    few.add_argument("--decode_size", type=int, default=512, help="side of the decoded picture in pixels")
    few.add_argument("--sound", default=str(SOUND), help="the sound rendered")
    few.add_argument("--ckpt", default=None, help="a checkpoint instead of the demo model")
    return parser.parse_args(argv)


def native_bfloat16(device: torch.device) -> bool:
    """Whether autocast's bfloat16 convolutions run on oneDNN here (AVX-512 BF16 / AMX CPUs)."""
    return device.type != "cpu" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Progress notes to stderr, the table alone to stdout, whatever logging ran before in the process.
    notes = logging.StreamHandler(sys.stderr)
    notes.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [notes]
    log.setLevel(logging.INFO)
    log.propagate = False
    for name in ("transformers", "diffusers", "pytorch_lightning", "sounddiffusion"):
        logging.getLogger(name).setLevel(logging.WARNING)
    started = datetime.datetime.now(datetime.timezone.utc)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmark.py: error: --device cuda, but PyTorch sees no CUDA GPU here", file=sys.stderr)
        return 2
    if args.cuda_graphs and args.device != "cuda":
        print("benchmark.py: error: --cuda_graphs needs --device cuda", file=sys.stderr)
        return 2
    if args.samplers:
        return samplers_main(args, argv, started)
    mode = args.device + ("-quick" if args.quick else "")
    settings = MODES[mode]
    ways = list(WAYS) if args.ways is None else [w for w in args.ways.split(",") if w]
    unknown = sorted(set(ways) - set(WAYS))
    if unknown:
        print(f"benchmark.py: error: unknown ways {unknown}: use {','.join(WAYS)}", file=sys.stderr)
        return 2
    size = args.size or settings["size"]
    job = Job(device=torch.device(args.device), size=size, steps=args.steps or settings["steps"],
              strength=args.strength, scale=args.scale, frames=args.frames or settings["frames"],
              seed=args.seed, init_rgb=init_picture(size, args.seed))
    memory = PeakMemory(job.device)
    log.info("building the full-size model with random weights ...")
    model, config = build_weights(REPO / args.config)
    extra = [f"RSS after building the weights: {memory.peak() / 2**30:.2f} GiB"] if job.device.type == "cpu" else []
    probe_autocast = args.ways is None and not native_bfloat16(job.device)
    if probe_autocast:
        ways.remove("upstream-autocast")
    if args.compile:
        extra.append("ours: UNet through torch.compile (compiled during the warm-up frame)")
    if args.cuda_graphs:
        extra.append("ours: UNet calls replayed from CUDA graphs (--cuda_graphs; captured during the warm-up frame)")
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="sd-benchmark-") as workdir:
        for way in ways:
            log.info("running %s ...", way)
            gc.collect()
            if way == "ours":
                results[way] = run_ours(model, job, args.compile, memory, Path(workdir), args.cuda_graphs)
            elif way.startswith("upstream-"):
                results[way] = run_upstream(model, job, way.split("-", 1)[1], memory, Path(workdir))
            else:
                results[way] = run_diffusers(model, config, job, memory)
            log.info("  warm-up %.1f s, then %.2f s/frame", results[way].warmup_seconds, results[way].s_per_frame)
            if job.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
    if probe_autocast:
        log.info("measuring one UNet evaluation of upstream-autocast ...")
        extra.append(autocast_probe_note(*probe_unet_precisions(model, job), job, results.get("upstream-full")))
    command = "python " + " ".join(shlex.quote(a) for a in [f"scripts/{Path(__file__).name}", *(argv or sys.argv[1:])])
    model_name = "full-size SD v1" if Path(args.config).name == FULL_CONFIG.name else args.config
    text = report(results, job, mode, memory.note, command, started, extra, f"{model_name} ({Path(args.config).name})")
    path = write_new_text(args.out or REPO / "outputs" / f"benchmark-{mode}-{started:%Y%m%d-%H%M%S}.md", text)
    log.info("wrote %s", path)
    print(text, end="")
    return 0


def samplers_main(args, argv, started: datetime.datetime) -> int:
    """``--samplers``: scripts/benchmark_samplers.py's comparison, written to a file and printed."""
    from scripts import benchmark_samplers

    args.size, args.frames = args.size or 128, args.frames or 12
    args.fps, args.prompt = FPS, PROMPT
    command = "python " + " ".join(shlex.quote(a) for a in [f"scripts/{Path(__file__).name}", *(argv or sys.argv[1:])])
    text = benchmark_samplers.run(args, machine_description(torch.device(args.device)), command)
    name = f"benchmark-samplers-{args.device}-{started:%Y%m%d-%H%M%S}.md"
    log.info("wrote %s", write_new_text(args.out or REPO / "outputs" / name, text))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
