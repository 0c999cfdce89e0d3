"""The frame loop behind audio2video.py.

Frame 0 is txt2img from the first slice's conditioning (or img2img from ``--init-img``); every
next diffused frame is img2img from the previous diffused frame's latent under its own slice's
conditioning and numbers (:class:`~sounddiffusion.video.frame_plan.FramePlan`). With ``--cadence N``
only every Nth frame is diffused and the frames between are interpolated from their two diffused
neighbours (latents by slerp, or pictures cross-faded). With camera motion (``--zoom`` ...), each
frame's previous picture is moved first and the in-betweens follow the camera path
(:mod:`sounddiffusion.video.camera`). The chain stays in latent space on the device; decoding and
writing frame i runs in a worker thread while frame i+1 samples
(:mod:`sounddiffusion.video.frame_writer`). Everything random comes from seeds derived from
``(--seed, frame)``, so a resumed render needs only the chain's last latent (and the colour
reference) to continue exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sounddiffusion.control.bending_specs import BendSpec, BlockBender, check_block, check_graph_bends
from sounddiffusion.control.frame_schedules import report_columns
from sounddiffusion.errors import OutputError
from sounddiffusion.files import ensure_output_dir, unique_output_path
from sounddiffusion.images import load_init_image
from sounddiffusion.model.conditioning import blend_conditionings, condition
from sounddiffusion.model.cuda_graphs import StaticShapeCalls
from sounddiffusion.model.engine import Engine, warn_negative_prompt_without_guidance
from sounddiffusion.model.loading import load_engine, model_record, unet_skeleton
from sounddiffusion.model.lora_specs import parse_lora_specs
from sounddiffusion.model.tiny_vae import TinyVae, check_can_encode, load_tiny_vae
from sounddiffusion.settings import ModelSettings, VideoSettings
from sounddiffusion.sound.audio import slice_rms
from sounddiffusion.sound.control_tracks import file_digest
from sounddiffusion.sound.features import featurize
from sounddiffusion.sound.sections import auto_count
from sounddiffusion.video.cadence import slerp
from sounddiffusion.video.camera import Camera, CameraMove
from sounddiffusion.video.frame_chain import (ChainState, FrameBends, bend, block_specs, frame_bends,
                                              nonfinite_latent_error, prepare_previous, steps_of_frame,
                                              stream_generator)
from sounddiffusion.video.frame_plan import Frame, FramePlan, plan_frames
from sounddiffusion.video.frame_steps import check_frame_strengths, sampler_columns
from sounddiffusion.video.frame_writer import FrameWriter, PixelBlend
from sounddiffusion.video.render import VideoRender
from sounddiffusion.video.render_state import STATE_SUFFIX

log = logging.getLogger(__name__)

FRAMES_SUFFIX = "-frames"  # --save_frames: NAME-frames/ beside NAME.mp4


def frame_conditioning(engine: Engine, audio_slice: np.ndarray, frame: Frame,
                       settings: VideoSettings) -> torch.Tensor:
    """The (77, D) conditioning of ``frame``: its ``audio_slice``'s features mixed with its prompts."""
    features = featurize(audio_slice, settings.feature, dim=engine.context_dim)
    weights = frame.prompt_weights
    text_cond = blend_conditionings(weights, engine.text_conditioning) if weights else None
    return condition(features, mode=settings.normalize, text_cond=text_cond,
                     empty_cond=engine.text_conditioning(""), textstrength=frame.textstrength)


def frame_negative(engine: Engine, frame: Frame) -> torch.Tensor | None:
    """The (77, D) conditioning guidance pushes away from at ``frame``: its negative prompts blended
    with the prompts' weights; None when all are "" (the empty prompt, as without negative prompts)."""
    if not any(negative for negative, _ in frame.negative_weights):
        return None
    return blend_conditionings(frame.negative_weights, engine.text_conditioning)


