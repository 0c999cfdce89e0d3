"""examples/: the committed sounds are what examples/make_examples.py makes, and the tools can read them."""
from pathlib import Path

import numpy as np
import pytest
import soundfile

from conftest import load_module
from sounddiffusion.sound.audio import SAMPLE_RATE, find_audio_files, load_audio

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def make_examples():
    return load_module(EXAMPLES / "make_examples.py", "make_examples")


@pytest.fixture(scope="module")
def regenerated(make_examples, tmp_path_factory):
    return make_examples.write_examples(tmp_path_factory.mktemp("examples"))


def test_committed_files_are_what_the_script_makes(make_examples, regenerated):
    committed = find_audio_files(EXAMPLES / "audio")
    assert [p.name for p in committed] == sorted(f"{name}.wav" for name in make_examples.SOUNDS)
    for fresh in regenerated:
        ours, sr = soundfile.read(EXAMPLES / "audio" / fresh.name, dtype="int16")
        theirs, fresh_sr = soundfile.read(fresh, dtype="int16")
        assert sr == fresh_sr == make_examples.RATE
        assert ours.shape == theirs.shape
        # 1 LSB of slack: another CPU or numpy may round sin/exp differently in the last bit
        assert np.abs(ours.astype(np.int32) - theirs).max() <= 1, f"{fresh.name} differs: run examples/make_examples.py"


def test_script_is_deterministic(make_examples, regenerated, tmp_path):
    again = make_examples.write_examples(tmp_path)
    for first, second in zip(regenerated, again):
        assert first.read_bytes() == second.read_bytes()


def test_examples_load_and_are_small():
    paths = find_audio_files(EXAMPLES / "audio")
    assert sum(p.stat().st_size for p in paths) < 2 * 1024 * 1024
    for path in paths:
        info = soundfile.info(path)
        assert info.channels == 1 and 2.0 <= info.duration <= 4.0
        y = load_audio(path)
        assert len(y) == info.frames * SAMPLE_RATE // info.samplerate
        assert np.isfinite(y).all() and 0.5 < np.abs(y).max() <= 1.0
