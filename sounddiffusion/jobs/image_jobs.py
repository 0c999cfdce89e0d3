"""The image-making jobs behind audio2img.py, scripts/txt2img.py and scripts/img2img.py.

Each job turns its inputs into a list of (77, D) conditionings, samples them in batches with one
loaded :class:`~sounddiffusion.model.engine.Engine` and writes PNGs that carry their parameters.
Seeds are per image (``seed + round * n_samples + sample``), so results do not depend on how
images were batched. Each file written is named in a note as it appears; a job returns an
:class:`ImagesWritten` (images, grids and the inputs it skipped) and never exits: the entry point
turns skipped inputs into its exit status.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sounddiffusion.errors import AudioError, PromptFileError
from sounddiffusion.files import ensure_output_dir, next_numbered_path
from sounddiffusion.images import load_init_image, make_grid, save_png
from sounddiffusion.logs import counted
from sounddiffusion.model.conditioning import condition
from sounddiffusion.model.engine import Engine, warn_negative_prompt_without_guidance
from sounddiffusion.model.loading import load_engine
from sounddiffusion.model.tiny_vae import check_can_encode, load_tiny_vae
from sounddiffusion.settings import (AudioConditioningSettings, ImageSettings, ModelSettings,
                                     PromptImageSettings, SoundImageSettings)
from sounddiffusion.sound.audio import load_audio, sound_warning, sounds_in_folder
from sounddiffusion.sound.features import featurize

log = logging.getLogger(__name__)


@dataclass
class ImagesWritten:
    """What a job wrote: image and grid paths in the order written, and the inputs it skipped as
    (path, reason)."""

    images: list[Path] = field(default_factory=list)
    grids: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def add(self, other: ImagesWritten) -> None:
        self.images += other.images
        self.grids += other.grids
        self.skipped += other.skipped

    def summary(self, inputs: int, what: str, outdir: Path) -> str:
        """"6 images and 2 grids from 2 sounds in OUTDIR" (``what``: "sound" or "prompt")."""
        return (f"{counted(len(self.images), 'image')} and {counted(len(self.grids), 'grid')} from "
                f"{counted(inputs, what)} in {outdir}")


@dataclass
class ImageSet:
    """The images of one prompt or sound: what conditions them and where they go.

    ``cond`` is the (77, D) conditioning; ``parameters`` what goes into each PNG; images are saved
    as ``folder/PREFIX-NNNNN.png`` and the grid as ``grid_folder/grid-NNNN.png``."""

    cond: torch.Tensor
    parameters: dict
    folder: Path
    prefix: str
    grid_folder: Path


def run_parameters(settings: ImageSettings, model: ModelSettings, engine: Engine) -> dict:
    """Everything needed to reproduce an image: the job's and the model's settings plus the checkpoint
    and the LoRA files by content (name, sha256, short hash, weight)."""
    return {**settings.parameters(), **model.parameters(), "checkpoint": engine.checkpoint,
            "checkpoint_hash": engine.checkpoint_hash, "lora": engine.loras, "vae_hash": engine.vae_hash}


def sample_images(engine: Engine, conds: torch.Tensor, seeds: list[int], settings: ImageSettings,
                  init_latent: torch.Tensor | None = None) -> np.ndarray:
    """One sampling call: conditionings (B, 77, D) and B seeds -> uint8 images (B, H, W, 3).

    With ``init_latent`` (1, 4, h, w) this is img2img at ``settings.strength``, else txt2img.
    Row b's start noise and the noise its steps add (LCM, Euler ancestral, DDIM with eta > 0) come
    from seed b alone, so each picture is the one a call with that row by itself gives."""
    shape = engine.latent_shape(1, settings.H, settings.W)
    noise = torch.cat([engine.noise(shape, seed) for seed in seeds])
    common = dict(sampler=settings.sampler, steps=settings.ddim_steps, scale=settings.scale,
                  eta=settings.ddim_eta, seed=seeds, uncond=engine.negative_conditioning(settings.negative_prompt))
    if init_latent is None:
        latents = engine.txt2img(conds, x_T=noise, **common)
    else:
        latents = engine.img2img(init_latent.expand(len(seeds), -1, -1, -1), conds, noise=noise,
                                 strength=settings.strength, **common)
    return engine.decode(latents)


def fixed_image_path(image_set: ImageSet, image_index: int) -> Path:
    """``folder/PREFIX-NNNNN.png`` for image ``image_index`` (``round * n_samples + sample``) of
    ``image_set``: the name a first run into an empty folder gives it."""
    return image_set.folder / f"{image_set.prefix}-{image_index:05d}.png"


def fixed_grid_path(image_set: ImageSet) -> Path:
    """``grid_folder/grid-0000.png``: the grid's name in a first run into an empty folder."""
    return image_set.grid_folder / "grid-0000.png"


