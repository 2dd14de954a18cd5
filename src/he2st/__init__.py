"""he2st: predict spatial transcriptomics from H&E histology, and benchmark the methods that do it.

Submodules are imported lazily so that ``import he2st`` and ``he2st --help``
stay fast (torch, scanpy and friends load only when used)::

    import he2st
    cohort = he2st.datasets.synthetic()
    panel = he2st.pp.select_genes(cohort[:3], min_spots=10, n_top_hvg=30)
    pred = he2st.predict(model, slide)   # he2st.inference.predict: an AnnData scanpy/squidpy draw
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "analysis",
    "benchmark",
    "data",
    "datasets",
    "encoders",
    "evaluate",
    "image",
    "inference",
    "io",
    "methods",
    "pp",
    "retrieval",
    "errors",
)

#: Top-level functions, imported from their stage on first use.
_FUNCTIONS = {"predict": "he2st.inference.core"}

__all__ = [*_SUBMODULES, *_FUNCTIONS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _FUNCTIONS:
        value = getattr(importlib.import_module(_FUNCTIONS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"he2st.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'he2st' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
