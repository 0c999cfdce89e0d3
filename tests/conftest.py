"""Shared pytest fixtures: where the reference data and real recordings live."""
import importlib.util
import json
import os
import sys
from pathlib import Path

# The tests run tiny models whose operations are too small to gain from threads; on a busy
# 2-core machine several torch threads per process made them up to 10x slower. Set before
# torch is imported, so subprocesses started by the tests inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = Path(__file__).resolve().parent / "data"


def in_ci() -> bool:
    """True on the project's CI (``CI`` set to true, as .ci/run and CI services do)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _require(path: Path) -> Path:
    """``path`` inside ../shared; without it these conformance checks cannot run: a skip on a
    developer's machine, a failure on CI (where a skipped check must never pass for a checked one)."""
    if not path.exists():
        message = f"{path} is absent: these checks need the ../shared folder beside the checkout"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path



def load_module(path: Path, name: str):
    """The Python file ``path`` (a script, an entry point) executed as a fresh module ``name``,
    registered in sys.modules (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _require(SHARED / "reference")


@pytest.fixture(scope="session")
def audio_dir() -> Path:
    return _require(SHARED / "audio")


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The tiny SD-v1-shaped model: config, weights and golden tensors, copied into tests/data."""
    return DATA / "tiny-v1"


@pytest.fixture(scope="session")
def tiny_sd(tiny_dir) -> dict:
    """The tiny model's state dict, keys laid out as in real SD v1 files."""
    from safetensors.torch import load_file

    return load_file(tiny_dir / "model.safetensors")


@pytest.fixture(scope="session")
def golden(tiny_dir) -> dict:
    """The reference tensors computed with the original CompVis code (see ../shared/reference)."""
    from safetensors.torch import load_file

    return load_file(tiny_dir / "golden.safetensors")


@pytest.fixture(scope="session")
def prompts(tiny_dir) -> list[str]:
    """The prompts the golden text conditionings were computed from."""
    return json.loads((tiny_dir / "golden.json").read_text())["prompts"]


@pytest.fixture
def sound(tmp_path):
    """A 0.5 s tone, mono 44.1 kHz WAV (test modules may define their own)."""
    from cli_checks import write_sound

    return write_sound(tmp_path / "tone.wav", seconds=0.5)


@pytest.fixture
def image(tmp_path):
    """A 64x64 picture of seeded random pixels, as PNG."""
    import numpy as np
    from PIL import Image

    path = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


# The example shell scripts users edit (scripts/device_check.sh is a GPU check, not an example).
EXAMPLE_SCRIPTS = ("images_from_folder.sh", "music_video.sh", "sweep_strength_fps.sh", "video_with_prompt_file.sh")

ENTRY_POINTS = {
    "audio2img": REPO / "audio2img.py",
    "audio2video": REPO / "audio2video.py",
    "live": REPO / "live.py",
    "txt2img": REPO / "scripts" / "txt2img.py",
    "img2img": REPO / "scripts" / "img2img.py",
}


@pytest.fixture
def run_tool(capsys):
    """Run an entry point in this process: ``run_tool("audio2img", [...]) -> (status, stdout, stderr)``.

    It goes through the same ``cli.run`` wrapper as the command line, so exit statuses and the
    one-line error messages are the real ones; only the interpreter start is saved."""
    from sounddiffusion import cli

    def run(name: str, argv: list[str]) -> tuple[int, str, str]:
        module = load_module(ENTRY_POINTS[name], f"entry_{name}")
        capsys.readouterr()
        status = cli.run(module.main, module.build_parser(), [str(a) for a in argv])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


@pytest.fixture
def no_gradients():
    """Autograd off for one test, as the samplers run (``torch.set_grad_enabled(False)`` at a module's
    top would leak into every test that runs after it)."""
    import torch

    with torch.no_grad():
        yield
