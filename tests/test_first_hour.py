"""What a new user meets in the first hour (issue 16): messages worded for the command that prints
them and short enough to read, batch runs that list what they wrote and say by their exit status
that something was skipped, the MP4's quality (--crf), saved frames that carry their settings,
help texts that say each default once, and example scripts that write where the tools do.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_checks import DEMO, TINY, assert_one_line_error, decoded_frames, snapshot, stderr_lines, write_sound
from conftest import ENTRY_POINTS, EXAMPLE_SCRIPTS, REPO, load_module
from ldm.checkpoint_keys import fit_state_dict
from ldm.errors import CheckpointError
from sounddiffusion import cli
from sounddiffusion.images import read_png_parameters, read_rgb
from sounddiffusion.model import loading
from sounddiffusion.settings import DEFAULT_CRF
from sounddiffusion.video.ffmpeg import ffmpeg_exe
from sounddiffusion.video.render import VideoRender

MAX_LINE = 300  # characters of an error line, "PROG: error: " included
_PYTEST_TMP = re.compile(r"\S*pytest-of-[^/]+/pytest-\d+/[^/\s]+")  # a test's tmp_path


def shown_length(line: str) -> int:
    """The length of ``line`` with each test folder path (dozens of characters) as a user's "/tmp/t"."""
    return len(_PYTEST_TMP.sub("/tmp/t", line))


def command(tool, sound, image, outdir, *extra):
    inputs = {"audio2img": ["--prompt", sound], "audio2video": ["--path", sound, "--fps", 4],
              "txt2img": [], "img2img": ["--init-img", image]}[tool]
    return [*inputs, "--outdir", outdir, *extra]


def refused(run_tool, tool, argv, *words, outdir=None):
    """One line, exit status 2, at most MAX_LINE characters, holding ``words``; ``outdir`` unchanged."""
    before = snapshot(outdir) if outdir is not None and outdir.exists() else None
    status, _, err = run_tool(tool, argv)
    line = assert_one_line_error(status, err, tool, *words)
    assert shown_length(line) <= MAX_LINE, (shown_length(line), line)
    if before is not None:
        assert snapshot(outdir) == before
    return line


# ------------------------------------------------------------------------------------------ --demo

@pytest.mark.parametrize("tool", ["audio2img", "audio2video", "txt2img", "img2img"])
@pytest.mark.parametrize("given", [["--ckpt", "notes.txt"], ["--config", "configs/stable-diffusion/v1-demo.yaml"],
                                   ["--ckpt", "notes.txt", "--config", "my.yaml"]])
def test_demo_with_a_checkpoint_or_config_is_refused(run_tool, tmp_path, sound, image, tool, given):
    outdir = tmp_path / "out"
    line = refused(run_tool, tool, command(tool, sound, image, outdir, *DEMO, *given),
                   "--demo", *[f"{flag} {value}" for flag, value in zip(given[::2], given[1::2])], "leave out")
    assert not outdir.exists(), line


# ------------------------------------------------------------------------------------------ checkpoints

def test_checkpoint_of_another_architecture_is_one_short_line(run_tool, tmp_path, sound, image):
    """The tiny model's weights with the demo model's config: the counts and one telling example
    (the text context width) in one short line, the fact first."""
    argv = command("audio2video", sound, image, tmp_path / "out", *TINY)
    argv[argv.index("--config") + 1] = "configs/stable-diffusion/v1-demo.yaml"
    line = refused(run_tool, "audio2video", argv, "tests/data/tiny-v1/model.safetensors",
                   "does not fit configs/stable-diffusion/v1-demo.yaml", "weights missing",
                   "of another shape such as the context width, file 32 vs model", "--config")
    assert line.index("does not fit") < 100
    assert re.search(r": \d+ weights missing, \d+ of another shape", line), line