def next_latent(engine: Engine, previous: torch.Tensor | None, cond: torch.Tensor, frame: Frame,
                bends: FrameBends, settings: VideoSettings) -> torch.Tensor:
    """Frame ``frame``'s latent (1, 4, h, w): txt2img without a previous latent, else img2img,
    with the frame's bends on the noised latent and before their steps, guided away from its
    negative prompts."""
    noise = engine.noise(engine.latent_shape(1, settings.H, settings.W), frame.noise_seed)
    common = dict(sampler=settings.sampler, steps=settings.ddim_steps, scale=frame.scale,
                  eta=settings.ddim_eta, seed=frame.noise_seed + 1, uncond=frame_negative(engine, frame))
    before_step = ((lambda step, x: bend(x, bends.steps.get(step, []), settings.seed, frame.index))
                   if bends.steps else None)
    if previous is None:
        return engine.txt2img(cond[None], x_T=noise, before_step=before_step, **common)
    bend_noised = (lambda z: bend(z, bends.noised, settings.seed, frame.index)) if bends.noised else None
    return engine.img2img(previous, cond[None], noise=noise, strength=frame.strength, bend_noised=bend_noised,
                          before_step=before_step, **common)


def diffuse(engine: Engine, plan: FramePlan, settings: VideoSettings, chain: ChainState, frame: Frame,
            blocks: BlockBender | None, camera: Camera | None = None) -> torch.Tensor:
    """Sample ``frame`` of ``plan`` from the chain (:func:`diffuse_slice` on its slice of the sound,
    with the camera's move since the chain's frame). ``camera``: the render's (default: made from
    ``plan``)."""
    camera = camera if camera is not None else Camera.of(plan, settings)
    return diffuse_slice(engine, plan.audio_slice(frame.index), plan.bends, settings, chain, frame, blocks,
                         move=camera.move(chain.index, frame.index),
                         decoded=lambda: camera.picture(engine, chain.index, chain.latent))


def diffuse_slice(engine: Engine, audio_slice: np.ndarray, specs: Sequence[BendSpec], settings: VideoSettings,
                  chain: ChainState, frame: Frame, blocks: BlockBender | None,
                  move: CameraMove | None = None, decoded: Callable[[], np.ndarray] | None = None) -> torch.Tensor:
    """Sample ``frame`` from the chain under ``audio_slice`` (mono float32 at 44.1 kHz), the
    latent (1, 4, h, w): its LoRA weights, its conditioning, the previous latent prepared (the
    camera's ``move`` from the chain's frame to this one, colour, contrast, noise; ``decoded``:
    the chain's latent decoded from a cache, see :func:`prepare_previous`), img2img with its bends
    (``specs``: the run's ``--bend`` specs), final bends, ``--pixel_roundtrip``. A file's frame loop
    and the live loop both sample through here."""
    engine.set_lora_weights(frame.lora_weights)  # before the conditioning: a LoRA may change the text encoder
    cond = frame_conditioning(engine, audio_slice, frame, settings)
    first = chain.latent is None
    previous = None if first else prepare_previous(engine, chain.latent, frame, chain.reference,
                                                   settings.color_coherence, settings.seed, move, decoded)
    n_steps = steps_of_frame(frame, settings.sampler, settings.ddim_steps, first=first)
    bends = frame_bends(specs, frame, slice_rms(audio_slice), n_steps, first=first)
    if blocks is not None:
        blocks.set_amounts(frame.bend_amounts)
    latent = next_latent(engine, previous, cond, frame, bends, settings)
    latent = bend(latent, bends.final, settings.seed, frame.index)
    if settings.pixel_roundtrip:
        latent = engine.encode_image(engine.decode(latent))
    return latent


