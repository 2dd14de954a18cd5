"""Retrieval: nearest-neighbour search over reference banks, and the contrastive
retrieval methods' shared machinery.

- :func:`build_index` / :class:`Index`: exact (chunked torch or faiss flat) and
  approximate (faiss IVF over fine cells built for cross-modal queries, faiss HNSW;
  both calibrated to a requested recall) top-k search by cosine, L2 or L1.
- :func:`aggregate` / :func:`neighbor_weights`: mean, inverse-square distance
  (mclSTExp eq. 15-16) or softmax-of-similarity averaging of retrieved expression.
- :class:`ReferenceBank`: embeddings + expression + per-slide provenance; saved,
  loaded and memory-mapped.

Submodules are imported lazily so that ``import he2st.retrieval`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "METRICS": "search",
    "Index": "search",
    "Neighbors": "search",
    "TorchExactIndex": "search",
    "FaissIndex": "search",
    "build_index": "search",
    "recall_at_k": "search",
    "exact_distances": "search",
    "AGGREGATIONS": "aggregation",
    "aggregate": "aggregation",
    "neighbor_weights": "aggregation",
    "ReferenceBank": "bank",
    "BankSlide": "bank",
    "BankLeakageError": "bank",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"he2st.retrieval.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'he2st.retrieval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
