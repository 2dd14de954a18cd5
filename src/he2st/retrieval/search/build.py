"""The public builder: :func:`build_index` picks, builds and calibrates an index."""

from __future__ import annotations

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
    IVF_CELL_ROWS,
    TWO_LEVEL_MIN_CELLS,
    _kmeans_cells,
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
        ``"exact"``, ``"ivf"`` (faiss IVF-Flat over fine two-level k-means cells),
        ``"hnsw"`` (faiss HNSW-Flat) or ``"auto"`` (exact up to :data:`AUTO_EXACT_MAX`
        rows, IVF above).
    backend
        For ``kind="exact"``: ``"torch"`` (chunked, memory-bounded, CUDA if
        ``device`` says so) or ``"faiss"`` (flat index). IVF and HNSW indexes are
        faiss indexes whatever it says (he2st's torch IVF was removed in issue 11:
        faiss searched the same cells faster).
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
        IVF cells; default ``n / 64`` (:data:`IVF_CELL_ROWS`; at most ``n / 39`` so
        that every cell gets enough training points). Above 1,024 cells they come
        from two-level k-means (:func:`he2st.retrieval.search.ivf._kmeans_cells`).
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

    faiss = _faiss()
    fm = _faiss_metric(faiss, metric)
    rng = np.random.default_rng(seed)
    # Without user queries, calibrate on a held-out sample of bank rows: rows
    # are inserted in a random order, the last ``m`` only after calibration.
    perm, first, held = _held_out(rng, n, n_calibration) if calibration_queries is None else (None, None, None)
    cells = None  # IVF cell of every row, when computed here rather than by faiss' quantizer
    if kind == "ivf":
        nlist = _bounded_nlist(int(round(n / IVF_CELL_ROWS)) if nlist is None else nlist,
                               n if first is None else len(first))
        # k-means never sees the held-out calibration rows: a point that shaped
        # the centroids lands in its neighbours' cell more often than a new one.
        pool = first if first is not None else np.arange(n)
        quantizer = faiss.IndexFlat(d, fm)
        if nlist > TWO_LEVEL_MIN_CELLS:
            # faiss' own train() is flat k-means (minutes per iteration at 10k+ cells of a 1M bank)
            # and its add() assigns every row exactly (minutes again): two-level k-means cells
            # instead, rows added to them pre-assigned (see :func:`_kmeans_cells`).
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

