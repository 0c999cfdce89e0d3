"""Batch jobs on Ray: one actor per worker loads the model once and takes the job's items.

:func:`run_on_ray` hands the items of a job (sounds, songs) out to a pool of Ray actors, one per
worker (one per GPU by default), records every result in a :class:`~sounddiffusion.jobs.manifest.Manifest`
as it arrives and shows one progress bar for the whole job.

- An *item* is a small picklable object with a stable string ``key`` and whatever its worker
  needs (a path, a seed). A *worker* is any object with ``process(item) -> list of output
  paths``; ``make_worker()`` (a picklable callable) builds it once per actor, in the actor's
  process. Workers write their outputs themselves, straight into the output folder (on a
  cluster: a path every node sees); the driver writes the manifest.
- Batches: a worker that also has ``process_batch(items) -> [(output paths, error or None)]``
  (one pair per item, in order) gets up to ``batch_size`` items per call; other workers get
  one item at a time. Every item is still recorded on its own line of the manifest, so an
  unreadable sound in a batch is skipped and the others finish.
- Batches are handed out as workers finish (at most :data:`IN_FLIGHT` queued per actor, one while
  another is still starting). What a worker computes depends on the item only (seeds follow the
  item, not the worker or the batch), so any worker gives the same outputs.
- A worker that raises (or, in a batch, returns) :class:`~sounddiffusion.errors.UserError`
  gets its item recorded as skipped (the input is at fault: an unreadable sound) or deferred
  (the cause may pass: a render lock held elsewhere; it runs again on the next run), with the
  reason; any other exception records it as failed (it runs again on the next run); see
  :mod:`sounddiffusion.jobs.outcomes`. A worker process that dies
  (killed, out of memory) is restarted by Ray and its whole batch runs again; after
  :data:`TASK_RETRIES` retries every item of the batch is recorded as failed.
- Ctrl-C stops handing out items, cancels the queued ones and shuts the workers down; what is
  finished stays in the manifest.

Ray is an optional dependency (``requirements-cluster.txt``), imported only here.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

from sounddiffusion.errors import ParameterError, UserError
from sounddiffusion.jobs.manifest import FAILED, Keyed, Manifest
from sounddiffusion.jobs.outcomes import (ClusterSummary, ItemResult, Worker, make_batch, record_result,
                                          start_summary, takes_batches)
from sounddiffusion.logs import counted
from sounddiffusion.settings import REPO

log = logging.getLogger(__name__)
IN_FLIGHT = 2        # items queued per actor: the next one starts as soon as one finishes
ACTOR_RESTARTS = 4   # restarts of a worker process that died, per actor
TASK_RETRIES = 2     # reruns of an item whose worker process died while making it
WAIT_NOTE_S = 60.0   # a note when no worker has started after this long


class ClusterError(UserError):
    """The Ray job cannot go on: Ray is missing, the cluster cannot be reached, no worker runs."""


def import_ray():
    """The ``ray`` module, or :class:`ClusterError` saying how to install it."""
    try:
        import ray
    except ModuleNotFoundError:
        raise ClusterError("Ray is not installed: pip install -r requirements-cluster.txt") from None
    return ray


class WorkerHost:
    """The Ray actor around one worker: builds it lazily (again after a restart) and turns its
    outcome into plain values, so no exception of the worker has to travel through Ray."""

    def __init__(self, make_worker: Callable[[], Worker]):
        self._make_worker = make_worker
        self._worker: Worker | None = None

    def _get(self) -> Worker:
        if self._worker is None:
            self._worker = self._make_worker()
        return self._worker

    def start(self) -> tuple[str | None, str, bool]:
        """Build the worker: (None, host name, whether it takes batches) when ready, (error
        message, host name, False) when ``make_worker`` raised a UserError (a missing checkpoint)."""
        try:
            worker = self._get()
        except UserError as exc:
            return str(exc), socket.gethostname(), False
        except SystemExit as exc:  # e.g. argparse in make_worker: not a reason to restart
            return f"the worker exited with status {exc.code}", socket.gethostname(), False
        return None, socket.gethostname(), takes_batches(worker)

    def process_batch(self, items: list[Keyed]) -> list[ItemResult]:
        """(status, output paths, reason, seconds) of every item; see :func:`make_batch`."""
        try:
            worker = self._get()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - reported as these items' failure
            return [(FAILED, [], f"the worker could not start: {exc}", 0.0) for _ in items]
        return make_batch(worker, items)


def run_on_ray(items: Sequence[Keyed], make_worker: Callable[[], Worker], *, address: str | None,
               workers: int | None, manifest: Manifest, desc: str, unit: str = "item",
               batch_size: int = 1) -> ClusterSummary:
    """Make every item of ``items`` not yet settled in ``manifest`` on a pool of Ray workers.

    ``address``: None starts a local Ray instance on this machine; ``"auto"`` or
    ``"ray://HOST:PORT"`` connects to a running cluster (when Ray is already initialized in
    this process, that instance is used and left running). ``workers``: the number of actors,
    default one per GPU of the cluster, else one. ``batch_size``: items per call of a worker
    that takes batches (see :class:`Worker`). ``desc``/``unit`` label the progress bar.

    Returns the :class:`ClusterSummary`. Raises :class:`ClusterError` when Ray is missing, the
    cluster cannot be reached or every worker died, :class:`ParameterError` for a bad
    ``workers`` or ``batch_size``, a worker's UserError when it cannot start, and
    KeyboardInterrupt (saying how many items are done) on Ctrl-C."""
    started = time.monotonic()
    if batch_size < 1:
        raise ParameterError(f"batch size {batch_size}: give at least 1")
    ray = import_ray()
    todo, summary = start_summary(manifest, items)
    if todo:
        log.info("%d of %s to make (%d done before; manifest %s)", len(todo),
                 counted(summary.total, unit), summary.already_done, manifest.path)
        owns_ray = not ray.is_initialized()
        if owns_ray:
            connect(ray, address)
        try:
            _Job(ray, todo, make_worker, workers, manifest, summary, desc, unit, batch_size).run()
        finally:
            if owns_ray:
                ray.shutdown()
    summary.seconds = time.monotonic() - started
    return summary


def connect(ray, address: str | None) -> None:
    """Start a local Ray instance (``address`` None) or connect to a cluster, quietly.

    Workers find this checkout's packages through PYTHONPATH (on a cluster every node must see
    the checkout at the same path, like the outputs)."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    common = dict(logging_level=logging.WARNING, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        if address is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            ray.init(num_cpus=cpus or 1, include_dashboard=False, **common)
        else:
            ray.init(address=address, **common)
    except ModuleNotFoundError as exc:  # ray:// needs Ray's client extras (grpcio)
        raise ClusterError(f"connecting to {address} needs {exc.name}: "
                           f"pip install -r requirements-cluster.txt") from None
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise ClusterError(f"cannot start or reach {where} ({' '.join(str(exc).split())[:200]}): "
                           f"check the address and that the cluster runs (ray status)") from None


