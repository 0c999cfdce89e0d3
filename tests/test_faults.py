"""Faults during a run lose nothing: a full disk, a failing ffmpeg, too little GPU memory, Ctrl-C,
SIGTERM and SIGKILL end with a clear line (or a kill), never a half-written file under a final name,
never a changed earlier output, and a video render continues with --resume to the very frames an
uninterrupted render gives. In --input_folder runs a bad sound is skipped, the run goes on and the
summary lists it.

The demo model at 64x64 with 2 steps keeps every render at a fraction of a second per frame.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_checks import DEMO, assert_one_line_error, decoded_frames, frames_done, snapshot, stderr_lines, write_sound
from sounddiffusion import images
from sounddiffusion.model import engine as engine_module
from sounddiffusion.video import ffmpeg
from video_probe import probe_video

pytestmark = pytest.mark.slow  # renders interrupted by signals and faults: python -m pytest -m slow (CI runs them)

REPO = Path(__file__).resolve().parents[1]
# Segments of 4 frames (--preview_every 0.5 s at 8 fps): a stop leaves finished segments and PNGs.
VIDEO = [*DEMO, "--fps", "8", "--strength", "0.5", "--seed", "5", "--preview_every", "0.5"]


@pytest.fixture
def sound(tmp_path):
    return write_sound(tmp_path / "song.wav", seconds=1.0, kind="noise")


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def is_complete_png(path: Path) -> bool:
    with Image.open(path) as picture:
        picture.load()
    return True


class DiskFills:
    """Makes the disk full for files opened with ``os.fdopen`` after the first ``allowed`` ones:
    the file gets half of its first write, then ENOSPC, as a real full disk does."""

    def __init__(self, monkeypatch, allowed: int):
        self.allowed, self.opened = allowed, 0
        self._real = os.fdopen
        monkeypatch.setattr(os, "fdopen", self)

    def __call__(self, fd, *args, **kwargs):
        file = self._real(fd, *args, **kwargs)
        self.opened += 1
        return file if self.opened <= self.allowed else _FillingFile(file)


class _FillingFile:
    def __init__(self, file):
        self._file = file

    def write(self, data):
        self._file.write(bytes(data)[: len(data) // 2])
        self._file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()


# ------------------------------------------------------------------------------------------ images

IMAGE_TOOLS = {
    "txt2img": lambda sound, image: ["--prompt", "a lighthouse"],
    "img2img": lambda sound, image: ["--init-img", image],
    "audio2img": lambda sound, image: ["--prompt", sound],
}


def _earlier_outputs(outdir: Path) -> None:
    """Results of an earlier run with the names this run would take if it did not look."""
    for folder in (outdir, outdir / "samples", outdir / "song"):
        folder.mkdir(parents=True, exist_ok=True)
    (outdir / "samples" / "sample-00000.png").write_bytes(b"an earlier sample")
    (outdir / "grid-0000.png").write_bytes(b"an earlier grid")
    (outdir / "song" / "fft-00000.png").write_bytes(b"an earlier sound image")


@pytest.mark.parametrize("tool", list(IMAGE_TOOLS))
def test_disk_full_while_writing_images(run_tool, tmp_path, sound, image, monkeypatch, tool):
    """The second image meets a full disk: the first is complete, the second is nowhere (not even
    a temporary file), earlier outputs are unchanged, and the line says what to do."""
    outdir = tmp_path / "out"
    _earlier_outputs(outdir)
    before = snapshot(outdir)
    DiskFills(monkeypatch, allowed=1)
    status, _, err = run_tool(tool, [*IMAGE_TOOLS[tool](sound, image), "--outdir", outdir, "--n_samples", 2,
                                     *DEMO])
    line = assert_one_line_error(status, err, tool, "disk full while writing", "free some space")
    new = sorted(set(snapshot(outdir)) - set(before))
    assert len(new) == 1 and is_complete_png(outdir / new[0])
    failed = Path(re.search(r"writing (.+?): free", line)[1])  # the final name, which does not exist
    assert failed.parent.is_relative_to(outdir) and failed.suffix == ".png" and not failed.exists()
    assert {k: v for k, v in snapshot(outdir).items() if k in before} == before
    assert temp_files(outdir) == []


@pytest.mark.parametrize("tool", list(IMAGE_TOOLS))
def test_images_never_replace_earlier_outputs(run_tool, tmp_path, sound, image, tool):
    """Two runs into one folder with earlier results: every earlier file keeps its bytes and each
    run adds complete, numbered images after them."""
    outdir = tmp_path / "out"
    _earlier_outputs(outdir)
    before = snapshot(outdir)
    for _ in range(2):
        status, _, err = run_tool(tool, [*IMAGE_TOOLS[tool](sound, image), "--outdir", outdir,
                                         "--n_samples", 2, *DEMO])
        assert status == 0, err
    after = snapshot(outdir)
    assert {k: after[k] for k in before} == before
    new = sorted(set(after) - set(before))
    assert len(new) == 6 and all(is_complete_png(outdir / name) for name in new)  # 2 x (2 images + grid)
    assert temp_files(outdir) == []


def test_a_name_taken_while_writing_is_not_overwritten(run_tool, tmp_path, monkeypatch):
    """Another program creates the chosen file name between our choice and our rename: its file
    stays as it is and the run stops with a clear line."""
    outdir = tmp_path / "out"
    taken = outdir / "samples" / "sample-00000.png"
    real_save_png = images.save_png

    def someone_else_was_faster(image_array, path, parameters=None):
        Path(path).write_bytes(b"another program's file")
        return real_save_png(image_array, path, parameters)

    monkeypatch.setattr("sounddiffusion.jobs.image_jobs.save_png", someone_else_was_faster)
    status, _, err = run_tool("txt2img", ["--outdir", outdir, *DEMO])
    assert_one_line_error(status, err, "txt2img", str(taken), "already exists", "not overwriting")
    assert taken.read_bytes() == b"another program's file"
    assert temp_files(outdir) == []


def test_ctrl_c_while_writing_an_image_leaves_no_partial_file(run_tool, tmp_path, monkeypatch):
    outdir = tmp_path / "out"
    real_fdopen = os.fdopen

    class Interrupted(_FillingFile):
        def write(self, data):
            self._file.write(bytes(data)[:100])
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Interrupted(real_fdopen(fd, *a, **k)))
    status, _, err = run_tool("txt2img", ["--outdir", outdir, *DEMO])
    assert status == 130 and "Traceback" not in err
    assert stderr_lines(err) == ["txt2img.py: interrupted; finished outputs are kept"]
    assert [p for p in outdir.rglob("*") if p.is_file()] == []


# ------------------------------------------------------------------------------------------ out of memory

def _out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)")


def _mps_out_of_memory(*args, **kwargs):
    raise RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB, other allocations: 1.00 GB)")


@pytest.mark.parametrize("where", ["txt2img", "decode"])
@pytest.mark.parametrize("tool", ["audio2video", "audio2img", "txt2img"])
def test_out_of_gpu_memory(run_tool, tmp_path, sound, monkeypatch, tool, where):
    """Sampling or decoding runs out of GPU memory (CUDA's error, or MPS's for decoding): the line
    suggests smaller images and fp16; nothing half-written is left."""
    error = _out_of_memory if where == "txt2img" else _mps_out_of_memory
    monkeypatch.setattr(engine_module.Engine, where, error)
    outdir = tmp_path / "out"
    argv = {"audio2video": ["--path", sound, *VIDEO], "audio2img": ["--prompt", sound, *DEMO],
            "txt2img": DEMO}[tool]
    status, _, err = run_tool(tool, [*argv, "--outdir", outdir])
    line = assert_one_line_error(status, err, tool, "out of GPU memory", "--H/--W", "--precision fp16")
    # only flags the command has: audio2video renders one frame at a time
    assert ("--n_samples" in line, "--batch_size" in line) == {"audio2video": (False, False),
                                                               "audio2img": (True, True),
                                                               "txt2img": (True, False)}[tool], line
    assert [p for p in outdir.rglob("*") if p.is_file() and p.suffix in (".png", ".mp4")] == []
    if tool == "audio2video":
        # Nothing was finished, so the same command (memory freed, say) starts afresh by itself.
        monkeypatch.undo()
        status, _, err = run_tool(tool, [*argv, "--outdir", outdir])
        assert status == 0, err
        assert [p.name for p in outdir.iterdir()] == [f"{Path(sound).stem}.mp4"]


# ------------------------------------------------------------------------------------------ videos

@pytest.fixture
def reference_video(run_tool, tmp_path, sound):
    """The uninterrupted render every interrupted one must equal."""
    output = tmp_path / "reference" / "song.mp4"
    status, _, err = run_tool("audio2video", ["--path", sound, "--output", output, *VIDEO])
    assert status == 0, err
    return decoded_frames(output)


def _resume(run_tool, sound, output):
    status, _, err = run_tool("audio2video", ["--path", sound, "--output", output, "--resume", *VIDEO])
    assert status == 0, err
    assert not output.with_name(output.name + ".render").exists()
    return decoded_frames(output)


def test_disk_full_during_a_render_then_resume(run_tool, tmp_path, sound, monkeypatch, reference_video):
    """The disk fills after a few frames: one line says to free space and --resume; nothing under
    the video's name; after --resume the video equals an uninterrupted render."""
    output = tmp_path / "out" / "song.mp4"
    output.parent.mkdir()
    (output.parent / "song-0001.mp4").write_bytes(b"an earlier video")
    disk = DiskFills(monkeypatch, allowed=9)  # settings, then PNG + checkpoint per frame: 4 frames fit
    status, _, err = run_tool("audio2video", ["--path", sound, "--output", output, *VIDEO])
    assert disk.opened > 9
    assert_one_line_error(status, err, "audio2video", "disk full while writing", "free some space",
                          "--resume")
    assert not output.exists() and temp_files(output.parent) == []
    monkeypatch.undo()
    np.testing.assert_array_equal(_resume(run_tool, sound, output), reference_video)
    assert (output.parent / "song-0001.mp4").read_bytes() == b"an earlier video"


