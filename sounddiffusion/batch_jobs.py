"""Batch jobs: audio2img over many sounds and audio2video over many songs, on Ray or in this process.

``audio2img.py --ray`` and ``audio2video.py --input_folder`` (with or without ``--ray``) run
here. The job lists its items (one per sound or song, keyed by :func:`~sounddiffusion.manifest.file_key`
with a digest of the settings), and a worker makes each item exactly as a single run would:

- :class:`SoundWorker` renders one sound through the same functions as
  :func:`~sounddiffusion.image_jobs.run_audio2img` (``sound_image_set`` + ``render_chunk``): the
  same pictures, the same PNG parameters, in OUTDIR/<sound name>/.
- :class:`SongWorker` renders one song with :func:`~sounddiffusion.video_job.run_audio2video`,
  ``settings.audio`` replaced by the song: OUTDIR/<song name>.mp4 with the same MP4 metadata.

Each worker loads the model once (:func:`~sounddiffusion.loading.load_engine`) and is built by
a frozen, picklable "make worker" dataclass (:class:`MakeSoundWorker`, :class:`MakeSongWorker`)
inside its Ray actor. Seeds follow the item, never the worker.

A job's manifest, OUTDIR/manifest.jsonl, records every finished, skipped (unreadable) or failed
item; the same command again makes only what is missing. When some items were skipped or
failed, the job says so at the end and its summary lists them (the tools then exit with status 3).

Retries and names: Ray runs an item again when its worker process died while making it, so an
item must be safe to make twice. audio2img on Ray names its pictures by their index in the
sound (``FEATURE-00000.png`` .. and ``grid-0000.png``: what a first single-process run into an
empty folder gives) instead of numbering them after existing files, and a try starts by removing
files of those names whose parameters chunk is the item's own (an earlier, interrupted try:
the same pictures); a file of that name from another run is never replaced (the sound is
skipped, with its name in the reason). A song whose worker died continues its unfinished render
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

from .audio import AUDIO_EXTENSIONS, find_audio_files, load_audio
from .cluster import ClusterSummary, Worker, run_on_ray
from .engine import Engine
from .errors import AudioError, OutputError, ParameterError, UserError
from .files import ensure_output_dir
from .image_jobs import (ImageSet, fixed_grid_path, fixed_image_path, list_sounds, render_chunk,
                         run_parameters, sound_image_set)
from .images import read_png_parameters
from .loading import load_engine
from .manifest import FAILED, FINISHED, SKIPPED, Manifest, file_key, settings_digest
from .render_state import RenderState
from .settings import ClusterSettings, JobSettings, ModelSettings, SoundImageSettings, VideoSettings

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
    """audio2img for one sound at a time, with the model loaded once (or ``engine`` given)."""

    def __init__(self, settings: SoundImageSettings, model: ModelSettings, engine: Engine | None = None):
        self.settings = settings
        self.engine = engine or load_engine(model)
        self.params = run_parameters(settings, model, self.engine)
        self.outdir = ensure_output_dir(settings.outdir)

    def process(self, item: FileItem) -> list[str]:
        """Render the sound at ``item.path``; returns the PNGs written. AudioError: unreadable."""
        path = Path(item.path)
        image_set = sound_image_set(self.engine, path, load_audio(path), self.settings, self.params,
                                    self.outdir)
        clear_earlier_try(image_set, self.settings)
        written = render_chunk(self.engine, [image_set], self.settings, fixed_names=True)
        return [str(p) for p in written]


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
    outdir = ensure_output_dir(settings.outdir)
    items = file_items(sounds, settings, model)
    return run_items(items, MakeSoundWorker(settings, model), settings,
                     manifest=Manifest(outdir / MANIFEST_NAME), unit="sound")


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
        self.engine = engine or load_engine(model)

    def process(self, item: FileItem) -> list[str]:
        """Render the video of the song at ``item.path``; returns [the MP4's path]."""
        from .video_job import run_audio2video

        song = replace(self.settings, audio=item.path, input_folder=None, output=None)
        # A render left unfinished (its worker died, or Ctrl-C) continues where it stopped.
        unfinished = RenderState(song.requested_output()).folder.is_dir()
        song = replace(song, resume=unfinished)
        return [str(run_audio2video(song, self.model, engine=self.engine))]


def list_songs(settings: VideoSettings) -> list[Path]:
    """The songs of --input_folder, or [--path]."""
    if not settings.input_folder:
        return [Path(settings.audio)]
    folder = Path(settings.input_folder)
    if not folder.is_dir():
        raise AudioError(f"--input_folder {folder} is not a folder: give a folder of songs")
    songs = find_audio_files(folder)
    if not songs:
        raise AudioError(f"--input_folder {folder} holds no sound files "
                         f"(looked for {', '.join(sorted(AUDIO_EXTENSIONS))})")
    return songs


def run_audio2video_batch(settings: VideoSettings, model: ModelSettings) -> ClusterSummary:
    """One video per song of --input_folder (or --path), on Ray with ``settings.ray``, else here.

    Returns the job's summary; its ``problems`` are the songs skipped or failed."""
    if settings.output:
        raise ParameterError(f"--output {settings.output} names one video: with --input_folder "
                             f"each song's video goes to OUTDIR/<song name>.mp4; give --outdir")
    songs = list_songs(settings)
    refuse_same_names(songs, "song", "OUTDIR/<song name>.mp4")
    outdir = ensure_output_dir(settings.outdir)
    items = file_items(songs, settings, model)
    return run_items(items, MakeSongWorker(settings, model), settings,
                     manifest=Manifest(outdir / MANIFEST_NAME), unit="song")


# ----------------------------------------------------------------------------- shared


def file_items(paths: Sequence[Path], settings: JobSettings, model: ModelSettings) -> list[FileItem]:
    """One item per path, keyed by the file and the settings that change the outputs."""
    digest = settings_digest({**settings.parameters(), **model.parameters()})
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
              manifest: Manifest, unit: str) -> ClusterSummary:
    """Make ``items`` on Ray (``settings.ray``: "local" or an address) or in this process and log
    the summary (a warning when some were skipped or failed: the caller's exit status says so)."""
    if settings.ray is not None:
        address = None if settings.ray == "local" else settings.ray
        summary = run_on_ray(items, make_worker, address=address, workers=settings.ray_workers,
                             manifest=manifest, desc="rendering", unit=unit)
    else:
        summary = run_in_process(items, make_worker, manifest=manifest, unit=unit)
    (log.warning if summary.problems else log.info)("%s\nmanifest: %s", summary.report(unit), manifest.path)
    if summary.problems:
        log.warning("%d of %d %ss skipped or failed (listed above and in %s); failed ones run again "
                    "with the same command", len(summary.problems), summary.total, unit, manifest.path)
    return summary


