"""Per-gene metrics of the field beyond Pearson (Wang et al., Nat Commun 2025; HEST).

Every function takes the observed and predicted values of one slide, ``(n_spots,
n_genes)`` on the evaluation scale, and returns one value per gene (NaN where the
metric is undefined). :func:`he2st.evaluate.metrics.evaluate_slide` averages them
over gene sets.

Definitions
-----------
``spearman``
    Spearman rank correlation (Pearson r of average ranks, as
    :func:`scipy.stats.spearmanr`); NaN when either side is constant.
``nrmse``
    Normalised RMSE: ``sqrt(mean((pred - obs)^2)) / (max(obs) - min(obs))`` over the
    slide's spots (RMSE divided by the observed gene's range); NaN for a constant
    observed gene.
``auc``
    Area under the ROC curve of the predictions against the observed values
    binarised at the observed gene's median (``obs > median`` is the positive
    class), i.e. :func:`sklearn.metrics.roc_auc_score` (computed from average
    ranks, the Mann-Whitney form, which gives the same value); NaN when a class is
    empty (e.g. a constant gene).
``jsd``
    Jensen-Shannon *distance* (the square root of the divergence, base 2, so in
    [0, 1]) between the spatial distributions of observed and predicted values:
    each map is shifted to be non-negative (minus its minimum) and normalised to sum
    1 (:func:`scipy.spatial.distance.jensenshannon`). NaN when a map is constant.
``mi``
    Mutual information (nats) between observed and predicted values, each cut into
    ``n_bins`` (10) equal-frequency bins (tied values share a bin), by
    :func:`sklearn.metrics.mutual_info_score`. A constant map gives 0 (it carries
    no information), not NaN.
``ssim``
    Structural similarity (:func:`skimage.metrics.structural_similarity`,
    ``data_range=1``) between the observed and predicted maps rasterised on the
    spot grid (:func:`raster`): each map is min-max scaled to [0, 1] over its spots
    first, grid cells without a spot are 0 in both maps. The window is 7 cells, or
    the largest odd size that fits a smaller grid; NaN when the grid is under 3
    cells on a side or the observed gene is constant (a constant prediction scales
    to 0 everywhere).
``svg`` (Moran's I)
    :func:`moran_i`: Moran's I of every gene on a 6-nearest-neighbour graph of the
    spot grid (squidpy ``spatial_neighbors`` + ``spatial_autocorr(mode="moran")``).
    The SVG gene set is the top 20 genes by Moran's I of the *observed* slide; the
    SVG recovery rate is ``|top20(observed) & top20(predicted)| / 20`` (divided by
    the set size when the panel is smaller).

Measured cost (``benchmarks/bench_metrics.py``, 2,000 spots x 785 genes, one CPU
core) is recorded in ``benchmarks/results/bench_metrics.json``; the cheap metrics
(``spearman``, ``nrmse``, ``auc``, ``jsd``) are computed by default, ``ssim``, ``mi``
and ``svg`` on request (see :data:`he2st.evaluate.metrics.DEFAULT_METRICS`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from he2st.errors import He2stInputError

#: Number of top spatially variable genes (Moran's I) of the SVG set and recovery rate.
N_SVG = 20
#: Equal-frequency bins of the mutual information.
MI_BINS = 10


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, method="average", axis=0)


def _pair(observed: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(observed, dtype=np.float64), np.asarray(predicted, dtype=np.float64)


def _constant(x: np.ndarray) -> np.ndarray:
    return np.ptp(x, axis=0) == 0


def spearman_per_gene(observed: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Spearman correlation per gene (NaN when either side is constant).

    Parameters
    ----------
    observed, predicted
        ``(n_spots, n_genes)`` values.

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` float64.
    """
    from he2st._stats import pearson_per_gene

    x, y = _pair(observed, predicted)
    r, _ = pearson_per_gene(_ranks(x), _ranks(y))
    r = np.asarray(r, dtype=np.float64)
    r[_constant(x) | _constant(y)] = np.nan
    return r