def inbetween(engine: Engine, chain: ChainState, target: tuple[int, torch.Tensor], index: int, blend: str,
              camera: Camera) -> torch.Tensor | PixelBlend:
    """Frame ``index`` between the chain's last diffused frame and ``target`` (index, latent),
    both brought to frame ``index``'s camera first (:mod:`sounddiffusion.video.camera`)."""
    t = (index - chain.index) / (target[0] - chain.index)
    if blend == "pixel":
        return PixelBlend(chain.index, chain.latent, target[0], target[1], t,
                          camera.move(chain.index, index), camera.move(target[0], index))
    return slerp(camera.moved(engine, chain.index, chain.latent, index),
                 camera.moved(engine, target[0], target[1], index), t)


def sample_frames(engine: Engine, plan: FramePlan, settings: VideoSettings, writer: FrameWriter, *,
                  start: int, stop: int, chain: ChainState, progress: tqdm | None = None) -> ChainState:
    """Samples frames ``start`` .. ``stop - 1`` and hands each to ``writer.submit``.

    ``chain`` is the state after frame ``start - 1`` (``ChainState()``: frame ``start`` is txt2img).
    Returns the state after the last frame. The render loop and scripts/benchmark.py both run
    frames through here."""
    camera = Camera.of(plan, settings)
    current = [start]
    blocks = block_bender(engine, plan.bends, lambda i: stream_generator(settings.seed, current[0], i + 1))
    ahead: tuple[int, torch.Tensor] | None = None  # a diffused frame sampled before its in-betweens
    with blocks if blocks is not None else contextlib.nullcontext():
        for index in range(start, stop):
            frame = plan.frame(index)
            if frame.diffused:
                current[0] = index
                latent = ahead[1] if ahead and ahead[0] == index else diffuse(engine, plan, settings, chain, frame,
                                                                            blocks, camera)
                reference = chain.reference
                if reference is None and settings.color_coherence != "none":
                    reference = camera.picture(engine, index, latent)[0]  # frame 0's colours: the video keeps them
                chain = ChainState(index, latent, reference)
                writer.submit(index, latent, chain)
            else:
                target = plan.next_diffused(index)
                if ahead is None or ahead[0] != target:
                    current[0] = target
                    ahead = (target, diffuse(engine, plan, settings, chain, plan.frame(target), blocks, camera))
                writer.submit(index, inbetween(engine, chain, ahead, index, settings.cadence_blend, camera), chain)
            if progress is not None:
                progress.update(1)
    return chain


def block_bender(engine: Engine, specs: Sequence[BendSpec], generator_for: Callable[[int], torch.Generator]
                 ) -> BlockBender | None:
    """The hooks of the bends in ``specs`` that act inside UNet blocks (None when there are none);
    ``generator_for(i)``: the generator bend ``i`` draws from on the current frame. A UNet replayed
    from CUDA graphs refuses the bends a graph cannot hold (:func:`check_graph_bends`)."""
    blocked = block_specs(specs)
    if not blocked:
        return None
    unet = engine.model.model.diffusion_model
    if isinstance(unet.forward, StaticShapeCalls):
        check_graph_bends(blocked)
    return BlockBender(unet, specs, generator_for=generator_for)


def input_files_record(settings: VideoSettings) -> dict:
    """The files a render reads besides the sound, by content (:func:`file_digest`), so that an
    edited file counts as other settings: ``init_img`` and ``prompt_file`` (a digest or None),
    ``control`` ({NAME: digest} or None) and ``sections`` (a file's digest, else the text ``auto``
    or ``auto:N``, or None). Batch jobs key their songs with it before any song is read;
    :func:`render_settings` takes the init image and control tracks from it."""
    controls = {spec.partition("=")[0]: file_digest(spec.partition("=")[2]) for spec in settings.control}
    sections = settings.sections
    if sections and not auto_count(sections)[0]:
        sections = file_digest(sections)
    return {"init_img": file_digest(settings.init_img) if settings.init_img else None,
            "prompt_file": file_digest(settings.prompt_file) if settings.prompt_file else None,
            "control": controls or None, "sections": sections or None}


