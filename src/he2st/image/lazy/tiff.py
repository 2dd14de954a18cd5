"""TIFF and pyramidal TIFF backend: tifffile, decoding only the segments a region needs.

tifffile decodes only the tiles (or strips) that overlap the region, straight
from the file's segment offsets, with a small per-image LRU of decoded tiles so
neighbouring spots do not decode the same tile twice. (Reading the segments
directly needs no zarr store, unlike tifffile's ``aszarr``, and keeps he2st out
of the zarr 2/3 question.) Uncompressed, contiguous, untiled pages
are memory-mapped.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from he2st.errors import ImageError
from he2st.image.lazy.base import Backend
from he2st.image.lazy.cache import ByteLRU, tile_cache_bytes
from he2st.image.lazy.formats import tiff_width_height
from he2st.image.lazy.pixels import PixelSpec, make_spec


class TiffLevel:
    """Segment-level random access to one TIFF page (one pyramid level).

    Parameters
    ----------
    tf
        The open :class:`tifffile.TiffFile`.
    page
        The page holding this level (its keyframe).
    path
        The file, named in error messages and memory-mapped when uncompressed.
    tile_cache
        LRU of decoded segments shared by the levels of the file, keyed by
        ``(level, plane, row, column)``.
    level
        Index of this level in the pyramid.

    Raises
    ------
    ImageError
        A volumetric page, or a segment count that does not match the page size.
    """

    def __init__(self, tf: Any, page: Any, path: Path, tile_cache: ByteLRU, level: int) -> None:
        self.tf = tf
        self.page = page
        self.path = path
        self.level = level
        self.cache = tile_cache
        self.height = int(page.imagelength)
        self.width = int(page.imagewidth)
        self.samples = int(page.samplesperpixel)
        if int(getattr(page, "imagedepth", 1) or 1) > 1:
            raise ImageError(f"{str(path)!r}: volumetric TIFF (image depth > 1) is not an H&E slide")
        self.planar = int(page.planarconfig) == 2 and self.samples > 1
        if page.is_tiled:
            self.ch, self.cw = int(page.tilelength), int(page.tilewidth)
        else:
            rps = int(page.rowsperstrip or self.height)
            self.ch, self.cw = min(rps, self.height), self.width
        self.ny = math.ceil(self.height / self.ch)
        self.nx = math.ceil(self.width / self.cw)
        nplanes = self.samples if self.planar else 1
        self.memmap: np.ndarray | None = None
        if len(page.dataoffsets) != nplanes * self.ny * self.nx:
            raise ImageError(
                f"{str(path)!r}: TIFF page has {len(page.dataoffsets)} segments, expected "
                f"{nplanes * self.ny * self.nx} for its {self.width}x{self.height} size"
            )
        if (
            not page.is_tiled
            and int(page.compression) == 1
            and not self.planar
            and page.is_contiguous
            and page.dtype is not None
        ):
            # Uncompressed, contiguous strips: map the file; slicing reads only the rows needed.
            offset = int(page.dataoffsets[0])
            dtype = np.dtype(page.dtype).newbyteorder(tf.byteorder)
            self.memmap = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(self.height, self.width, self.samples))
        self.lock = threading.Lock()
        self.fill = np.iinfo(page.dtype).max if np.dtype(page.dtype).kind in "ui" else 1.0

    def _segments(self, keys: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], np.ndarray]:
        """Decode the segments ``(plane, iy, ix)``; cached ones come from the LRU."""
        out: dict[tuple[int, int, int], np.ndarray] = {}
        missing: list[tuple[int, int, int]] = []
        for k in keys:
            v = self.cache.get((self.level, *k))
            if v is None:
                missing.append(k)
            else:
                out[k] = v
        if not missing:
            return out
        page = self.page
        idx = [p * self.ny * self.nx + iy * self.nx + ix for p, iy, ix in missing]
        by_index = dict(zip(idx, missing, strict=True))
        offsets = [int(page.dataoffsets[i]) for i in idx]
        counts = [int(page.databytecounts[i]) for i in idx]
        spp = 1 if self.planar else self.samples
        with self.lock:
            try:
                segments = list(self.tf.filehandle.read_segments(offsets, counts, indices=idx, sort=True))
                for data, i in segments:
                    seg, _, _ = page.decode(data if counts[idx.index(i)] else None, i, jpegtables=page.jpegtables)
                    k = by_index[i]
                    if seg is None:  # sparse TIFF: a tile that was never written is background
                        seg = np.full((self.ch, self.cw, spp), self.fill, dtype=page.dtype)
                    else:
                        seg = seg.reshape(seg.shape[-3:])
                    seg = np.ascontiguousarray(seg)
                    self.cache.put((self.level, *k), seg)
                    out[k] = seg
            except ImageError:
                raise
            except Exception as exc:
                raise ImageError(f"{str(self.path)!r}: cannot decode TIFF level {self.level}: {exc}") from exc
        return out

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Raw pixels of an in-bounds rectangle of this level, assembled from its segments.

        Parameters
        ----------
        x0, y0, x1, y1
            Corners in pixels of this level (``x1``, ``y1`` exclusive).

        Returns
        -------
        numpy.ndarray
            ``(y1 - y0, x1 - x0, samples)`` in the page's dtype.
        """
        if self.memmap is not None:
            return np.array(self.memmap[y0:y1, x0:x1])
        h, w = y1 - y0, x1 - x0
        out = np.empty((h, w, self.samples), dtype=self.page.dtype)
        iy0, iy1 = y0 // self.ch, (y1 - 1) // self.ch
        ix0, ix1 = x0 // self.cw, (x1 - 1) // self.cw
        planes = range(self.samples) if self.planar else range(1)
        keys = [(p, iy, ix) for p in planes for iy in range(iy0, iy1 + 1) for ix in range(ix0, ix1 + 1)]
        segs = self._segments(keys)
        for (p, iy, ix), seg in segs.items():
            ty0, tx0 = iy * self.ch, ix * self.cw
            sy0, sy1 = max(y0, ty0), min(y1, ty0 + seg.shape[0], self.height)
            sx0, sx1 = max(x0, tx0), min(x1, tx0 + seg.shape[1], self.width)
            if sy1 <= sy0 or sx1 <= sx0:
                continue
            block = seg[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]
            if self.planar:
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0, p] = block[..., 0]
            else:
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = block
        return out


