"""Turning retrieved neighbours into a prediction.

Three schemes, as used by the retrieval methods:

- ``"mean"``: plain average of the k retrieved expression profiles
  (BLEEP's default, CMRCNet).
- ``"inverse_square"``: weights ``d_i^-2 / sum_j d_j^-2`` of the distances
  (mclSTExp eq. 15-16, after the inverse-distance weighting of TESLA). A
  neighbour at distance 0 takes all the weight (the limit of the formula).
- ``"softmax"``: weights ``softmax(s_i / temperature)`` of a similarity
  ``s``: ``cos`` for cosine, ``-d^2`` for L2 (BLEEP's ``weighted_average``
  option is exactly this with temperature 1), ``-d`` for L1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from he2st.errors import He2stInputError
from he2st.retrieval.search import Neighbors

AGGREGATIONS = ("mean", "inverse_square", "softmax")


def similarity_from_distance(distances: np.ndarray, metric: str) -> np.ndarray:
    """Similarity used by the softmax scheme (higher is nearer).

    Parameters
    ----------
    distances
        Distances in the metric's convention (``1 - cos`` for cosine).
    metric
        ``"cosine"``, ``"l2"`` or ``"l1"``.

    Returns
    -------
    numpy.ndarray
        ``cos`` for cosine, ``-d^2`` for L2, ``-d`` for L1 (float64 for L2 and L1).
    """
    if metric == "cosine":
        return 1.0 - distances
    if metric == "l2":
        return -(distances.astype(np.float64) ** 2)
    return -distances.astype(np.float64)


def neighbor_weights(neighbors: Neighbors, scheme: str = "mean", temperature: float = 1.0) -> np.ndarray:
    """Row-normalised ``(n_queries, k)`` float64 weights of the retrieved neighbours.

    Missing neighbours (index -1) get weight 0.

    Parameters
    ----------
    neighbors
        Output of a search.
    scheme
        ``"mean"``, ``"inverse_square"`` or ``"softmax"`` (see the module docstring).
    temperature
        Softmax temperature (positive; ``"softmax"`` only).

    Returns
    -------
    numpy.ndarray
        ``(n_queries, k)`` float64 weights; each row sums to 1.

    Raises
    ------
    he2st.errors.He2stInputError
        On an unknown scheme, a non-positive temperature, or a query without
        any neighbour.
    """
    if scheme not in AGGREGATIONS:
        raise He2stInputError(f"unknown aggregation {scheme!r}; use one of {AGGREGATIONS}")
    valid = neighbors.valid()
    d = np.where(valid, neighbors.distances, np.inf).astype(np.float64)
    if scheme == "mean":
        w = valid.astype(np.float64)
    elif scheme == "inverse_square":
        zero = valid & (d <= 0)
        with np.errstate(divide="ignore"):
            w = np.where(valid, 1.0 / np.maximum(d, 1e-300) ** 2, 0.0)
        # A neighbour at distance 0 gets all the weight (shared among ties).
        has_zero = zero.any(axis=1)
        w[has_zero] = zero[has_zero].astype(np.float64)
        # Overflow guard: very small distances can make 1/d^2 infinite.
        inf_rows = ~np.isfinite(w).all(axis=1)
        if inf_rows.any():
            w[inf_rows] = np.isinf(w[inf_rows]).astype(np.float64)
    else:
        if temperature <= 0:
            raise He2stInputError(f"softmax temperature must be positive, got {temperature}")
        s = np.where(valid, similarity_from_distance(d, neighbors.metric) / temperature, -np.inf)
        s = s - s.max(axis=1, keepdims=True)
        w = np.where(valid, np.exp(s), 0.0)
    total = w.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise He2stInputError("a query has no neighbour to aggregate")
    return w / total


def aggregate(values: Any, neighbors: Neighbors, scheme: str = "mean", temperature: float = 1.0, chunk: int = 512) -> np.ndarray:
    """Weighted average of the bank's ``values`` rows for every query.

    Parameters
    ----------
    values
        ``(n_bank, n_genes)`` expression of the bank rows (may be a memmap;
        only the retrieved rows are read).
    neighbors
        Output of :meth:`he2st.retrieval.Index.search`.
    scheme, temperature
        See the module docstring.
    chunk
        Queries per block: memory is ``chunk x k x n_genes`` floats.

    Returns
    -------
    np.ndarray
        ``(n_queries, n_genes)`` float32.
    """
    w = neighbor_weights(neighbors, scheme, temperature)
    idx = np.where(neighbors.valid(), neighbors.indices, 0)
    n_q, k = idx.shape
    out = np.empty((n_q, values.shape[1]), dtype=np.float32)
    for s in range(0, n_q, chunk):
        ids = idx[s : s + chunk]
        rows = np.asarray(values[ids.ravel()], dtype=np.float32).reshape(ids.shape + (values.shape[1],))
        out[s : s + chunk] = np.einsum("qk,qkg->qg", w[s : s + chunk].astype(np.float32), rows)
    return out
