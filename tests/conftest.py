"""Shared test fixtures.

Real data lives in ``../shared/data`` beside the repository (CI has it too);
tests that need it use the ``shared_data`` fixture and skip cleanly when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HE2ST_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own on-disk cache, so runs never depend on each other."""
    monkeypatch.setenv("HE2ST_CACHE", str(tmp_path_factory.mktemp("he2st-cache")))
    monkeypatch.setenv("HE2ST_QUIET", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def her2st_root(shared_data: Path) -> Path:
    root = shared_data / "her2st"
    if not (root / "ST-cnts").is_dir():
        pytest.skip(f"{root} is absent")
    return root


@pytest.fixture(scope="session")
def squidpy_root(shared_data: Path) -> Path:
    root = shared_data / "visium_mouse_brain_crop_squidpy"
    if not (root / "test_data.h5ad").is_file():
        pytest.skip(f"{root} is absent")
    return root
