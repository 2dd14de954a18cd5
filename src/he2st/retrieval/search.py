"""Nearest-neighbour search over a reference bank of embeddings.

Retrieval methods (BLEEP, mclSTExp, CMRCNet) predict a spot by looking up
the reference spots whose expression embeddings lie closest to its image
embedding. Their authors compute the full query x bank similarity matrix,
so inference cost grows with every reference spot (CMRCNet, Discussion).
This module offers the same exact answer at bounded memory, and an
approximate answer whose recall is *measured*, not assumed:

- ``kind="exact"``: brute force, either chunked torch matrix products
  (``backend="torch"``; the bank may be a memory-mapped array larger than
  RAM, it is streamed in chunks) or a faiss flat index (``backend="faiss"``).
- ``kind="ivf"``: an inverted file scanned cell by cell for a whole batch of
  queries with matrix products (:class:`TorchIVFIndex`; faiss IVF-Flat with
  ``backend="faiss"``); ``kind="hnsw"``: a faiss graph index. Their
  search-time knob (``nprobe`` / ``efSearch``) is calibrated on a sample of
  queries against exact results, so that the index meets a requested
  ``recall@k`` (``target_recall``) with the cheapest setting that does.

Distances are returned in ascending order in one convention for every
backend: cosine -> ``1 - cos``, ``"l2"`` -> Euclidean distance (not squared),
``"l1"`` -> Manhattan distance. They are recomputed exactly from the
retrieved rows, so that distance-weighted aggregation (mclSTExp eq. 15-16)
does not depend on the backend's internal approximations.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from he2st.errors import He2stInputError

METRICS = ("cosine", "l2", "l1")
KINDS = ("exact", "ivf", "hnsw", "auto")
BACKENDS = ("torch", "faiss")

#: Largest HNSW ``efSearch`` tried by calibration (beyond it, exact search is cheaper).
MAX_EF_SEARCH = 4096

#: Default rows per cell of :class:`TorchIVFIndex` (``nlist = n / IVF_CELL_ROWS``).
IVF_CELL_ROWS = 64

#: Banks smaller than this are searched exactly when ``kind="auto"``.
AUTO_EXACT_MAX = 200_000


@dataclass
class Neighbors:
    """Result of a k-nearest-neighbour search.

    Attributes
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
    """Distances between ``queries (m, d)`` and ``rows (m, k, d)`` in the module's convention."""
    q = queries[:, None, :].astype(np.float32)
    if metric == "l2":
        return np.sqrt(((rows - q) ** 2).sum(-1)).astype(np.float32)
    if metric == "l1":
        return np.abs(rows - q).sum(-1).astype(np.float32)
    qn = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    rn = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    return (1.0 - (qn * rn).sum(-1)).astype(np.float32)


