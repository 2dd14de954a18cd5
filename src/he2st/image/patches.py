"""One image patch per spot, with an on-disk cache.

:func:`extract_patches` cuts a square patch centred on every spot of a slide
(``obsm["spatial"]``), optionally resampled to a target microns-per-pixel,
measures each patch's tissue fraction and caches the result on disk
(:class:`PatchCache`), keyed by the image's content hash, the spot
coordinates and the extraction settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from he2st._utils import atomic_path, atomic_write_json, default_cache_dir, progress, sha256_arrays, sha256_file
from he2st.errors import ImageError, SlideError

#: Bump when the extraction changes in a way that changes the pixels, so old caches are not reused.
EXTRACTION_VERSION = 1
#: Longer side of the thumbnail from which the per-slide tissue threshold is computed.
THUMBNAIL_SIDE = 1024


@dataclass
class Patches:
    """Patches of one slide, in the slide's spot order.

    Parameters
    ----------
    images
        ``uint8 (n, size_px, size_px, 3)``, row ``i`` centred on ``obs_names[i]``
        (a read-only memory map when it comes from the cache).
    tissue_fraction
        ``float32 (n,)``: fraction of tissue pixels (HSV saturation above the
        slide's Otsu threshold).
    obs_names
        Spot ids, equal to ``slide.obs_names``.
    size_px
        Side of each patch in pixels.
    mpp
        Microns per pixel of the patches (``target_mpp`` when resampled, else the
        slide's ``mpp``, or None when unknown).
    slide_id
        The slide.
    read_px
        Side of the square read around each spot, in level-0 pixels.
    tissue_threshold
        Saturation threshold used for ``tissue_fraction``.
    tissue_block
        Pixel cell size over which saturation was averaged for ``tissue_fraction``.
    from_cache
        True when the patches were loaded from the on-disk cache.
    cache_key
        Key of the cache entry (None when caching was off).
    """

    images: np.ndarray
    tissue_fraction: np.ndarray
    obs_names: pd.Index
    size_px: int
    mpp: float | None
    slide_id: str = ""
    read_px: int = 0
    tissue_threshold: float = float("nan")
    tissue_block: int = 1
    from_cache: bool = False
    cache_key: str | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"Patches(slide={self.slide_id!r}, n={len(self)}, size_px={self.size_px}, mpp={self.mpp}, "
            f"from_cache={self.from_cache})"
        )


# ----------------------------------------------------------------------------
# Content hashes of image files, memoised by (path, size, mtime)
# ----------------------------------------------------------------------------

_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def image_content_hash(path: str | os.PathLike, cache_root: Path | None = None) -> str:
    """sha256 of an image file's bytes, memoised per (path, size, mtime).

    The memo lives in memory and, when ``cache_root`` is given, as one small file
    per image under ``cache_root/hashes`` so other processes and later runs skip
    re-hashing multi-gigabyte slides.

    Parameters
    ----------
    path
        The image file.
    cache_root
        Directory for the on-disk memo, or None for the in-memory one only.

    Returns
    -------
    str
        Hex sha256 of the file's bytes.
    """
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _HASH_MEMO:
        return _HASH_MEMO[key]
    memo_file = None
    if cache_root is not None:
        name = hashlib.sha256("|".join(map(str, key)).encode()).hexdigest()[:40]
        memo_file = cache_root / "hashes" / f"{name}.txt"
        if memo_file.is_file():
            digest = memo_file.read_text().strip()
            if len(digest) == 64:
                _HASH_MEMO[key] = digest
                return digest
    digest = sha256_file(p)
    _HASH_MEMO[key] = digest
    if memo_file is not None:
        with atomic_path(memo_file) as tmp:
            tmp.write_text(digest + "\n")
    return digest


# ----------------------------------------------------------------------------
# The on-disk cache
# ----------------------------------------------------------------------------


class PatchCache:
    """Patches on disk as ``.npy`` files, shared by runs and processes.

    An entry is three files under ``root/<key[:2]>/``: ``<key>.images.npy``
    (loaded memory-mapped), ``<key>.tissue.npy`` and ``<key>.json``; the JSON is
    written last (atomically), so an entry without it is incomplete and ignored.

    Parameters
    ----------
    root
        Folder; defaults to ``he2st._utils.default_cache_dir() / "patches"``.

    Attributes
    ----------
    hits, misses
        Lookups served from disk / not found, counted on this instance.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir() / "patches"
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"PatchCache({str(self.root)!r}, hits={self.hits}, misses={self.misses})"

    def key(
        self,
        slide: Any,
        size_px: int,
        target_mpp: float | None,
        tissue_threshold: float | None = None,
    ) -> str:
        """Cache key: image content hash + spot coordinates + obs_names + settings.

        Parameters
        ----------
        slide
            A slide AnnData with an image.
        size_px
            Patch side in pixels.
        target_mpp
            Resampling in microns per pixel, or None.
        tissue_threshold
            Saturation threshold of the tissue fractions, or None (found per slide).

        Returns
        -------
        str
            Hex digest naming the cache entry.
        """
        from he2st.data.slide import meta

        m = meta(slide)
        image_hash = image_content_hash(_image_path(slide), self.root)
        spatial = np.asarray(slide.obsm["spatial"], dtype=np.float64)
        settings = json.dumps(
            {
                "v": EXTRACTION_VERSION,
                "size_px": int(size_px),
                "target_mpp": None if target_mpp is None else float(target_mpp),
                "mpp": m.mpp if target_mpp is not None else None,
                "tissue_threshold": None if tissue_threshold is None else float(tissue_threshold),
            },
            sort_keys=True,
        )
        names = np.asarray([str(s) for s in slide.obs_names], dtype=object)
        return sha256_arrays(image_hash, settings, spatial, names)

    def _paths(self, key: str) -> tuple[Path, Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.images.npy", d / f"{key}.tissue.npy", d / f"{key}.json"

    def __contains__(self, key: str) -> bool:
        return all(p.is_file() for p in self._paths(key))

    def load(self, key: str) -> Patches | None:
        """The entry for ``key`` (images memory-mapped), or None; counts a hit or a miss."""
        img_p, tis_p, meta_p = self._paths(key)
        if not meta_p.is_file():
            self.misses += 1
            return None
        try:
            info = json.loads(meta_p.read_text())
            images = np.load(img_p, mmap_mode="r")
            tissue = np.load(tis_p)
            n, s = int(info["n"]), int(info["size_px"])
            if images.shape != (n, s, s, 3) or images.dtype != np.uint8 or tissue.shape != (n,):
                raise ValueError(f"entry shapes {images.shape}/{tissue.shape} disagree with its metadata")
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            # A damaged entry is rebuilt, never trusted.
            self.misses += 1
            return None
        self.hits += 1
        return Patches(
            images=images,
            tissue_fraction=tissue.astype(np.float32, copy=False),
            obs_names=pd.Index(info["obs_names"]),
            size_px=s,
            mpp=info["mpp"],
            slide_id=info["slide_id"],
            read_px=int(info["read_px"]),
            tissue_threshold=float(info["tissue_threshold"]),
            tissue_block=int(info.get("tissue_block", 1)),
            from_cache=True,
            cache_key=key,
        )

    def clear(self) -> int:
        """Delete every entry; returns the number of files removed."""
        n = 0
        if self.root.is_dir():
            for p in self.root.glob("??/*"):
                if p.is_file():
                    p.unlink()
                    n += 1
        return n


# ----------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------


def _image_path(slide: Any) -> Path:
    from he2st.data.slide import meta

    m = meta(slide)
    if not m.image_path:
        raise SlideError(m.slide_id, "has no image (uns['he2st']['image_path'] is None); patches need the H&E image")
    p = Path(m.image_path)
    if not p.is_file():
        raise ImageError(f"slide {m.slide_id!r}: image file {str(p)!r} does not exist")
    return p


def read_size_px(size_px: int, target_mpp: float | None, mpp: float | None, slide_id: str = "") -> int:
    """Side in level-0 pixels of the square read around each spot.

    ``size_px`` itself without resampling; ``round(size_px * target_mpp / mpp)``
    with it, so the patch covers ``size_px * target_mpp`` microns.

    Parameters
    ----------
    size_px
        Side of the output patch in pixels.
    target_mpp
        Microns per pixel of the output, or None (no resampling).
    mpp
        Microns per pixel of the slide's level 0 (needed with ``target_mpp``).
    slide_id
        Named in the error message when ``mpp`` is missing.

    Returns
    -------
    int
        Side of the region to read, in level-0 pixels.
    """
    if target_mpp is None:
        return int(size_px)
    if not (isinstance(target_mpp, (int, float)) and math.isfinite(target_mpp) and target_mpp > 0):
        raise ValueError(f"target_mpp must be a positive number, got {target_mpp!r}")
    if mpp is None:
        raise SlideError(
            slide_id,
            f"target_mpp={target_mpp} needs the image's microns per pixel, but uns['he2st']['mpp'] is unknown; "
            "set it (e.g. from the scanner metadata or the spot pitch) or use target_mpp=None",
        )
    return max(1, int(round(size_px * target_mpp / mpp)))


def tissue_block(width: int, height: int, read_px: int, size_px: int) -> int:
    """Patch pixels per thumbnail pixel: the block over which tissue is measured.

    The tissue threshold is found on a :data:`THUMBNAIL_SIDE` thumbnail, so
    patches are averaged to that scale before it is applied (at most a quarter
    of the patch side, so that small patches keep a few cells).

    Parameters
    ----------
    width, height
        Size of the slide's level 0 in pixels.
    read_px
        Side of the region read around each spot, in level-0 pixels.
    size_px
        Side of the output patch in pixels.

    Returns
    -------
    int
        Block side in patch pixels (at least 1).
    """
    thumb_px = max(width, height) / THUMBNAIL_SIDE  # level-0 pixels per thumbnail pixel
    patch_px = read_px / size_px  # level-0 pixels per patch pixel
    return int(min(max(1, round(thumb_px / patch_px)), max(1, size_px // 4)))


def _read_order(tops: np.ndarray, lefts: np.ndarray, tile_h: int) -> np.ndarray:
    """Spot order for reading: by tile row, then column, so consecutive reads share tiles."""
    return np.lexsort((lefts, tops // max(1, tile_h)))


class PatchReader:
    """Reads the patches of chosen spots of a slide through its lazy image, without the patch cache.

    The reading and resampling of :func:`extract_patches` (which uses it for
    every spot): the window of ``read_size_px`` level-0 pixels around each spot,
    read from the coarsest pyramid level still fine enough and resized to
    ``size_px`` with an antialiasing (Lanczos) filter. Only the patches asked
    for are held in memory, so a whole slide can be read chunk by chunk.

    Parameters
    ----------
    slide
        A slide AnnData (``obsm["spatial"]`` pixel centres, ``uns["he2st"]["image_path"]``).
    size_px
        Side of the returned patches in pixels.
    target_mpp
        Resample to this many microns per pixel (needs the slide's ``mpp``), or None.

    Attributes
    ----------
    n
        Number of spots of the slide.
    level, level_px
        The pyramid level read and the side of the window in its pixels.
    read_px
        Side of the square read around each spot, in level-0 pixels.
    mpp
        Microns per pixel of the patches (None when unknown).
    image
        The open :class:`~he2st.image.lazy.LazyImage`.

    Raises
    ------
    SlideError
        No image or no ``obsm["spatial"]``, or ``target_mpp`` given but the slide's ``mpp`` is unknown.
    ImageError
        The image is missing or unreadable.

    Examples
    --------
    >>> with PatchReader(slide, 224) as reader:
    ...     first = reader.read(np.arange(1024))  # uint8 (1024, 224, 224, 3)
    """

    def __init__(self, slide: Any, size_px: int = 224, target_mpp: float | None = None) -> None:
        from he2st.data.slide import meta
        from he2st.image.lazy import open_image

        m = meta(slide)
        self.size_px = int(size_px)
        if self.size_px <= 0:
            raise ValueError(f"size_px must be positive, got {size_px}")
        if "spatial" not in slide.obsm:
            raise SlideError(m.slide_id, "obsm['spatial'] is missing; patches are centred on the spot pixel coordinates")
        self.slide_id = m.slide_id
        self.read_px = read_size_px(self.size_px, target_mpp, m.mpp, m.slide_id)
        self.path = _image_path(slide)
        self.mpp = float(target_mpp) if target_mpp is not None else m.mpp
        spatial = np.asarray(slide.obsm["spatial"], dtype=np.float64)
        self.n = int(spatial.shape[0])
        half = self.read_px // 2
        self.lefts = np.floor(spatial[:, 0]).astype(np.int64) - half
        self.tops = np.floor(spatial[:, 1]).astype(np.int64) - half
        self.image = open_image(self.path)
        try:
            img = self.image
            # The coarsest level that still has at least size_px pixels across the read window.
            ratio = self.read_px / self.size_px
            fine_enough = [i for i, d in enumerate(img.downsamples) if d <= ratio + 1e-9]
            self.level = max(fine_enough, key=lambda i: img.downsamples[i], default=0)
            ds = img.downsamples[self.level]
            self.level_px = max(1, int(round(self.read_px / ds)))
            self._tile_h = int((img.tile_size or (256, 256))[1] * ds)
        except BaseException:
            self.image.close()
            raise

    def __enter__(self) -> PatchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the image."""
        self.image.close()

    def read(self, index: Any = None, out: np.ndarray | None = None, description: str | None = None) -> np.ndarray:
        """Patches of the spots ``index`` (positions in the slide), in that order.

        Parameters
        ----------
        index
            Spot positions (integers ``0 <= i < n``); None for every spot.
        out
            Array ``uint8 (len(index), size_px, size_px, 3)`` to fill (e.g. a memory map), or None.
        description
            Label of a progress bar over the spots; None shows none.

        Returns
        -------
        numpy.ndarray
            ``uint8 (len(index), size_px, size_px, 3)``; ``out`` when given. Spots near
            the image edge are padded with white.
        """
        from he2st.image.lazy.pixels import resize

        idx = np.arange(self.n) if index is None else np.asarray(index, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(
                f"slide {self.slide_id!r}: spot positions must be in [0, {self.n}), got {idx.min()}..{idx.max()}"
            )
        k, s = int(idx.size), self.size_px
        if out is None:
            out = np.empty((k, s, s, 3), dtype=np.uint8)
        elif out.shape != (k, s, s, 3) or out.dtype != np.uint8:
            raise ValueError(f"out must be uint8 {(k, s, s, 3)}, got {out.dtype} {out.shape}")
        # Read by tile row, then column, so consecutive reads share decoded tiles.
        order = _read_order(self.tops[idx], self.lefts[idx], self._tile_h)
        rows = order if description is None else progress(order, description=description, total=k)
        for j in rows:
            i = idx[j]
            patch = self.image.read_region(
                int(self.lefts[i]), int(self.tops[i]), self.level_px, self.level_px, level=self.level
            )
            if self.level_px != s:
                patch = resize(patch, s, s)
            out[j] = patch
        return out


def read_patches(slide: Any, index: Any = None, size_px: int = 224, target_mpp: float | None = None) -> np.ndarray:
    """Patches of some spots of a slide, read now, without the patch cache.

    Parameters
    ----------
    slide
        A slide AnnData with an image.
    index
        Spot positions to read (None: every spot).
    size_px
        Side of the patches in pixels.
    target_mpp
        Resampling in microns per pixel, or None.

    Returns
    -------
    numpy.ndarray
        ``uint8 (len(index), size_px, size_px, 3)``, the pixels :func:`extract_patches` gives
        for those spots.
    """
    with PatchReader(slide, size_px, target_mpp) as reader:
        return reader.read(index)


def extract_patches(
    slide: Any,
    size_px: int = 224,
    target_mpp: float | None = None,
    cache: bool | PatchCache = True,
    *,
    tissue_threshold: float | None = None,
) -> Patches:
    """Cut one square patch centred on each spot of a slide.

    Parameters
    ----------
    slide
        A slide AnnData (``obsm["spatial"]`` pixel centres, ``uns["he2st"]["image_path"]``).
    size_px
        Side of the returned patches in pixels.
    target_mpp
        Resample to this many microns per pixel: read
        ``round(size_px * target_mpp / mpp)`` level-0 pixels around each spot
        (from a coarser pyramid level when one is fine enough) and resize to
        ``size_px`` with an antialiasing (Lanczos) filter. Needs the slide's
        ``mpp``. None: no resampling.
    cache
        True: use the default :class:`PatchCache`; a :class:`PatchCache`: use it;
        False: always extract, keep in memory.
    tissue_threshold
        Saturation threshold for the tissue fraction; None computes it per slide
        with Otsu on a thumbnail.

    Returns
    -------
    Patches
        Aligned with ``slide.obs_names``. Spots near the image edge are padded
        with white, never dropped.

    Raises
    ------
    SlideError
        No image, or ``target_mpp`` given but the slide's ``mpp`` is unknown.
    ImageError
        The image is missing or unreadable.

    Notes
    -----
    The patch of a spot at ``(x, y)`` starts at ``(floor(x) - r // 2, floor(y) - r // 2)``
    with ``r`` the read size: for ``r = 224`` this is the ``img[y-112:y+112, x-112:x+112]``
    crop of Hist2ST/HisToGene on integer centres. :class:`PatchReader` reads the
    patches of a subset of spots the same way, without the cache.
    """
    from he2st.data.slide import meta
    from he2st.image.tissue import slide_tissue_threshold, tissue_fraction

    m = meta(slide)
    size_px = int(size_px)
    if size_px <= 0:
        raise ValueError(f"size_px must be positive, got {size_px}")
    if "spatial" not in slide.obsm:
        raise SlideError(m.slide_id, "obsm['spatial'] is missing; patches are centred on the spot pixel coordinates")
    read_px = read_size_px(size_px, target_mpp, m.mpp, m.slide_id)
    path = _image_path(slide)
    out_mpp = float(target_mpp) if target_mpp is not None else m.mpp

    store: PatchCache | None = cache if isinstance(cache, PatchCache) else (PatchCache() if cache else None)
    key = None
    if store is not None:
        key = store.key(slide, size_px, target_mpp, tissue_threshold)
        hit = store.load(key)
        if hit is not None:
            return hit

    n = int(np.asarray(slide.obsm["spatial"]).shape[0])
    with PatchReader(slide, size_px, target_mpp) as reader:
        img = reader.image
        level = reader.level
        images_tmp = None
        ctx = None
        if store is not None:
            img_p, _, _ = store._paths(key)  # type: ignore[arg-type]
            ctx = atomic_path(img_p, suffix=".npy")
            images_tmp = ctx.__enter__()
            images = np.lib.format.open_memmap(images_tmp, mode="w+", dtype=np.uint8, shape=(n, size_px, size_px, 3))
        else:
            images = np.empty((n, size_px, size_px, 3), dtype=np.uint8)
        try:
            reader.read(None, out=images, description=f"patches {m.slide_id}")
            if tissue_threshold is None:
                tissue_threshold = slide_tissue_threshold(img.thumbnail(THUMBNAIL_SIDE))
            block = tissue_block(img.width, img.height, read_px, size_px)
            tissue = tissue_fraction(images, threshold=float(tissue_threshold), block=block)
            if ctx is not None:
                images.flush()
                del images
                ctx.__exit__(None, None, None)
                ctx = None
        except BaseException as exc:
            if ctx is not None:
                ctx.__exit__(type(exc), exc, exc.__traceback__)
            raise

    obs_names = pd.Index([str(s) for s in slide.obs_names])
    if store is None:
        return Patches(
            images=images,
            tissue_fraction=tissue,
            obs_names=obs_names,
            size_px=size_px,
            mpp=out_mpp,
            slide_id=m.slide_id,
            read_px=read_px,
            tissue_threshold=float(tissue_threshold),
            tissue_block=block,
        )
    _, tis_p, meta_p = store._paths(key)  # type: ignore[arg-type]
    with atomic_path(tis_p, suffix=".npy") as tmp:
        np.save(tmp, tissue)
    atomic_write_json(
        meta_p,
        {
            "n": n,
            "size_px": size_px,
            "read_px": read_px,
            "level": level,
            "mpp": out_mpp,
            "target_mpp": target_mpp,
            "slide_id": m.slide_id,
            "image_path": str(path),
            "image_sha256": image_content_hash(path, store.root),
            "tissue_threshold": float(tissue_threshold),
            "tissue_block": block,
            "obs_names": list(obs_names),
            "extraction_version": EXTRACTION_VERSION,
        },
    )
    loaded = store.load(key)
    if loaded is None:  # pragma: no cover - only if the disk vanished under us
        raise ImageError(f"slide {m.slide_id!r}: patch cache entry {key} could not be read back from {store.root}")
    store.hits -= 1  # the read-back is part of this miss, not a hit
    loaded.from_cache = False
    return loaded
