"""The public builder: :func:`build_index` picks, builds and calibrates an index."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from he2st.errors import He2stInputError
from he2st.retrieval.search.calibrate import (
    _bounded_nlist,
    _calibrate,
    _calibration_set,
    _doubling,
    _held_out,
)
from he2st.retrieval.search.exact import TorchExactIndex
from he2st.retrieval.search.faiss_index import (
    FaissIndex,
    _add_in_chunks,
    _faiss_flat,
    _faiss_metric,
)
from he2st.retrieval.search.ivf import (
    TWO_LEVEL_MIN_CELLS,
    TorchIVFIndex,
    _kmeans_cells,
    build_torch_ivf_index,
    cell_ids,
)
from he2st.retrieval.search.result import (
    BACKENDS,
    KINDS,
    Index,
    _Calibration,
    _faiss,
    _prepare_for_faiss,
    check_metric,
)

#: Largest HNSW ``efSearch`` tried by calibration (beyond it, exact search is cheaper).
MAX_EF_SEARCH = 4096

#: Banks smaller than this are searched exactly when ``kind="auto"``.
AUTO_EXACT_MAX = 200_000


def build_index(
    embeddings: Any,
    metric: str = "cosine",
    kind: str = "exact",
    *,
    backend: str = "torch",
    k: int = 50,
    target_recall: float = 0.95,
    calibration_queries: Any = None,
    n_calibration: int = 500,
    nlist: int | None = None,
    kmeans_iters: int = 10,
    train_per_list: int = 40,
    hnsw_m: int = 32,
    ef_construction: int = 64,
    seed: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
) -> Index:
    """Build a nearest-neighbour index over ``embeddings``.

    Parameters
    ----------
    embeddings
        ``(n, dim)`` float32 bank (an ``np.memmap`` works for ``kind="exact"``
        with the torch backend; faiss indexes copy it into memory).
    metric
        ``"cosine"``, ``"l2"`` or ``"l1"``.
    kind
        ``"exact"``, ``"ivf"`` (:class:`TorchIVFIndex`, or faiss IVF-Flat with
        ``backend="faiss"``), ``"hnsw"`` (faiss HNSW-Flat) or ``"auto"`` (exact up to
        :data:`AUTO_EXACT_MAX` rows, IVF above).
    backend
        For ``kind="exact"``: ``"torch"`` (chunked, memory-bounded, CUDA if
        ``device`` says so) or ``"faiss"`` (flat index). For ``kind="ivf"``:
        ``"torch"`` (batched cell-by-cell scan) or ``"faiss"``.
    k, target_recall
        Approximate indexes are calibrated so that recall@``k`` against exact
        search reaches ``target_recall`` on the calibration queries.
    calibration_queries
        Queries typical of later use (e.g. training image embeddings). When
        None, ``n_calibration`` bank rows are sampled and each is held out of
        its own results.
    n_calibration
        Number of calibration queries.
    nlist
        IVF cells; default ``n / 64`` for the torch backend (see
        :func:`build_torch_ivf_index`), ``4 * sqrt(n)`` for faiss (at most
        ``n / 39`` so that every cell gets enough training points).
    kmeans_iters, train_per_list
        k-means iterations and training points per cell of the IVF quantiser
        (a random sample of the bank, at least 10,000 points).
    hnsw_m, ef_construction
        HNSW graph degree and construction beam.
    seed
        Seeds k-means training and query sampling (same seed, same index).
    device, precision
        Torch device and ``"fp32"`` / ``"bf16"`` scoring (see :class:`TorchExactIndex`)
        for the exact torch backend.

    Returns
    -------
    Index
        ``index.search(queries, k, exclude=None) -> Neighbors``;
        ``index.describe()`` reports the chosen parameters and calibrated recall.
    """
    check_metric(metric)
    if kind not in KINDS:
        raise He2stInputError(f"unknown index kind {kind!r}; use one of {KINDS}")
    if backend not in BACKENDS:
        raise He2stInputError(f"unknown search backend {backend!r}; use one of {BACKENDS}")
    if getattr(embeddings, "ndim", 0) != 2 or embeddings.shape[0] == 0:
        raise He2stInputError(f"a bank must be a non-empty (n, dim) array, got shape {getattr(embeddings, 'shape', None)}")
    if not 0 < target_recall <= 1:
        raise He2stInputError(f"target_recall must be in (0, 1], got {target_recall}")
    n, d = int(embeddings.shape[0]), int(embeddings.shape[1])
    if kind == "auto":
        kind = "exact" if n <= AUTO_EXACT_MAX else "ivf"
    if kind == "exact":
        if backend == "torch":
            return TorchExactIndex(embeddings, metric, device=device, precision=precision)
        x = _prepare_for_faiss(embeddings, metric)
        return FaissIndex(embeddings, metric, _faiss_flat(x, metric), "exact")

    if kind == "ivf" and backend == "torch":
        return _calibrated_torch_ivf(embeddings, metric, k=k, target_recall=target_recall,
                                     calibration_queries=calibration_queries, n_calibration=n_calibration,
                                     nlist=nlist, kmeans_iters=kmeans_iters, train_per_list=train_per_list,
                                     seed=seed)
    faiss = _faiss()
    fm = _faiss_metric(faiss, metric)
    rng = np.random.default_rng(seed)
    # Without user queries, calibrate on a held-out sample of bank rows: rows
    # are inserted in a random order, the last ``m`` only after calibration.
    perm, first, held = _held_out(rng, n, n_calibration) if calibration_queries is None else (None, None, None)
    cells = None  # IVF cell of every row, when computed here rather than by faiss' quantizer
    if kind == "ivf":
        nlist = _bounded_nlist(int(round(4 * math.sqrt(n))) if nlist is None else nlist,
                               n if first is None else len(first))
        # k-means never sees the held-out calibration rows: a point that shaped
        # the centroids lands in its neighbours' cell more often than a new one.
        pool = first if first is not None else np.arange(n)
        quantizer = faiss.IndexFlat(d, fm)
        if nlist > TWO_LEVEL_MIN_CELLS:
            # faiss' own train() is flat k-means (minutes per iteration at 10k+ cells of a 1M bank)
            # and its add() assigns every row exactly: the torch IVF's two-level cells instead, rows
            # added to them pre-assigned, so that both backends hold the same cells for one nlist and seed.
            centroids, order, offsets = _kmeans_cells(embeddings, metric, nlist, seed, iters=kmeans_iters,
                                                      train_per_cell=train_per_list, train_rows=np.sort(pool))
            nlist, cells = len(centroids), cell_ids(order, offsets)
            quantizer.add(centroids)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, fm)
            index.is_trained = True
            _add_in_chunks(index, embeddings, metric, first, cells)
        else:
            index = faiss.IndexIVFFlat(quantizer, d, nlist, fm)
            index.cp.seed = int(seed)
            index.cp.niter = int(kmeans_iters)
            n_train = min(len(pool), max(nlist * int(train_per_list), 10_000))
            train_rows = np.sort(rng.choice(pool, size=n_train, replace=False))
            index.train(_prepare_for_faiss(np.asarray(embeddings[train_rows]), metric))
            _add_in_chunks(index, embeddings, metric, first)
        out = FaissIndex(embeddings, metric, index, "ivf", perm)
        candidates = _doubling(1, nlist, nlist)
    else:
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), fm)
        index.hnsw.efConstruction = int(ef_construction)
        _add_in_chunks(index, embeddings, metric, first)
        out = FaissIndex(embeddings, metric, index, "hnsw", perm)
        candidates = _doubling(k, min(n, MAX_EF_SEARCH), MAX_EF_SEARCH)
    q, truth = _calibration_set(embeddings, metric, k, calibration_queries, held, n_calibration, seed)
    setting, recall, tried = _calibrate(out, q, truth, target_recall, candidates)
    if held is not None:
        _add_in_chunks(index, embeddings, metric, held, cells)
    if kind == "ivf":
        out.nprobe = setting
    else:
        out.ef_search = setting
    out.calibration = _Calibration(target_recall, k, recall, len(q), tried)
    if recall < target_recall:
        import warnings

        warnings.warn(
            f"{kind} index over {n} rows reaches recall@{k} = {recall:.3f} at its most thorough setting "
            f"({setting}), below the requested {target_recall}; exact search is the better choice here",
            stacklevel=2,
        )
    return out


def _calibrated_torch_ivf(embeddings: Any, metric: str, *, k: int, target_recall: float, calibration_queries: Any,
                          n_calibration: int, nlist: int | None, kmeans_iters: int, train_per_list: int,
                          seed: int) -> TorchIVFIndex:
    """A :class:`TorchIVFIndex` with ``nprobe`` calibrated to reach ``target_recall`` (see :func:`build_index`)."""
    n = int(embeddings.shape[0])
    held, train_rows = None, None
    if calibration_queries is None:
        # Held-out bank rows act as new spots: out of the k-means sample, excluded from their own results.
        _, first, held = _held_out(np.random.default_rng(seed), n, n_calibration)
        train_rows, held = np.sort(first), np.sort(held)
    index = build_torch_ivf_index(embeddings, metric, nlist=nlist, kmeans_iters=kmeans_iters,
                                  train_per_list=train_per_list, train_rows=train_rows, seed=seed)
    q, truth = _calibration_set(embeddings, metric, k, calibration_queries, held, n_calibration, seed)
    mask = None
    if held is not None:
        mask = np.zeros(n, dtype=bool)
        mask[held] = True
    index.nprobe, recall, tried = _calibrate(index, q, truth, target_recall, _doubling(1, index.nlist, index.nlist),
                                             exclude=mask)
    index.calibration = _Calibration(target_recall, k, recall, len(q), tried)
    if recall < target_recall:
        import warnings

        warnings.warn(f"ivf index over {n} rows reaches recall@{k} = {recall:.3f} at nprobe = nlist, below the "
                      f"requested {target_recall}", stacklevel=3)
    return index