def render_chunk(engine: Engine, chunk: list[ImageSet], settings: ImageSettings,
                 init_latent: torch.Tensor | None = None, *, fixed_names: bool = False) -> ImagesWritten:
    """Sample ``n_iter x n_samples`` images for each set of ``chunk`` (one call per round) and save
    them, then each set's grid. Returns the paths written; each is named in a note.

    Images are numbered after those already in their folder, or with ``fixed_names`` named by
    their index in the set (:func:`fixed_image_path`, :func:`fixed_grid_path`), so that making
    a set again gives the same names (batch jobs that retry an item)."""
    written = ImagesWritten()
    per_set: list[list[np.ndarray]] = [[] for _ in chunk]
    n_samples = settings.n_samples
    for round_index in range(settings.n_iter):
        seeds = [settings.image_seed(round_index, j) for _ in chunk for j in range(settings.n_samples)]
        conds = torch.stack([s.cond for s in chunk for _ in range(settings.n_samples)])
        images = sample_images(engine, conds, seeds, settings, init_latent)
        for index, (image, seed) in enumerate(zip(images, seeds)):
            image_set = chunk[index // n_samples]
            per_set[index // n_samples].append(image)
            if not settings.skip_save:
                path = (fixed_image_path(image_set, round_index * n_samples + index % n_samples)
                        if fixed_names else next_numbered_path(image_set.folder, image_set.prefix))
                written.images.append(save_png(image, path, {**image_set.parameters, "seed": seed}))
                log.info("wrote %s", path)
    if not settings.skip_grid:
        for image_set, images in zip(chunk, per_set):
            if len(images) > 1:
                grid = make_grid(images, settings.n_rows or settings.n_samples)
                path = (fixed_grid_path(image_set) if fixed_names
                        else next_numbered_path(image_set.grid_folder, "grid", digits=4))
                written.grids.append(save_png(grid, path, image_set.parameters))
                log.info("wrote %s", path)
    return written


# ----------------------------------------------------------------------------- txt2img / img2img

def read_text_lines(path: str | Path, what: str, hint: str) -> list[str]:
    """The lines of the UTF-8 text file ``path``, with or without a byte-order mark (as Windows
    editors save it; the mark is not part of the first line). ``what`` names the file in errors
    ("prompt list"), ``hint`` says what it should hold. Raises PromptFileError naming the line that
    is not UTF-8."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PromptFileError(f"cannot read {what} {path} ({exc.strerror or exc}): give {hint}") from None
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise PromptFileError(f"{what} {path}, line {line}: not UTF-8 text; save the file as UTF-8 "
                              f"(it should hold {hint})") from None


def read_prompts(settings: PromptImageSettings) -> list[str]:
    """--prompt, or the non-empty lines of --from-file."""
    if not settings.from_file:
        return [settings.prompt]
    lines = read_text_lines(settings.from_file, "prompt list", "one prompt per line")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise PromptFileError(f"prompt list {settings.from_file} holds no prompt: write one prompt per line")
    return prompts


def _render_prompts(engine: Engine, settings: PromptImageSettings, model: ModelSettings,
                    prompts: list[str], outdir: Path, init_latent: torch.Tensor | None = None) -> ImagesWritten:
    """Each prompt's images in OUTDIR/samples, grids in OUTDIR, as upstream."""
    samples = ensure_output_dir(outdir / "samples")
    params = run_parameters(settings, model, engine)
    written = ImagesWritten()
    for prompt in tqdm(prompts, unit="prompt", desc="rendering", dynamic_ncols=True):
        image_set = ImageSet(cond=engine.text_conditioning(prompt), parameters={**params, "prompt": prompt},
                             folder=samples, prefix="sample", grid_folder=outdir)
        written.add(render_chunk(engine, [image_set], settings, init_latent))
    log.info("%s", written.summary(len(prompts), "prompt", outdir))
    return written


def run_txt2img(settings: PromptImageSettings, model: ModelSettings) -> ImagesWritten:
    """CompVis's txt2img: OUTDIR/samples/sample-NNNNN.png per image, OUTDIR/grid-NNNN.png per prompt."""
    # Inputs and the output folder are checked before the model loads: mistakes show at once.
    prompts, outdir = read_prompts(settings), ensure_output_dir(settings.outdir)
    warn_negative_prompt_without_guidance(settings.negative_prompt, settings.scale)
    engine = load_engine(model)
    return _render_prompts(engine, settings, model, prompts, outdir)


def run_img2img(settings: PromptImageSettings, model: ModelSettings) -> ImagesWritten:
    """CompVis's img2img from ``settings.init_img`` at ``settings.strength``; outputs as txt2img."""
    init = load_init_image(settings.init_img, settings.W, settings.H)
    prompts, outdir = read_prompts(settings), ensure_output_dir(settings.outdir)
    warn_negative_prompt_without_guidance(settings.negative_prompt, settings.scale)
    why = "img2img's --init-img"
    vae = load_tiny_vae(model.vae) if model.vae else None  # a few MB: a decoder-only TAESD fails before the model
    check_can_encode(vae, why)
    engine = load_engine(model, vae=vae)
    return _render_prompts(engine, settings, model, prompts, outdir,
                           init_latent=engine.encode_image(init[None], why=why))


# ----------------------------------------------------------------------------- audio2img

def list_sounds(settings: SoundImageSettings) -> list[Path]:
    """The sound files of --prompt/--audio, --input_folder or --from-file.

    A --from-file list holds one path per line, blanks around it ignored; blank lines and lines
    whose first non-blank character is ``#`` are skipped. A ``#`` after a path is part of it (file
    names such as ``take #2.wav`` are common), so a list has no comments at the end of a line."""
    if settings.audio:
        return [Path(settings.audio)]
    if settings.input_folder:
        return sounds_in_folder(settings.input_folder)
    lines = read_text_lines(settings.from_file, "sound list", "one sound path per line")
    sounds = [Path(line) for line in (raw.strip() for raw in lines) if line and not line.startswith("#")]
    if not sounds:
        raise PromptFileError(f"sound list {settings.from_file} holds no path: write one sound path per line")
    return sounds


def readable_sounds(sounds: list[Path], skipped: list[tuple[Path, str]]
                    ) -> Iterator[tuple[int, Path, np.ndarray]]:
    """(position from 1, path, mono samples) of each sound in ``sounds`` that can be read, in order.

    A sound that cannot be read is noted (stdout: the warning that lists every skipped sound comes
    at the end, or the error when none could be read) and appended to ``skipped`` as (path,
    reason); when it is the only sound its AudioError is raised instead."""
    for number, path in enumerate(sounds, 1):
        try:
            samples = load_audio(path)
        except AudioError as exc:
            if len(sounds) == 1:
                raise
            skipped.append((path, str(exc)))
            log.info("skipping a sound: %s", exc)
            continue
        yield number, path, samples


def sound_conditioning(engine: Engine, samples: np.ndarray, settings: AudioConditioningSettings) -> torch.Tensor:
    """The (77, D) conditioning of a whole sound ``samples`` (mono, 44.1 kHz): featurize, normalize,
    mix with text."""
    features = featurize(samples, settings.feature, dim=engine.context_dim)
    text_cond = engine.text_conditioning(settings.textprompt) if settings.textprompt else None
    return condition(features, mode=settings.normalize, text_cond=text_cond,
                     empty_cond=engine.text_conditioning(""), textstrength=settings.textstrength)


def sound_image_set(engine: Engine, path: Path, samples: np.ndarray, settings: SoundImageSettings,
                    params: dict, outdir: Path) -> ImageSet:
    """The :class:`ImageSet` of one sound: its conditioning, its PNG parameters (``params`` of
    :func:`run_parameters` plus the sound's path as listed) and its folder OUTDIR/<sound name>.

    The per-sound step of :func:`run_audio2img` and of the batch workers
    (:mod:`sounddiffusion.jobs.batch_jobs`), so both make the same pictures and metadata."""
    folder = ensure_output_dir(outdir / path.stem)
    warning = sound_warning(path, len(samples), float(np.abs(samples).max(initial=0.0)))
    if warning:
        log.warning("%s", warning)
    return ImageSet(cond=sound_conditioning(engine, samples, settings),
                    parameters={**params, "sound": str(path)}, folder=folder,
                    prefix=settings.feature, grid_folder=folder)


def run_audio2img(settings: SoundImageSettings, model: ModelSettings) -> ImagesWritten:
    """One image set per sound in OUTDIR/<sound name>/FEATURE-NNNNN.png.

    With several sounds, a sound that cannot be read is reported, skipped and listed at the end
    (and in the result's ``skipped``); the run fails only when no sound could be read. Sounds are
    read one at a time."""
    sounds = list_sounds(settings)
    written = ImagesWritten()
    skipped = written.skipped
    loaded = readable_sounds(sounds, skipped)
    # The first readable sound and the output folder are checked before the model loads, so
    # that a wrong path fails at once.
    first = next(loaded, None)
    if first is None:
        raise AudioError(f"none of the {len(sounds)} sounds could be read; the first: {skipped[0][1]}")
    outdir = ensure_output_dir(settings.outdir)
    warn_negative_prompt_without_guidance(settings.negative_prompt, settings.scale)
    engine = load_engine(model)
    params = run_parameters(settings, model, engine)
    chunk: list[ImageSet] = []
    with tqdm(total=len(sounds), unit="sound", desc="rendering", dynamic_ncols=True) as bar:
        for number, path, samples in itertools.chain([first], loaded):
            chunk.append(sound_image_set(engine, path, samples, settings, params, outdir))
            if len(chunk) == settings.batch_size:
                written.add(render_chunk(engine, chunk, settings))
                chunk = []
                bar.update(number - bar.n)  # skipped sounds before this one count as done
        if chunk:
            written.add(render_chunk(engine, chunk, settings))
        bar.update(len(sounds) - bar.n)
    log.info("%s", written.summary(len(sounds) - len(skipped), "sound", outdir))
    if skipped:
        log.warning("%d of %s skipped:\n%s", len(skipped), counted(len(sounds), "sound"),
                    "\n".join(f"  {reason}" for _, reason in skipped))
    return written