def nrmse_per_gene(observed: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """RMSE divided by the observed gene's range (max - min over spots); NaN for a constant gene.

    Parameters
    ----------
    observed, predicted
        ``(n_spots, n_genes)`` values.

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` float64.
    """
    x, y = _pair(observed, predicted)
    rng = np.ptp(x, axis=0)
    rmse = np.sqrt(((y - x) ** 2).mean(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(rng > 0, rmse / np.where(rng > 0, rng, 1.0), np.nan)


def auc_per_gene(observed: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """ROC AUC of the predictions against ``observed > median(observed)``, per gene.

    Parameters
    ----------
    observed, predicted
        ``(n_spots, n_genes)`` values.

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` float64; NaN when every spot falls in one class.
    """
    x, y = _pair(observed, predicted)
    pos = x > np.median(x, axis=0)
    n1 = pos.sum(axis=0).astype(np.float64)
    n0 = x.shape[0] - n1
    r1 = np.where(pos, _ranks(y), 0.0).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (r1 - n1 * (n1 + 1) / 2) / (n1 * n0)
    auc[(n1 == 0) | (n0 == 0)] = np.nan
    return auc


def jsd_per_gene(observed: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance (base 2) between the shifted, sum-1 maps; NaN when a map is constant.

    Parameters
    ----------
    observed, predicted
        ``(n_spots, n_genes)`` values.

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` float64 in [0, 1].
    """
    from scipy.spatial.distance import jensenshannon

    x, y = _pair(observed, predicted)
    p = x - x.min(axis=0)
    q = y - y.min(axis=0)
    bad = (p.sum(axis=0) == 0) | (q.sum(axis=0) == 0)
    p[:, bad] = 1.0
    q[:, bad] = 1.0
    d = np.asarray(jensenshannon(p, q, base=2, axis=0), dtype=np.float64)
    d[bad] = np.nan
    return d


def equal_frequency_bins(x: np.ndarray, n_bins: int = MI_BINS) -> np.ndarray:
    """Bin codes of each column in ``n_bins`` equal-frequency bins; tied values share a bin.

    Parameters
    ----------
    x
        ``(n_spots, n_genes)`` values.
    n_bins
        Number of bins.

    Returns
    -------
    numpy.ndarray
        int ``(n_spots, n_genes)`` codes in ``0 .. n_bins-1``.
    """
    from scipy.stats import rankdata

    x = np.asarray(x, dtype=np.float64)
    r = rankdata(x, method="min", axis=0) - 1  # ties: the lowest rank
    return np.floor(r * n_bins / x.shape[0]).astype(np.int64)


def mi_per_gene(observed: np.ndarray, predicted: np.ndarray, n_bins: int = MI_BINS) -> np.ndarray:
    """Mutual information (nats) of equal-frequency-binned observed and predicted values.

    Parameters
    ----------
    observed, predicted
        ``(n_spots, n_genes)`` values.
    n_bins
        Equal-frequency bins per side (:func:`equal_frequency_bins`).

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` float64 (0 for a constant side).
    """
    from sklearn.metrics import mutual_info_score

    bx = equal_frequency_bins(observed, n_bins)
    by = equal_frequency_bins(predicted, n_bins)
    return np.array([mutual_info_score(bx[:, j], by[:, j]) for j in range(bx.shape[1])], dtype=np.float64)


# -- spatial: the spot grid -------------------------------------------------------------


def spot_grid(slide: Any) -> np.ndarray:
    """Integer ``(row, col)`` grid position of each spot of a slide.

    From ``obs["array_row"]``/``obs["array_col"]`` when present; otherwise the pixel
    positions ``obsm["spatial"]`` (x, y) binned by the spot pitch (the median
    nearest-neighbour distance): ``round((y - min y) / pitch)``, ``round((x - min x) / pitch)``.

    Parameters
    ----------
    slide
        A slide AnnData.

    Returns
    -------
    numpy.ndarray
        int64 ``(n_spots, 2)``.

    Raises
    ------
    He2stInputError
        The slide has neither array positions nor ``obsm["spatial"]``.
    """
    obs = slide.obs
    if "array_row" in obs and "array_col" in obs:
        return np.column_stack([obs["array_row"].to_numpy(), obs["array_col"].to_numpy()]).astype(np.int64)
    if "spatial" not in slide.obsm:
        raise He2stInputError("slide has no obs['array_row'/'array_col'] and no obsm['spatial']: no spot grid")
    return grid_from_pixels(np.asarray(slide.obsm["spatial"], dtype=np.float64))


def grid_from_pixels(xy: np.ndarray) -> np.ndarray:
    """Pixel positions (x, y) binned by the spot pitch into integer (row, col).

    Parameters
    ----------
    xy
        ``(n_spots, 2)`` pixel positions, x then y.

    Returns
    -------
    numpy.ndarray
        int64 ``(n_spots, 2)`` (row, col).
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 2:
        return np.zeros((len(xy), 2), dtype=np.int64)
    d, _ = cKDTree(xy).query(xy, k=2)
    pitch = float(np.median(d[:, 1])) or 1.0
    rc = np.rint((xy[:, ::-1] - xy[:, ::-1].min(axis=0)) / pitch)
    return rc.astype(np.int64)


def raster(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Maps of spot values on the spot grid: ``(n_rows, n_cols, n_genes)``.

    Each gene's values are min-max scaled to [0, 1] over the spots first (a constant
    gene becomes 0); cells without a spot are 0; spots sharing a cell are averaged.

    Parameters
    ----------
    values
        ``(n_spots, n_genes)`` values.
    grid
        ``(n_spots, 2)`` integer (row, col) positions (:func:`spot_grid`).

    Returns
    -------
    numpy.ndarray
        float64 ``(n_rows, n_cols, n_genes)``.
    """
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(grid, dtype=np.int64)
    g = g - g.min(axis=0)
    lo, rng = v.min(axis=0), np.ptp(v, axis=0)
    v = np.where(rng > 0, (v - lo) / np.where(rng > 0, rng, 1.0), 0.0)
    shape = (int(g[:, 0].max()) + 1, int(g[:, 1].max()) + 1)
    out = np.zeros((*shape, v.shape[1]))
    count = np.zeros(shape)
    np.add.at(out, (g[:, 0], g[:, 1]), v)
    np.add.at(count, (g[:, 0], g[:, 1]), 1.0)
    return out / np.maximum(count, 1.0)[:, :, None]


def ssim_per_gene(observed: np.ndarray, predicted: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """SSIM of observed against predicted maps on the spot grid (see the module docstring).

    Parameters
    ----------
    observed, predicted
        ``(n_spots, n_genes)`` values.
    grid
        ``(n_spots, 2)`` integer (row, col) positions.

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` float64; NaN for a constant observed gene or a grid under 3 cells on a side.
    """
    from skimage.metrics import structural_similarity

    x = np.asarray(observed, dtype=np.float64)
    a, b = raster(x, grid), raster(predicted, grid)
    win = min(7, *a.shape[:2])
    win -= 1 - win % 2  # odd
    out = np.full(x.shape[1], np.nan)
    if win < 3:
        return out
    for j in np.flatnonzero(~_constant(x)):
        out[j] = structural_similarity(a[:, :, j], b[:, :, j], data_range=1.0, win_size=win)
    return out


def moran_i(values: np.ndarray, grid: np.ndarray, genes: Sequence[str]) -> np.ndarray:
    """Moran's I per gene on a 6-nearest-neighbour graph of the spot grid (squidpy).

    Parameters
    ----------
    values
        ``(n_spots, n_genes)`` values.
    grid
        ``(n_spots, 2)`` spot positions (grid or pixels).
    genes
        Gene names of the columns.

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` float64, in the order of ``genes`` (NaN for a constant gene).
    """
    import anndata as ad
    import pandas as pd

    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import squidpy as sq
        except ImportError as err:  # squidpy is a test extra, not a core dependency
            raise He2stInputError(
                "metric 'svg' (Moran's I) needs squidpy: pip install squidpy (or he2st[test])"
            ) from err

    import logging

    verbosity, level = sc.settings.verbosity, logging.root.manager.disable
    sc.settings.verbosity = 0
    logging.disable(logging.INFO)  # squidpy logs every graph it builds
    try:
        a = ad.AnnData(X=np.asarray(values, dtype=np.float64))
        a.var_names = pd.Index([str(g) for g in genes])
        a.obsm["spatial"] = np.asarray(grid, dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # squidpy's notes on the graph; constant genes (their I is NaN)
            sq.gr.spatial_neighbors(a, coord_type="generic", n_neighs=max(min(6, a.n_obs - 1), 1))
            sq.gr.spatial_autocorr(a, mode="moran", n_perms=None, show_progress_bar=False, n_jobs=1)
    finally:
        sc.settings.verbosity = verbosity
        logging.disable(level)
    return a.uns["moranI"]["I"].reindex(a.var_names).to_numpy(dtype=np.float64)


def top_svg(moran: np.ndarray, genes: Sequence[str], n: int = N_SVG) -> list[str]:
    """The ``n`` genes of highest Moran's I (NaN last; ties keep panel order).

    Parameters
    ----------
    moran
        Moran's I per gene (:func:`moran_i`).
    genes
        Gene names aligned with ``moran``.
    n
        How many genes.

    Returns
    -------
    list of str
    """
    m = np.asarray(moran, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(m))
    order = ok[np.argsort(-m[ok], kind="stable")]
    return [str(genes[i]) for i in order[:n]]


def svg_recovery(observed_top: Sequence[str], predicted_top: Sequence[str]) -> float:
    """``|observed_top & predicted_top| / len(observed_top)`` (NaN when ``observed_top`` is empty).

    Parameters
    ----------
    observed_top, predicted_top
        Top spatially variable genes of the observed and predicted slide.

    Returns
    -------
    float
    """
    if not observed_top:
        return float("nan")
    return len(set(observed_top) & set(predicted_top)) / len(observed_top)


#: Per-gene metric functions ``(observed, predicted) -> (n_genes,)``; SSIM also takes the grid.
PER_GENE_FUNCTIONS = {
    "spearman": spearman_per_gene,
    "nrmse": nrmse_per_gene,
    "auc": auc_per_gene,
    "jsd": jsd_per_gene,
    "mi": mi_per_gene,
}
