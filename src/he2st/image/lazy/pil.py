"""Pillow backend (JPEG, PNG, BMP, ...): no random access, so decode once per process and cache.

Decoded images live in a byte-bounded LRU (``HE2ST_IMAGE_CACHE_MB``, default
512: one 10k x 10k RGB image; the oldest entries are evicted *before* a new
decode). Plain JPEGs decode straight into one numpy buffer with imagecodecs, and
thumbnails of JPEGs use Pillow's DCT-domain downscaling (``draft``), never
decoding the full image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from he2st.errors import ImageError
from he2st.image.lazy.base import Backend
from he2st.image.lazy.cache import DECODE_COUNT, DECODED, file_key
from he2st.image.lazy.pixels import PixelSpec, make_spec, to_rgb8


_PIL_MODES_8BIT = {"RGB": 3, "L": 1, "LA": 2, "RGBA": 4, "RGBa": 4, "La": 2}


class PilBackend(Backend):
    """Pillow-decoded images (JPEG, PNG, BMP, ...): no random access, so decode once and cache.

    Opening reads the header only; the first read decodes the whole image.

    Parameters
    ----------
    path
        The image file.

    Raises
    ------
    ImageError
        Not an image Pillow can open, or an unsupported mode.
    """

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
        key = file_key(self.path)
        arr = DECODED.get(key)
        if arr is None:
            w, h = self.level_dims[0]
            DECODED.make_room(w * h * 3)  # drop older images first: peak memory = one image
            arr = self._decode_jpeg_direct()
            if arr is None:
                with self._open() as im:
                    arr = self._to_array(im)
            arr.setflags(write=False)
            DECODE_COUNT["n"] += 1
            DECODED.put(key, arr)
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
        """Whether the decoded image is in this process's cache (a read costs no decode)."""
        return DECODED.get(file_key(self.path)) is not None

    def read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """A read-only view of a rectangle of the decoded (already RGB) image.

        Parameters
        ----------
        level
            Always 0: these formats have no pyramid.
        x0, y0, x1, y1
            An in-bounds rectangle in full-resolution pixels (see :meth:`Backend.read`).

        Returns
        -------
        numpy.ndarray
            ``uint8 (h, w, 3)``, a view into the cached image.
        """
        return self.decoded()[y0:y1, x0:x1]

    def read_rgb(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """A writable copy of a rectangle; the cache converted to RGB once, at decode.

        Parameters
        ----------
        level
            Always 0.
        x0, y0, x1, y1
            An in-bounds rectangle in full-resolution pixels.

        Returns
        -------
        numpy.ndarray
            ``uint8 (h, w, 3)``, owned by the caller.
        """
        return self.decoded()[y0:y1, x0:x1].copy()

    def draft_thumbnail(self, max_side: int) -> np.ndarray | None:
        """A JPEG decoded at 1/2..1/8 scale in the DCT domain, or None for other formats.

        Parameters
        ----------
        max_side
            The longer side wanted; Pillow picks the smallest DCT scale at least this large.

        Returns
        -------
        numpy.ndarray or None
            ``uint8 (h, w, 3)``, or None when the file is not a JPEG.
        """
        if self.format != "JPEG":
            return None
        w, h = self.level_dims[0]
        scale = max_side / max(w, h)
        with self._open() as im:
            im.draft(im.mode, (max(1, int(w * scale)), max(1, int(h * scale))))
            return self._to_array(im)
