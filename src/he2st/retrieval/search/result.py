"""The search result, the index base class and the helpers every index shares.

Distances are returned in ascending order in one convention for every
backend: cosine -> ``1 - cos``, ``"l2"`` -> Euclidean distance (not squared),
``"l1"`` -> Manhattan distance. They are recomputed exactly from the
retrieved rows (:func:`_finish`), so that distance-weighted aggregation
(mclSTExp eq. 15-16) does not depend on the backend's internal approximations.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from he2st.errors import He2stInputError

METRICS = ("cosine", "l2", "l1")
KINDS = ("exact", "ivf", "hnsw", "auto")
BACKENDS = ("torch", "faiss")


@dataclass
class Neighbors:
    """Result of a k-nearest-neighbour search.

    Parameters
    ----------
    indices
        ``(n_queries, k)`` int64 bank rows, nearest first; ``-1`` where fewer
        than ``k`` rows were eligible.
    distances
        ``(n_queries, k)`` float32 distances in the metric's convention
        (see module docstring); ``inf`` where ``indices`` is ``-1``.
    metric
        The metric the search used.
    """

    indices: np.ndarray
    distances: np.ndarray
    metric: str

    @property
    def k(self) -> int:
        """Neighbours per query."""
        return int(self.indices.shape[1])

    def valid(self) -> np.ndarray:
        """Boolean ``(n_queries, k)`` mask of real neighbours."""
        return self.indices >= 0


@dataclass
class _Calibration:
    target_recall: float | None = None
    k: int | None = None
    recall: float | None = None
    n_queries: int = 0
    tried: dict[int, float] = field(default_factory=dict)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise He2stInputError(f"unknown retrieval metric {metric!r}; use one of {METRICS}")
    return metric


def _as_queries(queries: Any, dim: int) -> np.ndarray:
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise He2stInputError(f"queries must be (n, {dim}) embeddings, got shape {q.shape}")
    if not np.isfinite(q).all():
        raise He2stInputError("queries contain NaN or inf")
    return q


def _exclusion_mask(exclude: Any, n: int) -> np.ndarray | None:
    """Normalise ``exclude`` (row ids or a boolean mask) to a boolean mask or None."""
    if exclude is None:
        return None
    ex = np.asarray(exclude)
    if ex.dtype == bool:
        if ex.shape != (n,):
            raise He2stInputError(f"exclude mask has shape {ex.shape}, expected ({n},)")
        return ex if ex.any() else None
    if ex.size == 0:
        return None
    mask = np.zeros(n, dtype=bool)
    mask[ex.astype(np.int64)] = True
    return mask


def exact_distances(queries: np.ndarray, rows: np.ndarray, metric: str) -> np.ndarray:
    """Distances between each query and its rows, in the package's convention (see module docstring).

    Parameters
    ----------
    queries
        ``(m, d)`` queries.
    rows
        ``(m, k, d)``: ``k`` rows per query.
    metric
        ``"cosine"``, ``"l2"`` or ``"l1"``.

    Returns
    -------
    np.ndarray
        ``(m, k)`` float32 distances.
    """
    q = queries[:, None, :].astype(np.float32)
    if metric == "l2":
        return np.sqrt(((rows - q) ** 2).sum(-1)).astype(np.float32)
    if metric == "l1":
        return np.abs(rows - q).sum(-1).astype(np.float32)
    qn = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    rn = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    return (1.0 - (qn * rn).sum(-1)).astype(np.float32)


def _finish(bank: Any, queries: np.ndarray, idx: np.ndarray, metric: str, chunk: int = 256) -> Neighbors:
    """Recompute distances exactly for the retrieved rows and sort ascending."""
    n_q, k = idx.shape
    dist = np.full((n_q, k), np.inf, dtype=np.float32)
    for s in range(0, n_q, chunk):
        part = idx[s : s + chunk]
        ok = part >= 0
        safe = np.where(ok, part, 0)
        rows = np.asarray(bank[safe.ravel()], dtype=np.float32).reshape(part.shape + (bank.shape[1],))
        d = exact_distances(queries[s : s + chunk], rows, metric)
        dist[s : s + chunk] = np.where(ok, d, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    return Neighbors(indices=idx.astype(np.int64), distances=dist, metric=metric)


class Index(abc.ABC):
    """A searchable view of a bank of embeddings (see :func:`build_index`).

    Parameters
    ----------
    embeddings
        ``(n, dim)`` bank.
    metric
        ``"cosine"``, ``"l2"`` or ``"l1"``.
    """

    kind: str = ""
    backend: str = ""

    def __init__(self, embeddings: Any, metric: str) -> None:
        self.metric = check_metric(metric)
        self.embeddings = embeddings
        self.ntotal = int(embeddings.shape[0])
        self.dim = int(embeddings.shape[1])
        self.calibration = _Calibration()

    @abc.abstractmethod
    def _search_ids(self, queries: np.ndarray, k: int, exclude: np.ndarray | None) -> np.ndarray:
        """Row ids ``(n_queries, k)`` of the (approximate) nearest rows, -1 padded."""

    def search(self, queries: Any, k: int, exclude: Any = None) -> Neighbors:
        """The ``k`` nearest bank rows of each query.

        Parameters
        ----------
        queries
            ``(n, dim)`` float embeddings.
        k
            Number of neighbours; capped at the number of eligible rows
            (missing neighbours are ``-1`` / ``inf``).
        exclude
            Bank rows that must not be returned: row ids or a boolean mask of
            length ``ntotal`` (used to keep a test patient out of the bank).

        Returns
        -------
        Neighbors
            Nearest first, distances recomputed exactly.
        """
        q = _as_queries(queries, self.dim)
        if k < 1:
            raise He2stInputError(f"k must be >= 1, got {k}")
        mask = _exclusion_mask(exclude, self.ntotal)
        eligible = self.ntotal - (int(mask.sum()) if mask is not None else 0)
        if eligible <= 0:
            raise He2stInputError("every bank row is excluded: nothing to retrieve from")
        k_eff = min(int(k), eligible)
        if len(q) == 0:
            return Neighbors(np.empty((0, k), np.int64), np.empty((0, k), np.float32), self.metric)
        ids = self._search_ids(q, k_eff, mask)
        out = _finish(self.embeddings, q, ids, self.metric)
        if k_eff < k:
            pad = k - k_eff
            out = Neighbors(
                np.pad(out.indices, ((0, 0), (0, pad)), constant_values=-1),
                np.pad(out.distances, ((0, 0), (0, pad)), constant_values=np.inf),
                self.metric,
            )
        return out

    def describe(self) -> dict[str, Any]:
        """JSON summary: kind, backend, metric, size and search parameters."""
        return {
            "kind": self.kind,
            "backend": self.backend,
            "metric": self.metric,
            "ntotal": self.ntotal,
            "dim": self.dim,
            "params": self.search_params(),
            "calibration": {
                "target_recall": self.calibration.target_recall,
                "k": self.calibration.k,
                "recall": self.calibration.recall,
                "n_queries": self.calibration.n_queries,
                "tried": {str(a): b for a, b in self.calibration.tried.items()},
            },
        }

    def search_params(self) -> dict[str, Any]:
        return {}


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true k nearest rows that were found (ignores -1 padding).

    Parameters
    ----------
    found
        ``(n_queries, k')`` row ids returned by an index.
    truth
        ``(n_queries, k)`` exact row ids.

    Returns
    -------
    float
        Hits over true neighbours, pooled over queries (NaN without any).
    """
    found = np.asarray(found)
    truth = np.asarray(truth)
    if found.shape[0] != truth.shape[0]:
        raise He2stInputError("found and truth must have the same number of queries")
    hits, total = 0, 0
    for f, t in zip(found, truth):
        t = t[t >= 0]
        total += len(t)
        hits += len(np.intersect1d(f[f >= 0], t, assume_unique=False))
    return hits / total if total else float("nan")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise He2stInputError("faiss is not installed: pip install faiss-cpu") from exc
    return faiss


def _prepare_for_faiss(x: Any, metric: str, chunk: int = 65536) -> np.ndarray:
    """float32 contiguous copy; rows L2-normalised for cosine (inner product on unit vectors)."""
    if metric != "cosine":
        return np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    x = np.array(x, dtype=np.float32, order="C", copy=True)  # never normalise the caller's array
    for s in range(0, len(x), chunk):
        blk = x[s : s + chunk]
        blk /= np.maximum(np.linalg.norm(blk, axis=1, keepdims=True), 1e-12)
    return x
