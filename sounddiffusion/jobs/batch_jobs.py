"""Batch jobs: audio2img over many sounds and audio2video over many songs, on Ray or in this process.

``audio2img.py --ray`` and ``audio2video.py --input_folder`` (with or without ``--ray``) run
here. The job lists its items (one per sound or song, keyed by :func:`~sounddiffusion.jobs.manifest.file_key`
with a digest of the settings), and a worker makes each item exactly as a single run would:

- :class:`SoundWorker` renders ``--batch_size`` sounds at a time through the same functions as
  :func:`~sounddiffusion.jobs.image_jobs.run_audio2img` (``sound_image_set`` + one ``render_chunk``
  call): the same pictures, the same PNG parameters, in OUTDIR/<sound name>/. Each sound of a
  batch keeps its own result (an unreadable one is skipped, the others are made) and its own
  manifest entry.
- :class:`SongWorker` renders one song with :func:`~sounddiffusion.video.loop.run_audio2video`,
  ``settings.audio`` replaced by the song: OUTDIR/<song name>.mp4 with the same MP4 metadata.

Each worker loads the model once (:func:`~sounddiffusion.model.loading.load_engine`) and is built by
a frozen, picklable "make worker" dataclass (:class:`MakeSoundWorker`, :class:`MakeSongWorker`)
inside its Ray actor. Seeds follow the item, never the worker.

A job's manifest, OUTDIR/manifest.jsonl, records every finished, skipped (unreadable), deferred
(a cause that may pass: a render lock held elsewhere, a leftover render with other settings) or
failed item; the same command again makes what is missing, deferred or failed. When some items
were not made, the job says so at the end and its summary lists them by kind (the tools then
exit with status 3). audio2video's ``--dry_run`` makes no video: it writes each song's schedule
report in this process, without the model, workers or manifest (:func:`dry_run_songs`).

Retries and names: Ray runs an item again when its worker process died while making it, so an
item must be safe to make twice. audio2img on Ray names its pictures by their index in the
sound (``FEATURE-00000.png`` .. and ``grid-0000.png``: what a first single-process run into an
empty folder gives) instead of numbering them after existing files, and a try starts by removing
files of those names whose parameters chunk is the item's own (an earlier, interrupted try:
the same pictures); a file of that name from another run is never replaced (the sound is
deferred, with its name in the reason). A song whose worker died continues its unfinished render
(``--resume``) instead of starting over. Sounds or songs of the same file name would share
their outputs' names and are refused up front.
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from sounddiffusion.control.music_analysis import music_request
from sounddiffusion.control.prompts import parse_prompt_file
from sounddiffusion.errors import OutputError, ParameterError, UserError
from sounddiffusion.files import ensure_output_dir
from sounddiffusion.images import load_init_image, read_png_parameters
from sounddiffusion.jobs.cluster import run_on_ray
from sounddiffusion.jobs.image_jobs import (ImageSet, fixed_grid_path, fixed_image_path, list_sounds,
                                            render_chunk, run_parameters, sound_image_set)
from sounddiffusion.jobs.manifest import Manifest, file_key, settings_digest
from sounddiffusion.jobs.outcomes import (ClusterSummary, Worker, count_result, make_batch, record_result,
                                          start_summary, takes_batches)
from sounddiffusion.logs import counted
from sounddiffusion.model.engine import Engine, warn_negative_prompt_without_guidance
from sounddiffusion.model.loading import load_engine
from sounddiffusion.model.lora_specs import LoraSpec, lora_record, parse_lora_specs
from sounddiffusion.settings import (ClusterSettings, JobSettings, ModelSettings, SoundImageSettings,
                                     VideoSettings)
from sounddiffusion.sound.audio import load_audio, sounds_in_folder
from sounddiffusion.video.loop import input_files_record, run_audio2video
from sounddiffusion.video.render_state import RenderState

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class FileItem:
    """One sound or song of a job: its manifest key and its path as listed."""

    key: str
    path: str


# ----------------------------------------------------------------------------- audio2img


@dataclass(frozen=True)
class MakeSoundWorker:
    """Picklable: builds a :class:`SoundWorker` (loading the model) in the worker's process."""

    settings: SoundImageSettings
    model: ModelSettings

    def __call__(self) -> SoundWorker:
        return SoundWorker(self.settings, self.model)


