"""The on-disk feature cache: the settings that key it, its file layout and its IO.

Layout: ``default_cache_dir()/"features"/<encoder>/<key>.npy`` (float32,
``(n_spots, dim)``) and ``.../tokens/<encoder>/<key>.npy`` (float16,
``(n_spots, T, D)``), each with a JSON sidecar of its settings. The key hashes the
slide's content (the patch cache key: image file sha256, spot coordinates and
ids, patch size, resampling) with the encoder name, the weights' sha256 (or the
seed of a random init), stain normalisation (``StainNormalizer.cache_key()``),
test-time augmentation and numeric precision. Files are written atomically.

A large slide's entry is filled chunk by chunk (:class:`PartialCache`):
``<key>.partial.npy`` (the final array, its rows written as chunks finish) and
``<key>.partial.json`` (how many rows are done, rewritten atomically after each
chunk), so a killed extraction resumes from its last finished chunk. When every
row is done the partial file becomes ``<key>.npy`` (the same bytes
:func:`write_cache` writes) and its sidecar is written.

Keys must stay stable across releases: a changed key silently invalidates every
user's cache. Bump :data:`FEATURES_VERSION` only when feature values change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from he2st._utils import atomic_path, atomic_write_json, default_cache_dir, preallocate, sha256_arrays
from he2st.errors import He2stInputError

#: Bump when extraction changes in a way that changes feature values.
FEATURES_VERSION = 1


def feature_settings(
    enc: Any,
    weights: Any,
    patch_px: int,
    target_mpp: float | None,
    tta: bool,
    stain: Any,
    precision: str,
    seed: int,
) -> dict[str, Any]:
    """What determines the features, as JSON/h5ad-safe values (no None): the cache key's content.

    Parameters
    ----------
    enc
        A registry name or a built :class:`~he2st.encoders.Encoder` (identified by
        its current tensors, see :func:`state_id`).
    weights
        For a name: None, a checkpoint path or a named set (see :func:`~he2st.encoders.get_features`).
    patch_px
        Side of the patch cut around each spot, in image pixels.
    target_mpp
        Resampling of the patches in microns per pixel, or None.
    tta
        Test-time augmentation on.
    stain
        A fitted :class:`~he2st.image.stain.StainNormalizer` or None.
    precision
        The resolved precision, ``"fp32"`` or ``"bf16"``.
    seed
        Seed of a random initialisation (used when ``weights`` is None).

    Returns
    -------
    dict
        Settings, recorded in ``uns`` and in the cache's JSON sidecars.

    Raises
    ------
    He2stInputError
        ``stain`` is not a fitted normaliser.
    """
    from he2st.encoders._base import Encoder, get_spec, weights_id

    if stain is not None and not hasattr(stain, "cache_key"):
        raise He2stInputError(
            f"stain must be a fitted he2st.image.stain.StainNormalizer (with cache_key()), got {type(stain).__name__}"
        )
    s: dict[str, Any] = {
        "version": FEATURES_VERSION,
        "patch_px": int(patch_px),
        "target_mpp": "none" if target_mpp is None else float(target_mpp),
        "tta": bool(tta),
        "stain": "none" if stain is None else str(stain.cache_key()),
        "precision": precision,
    }
    if isinstance(enc, Encoder):
        i = enc.info
        s.update(
            encoder=i.name, weights=state_id(enc), arch=i.arch, input_size=int(i.input_size),
            mean=[float(v) for v in i.mean], std=[float(v) for v in i.std], dim=int(i.dim),
        )
    else:
        spec = get_spec(enc)
        s.update(encoder=spec.name, weights=weights_id(spec.name, weights, seed), dim=int(spec.dim))
    return s


_STATE_MEMO: Any = None


def state_id(module: Any) -> str:
    """sha256 of a module's current parameters and buffers, memoised until any of them changes.

    A built encoder may have been fine-tuned or loaded since it was created, so its
    ``info.weights_id`` cannot identify its features; its actual tensors do. The
    digest is recomputed only when a tensor's version counter moves (every in-place
    update, e.g. an optimiser step or ``load_state_dict``, bumps it).
    """
    import hashlib
    import weakref

    import torch

    global _STATE_MEMO
    if _STATE_MEMO is None:
        _STATE_MEMO = weakref.WeakKeyDictionary()
    tensors = list(module.state_dict(keep_vars=True).items())
    versions = tuple(t._version for _, t in tensors)
    hit = _STATE_MEMO.get(module)
    if hit is not None and hit[0] == versions and hit[1] == [k for k, _ in tensors]:
        return hit[2]
    h = hashlib.sha256()
    for k, t in tensors:
        a = t.detach().to("cpu").contiguous()
        h.update(f"{k}|{a.dtype}|{tuple(a.shape)}".encode())
        h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    digest = "state-" + h.hexdigest()
    _STATE_MEMO[module] = (versions, [k for k, _ in tensors], digest)
    return digest


def slide_content_key(slide: Any, patch_px: int, target_mpp: float | None) -> str:
    """Key of what a slide's patches depend on: the patch cache key.

    Parameters
    ----------
    slide
        A slide AnnData with an image.
    patch_px
        Patch side in image pixels.
    target_mpp
        Resampling in microns per pixel, or None.

    Returns
    -------
    str
        :meth:`he2st.image.PatchCache.key` of the slide's patches.
    """
    # The patch cache key already hashes what the patches depend on (image bytes,
    # spot centres and ids, patch size, resampling), with a memoised file hash.
    from he2st.image import PatchCache

    return PatchCache().key(slide, patch_px, target_mpp)


def cache_path(settings: dict[str, Any], slide_key: str, tokens: bool) -> Path:
    """The cache file of a slide's features (or tokens) under given settings.

    Parameters
    ----------
    settings
        From :func:`feature_settings`.
    slide_key
        From :func:`slide_content_key`.
    tokens
        Token outputs (under ``tokens/``) rather than pooled features.

    Returns
    -------
    pathlib.Path
        ``default_cache_dir()/"features"[/"tokens"]/<encoder>/<key>.npy``.
    """
    key = sha256_arrays(slide_key, json.dumps(settings, sort_keys=True))
    root = default_cache_dir() / "features"
    sub = root / "tokens" / settings["encoder"] if tokens else root / settings["encoder"]
    return sub / f"{key}.npy"


def read_cache(path: Path, n: int, mmap: bool = False) -> np.ndarray | None:
    """A cached array, or None when it is missing, incomplete, damaged or of the wrong length.

    Parameters
    ----------
    path
        From :func:`cache_path`.
    n
        Expected number of rows (spots).
    mmap
        Return a read-only memory map instead of loading the file.

    Returns
    -------
    numpy.ndarray or None
        The cached features or tokens; None means recompute.
    """
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        return None
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError):
        return None  # damaged: recompute, never trust
    return arr if arr.shape[0] == n else None


def write_cache(path: Path, arr: np.ndarray, settings: dict[str, Any], slide: Any) -> None:
    """Write an array and its JSON sidecar atomically, the sidecar last.

    Parameters
    ----------
    path
        From :func:`cache_path`.
    arr
        Features or tokens of every spot.
    settings
        From :func:`feature_settings`; stored in the sidecar with the slide id, shape and dtype.
    slide
        The slide the array belongs to.
    """
    from he2st.data.slide import meta

    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, arr)
    _write_sidecar(path, settings, meta(slide).slide_id, arr.shape, arr.dtype)


def _write_sidecar(path: Path, settings: dict[str, Any], slide_id: str, shape: tuple[int, ...], dtype: Any) -> None:
    # The sidecar is written last: an entry without it is incomplete and ignored.
    atomic_write_json(
        path.with_suffix(".json"),
        {**settings, "slide_id": slide_id, "shape": list(shape), "dtype": str(np.dtype(dtype))},
    )


def _same_json(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class entry_lock:
    """Exclusive lock of one cache entry across processes (``<key>.lock``, ``fcntl.flock``), blocking.

    Two processes streaming the same slide would otherwise fill the same partial
    file; the second waits, then finds the finished entry. The empty lock file
    stays (removing it would race with a waiter). Without ``fcntl`` (Windows)
    nothing is locked.

    Parameters
    ----------
    path
        The entry's final file, from :func:`cache_path`.
    """

    def __init__(self, path: Path) -> None:
        self.lock = Path(path).with_suffix(".lock")
        self._fd: int | None = None

    def __enter__(self) -> entry_lock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


class PartialCache:
    """A cache entry being filled chunk by chunk, resumable after a kill.

    Two files next to the entry's ``<key>.npy``: ``<key>.partial.npy``, the final
    array (a memory-mapped ``.npy`` whose disk blocks are reserved when it is
    created), and ``<key>.partial.json``, the progress: rows ``[0, done)`` are
    final. The progress file is rewritten atomically after the rows it counts are
    flushed to disk, so it never counts a row that is not there. A partial entry
    that does not match (other settings, spot count, shape or dtype; unreadable or
    missing files) is deleted and started again, never trusted.

    Parameters
    ----------
    path
        The entry's final file, from :func:`cache_path`.
    n
        Number of rows (spots) of the slide.
    settings
        From :func:`feature_settings`; must match the progress file's to resume.

    Attributes
    ----------
    done
        Rows already final (0 for a fresh start).
    array
        The memory-mapped partial array, or None until the first chunk allocates it.
    resumed
        True when an earlier run's rows were kept.
    """

    def __init__(self, path: Path, n: int, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.n = int(n)
        self.settings = settings
        self.npy = self.path.with_name(self.path.stem + ".partial.npy")
        self.progress = self.path.with_name(self.path.stem + ".partial.json")
        self.array: np.ndarray | None = None
        self.done = 0
        self.resumed = False
        self._resume()

    def __repr__(self) -> str:
        return f"PartialCache({str(self.npy)!r}, done={self.done}/{self.n})"

    def _resume(self) -> None:
        if not self.progress.is_file():
            self.discard()
            return
        try:
            info = json.loads(self.progress.read_text())
            arr = np.load(self.npy, mmap_mode="r+")
            done = int(info["done"])
            ok = (
                _same_json(info["settings"], self.settings)
                and int(info["n"]) == self.n
                and list(arr.shape) == list(info["shape"])
                and arr.shape[0] == self.n
                and str(arr.dtype) == info["dtype"]
                and 0 < done <= self.n
            )
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            ok = False
        if not ok:
            self.discard()
            return
        self.array, self.done, self.resumed = arr, done, True

    def allocate(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """Create the partial array (rows of ``shape[0] == n``), reserving its disk blocks.

        Parameters
        ----------
        shape
            Shape of the final array.
        dtype
            Its dtype.

        Returns
        -------
        numpy.ndarray
            The writable memory map (also :attr:`array`).
        """
        from he2st._utils import _raise_if_disk_full

        if shape[0] != self.n:
            raise He2stInputError(f"partial cache {self.npy.name}: {shape[0]} rows for {self.n} spots")
        self.discard()
        self.npy.parent.mkdir(parents=True, exist_ok=True)
        try:
            arr = np.lib.format.open_memmap(self.npy, mode="w+", dtype=dtype, shape=tuple(shape))
            preallocate(self.npy)  # a full disk: ENOSPC here, not SIGBUS at a later write
        except OSError as exc:
            self.npy.unlink(missing_ok=True)
            _raise_if_disk_full(exc, self.npy)
            raise
        self.array, self.done = arr, 0
        return arr

    def commit(self, done: int) -> None:
        """Record rows ``[0, done)`` as final: flush them, then rewrite the progress file.

        Parameters
        ----------
        done
            Rows final so far.
        """
        if self.array is None:
            raise He2stInputError(f"partial cache {self.npy.name}: nothing allocated")
        self.array.flush()
        atomic_write_json(
            self.progress,
            {"settings": self.settings, "n": self.n, "done": int(done), "shape": list(self.array.shape),
             "dtype": str(self.array.dtype)},
        )
        self.done = int(done)

    def finish(self, slide_id: str) -> None:
        """Turn the complete partial array into the cache entry (file, then sidecar) and drop the progress.

        Parameters
        ----------
        slide_id
            Recorded in the entry's sidecar.
        """
        if self.array is None or self.done != self.n:
            raise He2stInputError(f"partial cache {self.npy.name}: {self.done} of {self.n} rows done")
        shape, dtype = self.array.shape, self.array.dtype
        self.array.flush()
        self.array = None
        os.replace(self.npy, self.path)
        _write_sidecar(self.path, self.settings, slide_id, shape, dtype)
        self.progress.unlink(missing_ok=True)

    def discard(self) -> None:
        """Delete the partial files (progress first, so a half-deleted entry is never resumed)."""
        self.array = None
        self.done = 0
        self.resumed = False
        self.progress.unlink(missing_ok=True)
        self.npy.unlink(missing_ok=True)
