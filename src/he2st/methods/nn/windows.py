"""Square windows over a slide, for slide-level models on large slides.

HisToGene and Hist2ST see every spot of a slide at once; on Visium slides of
thousands of spots their published code runs out of memory. The benchmark of
Jiang et al. (seed paper 002) cut each image into non-overlapping
4000 x 4000 px windows and treated every window as one training sample. This
module does the same for training (:func:`training_windows`, a partition: each
spot in exactly one window) and, for prediction, lays overlapping windows
(:func:`prediction_windows`) whose outputs are blended with tapered weights
(:func:`blend`): a spot near one window's border, where it lacks context, is
predicted mostly by a window in which it sits near the centre. The weights of
every spot sum to 1, and every spot is covered.

Coordinates are the spot centres in full-resolution pixels
(``slide.obsm["spatial"]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from he2st.errors import He2stInputError

__all__ = ["Window", "blend", "prediction_windows", "training_windows", "use_windows"]

# Smallest taper weight, so that a spot covered by a single window (at the
# slide's border) still gets a positive weight before normalisation.
_MIN_TAPER = 1e-3


@dataclass(frozen=True)
class Window:
    """Spots of one window and their blending weights.

    Parameters
    ----------
    index
        int64 indices of the window's spots in the slide.
    weight
        float64 blending weight of each of those spots; over all windows a
        spot's weights sum to 1.
    origin
        ``(x, y)`` pixel of the window's top-left corner.
    """

    index: np.ndarray
    weight: np.ndarray
    origin: tuple[float, float]


def use_windows(n_spots: int, window_px: float | None, min_spots: int) -> bool:
    """Whether a slide of ``n_spots`` is cut into windows.

    ``window_px=None`` never windows; otherwise slides with more than
    ``min_spots`` spots are windowed.

    Parameters
    ----------
    n_spots
        Spots of the slide.
    window_px
        Window side in pixels, or None (never window).
    min_spots
        Slides with at most this many spots are kept whole.

    Returns
    -------
    bool
        True when ``window_px`` is set and ``n_spots > min_spots``.
    """
    return window_px is not None and n_spots > min_spots


def _check(coords: np.ndarray, window_px: float) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise He2stInputError(f"window coordinates must be (n, 2) pixels, got shape {coords.shape}")
    if not np.isfinite(coords).all():
        raise He2stInputError("window coordinates contain NaN or inf")
    if not (window_px and window_px > 0):
        raise He2stInputError(f"window size must be a positive number of pixels, got {window_px}")
    return coords


def _origins(lo: float, hi: float, window: float, stride: float) -> np.ndarray:
    """Window starts along one axis so that ``[lo, hi]`` is covered by ``[a, a + window)``."""
    span = hi - lo
    # Strictly more than the span: a spot exactly on the last edge is inside.
    n = 1 if span < window else int(np.ceil((span - window) / stride + 1e-9)) + 1
    while lo + (n - 1) * stride + window <= hi:
        n += 1
    return lo + stride * np.arange(n)


def _tiles(coords: np.ndarray, window_px: float, stride_px: float) -> list[tuple[np.ndarray, tuple[float, float]]]:
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    xs = _origins(lo[0], hi[0], window_px, stride_px)
    ys = _origins(lo[1], hi[1], window_px, stride_px)
    # One boolean row mask per window row and column: memory O(n_spots),
    # time O(n_spots x n_windows), negligible next to a model step.
    out = []
    for y0 in ys:
        in_y = (coords[:, 1] >= y0) & (coords[:, 1] < y0 + window_px)
        if not in_y.any():
            continue
        for x0 in xs:
            inside = in_y & (coords[:, 0] >= x0) & (coords[:, 0] < x0 + window_px)
            if inside.any():
                out.append((np.flatnonzero(inside).astype(np.int64), (float(x0), float(y0))))
    return out


def training_windows(coords: np.ndarray, window_px: float) -> list[np.ndarray]:
    """Non-overlapping ``window_px`` squares; every spot lies in exactly one.

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres in pixels.
    window_px
        Window side in pixels (positive).

    Returns
    -------
    list of numpy.ndarray
        The int64 spot indices of each non-empty window (the benchmark paper's
        4000 x 4000 px training instances), row of windows by row; empty for
        an empty slide.
    """
    coords = _check(coords, window_px)
    if len(coords) == 0:
        return []
    return [idx for idx, _ in _tiles(coords, window_px, window_px)]


def _taper(coords: np.ndarray, origin: tuple[float, float], window_px: float) -> np.ndarray:
    t = (coords - np.asarray(origin)) / window_px  # in [0, 1)
    tri = 1.0 - np.abs(2.0 * t - 1.0)  # 0 at the borders, 1 at the centre
    return np.clip(tri, _MIN_TAPER, None).prod(axis=1)


def prediction_windows(coords: np.ndarray, window_px: float, overlap: float = 0.5) -> list[Window]:
    """Overlapping windows for prediction, with blending weights.

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres in pixels.
    window_px
        Window side in pixels.
    overlap
        Fraction of a window shared with the next one along each axis, in
        ``[0, 1)``; the stride is ``window_px * (1 - overlap)``. With 0.5 and
        the triangular taper the weights form a partition of unity inside the
        slide, so blending is smooth.

    Returns
    -------
    list of Window
        Every spot appears in at least one window and its weights sum to 1.
    """
    coords = _check(coords, window_px)
    if not 0.0 <= overlap < 1.0:
        raise He2stInputError(f"window overlap must be in [0, 1), got {overlap}")
    if len(coords) == 0:
        return []
    tiles = _tiles(coords, window_px, window_px * (1.0 - overlap))
    raw = [_taper(coords[idx], origin, window_px) for idx, origin in tiles]
    total = np.zeros(len(coords))
    for (idx, _), w in zip(tiles, raw, strict=True):
        np.add.at(total, idx, w)
    if (total <= 0).any():  # cannot happen: _origins covers every spot
        raise RuntimeError("prediction windows left spots uncovered")
    return [Window(idx, w / total[idx], origin) for (idx, origin), w in zip(tiles, raw, strict=True)]


def blend(n_spots: int, windows: Sequence[Window], predictions: Sequence[np.ndarray]) -> np.ndarray:
    """Weighted sum of per-window predictions into one ``(n_spots, ...)`` array.

    Parameters
    ----------
    n_spots
        Spots of the slide.
    windows
        The windows, as from :func:`prediction_windows`.
    predictions
        One array per window, ``(len(window.index), ...)``, in the order of
        ``windows``; all with the same trailing shape.

    Returns
    -------
    numpy.ndarray
        ``(n_spots, ...)`` float32 blend, each spot's predictions weighted by
        its window weights (``(n_spots, 0)`` when there are no windows).
    """
    if len(windows) != len(predictions):
        raise ValueError(f"{len(windows)} windows but {len(predictions)} predictions")
    if not predictions:
        return np.zeros((n_spots, 0), np.float32)
    first = np.asarray(predictions[0])
    out = np.zeros((n_spots, *first.shape[1:]), dtype=np.float64)
    for win, pred in zip(windows, predictions, strict=True):
        pred = np.asarray(pred, dtype=np.float64)
        if pred.shape[0] != len(win.index):
            raise ValueError(f"a window of {len(win.index)} spots got {pred.shape[0]} predictions")
        w = win.weight.reshape(-1, *([1] * (pred.ndim - 1)))
        np.add.at(out, win.index, w * pred)
    return out.astype(np.float32)
