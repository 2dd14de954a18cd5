"""Deterministic stain shifts of a whole slide image, for domain-shift tests and benchmarks.

A held-out section from another lab, scanner or staining batch differs from the
training slides in colour as a whole. :func:`stain_shift` imitates that on an
RGB image, deterministically (no random draw): in Ruifrok and Johnston's
haematoxylin-eosin-DAB optical-density space (the matrix of
``skimage.color.rgb2hed``) haematoxylin is scaled by ``1 - 0.25 s``, eosin by
``1 + 0.25 s`` and the whole optical density by ``1 - 0.15 s`` (a paler, pinker
section) for a strength ``s`` (0: unchanged up to uint8 rounding; 1: a clearly
visible batch difference; 2: a strong one). :func:`perturbed_slide` writes a
stain-shifted copy of a slide's image (an uncompressed TIFF) and returns the
slide pointing at it, so every method reads the shifted image through its
usual path (and the feature cache, keyed by the image file, keeps the two
apart).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["perturbed_slide", "stain_shift"]

#: Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB), as in scikit-image.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def stain_shift(rgb: np.ndarray, strength: float, chunk_rows: int = 1024) -> np.ndarray:
    """A stain-shifted copy of an RGB image (see the module docstring).

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` uint8 image.
    strength
        ``s`` >= 0: haematoxylin x ``(1 - 0.25 s)``, eosin x ``(1 + 0.25 s)``,
        optical density x ``(1 - 0.15 s)``.
    chunk_rows
        Rows converted at a time (bounds the float memory of large images).

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8.
    """
    rgb = np.asarray(rgb)
    s = float(strength)
    gain = np.array([1 - 0.25 * s, 1 + 0.25 * s, 1.0]) * (1 - 0.15 * s)
    mix = _HED_FROM_RGB @ np.diag(gain) @ _RGB_FROM_HED  # od -> hed -> scaled -> od, one matrix
    out = np.empty_like(rgb, dtype=np.uint8)
    for r in range(0, rgb.shape[0], chunk_rows):
        x = rgb[r : r + chunk_rows].astype(np.float32)
        od = -np.log(np.maximum(x, 1.0) / 255.0)
        od2 = np.maximum(od @ mix.astype(np.float32), 0.0)
        out[r : r + chunk_rows] = np.clip(np.rint(255.0 * np.exp(-od2)), 0, 255).astype(np.uint8)
    return out


def perturbed_slide(slide: Any, out_path: str | os.PathLike, strength: float) -> Any:
    """A copy of ``slide`` whose image is a stain-shifted copy written to ``out_path``.

    Parameters
    ----------
    slide
        A slide AnnData with an image.
    out_path
        Where to write the shifted image (a ``.tif`` file, uncompressed).
    strength
        See :func:`stain_shift`.

    Returns
    -------
    anndata.AnnData
        The slide (a copy) with ``uns["he2st"]["image_path"]`` set to ``out_path``;
        counts, spots and every other field are unchanged.
    """
    from PIL import Image

    from he2st.data.slide import meta
    from he2st.image.lazy import open_image

    src = meta(slide).image_path
    img = open_image(src)
    rgb = img.read_region(0, 0, img.width, img.height)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(stain_shift(rgb, strength)).save(out, format="TIFF")
    new = slide.copy()
    new.uns["he2st"] = copy.deepcopy(dict(slide.uns["he2st"]))
    new.uns["he2st"]["image_path"] = str(out)
    return new