def _ffmpeg_whose_mux_finds_the_disk_full(tmp_path) -> str:
    """An ffmpeg that encodes as the real one but fails joining the segments as on a full disk."""
    script = tmp_path / "ffmpeg"
    script.write_text(f"""#!/bin/sh
case "$*" in
  *concat*) echo "[mp4 @ 0x5581] Error writing trailer: No space left on device" >&2; exit 1;;
esac
exec {ffmpeg.ffmpeg_exe()} "$@"
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_disk_full_while_joining_the_video_then_resume(run_tool, tmp_path, sound, monkeypatch,
                                                       reference_video):
    output = tmp_path / "out" / "song.mp4"
    fake_ffmpeg = _ffmpeg_whose_mux_finds_the_disk_full(tmp_path)
    monkeypatch.setattr(ffmpeg, "ffmpeg_exe", lambda: fake_ffmpeg)
    status, _, err = run_tool("audio2video", ["--path", sound, "--output", output, *VIDEO])
    assert_one_line_error(status, err, "audio2video", "disk full while writing the video", str(output),
                          "--resume")
    assert not output.exists() and temp_files(output.parent) == []
    monkeypatch.undo()
    np.testing.assert_array_equal(_resume(run_tool, sound, output), reference_video)


def test_existing_video_is_never_replaced(run_tool, tmp_path, sound):
    output = tmp_path / "song.mp4"
    output.write_bytes(b"an earlier video")
    status, _, err = run_tool("audio2video", ["--path", sound, "--output", output, *VIDEO])
    assert status == 0, err
    assert output.read_bytes() == b"an earlier video"
    assert probe_video(tmp_path / "song-0001.mp4")["frames"] == 8


# ------------------------------------------------------------------------------------------ signals

def _ctrl_c_as_in_a_terminal():
    """In the child before it starts: Ctrl-C's default action, as a program started in a terminal
    has it. When the tests themselves run as a background job (``pytest &``), the shell makes
    them ignore SIGINT, every child would inherit that, and Python then leaves Ctrl-C ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_sigterm_and_sigkill_mid_render_then_resume(run_tool, tmp_path, reference_video):
    """Three real renders, stopped mid-way by Ctrl-C (SIGINT to the process group, as a terminal
    sends it), SIGTERM and SIGKILL. The first two say in one line how to go on; none leaves a file
    under the video's name; each continues with --resume to the frames of an uninterrupted render."""
    sound = tmp_path / "song.wav"  # the fixture's sound, which reference_video rendered
    signals = {"ctrl-c": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}
    outputs = {name: tmp_path / name / "song.mp4" for name in signals}
    processes = {
        name: subprocess.Popen([sys.executable, "audio2video.py", "--path", str(sound), "--output", str(output),
                                *map(str, VIDEO)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=_ctrl_c_as_in_a_terminal)
        for name, output in outputs.items()}
    try:
        waiting = dict(processes)
        deadline = time.monotonic() + 240
        while waiting and time.monotonic() < deadline:
            for name, process in list(waiting.items()):
                done = frames_done(outputs[name].with_name("song.mp4.render"))
                assert process.poll() is None, f"{name}: the render ended before it was stopped"
                if done >= 5:  # a finished segment (4 frames) and a frame in PNGs
                    os.killpg(process.pid, signals[name])
                    del waiting[name]
            time.sleep(0.02)
        assert not waiting, f"no progress in time: {list(waiting)}"
        results = {name: (process.wait(timeout=60), process.communicate()[1])
                   for name, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    for name, (status, err) in results.items():
        assert not outputs[name].exists(), (name, status, err)
        if name == "sigkill":
            assert status == -signal.SIGKILL
        else:
            assert "Traceback" not in err
            assert status == 130, err
            last = stderr_lines(err)[-1]
            assert last.startswith("audio2video.py: interrupted;") and "--resume" in last, err
        np.testing.assert_array_equal(_resume(run_tool, sound, outputs[name]), reference_video, err_msg=name)


# ------------------------------------------------------------------------------------------ folders

def test_bad_sounds_in_a_folder_are_skipped_and_listed(run_tool, tmp_path, caplog):
    folder = tmp_path / "sounds"
    folder.mkdir()
    write_sound(folder / "a-first.wav", 0.3)
    (folder / "b-notes.wav").write_text("not a sound")
    write_sound(folder / "c-middle.flac", 0.3, kind="noise")
    (folder / "d-empty.wav").write_bytes(b"")
    write_sound(folder / "e-last.ogg", 0.3, subtype="VORBIS")
    outdir = tmp_path / "out"
    caplog.set_level(logging.INFO)
    status, _, err = run_tool("audio2img", ["--input_folder", folder, "--outdir", outdir, "--batch_size", 2,
                                            *DEMO])
    assert status == 3, err  # done, but some sounds were skipped
    assert "Traceback" not in err
    assert sorted(p.parent.name for p in outdir.rglob("*.png")) == ["a-first", "c-middle", "e-last"]
    summary = caplog.records[-1].getMessage()
    assert summary.startswith("2 of 5 sounds skipped")
    assert str(folder / "b-notes.wav") in summary and "not an audio file" in summary
    assert str(folder / "d-empty.wav") in summary and "empty" in summary


def test_missing_sound_in_a_list_is_skipped_and_listed(run_tool, tmp_path, caplog):
    listing = tmp_path / "sounds.txt"
    good = write_sound(tmp_path / "good.wav", 0.3)
    listing.write_text(f"{tmp_path / 'gone.wav'}\n{good}\n")
    caplog.set_level(logging.INFO)
    status, _, err = run_tool("audio2img", ["--from-file", listing, "--outdir", tmp_path / "out", *DEMO])
    assert status == 3, err
    assert [p.parent.name for p in (tmp_path / "out").rglob("*.png")] == ["good"]
    assert "1 of 2 sounds skipped" in caplog.text and "gone.wav does not exist" in caplog.text


def test_a_folder_of_only_bad_sounds_fails_before_the_model_loads(run_tool, tmp_path, monkeypatch):
    folder = tmp_path / "sounds"
    folder.mkdir()
    (folder / "a.wav").write_text("no")
    (folder / "b.mp3").write_bytes(b"")

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("sounddiffusion.jobs.image_jobs.load_engine", must_not_load)
    status, _, err = run_tool("audio2img", ["--input_folder", folder, "--outdir", tmp_path / "out", *DEMO])
    assert_one_line_error(status, err, "audio2img", "none of the 2 sounds could be read", "a.wav")


def test_notes_go_to_the_streams_of_the_moment(monkeypatch):
    """Notes and warnings follow sys.stdout / sys.stderr as they are when written: a stream
    closed since the run configured logging (an earlier test's capture) is never written to."""
    import io

    from sounddiffusion.logs import configure_logging

    closed = io.StringIO()
    monkeypatch.setattr(sys, "stdout", closed)
    monkeypatch.setattr(sys, "stderr", closed)
    configure_logging(debug=False)
    closed.close()
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(logging, "raiseExceptions", True)
    note = logging.getLogger("sounddiffusion.test")
    note.info("a note")
    note.warning("a warning")
    assert (out.getvalue(), err.getvalue()) == ("a note\n", "a warning\n")