class TiffBackend(Backend):
    """TIFF reader: one :class:`TiffLevel` per pyramid level of the file's first series.

    Parameters
    ----------
    path
        The TIFF file.

    Raises
    ------
    ImageError
        Not a TIFF, or a layout that is not one RGB/grayscale page per level.
    """

    def __init__(self, path: Path) -> None:
        import tifffile

        try:
            self.tf = tifffile.TiffFile(path)
        except Exception as exc:
            raise ImageError(f"{str(path)!r} is not a readable TIFF image: {exc}") from exc
        try:
            series = self.tf.series[0]
            self.axes = series.axes
            self.cache = ByteLRU(tile_cache_bytes())
            self.levels: list[TiffLevel] = []
            for i, lvl in enumerate(series.levels):
                if len(lvl.pages) != 1:
                    raise ImageError(
                        f"{str(path)!r}: TIFF series with axes {lvl.axes!r} spreads one image over "
                        f"{len(lvl.pages)} pages; expected one RGB or grayscale page per pyramid level"
                    )
                page = lvl.pages[0]
                page = page.keyframe if hasattr(page, "keyframe") and page.keyframe is not None else page
                self.levels.append(TiffLevel(self.tf, page, path, self.cache, i))
            tiff_width_height(series.shape, series.axes, path)  # checks X/Y axes exist
        except ImageError:
            self.tf.close()
            raise
        except Exception as exc:
            self.tf.close()
            raise ImageError(f"{str(path)!r}: cannot read the TIFF structure: {exc}") from exc
        lv0 = self.levels[0]
        page = lv0.page
        self.level_dims = [(lv.width, lv.height) for lv in self.levels]
        self.tile_size = (lv0.cw, lv0.ch) if page.is_tiled else None
        photometric = int(page.photometric)
        extras = tuple(int(e) for e in (page.extrasamples or ()))
        self._colormap = None
        if photometric == 3:  # palette: look up the colour map (16-bit entries)
            cmap = np.asarray(page.colormap)
            self._colormap = np.clip(np.rint(cmap.T.astype(np.float32) / 257.0), 0, 255).astype(np.uint8)
            self.spec = PixelSpec(channels=3, dtype=np.dtype(np.uint8))
            return
        alpha = "none"
        if lv0.samples in (2, 4):
            alpha = "premultiplied" if extras[:1] == (1,) else "straight"
        self.spec = make_spec(lv0.samples, page.dtype, alpha=alpha, invert=photometric == 0, path=path)

    def read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Raw pixels of a rectangle, palette images already looked up.

        Parameters
        ----------
        level
            Index into :attr:`levels`.
        x0, y0, x1, y1
            An in-bounds rectangle of that level (see :meth:`Backend.read`).

        Returns
        -------
        numpy.ndarray
            ``(h, w, samples)``, or ``uint8 (h, w, 3)`` for palette images.
        """
        raw = self.levels[level].read(x0, y0, x1, y1)
        if self._colormap is not None:
            return self._colormap[raw[..., 0]]
        return raw

    def close(self) -> None:
        """Close the file and drop its decoded tiles."""
        self.tf.close()
        self.cache.clear()
