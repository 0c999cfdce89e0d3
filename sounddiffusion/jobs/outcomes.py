"""What becomes of a batch job's items, on Ray or in this process: a worker's results as manifest
statuses, and the job's summary.

A *worker* is any object with ``process(item) -> list of output paths``; one that also has
``process_batch(items) -> [(output paths, error or None)]`` (one pair per item, in order) takes
batches. :func:`make_batch` turns what the worker did into one status per item:

- ``finished``: the outputs were made;
- ``skipped``: a :class:`~sounddiffusion.errors.UserError` whose ``permanent`` is True, the input
  itself is at fault (a file that is not a sound): not tried again until the input changes;
- ``deferred``: any other UserError, whose cause may pass or lies outside the input (a render
  lock held by another process, a leftover render with other settings, a full disk): tried
  again on the next run;
- ``failed``: an unexpected exception (logged with its traceback): tried again on the next run.

:func:`record_result` writes each item's line of the manifest and counts it in the
:class:`ClusterSummary`, whose :meth:`~ClusterSummary.report` ends the job.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sounddiffusion.errors import UserError
from sounddiffusion.jobs.manifest import DEFERRED, FAILED, FINISHED, Keyed, Manifest, SKIPPED
from sounddiffusion.logs import counted

log = logging.getLogger(__name__)


class Worker(Protocol):
    """What ``make_worker()`` returns: makes one item's outputs and returns their paths.

    It may also have ``process_batch(items) -> [(output paths, None) or ([], exception)]``,
    one pair per item in order (a UserError: that item is skipped or deferred): it then gets batches."""

    def process(self, item: Any) -> list[str]: ...


ItemResult = tuple[str, list[str], "str | None", float]  # (status, output paths, reason, seconds)


@dataclass
class ClusterSummary:
    """What a job did. ``total`` items, of which ``already_done`` were settled by an earlier run
    (their skipped ones in ``skipped_earlier``), ``finished`` made now; ``skipped``,
    ``deferred`` and ``failed`` list (key, reason) of this run; ``per_worker`` the items each
    worker finished; ``seconds`` the wall time of this run."""

    total: int
    already_done: int = 0
    finished: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    skipped_earlier: list[tuple[str, str]] = field(default_factory=list)
    deferred: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    per_worker: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def items_per_second(self) -> float:
        """Items finished now per second of wall time (0 when nothing ran)."""
        return self.finished / self.seconds if self.seconds > 0 else 0.0

    @property
    def problems(self) -> list[tuple[str, str]]:
        """(key, reason) of every item that is not made: skipped now or before, deferred, failed."""
        return self.skipped + self.skipped_earlier + self.deferred + self.failed

    def report(self, unit: str = "item") -> str:
        """Lines for the end of a job: counts, per-worker counts, then the skipped, deferred and
        failed items, each group saying whether the next run tries them again."""
        lines = [f"{counted(self.finished, unit)} made in {self.seconds:.1f} s "
                 f"({self.items_per_second:.2f}/s), {self.already_done} done before, "
                 f"{len(self.skipped)} skipped, {len(self.deferred)} deferred, "
                 f"{len(self.failed)} failed, of {self.total}"]
        lines += [f"  {name}: {counted(count, unit)}" for name, count in sorted(self.per_worker.items())]
        groups = (("skipped (the input cannot be made; not tried again until it changes)",
                   self.skipped + self.skipped_earlier),
                  ("deferred (tried again on the next run)", self.deferred),
                  ("failed (tried again on the next run)", self.failed))
        for title, pairs in groups:
            if pairs:
                lines.append(f"{counted(len(pairs), unit)} {title}:")
                lines += [f"  {reason}" if key in reason else f"  {key}: {reason}" for key, reason in pairs]
        return "\n".join(lines)


def takes_batches(worker: Worker) -> bool:
    """True when ``worker`` has a ``process_batch`` method (see :class:`Worker`)."""
    return callable(getattr(worker, "process_batch", None))


def make_batch(worker: Worker, items: Sequence[Keyed]) -> list[ItemResult]:
    """Make ``items`` with ``worker``: one ``process_batch`` call when it takes batches, else
    ``process`` per item. Returns (status, output paths, reason, seconds) per item, in order:
    FINISHED, SKIPPED (a permanent UserError: its message), DEFERRED (another UserError: its
    message) or FAILED (another exception: its type and message). The call's seconds are shared
    out equally among its items."""
    started = time.perf_counter()
    try:
        if takes_batches(worker):
            pairs = list(worker.process_batch(list(items)))
        else:
            pairs = [_process_one(worker, item) for item in items]
        if len(pairs) != len(items):
            raise RuntimeError(f"process_batch gave {len(pairs)} results for {len(items)} items")
        outcomes = [_outcome(item, [os.fspath(p) for p in outputs], error)
                    for item, (outputs, error) in zip(items, pairs)]
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the batch's failure does not end the job
        outcomes = [_outcome(item, [], exc) for item in items]
    share = (time.perf_counter() - started) / max(1, len(items))
    return [(*outcome, share) for outcome in outcomes]


def _process_one(worker: Worker, item: Keyed) -> tuple[list[str], BaseException | None]:
    try:
        return worker.process(item), None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - one item's failure does not end the job
        return [], exc


def _outcome(item: Keyed, outputs: list[str], error: BaseException | None) -> tuple[str, list[str], str | None]:
    if error is None:
        return FINISHED, outputs, None
    if isinstance(error, UserError):
        return (SKIPPED if error.permanent else DEFERRED), [], str(error)
    log.error("%s failed", item.key, exc_info=error)
    return FAILED, [], f"{type(error).__name__}: {error}"


def record_result(manifest: Manifest, summary: ClusterSummary, key: str, result: ItemResult,
                  worker: str) -> None:
    """Write one item's ``result`` to ``manifest`` and count it in ``summary``."""
    status, outputs, error, seconds = result
    manifest.record(key, status, outputs, worker, error, seconds=seconds)
    count_result(summary, key, result, worker)


def count_result(summary: ClusterSummary, key: str, result: ItemResult, worker: str) -> None:
    """Count one item's ``result`` in ``summary`` (a warning for an item not finished)."""
    status, _, error, _ = result
    if status == FINISHED:
        summary.finished += 1
        summary.per_worker[worker] = summary.per_worker.get(worker, 0) + 1
        return
    {SKIPPED: summary.skipped, DEFERRED: summary.deferred, FAILED: summary.failed}[status].append((key, error or ""))
    log.warning("%s %s: %s", status, key, error)


def start_summary(manifest: Manifest, items: Sequence[Keyed]) -> tuple[list, ClusterSummary]:
    """The items of ``items`` still to make (see :meth:`Manifest.plan`) and the job's summary
    counting the settled ones."""
    plan = manifest.plan(items)
    summary = ClusterSummary(total=len(plan.todo) + len(plan.done), already_done=len(plan.done),
                             skipped_earlier=[(k, e["error"]) for k, e in plan.skipped.items()])
    return plan.todo, summary