class SoundWorker:
    """audio2img for a batch of sounds at a time, with the model loaded once (or ``engine`` given)."""

    def __init__(self, settings: SoundImageSettings, model: ModelSettings, engine: Engine | None = None):
        self.settings = settings
        self.engine = engine or load_engine(model)
        self.params = run_parameters(settings, model, self.engine)
        self.outdir = ensure_output_dir(settings.outdir)

    def process(self, item: FileItem) -> list[str]:
        """Render the sound at ``item.path``; returns the PNGs written. AudioError: unreadable."""
        [(outputs, error)] = self.process_batch([item])
        if error is not None:
            raise error
        return outputs

    def process_batch(self, items: Sequence[FileItem]) -> list[tuple[list[str], Exception | None]]:
        """Render the sounds of ``items`` in one ``render_chunk`` call (``n_samples`` pictures of
        each per sampling call); per item (the PNGs written, None), or ([], the exception) for a
        sound that cannot be read or made (an unreadable sound: AudioError, its item is skipped)."""
        results: list[tuple[list[str], Exception | None]] = [([], None)] * len(items)
        sets: dict[int, ImageSet] = {}
        for index, item in enumerate(items):
            path = Path(item.path)
            try:
                image_set = sound_image_set(self.engine, path, load_audio(path), self.settings,
                                            self.params, self.outdir)
                clear_earlier_try(image_set, self.settings)
            except UserError as exc:
                results[index] = ([], exc)
                continue
            sets[index] = image_set
        if not sets:
            return results
        try:
            written = render_chunk(self.engine, list(sets.values()), self.settings, fixed_names=True)
        except Exception as exc:  # noqa: BLE001 - recorded as the failure of these sounds only
            return [([], exc) if index in sets else result for index, result in enumerate(results)]
        for index, image_set in sets.items():
            folders = {image_set.folder, image_set.grid_folder}
            results[index] = ([str(p) for p in written.images + written.grids if p.parent in folders], None)
        return results


def planned_pictures(image_set: ImageSet, settings: SoundImageSettings) -> list[tuple[Path, dict]]:
    """(fixed name, parameters chunk) of every PNG ``render_chunk(..., fixed_names=True)`` writes."""
    planned = []
    if not settings.skip_save:
        for r in range(settings.n_iter):
            for j in range(settings.n_samples):
                planned.append((fixed_image_path(image_set, r * settings.n_samples + j),
                                {**image_set.parameters, "seed": settings.image_seed(r, j)}))
    if not settings.skip_grid and settings.n_iter * settings.n_samples > 1:
        planned.append((fixed_grid_path(image_set), image_set.parameters))
    return planned


def clear_earlier_try(image_set: ImageSet, settings: SoundImageSettings) -> None:
    """Remove the item's PNGs left by an earlier try (same names, same parameters chunk).

    Raises :class:`OutputError` when a file of one of those names holds another picture."""
    for path, parameters in planned_pictures(image_set, settings):
        if not path.exists():
            continue
        try:
            found = read_png_parameters(path)
        except ParameterError:
            found = None
        if found != json.loads(json.dumps(parameters)):
            raise OutputError(f"{path} exists from another run: not replacing it; give another "
                              f"--outdir or move the file away")
        path.unlink()


def run_audio2img_batch(settings: SoundImageSettings, model: ModelSettings) -> ClusterSummary:
    """audio2img's sounds (--input_folder, --from-file, --audio) on Ray (``settings.ray``).

    Returns the job's summary; its ``problems`` are the sounds skipped or failed."""
    sounds = list_sounds(settings)
    refuse_same_names(sounds, "sound", "OUTDIR/<sound name>/")
    loras = parse_lora_specs(model.lora)  # a bad --lora fails here, not in every worker
    outdir = ensure_output_dir(settings.outdir)
    warn_negative_prompt_without_guidance(settings.negative_prompt, settings.scale)
    items = file_items(sounds, settings, model, loras)
    return run_items(items, MakeSoundWorker(settings, model), settings,
                     manifest=Manifest(outdir / MANIFEST_NAME), unit="sound", batch_size=settings.batch_size)