def _rerank(bank: Any, queries: np.ndarray, cand: np.ndarray, k: int, metric: str, chunk: int = 256) -> np.ndarray:
    """The ``k`` candidates (-1 padded ids) with the smallest exact float32 distance, per query."""
    out = np.full((len(queries), k), -1, dtype=np.int64)
    for s in range(0, len(queries), chunk):
        part = cand[s : s + chunk]
        rows = np.asarray(bank[np.maximum(part, 0).ravel()], dtype=np.float32).reshape(part.shape + (bank.shape[1],))
        d = np.where(part >= 0, exact_distances(queries[s : s + chunk], rows, metric), np.inf)
        best = np.argsort(d, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(part, best, axis=1)
        ids[~np.isfinite(np.take_along_axis(d, best, axis=1))] = -1
        out[s : s + chunk, : ids.shape[1]] = ids
    return out


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
    """A searchable view of a bank of embeddings (see :func:`build_index`)."""

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


# -- exact, torch -----------------------------------------------------------


class TorchExactIndex(Index):
    """Exact search by chunked matrix products (CPU or CUDA).

    The bank is read in chunks of ``bank_chunk`` rows, so it may be a
    read-only ``np.memmap`` larger than memory; a running top-k is merged
    chunk by chunk. Memory is ``O(query_chunk x bank_chunk)``.

    ``precision="bf16"`` (cosine and L2) scores in bfloat16 -- several times
    faster on CPUs with native bf16 -- to pick ``max(4 k, 200)`` candidates,
    which are then ranked by their exact float32 distances (a bank held in
    memory is converted once and kept as a bfloat16 copy).
    """

    kind = "exact"
    backend = "torch"

    def __init__(self, embeddings: Any, metric: str, *, device: str = "cpu", query_chunk: int = 2048,
                 bank_chunk: int = 32768, precision: str = "fp32") -> None:
        super().__init__(embeddings, metric)
        if precision not in ("fp32", "bf16"):
            raise He2stInputError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if precision == "bf16" and metric == "l1":
            raise He2stInputError("bf16 scoring is a matrix product: it serves cosine and l2, not l1")
        self.precision = precision
        self._bf16: Any = None
        self.device = device
        self.query_chunk = int(query_chunk)
        self.bank_chunk = int(bank_chunk)
        self._sq_norms: np.ndarray | None = None

    def _row_sq_norms(self) -> np.ndarray:
        # Squared norms of every bank row, computed once chunk by chunk.
        if self._sq_norms is None:
            out = np.empty(self.ntotal, dtype=np.float32)
            for s in range(0, self.ntotal, self.bank_chunk):
                block = np.asarray(self.embeddings[s : s + self.bank_chunk], dtype=np.float32)
                out[s : s + len(block)] = np.einsum("ij,ij->i", block, block)
            self._sq_norms = out
        return self._sq_norms

    def search_params(self) -> dict[str, Any]:
        return {"precision": self.precision}

    def _block(self, start: int, dev: Any) -> Any:
        import torch

        if self.precision == "bf16" and not isinstance(self.embeddings, np.memmap):
            if self._bf16 is None:
                self._bf16 = torch.cat([
                    torch.from_numpy(np.asarray(self.embeddings[s : s + self.bank_chunk], dtype=np.float32)).to(torch.bfloat16)
                    for s in range(0, self.ntotal, self.bank_chunk)
                ])
            return self._bf16[start : start + self.bank_chunk].to(dev)
        block = torch.from_numpy(np.array(self.embeddings[start : start + self.bank_chunk], dtype=np.float32)).to(dev)
        return block.to(torch.bfloat16) if self.precision == "bf16" else block

    def _search_ids(self, queries: np.ndarray, k: int, exclude: np.ndarray | None) -> np.ndarray:
        if self.precision == "bf16":
            # bfloat16 picks the candidates, exact float32 distances rank them.
            kk = min(self.ntotal, max(4 * k, 200))
            cand = self._search_chunks(queries, kk, exclude)
            return _rerank(self.embeddings, queries, cand, k, self.metric)
        return self._search_chunks(queries, k, exclude)

    def _search_chunks(self, queries: np.ndarray, k: int, exclude: np.ndarray | None) -> np.ndarray:
        import torch

        dev = torch.device(self.device)
        norms = torch.from_numpy(self._row_sq_norms()).to(dev)
        out = np.empty((len(queries), k), dtype=np.int64)
        excl = torch.from_numpy(exclude).to(dev) if exclude is not None else None
        with torch.no_grad():
            for qs in range(0, len(queries), self.query_chunk):
                q = torch.from_numpy(queries[qs : qs + self.query_chunk]).to(dev)
                if self.metric == "cosine":
                    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
                best_s = torch.full((len(q), k), -math.inf, device=dev)
                best_i = torch.full((len(q), k), -1, dtype=torch.int64, device=dev)
                for bs in range(0, self.ntotal, self.bank_chunk):
                    block = self._block(bs, dev)
                    score = _rank_scores(q, block, norms[bs : bs + len(block)], self.metric)
                    if excl is not None:
                        score.masked_fill_(excl[bs : bs + len(block)][None, :], -math.inf)
                    kk = min(k, score.shape[1])
                    s_top, i_top = torch.topk(score, kk, dim=1)
                    best_s, best_i = _running_topk(best_s, best_i, s_top, i_top + bs)
                best_i[~torch.isfinite(best_s)] = -1
                out[qs : qs + len(q)] = best_i.cpu().numpy()
        return out


def _running_topk(best_s: Any, best_i: Any, new_s: Any, new_i: Any) -> tuple[Any, Any]:
    """Merge a block's candidates ``(n, m)`` into running top-k lists ``(n, k)`` (scores descending)."""
    import torch

    cat_s, cat_i = torch.cat([best_s, new_s], dim=1), torch.cat([best_i, new_i], dim=1)
    top_s, pos = torch.topk(cat_s, best_s.shape[1], dim=1)
    return top_s, torch.gather(cat_i, 1, pos)


def _rank_scores(q: Any, rows: Any, sq_norms: Any, metric: str, unit_rows: bool = False) -> Any:
    """``(n_q, n_rows)`` scores, higher is nearer; monotone in the metric's distance for a fixed query.

    ``q`` is unit-norm for cosine; ``unit_rows`` says the rows are too (no division needed).
    """
    import torch

    if rows.dtype == torch.bfloat16:
        q = q.to(torch.bfloat16)
    if metric == "cosine":
        dots = (q @ rows.T).float()
        return dots if unit_rows else dots / sq_norms.sqrt().clamp_min(1e-12)[None, :]
    if metric == "l2":
        # -(|b|^2 - 2 q.b): |q|^2 is constant per query and drops out of the ranking.
        return 2.0 * (q @ rows.T).float() - sq_norms[None, :]
    return -torch.cdist(q, rows, p=1.0)


# -- faiss ------------------------------------------------------------------


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise He2stInputError("faiss is not installed: pip install faiss-cpu") from exc
    return faiss


def _faiss_metric(faiss: Any, metric: str) -> int:
    return {"cosine": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2, "l1": faiss.METRIC_L1}[metric]


def _prepare_for_faiss(x: Any, metric: str, chunk: int = 65536) -> np.ndarray:
    """float32 contiguous copy; rows L2-normalised for cosine (inner product on unit vectors)."""
    if metric != "cosine":
        return np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    x = np.array(x, dtype=np.float32, order="C", copy=True)  # never normalise the caller's array
    for s in range(0, len(x), chunk):
        blk = x[s : s + chunk]
        blk /= np.maximum(np.linalg.norm(blk, axis=1, keepdims=True), 1e-12)
    return x


class FaissIndex(Index):
    """A faiss flat, IVF-Flat or HNSW-Flat index.

    Use :func:`build_index` to create one; it chooses the search parameters.
    ``to_bytes``/``from_bytes`` serialise the trained index so that a saved
    model or bank reloads without re-training.
    """

    backend = "faiss"

    def __init__(self, embeddings: Any, metric: str, faiss_index: Any, kind: str, id_map: np.ndarray | None = None) -> None:
        super().__init__(embeddings, metric)
        self.index = faiss_index
        self.kind = kind
        self.nprobe: int | None = None
        self.ef_search: int | None = None
        # faiss numbers rows in insertion order; ``id_map[i]`` is the bank row
        # of faiss id ``i`` when rows were inserted in another order.
        self.id_map = None if id_map is None else np.asarray(id_map, dtype=np.int64)
        self._inv_map: np.ndarray | None = None

    def _to_internal(self, rows: np.ndarray) -> np.ndarray:
        if self.id_map is None:
            return rows
        if self._inv_map is None:
            inv = np.full(len(self.id_map), -1, dtype=np.int64)
            inv[self.id_map] = np.arange(len(self.id_map))
            self._inv_map = inv
        return self._inv_map[rows]

    def search_params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.kind == "ivf":
            out = {"nlist": int(self.index.nlist), "nprobe": self.nprobe}
        elif self.kind == "hnsw":
            out = {"M": int(self.index.hnsw.nb_neighbors(1)), "efSearch": self.ef_search,
                   "efConstruction": int(self.index.hnsw.efConstruction)}
        return out

    def _params(self, exclude: np.ndarray | None, setting: int | None = None) -> Any:
        faiss = _faiss()
        sel = None
        if exclude is not None:
            ids = self._to_internal(np.flatnonzero(exclude).astype(np.int64))
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(ids))
        if self.kind == "ivf":
            p = faiss.SearchParametersIVF()
            p.nprobe = int(setting if setting is not None else self.nprobe)
        elif self.kind == "hnsw":
            p = faiss.SearchParametersHNSW()
            p.efSearch = int(setting if setting is not None else self.ef_search)
        else:
            p = faiss.SearchParameters()
        if sel is not None:
            p.sel = sel
            p._sel_ref = sel  # keep the selector alive as long as the parameters
        return p

    def _search_ids(self, queries: np.ndarray, k: int, exclude: np.ndarray | None, setting: int | None = None) -> np.ndarray:
        q = _prepare_for_faiss(queries, self.metric)
        params = self._params(exclude, setting)
        if self.kind == "hnsw":
            # HNSW needs efSearch >= k to return k results.
            params.efSearch = max(int(params.efSearch), k)
        _, ids = self.index.search(q, k, params=params)
        ids = ids.astype(np.int64)
        if self.id_map is not None:
            ids = np.where(ids >= 0, self.id_map[np.maximum(ids, 0)], -1)
        return ids

    def to_bytes(self) -> np.ndarray:
        """The trained faiss index as a uint8 array (for safetensors / .faiss files)."""
        return np.asarray(_faiss().serialize_index(self.index))

    @classmethod
    def from_bytes(cls, data: np.ndarray, embeddings: Any, metric: str, kind: str, setting: int | None,
                   id_map: np.ndarray | None = None) -> FaissIndex:
        idx = _faiss().deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
        out = cls(embeddings, metric, idx, kind, id_map)
        if kind == "ivf":
            out.nprobe = setting
        elif kind == "hnsw":
            out.ef_search = setting
        return out


