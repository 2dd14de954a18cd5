"""The public object: :class:`LazyImage`, opened by :func:`open_image`.

It picks a backend by format (:func:`~he2st.image.lazy.formats.detect_format`),
reopens it in forked workers and after unpickling, and turns reads into
``uint8 (h, w, 3)`` RGB regions padded with white outside the image.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from he2st.image.lazy.base import Backend
from he2st.image.lazy.formats import check_file, detect_format
from he2st.image.lazy.openslide_backend import OpenSlideBackend
from he2st.image.lazy.pil import PilBackend
from he2st.image.lazy.pixels import ImageConversionWarning, resize
from he2st.image.lazy.tiff import TiffBackend

#: Value used for pixels outside the image (white background, as on a glass slide).
PAD_VALUE = 255

#: Backend class of each format :func:`~he2st.image.lazy.formats.detect_format` names.
_BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "tiff": TiffBackend,
    "openslide": OpenSlideBackend,
    "pil": PilBackend,
}


class LazyImage:
    """An H&E image opened for region reads; pixels are decoded only when asked for.

    Use :func:`open_image` to create one. Coordinates are pixels of level 0
    (full resolution), ``x`` = column and ``y`` = row.

    Attributes
    ----------
    path
        The image file.
    width, height
        Size of level 0 in pixels.
    levels
        ``(width, height)`` of each pyramid level, level 0 first.
    downsamples
        Factor from each level to level 0.
    tile_size
        ``(tile_width, tile_height)`` of level 0 when the file is tiled, else None.
    conversions
        What was done to turn the pixels into 8-bit RGB (empty for plain RGB).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = check_file(path)
        self._format = detect_format(self.path)
        self._backend: Backend | None = None
        self._pid = -1
        self._open_backend()
        b = self._backend
        assert b is not None
        self.width, self.height = b.level_dims[0]
        self.levels: list[tuple[int, int]] = list(b.level_dims)
        if isinstance(b, OpenSlideBackend):
            self.downsamples = list(b.downsamples)
        else:
            self.downsamples = [self.width / w for w, _ in self.levels]
        self.tile_size = b.tile_size
        self.conversions: tuple[str, ...] = b.spec.notes
        if self.conversions:
            warnings.warn(
                f"image {str(self.path)!r} is not 8-bit RGB: " + "; ".join(self.conversions),
                ImageConversionWarning,
                stacklevel=3,
            )

    # -- lifecycle -----------------------------------------------------------------
    def _open_backend(self) -> None:
        self._backend = _BACKENDS[self._format](self.path)
        self._pid = os.getpid()

    @property
    def backend(self) -> Backend:
        """The open reader, reopened first in a new process or after unpickling."""
        # A forked worker (DataLoader) must not share the parent's file offset: reopen.
        if self._backend is None or self._pid != os.getpid():
            self._open_backend()
        return self._backend  # type: ignore[return-value]

    def close(self) -> None:
        """Release the file handle (a later read reopens it)."""
        if self._backend is not None and self._pid == os.getpid():
            self._backend.close()
        self._backend = None

    def __enter__(self) -> LazyImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: S110 - never raise from a finaliser (interpreter shutdown)
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_backend"] = None  # file handles do not pickle; reopened on first use
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"LazyImage({str(self.path)!r}, {self.width}x{self.height}, levels={len(self.levels)}, reader={self._format})"

    @property
    def reader(self) -> str:
        """``"tiff"``, ``"openslide"`` or ``"pil"``."""
        return self._format

    # -- reads ---------------------------------------------------------------------
    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """Read a rectangle as ``uint8 (h, w, 3)`` RGB.

        Parameters
        ----------
        x, y
            Top-left corner in **level-0** pixels (may be negative or beyond the image).
        w, h
            Size of the output in pixels of ``level``.
        level
            Pyramid level (0 = full resolution).

        Returns
        -------
        numpy.ndarray
            The region; pixels outside the image are white (255).
        """
        w, h = int(w), int(h)
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}x{h}")
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level {level} does not exist in {str(self.path)!r} ({len(self.levels)} levels)")
        ds = self.downsamples[level]
        lw, lh = self.levels[level]
        # Top-left in level pixels.
        lx, ly = int(math.floor(x / ds)), int(math.floor(y / ds))
        out = np.full((h, w, 3), PAD_VALUE, dtype=np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lw), min(ly + h, lh)
        if x1 > x0 and y1 > y0:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self.backend.read_rgb(level, x0, y0, x1, y1)
        return out

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole image downscaled so that its longer side is ``max_side`` pixels.

        Uses the smallest pyramid level that is still at least ``max_side``
        wide/high, reads it in bands (memory stays bounded for huge untiled
        images), averages ``f x f`` blocks and finishes with an antialiased
        resize. JPEGs are downscaled while decoding. Images smaller than
        ``max_side`` are returned at full size.

        Parameters
        ----------
        max_side
            Longer side of the result in pixels.

        Returns
        -------
        numpy.ndarray
            ``uint8 (h, w, 3)`` RGB with the image's aspect ratio.
        """
        max_side = int(max_side)
        if max_side <= 0:
            raise ValueError(f"max_side must be positive, got {max_side}")
        W, H = self.width, self.height
        target = max_side / max(W, H)
        if target >= 1.0:
            return self.read_region(0, 0, W, H)
        tw, th = max(1, round(W * target)), max(1, round(H * target))
        b = self.backend
        if isinstance(b, PilBackend):
            # JPEG: DCT-domain downscale (~20x faster than resizing the decoded image).
            arr = b.draft_thumbnail(max_side)
            if arr is None:
                arr = b.decoded()
            return resize(arr, tw, th)
        level = 0
        for i, (lw, lh) in enumerate(self.levels):
            if max(lw, lh) >= max_side:
                level = i
        lw, lh = self.levels[level]
        f = max(1, int(max(lw, lh) // max_side))
        ds = self.downsamples[level]
        band_rows = max(f, (64 * 2**20 // max(1, lw * 3 * 4)) // f * f)  # ~64 MB float32 per band
        rows = []
        for by in range(0, lh, band_rows):
            bh = min(band_rows, lh - by)
            bh_pad = math.ceil(bh / f) * f
            w_pad = math.ceil(lw / f) * f
            band = self.read_region(0, int(round(by * ds)), w_pad, bh_pad, level=level).astype(np.float32)
            band = band.reshape(bh_pad // f, f, w_pad // f, f, 3).mean(axis=(1, 3))
            rows.append(band)
        small = np.clip(np.rint(np.concatenate(rows, axis=0)), 0, 255).astype(np.uint8)
        return resize(small, tw, th)


def open_image(path: str | os.PathLike) -> LazyImage:
    """Open an H&E image for lazy region reads.

    Parameters
    ----------
    path
        TIFF / pyramidal TIFF (tifffile, tile-level reads), a vendor whole-slide
        file (.svs, .ndpi, .mrxs, ...; needs the ``openslide`` extra), or a
        JPEG/PNG (Pillow; decoded once per process and cached).

    Returns
    -------
    LazyImage
        Use as a context manager or call :meth:`LazyImage.close`.

    Raises
    ------
    ImageError
        Missing file, not an image, unsupported pixel layout, or OpenSlide
        needed but not installed.

    Warns
    -----
    ImageConversionWarning
        The image is grayscale, has alpha, or is 16-bit/float, and is converted
        to 8-bit RGB (the message says how).
    """
    return LazyImage(path)
