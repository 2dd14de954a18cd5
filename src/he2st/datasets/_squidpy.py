"""A 49-spot crop of the 10x Visium V1_Adult_Mouse_Brain sample, from squidpy's test data.

Its expression is log-normalised (no raw counts), so the slide has
``uns["he2st"]["counts"] = False`` and count-only steps refuse it. It suits smoke
tests of image, feature and training plumbing, not benchmarks.
"""

from __future__ import annotations

import os
from typing import Any

from he2st.datasets._paths import resolve_root


def visium_mouse_brain_crop(root: str | os.PathLike | None = None) -> Any:
    """Load the squidpy Visium mouse-brain crop as one slide.

    Parameters
    ----------
    root
        Folder holding ``test_data.h5ad`` and ``test_img.jpg``. Default:
        ``$HE2ST_SQUIDPY_ROOT``, else ``../shared/data/visium_mouse_brain_crop_squidpy``.

    Returns
    -------
    anndata.AnnData
        Slide ``"V1_Adult_Mouse_Brain"``: 49 spots x 1999 genes of log-normalised
        values (``counts=False``), coordinates in ``test_img.jpg`` (full resolution),
        spot diameter from ``spot_diameter_fullres`` (~89 px), pixel size 55 µm / diameter.
    """
    from he2st.io import read_h5ad

    base = resolve_root("visium_mouse_brain_crop_squidpy", root, "HE2ST_SQUIDPY_ROOT", "test_data.h5ad")
    return read_h5ad(base / "test_data.h5ad", image=base / "test_img.jpg", counts=False)
