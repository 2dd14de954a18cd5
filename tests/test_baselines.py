"""Baselines: mean, ridge probe, k-NN retrieval (colour-statistics features, tiny synthetic cohort)."""

from __future__ import annotations

import numpy as np
import pytest

from he2st.pp.normalize import Normalizer
from he2st.errors import He2stInputError
from he2st.evaluate.metrics import evaluate_slide
from he2st.methods import create_method, load_method
from he2st.methods.baselines import _features

FEAT = {"encoder": "color_stats", "weights": None, "patch_px": 32}


def _score(model, slide):
    return evaluate_slide(model.targets(slide), model.predict(slide), model.genes).as_dict()


def test_mean_is_pooled_training_mean(cohort, genes) -> None:
    m = create_method("mean").fit(cohort[:2], genes)
    norm = Normalizer("cpm_log1p")
    y = np.concatenate([norm.transform(s, genes) for s in cohort[:2]])
    pred = m.predict(cohort[2])
    assert pred.shape == (cohort[2].n_obs, len(genes))
    np.testing.assert_allclose(pred[0], y.mean(axis=0), rtol=1e-6)
    assert (pred == pred[0]).all()
    ev = _score(m, cohort[2])
    assert np.isnan(ev["PCC(ACG)"]) and ev["n_nan(ACG)"] == len(genes)


@pytest.mark.parametrize("name", ["ridge", "knn"])
def test_beats_mean_on_held_out_slide(cohort, genes, name) -> None:
    mean = _score(create_method("mean").fit(cohort[:2], genes), cohort[2])
    model = create_method(name, **FEAT).fit(cohort[:2], genes)
    ev = _score(model, cohort[2])
    assert ev["MSE(ACG)"] < mean["MSE(ACG)"]
    assert ev["PCC(ACG)"] > 0.2
    assert ev["n_nan(ACG)"] == 0


@pytest.mark.parametrize("name", ["mean", "ridge", "knn"])
def test_save_load_round_trip(cohort, genes, name, tmp_path) -> None:
    params = {} if name == "mean" else FEAT
    m = create_method(name, **params).fit(cohort[:2], genes)
    m.save(tmp_path / "model")
    m2 = load_method(tmp_path / "model")
    assert type(m2) is type(m) and m2.params == m.params and m2.genes == m.genes
    np.testing.assert_array_equal(m2.predict(cohort[2]), m.predict(cohort[2]))


def test_ridge_alpha_by_slide_grouped_cv(cohort, genes) -> None:
    m = create_method("ridge", **FEAT, alphas=[0.1, 10.0, 1e4], feature_scaling="standard").fit(cohort[:2], genes)
    assert m.cv_groups_ == 2
    assert set(m.cv_scores_) == {"0.1", "10", "10000"}
    scores = {float(k): v for k, v in m.cv_scores_.items()}
    assert m.alpha_ == max(scores, key=lambda a: (scores[a], a))
    # the projection is fitted on the training spots only: scaler mean = mean of their features
    from he2st.encoders import get_features

    X = np.concatenate([get_features(s, **FEAT) for s in cohort[:2]]).astype(np.float64)
    np.testing.assert_allclose(m.scaler_mean_, X.mean(axis=0), rtol=1e-10)
    assert m.pca_components_.shape[0] == min(256, X.shape[0], X.shape[1])
    # one training slide: inner CV on 5 blocks of array rows
    one = create_method("ridge", **FEAT, alphas=[1.0, 100.0]).fit(cohort[:1], genes)
    assert one.cv_groups_ == 1 and one.alpha_ in (1.0, 100.0)
    # selecting by held-out PCC instead of MSE: scores are mean PCCs in [-1, 1]
    by_pcc = create_method("ridge", **FEAT, alphas=[0.1, 1e4], cv_metric="pcc").fit(cohort[:2], genes)
    assert all(-1 <= v <= 1 for v in by_pcc.cv_scores_.values())
    assert all(v < 0 for v in m.cv_scores_.values())  # minus MSE
    with pytest.raises(He2stInputError, match="alphas"):
        create_method("ridge", **FEAT, alphas=[-1.0]).fit(cohort[:1], genes)
    with pytest.raises(He2stInputError, match="cv_metric"):
        create_method("ridge", **FEAT, cv_metric="r2").fit(cohort[:1], genes)


def test_ridge_huge_alpha_tends_to_mean(cohort, genes) -> None:
    m = create_method("ridge", **FEAT, alphas=[1e12]).fit(cohort[:2], genes)
    mean = create_method("mean").fit(cohort[:2], genes)
    np.testing.assert_allclose(m.predict(cohort[2]), mean.predict(cohort[2]), atol=1e-4)