# ----------------------------------------------------------------------------- audio2video


@dataclass(frozen=True)
class MakeSongWorker:
    """Picklable: builds a :class:`SongWorker` (loading the model) in the worker's process."""

    settings: VideoSettings
    model: ModelSettings

    def __call__(self) -> SongWorker:
        return SongWorker(self.settings, self.model)


class SongWorker:
    """audio2video for one song at a time, with the model loaded once (or ``engine`` given)."""

    def __init__(self, settings: VideoSettings, model: ModelSettings, engine: Engine | None = None):
        self.settings, self.model = settings, model
        self.engine = engine or load_engine(model, loras=parse_lora_specs(model.lora, schedules=True))

    def process(self, item: FileItem) -> list[str]:
        """Render the video of the song at ``item.path``; returns [the MP4's path]."""
        song = song_settings(self.settings, item.path)
        # A render left unfinished (its worker died, or Ctrl-C) continues where it stopped.
        unfinished = RenderState(song.requested_output()).folder.is_dir()
        song = replace(song, resume=unfinished)
        return [str(run_audio2video(song, self.model, engine=self.engine))]


def song_settings(settings: VideoSettings, song: str | Path) -> VideoSettings:
    """A folder job's ``settings`` for one ``song``: what ``--path SONG`` gives (OUTDIR/<song name>.mp4)."""
    return replace(settings, audio=str(song), input_folder=None, output=None)


def list_songs(settings: VideoSettings) -> list[Path]:
    """The songs of --input_folder, or [--path]."""
    if not settings.input_folder:
        return [Path(settings.audio)]
    return sounds_in_folder(settings.input_folder, "songs")


def run_audio2video_batch(settings: VideoSettings, model: ModelSettings) -> ClusterSummary:
    """One video per song of --input_folder (or --path), on Ray with ``settings.ray``, else here.

    Returns the job's summary; its ``problems`` are the songs skipped or failed."""
    if settings.output:
        raise ParameterError(f"--output {settings.output} names one video: with --input_folder "
                             f"each song's video goes to OUTDIR/<song name>.mp4; give --outdir")
    if settings.control and settings.input_folder:
        raise ParameterError(f"--control {settings.control[0]} belongs to one song, not to each song of "
                             f"--input_folder: render that song with --path")
    # --bpm, --sections, --prompt_file, --init-img ... are one line before anything loads, not a skip per song
    music_request(settings)
    if settings.prompt_file:
        parse_prompt_file(settings.prompt_file)
    if settings.init_img:
        load_init_image(settings.init_img, settings.W, settings.H)
    songs = list_songs(settings)
    refuse_same_names(songs, "song", "OUTDIR/<song name>.mp4")
    loras = parse_lora_specs(model.lora, schedules=True)
    outdir = ensure_output_dir(settings.outdir)
    if settings.dry_run:
        return dry_run_songs(songs, settings, model)
    items = file_items(songs, settings, model, loras, files=input_files_record(settings))
    return run_items(items, MakeSongWorker(settings, model), settings,
                     manifest=Manifest(outdir / MANIFEST_NAME), unit="song")


def dry_run_songs(songs: Sequence[Path], settings: VideoSettings, model: ModelSettings) -> ClusterSummary:
    """``--dry_run`` over many songs: each song's OUTDIR/<song name>.schedule.csv (and ``--plot``),
    one after another in this process (``--ray`` is not needed for that), without the model and
    without the manifest, since no video is made: the same command without ``--dry_run`` then
    renders every song. A song that cannot be read is reported (the summary's ``problems``)."""
    started = time.monotonic()
    summary = ClusterSummary(total=len(songs))
    worker = SongSchedule(settings, model)
    for song in songs:
        [result] = make_batch(worker, [FileItem(key=str(song), path=str(song))])
        count_result(summary, str(song), result, "dry run")
    summary.seconds = time.monotonic() - started
    (log.warning if summary.problems else log.info)(
        "dry run: the schedules of %s of %s written in %s; no video made and nothing recorded in %s: "
        "the same command without --dry_run renders them", summary.finished, counted(summary.total, "song"),
        settings.outdir, MANIFEST_NAME)
    return summary


