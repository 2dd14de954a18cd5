"""Metrics against hand-computed values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

from he2st.errors import He2stInputError
from he2st.evaluate import metrics as M


def test_pearson_hand_computed_and_matches_scipy() -> None:
    # x = 1,2,3,4 ; y = 1,3,2,4: sum((x-xm)(y-ym)) = 4, sum((x-xm)^2) = sum((y-ym)^2) = 5 -> r = 0.8
    obs = np.array([[1, 1], [2, 3], [3, 2], [4, 4]], dtype=float)
    pred = np.array([[1, 1], [3, 2], [2, 3], [4, 4]], dtype=float)
    r, p = M.pearson_per_gene(obs, pred)
    assert r == pytest.approx([0.8, 0.8])
    # t = r sqrt(n-2)/sqrt(1-r^2) = 0.8*sqrt(2)/0.6; p = 2 * t.sf(t, 2)
    t = 0.8 * math.sqrt(2) / 0.6
    assert p[0] == pytest.approx(2 * st.t.sf(t, 2), rel=1e-10)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 7)), rng.normal(size=(30, 7))
    b[:, 3] = a[:, 3] * 2 + 1  # perfect correlation: p = 0
    r, p = M.pearson_per_gene(a, b)
    for j in range(7):
        ref = st.pearsonr(a[:, j], b[:, j])
        assert r[j] == pytest.approx(ref.statistic, abs=1e-12)
        assert p[j] == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-300)
    assert r[3] == 1.0 and p[3] == 0.0


def test_two_spot_slide_gives_r_pm1_and_p_one() -> None:
    obs = np.array([[0.0, 1.0], [1.0, 0.0]])
    pred = np.array([[0.0, 0.0], [2.0, 5.0]])
    r, p = M.pearson_per_gene(obs, pred)
    assert r.tolist() == [1.0, -1.0]
    assert p.tolist() == [1.0, 1.0]
    assert st.pearsonr(obs[:, 1], pred[:, 1]).pvalue == 1.0


def test_constant_genes_are_nan_excluded_and_counted() -> None:
    obs = np.array([[1, 5, 2, 0], [2, 5, 1, 1], [3, 5, 3, 2]], dtype=float)
    pred = np.array([[1, 1, 7, 0], [2, 2, 7, 2], [3, 4, 7, 1]], dtype=float)
    ev = M.evaluate_slide(obs, pred, ["a", "b", "c", "d"], n_top=2)
    d = ev.as_dict()
    # gene a: r = 1; b constant observed -> NaN; c constant predicted -> NaN; d: x=(0,1,2), y=(0,2,1) -> r = 0.5
    assert ev.per_gene["pcc"].iloc[0] == pytest.approx(1.0)
    assert np.isnan(ev.per_gene["pcc"].iloc[1]) and np.isnan(ev.per_gene["pcc"].iloc[2])
    assert ev.per_gene["pcc"].iloc[3] == pytest.approx(0.5)
    assert d["PCC(ACG)"] == pytest.approx(0.75)  # mean of 1.0 and 0.5, not of (1, 0, 0, 0.5)
    assert d["n_nan(ACG)"] == 2
    # HEG on observed means (2, 5, 2, 1): b then a (tie a/c broken by panel order)
    assert ev.gene_sets["HEG"] == ["b", "a"]
    assert d["PCC(HEG)"] == pytest.approx(1.0) and d["n_nan(HEG)"] == 1
    # HVG on observed variances (2/3, 0, 2/3, 2/3): a, c (ties in panel order)
    assert ev.gene_sets["HVG"] == ["a", "c"]
    assert d["n_nan(HVG)"] == 1
    # MSE over spots x genes: hand sum of squared errors = 0 + (16+9+1) + (25+36+16) + (0+1+1) = 105 -> /12
    assert d["MSE(ACG)"] == pytest.approx(105 / 12)
    assert d["RMSE(ACG)"] == pytest.approx(math.sqrt(105 / 12))
    abs_sum = 0 + (4 + 3 + 1) + (5 + 6 + 4) + (0 + 1 + 1)
    assert d["MAE(ACG)"] == pytest.approx(abs_sum / 12)


def test_all_nan_gene_set_is_nan_not_zero() -> None:
    obs = np.array([[1.0, 2.0], [1.0, 3.0], [1.0, 4.0]])
    pred = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    ev = M.evaluate_slide(obs, pred, ["x", "y"])
    assert np.isnan(ev["PCC(ACG)"]) and ev["n_nan(ACG)"] == 2


def test_heg_hvg_use_observed_not_predicted() -> None:
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(40, 6)) + np.arange(6)  # gene 5 has the highest mean
    obs[:, 0] *= 10  # gene 0 the highest variance
    pred = -obs  # predictions with reversed ranking must not change the sets
    sets = M.gene_sets(obs, list("abcdef"), n_top=1)
    ev = M.evaluate_slide(obs, pred, list("abcdef"), n_top=1)
    assert sets["HEG"] == ["f"] and sets["HVG"] == ["a"]
    assert ev.gene_sets == sets


def test_markers_and_n_top_larger_than_panel() -> None:
    obs = np.arange(12, dtype=float).reshape(4, 3) ** 2
    pred = obs + np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0], [1, 0, 1]])
    ev = M.evaluate_slide(obs, pred, ["g1", "g2", "g3"], markers=["g2", "NOPE"], n_top=50)
    assert ev.gene_sets["HEG"] == ["g3", "g2", "g1"]
    assert ev.gene_sets["markers"] == ["g2"]
    assert ev["PCC(markers)"] == pytest.approx(st.pearsonr(obs[:, 1], pred[:, 1]).statistic)
    with pytest.raises(He2stInputError, match="none of the"):
        M.evaluate_slide(obs, pred, ["g1", "g2", "g3"], markers=["NOPE"])


def test_bad_inputs_raise() -> None:
    with pytest.raises(He2stInputError, match="shape"):
        M.evaluate_slide(np.zeros((3, 2)), np.zeros((3, 3)), ["a", "b"])
    with pytest.raises(He2stInputError, match="NaN"):
        M.evaluate_slide(np.zeros((3, 2)), np.full((3, 2), np.nan), ["a", "b"])
    with pytest.raises(He2stInputError, match="at least 2 spots"):
        M.pearson_per_gene(np.zeros((1, 2)), np.zeros((1, 2)))


def test_summarize_mean_sd() -> None:
    df = pd.DataFrame(
        {
            "method": ["m"] * 3 + ["n"] * 3,
            "test_slide": ["s1", "s2", "s3"] * 2,
            "metric": "pcc",
            "gene_set": "ACG",
            "value": [0.1, 0.2, 0.3, 0.5, np.nan, 0.7],
            "n_nan": [0, 1, 0, 0, 5, 0],
        }
    )
    s = M.summarize(df).set_index("method")
    assert s.loc["m", "mean"] == pytest.approx(0.2) and s.loc["m", "sd"] == pytest.approx(0.1)
    assert s.loc["n", "mean"] == pytest.approx(0.6) and s.loc["n", "n_slides"] == 2
    assert s.loc["n", "n_nan_slides"] == 1 and s.loc["n", "n_nan"] == 5


def test_wilcoxon_matches_scipy_and_flags_small_n() -> None:
    a = np.array([0.31, 0.25, 0.40, 0.22, 0.35, 0.28, 0.30, 0.33])
    b = np.array([0.20, 0.26, 0.33, 0.10, 0.21, 0.215, 0.17, 0.30])
    res = M.paired_wilcoxon(a, b, ("a", "b"))
    ref = st.wilcoxon(a, b)
    assert res.pvalue == pytest.approx(ref.pvalue) and res.statistic == pytest.approx(ref.statistic)
    assert res.n == 8 and res.a_wins == 7 and res.b_wins == 1 and res.note == ""
    small = M.paired_wilcoxon(a[:5], b[:5])
    assert small.pvalue == pytest.approx(st.wilcoxon(a[:5], b[:5]).pvalue)
    assert "cannot reach 0.05" in small.note
    zero = M.paired_wilcoxon([0.1, 0.2], [0.1, 0.2])
    assert zero.pvalue == 1.0 and "all differences are zero" in zero.note
    nan = M.paired_wilcoxon([0.1, np.nan, 0.3], [0.0, 0.1, 0.2])
    assert nan.n == 2 and "NaN dropped" in nan.note
    tied = M.paired_wilcoxon([1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6.5])
    assert "tied" in tied.note


def test_wilcoxon_table_pairs_methods_by_slide() -> None:
    rows = []
    vals = {"ridge": [0.3, 0.2, 0.4], "knn": [0.1, 0.25, 0.2], "mean": [np.nan] * 3}
    for m, vs in vals.items():
        for s, v in zip(["s3", "s1", "s2"] if m == "knn" else ["s1", "s2", "s3"], vs):
            rows.append((m, s, "pcc", "ACG", v))
    df = pd.DataFrame(rows, columns=["method", "test_slide", "metric", "gene_set", "value"])
    tab = M.wilcoxon_table(df, methods=["ridge", "knn"])
    # paired by slide: ridge (s1 .3, s2 .2, s3 .4) vs knn (s1 .25, s2 .2, s3 .1)
    ref = st.wilcoxon([0.3, 0.2, 0.4], [0.25, 0.2, 0.1])
    assert len(tab) == 1 and tab.loc[0, "pvalue"] == pytest.approx(ref.pvalue)
    assert tab.loc[0, "n_nonzero"] == 2
    # mean's PCC is undefined on every slide (constant prediction): it is left out, not tested on no pairs
    full = M.wilcoxon_table(df)
    assert full[["a", "b"]].values.tolist() == [["ridge", "knn"]]


def test_top_genes_mean_neglog10p() -> None:
    df = pd.DataFrame(
        {
            "method": "m",
            "test_slide": ["s1", "s2", "s1", "s2", "s1", "s2"],
            "gene": ["A", "A", "B", "B", "C", "C"],
            "pcc": [0.5, 0.7, 0.9, np.nan, 0.1, 0.2],
            "pvalue": [1e-2, 1e-4, 0.0, np.nan, 0.5, 0.1],
        }
    )
    t = M.top_genes(df, n=None)
    assert t["gene"].tolist() == ["B", "A", "C"]
    b = t.set_index("gene").loc["B"]
    assert b["mean_neglog10p"] == pytest.approx(-math.log10(np.finfo(float).tiny))
    assert b["n_nan"] == 1 and b["n_slides"] == 1
    assert t.set_index("gene").loc["A", "mean_neglog10p"] == pytest.approx(3.0)
    assert M.top_genes(df, n=1, by="pcc")["gene"].tolist() == ["B"]


def test_cluster_agreement_perfect_and_constant() -> None:
    from he2st.evaluate.clustering import cluster_agreement

    rng = np.random.default_rng(0)
    centres = np.array([[0, 0, 0, 0], [10, 10, 0, 0], [0, 0, 10, 10]], dtype=float)
    lab = np.repeat([0, 1, 2], 20)
    obs = centres[lab] + rng.normal(scale=0.1, size=(60, 4))
    res = cluster_agreement(obs, obs + 0.01, labels=[f"r{v}" for v in lab])
    assert res["ari"] == pytest.approx(1.0) and res["nmi"] == pytest.approx(1.0) and res["n_clusters"] == 3
    const = cluster_agreement(obs, np.ones_like(obs), n_clusters=3)
    assert const["reference"] == "observed_clusters" and const["ari"] == pytest.approx(0.0)
