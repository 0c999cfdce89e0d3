"""A job's manifest: one JSON line per finished, skipped, deferred or failed item, next to the outputs.

A batch job (many sounds, many songs) records every item it settles in a JSON-lines file, so that
running the same command again continues where it stopped::

    {"key": "sounds/a.wav size=88244 mtime_ns=1700000000000000000", "status": "finished",
     "outputs": ["a/mfcc-00000.png"], "worker": "w1@node3", "error": null, "seconds": 2.31,
     "time": "2026-11-30T10:00:00Z"}

- ``status`` is ``finished`` (the outputs were made), ``skipped`` (the input itself cannot be
  made, e.g. an unreadable sound: ``error`` says why; it is not tried again until the input
  changes), ``deferred`` (a mistake whose cause may pass or lies outside the input: a render
  lock held by another process, a leftover render with other settings, a full disk: ``error``;
  tried again on the next run) or ``failed`` (something unexpected went wrong: ``error``;
  tried again on the next run).
- ``outputs`` are relative to the manifest's folder when they lie inside it, else absolute, so
  the output folder can be moved as a whole.
- Later lines win: an item made again (its outputs were deleted) gets a new line.

Each line is appended with one ``write`` call on a file opened with ``O_APPEND`` and synced
before :meth:`Manifest.record` returns, so a crash leaves at most a torn last line; reading
ignores lines that are not well-formed entries (torn, not JSON, fields of the wrong type: one
warning gives their count), and the next record starts on a fresh line.
Only one process (the job's driver) should write a manifest at a time.

Keys are stable strings per item; :func:`file_key` makes them for input files: the path as given,
its size and modification time (so a sound that was replaced is made again) and, optionally, a
digest of the job's settings (:func:`settings_digest`, so other settings into the same folder
make new outputs instead of skipping).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from sounddiffusion.errors import OutputError

log = logging.getLogger(__name__)

FINISHED, SKIPPED, DEFERRED, FAILED = "finished", "skipped", "deferred", "failed"
STATUSES = (FINISHED, SKIPPED, DEFERRED, FAILED)


class Keyed(Protocol):
    """Anything with a stable string ``key`` (a job's item)."""

    key: str


ItemT = TypeVar("ItemT", bound=Keyed)


def file_key(path: str | os.PathLike, *, settings: str = "") -> str:
    """The key of an input file: ``"[SETTINGS ]PATH size=N mtime_ns=T"``, PATH as given.

    A missing or unreadable file gets ``size=? mtime_ns=?`` (it will be reported as skipped, and
    tried again once it exists). ``settings`` is typically :func:`settings_digest` of the job."""
    try:
        stat = os.stat(path)
        size, mtime = str(stat.st_size), str(stat.st_mtime_ns)
    except OSError:
        size = mtime = "?"
    prefix = f"{settings} " if settings else ""
    return f"{prefix}{os.fspath(path)} size={size} mtime_ns={mtime}"


def settings_digest(settings: Mapping) -> str:
    """12 hex digits of SHA-256 over ``settings`` as sorted JSON (values JSON-able or str-able)."""
    text = json.dumps(settings, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


@dataclass
class ManifestPlan:
    """Which items of a job still have to run: ``todo`` in the job's order (new, deferred,
    failed, or finished with an output missing); ``done`` the entries of the items that are
    settled (finished with all outputs present, or skipped)."""

    todo: list
    done: dict[str, dict] = field(default_factory=dict)

    @property
    def skipped(self) -> dict[str, dict]:
        """The settled entries whose status is ``skipped`` (reason in ``entry["error"]``)."""
        return {key: entry for key, entry in self.done.items() if entry["status"] == SKIPPED}


class Manifest:
    """The JSON-lines manifest at ``path`` (its folder is created on the first record)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Manifest({str(self.path)!r})"

    # ------------------------------------------------------------------------- writing

    def record(self, key: str, status: str, outputs: Sequence[str | os.PathLike], worker: str,
               error: str | None = None, *, seconds: float | None = None) -> dict:
        """Append one entry for ``key`` and sync it to disk; returns the entry as written.

        ``status`` is one of :data:`STATUSES`; ``outputs`` the files made (any paths);
        ``worker`` who made them; ``error`` the reason of an item not finished; ``seconds``
        the time the item took. Raises :class:`OutputError` when the manifest cannot be written."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: expected one of {STATUSES}")
        if status != FINISHED and not isinstance(error, str):
            raise ValueError(f"a {status} item needs its reason as error, got {error!r}")
        entry = {"key": key, "status": status, "outputs": [self._stored(p) for p in outputs],
                 "worker": worker, "error": error, "seconds": seconds,
                 "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                if not _ends_with_newline(fd):
                    line = b"\n" + line  # after a torn last line: start a fresh one
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise OutputError(f"cannot write the manifest {self.path} ({err.strerror or err}): "
                              f"free space or fix its permissions, then run again") from err
        return entry

    def _stored(self, output: str | os.PathLike) -> str:
        """``output`` as stored: relative to the manifest's folder when inside it."""
        folder = self.path.parent.resolve()
        resolved = Path(output).resolve()
        try:
            return resolved.relative_to(folder).as_posix()
        except ValueError:
            return str(resolved)

    # ------------------------------------------------------------------------- reading

    def entries(self) -> Iterable[dict]:
        """Every well-formed entry in file order (see :func:`is_entry`); the other lines (torn,
        foreign, edited by hand) are left out with one warning that counts them."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise OutputError(f"cannot read the manifest {self.path} ({err.strerror or err}): "
                              f"fix its permissions or move it away to start afresh") from err
        entries, ignored = [], []
        for number, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                entry = None
            if is_entry(entry):
                entries.append(entry)
            else:
                ignored.append(number)
        if ignored:
            log.warning("%s: %d line(s) are not well-formed entries and are ignored (the first: line %d); "
                        "their items are made again", self.path, len(ignored), ignored[0])
        return entries

    def latest(self) -> dict[str, dict]:
        """The last entry of every key."""
        return {entry["key"]: entry for entry in self.entries()}

    def output_paths(self, entry: Mapping) -> list[Path]:
        """The outputs of ``entry`` as paths (relative ones resolved against the manifest's folder)."""
        return [self.path.parent / p for p in entry["outputs"]]

    def is_settled(self, entry: Mapping) -> bool:
        """True when ``entry`` needs no new run: skipped, or finished with every output present."""
        if entry["status"] == SKIPPED:
            return True
        return entry["status"] == FINISHED and all(p.exists() for p in self.output_paths(entry))

    def plan(self, items: Iterable[ItemT]) -> ManifestPlan:
        """Split ``items`` into those to (re)run and the settled ones.

        An item is settled when its last entry is ``skipped``, or ``finished`` and all its
        outputs still exist; missing outputs are made again; deferred and failed items run
        again. An item
        whose key comes twice runs once (a warning names it)."""
        latest = self.latest()
        plan = ManifestPlan(todo=[])
        seen: set[str] = set()
        for item in items:
            if item.key in seen:
                log.warning("%s is listed twice: made once", item.key)
                continue
            seen.add(item.key)
            entry = latest.get(item.key)
            if entry is not None and self.is_settled(entry):
                plan.done[item.key] = entry
            else:
                plan.todo.append(item)
        return plan


def is_entry(entry: object) -> bool:
    """True for a well-formed entry: a JSON object whose ``key`` is a string, ``status`` one of
    :data:`STATUSES`, ``outputs`` a list of non-empty path strings without NUL and ``error`` a
    string (the reason) unless the status is ``finished``."""
    if not (isinstance(entry, dict) and isinstance(entry.get("key"), str) and entry.get("status") in STATUSES):
        return False
    outputs = entry.get("outputs")
    if not (isinstance(outputs, list) and all(isinstance(p, str) and p and "\0" not in p for p in outputs)):
        return False
    return entry["status"] == FINISHED or isinstance(entry.get("error"), str)


def _ends_with_newline(fd: int) -> bool:
    """True when the file open at ``fd`` is empty or its last byte is a newline."""
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"