def test_mismatch_lists_every_key_at_debug_level(caplog):
    model = {"model.diffusion_model.a.attn2.to_k.weight": torch.zeros(4, 48),
             "model.diffusion_model.b.weight": torch.zeros(3), "model.diffusion_model.c.weight": torch.zeros(2)}
    file = {"model.diffusion_model.a.attn2.to_k.weight": torch.zeros(4, 32),
            "model.diffusion_model.b.weight": torch.zeros(5)}
    caplog.set_level(logging.DEBUG, logger="ldm")
    with pytest.raises(CheckpointError) as error:
        fit_state_dict(file, model, "old.ckpt", "v1.yaml")
    assert str(error.value).startswith("old.ckpt does not fit v1.yaml: 1 weight missing, 2 of another shape "
                                       "such as the context width, file 32 vs model 48; pass the config "
                                       "made for this")
    assert "model.diffusion_model.c.weight" in caplog.text  # the missing one
    assert "model.diffusion_model.b.weight: file (5,) vs model (3,)" in caplog.text


@pytest.mark.parametrize("case", ["given", "folder", "default"])
def test_missing_checkpoint_gives_the_advice_once(run_tool, tmp_path, sound, image, monkeypatch, case):
    monkeypatch.setattr(loading, "CHECKPOINT_DIR", tmp_path / "models" / "ldm" / "stable-diffusion-v1")
    argv = command("txt2img", sound, image, tmp_path / "out", "--H", "64", "--W", "64")
    if case == "given":
        argv += ["--ckpt", tmp_path / "sd-v1-4.ckpt"]
    elif case == "folder":
        argv += ["--ckpt", tmp_path]
    words = {"given": ["does not exist", "--ckpt"], "folder": ["is a folder", "--ckpt"],
             "default": ["no checkpoint in", "model.ckpt", "sd-v1-4.ckpt"]}[case]
    line = refused(run_tool, "txt2img", argv, *words, "--demo")
    assert line.lower().count("download") <= 1 and line.count("--demo") == 1, line


# ------------------------------------------------------------------------------------------ outputs

def _is_virtual(folder: str) -> bool:
    try:
        return Path(folder).is_dir() and os.statvfs(folder).f_blocks == 0
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not _is_virtual("/proc"), reason="needs Linux's /proc (a virtual file system)")
@pytest.mark.parametrize("tool,flag,target", [("audio2video", "--output", "/proc/x.mp4"),
                                              ("audio2img", "--outdir", "/proc/sounddiffusion-out"),
                                              ("txt2img", "--outdir", "/proc")])
def test_output_on_a_virtual_file_system_says_so(run_tool, tmp_path, sound, image, tool, flag, target):
    """/proc refuses new files with ENOENT, which says "No such file or directory" of a folder
    that exists: the message names the real reason."""
    argv = command(tool, sound, image, tmp_path / "out", *DEMO)
    if flag == "--output":
        argv += ["--output", target]
    else:
        argv[argv.index("--outdir") + 1] = target
    line = refused(run_tool, tool, argv, "virtual file system", "choose another folder")
    assert "no such file" not in line.lower()


def test_output_on_a_read_only_file_system_says_so(run_tool, tmp_path, sound, image, monkeypatch):
    outdir = tmp_path / "mounted"
    outdir.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(path).resolve().is_relative_to(outdir.resolve()):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    refused(run_tool, "audio2img", command("audio2img", sound, image, outdir, *DEMO), str(outdir),
            "read-only file system", "choose another folder", outdir=outdir)


# ------------------------------------------------------------------------------------------ wording

@pytest.mark.parametrize("tool,flags,says,never", [
    ("img2img", ["--strength", "1.5"], "keeps the init image", "previous"),
    ("audio2video", ["--strength", "1.5"], "keeps the previous frame", "init image"),
    ("txt2img", ["--plms", "--ddim_eta", "0.5"], "leave out --plms", "--ddim "),
    ("audio2video", ["--ddim_eta", "0.5"], "add --ddim", "--plms"),
])
def test_messages_are_worded_for_their_command(run_tool, tmp_path, sound, image, tool, flags, says, never):
    line = refused(run_tool, tool, command(tool, sound, image, tmp_path / "out", *DEMO, *flags), says)
    assert never not in line


