"""Per-gene statistics shared by the methods (inner cross-validation) and the evaluation.

Kept below both in the layer order, so a method can score its inner folds with
exactly the metric the protocol reports.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from he2st.errors import He2stInputError


def pearson_per_gene(observed: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r and two-sided p-value of each column, over rows (spots).

    Follows :func:`scipy.stats.pearsonr` (vectorised): ``r`` is clipped to
    [-1, 1]; the p-value is the exact one under bivariate normality,
    ``I_{1 - r^2}((n - 2) / 2, 1 / 2)``; with two spots ``r`` is +-1 and ``p``
    is 1. A column that is constant in either input gives NaN r and p.

    Parameters
    ----------
    observed, predicted
        ``(n_spots, n_genes)`` arrays of the same shape.

    Returns
    -------
    r, p
        ``(n_genes,)`` float64 arrays.
    """
    x, y = check_pair(observed, predicted)
    n = x.shape[0]
    if n < 2:
        raise He2stInputError(f"Pearson correlation needs at least 2 spots, got {n}")
    # Constant columns have no defined correlation (scipy returns NaN too).
    const = (x.max(axis=0) == x.min(axis=0)) | (y.max(axis=0) == y.min(axis=0))
    xm = x - x.mean(axis=0)
    ym = y - y.mean(axis=0)
    # Scale each column by its max |value| first, as scipy does, so that the
    # products below neither overflow nor underflow.
    xm = xm / np.where(const, 1.0, np.abs(xm).max(axis=0))
    ym = ym / np.where(const, 1.0, np.abs(ym).max(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xm * ym).sum(axis=0) / np.sqrt((xm * xm).sum(axis=0) * (ym * ym).sum(axis=0))
    r = np.clip(r, -1.0, 1.0)
    r[const] = np.nan
    return r, _pearson_pvalue(r, n)


def _pearson_pvalue(r: np.ndarray, n: int) -> np.ndarray:
    from scipy.special import betainc

    if n == 2:
        # Two points always lie on a line: r is +-1 and carries no evidence.
        return np.where(np.isnan(r), np.nan, 1.0)
    a = n / 2.0 - 1.0
    with np.errstate(invalid="ignore"):
        p = betainc(a, 0.5, np.clip(1.0 - r * r, 0.0, 1.0))
    return np.where(np.isnan(r), np.nan, p)


def check_pair(observed: Any, predicted: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as dense float64 ``(n_spots, n_genes)`` arrays of one shape.

    Parameters
    ----------
    observed, predicted
        Arrays or sparse matrices.

    Returns
    -------
    x, y
        Dense float64 copies.

    Raises
    ------
    He2stInputError
        Not 2-d, different shapes, or NaN/inf values.
    """
    x = dense_matrix(observed, "observed")
    y = dense_matrix(predicted, "predicted")
    if x.shape != y.shape:
        raise He2stInputError(f"observed has shape {x.shape} but predicted has shape {y.shape}")
    return x, y


def dense_matrix(a: Any, what: str) -> np.ndarray:
    """A finite 2-d float64 array from an array or sparse matrix.

    Parameters
    ----------
    a
        The values.
    what
        Its name in error messages.

    Returns
    -------
    numpy.ndarray
        Dense float64 ``(n_spots, n_genes)``.
    """
    if hasattr(a, "toarray"):
        a = a.toarray()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise He2stInputError(f"{what} must be a 2-d (spots x genes) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = np.unique(np.nonzero(~np.isfinite(arr))[1])
        raise He2stInputError(f"{what} holds NaN or inf values (columns {bad[:5].tolist()})")
    return arr
