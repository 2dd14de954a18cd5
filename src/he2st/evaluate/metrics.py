"""Metrics of predicted against observed spatial expression.

The field reports, per held-out slide, the Pearson correlation between the
predicted and observed expression of each gene over the slide's spots, and
averages it over gene sets:

- ``ACG`` -- all genes of the panel (PCC(ACG), e.g. Hist2ST, mclSTExp);
- ``HEG`` -- the ``n_top`` genes with the highest mean *observed* expression in
  the test slide (PCC(HEG); BLEEP, mclSTExp use 50);
- ``HVG`` -- the ``n_top`` genes with the highest *observed* variance in the
  test slide (PCC(HVG));
- ``HVG10`` -- the top 10 % (rounded up) of the panel by observed variance (Wang
  et al. 2025's "top 10 % HVG");
- ``SVG`` -- the 20 genes of highest Moran's I on the *observed* slide (only when
  the ``svg`` metric is asked for; it needs the spot grid);
- ``markers`` -- a user list (e.g. the 12 cancer markers of Jiang et al. 2024).

HEG and HVG are chosen from the observed values only, never from the
predictions, so that a method cannot pick the genes it is scored on.

A gene that is constant over the slide's spots, in the observed or in the
predicted values, has no defined correlation: its PCC is NaN, it is left out of
every mean and *counted* (``n_nan``) so that a method predicting a constant
cannot look better (or worse) by a silent zero. Errors (MSE, MAE, RMSE) are
averaged over spots x genes of the gene set.

Beyond PCC and the errors, :func:`evaluate_slide` computes the field's other
metrics (Wang et al., Nat Commun 2025; HEST), defined in
:mod:`he2st.evaluate.field_metrics`: Spearman, normalised RMSE, ROC AUC against
the median-binarised observed values, Jensen-Shannon distance of the spatial
distributions (computed by default: about 1 s in all per 2,000 x 785 slide), and on
request (``metrics=``) SSIM of the rasterised maps, mutual information and
Moran's I (the SVG set and the SVG recovery rate), which cost seconds per slide
(``benchmarks/bench_metrics.py``). Like PCC, a per-gene value that is undefined
is NaN, left out of the set's mean and counted in ``n_nan``.

Across slides, metrics are summarised as mean and sample standard deviation,
methods are compared with a paired Wilcoxon signed-rank test over slides, and
genes are ranked by their mean ``-log10 p`` over slides (the "top genes" table
of BLEEP and mclSTExp).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import math
import warnings

import numpy as np
import pandas as pd

from he2st._stats import check_pair as _check_pair
from he2st._stats import dense_matrix as _dense
from he2st._stats import pearson_per_gene
from he2st.errors import He2stInputError

#: Gene sets reported by :func:`evaluate_slide`, in report order.
GENE_SETS = ("ACG", "HEG", "HVG", "HVG10", "SVG", "markers")
#: Metrics always computed, per gene set.
METRICS = ("pcc", "mse", "mae", "rmse")
#: Per-gene metrics of the field (:mod:`he2st.evaluate.field_metrics`), in report order.
FIELD_METRICS = ("spearman", "nrmse", "auc", "jsd", "ssim", "mi")
#: Every metric name ``evaluate_slide(metrics=...)`` accepts (``svg``: Moran's I top-20
#: set and the ``svg_recovery`` rate).
ALL_METRICS = (*METRICS, *FIELD_METRICS, "svg")
#: Computed by default: the cheap ones (measured by ``benchmarks/bench_metrics.py``).
DEFAULT_METRICS = (*METRICS, "spearman", "nrmse", "auc", "jsd")
#: Metrics that need the spot grid (``grid=``).
SPATIAL_METRICS = ("ssim", "svg")
#: (metric, gene set) pairs of the paired Wilcoxon tables of a run, when present.
WILCOXON_METRICS = (
    ("pcc", "ACG"), ("pcc", "HEG"), ("mse", "ACG"), ("spearman", "ACG"), ("nrmse", "ACG"), ("auc", "ACG"),
    ("jsd", "ACG"), ("ssim", "ACG"), ("mi", "ACG"), ("svg_recovery", "SVG"),
)
#: Default size of the HEG and HVG sets (BLEEP, mclSTExp).
N_TOP = 50
#: Share of the panel in the HVG10 set.
HVG_FRACTION = 0.10


class GeneSetSizeWarning(UserWarning):
    """A top-n gene set (HEG/HVG) is not smaller than the panel: PCC(HEG) and PCC(HVG) equal PCC(ACG)."""


def check_n_top(n_top: int, n_genes: int, where: str = "") -> bool:
    """Warn :class:`GeneSetSizeWarning` when ``n_top >= n_genes``; returns True when it warned.

    Parameters
    ----------
    n_top
        Size of the HEG/HVG sets.
    n_genes
        Genes in the panel.
    where
        What the panel belongs to (e.g. a fold), for the message.

    Returns
    -------
    bool
        Whether the warning was emitted.
    """
    if n_top < n_genes:
        return False
    warnings.warn(
        f"{where + ': ' if where else ''}n_top={n_top} is not smaller than the {n_genes}-gene panel, so the "
        "HEG and HVG sets hold every gene and PCC(HEG) = PCC(HVG) = PCC(ACG); use a larger panel or a smaller n_top",
        GeneSetSizeWarning,
        stacklevel=3,
    )
    return True


def resolve_metrics(metrics: Sequence[str] | None) -> tuple[str, ...]:
    """The metrics to compute: ``None`` gives :data:`DEFAULT_METRICS`; pcc/mse/mae/rmse are always in.

    A list names exactly what is computed (opt-out of a default by leaving it out);
    ``"default"`` in it stands for :data:`DEFAULT_METRICS` and ``"all"`` for
    :data:`ALL_METRICS`, e.g. ``["default", "ssim", "svg"]``.

    Parameters
    ----------
    metrics
        Metric names (from :data:`ALL_METRICS`, ``"default"``, ``"all"``), or None;
        a string is split at commas.

    Returns
    -------
    tuple of str
        In :data:`ALL_METRICS` order.

    Raises
    ------
    He2stInputError
        An unknown metric name.
    """
    if metrics is None:
        return DEFAULT_METRICS
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    names = {str(m).lower() for m in metrics}
    if "default" in names:
        names |= set(DEFAULT_METRICS)
    if "all" in names:
        names |= set(ALL_METRICS)
    names -= {"default", "all"}
    unknown = sorted(names - set(ALL_METRICS))
    if unknown:
        raise He2stInputError(f"unknown metric(s) {unknown}; known: {list(ALL_METRICS)}")
    return tuple(m for m in ALL_METRICS if m in names or m in METRICS)


# Per-gene correlation is :func:`he2st._stats.pearson_per_gene` (methods use it too).


# -- gene sets ----------------------------------------------------------------


def top_genes_by(values: np.ndarray, genes: Sequence[str], n_top: int) -> list[str]:
    """The ``n_top`` genes with the largest ``values``; ties keep panel order.

    When the panel has fewer than ``n_top`` genes, all are returned.

    Parameters
    ----------
    values
        One score per gene of ``genes`` (e.g. mean or variance of expression).
    genes
        The panel, aligned with ``values``.
    n_top
        How many genes to keep.

    Returns
    -------
    list of str
        The genes, highest value first.
    """
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(-values, kind="stable")
    return [genes[i] for i in order[: min(n_top, len(genes))]]


def gene_sets(
    observed: np.ndarray,
    genes: Sequence[str],
    markers: Sequence[str] | None = None,
    n_top: int = N_TOP,
) -> dict[str, list[str]]:
    """The ACG, HEG, HVG (and markers) gene sets of one test slide.

    HEG and HVG are ranked on the *observed* expression of the slide
    (mean, and population variance over spots).

    Parameters
    ----------
    observed
        Observed expression of the test slide, spots x genes (dense or sparse).
    genes
        The panel, aligned with the columns of ``observed``.
    markers
        Marker genes; those in the panel form the ``"markers"`` set (None: no such set).
    n_top
        Size of the HEG and HVG sets.

    Returns
    -------
    dict of str to list of str
        ``"ACG"`` (all panel genes), ``"HEG"`` (highest mean), ``"HVG"`` (highest
        variance), ``"HVG10"`` (the top 10 %, rounded up, by variance) and, when ``markers`` is given, ``"markers"`` (those in the panel).

    Raises
    ------
    He2stInputError
        ``markers`` names no gene of the panel.
    """
    x = _dense(observed, "observed")
    genes = [str(g) for g in genes]
    if x.shape[1] != len(genes):
        raise He2stInputError(f"observed has {x.shape[1]} columns for {len(genes)} genes")
    out = {
        "ACG": list(genes),
        "HEG": top_genes_by(x.mean(axis=0), genes, n_top),
        "HVG": top_genes_by(x.var(axis=0), genes, n_top),
        "HVG10": top_genes_by(x.var(axis=0), genes, max(1, math.ceil(HVG_FRACTION * len(genes)))),
    }
    if markers is not None:
        present = set(genes)
        found = [str(m) for m in markers if str(m) in present]
        if not found:
            raise He2stInputError(
                f"none of the {len(markers)} marker genes is in the {len(genes)}-gene panel "
                f"(markers: {list(markers)[:5]}...)"
            )
        out["markers"] = found
    return out


# -- one slide ----------------------------------------------------------------


@dataclass
class SlideEvaluation:
    """Metrics of one test slide.

    Parameters
    ----------
    metrics
        Long table ``metric, gene_set, value, n_genes, n_nan`` (``n_nan``: genes of
        the set whose PCC is undefined and was left out of the mean).
    per_gene
        ``gene, pcc, pvalue, mse, mean_observed, var_observed`` per panel gene, then one
        column per field metric computed (``spearman``, ``nrmse``, ``auc``, ``jsd``, ``ssim``,
        ``mi``; ``moran_observed``/``moran_predicted`` with ``svg``).
    gene_sets
        The genes of each gene set.
    """

    metrics: pd.DataFrame
    per_gene: pd.DataFrame
    gene_sets: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Flat ``{"PCC(ACG)": ..., "MSE(ACG)": ..., "n_nan(ACG)": ...}`` mapping.

        Returns
        -------
        dict of str to float
            ``"<METRIC>(<gene set>)"`` -> value for every row of :attr:`metrics`, and
            ``"n_nan(<gene set>)"`` -> genes left out of the set's mean PCC.
        """
        out: dict[str, float] = {}
        for row in self.metrics.itertuples(index=False):
            out[f"{row.metric.upper()}({row.gene_set})"] = float(row.value)
            if row.metric == "pcc":
                out[f"n_nan({row.gene_set})"] = int(row.n_nan)
        return out

    def __getitem__(self, key: str) -> float:
        return self.as_dict()[key]


