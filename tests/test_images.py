"""PNG outputs: numbering, embedded parameters, byte-stable writes, grids, init images, errors."""
import errno
import io
import os

import numpy as np
import pytest
from PIL import Image

from sounddiffusion import files
from sounddiffusion.errors import OutputError, UserError
from sounddiffusion.files import ensure_output_dir, next_numbered_path
from sounddiffusion.images import load_init_image, make_grid, read_png_parameters, save_png

PARAMETERS = {"prompt": "a café at night, 夜", "seed": 42, "scale": 7.5, "ddim_steps": 50,
              "checkpoint": "sd-v1-4.ckpt", "checkpoint_hash": "0123456789",
              "flags": ["--plms", "--n_iter", "2"], "init_img": None}


def gradient(height: int, width: int, shift: int = 0) -> np.ndarray:
    """An (H, W, 3) uint8 test picture whose pixels all differ from their neighbours."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 7 + shift) % 256, (y * 5 + shift) % 256, (x + y + shift) % 256],
                    axis=-1).astype(np.uint8)


def test_numbering_continues_after_the_highest_number(tmp_path):
    missing = tmp_path / "missing"
    assert next_numbered_path(missing, "grid") == missing / "grid-00000.png"
    assert next_numbered_path(tmp_path, "sample") == tmp_path / "sample-00000.png"
    for name in ["sample-00000.png", "sample-00007.png", "sample-12.png", "sample-00099.jpg",
                 "other-00500.png", "sample-xyz.png", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert next_numbered_path(tmp_path, "sample") == tmp_path / "sample-00013.png"
    assert next_numbered_path(tmp_path, "sample", ext=".jpg") == tmp_path / "sample-00100.jpg"
    assert next_numbered_path(tmp_path, "other", digits=3) == tmp_path / "other-501.png"


def test_save_png_never_overwrites(tmp_path):
    path = save_png(gradient(16, 24), tmp_path / "a.png", PARAMETERS)
    before = path.read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        save_png(gradient(16, 24, shift=3), path, PARAMETERS)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_pixels_and_parameters_round_trip(tmp_path):
    image = gradient(16, 24)
    path = save_png(image, tmp_path / "a.png", PARAMETERS)
    with Image.open(path) as picture:
        assert picture.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(picture), image)
    assert read_png_parameters(path) == PARAMETERS
    assert read_png_parameters(save_png(image, tmp_path / "b.png", None)) == {}


def test_same_inputs_give_identical_bytes(tmp_path):
    first = save_png(gradient(16, 24), tmp_path / "a.png", PARAMETERS).read_bytes()
    second = save_png(gradient(16, 24), tmp_path / "b.png", dict(reversed(PARAMETERS.items())))
    assert second.read_bytes() == first
    third = save_png(gradient(16, 24), tmp_path / "c.png", {**PARAMETERS, "seed": 43})
    assert third.read_bytes() != first


def test_grid_layout_like_torchvision():
    tiles = [np.full((4, 6, 3), 10 * (i + 1), np.uint8) for i in range(5)]
    grid = make_grid(tiles, n_rows=2)
    # 2 per row -> 3 rows; 2 px border around and between tiles.
    assert grid.shape == (3 * (4 + 2) + 2, 2 * (6 + 2) + 2, 3)
    for index, tile in enumerate(tiles):
        top, left = 2 + (index // 2) * 6, 2 + (index % 2) * 8
        np.testing.assert_array_equal(grid[top:top + 4, left:left + 6], tile)
    assert grid[:2].max() == 0 and grid[:, :2].max() == 0 and grid[6:8].max() == 0
    assert grid[14:18, 10:16].max() == 0  # the empty sixth cell stays black
    assert make_grid(tiles[:3], n_rows=4).shape == (1 * 6 + 2, 3 * 8 + 2, 3)
    assert make_grid(tiles[:1], n_rows=2) is tiles[0]


def test_grid_refuses_mixed_sizes():
    with pytest.raises(ValueError):
        make_grid([np.zeros((4, 6, 3), np.uint8), np.zeros((6, 4, 3), np.uint8)], n_rows=2)


def striped_picture(path, width, height, horizontal):
    """Three equal stripes red / green / blue, left to right (or top to bottom)."""
    image = np.zeros((height, width, 3), np.uint8)
    for band in range(3):
        if horizontal:
            image[:, band * width // 3:(band + 1) * width // 3, band] = 255
        else:
            image[band * height // 3:(band + 1) * height // 3, :, band] = 255
    Image.fromarray(image).save(path)


@pytest.mark.parametrize("width, height, horizontal", [(300, 90, True), (90, 300, False),
                                                       (31, 17, True)])
def test_init_image_is_scaled_to_cover_and_center_cropped(tmp_path, width, height, horizontal):
    path = tmp_path / "init.png"
    striped_picture(path, width, height, horizontal)
    fitted = load_init_image(path, 64, 48)
    assert fitted.shape == (48, 64, 3) and fitted.dtype == np.uint8
    if width / height > 64 / 48:
        # Wide: the sides are cut, the full height of the middle stripe stays in the middle.
        middle = fitted[:, 28:36]
        assert (middle[..., 1] > 200).all() and (middle[..., 0] < 50).all()
    else:
        # Tall: top and bottom are cut; the middle stripe covers more than a third.
        assert (fitted[20:28, :, 1] > 200).all()
        assert (fitted[:, :, 1] > 128).mean() > 0.4


def test_init_image_modes_become_rgb(tmp_path):
    Image.fromarray(np.full((10, 10, 4), 200, np.uint8), mode="RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.full((10, 10), 90, np.uint8), mode="L").save(tmp_path / "g.jpg")
    assert load_init_image(tmp_path / "a.png", 8, 8).shape == (8, 8, 3)
    assert np.abs(load_init_image(tmp_path / "g.jpg", 8, 8).astype(int) - 90).max() <= 2


def test_init_image_errors_say_what_is_wrong(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = save_png(noise, tmp_path / "whole.png", None).read_bytes()
    (tmp_path / "half.png").write_bytes(whole[:len(whole) // 2])
    cases = {tmp_path / "missing.png": "does not exist", tmp_path: "is a folder",
             tmp_path / "notes.png": "not an image", tmp_path / "half.png": "damaged"}
    for path, message in cases.items():
        with pytest.raises(UserError, match=message) as caught:
            load_init_image(path, 64, 64)
        assert str(path) in str(caught.value)


def test_disk_full_leaves_nothing_behind(tmp_path, monkeypatch):
    class FullDisk(io.FileIO):
        """Takes a few bytes, then reports a full disk, like a write near the end of space."""

        def write(self, data):
            super().write(bytes(data)[:8])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: FullDisk(fd, "wb"))
    with pytest.raises(OutputError, match="disk full while writing .*a.png"):
        save_png(gradient(16, 16), tmp_path / "a.png", PARAMETERS)
    assert list(tmp_path.iterdir()) == []


def test_permission_denied_while_writing(tmp_path, monkeypatch):
    def refuse(folder, stem):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(files, "create_temp_file", refuse)
    with pytest.raises(OutputError, match="no permission to write"):
        save_png(gradient(8, 8), tmp_path / "a.png", None)
    with pytest.raises(OutputError, match=f"{tmp_path} is not writable"):
        ensure_output_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_ensure_output_dir_creates_nested_folders(tmp_path):
    folder = ensure_output_dir(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_ensure_output_dir_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(OutputError, match="taken is a file"):
        ensure_output_dir(tmp_path / "taken")
    with pytest.raises(OutputError, match="cannot create output folder .*taken/sub"):
        ensure_output_dir(tmp_path / "taken" / "sub")


def test_read_only_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user that permissions do not stop (root); "
                        "test_permission_denied_while_writing simulates it")
        with pytest.raises(OutputError, match="not writable"):
            ensure_output_dir(folder)
        with pytest.raises(OutputError, match="no permission"):
            save_png(gradient(8, 8), folder / "a.png", None)
        with pytest.raises(OutputError, match="cannot create output folder"):
            ensure_output_dir(folder / "sub")
    finally:
        folder.chmod(0o700)


def test_reports_never_replace_a_file(tmp_path):
    target = tmp_path / "tables" / "bench.md"
    first = files.write_new_text(target, "first table\n")
    second = files.write_new_text(target, "second table ü\n")
    assert (first, second) == (target, tmp_path / "tables" / "bench-0001.md")
    assert target.read_text() == "first table\n"
    assert second.read_text(encoding="utf-8") == "second table ü\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["bench-0001.md", "bench.md"]  # no temp left
