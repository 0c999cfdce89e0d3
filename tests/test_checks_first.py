"""Every mistake a user can make on the command line is refused before the model loads: one line
on stderr, exit status 2, and the loader never called (it is replaced by one that fails)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import ldm.util  # noqa: F401 - imported before the loaders are replaced (they bind them)
import sounddiffusion.jobs.batch_jobs
import sounddiffusion.jobs.image_jobs
import sounddiffusion.video.loop  # noqa: F401 - imported before the loaders are replaced (they bind them)
from cli_checks import DEMO, assert_one_line_error, snapshot, stop_at_frame, write_sound

LOADERS = ("sounddiffusion.model.loading.load_engine", "sounddiffusion.jobs.image_jobs.load_engine",
           "sounddiffusion.jobs.batch_jobs.load_engine", "sounddiffusion.video.loop.load_engine",
           "sounddiffusion.model.loading.build_demo_model", "ldm.util.load_model_from_config")


def must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the mistake was found")


@pytest.fixture
def files(tmp_path):
    """A sound, a picture, a text file, a file in the way of a folder, and an output folder."""
    sound = write_sound(tmp_path / "tone.wav", seconds=0.5)
    image = tmp_path / "start.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    text = tmp_path / "notes.txt"
    text.write_text("not a picture, not a prompt file")
    (tmp_path / "a file").write_text("in the way")
    return {"SOUND": sound, "IMAGE": image, "TEXT": text, "TMP": tmp_path, "OUT": tmp_path / "out"}


def base(tool, f):
    return {"audio2img": ["--prompt", f["SOUND"]], "audio2video": ["--path", f["SOUND"], "--fps", 4],
            "txt2img": [], "img2img": ["--init-img", f["IMAGE"]]}[tool]


# (tool, flags, words the one line holds); names in capitals are the files of the fixture.
MISTAKES = [
    ("audio2video", ["--prompt_file", "TMP/missing.txt"], ["missing.txt", "does not exist"]),
    ("audio2video", ["--prompt_file", "IMAGE"], ["line 1", "UTF-8"]),
    ("audio2video", ["--prompt_file", "TEXT"], ["line 1", "cannot read"]),
    ("audio2video", ["--init-img", "TMP/missing.png"], ["init image", "does not exist"]),
    ("audio2video", ["--init-img", "TEXT"], ["init image", "not an image"]),
    ("audio2video", ["--output", "TMP/a file/v.mp4"], ["is a file", "another folder"]),
    ("audio2video", ["--output", "TMP/v.avi"], ["--output", "v.avi", "ending in .mp4"]),
    ("audio2video", ["--output", "TMP/video"], ["--output", "ending in .mp4"]),
    ("audio2video", ["--strength", "0.3 + 0.4*"], ["--strength", "column"]),
    ("audio2video", ["--scale", "0:(7), 10:(x)"], ["--scale", "unknown name 'x'"]),
    ("audio2video", ["--bend", "bogus=1"], ["--bend", "unknown operator"]),
    ("audio2video", ["--bend", "add=1@output_blocks.99"], ["--bend", "no block output_blocks.99"]),
    ("audio2video", ["--crf", "52"], ["--crf 52"]),
    ("audio2video", ["--fps", "0"], ["--fps 0"]),
    ("audio2video", ["--preview_every", "-1"], ["--preview_every -1"]),
    ("audio2video", ["--preview_every", "inf"], ["--preview_every inf"]),
    ("audio2video", ["--resume"], ["no unfinished render", "without --resume"]),
    ("audio2video", ["--smoothing", "onset:bogus=1"], ["--smoothing"]),
    ("audio2video", ["--H", "65536", "--W", "65536"], ["--H 65536 --W 65536", "memory", "fits"]),
    ("audio2video", ["--device", "cpu", "--cuda_graphs"], ["--cuda_graphs", "CUDA"]),
    ("audio2img", ["--H", "65536", "--W", "65536"], ["--H 65536 --W 65536", "memory", "fits"]),
    ("audio2img", ["--ddim_eta", "inf"], ["--ddim_eta inf"]),
    ("audio2img", ["--device", "cpu", "--cuda_graphs"], ["--cuda_graphs", "CUDA"]),
    ("txt2img", ["--from-file", "TMP/missing.txt"], ["missing.txt", "cannot read"]),
    ("txt2img", ["--outdir", "TMP/a file"], ["is a file"]),
    ("txt2img", ["--H", "65536", "--W", "65536"], ["--H 65536 --W 65536", "memory"]),
    ("img2img", ["--init-img", "TEXT"], ["init image", "not an image"]),
    ("img2img", ["--strength", "1.5"], ["--strength 1.5"]),
    ("img2img", ["--H", "65536", "--W", "65536"], ["--H 65536 --W 65536", "memory"]),
]


@pytest.mark.parametrize("tool,flags,words", MISTAKES, ids=[f"{t} {' '.join(f)}" for t, f, _ in MISTAKES])
def test_mistake_is_refused_before_the_model_loads(run_tool, monkeypatch, files, tool, flags, words):
    for loader in LOADERS:
        monkeypatch.setattr(loader, must_not_load)
    flags = [str(files[f]) if f in files else f for f in flags]
    flags = [flag.replace("TMP/", f"{files['TMP']}/") for flag in flags]
    argv = [*base(tool, files), "--outdir", files["OUT"], *DEMO, *flags]
    if tool == "img2img" and "--init-img" in flags:
        argv = argv[2:]
    status, _, err = run_tool(tool, argv)
    assert_one_line_error(status, err, tool, *words)
    assert not files["OUT"].exists() or snapshot(files["OUT"]) == {}
    assert not list(files["TMP"].rglob("*.render"))


@pytest.mark.parametrize("flags,words", [
    (["--ckpt", "missing.safetensors"], ["checkpoint", "missing.safetensors", "does not exist"]),
    (["--config", "missing.yaml", "--ckpt", "tests/data/tiny-v1/model.safetensors"], ["config", "missing.yaml"]),
    ([], ["no checkpoint in", "stable-diffusion-v1", "--demo"])])
def test_checkpoint_mistakes_are_refused_before_the_sound_is_read(run_tool, monkeypatch, files, flags, words):
    """Without --demo: a checkpoint or config that is not there is refused before the model loads
    and before the sound is analysed (which takes a while for a long song)."""
    import sounddiffusion.video.frame_plan  # noqa: F401 - loaded before CHECKPOINT_DIR is replaced
    from sounddiffusion.model import loading

    monkeypatch.setattr(loading, "CHECKPOINT_DIR", files["TMP"] / "models" / "ldm" / "stable-diffusion-v1")
    monkeypatch.setattr(loading, "V2_CHECKPOINT_DIR", files["TMP"] / "models" / "ldm" / "stable-diffusion-v2")
    for loader in (*LOADERS, "sounddiffusion.video.frame_plan.plan_frames", "sounddiffusion.video.loop.plan_frames"):
        monkeypatch.setattr(loader, must_not_load)
    flags = [str(files["TMP"] / f) if f.startswith("missing") else f for f in flags]
    status, _, err = run_tool("audio2video", ["--path", files["SOUND"], "--outdir", files["OUT"], *flags])
    assert_one_line_error(status, err, "audio2video", *words)


@pytest.mark.parametrize("case", ["fresh start over an unfinished render", "resume with other settings",
                                  "resume while another process renders"])
def test_render_state_mistakes_are_refused_before_the_model_loads(run_tool, monkeypatch, files, case):
    from sounddiffusion.video import loop
    from sounddiffusion.video.render_state import RenderState

    output = files["TMP"] / "song.mp4"
    args = ["--path", files["SOUND"], "--fps", 4, "--output", output, *DEMO]
    monkeypatch.setattr(loop, "next_latent", stop_at_frame(loop.next_latent, 1))
    assert run_tool("audio2video", args)[0] == 130  # frame 0 is saved: an unfinished render
    for loader in LOADERS:
        monkeypatch.setattr(loader, must_not_load)
    state = RenderState(output)
    if case == "fresh start over an unfinished render":
        argv, words = args, ["unfinished render", "add --resume"]
    elif case == "resume with other settings":
        argv, words = [*args, "--resume", "--seed", "7"], ["cannot resume", "seed: 42 then, 7 now"]
    else:
        argv, words = [*args, "--resume"], ["another process is rendering"]
        state.check_resumable(state_record(state))  # holds the lock, as the other process would
    before = snapshot(state.folder)
    status, _, err = run_tool("audio2video", argv)
    state.release()
    assert_one_line_error(status, err, "audio2video", *words)
    assert snapshot(state.folder) == {**before}


def state_record(state) -> dict:
    import json

    return json.loads((state.folder / "settings.json").read_text())