def evaluate_slide(
    observed: np.ndarray,
    predicted: np.ndarray,
    genes: Sequence[str],
    markers: Sequence[str] | None = None,
    n_top: int = N_TOP,
    metrics: Sequence[str] | None = None,
    grid: np.ndarray | None = None,
) -> SlideEvaluation:
    """Evaluate the predictions of one slide.

    Parameters
    ----------
    observed, predicted
        ``(n_spots, n_genes)`` expression on the same (normalised) scale.
    genes
        Gene symbols of the columns.
    markers
        Optional marker genes; those not in ``genes`` are ignored (at least one must be).
    n_top
        Size of the HEG and HVG sets (default 50).
    metrics
        Metrics to compute (names of :data:`ALL_METRICS`; None: :data:`DEFAULT_METRICS`,
        i.e. PCC, MSE, MAE, RMSE, Spearman, nRMSE, AUC, JSD). ``"ssim"``, ``"mi"`` and
        ``"svg"`` (the SVG gene set and ``svg_recovery``) are opt-in: they cost seconds
        per slide. PCC, MSE, MAE and RMSE are always computed; ``"default"`` and ``"all"``
        expand as in :func:`resolve_metrics` (e.g. ``["default", "ssim"]``).
    grid
        ``(n_spots, 2)`` integer spot grid (:func:`he2st.evaluate.field_metrics.spot_grid`);
        needed by ``"ssim"`` and ``"svg"``.

    Returns
    -------
    SlideEvaluation
        ``.metrics`` (long table), ``.per_gene``, ``.gene_sets``; ``.as_dict()``
        gives ``{"PCC(ACG)": ..., "PCC(HEG)": ..., "MSE(ACG)": ...}``.

    Raises
    ------
    He2stInputError
        Mismatched shapes, duplicated genes, an unknown metric, or a spatial metric without ``grid``.

    Examples
    --------
    >>> ev = evaluate_slide(obs, pred, panel.genes)
    >>> ev["PCC(ACG)"], ev["n_nan(ACG)"], ev["SPEARMAN(HVG10)"]
    """
    from he2st.evaluate import field_metrics as F

    x, y = _check_pair(observed, predicted)
    genes = [str(g) for g in genes]
    if x.shape[1] != len(genes):
        raise He2stInputError(f"{x.shape[1]} expression columns for {len(genes)} genes")
    if len(set(genes)) != len(genes):
        raise He2stInputError("gene names are not unique")
    chosen = resolve_metrics(metrics)
    if grid is not None:
        grid = np.asarray(grid)
        if grid.shape != (x.shape[0], 2):
            raise He2stInputError(f"grid has shape {grid.shape}, expected ({x.shape[0]}, 2)")
    needs_grid = [m for m in SPATIAL_METRICS if m in chosen]
    if needs_grid and grid is None:
        raise He2stInputError(f"metric(s) {needs_grid} need the spot grid (grid=)")
    r, p = pearson_per_gene(x, y)
    sq = (y - x) ** 2
    ab = np.abs(y - x)
    per_gene = pd.DataFrame(
        {
            "gene": genes,
            "pcc": r,
            "pvalue": p,
            "mse": sq.mean(axis=0),
            "mean_observed": x.mean(axis=0),
            "var_observed": x.var(axis=0),
        }
    )
    field_values: dict[str, np.ndarray] = {}
    for name in FIELD_METRICS:
        if name not in chosen:
            continue
        if name == "ssim":
            field_values[name] = F.ssim_per_gene(x, y, grid)
        else:
            field_values[name] = F.PER_GENE_FUNCTIONS[name](x, y)
        per_gene[name] = field_values[name]
    sets = gene_sets(x, genes, markers=markers, n_top=n_top)
    recovery = None
    if "svg" in chosen:
        i_obs = F.moran_i(x, grid, genes)
        i_pred = F.moran_i(y, grid, genes)
        per_gene["moran_observed"] = i_obs
        per_gene["moran_predicted"] = i_pred
        top_obs = F.top_svg(i_obs, genes)
        if top_obs:
            sets["SVG"] = top_obs
        recovery = F.svg_recovery(top_obs, F.top_svg(i_pred, genes, n=len(top_obs)))
    col = {g: i for i, g in enumerate(genes)}
    rows = []
    for name in GENE_SETS:
        if name not in sets:
            continue
        idx = np.array([col[g] for g in sets[name]], dtype=int)
        mse = float(sq[:, idx].mean())
        rows += [
            ("pcc", name, *_nanmean_count(r[idx]), len(idx)),
            ("mse", name, mse, 0, len(idx)),
            ("mae", name, float(ab[:, idx].mean()), 0, len(idx)),
            ("rmse", name, float(np.sqrt(mse)), 0, len(idx)),
        ]
        rows += [(m, name, *_nanmean_count(v[idx]), len(idx)) for m, v in field_values.items()]
        if name == "SVG" and recovery is not None:
            rows.append(("svg_recovery", name, recovery, 0, len(idx)))
    table = pd.DataFrame(
        [(m, g, v, n, k) for m, g, v, k, n in rows], columns=["metric", "gene_set", "value", "n_genes", "n_nan"]
    )
    return SlideEvaluation(metrics=table, per_gene=per_gene, gene_sets=sets)


