"""Lazy, region-based image access.

:func:`open_image` returns a :class:`LazyImage` whose :meth:`~LazyImage.read_region`
touches only what it needs:

- TIFF / pyramidal TIFF: tifffile decodes only the tiles (or strips) that overlap
  the region, straight from the file's segment offsets, with a small per-image
  LRU of decoded tiles so neighbouring spots do not decode the same tile twice.
  (tifffile's ``aszarr`` needs zarr>=3 from tifffile 2025 on, and he2st pins
  zarr 2 for anndata; reading the segments directly needs neither.)
  Uncompressed, contiguous, untiled pages are memory-mapped.
- Vendor whole-slide formats (.svs, .ndpi, .mrxs, ...): OpenSlide (optional extra).
- JPEG / PNG / other Pillow formats: decoded once per process and kept in a
  byte-bounded LRU (``HE2ST_IMAGE_CACHE_MB``, default 512: one 10k x 10k
  RGB image; the oldest entries are evicted *before* a new decode), because these
  formats have no random access; thumbnails of JPEGs use Pillow's DCT-domain
  downscaling (``draft``) and never decode the full image.

Every read returns ``uint8 (h, w, 3)`` RGB. Grayscale, alpha, 16-bit and float
images are converted, with one :class:`ImageConversionWarning` per opened image
that says exactly what was done.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from he2st.errors import ImageError
from he2st.image._formats import check_file, detect_format, openslide_module, tiff_width_height

#: Value used for pixels outside the image (white background, as on a glass slide).
PAD_VALUE = 255


class ImageConversionWarning(UserWarning):
    """An image was not 8-bit RGB and was converted; the message says how."""


# ----------------------------------------------------------------------------
# Pixel-format conversion
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelSpec:
    """How to turn a backend's raw pixels into uint8 RGB.

    Attributes
    ----------
    channels
        1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA).
    dtype
        Numpy dtype of the raw pixels.
    scale_max
        For integer data wider than 8 bits: the value mapped to 255.
    alpha
        ``"none"``, ``"straight"`` (unassociated) or ``"premultiplied"``.
    notes
        Human-readable conversions; non-empty means a warning is due.
    """

    channels: int
    dtype: np.dtype
    scale_max: float = 255.0
    alpha: str = "none"
    invert: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


def make_spec(
    channels: int,
    dtype: Any,
    *,
    alpha: str | None = None,
    invert: bool = False,
    scale_max: float | None = None,
    warn_alpha: bool = True,
    path: Path | None = None,
) -> PixelSpec:
    """Build a :class:`PixelSpec` and the notes describing each conversion."""
    dtype = np.dtype(dtype)
    notes: list[str] = []
    if channels not in (1, 2, 3, 4):
        raise ImageError(
            f"{str(path)!r} has {channels} channels per pixel; expected an RGB(A) or grayscale H&E image"
        )
    if dtype.kind == "u" or dtype.kind == "i":
        if dtype.itemsize == 1:
            smax = 255.0
        else:
            smax = float(scale_max if scale_max is not None else np.iinfo(dtype).max)
            notes.append(
                f"{dtype.itemsize * 8}-bit ({dtype.name}) converted to 8-bit by scaling with the "
                f"dtype's maximum ({smax:g} -> 255), not the data's range"
            )
    elif dtype.kind == "f":
        smax = 1.0
        notes.append(f"floating-point ({dtype.name}) pixels assumed to lie in [0, 1] and scaled to 0-255")
    elif dtype.kind == "b":
        smax = 1.0
        notes.append("1-bit (bilevel) image expanded to 0/255")
    else:
        raise ImageError(f"{str(path)!r} has pixel type {dtype}; expected 8- or 16-bit integers")
    if invert:
        notes.append("photometric 'min-is-white' grayscale inverted")
    if channels in (1, 2):
        notes.append("grayscale replicated to RGB")
    if alpha is None:
        alpha = "straight" if channels in (2, 4) else "none"
    if alpha != "none" and warn_alpha:
        notes.append(f"alpha channel ({alpha}) composited on white and dropped")
    return PixelSpec(channels=channels, dtype=dtype, scale_max=smax, alpha=alpha, invert=invert, notes=tuple(notes))


def to_rgb8(arr: np.ndarray, spec: PixelSpec) -> np.ndarray:
    """Convert raw pixels ``(h, w[, c])`` to ``uint8 (h, w, 3)`` following ``spec``."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype != np.uint8 or spec.scale_max != 255.0:
        if arr.dtype.kind == "f":
            a = np.clip(np.nan_to_num(arr.astype(np.float32), nan=0.0), 0.0, 1.0) * 255.0
        else:
            a = arr.astype(np.float32) * np.float32(255.0 / spec.scale_max)
        arr = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if spec.invert:
        arr = 255 - arr
    color = arr[..., :3] if spec.channels >= 3 else arr[..., :1]
    if spec.alpha != "none":
        a = arr[..., -1:].astype(np.float32) / 255.0
        c = color.astype(np.float32)
        out = c * a + 255.0 * (1.0 - a) if spec.alpha == "straight" else c + 255.0 * (1.0 - a)
        color = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if color.shape[-1] == 1:
        color = np.repeat(color, 3, axis=-1)
    return np.ascontiguousarray(color)


