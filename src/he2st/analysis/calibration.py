"""Calibration of predicted uncertainty: is the stated error the error you get?

A method with uncertainty (STimage's NB ensemble, the generic ``ensemble``
wrapper) returns, next to each prediction, a predictive standard deviation
``sd`` per spot and gene. It is calibrated when, among the predictions it calls
equally uncertain, the observed error matches that ``sd``. The usual check
(regression reliability diagram; Levi et al. 2022, Kuleshov et al. 2018) sorts
all (spot, gene) pairs by ``sd``, cuts them into bins of equal size and compares
per bin:

- ``mean_sd``: the mean predicted standard deviation,
- ``rmse``: the observed root-mean-square error (a calibrated model has
  ``rmse == mean_sd``: points on the diagonal),
- ``mae`` against ``expected_mae = sqrt(2/pi) * mean_sd``, the mean absolute
  error of a Gaussian with that sd,
- ``coverage95``: the share of observations inside ``prediction +- 1.96 sd``
  (0.95 when calibrated and Gaussian).

:func:`calibration_summary` adds one-number summaries: the Spearman correlation
between ``sd`` and ``|error|`` (does the model know *where* it is wrong?) and
the expected normalised calibration error ``ENCE = mean_bins |rmse - mean_sd| /
mean_sd`` (Levi et al. 2022).

All functions take arrays on the same (normalised) scale; the prediction
AnnData written by the runner holds the predictions in ``.X`` and the ``sd`` in
``layers["uncertainty"]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from he2st.errors import He2stInputError

#: Columns of :func:`calibration_table`.
TABLE_COLUMNS = ("bin", "n", "sd_min", "sd_max", "mean_sd", "rmse", "mae", "expected_mae", "coverage95")

_Z95 = 1.959963984540054


def _pairs(observed: Any, predicted: Any, uncertainty: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flattened finite ``(sd, error)`` pairs; checks shapes and signs."""
    obs = np.asarray(observed, dtype=np.float64)
    pred = np.asarray(predicted, dtype=np.float64)
    sd = np.asarray(uncertainty, dtype=np.float64)
    if not (obs.shape == pred.shape == sd.shape):
        raise He2stInputError(
            f"calibration: observed {obs.shape}, predicted {pred.shape} and uncertainty {sd.shape} "
            "must have the same shape (n_spots, n_genes)"
        )
    ok = np.isfinite(obs) & np.isfinite(pred) & np.isfinite(sd)
    if (sd[ok] < 0).any():
        raise He2stInputError("calibration: uncertainty must be a non-negative standard deviation")
    if not ok.any():
        raise He2stInputError("calibration: no finite (observed, predicted, uncertainty) triple")
    return sd[ok], (obs - pred)[ok]


def calibration_table(
    observed: Any, predicted: Any, uncertainty: Any, n_bins: int = 10
) -> pd.DataFrame:
    """Observed error against predicted uncertainty, in bins of equal count.

    Parameters
    ----------
    observed, predicted
        ``(n_spots, n_genes)`` observed and predicted expression on one scale.
    uncertainty
        Predicted standard deviation, same shape (e.g. ``layers["uncertainty"]``).
    n_bins
        Number of bins; pairs are sorted by ``uncertainty`` and cut into
        ``n_bins`` groups of (nearly) equal size. Non-finite entries are dropped.

    Returns
    -------
    pandas.DataFrame
        One row per non-empty bin with the columns of :data:`TABLE_COLUMNS`.

    Examples
    --------
    >>> tab = calibration_table(y_true, y_pred, y_sd, n_bins=10)
    >>> tab[["mean_sd", "rmse"]]          # equal when calibrated
    """
    if int(n_bins) < 1:
        raise He2stInputError(f"calibration: n_bins must be >= 1, got {n_bins}")
    sd, err = _pairs(observed, predicted, uncertainty)
    # A stable sort keeps ties in input order, so the table is deterministic.
    order = np.argsort(sd, kind="stable")
    rows = []
    for b, idx in enumerate(np.array_split(order, min(int(n_bins), sd.size))):
        s, e = sd[idx], err[idx]
        mean_sd = float(s.mean())
        rows.append(
            {
                "bin": b,
                "n": int(idx.size),
                "sd_min": float(s.min()),
                "sd_max": float(s.max()),
                "mean_sd": mean_sd,
                "rmse": float(np.sqrt(np.mean(e**2))),
                "mae": float(np.mean(np.abs(e))),
                "expected_mae": float(np.sqrt(2.0 / np.pi) * mean_sd),
                "coverage95": float(np.mean(np.abs(e) <= _Z95 * s)),
            }
        )
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def calibration_summary(observed: Any, predicted: Any, uncertainty: Any, n_bins: int = 10) -> dict[str, float]:
    """One-number summaries of calibration.

    Parameters
    ----------
    observed, predicted, uncertainty, n_bins
        As in :func:`calibration_table`.

    Returns
    -------
    dict
        ``spearman`` (rank correlation of ``sd`` with ``|error|``; NaN when either
        is constant), ``ence`` (mean over bins of ``|rmse - mean_sd| / mean_sd``;
        NaN if a bin has zero ``mean_sd``), ``coverage95`` (share of all pairs
        inside ``+- 1.96 sd``), ``mean_sd``, ``rmse`` and ``n`` (pairs used).
    """
    from scipy.stats import spearmanr

    sd, err = _pairs(observed, predicted, uncertainty)
    ae = np.abs(err)
    if sd.size > 1 and np.ptp(sd) > 0 and np.ptp(ae) > 0:
        rho = float(spearmanr(sd, ae).statistic)
    else:
        rho = float("nan")
    tab = calibration_table(observed, predicted, uncertainty, n_bins=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(tab["rmse"].to_numpy() - tab["mean_sd"].to_numpy()) / tab["mean_sd"].to_numpy()
    ence = float(np.mean(rel)) if np.isfinite(rel).all() else float("nan")
    return {
        "spearman": rho,
        "ence": ence,
        "coverage95": float(np.mean(ae <= _Z95 * sd)),
        "mean_sd": float(sd.mean()),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "n": int(sd.size),
    }


def plot_calibration(
    tables: pd.DataFrame | Mapping[str, pd.DataFrame],
    ax: Any = None,
    title: str | None = "Calibration of predicted uncertainty",
) -> Any:
    """Reliability diagram: observed RMSE against predicted sd per bin.

    Parameters
    ----------
    tables
        One :func:`calibration_table` or a mapping ``label -> table`` (one line
        per method).
    ax
        A matplotlib Axes to draw on; a new figure is made when None.
    title
        Axes title (None for none).

    Returns
    -------
    matplotlib.figure.Figure
        The figure holding the axes; the dashed diagonal is perfect calibration.
    """
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 4.2))
    else:
        fig = ax.figure
    if isinstance(tables, pd.DataFrame):
        tables = {"": tables}
    if not tables:
        raise He2stInputError("plot_calibration: no calibration table given")
    hi = 0.0
    for label, tab in tables.items():
        missing = {"mean_sd", "rmse"} - set(tab.columns)
        if missing:
            raise He2stInputError(f"plot_calibration: table {label!r} lacks columns {sorted(missing)}")
        ax.plot(tab["mean_sd"], tab["rmse"], marker="o", ms=3.5, lw=1.2, label=label or None)
        hi = max(hi, float(np.nanmax(tab["mean_sd"])), float(np.nanmax(tab["rmse"])))
    hi = hi * 1.05 if hi > 0 else 1.0
    ax.plot([0, hi], [0, hi], ls="--", color="0.5", lw=1, label="calibrated")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("predicted sd (bin mean)")
    ax.set_ylabel("observed RMSE")
    if title:
        ax.set_title(title)
    ax.legend(frameon=False, fontsize="small")
    fig.tight_layout()
    return fig