def actor_options(resources: dict, workers: int | None) -> tuple[int, dict]:
    """(number of workers, Ray actor options) for a cluster with ``resources``
    (``ray.cluster_resources()``): one GPU per worker when there are GPUs, else an equal share
    of the CPUs (whole CPUs when there are enough)."""
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    count = workers if workers is not None else max(1, gpus)
    if count < 1:
        raise ParameterError(f"{count} Ray workers: give at least 1")
    options = dict(max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES)
    if gpus:
        if count > gpus:
            raise ParameterError(f"{count} Ray workers but the cluster has {gpus} GPUs: "
                                 f"give at most {gpus} workers")
        return count, {**options, "num_gpus": 1, "num_cpus": 1}
    share = cpus / count
    return count, {**options, "num_cpus": max(1, int(share)) if share >= 1 else share}


class _Job:
    """The driver's loop of one :func:`run_on_ray` call."""

    def __init__(self, ray, todo: list, make_worker, workers: int | None, manifest: Manifest,
                 summary: ClusterSummary, desc: str, unit: str, batch_size: int):
        self.ray, self.manifest, self.summary, self.unit = ray, manifest, summary, unit
        self.queue = collections.deque(todo)
        self.batch_size = batch_size
        count, options = actor_options(ray.cluster_resources(), workers)
        log.info("starting %d Ray workers (%s)", count,
                 ", ".join(f"{k}={v}" for k, v in options.items() if k.startswith("num_")))
        host_class = ray.remote(WorkerHost).options(**options)
        self.actors = {f"worker-{i + 1}": host_class.remote(make_worker) for i in range(count)}
        self.starting = {actor.start.remote(): name for name, actor in self.actors.items()}
        self.labels: dict[str, str] = {}  # worker name -> "worker-1@host", once started
        self.ready: set[str] = set()
        self.batching: set[str] = set()  # the ready workers that take batches
        self.in_flight: dict[Any, tuple[str, list[Keyed]]] = {}
        self.load = collections.Counter()
        self.bar = tqdm(total=summary.total, initial=summary.already_done, desc=desc, unit=unit,
                        dynamic_ncols=True, smoothing=0.1)

    def run(self) -> None:
        try:
            self._loop()
        except KeyboardInterrupt:
            self._cancel()
            done = self.summary.already_done + self.summary.finished
            raise KeyboardInterrupt(f"{done} of {counted(self.summary.total, self.unit)} are done "
                                    f"(manifest {self.manifest.path}); run the same command "
                                    f"again to make the rest") from None
        finally:
            self.bar.close()
            for actor in self.actors.values():
                self.ray.kill(actor)

    def _loop(self) -> None:
        waiting_since = time.monotonic()
        while self.queue or self.in_flight:
            if not self.ready and not self.starting:
                left = counted(len(self.queue) + len(self.in_flight), self.unit)
                raise ClusterError(f"every Ray worker died; {left} left: run the same command again to make them")
            self._hand_out()
            done, _ = self.ray.wait([*self.starting, *self.in_flight], num_returns=1, timeout=5.0)
            if not done:
                if not self.ready and time.monotonic() - waiting_since > WAIT_NOTE_S:
                    log.warning("no Ray worker has started after %.0f s: does the cluster have a "
                                "free GPU/CPU per worker? (ray status)", time.monotonic() - waiting_since)
                    waiting_since = time.monotonic()
                continue
            ref = done[0]
            if ref in self.starting:
                self._started(ref, self.starting.pop(ref))
            else:
                name, batch = self.in_flight.pop(ref)
                self.load[name] -= 1
                self._finished(ref, name, batch)

    def _hand_out(self) -> None:
        """Queue batches on the ready workers until each has IN_FLIGHT (one while another worker
        is still starting), least loaded first; a batch is ``batch_size`` items for a worker
        that takes batches, else one."""
        limit = 1 if self.starting else IN_FLIGHT
        while self.queue and self.ready:
            name = min(self.ready, key=lambda n: (self.load[n], n))
            if self.load[name] >= limit:
                return
            size = self.batch_size if name in self.batching else 1
            batch = [self.queue.popleft() for _ in range(min(size, len(self.queue)))]
            self.in_flight[self.actors[name].process_batch.remote(batch)] = (name, batch)
            self.load[name] += 1

    def _started(self, ref, name: str) -> None:
        try:
            error, host, batches = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            log.warning("%s died while starting and is not used: %s", name, _first_line(exc))
            return
        if error is not None:
            raise ClusterError(f"a Ray worker could not start: {error}")
        self.labels[name] = f"{name}@{host}"
        self.ready.add(name)
        if batches:
            self.batching.add(name)

    def _finished(self, ref, name: str, batch: list[Keyed]) -> None:
        """Record every item of a finished (or given up) batch, each once."""
        label = self.labels.get(name, name)
        try:
            results = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            # Ray restarted the process and ran the batch again TASK_RETRIES times: give up on
            # it, and check whether the worker still lives before handing it more.
            error = f"its worker process died {TASK_RETRIES + 1} times while making it ({_first_line(exc)})"
            results = [(FAILED, [], error, None)] * len(batch)
            self.ready.discard(name)
            self.batching.discard(name)
            self.starting[self.actors[name].start.remote()] = name
        except self.ray.exceptions.TaskCancelledError:
            return
        for item, result in zip(batch, results):
            record_result(self.manifest, self.summary, item.key, result, label)
            self.bar.update(1)

    def _cancel(self) -> None:
        """Ctrl-C: nothing more is handed out; queued and running items are cancelled."""
        self.queue.clear()
        for ref in self.in_flight:
            try:
                self.ray.cancel(ref)
            except Exception:  # noqa: BLE001 - the actors are killed next anyway
                pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
