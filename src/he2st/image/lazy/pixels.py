"""Pixel-format conversion: any supported raw layout to ``uint8 (h, w, 3)`` RGB.

Backends describe their raw pixels with a :class:`PixelSpec` (built by
:func:`make_spec`, which also records a human-readable note per conversion) and
:func:`to_rgb8` applies it. :func:`resize` is the antialiased resize used for
thumbnails and resampled patches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from he2st.errors import ImageError


class ImageConversionWarning(UserWarning):
    """An image was not 8-bit RGB and was converted; the message says how."""


@dataclass(frozen=True)
class PixelSpec:
    """How to turn a backend's raw pixels into uint8 RGB.

    Parameters
    ----------
    channels
        1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA).
    dtype
        Numpy dtype of the raw pixels.
    scale_max
        For integer data wider than 8 bits: the value mapped to 255.
    alpha
        ``"none"``, ``"straight"`` (unassociated) or ``"premultiplied"``.
    invert
        Photometric "min-is-white" grayscale: flip the values after scaling.
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
    """Build a :class:`PixelSpec` and the notes describing each conversion.

    Parameters
    ----------
    channels
        Samples per pixel: 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA).
    dtype
        Numpy dtype (or anything :class:`numpy.dtype` accepts) of the raw pixels.
    alpha
        ``"none"``, ``"straight"`` or ``"premultiplied"``; None infers ``"straight"``
        for 2 and 4 channels and ``"none"`` otherwise.
    invert
        The image is "min-is-white" grayscale and must be inverted.
    scale_max
        For integers wider than 8 bits, the value mapped to 255 (default: the
        dtype's maximum).
    warn_alpha
        Record a note (hence a warning) when an alpha channel is composited; off
        for readers whose API always adds alpha (OpenSlide).
    path
        The image file, named in error messages.

    Returns
    -------
    PixelSpec
        The conversion, with one note per lossy or non-obvious step.

    Raises
    ------
    ImageError
        Unsupported channel count or pixel type.
    """
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
    """Convert raw pixels ``(h, w[, c])`` to ``uint8 (h, w, 3)`` following ``spec``.

    Parameters
    ----------
    arr
        Raw pixels as a backend read them.
    spec
        How to scale, invert and composite them (see :func:`make_spec`).

    Returns
    -------
    numpy.ndarray
        C-contiguous ``uint8 (h, w, 3)`` RGB; alpha is composited on white.
    """
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


def resize(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    """Antialiased (Lanczos) resize of ``uint8 (H, W, 3)`` to ``(h, w, 3)``.

    Parameters
    ----------
    arr
        The image, ``uint8 (H, W, 3)``.
    w, h
        Output width and height in pixels.

    Returns
    -------
    numpy.ndarray
        ``uint8 (h, w, 3)``; ``arr`` itself (made contiguous) when the size already matches.
    """
    from PIL import Image

    if arr.shape[1] == w and arr.shape[0] == h:
        return np.ascontiguousarray(arr)
    # reducing_gap: box-reduce by an integer factor first when shrinking a lot (fast, still antialiased).
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(arr)).resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    )
