"""Shared pytest fixtures: where the reference data and real recordings live."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = Path(__file__).resolve().parent / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: these checks need the ../shared folder beside the checkout")
    return path


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
