"""What a run prints: notes (what is loaded, what was written) on stdout, warnings and errors on
stderr, so that a failed run's stderr holds its one error line; libraries' chatter only with --debug."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("sounddiffusion")


class _RunHandler(logging.StreamHandler):
    """A handler :func:`configure_logging` installed (the next run's call replaces it), writing to
    ``sys.<stream_name>`` as it is when a record comes: never to a stream swapped or closed since."""

    def __init__(self, stream_name: str):
        super().__init__(getattr(sys, stream_name))
        self.stream_name = stream_name

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = getattr(sys, self.stream_name)
        super().emit(record)


def configure_logging(debug: bool) -> None:
    """Notes (what is loaded, what was written; debug details with ``--debug``) go to stdout,
    warnings and errors to stderr, so that a failed run's stderr holds its one error line.

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
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    log.setLevel(logging.NOTSET)  # the package's notes follow the run's level, whatever ran before
    # Libraries' chatter is not for our users unless they debug.
    for name in ("transformers", "pytorch_lightning", "lightning", "numba", "PIL", "matplotlib"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
