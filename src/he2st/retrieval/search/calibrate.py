"""Recall calibration: the cheapest search setting that meets a requested recall@k.

Approximate indexes (faiss IVF / HNSW) are tuned on
calibration queries against exact results; without user queries, held-out
bank rows play new spots.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from he2st.retrieval.search.exact import TorchExactIndex
from he2st.retrieval.search.result import _as_queries, recall_at_k


def _calibration_set(
    embeddings: Any, metric: str, k: int, queries: Any, held_out: np.ndarray | None, n_queries: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Calibration queries and their exact top-k.

    With ``held_out`` bank rows (not yet in the approximate index), those rows
    are the queries and the exact truth is computed without them, so each
    query behaves like a new spot whose own row is not in the bank.
    """
    n = int(embeddings.shape[0])
    mask = None
    if held_out is not None:
        q = np.asarray(embeddings[np.sort(held_out)], dtype=np.float32)
        mask = np.zeros(n, dtype=bool)
        mask[held_out] = True
    else:
        rng = np.random.default_rng(seed)
        q = _as_queries(queries, int(embeddings.shape[1]))
        if len(q) > n_queries:
            q = q[np.sort(rng.choice(len(q), size=n_queries, replace=False))]
    eligible = n - (len(held_out) if held_out is not None else 0)
    truth = TorchExactIndex(embeddings, metric)._search_ids(q, min(k, eligible), mask)
    return q, truth


def _held_out(rng: np.random.Generator, n: int, n_calibration: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random order of the bank rows, split into ``(order, rows indexed first, held-out rows)``.

    The held-out rows (``min(n_calibration, n / 10)``, at least 1) serve as calibration
    queries that the index was not built from.
    """
    m = min(int(n_calibration), max(n // 10, 1))
    perm = rng.permutation(n).astype(np.int64)
    return perm, perm[: n - m], perm[n - m :]


def _bounded_nlist(nlist: int, n_fit: int) -> int:
    """``nlist`` capped at ``n_fit / 39`` so that every cell gets enough k-means training points."""
    return int(max(1, min(nlist, n_fit // 39 if n_fit >= 39 else 1)))


def _doubling(start: int, stop: int, cap: int) -> list[int]:
    """Calibration ladder ``start, 2 start, 4 start, ...`` (each at most ``cap``) until one reaches ``stop``."""
    out = [start]
    while out[-1] < stop:
        out.append(min(out[-1] * 2, cap))
    return out


def _calibrate(index: Any, q: np.ndarray, truth: np.ndarray, target: float, candidates: list[int],
               exclude: np.ndarray | None = None) -> tuple[int, float, dict[int, float]]:
    """Smallest setting among ``candidates`` (then refined by bisection) reaching ``target`` recall."""
    tried: dict[int, float] = {}
    k = truth.shape[1]

    def recall_of(setting: int) -> float:
        if setting not in tried:
            tried[setting] = recall_at_k(index._search_ids(q, k, exclude, setting), truth)
        return tried[setting]

    chosen, prev = candidates[-1], None
    for c in candidates:
        if recall_of(c) >= target:
            chosen = c
            break
        prev = c
    # Bisection between the last failing and the first passing candidate.
    if prev is not None and recall_of(chosen) >= target:
        lo, hi = prev, chosen
        while hi - lo > max(1, lo // 8):
            mid = (lo + hi) // 2
            if recall_of(mid) >= target:
                hi = mid
            else:
                lo = mid
        chosen = hi
    return chosen, recall_of(chosen), tried