def run_calibration(run: Any, n_bins: int = 10) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Calibration of every method of a benchmark run that wrote ``layers["uncertainty"]``.

    Parameters
    ----------
    run
        A :class:`he2st.evaluate.results.RunResult` (``read_run(out)``).
    n_bins
        Bins of :func:`calibration_table`.

    Returns
    -------
    tables, summary
        ``{method: calibration table}`` over all test slides pooled, and one
        :func:`calibration_summary` row per method (index: method). Both empty
        when no method has uncertainty.
    """
    import anndata as ad

    tables: dict[str, pd.DataFrame] = {}
    rows = {}
    for method in run.methods:
        obs, pred, sd = [], [], []
        for path in run.prediction_files(method).values():
            a = ad.read_h5ad(path)
            if "uncertainty" not in a.layers or "observed" not in a.layers:
                continue
            obs.append(np.asarray(a.layers["observed"], dtype=np.float64).ravel())
            pred.append(np.asarray(a.X, dtype=np.float64).ravel())
            sd.append(np.asarray(a.layers["uncertainty"], dtype=np.float64).ravel())
        if not obs:
            continue
        o, p, s = np.concatenate(obs), np.concatenate(pred), np.concatenate(sd)
        tables[method] = calibration_table(o, p, s, n_bins=n_bins)
        rows[method] = calibration_summary(o, p, s, n_bins=n_bins)
    return tables, pd.DataFrame.from_dict(rows, orient="index")


def calibration_section(run: Any, n_bins: int = 10) -> str | None:
    """HTML of the report's calibration section (None when no method has uncertainty).

    Parameters
    ----------
    run
        A :class:`he2st.evaluate.results.RunResult`.
    n_bins
        Bins of :func:`calibration_table`.

    Returns
    -------
    str or None
        A paragraph, the reliability diagram and the summary table, or None.
    """
    import html

    from he2st.analysis.figures import figure_html, table_html

    tables, summary = run_calibration(run, n_bins=n_bins)
    if not tables:
        return None
    fig = plot_calibration(tables)
    text = (
        "Methods that state an uncertainty (a predictive standard deviation per spot and gene). "
        f"All (spot, gene) pairs of all test slides are sorted by the stated sd and cut into {n_bins} bins of equal "
        "size; each point is a bin's mean stated sd against its observed RMSE. On the dashed diagonal the stated "
        "sd is the error one gets. spearman: rank correlation of sd with |error|; ence: mean |RMSE - sd| / sd over "
        "bins; coverage95: share of observations inside prediction +- 1.96 sd (0.95 if calibrated and Gaussian)."
    )
    return "\n".join(
        [f"<p>{html.escape(text)}</p>", figure_html(fig, alt="calibration of predicted uncertainty"),
         table_html(summary.rename_axis("method").reset_index())]
    )


__all__ = [
    "TABLE_COLUMNS",
    "calibration_section",
    "calibration_summary",
    "calibration_table",
    "plot_calibration",
    "run_calibration",
]