def _nanmean_count(v: np.ndarray) -> tuple[float, int]:
    """Mean of the defined values and the number of NaN ones (mean NaN when none is defined)."""
    bad = np.isnan(v)
    n_nan = int(bad.sum())
    return (float(np.mean(v[~bad])) if n_nan < len(v) else float("nan")), n_nan


# -- across slides --------------------------------------------------------------


def summarize(metrics: pd.DataFrame, by: Sequence[str] = ("method", "metric", "gene_set")) -> pd.DataFrame:
    """Mean and sample sd (ddof=1) of ``value`` over test slides.

    Parameters
    ----------
    metrics
        Long table with at least the ``by`` columns, ``test_slide`` and ``value``
        (as written to ``metrics.csv``).

    Returns
    -------
    pandas.DataFrame
        ``by`` columns, ``mean``, ``sd`` (NaN with one slide), ``n_slides``
        (slides with a defined value), ``n_nan_slides`` (slides whose value is NaN)
        and, when present, ``n_nan`` summed over slides.
    """
    _require_columns(metrics, [*by, "value"], "metrics")
    g = metrics.groupby(list(by), sort=False, observed=True)
    out = g["value"].agg(mean="mean", sd=lambda v: v.std(ddof=1) if v.notna().sum() > 1 else np.nan)
    out["n_slides"] = g["value"].count()
    out["n_nan_slides"] = g["value"].apply(lambda v: int(v.isna().sum()))
    if "n_nan" in metrics:
        out["n_nan"] = g["n_nan"].sum()
    return out.reset_index()


