"""File-format detection and header-only size reads.

Kept free of heavy imports so that :func:`image_size` is cheap: it reads the
header of a file (PIL for JPEG/PNG, tifffile for TIFF, OpenSlide for vendor
whole-slide formats) and never decodes pixels.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from he2st.errors import ImageError

#: Extensions handled by OpenSlide (vendor whole-slide formats). Plain ``.tif``
#: files go to tifffile even when OpenSlide could read them: tifffile's segment
#: reads give tile-level random access without a native dependency.
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
    from PIL import UnidentifiedImageError

    try:
        with pil_open(p) as im:
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


#: Default of ``HE2ST_MAX_DECODED_PIXELS``: the most pixels he2st decodes from a
#: non-tiled image (JPEG, PNG, ...), which has to be decoded whole. 2.5e9 pixels
#: is a 50k x 50k image, 7.5 GB as RGB: larger than any whole-slide JPEG seen in
#: public ST data (her2st: ~10k x 10k), smaller than what a crafted header can
#: declare (a 14 KB PNG can declare 100k x 100k, 30 GB).
DEFAULT_MAX_DECODED_PIXELS = 2_500_000_000

_PIL_GUARD_LOCK = threading.Lock()


def max_decoded_pixels() -> int:
    """The most pixels a non-tiled image may declare: ``$HE2ST_MAX_DECODED_PIXELS`` or 2.5e9.

    Returns
    -------
    int
        The limit in pixels (width x height).

    Raises
    ------
    ImageError
        The variable is set to something that is not a positive number.
    """
    raw = os.environ.get("HE2ST_MAX_DECODED_PIXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_DECODED_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value <= 0:
        raise ImageError(f"HE2ST_MAX_DECODED_PIXELS={raw!r}: expected a positive number of pixels, e.g. 4e9")
    return value


def check_decoded_size(path: Path, width: int, height: int) -> None:
    """Refuse a non-tiled image whose declared size exceeds :func:`max_decoded_pixels`.

    Parameters
    ----------
    path
        The image file, named in the message.
    width, height
        The size its header declares.

    Raises
    ------
    ImageError
        The image would decode to more pixels than the limit (a decompression
        bomb, or a slide to convert to a tiled TIFF).
    """
    limit = max_decoded_pixels()
    if width * height > limit:
        raise ImageError(
            f"{str(path)!r} declares {width} x {height} = {width * height:,} pixels; he2st decodes at most "
            f"{limit:,} pixels from a non-tiled image (JPEG, PNG, ...), which must be decoded whole. "
            "If the image is genuine, convert it to a tiled pyramidal TIFF (read lazily, no limit) or raise "
            "the limit with HE2ST_MAX_DECODED_PIXELS=<pixels>"
        )


@contextlib.contextmanager
def pil_open(path: Path) -> Iterator[Any]:
    """``PIL.Image.open(path)`` with Pillow's decompression-bomb guard lifted for the open only.

    Whole-slide JPEGs (~10k x 10k) exceed Pillow's guard (89 M pixels), so he2st
    opens them with the guard lifted -- under a lock, restored at once, never for
    the whole process -- and checks the declared size itself
    (:func:`check_decoded_size`) before decoding.

    Parameters
    ----------
    path
        The image file.

    Yields
    ------
    PIL.Image.Image
        The opened (not yet decoded) image; closed on exit.
    """
    from PIL import Image

    with _PIL_GUARD_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with im:
        yield im
