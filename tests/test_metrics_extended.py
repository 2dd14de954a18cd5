"""The field's metrics (Spearman, nRMSE, AUC, JSD, MI, SSIM, Moran's I / SVG) against hand-computed values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

from he2st.errors import He2stInputError
from he2st.evaluate import field_metrics as F
from he2st.evaluate import metrics as M

# A 3-spot slide: gene 0 swapped in the last two spots, gene 1 constant.
OBS3 = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
PRED3 = np.array([[1.0, 1.0], [3.0, 2.0], [2.0, 3.0]])


def test_spearman_by_hand_and_scipy() -> None:
    r = F.spearman_per_gene(OBS3, PRED3)
    assert r[0] == pytest.approx(1 - 6 * 2 / (3 * 8))  # 0.5
    assert np.isnan(r[1])  # constant observed gene
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (30, 5)).astype(float)  # ties
    y = rng.integers(0, 4, (30, 5)).astype(float)
    ref = [st.spearmanr(x[:, j], y[:, j]).statistic for j in range(5)]
    assert F.spearman_per_gene(x, y) == pytest.approx(ref)


def test_nrmse_by_hand() -> None:
    v = F.nrmse_per_gene(OBS3, PRED3)
    assert v[0] == pytest.approx(math.sqrt(2 / 3) / 2)
    assert np.isnan(v[1])


def test_auc_by_hand_with_ties_and_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    a = F.auc_per_gene(OBS3, PRED3)
    assert a[0] == pytest.approx(0.5)  # positive: spot 3 (pred 2) vs negatives 1, 3
    assert np.isnan(a[1])  # constant: one class only
    # ties: obs median 1.5; positives pred (1, 3), negatives pred (0, 1) -> (1 + .5 + 1 + 1) / 4
    obs = np.array([[1.0], [1.0], [2.0], [2.0]])
    pred = np.array([[0.0], [1.0], [1.0], [3.0]])
    assert F.auc_per_gene(obs, pred)[0] == pytest.approx(0.875)
    rng = np.random.default_rng(1)
    x = rng.poisson(1.0, (40, 6)).astype(float)
    y = rng.integers(0, 3, (40, 6)).astype(float)
    ref = [roc_auc_score(x[:, j] > np.median(x[:, j]), y[:, j]) for j in range(6)]
    assert F.auc_per_gene(x, y) == pytest.approx(ref)


def test_jsd_by_hand() -> None:
    d = F.jsd_per_gene(OBS3, PRED3)
    # p = (0, 1, 2)/3, q = (0, 2, 1)/3, m = (0, .5, .5); JSD = KL(p||m) (symmetric here)
    kl = (1 / 3) * math.log2((1 / 3) / 0.5) + (2 / 3) * math.log2((2 / 3) / 0.5)
    assert d[0] == pytest.approx(math.sqrt(kl))
    assert np.isnan(d[1])
    assert F.jsd_per_gene(OBS3[:, :1], OBS3[:, :1] * 2 + 7)[0] == pytest.approx(0.0, abs=1e-7)  # same shape


def test_mi_by_hand_ties_and_constant() -> None:
    from sklearn.metrics import mutual_info_score

    mi = F.mi_per_gene(OBS3, PRED3)
    assert mi[0] == pytest.approx(math.log(3))  # three distinct bins matched one to one
    assert mi[1] == 0.0  # a constant side carries no information
    ties = np.array([[1.0], [1.0], [2.0], [2.0]])
    assert F.equal_frequency_bins(ties, 2)[:, 0].tolist() == [0, 0, 1, 1]
    assert F.mi_per_gene(ties, ties, n_bins=2)[0] == pytest.approx(math.log(2))
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    bx, by = F.equal_frequency_bins(x), F.equal_frequency_bins(y)
    assert F.mi_per_gene(x, y) == pytest.approx([mutual_info_score(bx[:, j], by[:, j]) for j in range(3)])


def test_raster_and_grid_from_pixels() -> None:
    grid = np.array([[0, 0], [0, 2], [1, 1]])
    r = F.raster(np.array([[0.0], [2.0], [4.0]]), grid)
    assert r.shape == (2, 3, 1)
    assert r[:, :, 0].tolist() == [[0.0, 0.0, 0.5], [0.0, 1.0, 0.0]]
    xy = np.array([[100.0, 50.0], [110.0, 50.0], [100.0, 60.0], [120.0, 60.0]])  # pitch 10, (x, y)
    assert F.grid_from_pixels(xy).tolist() == [[0, 0], [0, 1], [1, 0], [1, 2]]


def _lattice(n: int = 12):
    rows, cols = np.divmod(np.arange(n * n), n)
    return np.column_stack([rows, cols])


def test_ssim_perfect_is_one_and_matches_skimage() -> None:
    from skimage.metrics import structural_similarity

    grid = _lattice()
    rng = np.random.default_rng(3)
    obs = np.column_stack([grid[:, 0] + grid[:, 1], rng.normal(size=len(grid)), np.ones(len(grid))])
    pred = rng.normal(size=obs.shape)
    assert F.ssim_per_gene(obs, obs, grid)[:2] == pytest.approx([1.0, 1.0])
    s = F.ssim_per_gene(obs, pred, grid)
    ref = structural_similarity(F.raster(obs, grid)[:, :, 1], F.raster(pred, grid)[:, :, 1], data_range=1.0, win_size=7)
    assert s[1] == pytest.approx(ref)
    assert np.isnan(s[2])  # constant observed gene
    assert np.isnan(F.ssim_per_gene(OBS3, PRED3, np.array([[0, 0], [0, 1], [0, 2]]))).all()  # grid 1 x 3


def test_svg_top_and_recovery() -> None:
    grid = _lattice(10)
    rng = np.random.default_rng(4)
    genes = [f"g{i}" for i in range(30)]
    smooth = np.column_stack([grid[:, 0] * (1 + k) + grid[:, 1] for k in range(25)])
    obs = np.column_stack([smooth, rng.normal(size=(len(grid), 5))])
    i_obs = F.moran_i(obs, grid, genes)
    top = F.top_svg(i_obs, genes)
    assert len(top) == 20 and set(top) <= set(genes[:25])  # gradients, not noise
    assert F.svg_recovery(top, top) == 1.0
    assert F.svg_recovery(["a", "b"], ["b", "c"]) == 0.5
    assert F.top_svg(np.array([np.nan, 0.1, 0.3]), ["a", "b", "c"], n=5) == ["c", "b"]
    ev = M.evaluate_slide(obs, obs, genes, metrics=["svg"], grid=grid)
    assert ev["SVG_RECOVERY(SVG)"] == 1.0 and ev.gene_sets["SVG"] == top


def test_evaluate_slide_default_and_opt_in_metrics() -> None:
    rng = np.random.default_rng(5)
    obs = rng.normal(size=(40, 30))
    pred = obs + rng.normal(scale=0.5, size=obs.shape)
    genes = [f"g{i}" for i in range(30)]
    ev = M.evaluate_slide(obs, pred, genes, n_top=5)
    assert set(ev.metrics["metric"]) == set(M.DEFAULT_METRICS)
    assert set(ev.metrics["gene_set"]) == {"ACG", "HEG", "HVG", "HVG10"}
    assert len(ev.gene_sets["HVG10"]) == 3  # 10 % of 30
    assert ev["SPEARMAN(ACG)"] == pytest.approx(np.mean(F.spearman_per_gene(obs, pred)))
    assert list(ev.per_gene.columns[-4:]) == ["spearman", "nrmse", "auc", "jsd"]
    with pytest.raises(He2stInputError, match="grid"):
        M.evaluate_slide(obs, pred, genes, metrics=["ssim"])
    with pytest.raises(He2stInputError, match="unknown metric"):
        M.evaluate_slide(obs, pred, genes, metrics=["nope"])
    only = M.evaluate_slide(obs, pred, genes, metrics=["pcc"])
    assert set(only.metrics["metric"]) == set(M.METRICS)
    # a constant gene: NaN per gene, left out of the set's mean and counted
    obs[:, 0] = 1.0
    ev = M.evaluate_slide(obs, pred, genes, metrics=["mi", "spearman"])
    row = ev.metrics.set_index(["metric", "gene_set"]).loc[("spearman", "ACG")]
    assert row["n_nan"] == 1 and row["value"] == pytest.approx(np.nanmean(F.spearman_per_gene(obs, pred)))
    assert ev.metrics.set_index(["metric", "gene_set"]).loc[("mi", "ACG"), "n_nan"] == 0


def test_summarize_and_wilcoxon_carry_new_metrics() -> None:
    rng = np.random.default_rng(6)
    frames = []
    for method, noise in (("a", 0.3), ("b", 1.0)):
        for s in range(6):
            obs = rng.normal(size=(30, 8))
            ev = M.evaluate_slide(obs, obs + rng.normal(scale=noise, size=obs.shape), [f"g{i}" for i in range(8)], n_top=3)
            frames.append(M.metrics_frame(ev, method=method, fold=f"f{s}", test_slide=f"s{s}"))
    m = pd.concat(frames, ignore_index=True)
    summary = M.summarize(m)
    assert {"spearman", "nrmse", "auc", "jsd"} <= set(summary["metric"])
    w = M.wilcoxon_table(m, "spearman", "ACG")
    assert len(w) == 1 and w.loc[0, "a_wins"] == 6


def test_gene_set_size_warning() -> None:
    with pytest.warns(M.GeneSetSizeWarning, match="n_top=50"):
        assert M.check_n_top(50, 41, where="fold 'A1'")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not M.check_n_top(50, 785)


def test_top_genes_drops_genes_without_any_pcc() -> None:
    df = pd.DataFrame(
        {
            "method": ["mean"] * 2 + ["knn"] * 2,
            "test_slide": ["s1", "s2"] * 2,
            "gene": ["A"] * 4,
            "pcc": [np.nan, np.nan, 0.4, 0.6],
            "pvalue": [np.nan, np.nan, 0.01, 0.001],
        }
    )
    assert M.top_genes(df)["method"].tolist() == ["knn"]


def test_resolve_metrics() -> None:
    assert M.resolve_metrics(None) == M.DEFAULT_METRICS
    assert M.resolve_metrics(["default", "ssim"]) == (*M.DEFAULT_METRICS, "ssim")
    assert M.resolve_metrics("auc") == (*M.METRICS, "auc")  # opt out of the other defaults
    assert M.resolve_metrics(["all"]) == M.ALL_METRICS
