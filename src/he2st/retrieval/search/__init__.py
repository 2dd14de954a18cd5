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
- ``kind="ivf"``: a faiss IVF-Flat over fine cells (~64 rows each, two-level
  k-means), the size cross-modal queries need; ``kind="hnsw"``: a faiss graph index. Their
  search-time knob (``nprobe`` / ``efSearch``) is calibrated on a sample of
  queries against exact results, so that the index meets a requested
  ``recall@k`` (``target_recall``) with the cheapest setting that does.


Modules: :mod:`.result` (:class:`Neighbors`, the :class:`Index` base class, shared
helpers), :mod:`.exact` (:class:`TorchExactIndex`), :mod:`.ivf` (the IVF's two-level
k-means cells), :mod:`.faiss_index` (:class:`FaissIndex`), :mod:`.calibrate`
(recall calibration) and :mod:`.build` (:func:`build_index`). Nothing here imports
from above :mod:`he2st.retrieval` (no methods, no evaluation).
"""

from __future__ import annotations

from he2st.retrieval.search.build import AUTO_EXACT_MAX, MAX_EF_SEARCH, build_index
from he2st.retrieval.search.exact import TorchExactIndex
from he2st.retrieval.search.faiss_index import FaissIndex
from he2st.retrieval.search.ivf import IVF_CELL_ROWS
from he2st.retrieval.search.result import (
    BACKENDS,
    KINDS,
    METRICS,
    Index,
    Neighbors,
    check_metric,
    exact_distances,
    recall_at_k,
)

__all__ = [
    "AUTO_EXACT_MAX",
    "BACKENDS",
    "IVF_CELL_ROWS",
    "KINDS",
    "MAX_EF_SEARCH",
    "METRICS",
    "FaissIndex",
    "Index",
    "Neighbors",
    "TorchExactIndex",
    "build_index",
    "check_metric",
    "exact_distances",
    "recall_at_k",
]
