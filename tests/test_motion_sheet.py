"""scripts/motion_sheet.py: its recipes are the README's, and a small sheet renders on the demo model."""

import numpy as np
from PIL import Image

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
