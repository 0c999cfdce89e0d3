"""audio2img.py end to end on the demo model: files, sizes, metadata, determinism, sound matters."""

import shutil

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from sounddiffusion.images import read_png_parameters

FAST = ["--demo", "--H", "64", "--W", "128", "--ddim_steps", "3", "--seed", "7"]


def _synth(path, seconds=1.0, freq=440.0, sr=22050):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.5 * np.sin(2 * np.pi * freq * t) * np.exp(-2 * t)).astype(np.float32), sr)
    return path


@pytest.fixture
def sound_folder(tmp_path, audio_dir):
    folder = tmp_path / "sounds"
    folder.mkdir()
    shutil.copy(audio_dir / "Beethoven_chord1.wav", folder / "beethoven.wav")
    _synth(folder / "tone.wav")
    (folder / "notes.txt").write_text("not a sound, not picked up")
    return folder


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_folder_of_sounds(run_tool, sound_folder, tmp_path):
    outdir = tmp_path / "out"
    status, _, err = run_tool("audio2img", ["--input_folder", sound_folder, "--outdir", outdir,
                                            "--feature", "fft", "--n_samples", "2", "--batch_size", "2", *FAST])
    assert status == 0, err
    for name in ("beethoven", "tone"):
        images = sorted((outdir / name).glob("fft-*.png"))
        assert [p.name for p in images] == ["fft-00000.png", "fft-00001.png"]
        assert (outdir / name / "grid-0000.png").exists()
        assert Image.open(images[0]).size == (128, 64)
        params = read_png_parameters(images[0])
        assert params["sound"].endswith(f"{name}.wav")
        assert params["feature"] == "fft" and params["checkpoint"] == "demo"
        assert params["seed"] == 7 and read_png_parameters(images[1])["seed"] == 8
        assert params["H"] == 64 and params["W"] == 128 and params["ddim_steps"] == 3
    # Same seed, different sounds: the conditioning alone makes the pictures differ.
    a, b = _pixels(outdir / "beethoven" / "fft-00000.png"), _pixels(outdir / "tone" / "fft-00000.png")
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1


def test_same_inputs_same_bytes_and_no_overwrite(run_tool, tmp_path):
    sound = _synth(tmp_path / "tone.wav")
    outdir = tmp_path / "out"
    for _ in range(2):
        status, _, err = run_tool("audio2img", ["--audio", sound, "--outdir", outdir,
                                                "--feature", "melspectrogram", *FAST])
        assert status == 0, err
    first, second = outdir / "tone" / "melspectrogram-00000.png", outdir / "tone" / "melspectrogram-00001.png"
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("feature", ["waveform", "fft", "melspectrogram", "mfcc"])
def test_silent_and_10ms_sounds_give_real_images(run_tool, tmp_path, feature):
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(22050, np.float32), 22050)
    short = _synth(tmp_path / "short.wav", seconds=0.01)
    outdir = tmp_path / "out"
    for sound in (silent, short):
        status, _, err = run_tool("audio2img", ["--prompt", sound, "--outdir", outdir, "--feature", feature,
                                                "--textprompt", "a bell", "--normalize", "text-range", *FAST])
        assert status == 0, err
        image = _pixels(outdir / sound.stem / f"{feature}-00000.png")
        assert image.shape == (64, 128, 3) and image.std() > 1  # a picture, not a flat field


def test_from_file_list(run_tool, tmp_path):
    sounds = [_synth(tmp_path / f"s{i}.wav", freq=200 + 300 * i) for i in range(3)]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(map(str, sounds)) + "\n")
    status, _, err = run_tool("audio2img", ["--from-file", listing, "--outdir", tmp_path / "out",
                                            "--skip_grid", *FAST])
    assert status == 0, err
    assert sorted(p.parent.name for p in (tmp_path / "out").glob("*/fft-00000.png")) == ["s0", "s1", "s2"]


def test_batching_does_not_change_images(run_tool, tmp_path):
    folder = tmp_path / "sounds"
    folder.mkdir()
    for i in range(3):
        _synth(folder / f"s{i}.wav", freq=300 + 200 * i)
    for batch in ("1", "3"):
        status, _, err = run_tool("audio2img", ["--input_folder", folder, "--outdir", tmp_path / f"b{batch}",
                                                "--batch_size", batch, *FAST])
        assert status == 0, err
    for i in range(3):
        one = _pixels(tmp_path / "b1" / f"s{i}" / "fft-00000.png").astype(int)
        three = _pixels(tmp_path / "b3" / f"s{i}" / "fft-00000.png").astype(int)
        # Batched convolutions may round differently in the last bit, never visibly.
        assert np.abs(one - three).max() <= 2