@dataclass(frozen=True)
class WilcoxonResult:
    """A paired Wilcoxon signed-rank test of method ``a`` against ``b`` over slides.

    Parameters
    ----------
    a, b
        Names of the two methods compared.
    n
        Usable pairs (no NaN on either side).
    n_nonzero
        Pairs with a non-zero difference (those the test ranks).
    statistic
        Wilcoxon statistic (NaN when there is no usable pair).
    pvalue
        Two-sided p-value (NaN with no usable pair, 1.0 when every difference is zero).
    median_difference
        Median of ``a - b`` over usable pairs.
    a_wins, b_wins
        Pairs where ``a`` (resp. ``b``) is higher.
    note
        Caveats, ``"; "``-separated (dropped pairs, too few pairs to reach 0.05, ties).
    """

    a: str
    b: str
    n: int
    n_nonzero: int
    statistic: float
    pvalue: float
    median_difference: float
    a_wins: int
    b_wins: int
    note: str


def paired_wilcoxon(a: Sequence[float], b: Sequence[float], names: tuple[str, str] = ("a", "b")) -> WilcoxonResult:
    """Two-sided paired Wilcoxon signed-rank test of ``a - b`` (e.g. PCC per slide).

    Uses :func:`scipy.stats.wilcoxon` (``zero_method="wilcox"``: zero differences
    are dropped; ``method="auto"``). Pairs with a NaN on either side are dropped.
    Cases scipy handles poorly are made explicit in ``note``:

    - fewer than 1 usable pair, or all differences zero: ``pvalue`` is NaN / 1.0;
    - fewer than 6 non-zero differences: the exact two-sided p-value cannot fall
      below 0.0625 (n=5), so no difference can be significant at 0.05;
    - tied absolute differences: scipy's rank-based p-value with ties is approximate.

    Parameters
    ----------
    a, b
        Paired values (one per slide, same order and length), 1-D.
    names
        Names of the two sides, stored in the result.

    Returns
    -------
    WilcoxonResult
        The test, the win counts and the notes.

    Raises
    ------
    He2stInputError
        ``a`` and ``b`` are not 1-D and of the same length.
    """
    from scipy.stats import wilcoxon

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise He2stInputError(f"paired samples must be 1-d and the same length, got {x.shape} and {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    n = int(d.size)
    nz = d[d != 0]
    notes = []
    if n < len(x):
        notes.append(f"{len(x) - n} pair(s) with NaN dropped")
    med = float(np.median(d)) if n else float("nan")
    wins = (int((d > 0).sum()), int((d < 0).sum()))
    if n == 0:
        notes.append("no usable pairs")
        return WilcoxonResult(*names, 0, 0, float("nan"), float("nan"), med, *wins, "; ".join(notes))
    if nz.size == 0:
        notes.append("all differences are zero")
        return WilcoxonResult(*names, n, 0, 0.0, 1.0, med, *wins, "; ".join(notes))
    res = wilcoxon(x[keep], y[keep], zero_method="wilcox", alternative="two-sided", method="auto")
    if nz.size < 6:
        notes.append(f"only {nz.size} non-zero pairs: p >= 0.0625 for n<=5, cannot reach 0.05")
    if len(np.unique(np.abs(nz))) < nz.size:
        notes.append("tied |differences|")
    if nz.size < n:
        notes.append(f"{n - nz.size} zero difference(s) dropped")
    return WilcoxonResult(
        *names, n, int(nz.size), float(res.statistic), float(res.pvalue), med, *wins, "; ".join(notes)
    )


def wilcoxon_table(
    metrics: pd.DataFrame,
    metric: str = "pcc",
    gene_set: str = "ACG",
    methods: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Paired Wilcoxon tests between every pair of methods, over test slides.

    Parameters
    ----------
    metrics
        Long table with ``method, test_slide, metric, gene_set, value``.
    metric, gene_set
        Which value to compare (default PCC(ACG)).
    methods
        Methods to compare (default: all, in order of appearance). A method whose
        value is undefined (NaN) on every slide -- the mean baseline's PCC: it
        predicts a constant -- is left out rather than compared on no pairs.

    Returns
    -------
    pandas.DataFrame
        One row per pair: ``a, b, n, n_nonzero, statistic, pvalue,
        median_difference`` (a - b), ``a_wins, b_wins, note``.
    """
    _require_columns(metrics, ["method", "test_slide", "metric", "gene_set", "value"], "metrics")
    sel = metrics[(metrics["metric"] == metric) & (metrics["gene_set"] == gene_set)]
    wide = sel.pivot_table(index="test_slide", columns="method", values="value", aggfunc="mean", dropna=False)
    methods = list(methods) if methods is not None else list(dict.fromkeys(sel["method"]))
    missing = [m for m in methods if m not in wide.columns]
    if missing:
        raise He2stInputError(f"no {metric}({gene_set}) values for method(s) {missing}")
    methods = [m for m in methods if wide[m].notna().any()]
    rows = [
        paired_wilcoxon(wide[a].to_numpy(), wide[b].to_numpy(), names=(a, b)).__dict__
        for a, b in combinations(methods, 2)
    ]
    cols = list(WilcoxonResult.__dataclass_fields__)
    return pd.DataFrame(rows, columns=cols)


def top_genes(per_gene: pd.DataFrame, n: int | None = 20, by: str = "neglog10p") -> pd.DataFrame:
    """Genes ranked by mean ``-log10 p`` (or mean PCC) across test slides, per method.

    Parameters
    ----------
    per_gene
        Table with ``method, test_slide, gene, pcc, pvalue`` (``per_gene.csv``).
    n
        Genes kept per method (None: all).
    by
        ``"neglog10p"`` (default, the BLEEP/mclSTExp ranking) or ``"pcc"``.

    Returns
    -------
    pandas.DataFrame
        ``method, rank, gene, mean_pcc, sd_pcc, mean_neglog10p, n_slides, n_nan``;
        slides where the gene's PCC is undefined are left out of the means and counted in ``n_nan``;
        a gene whose PCC is undefined on every slide (every gene of a constant predictor such
        as the mean baseline) has no row. p-values of 0 (underflow) are clipped to the
        smallest positive double.
    """
    _require_columns(per_gene, ["method", "test_slide", "gene", "pcc", "pvalue"], "per_gene")
    if by not in ("neglog10p", "pcc"):
        raise He2stInputError(f"top_genes: by must be 'neglog10p' or 'pcc', got {by!r}")
    df = per_gene.copy()
    df["neglog10p"] = -np.log10(np.clip(df["pvalue"].to_numpy(dtype=float), np.finfo(float).tiny, 1.0))
    g = df.groupby(["method", "gene"], sort=False, observed=True)
    out = pd.DataFrame(
        {
            "mean_pcc": g["pcc"].mean(),
            "sd_pcc": g["pcc"].std(ddof=1),
            "mean_neglog10p": g["neglog10p"].mean(),
            "n_slides": g["pcc"].count(),
            "n_nan": g["pcc"].apply(lambda v: int(v.isna().sum())),
        }
    ).reset_index()
    out = out[out["n_slides"] > 0]
    key = "mean_neglog10p" if by == "neglog10p" else "mean_pcc"
    out = out.sort_values(["method", key], ascending=[True, False], kind="stable", na_position="last")
    out["rank"] = out.groupby("method", sort=False).cumcount() + 1
    if n is not None:
        out = out[out["rank"] <= n]
    cols = ["method", "rank", "gene", "mean_pcc", "sd_pcc", "mean_neglog10p", "n_slides", "n_nan"]
    return out[cols].reset_index(drop=True)


def _require_columns(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise He2stInputError(f"{what} table lacks column(s) {missing}; has {list(df.columns)}")


def metrics_frame(ev: SlideEvaluation, **keys: Any) -> pd.DataFrame:
    """``ev.metrics`` with constant key columns (method, fold, test_slide) in front.

    Parameters
    ----------
    ev
        Evaluation of one slide.
    **keys
        Column name -> constant value, inserted in this order as the first columns.

    Returns
    -------
    pandas.DataFrame
        A copy of ``ev.metrics`` with the key columns.
    """
    return _with_keys(ev.metrics, keys)


def per_gene_frame(ev: SlideEvaluation, **keys: Any) -> pd.DataFrame:
    """``ev.per_gene`` with constant key columns in front.

    Parameters
    ----------
    ev
        Evaluation of one slide.
    **keys
        Column name -> constant value, inserted in this order as the first columns.

    Returns
    -------
    pandas.DataFrame
        A copy of ``ev.per_gene`` with the key columns.
    """
    return _with_keys(ev.per_gene, keys)


def _with_keys(table: pd.DataFrame, keys: dict[str, Any]) -> pd.DataFrame:
    df = table.copy()
    for i, (k, v) in enumerate(keys.items()):
        df.insert(i, k, v)
    return df

