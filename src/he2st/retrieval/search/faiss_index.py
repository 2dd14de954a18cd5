"""faiss flat, IVF-Flat and HNSW-Flat indexes behind the :class:`Index` interface.

Named ``faiss_index`` rather than ``faiss`` so that ``import faiss`` inside this
package can never resolve to it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from he2st.retrieval.search.result import Index, _faiss, _prepare_for_faiss


def _faiss_metric(faiss: Any, metric: str) -> int:
    return {"cosine": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2, "l1": faiss.METRIC_L1}[metric]


class FaissIndex(Index):
    """A faiss flat, IVF-Flat or HNSW-Flat index.

    Use :func:`build_index` to create one; it chooses the search parameters.
    ``to_bytes``/``from_bytes`` serialise the trained index so that a saved
    model or bank reloads without re-training.

    Parameters
    ----------
    embeddings
        ``(n, dim)`` bank (distances of the results are recomputed from it).
    metric
        ``"cosine"``, ``"l2"`` or ``"l1"``.
    faiss_index
        The trained, filled faiss index.
    kind
        ``"exact"``, ``"ivf"`` or ``"hnsw"``.
    id_map
        Bank row of each faiss id, when rows were inserted in another order.
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
        """Rebuild an index saved by :meth:`to_bytes`.

        Parameters
        ----------
        data
            The uint8 array :meth:`to_bytes` returned.
        embeddings, metric, kind, id_map
            As for :class:`FaissIndex`.
        setting
            The calibrated ``nprobe`` (IVF) or ``efSearch`` (HNSW); ignored for exact.

        Returns
        -------
        FaissIndex
            The index, ready to search.
        """
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


def _add_in_chunks(index: Any, x: Any, metric: str, rows: np.ndarray | None = None, cells: np.ndarray | None = None,
                   chunk: int = 131072) -> None:
    """Add bank rows (all, or ``rows`` in that order) to a faiss index, ``chunk`` rows at a time.

    Parameters
    ----------
    index
        A trained faiss index.
    x
        ``(n, dim)`` bank.
    metric
        The search metric (rows are L2-normalised for cosine).
    rows
        Bank rows to add, in insertion order (faiss ids are insertion order); default all.
    cells
        ``(n,)`` IVF cell of every bank row, computed beforehand (the index must be an IVF):
        rows are added to those lists instead of being assigned by the quantizer.
    chunk
        Rows per call.
    """
    n = len(x) if rows is None else len(rows)
    for s in range(0, n, chunk):
        sel = slice(s, s + chunk) if rows is None else np.asarray(rows[s : s + chunk])
        block = _prepare_for_faiss(np.asarray(x[sel]), metric)
        if cells is None:
            index.add(block)
        else:
            from faiss.contrib.ivf_tools import add_preassigned

            add_preassigned(index, block, np.ascontiguousarray(cells[sel], dtype=np.int64))
