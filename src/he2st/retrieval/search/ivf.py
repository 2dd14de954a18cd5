"""The cells of the IVF index: two-level k-means of the bank and each row's cell.

:func:`build_index` (``kind="ivf"``) adds the rows to a faiss IVF-Flat pre-assigned to these
cells. Until issue 11 he2st also had its own IVF search (``TorchIVFIndex``: the query batch
scored cell by cell with matrix products); on the same cells at the same ``nprobe`` faiss'
search was faster on the 1M-row benchmark (``benchmarks/bench_retrieval.py``), so it was removed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from he2st.retrieval.search.result import _faiss, _prepare_for_faiss

#: Default rows per IVF cell (``nlist = n / IVF_CELL_ROWS``): far finer than faiss' ``4 sqrt(n)``
#: rule. For queries from the other modality a cell is ranked by its centroid, and only a centroid
#: close to each of its rows ranks the cell holding a query's best rows near the top.
IVF_CELL_ROWS = 64


#: Above this many cells, k-means runs in two levels (sqrt(n_cells) groups, then cells within each).
TWO_LEVEL_MIN_CELLS = 1024
#: Two-level assignment: a row's cell is the nearest among the cells of its nearest groups.
ASSIGN_GROUPS = 4


def _kmeans(x: np.ndarray, n: int, metric: str, seed: int, iters: int) -> np.ndarray:
    """Centroids of ``x`` (float32, prepared for ``metric``); spherical for cosine."""
    faiss = _faiss()
    n = max(1, min(int(n), len(x)))
    km = faiss.Kmeans(x.shape[1], n, niter=iters, seed=int(seed), spherical=metric == "cosine", verbose=False,
                      min_points_per_centroid=1)
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def _affinity(x: Any, cent: Any) -> Any:
    """``2 x.c - |c|^2``: higher is nearer in L2 (on unit rows and spherical centroids, also in cosine)."""
    return 2.0 * x @ cent.T - (cent * cent).sum(1)[None, :]


def _nearest(x: Any, cent: Any) -> Any:
    """Index of the nearest centroid of each row (see :func:`_affinity`)."""
    import torch

    return torch.argmax(_affinity(x, cent), dim=1)


def _kmeans_cells(embeddings: Any, metric: str, n_cells: int, seed: int, iters: int = 10,
                  train_per_cell: int = 40, train_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means of the bank: ``(centroids, cell_order, cell_offsets)`` (rows grouped by nearest centroid).

    Above :data:`TWO_LEVEL_MIN_CELLS` cells, two-level k-means: ``sqrt(n_cells)`` groups, then
    each group split into cells in proportion to its share of the sample, and each row assigned
    to the nearest cell among the cells of its :data:`ASSIGN_GROUPS` nearest groups. Flat k-means
    over 16k cells of a 1M bank costs minutes of distance computations per iteration; two levels
    cost seconds, and finer cells are what cross-modal queries need (see :data:`IVF_CELL_ROWS`).

    Why not faiss' ``contrib.clustering.two_level_clustering`` (measured on the benchmark bank of
    ``benchmarks/bench_retrieval.py``, issue 11): it gives a group holding fewer than
    ``sample / n_cells`` rows zero cells and then fails (``faiss.Kmeans`` with k = 0) -- at 200k
    rows for every seed from 0 to 9 -- where this one gives every non-empty group at least one
    cell; and at 1M rows, where it ran, its cells needed ``nprobe`` 10,050 of 15,625 to reach
    recall@50 0.95 on the cross-modal calibration queries, these ones 44 (same bank, seed and target).

    Parameters
    ----------
    embeddings
        ``(n, dim)`` bank.
    metric
        The search metric (rows are L2-normalised for cosine; k-means is spherical then).
    n_cells
        Number of cells (two-level k-means may return a few fewer: a group without sample rows gets none).
    seed
        Seeds the sample and the k-means runs.
    iters
        k-means iterations (each level).
    train_per_cell
        Sample rows per cell (at least 10,000 in all).
    train_rows
        Rows the sample is drawn from (default: all).

    Returns
    -------
    tuple
        ``(centroids (nlist, dim) float32, cell_order (n,) int64, cell_offsets (nlist + 1,) int64)``.
    """
    import torch

    n = int(embeddings.shape[0])
    rng = np.random.default_rng(seed)
    pool = np.arange(n) if train_rows is None else np.asarray(train_rows, dtype=np.int64)
    rows = np.sort(rng.choice(pool, size=min(len(pool), max(train_per_cell * n_cells, 10_000)), replace=False))
    sample = _prepare_for_faiss(np.asarray(embeddings[rows]), metric)
    if n_cells <= TWO_LEVEL_MIN_CELLS:
        groups = [torch.from_numpy(_kmeans(sample, n_cells, metric, seed, iters))]
        top = None
    else:
        top_c = _kmeans(sample, int(round(math.sqrt(n_cells))), metric, seed, iters)
        top = torch.from_numpy(top_c)
        g_of = _nearest(torch.from_numpy(sample), top).numpy()
        counts = np.bincount(g_of, minlength=len(top_c))
        # cells per group in proportion to its sample share (largest remainder, >= 1 where non-empty)
        share = counts * (n_cells / counts.sum())
        per = np.floor(share).astype(np.int64)
        per[np.argsort(per - share)[: n_cells - per.sum()]] += 1
        per = np.where(counts > 0, np.clip(per, 1, counts), 0)
        used = np.flatnonzero(per > 0)  # a top centroid that won no sample row gets no cells
        top = top[torch.from_numpy(used)]
        groups = [torch.from_numpy(_kmeans(sample[g_of == g], per[g], metric, seed + 1 + int(g), iters)) for g in used]
    first = np.cumsum([0] + [len(c) for c in groups])
    cent = torch.cat(groups)
    assign = np.empty(n, dtype=np.int64)
    for s in range(0, n, 65536):
        x = torch.from_numpy(_prepare_for_faiss(embeddings[s : s + 65536], metric))
        if top is None:
            assign[s : s + len(x)] = _nearest(x, cent).numpy()
            continue
        # the nearest cell among the cells of the row's ASSIGN_GROUPS nearest groups (a row near a
        # group border often belongs to a cell of the neighbouring group)
        gs = torch.topk(_affinity(x, top), min(ASSIGN_GROUPS, len(top)), dim=1).indices
        best = torch.full((len(x),), -math.inf)
        out = torch.zeros(len(x), dtype=torch.int64)
        for gi in torch.unique(gs).tolist():
            sel = torch.nonzero((gs == gi).any(1)).squeeze(1)
            v, j = torch.max(_affinity(x[sel], groups[gi]), dim=1)
            better = v > best[sel]
            best[sel[better]] = v[better]
            out[sel[better]] = j[better] + int(first[gi])
        assign[s : s + len(x)] = out.numpy()
    order = np.argsort(assign, kind="stable")
    offsets = np.zeros(len(cent) + 1, dtype=np.int64)
    np.cumsum(np.bincount(assign, minlength=len(cent)), out=offsets[1:])
    return cent.numpy(), order, offsets


def cell_ids(cell_order: np.ndarray, cell_offsets: np.ndarray) -> np.ndarray:
    """The cell of every bank row, from the rows grouped by cell (inverse of :func:`_kmeans_cells`' grouping).

    Parameters
    ----------
    cell_order
        Bank rows sorted by cell.
    cell_offsets
        ``(nlist + 1,)`` start of each cell in ``cell_order``.

    Returns
    -------
    np.ndarray
        ``(n,)`` int64 cell ids.
    """
    out = np.empty(len(cell_order), dtype=np.int64)
    out[cell_order] = np.repeat(np.arange(len(cell_offsets) - 1), np.diff(cell_offsets))
    return out