def _faiss_flat(x: np.ndarray, metric: str) -> Any:
    faiss = _faiss()
    idx = faiss.IndexFlat(x.shape[1], _faiss_metric(faiss, metric))
    idx.add(x)
    return idx


def _add_in_chunks(index: Any, x: Any, metric: str, rows: np.ndarray | None = None, chunk: int = 131072) -> None:
    n = len(x) if rows is None else len(rows)
    for s in range(0, n, chunk):
        # Rows enter in the order of ``rows``: faiss ids are insertion order.
        block = x[s : s + chunk] if rows is None else np.asarray(x[rows[s : s + chunk]])
        index.add(_prepare_for_faiss(block, metric))


# -- calibration ------------------------------------------------------------


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true k nearest rows that were found (ignores -1 padding)."""
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


# -- inverted file, scanned cell by cell ----------------------------------------


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
    top (on the 1M-row benchmark bank, 15,625 cells reach recall@50 0.95 probing 1.8 % of
    them; 4,000 cells need 11 %). ``train_rows`` limits the k-means sample to those rows
    (calibration rows stay out of it).
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
    to the nearest cell among the cells of its :data:`ASSIGN_GROUPS` nearest groups. Flat k-means over 16k cells of a 1M bank costs minutes of
    distance computations per iteration; two levels cost seconds, and finer cells are
    what cross-modal queries need (see :class:`TorchIVFIndex`).
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


# -- public builder ---------------------------------------------------------


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
    if kind == "ivf":
        nlist = _bounded_nlist(int(round(4 * math.sqrt(n))) if nlist is None else nlist,
                               n if first is None else len(first))
        quantizer = faiss.IndexFlat(d, fm)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, fm)
        index.cp.seed = int(seed)
        index.cp.niter = int(kmeans_iters)
        # k-means never sees the held-out calibration rows: a point that shaped
        # the centroids lands in its neighbours' cell more often than a new one.
        pool = first if first is not None else np.arange(n)
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
        _add_in_chunks(index, embeddings, metric, held)
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
