"""The memory a picture size needs: the estimate against peaks measured by scripts/measure_memory.py,
and sizes that cannot fit refused in one line before anything loads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sounddiffusion.jobs.image_jobs
import sounddiffusion.video.loop  # noqa: F401 - imported before the loaders are replaced (they bind them)
from cli_checks import TINY, assert_one_line_error, write_sound
from conftest import load_module
from sounddiffusion.model import memory
from sounddiffusion.model.configs import load_config
from sounddiffusion.settings import DEFAULT_CONFIG, DEMO_CONFIG

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peaks with Linux's /proc")
def test_decoder_estimate_is_near_the_measured_peak():
    """One decode each, in a fresh process, measured by scripts/measure_memory.py (the demo's block
    means at 1024x1024, tiny-v1's KL decoder at 384x384; the command it prints for SD v1 is in
    memory.py's docstring). The estimate may be lower (it is what a run needs at least) but not far
    off either way."""
    measuring = load_module(REPO / "scripts" / "measure_memory.py", "measure_memory")
    for config, size in [(DEMO_CONFIG, 1024), (REPO / "tests/data/tiny-v1/config.yaml", 384)]:
        measured = measuring.measure_in_fresh_process("decoder", size, config)
        estimated = memory.memory_needed(load_config(config), size, size)  # no weights: the decode alone
        assert 0.5 * measured <= estimated <= 1.3 * measured, (Path(config).name, estimated / MiB, measured / MiB)


def test_formula_of_the_docstring():
    """SD v1 at 512x512 on a CPU, float32, written out: the decoder's 6 values per pixel and
    channel (ch 128) plus its middle attention's (64*64)^2 scores outweigh the UNet's 2 x 64*64
    positions x 320 channels x 23."""
    config = load_config(DEFAULT_CONFIG)
    unet = 2 * 64 * 64 * 320 * 23
    decoder = 512 * 512 * 128 * 6 + (64 * 64) ** 2
    assert memory.memory_needed(config, 512, 512, weight_bytes=10) == 10 + 4 * max(unet, decoder)
    assert memory.memory_needed(config, 512, 512, device_type="cuda", value_bytes=2) == 2 * 512 * 512 * 128 * 6
    assert memory.memory_needed(config, 512, 512, pictures=3) == 3 * 4 * max(unet, decoder)
    demo = load_config(DEMO_CONFIG)
    assert memory.memory_needed(demo, 256, 256) == 4 * max(2 * 32 * 32 * 32 * 23, 256 * 256 * 43)


def test_available_memory_of_each_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * 2**30, 80 * 2**30))
    assert memory.available_memory(torch.device("cuda")) == 5 * 2**30
    free = memory.available_memory(torch.device("cpu"))
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":") for line in f)
    assert abs(free - int(fields["MemAvailable"].split()[0]) * 1024) < 256 * MiB  # read a moment apart


def _no_loading(monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded")
    for name in ("sounddiffusion.model.loading.load_engine", "sounddiffusion.jobs.image_jobs.load_engine",
                 "sounddiffusion.video.loop.load_engine"):
        monkeypatch.setattr(name, must_not_load)


@pytest.mark.parametrize("tool", ["audio2img", "audio2video", "txt2img"])
def test_size_that_cannot_fit_is_refused_before_anything_loads(run_tool, tmp_path, monkeypatch, tool):
    """With 1 GiB free: 4096x4096 on the demo model needs about 2.7 GiB (its block-mean decoder:
    43 values of 4 bytes per pixel); the one line names the size, the need, what is free and a
    size that fits. Nothing is written, no render state is left."""
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 2**30)
    _no_loading(monkeypatch)
    sound = write_sound(tmp_path / "tone.wav", seconds=0.5)
    inputs = {"audio2img": ["--prompt", sound], "audio2video": ["--path", sound], "txt2img": []}[tool]
    status, _, err = run_tool(tool, [*inputs, "--outdir", tmp_path / "out", "--demo", "--H", "4096", "--W", "4096"])
    line = assert_one_line_error(status, err, tool, "--H 4096 --W 4096", "a 4096x4096 picture needs about 2.7 GiB",
                                 "1.0 GiB memory available", "about 2432x2432 fits")
    assert "(the model 21 MiB)" in line
    assert not (tmp_path / "out").exists()


def test_pictures_sampled_together_count(run_tool, tmp_path, monkeypatch):
    """audio2img of a folder samples --batch_size sounds x --n_samples pictures at once."""
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 2**30)
    _no_loading(monkeypatch)
    folder = tmp_path / "sounds"
    folder.mkdir()
    write_sound(folder / "a.wav", seconds=0.5)
    status, _, err = run_tool("audio2img", ["--input_folder", folder, "--outdir", tmp_path / "out", "--demo",
                                            "--H", "1536", "--W", "1536", "--batch_size", "2", "--n_samples", "3"])
    assert_one_line_error(status, err, "audio2img", "6 pictures of 1536x1536", "fewer pictures at once")


def test_size_that_fits_renders(run_tool, tmp_path, monkeypatch):
    """The tiny checkpoint at 64x64 needs a few MiB: with 1 GiB free it renders."""
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 2**30)
    status, _, err = run_tool("txt2img", ["--outdir", tmp_path, *TINY])
    assert status == 0, err
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def test_without_a_known_free_memory_every_size_passes(monkeypatch):
    from sounddiffusion.model.memory import check_memory
    from sounddiffusion.settings import ModelSettings

    monkeypatch.setattr(memory, "available_memory", lambda device=None: None)
    check_memory(ModelSettings(demo=True), torch.device("cpu"), 65536, 65536, 1)
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 2**30)
    with pytest.raises(Exception, match="65536x65536"):
        check_memory(ModelSettings(demo=True), torch.device("cpu"), 65536, 65536, 1)


def test_taesd_decoder_is_what_the_memory_check_counts_with_vae(monkeypatch):
    """--vae decodes with TAESD: 64 channels x 4 values per pixel (scripts/measure_memory.py
    --parts taesd), no attention, instead of SD v1's KL decoder (128 x 6 and its CPU attention).
    At 1024x1024 on SD v1, float32, the weights 4.3 GB: the KL run needs about 8.6 GB, the TAESD
    run about 5.4 GB, so with 6 GiB free only the TAESD run passes."""
    from sounddiffusion.model.memory import check_memory
    from sounddiffusion.settings import ModelSettings

    config = load_config(DEFAULT_CONFIG)
    unet, taesd = 2 * 128 * 128 * 320 * 23, 1024 * 1024 * 64 * 4
    assert memory.memory_needed(config, 1024, 1024, taesd=True) == 4 * max(unet, taesd)
    assert memory.memory_needed(config, 1024, 1024, device_type="cuda", taesd=True) == 4 * max(unet, taesd)
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 6 * 2**30)
    with pytest.raises(Exception, match="1024x1024 picture needs about 8.0 GiB"):
        check_memory(ModelSettings(), torch.device("cpu"), 1024, 1024, 1)
    check_memory(ModelSettings(vae="taesd:models/taesd"), torch.device("cpu"), 1024, 1024, 1)
