"""STimage (he2st.methods.stimage): NB head on counts, library-size offset, ensemble uncertainty."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from he2st.pp.normalize import Normalizer
from he2st.errors import NotCountsError
from he2st.methods import create_method, load_method
from he2st.methods.stimage import library_sizes
from _helpers import mean_pcc

FAST = dict(encoder="color_stats", weights=None, patch_px=32, lr=3e-2, epochs=40, batch_size=32, n_models=3)


def test_defaults_are_the_papers() -> None:
    m = create_method("stimage")
    p = m.params
    assert (p["encoder"], p["patch_px"], p["stain"], p["min_tissue"]) == ("resnet50", 299, "vahadane", 0.7)
    assert (p["optimizer"], p["lr"], p["batch_size"], p["epochs"], p["patience"], p["n_models"]) == ("adam", 1e-5, 64, 100, 10, 5)
    assert p["mode"] == "frozen" and m.capabilities.uncertainty


def _bare(method: str, lib_ref: float = 1e4, moments: str = "exact") -> object:
    m = create_method("stimage", normalization=method, moments=moments)
    m.genes = ["a", "b"]
    m.normalizer_ = Normalizer(method)
    m.lib_ref_ = lib_ref
    return m


def test_decode_delta_method_hand_values() -> None:
    mu = torch.tensor([[0.5, 4.0]], dtype=torch.float64)
    theta = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    v = np.array([[0.5 + 0.25 / 2, 4.0 + 16.0 / 1]])  # NB variance mu + mu^2 / theta
    # cpm_log1p at L_ref = 1e4: k = 100, f(r) = log1p(100 r), f'(r) = 100 / (1 + 100 r).
    out = _bare("cpm_log1p", moments="delta")._decode((mu, theta))
    np.testing.assert_allclose(out["mean"], [[math.log(51.0), math.log(401.0)]], rtol=1e-12)
    np.testing.assert_allclose(out["var"], (np.array([[100 / 51, 100 / 401]]) ** 2) * v, rtol=1e-12)
    # log1p: k = 1.
    out = _bare("log1p", moments="delta")._decode((mu, theta))
    np.testing.assert_allclose(out["mean"], [[math.log(1.5), math.log(5.0)]], rtol=1e-12)
    np.testing.assert_allclose(out["var"], (np.array([[1 / 1.5, 1 / 5.0]]) ** 2) * v, rtol=1e-12)
    # raw: the NB moments themselves.
    out = _bare("raw", moments="delta")._decode((mu, theta))
    np.testing.assert_allclose(out["mean"], mu.numpy())
    np.testing.assert_allclose(out["var"], v)


def test_decode_minmax_uses_the_training_range(cohort) -> None:
    genes = list(cohort[0].var_names)[:2]
    norm = Normalizer("minmax").fit([cohort[0]], genes)
    m = _bare("minmax")
    m.genes, m.normalizer_ = genes, norm
    mu, theta = torch.tensor([[0.5, 4.0]], dtype=torch.float64), torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    ref = _bare("cpm_log1p")._decode((mu, theta))
    span = norm.max_ - norm.min_
    out = m._decode((mu, theta))
    np.testing.assert_allclose(out["mean"], (ref["mean"] - norm.min_) / span, rtol=1e-6)
    np.testing.assert_allclose(out["var"], ref["var"] / span**2, rtol=1e-6)


def test_library_size_offset(cohort) -> None:
    genes = list(cohort[0].var_names)
    m = create_method("stimage", **{**FAST, "stain": None, "epochs": 1, "n_models": 1}).fit([cohort[0], cohort[1]], genes)
    libs = np.concatenate([np.asarray(s.X.sum(axis=1)).ravel() for s in (cohort[0], cohort[1])])
    assert m.lib_ref_ == pytest.approx(float(np.median(libs)))
    counts, sf = m._targets(cohort[2])
    np.testing.assert_array_equal(counts, cohort[2].X.toarray())
    np.testing.assert_allclose(sf[:, 0], library_sizes(cohort[2]) / m.lib_ref_, rtol=1e-6)
    # The loss uses mu * size factor: doubling a spot's depth doubles its NB mean.
    mu, theta = torch.full((1, 2), 3.0), torch.full((1, 2), 5.0)
    x = torch.tensor([[2.0, 7.0]])
    from he2st.methods.nn.likelihoods import nb_nll

    loss = m._loss((mu, theta), (x, torch.tensor([[2.0]])))
    assert loss.item() == pytest.approx(nb_nll(x, mu * 2, theta).mean().item())


def test_needs_counts(cohort) -> None:
    s = cohort[0].copy()
    s.uns["he2st"] = {**s.uns["he2st"], "counts": False}
    m = create_method("stimage", **{**FAST, "normalization": "raw", "stain": None, "epochs": 1})
    with pytest.raises(NotCountsError, match="negative binomial"):
        m.fit([s, cohort[1]], list(s.var_names))


def test_learns_with_uncertainty_and_roundtrip(cohort, tmp_path) -> None:
    genes = list(cohort[0].var_names)
    train, test = [cohort[0], cohort[1]], cohort[2]
    # log1p targets and no stain normalisation: the colour-statistics test encoder reads colour,
    # and with 20 low-count genes CPM values are dominated by zeros.
    m = create_method("stimage", normalization="log1p", **{**FAST, "stain": None}).fit(train, genes)
    assert len(m.models_) == 3
    pred, sd = m.predict(test), m.predict_uncertainty(test)
    y = m.targets(test)
    base = create_method("mean", normalization="log1p").fit(train, genes).predict(test)
    assert mean_pcc(y, pred) > 0.3
    assert np.mean((pred - y) ** 2) < 0.9 * np.mean((base - y) ** 2)
    assert sd.shape == pred.shape and sd.dtype == np.float32
    assert np.isfinite(sd).all() and (sd > 0).all()
    # The total variance is the mean NB (delta-method) variance plus the spread of the members.
    outs = m._member_outputs(test)
    means = np.stack([o["mean"] for o in outs])
    np.testing.assert_allclose(pred, means.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(sd**2, np.mean([o["var"] for o in outs], axis=0) + means.var(axis=0), rtol=1e-4)
    assert means.var(axis=0).max() > 0  # members differ
    # Save / load: identical predictions and uncertainty.
    m2 = load_method(m.save(tmp_path / "stimage"))
    np.testing.assert_array_equal(m2.predict(test), pred)
    np.testing.assert_array_equal(m2.predict_uncertainty(test), sd)


def test_exact_moments(cohort) -> None:
    from scipy import stats

    from he2st.methods.stimage import exact_log1p_moments

    mu = torch.tensor([0.3, 4.0, 2000.0], dtype=torch.float64)
    theta = torch.tensor([2.0, 0.7, 5.0], dtype=torch.float64)
    mean, var = exact_log1p_moments(mu, theta, k=100.0)
    for i in range(2):  # low counts: summed exactly; check against scipy's pmf
        x = np.arange(0, 5000)
        p = stats.nbinom.pmf(x, theta[i].item(), theta[i].item() / (theta[i].item() + mu[i].item()))
        f = np.log1p(100.0 * x)
        assert mean[i] == pytest.approx((p * f).sum(), rel=1e-6)
        assert var[i] == pytest.approx((p * f**2).sum() - (p * f).sum() ** 2, rel=1e-5)
    # High counts: the delta method.
    assert mean[2] == pytest.approx(math.log1p(100.0 * 2000.0))
    # On the synthetic cohort (many zeros), exact moments rank errors far better than the delta method.
    genes = list(cohort[0].var_names)
    train, test = [cohort[0], cohort[1]], cohort[2]
    m = create_method("stimage", **{**FAST, "stain": None}).fit(train, genes)
    y = m.targets(test)
    from scipy.stats import spearmanr

    rho = {}
    for moments in ("delta", "exact"):
        m.params["moments"], m._memo = moments, None
        pred, sd = m.predict(test), m.predict_uncertainty(test)
        rho[moments] = spearmanr(sd.ravel(), np.abs(pred - y).ravel()).statistic
    assert rho["exact"] > 0.4 and rho["exact"] > rho["delta"]


def test_vahadane_fitted_on_training_slides(cohort, tmp_path) -> None:
    genes = list(cohort[0].var_names)
    m = create_method("stimage", **{**FAST, "epochs": 2, "n_models": 1}).fit([cohort[0], cohort[1]], genes)
    assert m.stain_ is not None and m.stain_.method == "vahadane"
    pred = m.predict(cohort[2])
    assert np.isfinite(pred).all()
    m2 = load_method(m.save(tmp_path / "stimage_vahadane"))
    assert m2.stain_.cache_key() == m.stain_.cache_key()
    np.testing.assert_array_equal(m2.predict(cohort[2]), pred)


def test_low_tissue_tiles_dropped_but_predicted(cohort) -> None:
    genes = list(cohort[0].var_names)
    s = cohort[0].copy()
    s.obsm["spatial"] = s.obsm["spatial"].copy()
    s.obsm["spatial"][:3] = [[6.0, 6.0], [9.0, 6.0], [6.0, 9.0]]  # blank glass in the corner
    m = create_method("stimage", **{**FAST, "stain": None, "epochs": 2, "n_models": 1}).fit([s, cohort[1]], genes)
    flags = m.flagged_spots(s)
    assert flags[:3].all()
    from he2st.image import extract_patches

    tf = extract_patches(s, size_px=32).tissue_fraction
    np.testing.assert_array_equal(flags, tf < 0.7)
    X, _, _ = m._assemble([s])
    assert len(X) == s.n_obs - flags.sum()
    assert np.isfinite(m.predict(s)[:3]).all() and np.isfinite(m.predict_uncertainty(s)[:3]).all()


def test_finetune_step(cohort) -> None:
    genes = list(cohort[0].var_names)
    small, test = cohort[0][:24].copy(), cohort[1][:8].copy()
    m = create_method(
        "stimage", mode="finetune", encoder="resnet18", weights=None, patch_px=32, input_px=32, stain=None,
        min_tissue=0.0, epochs=1, batch_size=24, lr=1e-3, val_fraction=0.0, n_models=2,
    ).fit([small], genes)
    pred, sd = m.predict(test), m.predict_uncertainty(test)
    assert pred.shape == sd.shape == (test.n_obs, len(genes))
    assert np.isfinite(pred).all() and (sd > 0).all()
