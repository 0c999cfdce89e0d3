"""scripts/motion_sheet.py: its recipes are the README's, a small sheet renders on the demo model,
bad counts and sizes are one line before the model loads."""

import numpy as np
import pytest
from PIL import Image

from cli_checks import stderr_lines
from conftest import REPO, load_module
from sounddiffusion.settings import VideoSettings
from sounddiffusion.video.frame_plan import plan_frames


def load_script():
    return load_module(REPO / "scripts" / "motion_sheet.py", "motion_sheet")


def test_the_recipes_are_the_readmes_and_move_the_camera():
    sheet = load_script()
    readme = (REPO / "README.md").read_text()
    assert set(sheet.RECIPES) == {"fly-in", "turn", "pan"}
    for name, (flags, shown) in sheet.RECIPES.items():
        camera = {flag: value for flag, value in flags.items() if flag != "strength"}
        for flag, value in camera.items():
            assert f'--{flag} "{value}"' in readme, (name, flag)
        settings = VideoSettings(audio=str(sheet.SOUND), fps=12, **flags)
        assert settings.camera_moves() and shown in camera
        plan = plan_frames(settings)
        assert np.ptp(plan.values[shown]) > 0, name  # the music moves it


def test_a_small_sheet_renders_two_rows_of_labelled_frames(tmp_path, monkeypatch):
    from sounddiffusion import cli

    sheet = load_script()
    monkeypatch.setattr(sheet, "COLUMNS", 2)
    out = tmp_path / "sheet.png"
    status = cli.run(sheet.main, sheet.build_parser(),
                     [str(out), "--size", "64", "--tiles", "3", "--every", "4", "--steps", "4"])
    assert status == 0
    pixels = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert pixels.shape == (2 * (64 + sheet.LABEL_HEIGHT), 2 * 64, 3)
    first, second = pixels[:64, :64], pixels[:64, 64:]
    assert np.abs(first - second).mean() > 5  # frame 4 is not frame 0: the camera flew in
    assert (pixels[64:64 + sheet.LABEL_HEIGHT, :64] < 128).any()  # a label below the tile


@pytest.mark.parametrize("argv, words", [
    (["--tiles", "0"], "--tiles 0: use 1 or more"),
    (["--every", "-1"], "--every -1: use 1 or more"),
    (["--steps", "0"], "--steps 0: use 1 or more"),
    (["--size", "100"], "--size 100: use a multiple of 64"),
    (["--size", "0"], "--size 0: use a multiple of 64"),
])
def test_bad_counts_and_sizes_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, argv, words):
    from sounddiffusion import cli
    from sounddiffusion.model import loading

    sheet = load_script()
    monkeypatch.setattr(loading, "load_engine", lambda *a, **k: pytest.fail("the model was loaded"))
    status = cli.run(sheet.main, sheet.build_parser(), [str(tmp_path / "sheet.png"), *argv])
    lines = stderr_lines(capsys.readouterr().err)
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("motion_sheet.py: error: ") and words in lines[0]
    assert not (tmp_path / "sheet.png").exists()
