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
- ``kind="ivf"`` / ``kind="hnsw"``: faiss inverted-file or graph indexes. Their
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


def _finish(bank: Any, queries: np.ndarray, idx: np.ndarray, metric: str, chunk: int = 1024) -> Neighbors:
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
    """

    kind = "exact"
    backend = "torch"

    def __init__(self, embeddings: Any, metric: str, *, device: str = "cpu", query_chunk: int = 2048, bank_chunk: int = 32768) -> None:
        super().__init__(embeddings, metric)
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

    def _search_ids(self, queries: np.ndarray, k: int, exclude: np.ndarray | None) -> np.ndarray:
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
                    block = torch.from_numpy(np.array(self.embeddings[bs : bs + self.bank_chunk], dtype=np.float32)).to(dev)
                    score = self._scores(q, block, norms[bs : bs + len(block)])
                    if excl is not None:
                        score.masked_fill_(excl[bs : bs + len(block)][None, :], -math.inf)
                    kk = min(k, score.shape[1])
                    s_top, i_top = torch.topk(score, kk, dim=1)
                    cat_s = torch.cat([best_s, s_top], dim=1)
                    cat_i = torch.cat([best_i, i_top + bs], dim=1)
                    best_s, pos = torch.topk(cat_s, k, dim=1)
                    best_i = torch.gather(cat_i, 1, pos)
                best_i[~torch.isfinite(best_s)] = -1
                out[qs : qs + len(q)] = best_i.cpu().numpy()
        return out

    def _scores(self, q: Any, block: Any, block_sq_norms: Any) -> Any:
        """Higher is nearer; monotone in the metric's distance for a fixed query."""
        import torch

        if self.metric == "cosine":
            return q @ (block / block_sq_norms.sqrt().clamp_min(1e-12)[:, None]).T
        if self.metric == "l2":
            # -(|b|^2 - 2 q.b): |q|^2 is constant per query and drops out of the ranking.
            return 2.0 * (q @ block.T) - block_sq_norms[None, :]
        return -torch.cdist(q, block, p=1.0)


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


def _calibrate(index: FaissIndex, q: np.ndarray, truth: np.ndarray,
               target: float, candidates: list[int]) -> tuple[int, float, dict[int, float]]:
    """Smallest setting among ``candidates`` (then refined by bisection) reaching ``target`` recall."""
    tried: dict[int, float] = {}
    k = truth.shape[1]

    def recall_of(setting: int) -> float:
        if setting not in tried:
            tried[setting] = recall_at_k(index._search_ids(q, k, None, setting), truth)
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
        ``"exact"``, ``"ivf"`` (faiss IVF-Flat), ``"hnsw"`` (faiss HNSW-Flat) or
        ``"auto"`` (exact below :data:`AUTO_EXACT_MAX` rows, IVF above).
    backend
        For ``kind="exact"``: ``"torch"`` (chunked, memory-bounded, CUDA if
        ``device`` says so) or ``"faiss"`` (flat index).
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
        IVF cells; default ``4 * sqrt(n)`` (at most ``n / 39`` so that every
        cell gets enough training points).
    kmeans_iters, train_per_list
        k-means iterations and training points per cell of the IVF quantiser
        (a random sample of the bank, at least 10,000 points).
    hnsw_m, ef_construction
        HNSW graph degree and construction beam.
    seed
        Seeds k-means training and query sampling (same seed, same index).
    device
        Torch device for the exact torch backend.

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
            return TorchExactIndex(embeddings, metric, device=device)
        x = _prepare_for_faiss(embeddings, metric)
        return FaissIndex(embeddings, metric, _faiss_flat(x, metric), "exact")

    faiss = _faiss()
    fm = _faiss_metric(faiss, metric)
    rng = np.random.default_rng(seed)
    # Without user queries, calibrate on a held-out sample of bank rows: rows
    # are inserted in a random order, the last ``m`` only after calibration.
    perm, first, held = None, None, None
    if calibration_queries is None:
        m = min(int(n_calibration), max(n // 10, 1))
        perm = rng.permutation(n).astype(np.int64)
        first, held = perm[: n - m], perm[n - m :]
    if kind == "ivf":
        n_fit = n if first is None else len(first)
        if nlist is None:
            nlist = int(round(4 * math.sqrt(n)))
        nlist = int(max(1, min(nlist, n_fit // 39 if n_fit >= 39 else 1)))
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
        candidates = [1]
        while candidates[-1] < nlist:
            candidates.append(min(candidates[-1] * 2, nlist))
    else:
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), fm)
        index.hnsw.efConstruction = int(ef_construction)
        _add_in_chunks(index, embeddings, metric, first)
        out = FaissIndex(embeddings, metric, index, "hnsw", perm)
        candidates = [k]
        while candidates[-1] < max(n, k):
            candidates.append(candidates[-1] * 2)
            if candidates[-1] >= 8192:
                break
    q, truth = _calibration_set(embeddings, metric, k, calibration_queries, held, n_calibration, seed)
    setting, recall, tried = _calibrate(out, q, truth, target_recall, candidates)
    if held is not None:
        _add_in_chunks(index, embeddings, metric, held)
    if kind == "ivf":
        out.nprobe = setting
    else:
        out.ef_search = setting
    out.calibration = _Calibration(target_recall, k, recall, len(q), tried)
    return out
