"""scripts/benchmark_motion.py: the edge-contrast measure, --sharpness's table, and bad counts and
sizes refused as one line before the model loads."""

import numpy as np
import pytest

from cli_checks import stderr_lines
from conftest import REPO, load_module


@pytest.fixture
def bench():
    return load_module(REPO / "scripts" / "benchmark_motion.py", "benchmark_motion")


def test_edge_contrast_is_the_mean_neighbour_difference_of_the_grey_picture(bench):
    stripes = np.zeros((6, 8, 3), np.uint8)
    stripes[:, 1::2] = 255  # across: every difference 255; down: none
    assert bench.edge_contrast(stripes) == pytest.approx(255 / 2)
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = picture.astype(float).mean(axis=2)
    across = np.mean([abs(grey[y, x + 1] - grey[y, x]) for y in range(5) for x in range(6)])
    down = np.mean([abs(grey[y + 1, x] - grey[y, x]) for y in range(4) for x in range(7)])
    assert bench.edge_contrast(picture) == pytest.approx((across + down) / 2)
    blurred = ((picture.astype(float) + np.roll(picture, 1, axis=1)) / 2).astype(np.uint8)
    assert bench.edge_contrast(blurred) < bench.edge_contrast(picture)


def test_sharpness_table_a_whole_cell_latent_pan_keeps_the_picture(bench, tmp_path, monkeypatch):
    """Small and short here (64x64, 4 moves); the README's figures are the default 128x128, 15 moves.
    A pan of one whole latent cell with wrap moves the latent exactly (the demo decoder's edges
    aside); an eighth of a cell resamples it bilinearly on every move and blurs."""
    monkeypatch.setattr(bench, "SHARPNESS_FRAMES", 5)
    monkeypatch.setattr(bench, "SHARPNESS_SIZE", 64)
    out = tmp_path / "sharp.md"
    assert bench.main(["--sharpness", "--out", str(out)]) == 0
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if "px a frame" in line]
    kept = {(row[0].strip(), row[1].strip()): float(row[2].strip(" %")) for row in rows}
    assert set(kept) == {("1 px a frame", "pixel"), ("1 px a frame", "latent"), ("8 px a frame", "pixel"),
                         ("8 px a frame", "latent")}
    assert kept["8 px a frame", "latent"] > 95
    assert kept["1 px a frame", "latent"] < kept["1 px a frame", "pixel"] < 100
    assert kept["1 px a frame", "latent"] < kept["8 px a frame", "latent"] - 20
    assert "frame 4" in out.read_text() and "levels" in out.read_text()


@pytest.mark.parametrize("argv, words", [
    (["--frames", "0"], "--frames 0: use 1 or more"),
    (["--rounds", "0"], "--rounds 0: use 1 or more"),
    (["--sizes", "256", "100"], "--sizes 100: use multiples of 64"),
])
def test_bad_counts_and_sizes_are_one_line_before_the_model_loads(bench, capsys, monkeypatch, argv, words):
    monkeypatch.setattr(bench, "load_engine", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exited:
        bench.main(argv)
    lines = stderr_lines(capsys.readouterr().err)
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("benchmark_motion.py: error: ") and words in lines[0]
