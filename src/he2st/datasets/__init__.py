"""Ready-made cohorts: the real her2st and Visium crop data, and a synthetic cohort for tests.

Builders are imported lazily, so ``import he2st.datasets`` stays cheap and each
builder module can be developed on its own::

    cohort = he2st.datasets.her2st()              # C2-C6, with H&E images
    crop = he2st.datasets.visium_mouse_brain_crop()
    toy = he2st.datasets.synthetic()
    any_ = he2st.datasets.load("path/to/folder")   # or "synthetic", "her2st"
"""

from __future__ import annotations

from he2st._utils import lazy_exports

#: Public name -> module (relative to this package) that defines it. A module must
#: not share its name with a function it exports: importing ``he2st.datasets.X``
#: sets the package attribute ``X`` to the module, shadowing the function.
_EXPORTS = {
    "her2st": "_her2st",
    "her2st_panel": "_her2st",
    "her2st_panel_path": "_her2st",
    "visium_mouse_brain_crop": "_squidpy",
    "synthetic": "_synthetic",
    "synthetic_truth": "_synthetic",
    "load": "_load",
    "read_any": "_load",
    "summarize": "_load",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
