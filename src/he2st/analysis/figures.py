"""Figures of benchmark results (matplotlib, Agg backend), and their HTML embedding.

Used by :mod:`he2st.analysis.report`; each function returns a
:class:`matplotlib.figure.Figure` that the caller closes (or embeds with
:func:`figure_html`, which closes it).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_html(fig: Any, alt: str = "", dpi: int = 100) -> str:
    """The figure as an inline base64 PNG ``<img>`` tag; closes the figure.

    Parameters
    ----------
    fig
        A matplotlib figure.
    alt
        Alternative text of the image (escaped).
    dpi
        Resolution of the PNG.

    Returns
    -------
    str
        The ``<img>`` tag.
    """
    plt = _plt()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'


def per_slide_bars(metrics: pd.DataFrame, metric: str = "pcc", gene_set: str = "ACG", methods: Sequence[str] | None = None) -> Any:
    """Grouped bars: one group per test slide, one bar per method; NaN values are marked 'n/a'.

    Parameters
    ----------
    metrics
        Long table (``metrics.csv``) with ``method, test_slide, metric, gene_set, value``.
    metric
        Metric plotted (e.g. ``"pcc"``, ``"mse"``).
    gene_set
        Gene set plotted (e.g. ``"ACG"``, ``"HEG"``).
    methods
        Methods to show, in this order (default: all, in order of appearance).

    Returns
    -------
    matplotlib.figure.Figure
        The figure (not closed).
    """
    plt = _plt()
    sel = metrics[(metrics["metric"] == metric) & (metrics["gene_set"] == gene_set)]
    methods = list(methods) if methods is not None else list(dict.fromkeys(sel["method"]))
    slides = list(dict.fromkeys(sel["test_slide"]))
    wide = sel.pivot_table(index="test_slide", columns="method", values="value", aggfunc="mean", dropna=False)
    wide = wide.reindex(index=slides, columns=methods)
    n_m = max(len(methods), 1)
    width = 0.8 / n_m
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(slides) * max(1, n_m / 2) + 1.5), 3.2))
    x = np.arange(len(slides))
    for i, m in enumerate(methods):
        vals = wide[m].to_numpy(dtype=float)
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, np.nan_to_num(vals), width=width, label=m)
        for p, v in zip(pos, vals):
            if np.isnan(v):
                ax.text(p, 0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, slides, rotation=45 if len(slides) > 6 else 0, ha="right" if len(slides) > 6 else "center")
    ax.set_ylabel(f"{metric.upper()}({gene_set})")
    ax.set_title(f"{metric.upper()}({gene_set}) per test slide")
    ax.legend(fontsize=7, ncol=min(n_m, 4), frameon=False)
    fig.tight_layout()
    return fig


def _spot_axes(ax: Any, title: str) -> None:
    """A spot-layout panel: equal aspect, image rows growing downwards, no ticks, a small title."""
    ax.set_aspect("equal")
    ax.invert_yaxis()  # image rows grow downwards
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def spot_map_pair(
    spatial: np.ndarray,
    observed: np.ndarray,
    predicted: np.ndarray,
    title: str = "",
    spot_size: float | None = None,
) -> Any:
    """Observed and predicted expression of one gene on the spot layout, side by side.

    Each panel has its own colour scale (a prediction is judged by its pattern,
    as PCC does, not by its level).

    Parameters
    ----------
    spatial
        ``(n_spots, 2)`` pixel (x, y) of the spots.
    observed, predicted
        ``(n_spots,)`` expression of the gene.
    title
        Figure title (none when empty).
    spot_size
        Marker size (default: scaled down with the number of spots).

    Returns
    -------
    matplotlib.figure.Figure
        The figure (not closed).
    """
    plt = _plt()
    xy = np.asarray(spatial, dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.2))
    size = spot_size or max(4.0, 4000.0 / max(len(xy), 1))
    for ax, vals, name in ((axes[0], observed, "observed"), (axes[1], predicted, "predicted")):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=np.asarray(vals, dtype=float), s=size, cmap="viridis", linewidths=0)
        _spot_axes(ax, name)
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def table_html(df: pd.DataFrame, float_format: str = "{:.4g}", max_rows: int | None = 200) -> str:
    """An escaped HTML table; floats formatted, NaN shown as 'n/a'.

    Parameters
    ----------
    df
        The table.
    float_format
        Format of float columns.
    max_rows
        Rows kept (the first ones); None keeps all.

    Returns
    -------
    str
        The ``<table>`` HTML.
    """
    if max_rows is not None and len(df) > max_rows:
        df = df.head(max_rows)
    fmt = {c: (lambda v: "n/a" if pd.isna(v) else float_format.format(v)) for c in df.columns if pd.api.types.is_float_dtype(df[c])}
    return df.to_html(index=False, escape=True, formatters=fmt, na_rep="n/a", border=0, classes="tbl")


def correlation_heatmaps(matrices: dict[str, pd.DataFrame], title: str = "") -> Any:
    """Gene-gene correlation heatmaps side by side, one per entry, all on the colour scale [-1, 1].

    Parameters
    ----------
    matrices
        ``{panel name: square DataFrame}`` (e.g. ``observed`` then each method),
        all in the same gene order.
    title
        Figure title (none when empty).

    Returns
    -------
    matplotlib.figure.Figure
        The figure (not closed).
    """
    plt = _plt()
    n = max(len(matrices), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.8 * n + 0.8, 3.0), squeeze=False)
    im = None
    for ax, (name, m) in zip(axes[0], matrices.items()):
        im = ax.imshow(np.asarray(m, dtype=float), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), fraction=0.02, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def label_maps(spatial: np.ndarray, labelings: dict[str, Sequence[Any]], title: str = "", spot_size: float | None = None) -> Any:
    """Categorical spot maps side by side (region labels, clusters of observed and of predicted expression).

    Parameters
    ----------
    spatial
        ``(n_spots, 2)`` pixel (x, y) of the spots.
    labelings
        ``{panel name: one label per spot}``.
    title
        Figure title (none when empty).
    spot_size
        Marker size (default: scaled down with the number of spots).

    Returns
    -------
    matplotlib.figure.Figure
        The figure (not closed).
    """
    plt = _plt()
    xy = np.asarray(spatial, dtype=float)
    n = max(len(labelings), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8), squeeze=False)
    size = spot_size or max(4.0, 3000.0 / max(len(xy), 1))
    cmap = plt.get_cmap("tab20")
    for ax, (name, labels) in zip(axes[0], labelings.items()):
        codes, _ = pd.factorize(pd.Series([str(v) for v in labels]), sort=True)
        ax.scatter(xy[:, 0], xy[:, 1], c=[cmap(c % 20) for c in codes], s=size, linewidths=0)
        _spot_axes(ax, name)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
