"""Ready-made cohorts: the real her2st and Visium crop data, and a synthetic cohort for tests.

Builders are imported lazily, so ``import he2st.datasets`` stays cheap and each
builder module can be developed on its own::

    cohort = he2st.datasets.her2st()              # C2-C6, with H&E images
    crop = he2st.datasets.visium_mouse_brain_crop()
    toy = he2st.datasets.synthetic()
    any_ = he2st.datasets.load("path/to/folder")   # or "synthetic", "her2st"
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> module (relative to this package) that defines it. A module must
#: not share its name with a function it exports: importing ``he2st.datasets.X``
#: sets the package attribute ``X`` to the module, shadowing the function.
_EXPORTS = {
    "her2st": "_her2st",
    "her2st_panel": "_her2st",
    "visium_mouse_brain_crop": "_squidpy",
    "synthetic": "_synthetic",
    "load": "_load",
    "read_any": "_load",
    "summarize": "_load",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"he2st.datasets.{_EXPORTS[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'he2st.datasets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
