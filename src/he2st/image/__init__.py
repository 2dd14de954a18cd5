"""Histology images: lazy whole-slide reads, spot patches, stain normalisation, augmentation.

``image_size`` and ``open_image`` read only what they need (tifffile tile reads
for TIFF, OpenSlide for vendor formats, Pillow for small JPEG/PNG), so a
40k x 40k slide never sits in memory. ``read_mpp`` reads the microns per pixel
from the file's metadata; ``make_grid`` lays a spot lattice over the tissue. ``extract_patches`` cuts one patch per
spot, with an on-disk cache; ``PatchReader`` reads the patches of any subset of spots
without it (chunk by chunk for a whole slide). Torch is imported only by
:mod:`he2st.image.augment`; :mod:`he2st.image.stain` and :mod:`he2st.image.augment` load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from he2st.image.grid import GridSpec, GridSpots, make_grid
from he2st.image.lazy import ImageConversionWarning, LazyImage, clear_image_cache, image_size, open_image
from he2st.image.lazy.mpp import read_mpp, resolve_mpp
from he2st.image.patches import Patches, PatchCache, PatchReader, extract_patches, image_content_hash, read_patches
from he2st.image.tissue import otsu_threshold, saturation, slide_tissue_threshold, tissue_fraction, tissue_mask

__all__ = [
    "GridSpec",
    "GridSpots",
    "ImageConversionWarning",
    "LazyImage",
    "PatchCache",
    "PatchReader",
    "Patches",
    "StainNormalizer",
    "augment",
    "clear_image_cache",
    "dihedral",
    "extract_patches",
    "image_content_hash",
    "image_size",
    "make_augment",
    "make_grid",
    "open_image",
    "otsu_threshold",
    "read_mpp",
    "read_patches",
    "resolve_mpp",
    "saturation",
    "slide_tissue_threshold",
    "stain",
    "tissue_fraction",
    "tissue_mask",
]

_LAZY = {
    "stain": ("he2st.image.stain", None),
    "augment": ("he2st.image.augment", None),
    "StainNormalizer": ("he2st.image.stain", "StainNormalizer"),
    "make_augment": ("he2st.image.augment", "make_augment"),
    "dihedral": ("he2st.image.augment", "dihedral"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'he2st.image' has no attribute {name!r}")
