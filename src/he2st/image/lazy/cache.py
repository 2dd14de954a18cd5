"""Byte-bounded caches of decoded pixels.

Two uses: decoded JPEG/PNG images of this process (formats without random
access, decoded once; ``HE2ST_IMAGE_CACHE_MB``, default 512) and the decoded
tiles of each open TIFF (``HE2ST_TILE_CACHE_MB``, default 128), so neighbouring
spots do not decode the same tile twice.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np


class ByteLRU:
    """A thread-safe LRU bounded by the total ``nbytes`` of its numpy values.

    Parameters
    ----------
    max_bytes
        Capacity; a value larger than this is handed back but not kept.

    Attributes
    ----------
    hits, misses
        Lookup counts (for tests and benchmarks).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._d: OrderedDict[Any, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> np.ndarray | None:
        """The value stored under ``key`` (now the most recent), or None."""
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: Any, value: np.ndarray) -> None:
        """Store ``value`` under ``key``, evicting the least recent entries to fit.

        Parameters
        ----------
        key
            Any hashable key.
        value
            The array; ignored when it alone exceeds the capacity.
        """
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
        """Drop every entry."""
        with self._lock:
            self._d.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Total bytes held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._d)


def _env_megabytes(name: str, default: float) -> int:
    """``$name`` in MiB as bytes, ``default`` when unset or not a number."""
    try:
        mb = float(os.environ.get(name, str(default)))
    except ValueError:
        mb = default
    return int(mb * 2**20)


def decoded_cache_bytes() -> int:
    """Capacity of the per-process cache of decoded JPEG/PNG images (``HE2ST_IMAGE_CACHE_MB``)."""
    return _env_megabytes("HE2ST_IMAGE_CACHE_MB", 512)


def tile_cache_bytes() -> int:
    """Capacity of each open TIFF's cache of decoded tiles (``HE2ST_TILE_CACHE_MB``)."""
    return _env_megabytes("HE2ST_TILE_CACHE_MB", 128)


#: Decoded Pillow images of this process, keyed by (path, size, mtime).
DECODED = ByteLRU(decoded_cache_bytes())
#: Count of full decodes of Pillow images (tests use it to check the LRU works).
DECODE_COUNT = {"n": 0}


def clear_image_cache() -> None:
    """Drop every decoded JPEG/PNG kept by this process."""
    DECODED.clear()


def file_key(path: Path) -> tuple[str, int, int]:
    """Key of a file's decoded pixels: resolved path, size and mtime (an edited file misses)."""
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)
