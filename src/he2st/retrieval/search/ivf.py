"""he2st's inverted file: k-means cells scanned cell by cell for a whole batch of queries."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from he2st.errors import He2stInputError
from he2st.retrieval.search.calibrate import _bounded_nlist
from he2st.retrieval.search.exact import _rank_scores, _running_topk
from he2st.retrieval.search.result import Index, _faiss, _prepare_for_faiss

#: Default rows per cell of :class:`TorchIVFIndex` (``nlist = n / IVF_CELL_ROWS``).
IVF_CELL_ROWS = 64


class TorchIVFIndex(Index):
    """Inverted-file search that scores a whole batch of queries cell by cell.

    The bank is partitioned into ``nlist`` k-means cells and stored in cell
    order. A query probes its ``nprobe`` nearest cells (by centroid), as in
    faiss IVF-Flat; what differs is the loop order. faiss walks query by
    query and scores each probed list row by row. Here the loop runs over
    *cells*: every query that probes a cell is scored against it in one
    matrix product, so a test slide's thousands of spots share each read of
    a cell and the arithmetic runs at matrix-product speed.

    Two passes keep the merge cheap. Pass 1 scans each query's ``n_seed``
    nearest cells exactly (a running top-k), giving its k-th best score so
    far -- a lower bound of its final k-th score. Pass 2 scans the other
    probed cells and keeps only scores at or above that bound (typically a
    few dozen per query instead of ``k`` per probed cell); one sort per
    query merges them. The result is exactly the top-k of the probed cells.

    Cross-modal queries (image embeddings against a bank of expression
    embeddings) sit outside the bank's cone and need a large ``nprobe``;
    the batched scan is what makes that affordable (see
    ``benchmarks/bench_retrieval.py``).

    Parameters
    ----------
    embeddings, metric
        The bank ``(n, dim)`` and ``"cosine"``, ``"l2"`` or ``"l1"``.
    centroids
        ``(nlist, dim)`` cell centroids (unit rows for cosine).
    cell_order
        Bank rows sorted by cell (see :func:`build_torch_ivf_index`).
    cell_offsets
        ``(nlist + 1,)``: cell ``c`` holds ``cell_order[cell_offsets[c]:cell_offsets[c + 1]]``.
    nprobe
        Cells probed per query (calibrate it, see :func:`build_index`).
    n_seed
        Nearest cells scanned in the exact first pass.
    """

    kind = "ivf"
    backend = "torch"

    def __init__(self, embeddings: Any, metric: str, centroids: np.ndarray, cell_order: np.ndarray,
                 cell_offsets: np.ndarray, nprobe: int = 1, n_seed: int = 8) -> None:
        super().__init__(embeddings, metric)
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.cell_order = np.ascontiguousarray(cell_order, dtype=np.int64)
        self.cell_offsets = np.ascontiguousarray(cell_offsets, dtype=np.int64)
        if len(self.cell_offsets) != len(self.centroids) + 1 or self.cell_offsets[-1] != self.ntotal:
            raise He2stInputError(
                f"IVF cells do not match the bank: {len(self.centroids)} centroids, offsets ending at "
                f"{self.cell_offsets[-1] if len(self.cell_offsets) else None} for {self.ntotal} rows")
        self.nprobe, self.n_seed = int(nprobe), int(n_seed)
        self._packed: Any = None

    @property
    def nlist(self) -> int:
        return len(self.centroids)

    def search_params(self) -> dict[str, Any]:
        return {"nlist": self.nlist, "nprobe": self.nprobe, "n_seed": self.n_seed}

    def _pack(self) -> tuple[Any, Any]:
        """Bank rows in cell order (float32, unit rows for cosine) and their squared norms."""
        import torch

        if self._packed is None:
            x = np.empty((self.ntotal, self.dim), dtype=np.float32)
            for s in range(0, self.ntotal, 65536):
                x[s : s + 65536] = _prepare_for_faiss(self.embeddings[self.cell_order[s : s + 65536]], self.metric)
            self._packed = (torch.from_numpy(x), torch.from_numpy(np.einsum("ij,ij->i", x, x)))
        return self._packed

    def _probes(self, q: Any, nprobe: int) -> Any:
        import torch

        # for cosine the (spherical k-means) centroids are unit rows, like the packed bank
        cent = torch.from_numpy(self.centroids)
        return torch.topk(_rank_scores(q, cent, (cent * cent).sum(1), self.metric, unit_rows=True), nprobe,
                          dim=1).indices

    def _by_cell(self, probes: Any) -> tuple[Any, list[int]]:
        """(query ids sorted by probed cell, number of queries per cell)."""
        import torch

        flat = probes.reshape(-1)
        qid = torch.arange(probes.shape[0]).repeat_interleave(probes.shape[1])
        return qid[torch.argsort(flat, stable=True)], torch.bincount(flat, minlength=self.nlist).tolist()

    def _search_ids(self, queries: np.ndarray, k: int, exclude: np.ndarray | None, setting: int | None = None) -> np.ndarray:
        import torch

        packed, sq = self._pack()
        nprobe = max(1, min(int(setting if setting is not None else self.nprobe), self.nlist))
        n_seed = min(self.n_seed, nprobe)
        excl = None if exclude is None else torch.from_numpy(exclude[self.cell_order])
        off = self.cell_offsets
        order_t = torch.from_numpy(self.cell_order)
        with torch.no_grad():
            q = torch.from_numpy(queries)
            if self.metric == "cosine":
                q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
            probes = self._probes(q, nprobe)
            nq = len(q)

            def cells(pr: Any):  # yields (first packed row of a cell, the queries probing it, their scores)
                qid, counts = self._by_cell(pr)
                pos = 0
                for c, cnt in enumerate(counts):
                    qs, pos = qid[pos : pos + cnt], pos + cnt
                    lo, hi = int(off[c]), int(off[c + 1])
                    if cnt == 0 or hi == lo:
                        continue
                    score = _rank_scores(q[qs], packed[lo:hi], sq[lo:hi], self.metric, unit_rows=True)
                    if excl is not None:
                        score.masked_fill_(excl[lo:hi][None, :], -math.inf)
                    yield lo, qs, score

            # Pass 1: exact running top-k over each query's nearest n_seed cells.
            best_s = torch.full((nq, k), -math.inf)
            best_i = torch.full((nq, k), -1, dtype=torch.int64)
            for lo, qs, score in cells(probes[:, :n_seed]):
                v, i = torch.topk(score, min(k, score.shape[1]), dim=1)
                best_s[qs], best_i[qs] = _running_topk(best_s[qs], best_i[qs], v, order_t[lo + i])
            # Pass 2: the other probed cells keep only rows beating the bound found so far; once
            # the survivors fill a buffer, they are merged into the lists and the bound tightens.
            budget = max(4 * nq * k, 1 << 20)
            kept: list[tuple[Any, Any, Any]] = []
            n_kept = 0
            for lo, qs, score in cells(probes[:, n_seed:]):
                keep = score >= best_s[qs, -1][:, None]
                if excl is not None:  # while a list is short its bound is -inf: never keep excluded rows
                    keep &= score > -math.inf
                qi, ri = torch.nonzero(keep, as_tuple=True)
                if len(qi):
                    kept.append((qs[qi], order_t[lo + ri], score[qi, ri]))
                    n_kept += len(qi)
                if n_kept > budget:
                    best_s, best_i = _merge_topk(best_s, best_i, kept)
                    kept, n_kept = [], 0
            best_s, best_i = _merge_topk(best_s, best_i, kept)
        best_i[~torch.isfinite(best_s)] = -1
        out = best_i.numpy()
        # A query whose probed cells hold fewer than k eligible rows (small cells, or rows
        # excluded for the test patient) probes twice as many, until it has k or saw every cell.
        short = np.flatnonzero(out[:, -1] < 0)
        if len(short) and nprobe < self.nlist:
            out[short] = self._search_ids(queries[short], k, exclude, min(2 * nprobe, self.nlist))
        return out


def _merge_topk(best_s: Any, best_i: Any, kept: list[tuple[Any, Any, Any]]) -> tuple[Any, Any]:
    """Per-query top-k of the current lists ``(nq, k)`` plus extra ``(query, id, score)`` entries."""
    import torch

    if not kept:
        return best_s, best_i
    nq, k = best_s.shape
    q = torch.cat([torch.arange(nq).repeat_interleave(k)] + [e[0] for e in kept])
    ids = torch.cat([best_i.reshape(-1)] + [e[1] for e in kept])
    sc = torch.cat([best_s.reshape(-1)] + [e[2] for e in kept])
    # sort by score (descending), then stably by query: each query's entries, best first
    o = torch.argsort(sc, descending=True, stable=True)
    o = o[torch.argsort(q[o], stable=True)]
    q, ids, sc = q[o], ids[o], sc[o]
    rank = torch.arange(len(q)) - torch.searchsorted(q, torch.arange(nq))[q]
    keep = rank < k
    out_s = torch.full_like(best_s, -math.inf)
    out_i = torch.full_like(best_i, -1)
    out_s[q[keep], rank[keep]] = sc[keep]
    out_i[q[keep], rank[keep]] = ids[keep]
    return out_s, out_i


def build_torch_ivf_index(embeddings: Any, metric: str = "cosine", *, nlist: int | None = None,
                          kmeans_iters: int = 10, train_per_list: int = 40, n_seed: int = 8,
                          train_rows: np.ndarray | None = None, seed: int = 0) -> TorchIVFIndex:
    """k-means cells of the bank for a :class:`TorchIVFIndex` (``nprobe`` left at 1: calibrate it).

    ``nlist`` defaults to ``n / 64`` (cells of ~64 rows), far finer than faiss' ``4 sqrt(n)``
    rule: for queries from the other modality a cell is ranked by its centroid, and only a
    centroid close to each of its rows ranks the cell holding a query's best rows near the
    top (on the 1M-row benchmark bank, 15,625 cells reach recall@50 0.95 probing under 2 % of
    them; 4,000 cells need 11 %).

    Parameters
    ----------
    embeddings
        ``(n, dim)`` bank (any array indexable by rows, e.g. an ``np.memmap``).
    metric
        ``"cosine"``, ``"l2"`` or ``"l1"``.
    nlist
        Number of cells (default ``n / IVF_CELL_ROWS``, capped so that each gets 39 training rows).
    kmeans_iters, train_per_list
        k-means iterations and training rows per cell (see :func:`train_cells`).
    n_seed
        Cells per query scanned in the exact first pass (see :class:`TorchIVFIndex`).
    train_rows
        Limits the k-means sample to these rows (calibration rows stay out of it).
    seed
        Seeds the k-means sample and initialisation.

    Returns
    -------
    TorchIVFIndex
        The index, with ``nprobe = 1``.
    """
    n = int(embeddings.shape[0])
    nlist = _bounded_nlist(int(round(n / IVF_CELL_ROWS)) if nlist is None else nlist,
                           n if train_rows is None else len(train_rows))
    centroids, order, offsets = _kmeans_cells(embeddings, metric, nlist, seed, iters=kmeans_iters,
                                              train_per_cell=train_per_list, train_rows=train_rows)
    return TorchIVFIndex(embeddings, metric, centroids, order, offsets, n_seed=n_seed)


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
    cost seconds, and finer cells are what cross-modal queries need (see :class:`TorchIVFIndex`).

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
