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


#: torchvision's ImageNet file names of the encoders that methods default to (weights="imagenet").
IMAGENET_FILES = ("resnet50-0676ba61.pth", "densenet121-a639ec97.pth", "vgg16-397923af.pth", "resnet18-f37072fd.pth")


@pytest.fixture(scope="session")
def _placeholder_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("weights-placeholders")
    for name in IMAGENET_FILES:
        (folder / name).touch()
    return folder


@pytest.fixture(autouse=True)
def _weights_dirs(_placeholder_weights: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Methods check at construction that their default ImageNet files exist (he2st never downloads).

    Empty placeholders satisfy that check, so tests may build default methods to read their
    parameters; a test that loads them must pass weights=None or real files (test_defaults_run.py).
    TORCH_HOME points to an empty folder so that a developer's own hub cache never leaks in.
    """
    monkeypatch.setenv("HE2ST_WEIGHTS_DIR", str(_placeholder_weights))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("he2st-cache-module"))


@pytest.fixture
def syn_root(_module_cache: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Synthetic-cohort cache root shared by a module's tests.

    One cache (synthetic images, colour-statistics features) per test module:
    deterministic content, built once instead of per test.
    """
    monkeypatch.setenv("HE2ST_CACHE", _module_cache)
    return str(Path(_module_cache) / "synthetic")


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


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread per test module (module scope, so module-scoped fitted models are
    covered too): the CI machine has 2 cores, and intra-op threads measured several
    times slower than one when other processes share them."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory):
    """3 synthetic slides x 120 spots x 20 genes, 32 px patches: the method tests' cohort."""
    from he2st.datasets import synthetic

    return synthetic(n_slides=3, n_spots=120, n_genes=20, patch_px=32, seed=0, root=tmp_path_factory.mktemp("syn"))


@pytest.fixture(scope="module")
def cohort(tiny_cohort):
    """The cohort a method test trains on (a test module may override it with its own)."""
    return tiny_cohort


@pytest.fixture(scope="module")
def genes(cohort):
    """All genes of the (possibly overridden) ``cohort``."""
    return list(map(str, cohort[0].var_names))