# ----------------------------------------------------------------------------
# Byte-bounded LRU (decoded JPEG/PNG images per process; TIFF tiles per image)
# ----------------------------------------------------------------------------


class _ByteLRU:
    """A thread-safe LRU bounded by the total ``nbytes`` of its numpy values."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._d: OrderedDict[Any, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> np.ndarray | None:
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: Any, value: np.ndarray) -> None:
        with self._lock:
            if key in self._d:
                self._bytes -= self._d.pop(key).nbytes
            if value.nbytes > self.max_bytes:
                return  # too large to keep; the caller still has it
            self._d[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes and self._d:
                _, old = self._d.popitem(last=False)
                self._bytes -= old.nbytes

    def make_room(self, nbytes: int) -> None:
        """Evict least-recent entries so that ``nbytes`` more fit (called before a big decode)."""
        with self._lock:
            while self._d and self._bytes + nbytes > self.max_bytes:
                _, old = self._d.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._d)


def _decoded_cache_bytes() -> int:
    try:
        mb = float(os.environ.get("HE2ST_IMAGE_CACHE_MB", "512"))
    except ValueError:
        mb = 512.0
    return int(mb * 2**20)


#: Decoded Pillow images of this process, keyed by (path, size, mtime).
_DECODED = _ByteLRU(_decoded_cache_bytes())
#: Count of full decodes of Pillow images (tests use it to check the LRU works).
DECODE_COUNT = {"n": 0}


def clear_image_cache() -> None:
    """Drop every decoded JPEG/PNG kept by this process."""
    _DECODED.clear()


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


# ----------------------------------------------------------------------------
# Backends: each reads an in-bounds rectangle of one level, raw pixels
# ----------------------------------------------------------------------------


class _Backend:
    level_dims: list[tuple[int, int]]  # (width, height) per level
    tile_size: tuple[int, int] | None  # (tile width, tile height) of level 0
    spec: PixelSpec

    def read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Raw pixels of ``[y0:y1, x0:x1]`` of ``level`` (in bounds), ``(h, w, c)``."""
        raise NotImplementedError

    def read_rgb(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return to_rgb8(self.read(level, x0, y0, x1, y1), self.spec)

    def close(self) -> None:  # pragma: no cover - trivial
        pass


class _TiffLevel:
    """Segment-level random access to one TIFF page (one pyramid level)."""

    def __init__(self, tf: Any, page: Any, path: Path, tile_cache: _ByteLRU, level: int) -> None:
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


def _tile_cache_bytes() -> int:
    try:
        return int(float(os.environ.get("HE2ST_TILE_CACHE_MB", "128")) * 2**20)
    except ValueError:
        return 128 * 2**20


class _TiffBackend(_Backend):
    def __init__(self, path: Path) -> None:
        import tifffile

        try:
            self.tf = tifffile.TiffFile(path)
        except Exception as exc:
            raise ImageError(f"{str(path)!r} is not a readable TIFF image: {exc}") from exc
        try:
            series = self.tf.series[0]
            self.axes = series.axes
            self.cache = _ByteLRU(_tile_cache_bytes())
            self.levels: list[_TiffLevel] = []
            for i, lvl in enumerate(series.levels):
                if len(lvl.pages) != 1:
                    raise ImageError(
                        f"{str(path)!r}: TIFF series with axes {lvl.axes!r} spreads one image over "
                        f"{len(lvl.pages)} pages; expected one RGB or grayscale page per pyramid level"
                    )
                page = lvl.pages[0]
                page = page.keyframe if hasattr(page, "keyframe") and page.keyframe is not None else page
                self.levels.append(_TiffLevel(self.tf, page, path, self.cache, i))
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
        raw = self.levels[level].read(x0, y0, x1, y1)
        if self._colormap is not None:
            return self._colormap[raw[..., 0]]
        return raw

    def close(self) -> None:
        self.tf.close()
        self.cache.clear()


class _OpenSlideBackend(_Backend):
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
        ds = self.downsamples[level]
        region = self.slide.read_region((int(round(x0 * ds)), int(round(y0 * ds))), level, (x1 - x0, y1 - y0))
        return np.asarray(region)

    def close(self) -> None:
        self.slide.close()


_PIL_MODES_8BIT = {"RGB": 3, "L": 1, "LA": 2, "RGBA": 4, "RGBa": 4, "La": 2}


class _PilBackend(_Backend):
    """Pillow-decoded images (JPEG, PNG, BMP, ...): no random access, so decode once and cache."""

    def __init__(self, path: Path) -> None:
        from PIL import Image, UnidentifiedImageError

        Image.MAX_IMAGE_PIXELS = None  # whole-slide JPEGs exceed Pillow's bomb guard
        self.path = path
        try:
            with Image.open(path) as im:
                self.mode = im.mode
                self.format = im.format
                w, h = im.size
                has_transparency = "transparency" in im.info
                self._n_frames = getattr(im, "n_frames", 1)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageError(
                f"{str(path)!r} is not an image (expected JPEG, PNG, TIFF or a whole-slide format): {exc}"
            ) from exc
        self.level_dims = [(int(w), int(h))]
        self.tile_size = None
        self._pil_convert: str | None = None
        mode = self.mode
        if mode in _PIL_MODES_8BIT:
            alpha = "premultiplied" if mode in ("RGBa", "La") else None
            self.spec = make_spec(_PIL_MODES_8BIT[mode], np.uint8, alpha=alpha, path=path)
        elif mode in ("P", "PA"):
            if has_transparency or mode == "PA":
                self._pil_convert = "RGBA"
                self.spec = make_spec(4, np.uint8, path=path)
            else:
                self._pil_convert = "RGB"  # a palette lookup is lossless: no warning
                self.spec = make_spec(3, np.uint8, path=path)
        elif mode == "1":
            self._pil_convert = "L"
            self.spec = make_spec(1, np.uint8, path=path)
        elif mode.startswith("I;16"):
            self.spec = make_spec(1, np.uint16, path=path)
        elif mode == "I":
            # Pillow opens 16-bit grayscale PNGs as 32-bit "I"; their range is 16-bit.
            self.spec = make_spec(1, np.int32, scale_max=65535.0, path=path)
        elif mode == "F":
            self.spec = make_spec(1, np.float32, path=path)
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            self._pil_convert = "RGB"
            spec = make_spec(3, np.uint8, path=path)
            note = () if mode == "YCbCr" else (f"{mode} colour space converted to RGB by Pillow",)
            self.spec = PixelSpec(channels=3, dtype=spec.dtype, notes=note)
        else:
            raise ImageError(f"{str(path)!r}: unsupported Pillow image mode {mode!r}; expected RGB(A) or grayscale")

    def _open(self) -> Any:
        from PIL import Image

        try:
            im = Image.open(self.path)
        except OSError as exc:
            raise ImageError(f"cannot open image {str(self.path)!r}: {exc}") from exc
        return im

    def _to_array(self, im: Any) -> np.ndarray:
        try:
            if self._pil_convert:
                im = im.convert(self._pil_convert)
            return to_rgb8(np.asarray(im), self.spec)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"cannot decode image {str(self.path)!r} (truncated or corrupt?): {exc}") from exc

    def decoded(self) -> np.ndarray:
        """The whole image as uint8 RGB, from the per-process LRU or decoded now."""
        key = _file_key(self.path)
        arr = _DECODED.get(key)
        if arr is None:
            w, h = self.level_dims[0]
            _DECODED.make_room(w * h * 3)  # drop older images first: peak memory = one image
            arr = self._decode_jpeg_direct()
            if arr is None:
                with self._open() as im:
                    arr = self._to_array(im)
            arr.setflags(write=False)
            DECODE_COUNT["n"] += 1
            _DECODED.put(key, arr)
        return arr

    def _decode_jpeg_direct(self) -> np.ndarray | None:
        """Decode a plain RGB/gray JPEG straight into one numpy buffer with imagecodecs (libjpeg-turbo).

        Pillow's route (decode, then ``np.asarray`` through ``tobytes``) holds
        three copies of the image at its peak (~0.8 GB for a 9.3k x 9.9k her2st
        JPEG); this holds one. Returns None for other formats/modes, or when
        imagecodecs cannot decode the file (e.g. arithmetic coding), in which
        case Pillow decodes it -- the same pixels from another libjpeg build.
        """
        if self.format != "JPEG" or self.mode not in ("RGB", "L"):
            return None
        try:
            import imagecodecs

            arr = imagecodecs.jpeg8_decode(self.path.read_bytes())
        except Exception:  # noqa: BLE001 - any decoder failure: let Pillow try (and report)
            return None
        if arr.dtype != np.uint8 or arr.shape[:2] != self.level_dims[0][::-1]:
            return None
        return to_rgb8(arr, self.spec)

    def is_decoded(self) -> bool:
        return _DECODED.get(_file_key(self.path)) is not None

    def read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self.decoded()[y0:y1, x0:x1]

    def read_rgb(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self.decoded()[y0:y1, x0:x1].copy()

    def draft_thumbnail(self, max_side: int) -> np.ndarray | None:
        """A JPEG decoded at 1/2..1/8 scale in the DCT domain, or None for other formats."""
        if self.format != "JPEG":
            return None
        w, h = self.level_dims[0]
        scale = max_side / max(w, h)
        with self._open() as im:
            im.draft(im.mode, (max(1, int(w * scale)), max(1, int(h * scale))))
            return self._to_array(im)


# ----------------------------------------------------------------------------
# The public object
# ----------------------------------------------------------------------------


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
        self._backend: _Backend | None = None
        self._pid = -1
        self._open_backend()
        b = self._backend
        assert b is not None
        self.width, self.height = b.level_dims[0]
        self.levels: list[tuple[int, int]] = list(b.level_dims)
        if isinstance(b, _OpenSlideBackend):
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
        opener: dict[str, Callable[[Path], _Backend]] = {
            "tiff": _TiffBackend,
            "openslide": _OpenSlideBackend,
            "pil": _PilBackend,
        }
        self._backend = opener[self._format](self.path)
        self._pid = os.getpid()

    @property
    def backend(self) -> _Backend:
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
        if isinstance(b, _PilBackend):
            # JPEG: DCT-domain downscale (~20x faster than resizing the decoded image).
            arr = b.draft_thumbnail(max_side)
            if arr is None:
                arr = b.decoded()
            return _resize(arr, tw, th)
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
        return _resize(small, tw, th)


def _resize(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    """Antialiased resize of ``uint8 (H, W, 3)`` to ``(h, w, 3)``."""
    from PIL import Image

    if arr.shape[1] == w and arr.shape[0] == h:
        return np.ascontiguousarray(arr)
    # reducing_gap: box-reduce by an integer factor first when shrinking a lot (fast, still antialiased).
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(arr)).resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    )


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
