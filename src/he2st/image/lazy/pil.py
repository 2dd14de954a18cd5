"""Pillow backend (JPEG, PNG, BMP, ...): no random access, so decode once per process and cache.

Decoded images live in a byte-bounded LRU (``HE2ST_IMAGE_CACHE_MB``, default
512: one 10k x 10k RGB image; the oldest entries are evicted *before* a new
decode). An image larger than that LRU is decoded once into a raw array on disk
(``<HE2ST_CACHE>/decoded/``, keyed by path, size and mtime, written atomically)
and read through a memory map, so each patch costs a slice, not a full decode.
Plain JPEGs decode straight into one numpy buffer (or that disk array) with
imagecodecs, and thumbnails of JPEGs use Pillow's DCT-domain downscaling
(``draft``), never decoding the full image.

Safety: a non-tiled image declaring more than ``HE2ST_MAX_DECODED_PIXELS``
pixels is refused before any decode (decompression bombs), and a truncated or
corrupt file is refused rather than padded with grey, unless
``HE2ST_ALLOW_TRUNCATED_IMAGES=1`` (then it loads with a warning).
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from he2st.errors import ImageError
from he2st.image.lazy.base import Backend
from he2st.image.lazy.cache import DECODE_COUNT, DECODED, file_key
from he2st.image.lazy.formats import check_decoded_size, pil_open
from he2st.image.lazy.pixels import PixelSpec, make_spec, to_rgb8

#: Pillow's switch for truncated files is process-wide: flip it only under this lock.
_TRUNCATED_LOCK = threading.Lock()


def allow_truncated_images() -> bool:
    """Whether ``HE2ST_ALLOW_TRUNCATED_IMAGES`` opts in to loading truncated images (with a warning)."""
    return os.environ.get("HE2ST_ALLOW_TRUNCATED_IMAGES", "") not in ("", "0")


def _jpeg_complete(data: bytes) -> bool:
    """Whether JPEG bytes end with the end-of-image marker (libjpeg pads a truncated scan with grey)."""
    return data.rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9"


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
        Not an image Pillow can open, an unsupported mode, or more pixels than
        ``HE2ST_MAX_DECODED_PIXELS`` (checked from the header, before any decode).
    """

    def __init__(self, path: Path) -> None:
        from PIL import UnidentifiedImageError

        self.path = path
        self._disk: np.ndarray | None = None
        try:
            with pil_open(path) as im:
                self.mode = im.mode
                self.format = im.format
                w, h = im.size
                has_transparency = "transparency" in im.info
                self._n_frames = getattr(im, "n_frames", 1)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageError(
                f"{str(path)!r} is not an image (expected JPEG, PNG, TIFF or a whole-slide format): {exc}"
            ) from exc
        check_decoded_size(path, int(w), int(h))
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

    def _to_array(self, im: Any) -> np.ndarray:
        try:
            if self._pil_convert:
                im = im.convert(self._pil_convert)
            return to_rgb8(np.asarray(im), self.spec)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(
                f"cannot decode image {str(self.path)!r}: it is truncated or corrupt ({exc}). he2st refuses it "
                "rather than fill the missing part with grey; copy the file again, or set "
                "HE2ST_ALLOW_TRUNCATED_IMAGES=1 to load what is there"
            ) from exc

    def _decode_pillow(self, draft_size: tuple[int, int] | None = None) -> np.ndarray:
        """Decode with Pillow (at ``draft_size`` for a JPEG thumbnail); truncated files per the opt-in."""
        from PIL import ImageFile

        try:
            with pil_open(self.path) as im:
                if draft_size is not None:
                    im.draft(im.mode, draft_size)
                return self._to_array(im)
        except ImageError:
            if not allow_truncated_images():
                raise
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"cannot open image {str(self.path)!r}: {exc}") from exc
        warnings.warn(
            f"image {str(self.path)!r} is truncated or corrupt; loading it anyway because "
            "HE2ST_ALLOW_TRUNCATED_IMAGES is set: the missing part is filled with grey, and patches there are not tissue",
            UserWarning,
            stacklevel=4,
        )
        with _TRUNCATED_LOCK:
            saved = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = True
            try:
                with pil_open(self.path) as im:
                    if draft_size is not None:
                        im.draft(im.mode, draft_size)
                    return self._to_array(im)
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = saved

    def _decode(self, out: np.ndarray | None = None) -> np.ndarray:
        """The whole image as uint8 RGB, decoded now (into ``out`` when given)."""
        arr = self._decode_jpeg_direct(out)
        if arr is None:
            arr = self._decode_pillow()
            if out is not None:
                out[...] = arr
                arr = out
        DECODE_COUNT["n"] += 1
        return arr

    def decoded(self) -> np.ndarray:
        """The whole image as uint8 RGB, from the per-process LRU or decoded now.

        An image larger than the LRU would be decoded again for every read: it
        is decoded once into a memory-mapped array on disk instead
        (:meth:`_disk_array`).
        """
        w, h = self.level_dims[0]
        if w * h * 3 > DECODED.max_bytes:
            if self._disk is None:
                self._disk = self._disk_array()
            return self._disk
        key = file_key(self.path)
        arr = DECODED.get(key)
        if arr is None:
            DECODED.make_room(w * h * 3)  # drop older images first: peak memory = one image
            arr = self._decode()
            arr.setflags(write=False)
            DECODED.put(key, arr)
        return arr

    def _disk_array(self) -> np.ndarray:
        """The decoded image as a read-only memory map of ``<cache>/decoded/<key>.npy``, written once."""
        from he2st._utils import atomic_path, default_cache_dir, preallocate

        w, h = self.level_dims[0]
        digest = hashlib.sha256(repr(file_key(self.path)).encode()).hexdigest()[:32]
        target = default_cache_dir() / "decoded" / f"{digest}.npy"
        if target.is_file():
            try:
                arr = np.load(target, mmap_mode="r")
                if arr.shape == (h, w, 3) and arr.dtype == np.uint8:
                    return arr
            except (OSError, ValueError):
                pass  # damaged: decode again
        with atomic_path(target, suffix=".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(h, w, 3))
            preallocate(tmp)  # a full disk fails here with ENOSPC, not later as SIGBUS in the memmap
            self._decode(out)
            out.flush()
            del out
        return np.load(target, mmap_mode="r")

    def _decode_jpeg_direct(self, out: np.ndarray | None = None) -> np.ndarray | None:
        """Decode a plain RGB/gray JPEG straight into one numpy buffer with imagecodecs (libjpeg-turbo).

        Pillow's route (decode, then ``np.asarray`` through ``tobytes``) holds
        three copies of the image at its peak (~0.8 GB for a 9.3k x 9.9k her2st
        JPEG); this holds one. Returns None for other formats/modes, or when
        imagecodecs cannot decode the file (e.g. arithmetic coding), in which
        case Pillow decodes it -- the same pixels from another libjpeg build.
        """
        if self.format != "JPEG" or self.mode not in ("RGB", "L"):
            return None
        data = self.path.read_bytes()
        if not _jpeg_complete(data):
            return None  # Pillow refuses a truncated file (or loads it, warning, on opt-in)
        direct = out is not None and self.mode == "RGB"
        try:
            import imagecodecs

            arr = imagecodecs.jpeg8_decode(data, out=out if direct else None)
        except Exception:  # noqa: BLE001 - any decoder failure: let Pillow try (and report)
            return None
        if arr.dtype != np.uint8 or arr.shape[:2] != self.level_dims[0][::-1]:
            return None
        if direct:
            return arr
        rgb = to_rgb8(arr, self.spec)
        if out is not None:
            out[...] = rgb
            return out
        return rgb

    def is_decoded(self) -> bool:
        """Whether a read costs no decode: the image is in this process's cache or mapped from disk."""
        return self._disk is not None or DECODED.get(file_key(self.path)) is not None

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
        return self._decode_pillow((max(1, int(w * scale)), max(1, int(h * scale))))
