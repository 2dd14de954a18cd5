"""DeepSpaCE (he2st.methods.deepspace)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from he2st.pp.normalize import Normalizer
from he2st.methods import create_method, load_method
from he2st.methods.deepspace import MinMaxScaler
from _helpers import mean_pcc

FAST = dict(encoder="color_stats", weights=None, hidden=256, lr=1e-2, epochs=20, batch_size=32, augment="none")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    from he2st.datasets import synthetic

    return synthetic(n_slides=4, n_spots=120, n_genes=20, patch_px=32, root=tmp_path_factory.mktemp("syn"))




def test_defaults_are_the_papers() -> None:
    p = create_method("deepspace").params
    assert (p["encoder"], p["patch_px"], p["patch_scale"], p["optimizer"]) == ("vgg16", None, 1.5, "adam")
    assert (p["lr"], p["weight_decay"], p["batch_size"], p["epochs"], p["patience"]) == (1e-4, 1e-4, 128, 10, 5)
    assert p["max_mean_rgb"] == 0.8 and p["hidden"] == 0 and p["mode"] == "frozen"  # the repository's head: one layer on fc7


def test_minmax_scaler_hand_values() -> None:
    a = np.array([[0.0, 5.0, 2.0], [2.0, 1.0, 2.0]])
    b = np.array([[1.0, 3.0, 2.0]])
    sc = MinMaxScaler().fit([a, b])
    np.testing.assert_array_equal(sc.min_, [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(sc.span_, [2.0, 4.0, 1.0])  # constant gene: span 1
    np.testing.assert_allclose(sc.transform(a), [[0, 1, 0], [1, 0, 0]])
    # Values outside the training range are not clipped, and the inverse is exact.
    c = np.array([[-2.0, 9.0, 4.0]])
    np.testing.assert_allclose(sc.transform(c), [[-1.0, 2.0, 2.0]])
    np.testing.assert_allclose(sc.inverse_transform(sc.transform(c)), c, rtol=1e-6)


def test_scaling_fitted_on_training_slides_only(cohort) -> None:
    genes = list(cohort[0].var_names)
    train, test = [cohort[0], cohort[1]], cohort[2]
    m = create_method("deepspace", **{**FAST, "epochs": 1}).fit(train, genes)
    ytr = np.concatenate([m.targets(s) for s in train])
    np.testing.assert_allclose(m.scaler_.min_, ytr.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(m.scaler_.min_ + m.scaler_.span_, ytr.max(axis=0), rtol=1e-6)
    # The same numbers as he2st's 'minmax' normaliser fitted on the training slides.
    ref = Normalizer("minmax").fit(train, genes)
    np.testing.assert_allclose(m.scaler_.min_, ref.min_, rtol=1e-6)
    # The test slide does not move them: its range differs.
    yte = m.targets(test)
    assert not np.allclose(yte.min(axis=0), m.scaler_.min_)
    # Predictions come back on the normalised scale through the exact inverse.
    out = torch.from_numpy(m.scaler_.transform(yte))
    np.testing.assert_allclose(m._decode(out)["mean"], yte, rtol=1e-5, atol=1e-5)


def test_patch_is_one_and_a_half_spot_diameters(cohort) -> None:
    m = create_method("deepspace")
    d = cohort[0].uns["he2st"]["spot_diameter_px"]
    assert m._patch_px(cohort[0]) == round(1.5 * d)
    assert create_method("deepspace", patch_px=40)._patch_px(cohort[0]) == 40


def test_white_tiles_dropped_from_training_but_predicted(cohort) -> None:
    genes = list(cohort[0].var_names)
    s = cohort[0].copy()
    # Move two spots onto the glass in the image corner: their tiles are white.
    s.obsm["spatial"] = s.obsm["spatial"].copy()
    s.obsm["spatial"][:2] = [[6.0, 6.0], [8.0, 5.0]]
    m = create_method("deepspace", **{**FAST, "epochs": 2})
    m.fit([s, cohort[1]], genes)
    flags = m.flagged_spots(s)
    assert flags[:2].all()
    # The rule: mean over the tile's pixels and channels above 0.8 * 255 (fatty, white areas too).
    from he2st.image import extract_patches

    tiles = extract_patches(s, size_px=m._patch_px(s)).images.astype(np.float64)
    np.testing.assert_array_equal(flags, tiles.mean(axis=(1, 2, 3)) > 204.0)
    assert flags.sum() < s.n_obs // 2
    X, _, _ = m._assemble([s])
    assert len(X) == s.n_obs - flags.sum()
    pred = m.predict(s)
    assert pred.shape == (s.n_obs, len(genes)) and np.isfinite(pred).all()


def test_frozen_learns_and_beats_mean(cohort, tmp_path) -> None:
    genes = list(cohort[0].var_names)
    train, test = [cohort[0], cohort[1], cohort[3]], cohort[2]
    # log1p targets: with only 20 genes, CPM values of the synthetic counts are dominated by zeros.
    m = create_method("deepspace", normalization="log1p", **FAST).fit(train, genes)
    pred = m.predict(test)
    y = m.targets(test)
    base = create_method("mean", normalization="log1p").fit(train, genes).predict(test)
    assert mean_pcc(y, pred) > 0.3
    assert np.mean((pred - y) ** 2) < 0.8 * np.mean((base - y) ** 2)
    m2 = load_method(m.save(tmp_path / "ds"))
    np.testing.assert_array_equal(m2.predict(test), pred)


def test_finetune_step(cohort) -> None:
    genes = list(cohort[0].var_names)
    small, test = cohort[0][:24].copy(), cohort[1][:8].copy()  # tiny: one CPU step
    m = create_method(
        "deepspace", mode="finetune", encoder="resnet18", weights=None, input_px=32, hidden=32, epochs=1,
        batch_size=24, lr=1e-3, val_fraction=0.0, augment="none",
    ).fit([small], genes)
    pred = m.predict(test)
    assert pred.shape == (test.n_obs, len(genes)) and np.isfinite(pred).all()
    assert m.history_[0]["train"] and np.isfinite(m.history_[0]["train"][0])