def run_in_process(items: list[FileItem], make_worker: Callable[[], Worker], *, manifest: Manifest,
                   unit: str) -> ClusterSummary:
    """:func:`~sounddiffusion.cluster.run_on_ray`'s work in this process, one item after another:
    the same manifest and summary; the worker is built only when something is left to make."""
    started = time.monotonic()
    plan = manifest.plan(items)
    summary = ClusterSummary(total=len(plan.todo) + len(plan.done), already_done=len(plan.done),
                             skipped_earlier=[(k, e["error"] or "") for k, e in plan.skipped.items()])
    label = f"local@{socket.gethostname()}"
    worker = make_worker() if plan.todo else None
    try:
        for item in tqdm(plan.todo, unit=unit, desc="rendering", dynamic_ncols=True):
            item_started = time.perf_counter()
            try:
                outputs, status, error = worker.process(item), FINISHED, None
            except UserError as exc:
                outputs, status, error = [], SKIPPED, str(exc)
            except Exception as exc:  # noqa: BLE001 - one item's failure does not end the job
                log.exception("%s failed", item.key)
                outputs, status, error = [], FAILED, f"{type(exc).__name__}: {exc}"
            manifest.record(item.key, status, outputs, label, error,
                            seconds=time.perf_counter() - item_started)
            if status == FINISHED:
                summary.finished += 1
                summary.per_worker[label] = summary.per_worker.get(label, 0) + 1
            else:
                (summary.skipped if status == SKIPPED else summary.failed).append((item.key, error))
                log.warning("%s %s: %s", status, item.key, error)
    except KeyboardInterrupt:
        done = summary.already_done + summary.finished
        raise KeyboardInterrupt(f"{done} of {summary.total} {unit}s are done (manifest {manifest.path}); "
                                f"run the same command again to make the rest") from None
    summary.seconds = time.monotonic() - started
    return summary
