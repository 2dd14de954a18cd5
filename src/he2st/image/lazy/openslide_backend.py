"""Vendor whole-slide backend (.svs, .ndpi, .mrxs, ...): OpenSlide, an optional extra.

Named ``openslide_backend`` rather than ``openslide`` so that it is never
mistaken for the ``openslide`` package it wraps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from he2st.errors import ImageError
from he2st.image.lazy.base import Backend
from he2st.image.lazy.formats import openslide_module
from he2st.image.lazy.pixels import make_spec


class OpenSlideBackend(Backend):
    """OpenSlide reader, using the slide's own pyramid levels and downsample factors.

    Parameters
    ----------
    path
        The whole-slide file.

    Attributes
    ----------
    downsamples
        OpenSlide's factor from each level to level 0 (not always a whole number).

    Raises
    ------
    ImageError
        OpenSlide is not installed, or cannot read the file.
    """

    def __init__(self, path: Path) -> None:
        openslide = openslide_module()
        try:
            self.slide = openslide.OpenSlide(str(path))
        except Exception as exc:
            raise ImageError(f"{str(path)!r} is not a readable whole-slide image: {exc}") from exc
        self.level_dims = [tuple(int(v) for v in d) for d in self.slide.level_dimensions]
        self.downsamples = [float(d) for d in self.slide.level_downsamples]
        tw = self.slide.properties.get("openslide.level[0].tile-width")
        th = self.slide.properties.get("openslide.level[0].tile-height")
        self.tile_size = (int(tw), int(th)) if tw and th else None
        # OpenSlide always hands back straight RGBA; that is its API, not the file's mode: no warning.
        self.spec = make_spec(4, np.uint8, alpha="straight", warn_alpha=False, path=path)

    def read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """RGBA pixels of a rectangle, through ``OpenSlide.read_region``.

        Parameters
        ----------
        level
            An OpenSlide level of the slide.
        x0, y0, x1, y1
            An in-bounds rectangle in pixels of that level (see :meth:`Backend.read`).

        Returns
        -------
        numpy.ndarray
            ``uint8 (h, w, 4)``, straight alpha.
        """
        # OpenSlide takes the top-left corner in level-0 pixels and the size in level pixels.
        ds = self.downsamples[level]
        region = self.slide.read_region((int(round(x0 * ds)), int(round(y0 * ds))), level, (x1 - x0, y1 - y0))
        return np.asarray(region)

    def close(self) -> None:
        """Close the slide."""
        self.slide.close()
