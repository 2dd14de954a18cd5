"""Every registered method runs with its default parameters (issue 12: "every default must run").

Only the training budget and the patch size change; ImageNet weights come through the
documented lookup (``$HE2ST_WEIGHTS_DIR`` with torchvision's file names), here filled with
randomly initialised state dicts of the right architectures (no download).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from he2st.encoders import WeightsError
from he2st.errors import RandomWeightsWarning
from he2st.methods import create_method, list_methods

#: Smallest training budget of each method's own parameter names (patch_px: the cohort's 32 px).
BUDGET = {"epochs": 1, "n_models": 1, "n_members": 2, "batch_size": 64}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """Three tiny slides: the defaults' 224 px encoders see every spot, so keep them few."""
    from he2st.datasets import synthetic

    return synthetic(n_slides=3, n_spots=16, n_genes=8, patch_px=32, seed=1, root=tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imagenet")
    _fake_imagenet(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", list_methods())
def test_every_default_fits(name: str, tiny, imagenet_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HE2ST_WEIGHTS_DIR", str(imagenet_dir))
    genes = list(map(str, tiny[0].var_names))
    train, test = [tiny[0], tiny[1]], tiny[2]
    base = {"method": "mean"} if name in ("ensemble", "smooth") else {}
    cls_defaults = create_method(name, **base).params
    over = {k: v for k, v in BUDGET.items() if k in cls_defaults}
    if "patch_px" in cls_defaults:
        over["patch_px"] = 32
    m = create_method(name, **base, **over)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.fit(train, genes)
    pred = m.predict(test)
    assert pred.shape == (test.n_obs, len(m.genes)), name
    assert np.isfinite(pred).all(), name
    random = [w for w in caught if issubclass(w.category, RandomWeightsWarning)]
    # Random encoders warn once per fit: frozen ones (CMRCNet's default ViT-B/32 tokens) in Method.fit,
    # HGGEP's trained random ShuffleNet in its own fit (Hist2ST's ConvMixer has no pretrained weights).
    assert len(random) == (1 if m.pretrained is False and name != "hist2st" else 0), (name, random)


def _fake_imagenet(folder: Path) -> None:
    """Random-init checkpoints under torchvision's names for the default ImageNet CNNs."""
    from he2st.encoders._base import create_encoder

    for enc_name, file in (("resnet50", "resnet50-0676ba61.pth"), ("densenet121", "densenet121-a639ec97.pth"),
                           ("vgg16", "vgg16-397923af.pth"), ("resnet18", "resnet18-f37072fd.pth"),
                           ("shufflenet_v2_x0_5", "shufflenetv2_x0.5-f707e7126e.pth")):
        enc = create_encoder(enc_name)
        enc.model.half()  # fp16 halves the files (VGG16: 264 MB); loading casts back to float32
        enc.save(folder / file)


def test_missing_imagenet_file_fails_at_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HE2ST_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as err:
        create_method("bleep")
    msg = str(err.value)
    for expected in (tmp_path / "weights" / "resnet50-0676ba61.pth", tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"):
        assert str(expected) in msg
    assert "HE2ST_WEIGHTS_DIR" in msg


def test_torch_hub_cache_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from he2st.encoders._base import resolve_weights

    monkeypatch.delenv("HE2ST_WEIGHTS_DIR")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    f = tmp_path / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    f.parent.mkdir(parents=True)
    f.touch()
    assert resolve_weights("densenet121", "imagenet") == f
    assert create_method("stnet").pretrained is True


def test_random_weights_recorded_and_saved_models_load_without_files(cohort, genes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = create_method("ridge", encoder="color_stats", weights=None, patch_px=32)
    assert m.pretrained is None  # colour statistics have no weights
    c = create_method("cmrcnet")
    assert c.pretrained is False
    m.fit([cohort[0]], genes).save(tmp_path / "m")
    # A saved model's encoder weights are in its state: loading needs no ImageNet file.
    cfg = tmp_path / "m" / "method.json"
    d = json.loads(cfg.read_text())
    d["params"].update(encoder="resnet50", weights="imagenet")
    cfg.write_text(json.dumps(d))
    monkeypatch.setenv("HE2ST_WEIGHTS_DIR", str(tmp_path / "none"))
    from he2st.methods import load_method

    assert load_method(tmp_path / "m").genes == m.genes
