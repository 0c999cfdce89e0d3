"""Rules the test suite keeps on CI: a conformance check that cannot find ../shared fails there instead
of skipping (a skipped check must not pass for a checked one)."""
from pathlib import Path

import pytest

from conftest import _require


def test_missing_shared_folder_fails_on_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="need the ../shared folder"):
        _require(Path("/nonexistent/shared/reference"))


def test_missing_shared_folder_skips_elsewhere(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="need the ../shared folder"):
        _require(Path("/nonexistent/shared/reference"))
