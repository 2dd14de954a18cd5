"""File-format detection and header-only size reads.

Kept free of heavy imports so that :func:`image_size` is cheap: it reads the
header of a file (PIL for JPEG/PNG, tifffile for TIFF, OpenSlide for vendor
whole-slide formats) and never decodes pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

from he2st.errors import ImageError

#: Extensions handled by OpenSlide (vendor whole-slide formats). Plain ``.tif``
#: files go to tifffile even when OpenSlide could read them: tifffile + zarr
#: gives tile-level random access without a native dependency.
OPENSLIDE_EXTS = frozenset({".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide"})
TIFF_EXTS = frozenset({".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf8", ".qptiff"})

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def check_file(path: str | os.PathLike) -> Path:
    """Return ``path`` as a :class:`Path`, raising :class:`ImageError` when it is not a readable file.

    Parameters
    ----------
    path
        The image file.

    Returns
    -------
    pathlib.Path
        ``path``, checked to be an existing regular file.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"image file {str(p)!r} does not exist")
    if not p.is_file():
        raise ImageError(f"image path {str(p)!r} is not a file (expected an H&E image: TIFF, JPEG, PNG, SVS, ...)")
    return p


def detect_format(path: Path) -> str:
    """``"tiff"``, ``"openslide"`` or ``"pil"``, from the extension and the file's magic bytes.

    The magic bytes win over the extension for TIFF, so that a TIFF named ``.jpg``
    (or a ``.tif`` that is really a JPEG) still opens with the right reader.
    """
    suffix = path.suffix.lower()
    if suffix in OPENSLIDE_EXTS:
        return "openslide"
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ImageError(f"cannot read image file {str(path)!r}: {exc}") from exc
    if head in _TIFF_MAGIC:
        return "tiff"
    return "pil"


def openslide_module():  # noqa: ANN201 - optional dependency
    """Import OpenSlide or raise a clear :class:`ImageError` naming the extra to install."""
    try:
        import openslide
    except (ImportError, OSError) as exc:  # OSError: the native library is missing
        raise ImageError(
            "reading vendor whole-slide formats (.svs, .ndpi, .mrxs, ...) needs OpenSlide: "
            "pip install 'he2st[openslide]' (openslide-python and openslide-bin)"
            f" [{type(exc).__name__}: {exc}]"
        ) from exc
    return openslide


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Width and height (level 0) of an image, read from its header only.

    Parameters
    ----------
    path
        A JPEG/PNG (read with Pillow), a TIFF or pyramidal TIFF (tifffile), or a
        vendor whole-slide file (OpenSlide, optional).

    Returns
    -------
    tuple of int
        ``(width, height)`` in pixels of the full-resolution level.

    Raises
    ------
    ImageError
        The file is missing or is not an image.
    """
    p = check_file(path)
    fmt = detect_format(p)
    if fmt == "openslide":
        openslide = openslide_module()
        try:
            with openslide.OpenSlide(str(p)) as s:
                w, h = s.dimensions
        except Exception as exc:  # openslide raises its own error types
            raise ImageError(f"{str(p)!r} is not a readable whole-slide image: {exc}") from exc
        return int(w), int(h)
    if fmt == "tiff":
        import tifffile

        try:
            with tifffile.TiffFile(p) as tf:
                page = tf.series[0].levels[0] if tf.series else tf.pages[0]
                shape, axes = page.shape, page.axes
        except Exception as exc:
            raise ImageError(f"{str(p)!r} is not a readable TIFF image: {exc}") from exc
        return tiff_width_height(shape, axes, p)
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # whole-slide JPEGs exceed Pillow's bomb guard
    try:
        with Image.open(p) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{str(p)!r} is not an image (expected JPEG, PNG, TIFF or a whole-slide format): {exc}") from exc
    return int(w), int(h)


def tiff_width_height(shape: tuple[int, ...], axes: str, path: Path) -> tuple[int, int]:
    """Width and height from a tifffile series shape and its axes string.

    Parameters
    ----------
    shape
        The series (or level) shape.
    axes
        tifffile's axes string of the same, e.g. ``"YXS"``.
    path
        The file, named in the error message.

    Returns
    -------
    tuple of int
        ``(width, height)``.

    Raises
    ------
    ImageError
        The axes have no X or no Y.
    """
    if "X" not in axes or "Y" not in axes:
        raise ImageError(f"{str(path)!r}: TIFF series has axes {axes!r}; expected a 2-D image with X and Y")
    return int(shape[axes.index("X")]), int(shape[axes.index("Y")])