# ------------------------------------------------------------------------------------------ batches

def _folder_with_a_bad_sound(tmp_path):
    folder = tmp_path / "sounds"
    folder.mkdir()
    write_sound(folder / "a-tone.wav", 0.3)
    (folder / "b-notes.wav").write_text("not a sound")
    write_sound(folder / "c-noise.wav", 0.3, kind="noise")
    return folder


@pytest.mark.slow
def test_batch_lists_every_file_counts_grids_apart_and_ends_with_status_3(tmp_path):
    """A real process: one 'wrote PATH' line per file on stdout (exactly the files on disk), the
    summary counts images and grids apart, the skipped sound is named on stderr, exit status 3."""
    folder = _folder_with_a_bad_sound(tmp_path)
    outdir = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "audio2img.py"), "--input_folder", str(folder),
                             "--outdir", str(outdir), "--n_samples", "3", *DEMO],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == cli.EXIT_SKIPPED == 3, result.stderr
    assert "Traceback" not in result.stderr
    listed = [Path(line.removeprefix("wrote ")) for line in result.stdout.splitlines() if line.startswith("wrote ")]
    on_disk = sorted(outdir.rglob("*.png"))
    assert sorted(listed) == on_disk and len(on_disk) == 8
    assert f"6 images and 2 grids from 2 sounds in {outdir}" in result.stdout
    problems = "\n".join(stderr_lines(result.stderr))
    assert "1 of 3 sounds skipped" in problems and str(folder / "b-notes.wav") in problems
    # The note as the sound is passed over: a sentence, on a line of its own.
    assert f"\nskipping a sound: {folder / 'b-notes.wav'} is not an audio file" in "\n" + result.stdout


def test_batch_without_skipped_sounds_ends_with_status_0(run_tool, tmp_path, caplog):
    folder = _folder_with_a_bad_sound(tmp_path)
    (folder / "b-notes.wav").unlink()
    caplog.set_level(logging.INFO)
    status, _, err = run_tool("audio2img", ["--input_folder", folder, "--outdir", tmp_path / "out", *DEMO])
    assert status == 0, err
    assert "2 images and 0 grids from 2 sounds" in caplog.text


