"""Metrics of predicted against observed spatial expression.

The field reports, per held-out slide, the Pearson correlation between the
predicted and observed expression of each gene over the slide's spots, and
averages it over gene sets:

- ``ACG`` -- all genes of the panel (PCC(ACG), e.g. Hist2ST, mclSTExp);
- ``HEG`` -- the ``n_top`` genes with the highest mean *observed* expression in
  the test slide (PCC(HEG); BLEEP, mclSTExp use 50);
- ``HVG`` -- the ``n_top`` genes with the highest *observed* variance in the
  test slide (PCC(HVG));
- ``markers`` -- a user list (e.g. the 12 cancer markers of Jiang et al. 2024).

HEG and HVG are chosen from the observed values only, never from the
predictions, so that a method cannot pick the genes it is scored on.

A gene that is constant over the slide's spots, in the observed or in the
predicted values, has no defined correlation: its PCC is NaN, it is left out of
every mean and *counted* (``n_nan``) so that a method predicting a constant
cannot look better (or worse) by a silent zero. Errors (MSE, MAE, RMSE) are
averaged over spots x genes of the gene set.

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

import numpy as np
import pandas as pd

from he2st._stats import check_pair as _check_pair
from he2st._stats import dense_matrix as _dense
from he2st._stats import pearson_per_gene
from he2st.errors import He2stInputError

#: Gene sets reported by :func:`evaluate_slide`, in report order.
GENE_SETS = ("ACG", "HEG", "HVG", "markers")
#: Metrics reported per gene set.
METRICS = ("pcc", "mse", "mae", "rmse")
#: Default size of the HEG and HVG sets (BLEEP, mclSTExp).
N_TOP = 50


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
        variance) and, when ``markers`` is given, ``"markers"`` (those in the panel).

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
        ``gene, pcc, pvalue, mse, mean_observed, var_observed`` per panel gene.
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

    Returns
    -------
    SlideEvaluation
        ``.metrics`` (long table), ``.per_gene``, ``.gene_sets``; ``.as_dict()``
        gives ``{"PCC(ACG)": ..., "PCC(HEG)": ..., "MSE(ACG)": ...}``.

    Examples
    --------
    >>> ev = evaluate_slide(obs, pred, panel.genes)
    >>> ev["PCC(ACG)"], ev["n_nan(ACG)"]
    """
    x, y = _check_pair(observed, predicted)
    genes = [str(g) for g in genes]
    if x.shape[1] != len(genes):
        raise He2stInputError(f"{x.shape[1]} expression columns for {len(genes)} genes")
    if len(set(genes)) != len(genes):
        raise He2stInputError("gene names are not unique")
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
    sets = gene_sets(x, genes, markers=markers, n_top=n_top)
    col = {g: i for i, g in enumerate(genes)}
    rows = []
    for name in GENE_SETS:
        if name not in sets:
            continue
        idx = np.array([col[g] for g in sets[name]], dtype=int)
        rs = r[idx]
        n_nan = int(np.isnan(rs).sum())
        pcc = float(np.mean(rs[~np.isnan(rs)])) if n_nan < len(rs) else float("nan")
        mse = float(sq[:, idx].mean())
        rows += [
            ("pcc", name, pcc, len(idx), n_nan),
            ("mse", name, mse, len(idx), 0),
            ("mae", name, float(ab[:, idx].mean()), len(idx), 0),
            ("rmse", name, float(np.sqrt(mse)), len(idx), 0),
        ]
    metrics = pd.DataFrame(rows, columns=["metric", "gene_set", "value", "n_genes", "n_nan"])
    return SlideEvaluation(metrics=metrics, per_gene=per_gene, gene_sets=sets)


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
        Methods to compare (default: all, in order of appearance).

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
        slides where the gene's PCC is undefined are left out of the means and counted in ``n_nan``.
        p-values of 0 (underflow) are clipped to the smallest positive double.
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