@dataclass(frozen=True)
class SongSchedule:
    """``--dry_run``'s worker: a song's schedule report (NAME.schedule.csv), without the model."""

    settings: VideoSettings
    model: ModelSettings

    def process(self, item: FileItem) -> list[str]:
        return [str(run_audio2video(song_settings(self.settings, item.path), self.model))]


# ----------------------------------------------------------------------------- shared


def file_items(paths: Sequence[Path], settings: JobSettings, model: ModelSettings,
               loras: Sequence[LoraSpec] = (), files: dict | None = None) -> list[FileItem]:
    """One item per path, keyed by the file and the settings that change the outputs (the LoRA
    files by content and weight, as the outputs record them; ``files``: the other input files
    by content, :func:`~sounddiffusion.video.loop.input_files_record`; those not given stay out, so
    that a job without them keeps the keys it had before they were recorded)."""
    given = {name: record for name, record in (files or {}).items() if record is not None}
    digest = settings_digest({**settings.parameters(), **model.parameters(),
                              "lora": lora_record(loras), **given})
    return [FileItem(key=file_key(path, settings=digest), path=str(path)) for path in paths]


def refuse_same_names(paths: Sequence[Path], what: str, where: str) -> None:
    """ParameterError when two of ``paths`` share a file name stem (their outputs would clash)."""
    by_stem: dict[str, list[Path]] = collections.defaultdict(list)
    for path in paths:
        by_stem[path.stem].append(path)
    clashes = [group for group in by_stem.values() if len(group) > 1]
    if clashes:
        first, second = clashes[0][:2]
        raise ParameterError(f"{what}s {first} and {second} would both write {where} ({len(clashes)} such name(s)): "
                             f"rename one or make them in separate runs")


def run_items(items: list[FileItem], make_worker: Callable[[], Worker], settings: ClusterSettings, *,
              manifest: Manifest, unit: str, batch_size: int = 1) -> ClusterSummary:
    """Make ``items`` on Ray (``settings.ray``: "local" or an address) or in this process, up to
    ``batch_size`` per call of a worker that takes batches, and log the summary (a warning when
    some were skipped or failed: the caller's exit status says so)."""
    if settings.ray is not None:
        address = None if settings.ray == "local" else settings.ray
        summary = run_on_ray(items, make_worker, address=address, workers=settings.ray_workers,
                             manifest=manifest, desc="rendering", unit=unit, batch_size=batch_size)
    else:
        summary = run_in_process(items, make_worker, manifest=manifest, unit=unit, batch_size=batch_size)
    (log.warning if summary.problems else log.info)("%s\nmanifest: %s", summary.report(unit), manifest.path)
    if summary.problems:
        again = len(summary.deferred) + len(summary.failed)
        log.warning("%d of %s not made (listed above and in %s); the same command tries the %d "
                    "deferred or failed again", len(summary.problems), counted(summary.total, unit),
                    manifest.path, again)
    return summary


def run_in_process(items: list[FileItem], make_worker: Callable[[], Worker], *, manifest: Manifest,
                   unit: str, batch_size: int = 1) -> ClusterSummary:
    """:func:`~sounddiffusion.jobs.cluster.run_on_ray`'s work in this process, one batch after another
    (``batch_size`` items for a worker that takes batches, else one): the same manifest and
    summary; the worker is built only when something is left to make."""
    started = time.monotonic()
    todo, summary = start_summary(manifest, items)
    label = f"local@{socket.gethostname()}"
    worker = make_worker() if todo else None
    size = batch_size if worker is not None and takes_batches(worker) else 1
    try:
        with tqdm(total=len(todo), unit=unit, desc="rendering", dynamic_ncols=True) as bar:
            for first in range(0, len(todo), size):
                batch = todo[first:first + size]
                for item, result in zip(batch, make_batch(worker, batch)):
                    record_result(manifest, summary, item.key, result, label)
                    bar.update(1)
    except KeyboardInterrupt:
        done = summary.already_done + summary.finished
        raise KeyboardInterrupt(f"{done} of {counted(summary.total, unit)} are done (manifest {manifest.path}); "
                                f"run the same command again to make the rest") from None
    summary.seconds = time.monotonic() - started
    return summary