def render_settings(settings: VideoSettings, model: ModelSettings, record: dict, plan: FramePlan) -> dict:
    """The settings a resumed render must share with the first run, also stored in the MP4;
    ``record``: what outputs record of the model (:func:`~sounddiffusion.model.loading.model_record`).
    Control tracks and the init image are recorded by their files' content (:func:`input_files_record`),
    the prompt file by the schedule it gave, sections by their times."""
    files = input_files_record(settings)
    sections = [list(section) for section in plan.envelopes.sections] if plan.envelopes is not None else []
    return {**settings.parameters(), **model.parameters(), "audio": str(Path(settings.audio).resolve()),
            "audio_samples": plan.n_samples, "n_frames": plan.n_frames, "schedule": plan.schedule, **record,
            "init_img": files["init_img"], "control": files["control"], "sections": sections or None}


def write_reports(settings: VideoSettings, plan: FramePlan, embeds_guidance: bool = False) -> list[Path]:
    """NAME.schedule.csv (when the sound was analysed) and, with ``--plot``, NAME.schedule.png,
    next to the requested output; each run writes them anew. The CSV also holds the sampler's
    steps of every frame (:func:`~sounddiffusion.video.frame_steps.sampler_columns`)."""
    from sounddiffusion.control.schedule_report import plot_schedule, write_schedule_csv

    if plan.envelopes is None:
        return []
    columns = report_columns(plan.values, plan.seed_jumps, plan.bend_amounts, plan.schedules, plan.lora_weights)
    ensure_output_dir(settings.requested_output().parent)
    written = [write_schedule_csv(settings.report_path(".csv"), plan.envelopes,
                                  {**columns, **sampler_columns(plan, settings, embeds_guidance)},
                                  tracks=plan.tracks, snapped=plan.snapped, overwrite=True)]
    if settings.plot:
        snapped = [(asked, moved, prompt) for (asked, moved), (_, prompt) in zip(plan.snapped, plan.schedule)]
        written.append(plot_schedule(settings.report_path(".png"), plan.envelopes, columns,
                                     title=Path(settings.audio).name, tracks=plan.tracks, snapped=snapped,
                                     overwrite=True))
    for path in written:
        log.info("wrote %s", path)
    return written


def check_encoder(vae: TinyVae | None, settings: VideoSettings) -> None:
    """Before the model loads: a decoder-only ``--vae`` TAESD (``vae``, None without one) cannot
    serve a render that encodes pictures (ModelError naming the flags that need the encoder)."""
    pixel_motion = settings.camera_moves() and settings.motion_space == "pixel"  # decode, warp, encode
    needs = [flag for flag, on in (("--init-img", settings.init_img), ("--pixel_roundtrip", settings.pixel_roundtrip),
                                   ("--color_coherence", settings.color_coherence != "none"),
                                   ("camera motion with --motion_space pixel", pixel_motion)) if on]
    if needs:
        check_can_encode(vae, " and ".join(needs))


