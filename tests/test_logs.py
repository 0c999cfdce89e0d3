"""What a run prints: notes beside progress bars, libraries' chatter with --debug, counts."""
import io
import logging
import sys

import pytest
from tqdm import tqdm

from sounddiffusion.logs import configure_logging, counted


@pytest.fixture
def terminal(monkeypatch):
    """A function that sends stdout and stderr into one stream, as a terminal shows them, and
    returns it (called in the test: pytest sets its own streams again between setup and call);
    logging is configured afresh after the test."""
    def screen() -> io.StringIO:
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stdout", stream)
        monkeypatch.setattr(sys, "stderr", stream)
        return stream

    yield screen
    configure_logging(debug=False)


def test_a_note_written_while_a_bar_is_shown_starts_a_line_of_its_own(terminal):
    screen = terminal()
    configure_logging(debug=False)
    with tqdm(total=3, desc="rendering", file=sys.stderr) as bar:
        bar.update(1)
        logging.getLogger("sounddiffusion.jobs.image_jobs").info("skipping a sound: b.txt is not an audio file")
        logging.getLogger("sounddiffusion.jobs.outcomes").warning("deferred c.wav: locked")
        bar.update(2)
    shown = screen.getvalue()
    for line in ("skipping a sound: b.txt is not an audio file\n", "deferred c.wav: locked\n"):
        before = shown[:shown.index(line)]
        assert before.endswith(("\r", "\n")), repr(shown)  # not glued to the bar's text
    assert "1/3" in shown and "3/3" in shown  # the bar is drawn again after the notes


def test_debug_shows_our_notes_and_never_the_libraries_debug_output(terminal):
    screen = terminal()
    configure_logging(debug=True)
    logging.getLogger("sounddiffusion.video.loop").debug("our debug note")
    logging.getLogger("ldm.checkpoint").debug("a weight that does not fit")
    logging.getLogger("numba.core.byteflow").debug("bytecode dump")  # ~600 such lines per sound
    logging.getLogger("matplotlib.font_manager").debug("findfont: scores")
    logging.getLogger("PIL.PngImagePlugin").debug("STREAM b'IHDR'")
    logging.getLogger("urllib3.connectionpool").info("Starting new HTTPS connection")
    logging.getLogger("some_library_we_never_heard_of").debug("internals")
    logging.getLogger("numba.core.ssa").warning("a library's warning still shows")
    shown = screen.getvalue()
    assert "our debug note" in shown and "a weight that does not fit" in shown
    for chatter in ("bytecode dump", "findfont", "IHDR", "HTTPS connection", "internals"):
        assert chatter not in shown, shown
    assert "a library's warning still shows" in shown


def test_without_debug_only_notes_and_warnings(terminal):
    screen = terminal()
    configure_logging(debug=False)
    logging.getLogger("sounddiffusion.video.loop").debug("our debug note")
    logging.getLogger("sounddiffusion.video.loop").info("wrote x.mp4")
    assert screen.getvalue() == "wrote x.mp4\n"


def test_counts_are_singular_for_one():
    assert [counted(n, "sound") for n in (0, 1, 2)] == ["0 sounds", "1 sound", "2 sounds"]