def test_knn_bank_and_self_retrieval(cohort, genes) -> None:
    m = create_method("knn", **FEAT, k=1).fit(cohort[:2], genes)
    assert m.bank_slides_ == ["syn0", "syn1"]
    assert len(m.bank_obs_) == cohort[0].n_obs + cohort[1].n_obs
    # a training spot's nearest neighbour is itself, so k=1 returns its own target
    nn = m.neighbours(cohort[1])[:, 0]
    own = np.arange(cohort[0].n_obs, cohort[0].n_obs + cohort[1].n_obs)
    assert (nn == own).mean() > 0.95
    # the prediction is the mean of the k retrieved targets
    m5 = create_method("knn", **FEAT, k=5, metric="euclidean").fit(cohort[:2], genes)
    idx = m5.neighbours(cohort[2])
    np.testing.assert_allclose(m5.predict(cohort[2]), m5.bank_targets_[idx].mean(axis=1), rtol=1e-6)
    with pytest.raises(He2stInputError, match="metric"):
        create_method("knn", **FEAT, metric="manhattan").fit(cohort[:2], genes)


def test_validation_slides_are_pooled(cohort, genes) -> None:
    m = create_method("knn", **FEAT, normalization="minmax").fit(cohort[:1], genes, val_slides=cohort[1:2])
    assert m.bank_slides_ == ["syn0", "syn1"]
    # ... but the target normaliser is fitted on the training slides only
    ref = Normalizer("minmax").fit(cohort[:1], genes)
    np.testing.assert_array_equal(m.normalizer_.min_, ref.min_)
    np.testing.assert_array_equal(m.normalizer_.max_, ref.max_)


def test_unknown_parameter_rejected() -> None:
    with pytest.raises(He2stInputError, match="unknown parameter"):
        create_method("ridge", n_pcs=3)


def _sorted_neighbours(bank: np.ndarray, queries: np.ndarray, metric: str, k: int) -> np.ndarray:
    """Reference k-NN (the baseline's former search): every distance computed, stable-sorted."""
    if metric == "cosine":
        score = -(queries @ bank.T)
    else:
        score = (queries * queries).sum(1)[:, None] - 2 * queries @ bank.T + (bank * bank).sum(1)[None, :]
    return np.argsort(score, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("k", [1, 5, 50])
def test_knn_index_matches_full_sort(cohort, genes, metric, k) -> None:
    # The baseline searches with he2st.retrieval's exact index; it must retrieve what sorting
    # every query-bank distance retrieves, and so predict the same average.
    m = create_method("knn", **FEAT, k=k, metric=metric).fit(cohort[:2], genes)
    queries = m._embed(_features(m, cohort[2])).astype(np.float32)
    ref = _sorted_neighbours(m.bank_features_, queries, metric, k)
    np.testing.assert_array_equal(m.neighbours(cohort[2]), ref)
    np.testing.assert_allclose(m.predict(cohort[2]), m.bank_targets_[ref].mean(axis=1), atol=1e-5)


def test_ridge_alpha_per_gene(cohort, genes, tmp_path) -> None:
    alphas = [0.1, 10.0, 1e4]
    shared = create_method("ridge", **FEAT, alphas=alphas, feature_scaling="standard").fit(cohort[:2], genes)
    m = create_method("ridge", **FEAT, alphas=alphas, feature_scaling="standard", alpha_per_gene=True).fit(cohort[:2], genes)
    assert m.gene_alphas_.shape == (len(genes),) and set(m.gene_alphas_) <= set(alphas)
    # each gene's penalty minimises its own held-out MSE, recomputed here by hand (leave one slide out)
    from he2st.methods.baselines import _fit_projection, _project, _ridge_path, _training_data

    feats, targets = _training_data(m, cohort[:2])
    mse = np.zeros((len(alphas), len(genes)))
    for out in (0, 1):
        proj = _fit_projection([feats[1 - out]], 256, "standard")
        Ztr, Zte = _project(feats[1 - out], *proj), _project(feats[out], *proj)
        for i, (c, b) in enumerate(_ridge_path(Ztr, targets[1 - out], np.array(alphas))):
            mse[i] += np.mean((Zte @ c + b - targets[out]) ** 2, axis=0) / 2
    best = np.array(alphas)[::-1][np.argmin(mse[::-1], axis=0)]  # ties: the stronger penalty
    np.testing.assert_array_equal(m.gene_alphas_, best)
    # the genes' coefficients are those of a one-penalty fit at that gene's penalty
    for a in set(best):
        one = create_method("ridge", **FEAT, alphas=[a], feature_scaling="standard").fit(cohort[:2], genes)
        cols = best == a
        np.testing.assert_allclose(m.predict(cohort[2])[:, cols], one.predict(cohort[2])[:, cols], rtol=1e-4, atol=1e-5)
    # its pooled inner-CV MSE can only be at or below the shared penalty's
    assert -mse.min(axis=0).mean() >= max(shared.cv_scores_.values()) - 1e-9
    m.save(tmp_path / "model")
    back = load_method(tmp_path / "model")
    np.testing.assert_array_equal(back.gene_alphas_, m.gene_alphas_)
    np.testing.assert_array_equal(back.predict(cohort[2]), m.predict(cohort[2]))
    with pytest.raises(He2stInputError, match="alpha_per_gene"):
        create_method("ridge", **FEAT, alpha_per_gene=True, cv_metric="pcc").fit(cohort[:2], genes)