def run_audio2video(settings: VideoSettings, model: ModelSettings, *, engine: Engine | None = None) -> Path:
    """Render the video of ``settings.audio``; returns the path of the finished MP4 (with
    ``dry_run``: of the schedule CSV, written without loading the model).

    ``engine``: ``model`` already loaded (batch jobs render many songs with one load)."""
    loras = parse_lora_specs(model.lora, schedules=True)  # the files are checked before anything renders
    plan = plan_frames(settings, analyse=settings.plot or settings.dry_run,
                       loras=[(str(spec.path), spec.weight) for spec in loras])
    check_frame_strengths(plan, settings)
    reports = write_reports(settings, plan) if plan.envelopes is not None else []
    if settings.dry_run:
        return reports[0]
    for negative in plan.negative_prompts()[:1]:
        warn_negative_prompt_without_guidance(negative, float(plan.values["scale"].max()))
    init_rgb = load_init_image(settings.init_img, settings.W, settings.H) if settings.init_img else None
    path = settings.requested_output()
    # Everything that can be refused is, before the model loads: TAESD (a few MB, read once here),
    # the folder, the blocks bent, the render state (--resume, an unfinished render, another process).
    vae = engine.vae if engine is not None else load_tiny_vae(model.vae) if model.vae else None
    check_encoder(vae, settings)
    ensure_output_dir(path.parent)
    if model.cuda_graphs:
        check_graph_bends(block_specs(plan.bends))
    if engine is None:
        for spec in block_specs(plan.bends):  # block names against the model's layout, before it loads
            check_block(spec, unet_skeleton(model))
    recorded = render_settings(settings, model, model_record(model, loras, engine, vae), plan)
    VideoRender.check(path, plan.fps, settings.W, settings.H, recorded, resume=settings.resume)
    if engine is None:
        engine = load_engine(model, loras=loras, vae=vae)
    if reports and engine.embeds_guidance:  # one UNet evaluation per step at any scale
        write_reports(settings, plan, embeds_guidance=True)
    preview_frames = max(1, round(settings.preview_every * plan.fps)) if settings.preview_every > 0 else 0
    # Segments of fixed length, whatever --preview_every: the MP4's bytes do not depend on it.
    render = VideoRender.open(path, fps=plan.fps, width=settings.W, height=settings.H,
                              settings=recorded, resume=settings.resume, crf=settings.crf)
    start, chain, frames_dir = _resume_point(render, engine, init_rgb, settings, path)
    if settings.save_frames and frames_dir is None:
        frames_dir = ensure_output_dir(unique_output_path(path.with_name(path.stem + FRAMES_SUFFIX)))
    writer = FrameWriter(engine, render, frames_dir=frames_dir, preview_frames=preview_frames,
                         audio_path=settings.audio, frame_parameters=recorded, fps=float(plan.fps),
                         nonfinite_error=lambda index: nonfinite_latent_error(plan, index))
    try:
        with tqdm(total=plan.n_frames, initial=start, unit="frame", desc="rendering",
                  dynamic_ncols=True) as bar:
            sample_frames(engine, plan, settings, writer, start=start, stop=plan.n_frames, chain=chain,
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


def _resume_point(render: VideoRender, engine: Engine, init_rgb: np.ndarray | None, settings: VideoSettings,
                  video: Path) -> tuple[int, ChainState, Path | None]:
    """The first frame to render, the chain it continues and the --save_frames folder in use."""
    saved = render.load_checkpoint()
    if saved is not None:
        last_index, arrays, extra = saved
        log.info("resuming after frame %d", last_index)
        frames_dir = saved_frames_dir(video, extra.get("frames_dir"))
        return last_index + 1, ChainState.from_resume_data(arrays, extra, engine), frames_dir
    if init_rgb is not None:
        reference = init_rgb if settings.color_coherence != "none" else None
        return 0, ChainState(-1, engine.encode_image(init_rgb[None]), reference), None
    return 0, ChainState(), None


def saved_frames_dir(video: Path, stored: object) -> Path | None:
    """The --save_frames folder of the render of ``video`` that a checkpoint names (``stored``:
    its name, or None), always beside the video: ``STEM-frames`` or a numbered ``STEM-frames-NNNN``.

    Anything else (another folder, a path elsewhere: an edited state file) raises
    :class:`OutputError` rather than writing frames there. A full path stored by an earlier
    version is accepted when it names such a folder beside the video."""
    if stored is None:
        return None
    candidate = Path(stored) if isinstance(stored, str) else None
    pattern = re.compile(re.escape(video.stem + FRAMES_SUFFIX) + r"(-\d{4})?")
    if candidate is None or not pattern.fullmatch(candidate.name) or not (
            candidate.parent == Path(".") or candidate.parent.resolve() == video.parent.resolve()):
        state = video.with_name(video.name + STATE_SUFFIX)
        raise OutputError(f"the render state in {state} is damaged: it names {str(stored)[:200]!r} as the "
                          f"frames folder, not {video.stem}{FRAMES_SUFFIX}[-NNNN] beside the video; delete "
                          f"{state} and start again")
    return video.parent / candidate.name