def test_prompt_list_lists_files_and_counts_grids_apart(run_tool, tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    outdir = tmp_path / "out"
    caplog.set_level(logging.INFO)
    status, _, err = run_tool("txt2img", ["--from-file", prompts, "--outdir", outdir, "--n_samples", "2", *DEMO])
    assert status == 0, err
    listed = sorted(Path(r.getMessage().removeprefix("wrote ")) for r in caplog.records
                    if r.getMessage().startswith("wrote "))
    assert listed == sorted(outdir.rglob("*.png")) and len(listed) == 6
    assert f"4 images and 2 grids from 2 prompts in {outdir}" in caplog.text


# ------------------------------------------------------------------------------------------ video

def _render(run_tool, sound, outdir, *extra):
    status, _, err = run_tool("audio2video", ["--path", sound, "--fps", 8, "--outdir", outdir, "--save_frames",
                                              "--strength", "0.5", *DEMO, *extra])
    assert status == 0, err
    frames = sorted((outdir / f"{sound.stem}-frames").glob("frame-*.png"))
    return outdir / f"{sound.stem}.mp4", frames


@pytest.mark.slow
def test_lower_crf_gives_a_video_closer_to_the_saved_frames(run_tool, tmp_path):
    sound = write_sound(tmp_path / "tone.wav", 0.5, kind="noise")
    differences, sizes = {}, {}
    for crf in (0, DEFAULT_CRF, 40):
        video, frames = _render(run_tool, sound, tmp_path / f"crf{crf}", "--crf", crf)
        pictures = np.stack([read_rgb(p) for p in frames]).astype(int)
        decoded = decoded_frames(video).astype(int)
        assert decoded.shape == pictures.shape == (4, 64, 64, 3)
        differences[crf] = np.abs(decoded - pictures).mean()
        sizes[crf] = video.stat().st_size
        assert read_png_parameters(frames[0])["crf"] == crf
    assert differences[0] < differences[DEFAULT_CRF] < differences[40], differences
    assert sizes[0] > sizes[DEFAULT_CRF] > sizes[40], sizes


@pytest.mark.parametrize("crf", ["-1", "52"])
def test_crf_out_of_range(run_tool, tmp_path, sound, image, crf):
    refused(run_tool, "audio2video", command("audio2video", sound, image, tmp_path / "out", *DEMO, "--crf", crf),
            f"--crf {crf}", "0", "51")


def test_resume_with_another_crf_is_refused(run_tool, tmp_path, monkeypatch):
    """Segments of one video share one quality: a resume with another --crf is refused by name."""
    sound = write_sound(tmp_path / "tone.wav", 1.0)
    real_add_frame = VideoRender.add_frame

    def stop_after_two(render, *args, **kwargs):
        if render.frames_done == 2:
            raise KeyboardInterrupt
        real_add_frame(render, *args, **kwargs)

    argv = ["--path", sound, "--fps", 4, "--outdir", tmp_path / "out", *DEMO]
    with monkeypatch.context() as patch:
        patch.setattr(VideoRender, "add_frame", stop_after_two)
        status, _, err = run_tool("audio2video", [*argv, "--crf", 23])
    assert status == cli.EXIT_INTERRUPTED, err
    status, _, err = run_tool("audio2video", [*argv, "--resume"])
    assert_one_line_error(status, err, "audio2video", "cannot resume", "crf: 23 then, 18 now")


def test_saved_frames_carry_the_render_settings_frame_and_time(run_tool, tmp_path):
    sound = write_sound(tmp_path / "tone.wav", 0.5)
    video, frames = _render(run_tool, sound, tmp_path / "out", "--seed", 7, "--feature", "mfcc")
    tags = subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", str(video),
                           "-f", "ffmetadata", "pipe:1"], capture_output=True, text=True, check=True).stdout
    comment = re.search(r"^comment=(.*)$", tags, re.MULTILINE).group(1)
    recorded = json.loads(re.sub(r"\\(.)", r"\1", comment))  # ffmetadata escapes = ; # \ with a backslash
    assert len(frames) == 4
    for index, path in enumerate(frames):
        parameters = read_png_parameters(path)
        assert parameters.pop("frame") == index and parameters.pop("time") == pytest.approx(index / 8)
        assert parameters == recorded  # what the MP4 records, as audio2img's PNGs carry theirs
    assert recorded["seed"] == 7 and recorded["feature"] == "mfcc" and recorded["checkpoint"] == "demo"


# ------------------------------------------------------------------------------------------ help, scripts

HELP_TOOLS = {**ENTRY_POINTS, "bending_grid": REPO / "scripts" / "bending_grid.py",
              "video_stats": REPO / "scripts" / "video_stats.py"}


def _parser(name):
    return load_module(HELP_TOOLS[name], f"help_{name}").build_parser()


@pytest.mark.parametrize("name", list(HELP_TOOLS))
def test_help_says_each_default_once(name):
    parser = _parser(name)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.help:
            continue
        text = formatter._get_help_string(action) % {"default": action.default, "prog": parser.prog}
        assert text.lower().count("default") <= 1, (action.dest, text)
        for empty in ("(default: None)", "(default: False)", "(default: )"):
            assert empty not in text, (action.dest, text)
    shown = parser.format_help()
    assert "(default: DDIM) (default" not in shown and "(default: None)" not in shown


@pytest.mark.parametrize("script", EXAMPLE_SCRIPTS)
def test_example_scripts_write_to_the_tools_default_folders(script):
    text = (REPO / "scripts" / script).read_text()
    tool = re.search(r"python (\S+)\.py", text).group(1)
    default = _parser(tool).get_default("outdir")
    for flag, value in re.findall(r"--(outdir|output) \"?([^\s\"]+)", text):
        folder = value if flag == "outdir" else str(Path(value).parent)
        assert folder == default, (script, flag, value, default)
