"""What a run prints: notes (what is loaded, what was written) on stdout, warnings and errors on
stderr, so that a failed run's stderr holds its one error line; libraries' chatter never.

Notes and warnings are written through tqdm, so that a line written while a progress bar is
shown starts on a line of its own and the bar is drawn again below it."""
from __future__ import annotations

import logging
import sys

from tqdm import tqdm

log = logging.getLogger("sounddiffusion")

# The project's loggers: their debug notes show with --debug ("__main__": the scripts').
OWN_LOGGERS = ("sounddiffusion", "ldm", "__main__")
# Libraries whose info notes are chatter to our users; their warnings still show. Debug notes of
# every library stay hidden, even with --debug (numba alone prints ~600 lines of bytecode).
QUIET_LIBRARIES = ("numba", "matplotlib", "PIL", "urllib3", "h5py", "fsspec", "filelock", "asyncio",
                   "httpx", "httpcore", "huggingface_hub", "transformers", "pytorch_lightning", "lightning",
                   "imageio", "imageio_ffmpeg", "numexpr", "git", "ray")


class _RunHandler(logging.StreamHandler):
    """A handler :func:`configure_logging` installed (the next run's call replaces it), writing to
    ``sys.<stream_name>`` as it is when a record comes: never to a stream swapped or closed since.
    Lines go through ``tqdm.write``, which lifts a progress bar shown on the terminal out of the way."""

    def __init__(self, stream_name: str):
        super().__init__(getattr(sys, stream_name))
        self.stream_name = stream_name

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = getattr(sys, self.stream_name)
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own way: report, never raise
            self.handleError(record)


def configure_logging(debug: bool) -> None:
    """Notes (what is loaded, what was written; debug details of the project's own loggers with
    ``--debug``) go to stdout, warnings and errors to stderr, so that a failed run's stderr holds
    its one error line. Libraries show their warnings, and their notes only where they are not
    :data:`QUIET_LIBRARIES`; their debug output never shows.

    Each call replaces the handlers an earlier call installed (a process may run several tools,
    as the tests do) and leaves other handlers alone; the streams are the current sys.stdout and
    sys.stderr at the moment each note is written."""
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s" if debug else "%(message)s")
    notes = _RunHandler("stdout")
    notes.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = _RunHandler("stderr")
    problems.setLevel(logging.WARNING)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RunHandler)]:
        root.removeHandler(old)
    for handler in (notes, problems):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in OWN_LOGGERS:  # our notes follow the run's level, whatever ran before
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.NOTSET)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def counted(n: int, word: str) -> str:
    """``n`` and ``word`` in the plural when n is not 1: "1 sound", "3 sounds", "0 songs"."""
    return f"{n} {word}{'' if n == 1 else 's'}"
