"""The interface every image backend implements (TIFF, OpenSlide, Pillow)."""

from __future__ import annotations

import numpy as np

from he2st.image.lazy.pixels import PixelSpec, to_rgb8


class Backend:
    """Reads in-bounds rectangles of one pyramid level of one image file.

    Attributes
    ----------
    level_dims
        ``(width, height)`` of each level, level 0 first.
    tile_size
        ``(tile width, tile height)`` of level 0 when the file is tiled, else None.
    spec
        How the raw pixels turn into uint8 RGB.
    """

    level_dims: list[tuple[int, int]]
    tile_size: tuple[int, int] | None
    spec: PixelSpec

    def read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Raw pixels of ``[y0:y1, x0:x1]`` of ``level``, ``(h, w, c)``.

        Parameters
        ----------
        level
            Pyramid level (0 = full resolution).
        x0, y0, x1, y1
            The rectangle in pixels of ``level``; the caller clips it to the level's bounds.

        Returns
        -------
        numpy.ndarray
            The pixels in the file's own layout (see :attr:`spec`).
        """
        raise NotImplementedError

    def read_rgb(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """:meth:`read` converted to ``uint8 (h, w, 3)`` RGB (same parameters).

        Parameters
        ----------
        level
            Pyramid level (0 = full resolution).
        x0, y0, x1, y1
            The rectangle in pixels of ``level``, within its bounds.

        Returns
        -------
        numpy.ndarray
            ``uint8 (y1 - y0, x1 - x0, 3)``.
        """
        return to_rgb8(self.read(level, x0, y0, x1, y1), self.spec)

    def close(self) -> None:  # pragma: no cover - trivial
        """Release the file (a no-op for backends that hold none)."""
