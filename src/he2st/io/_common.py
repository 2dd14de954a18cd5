"""Helpers shared by the readers: file checks, image frames, counts checks, pitch fits."""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from he2st.errors import He2stInputError, SlideError

logger = logging.getLogger("he2st.io")

PathLike = str | os.PathLike


#: What reading a damaged table can raise: parse errors, bad text, and a truncated or
#: corrupt gzip stream (``EOFError``, ``zlib.error``, ``gzip.BadGzipFile`` is an ``OSError``).
READ_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    pd.errors.ParserError,
    UnicodeDecodeError,
    OSError,
    EOFError,
    zlib.error,
)


class MissingFileError(He2stInputError, FileNotFoundError):
    """A file a reader needs does not exist. The message names the file and what it should hold."""


def require_file(path: PathLike, what: str) -> Path:
    """Return ``path`` as a Path, raising :class:`MissingFileError` when it is not a file."""
    p = Path(path)
    if not p.is_file():
        state = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise MissingFileError(f"{what} {str(p)!r} {state}")
    return p


def require_dir(path: PathLike, what: str) -> Path:
    """Return ``path`` as a Path, raising :class:`MissingFileError` when it is not a directory."""
    p = Path(path)
    if not p.is_dir():
        state = "is a file, not a directory" if p.exists() else "does not exist"
        raise MissingFileError(f"{what} {str(p)!r} {state}")
    return p


def first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    """The first of ``folder / name`` that exists, or None."""
    for name in names:
        p = folder / name
        if p.exists():
            return p
    return None


def image_frame(image: PathLike | None) -> tuple[str | None, tuple[int, int] | None]:
    """``(path, (width, height))`` of an image from its header, or ``(None, None)``.

    Raises :class:`he2st.errors.ImageError` when the file is missing or not an image.
    """
    if image is None:
        return None, None
    from he2st.image import image_size

    size = image_size(image)
    # Absolute, so the slide still finds its image from another working directory.
    return str(Path(image).resolve()), size


def stem_without_suffixes(path: Path, suffixes: Iterable[str]) -> str:
    """File name with the first matching suffix removed (``C2.tsv.gz`` -> ``C2``)."""
    name = path.name
    for suffix in suffixes:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def check_numeric_frame(df: pd.DataFrame, file: Path, slide: str) -> np.ndarray:
    """Values of a counts table as float64, raising :class:`SlideError` naming ``file`` otherwise."""
    bad = [c for c, dt in df.dtypes.items() if dt.kind not in "biuf"]
    if bad:
        col = bad[0]
        sample = df[col][pd.to_numeric(df[col], errors="coerce").isna()]
        example = f" (e.g. {sample.iloc[0]!r} in spot {sample.index[0]!r})" if len(sample) else ""
        raise SlideError(
            slide,
            f"counts file {str(file)!r} has non-numeric values in {len(bad)} gene column(s), "
            f"first {col!r}{example}; expected integer UMI counts",
        )
    values = df.to_numpy(dtype=np.float64)
    check_count_values(values, file, slide)
    return values


def check_count_values(values: Any, file: Path | str, slide: str) -> None:
    """Raise :class:`SlideError` naming ``file`` unless ``values`` are finite non-negative integers."""
    import scipy.sparse as sp

    data = values.data if sp.issparse(values) else np.asarray(values).ravel()
    if data.size == 0:
        return
    if not np.isfinite(data).all():
        raise SlideError(slide, f"counts in {str(file)!r} contain missing (NaN) or infinite values")
    if (data < 0).any():
        raise SlideError(
            slide, f"counts in {str(file)!r} contain negative values (min {data.min():g}); expected UMI counts"
        )
    if not np.array_equal(data, np.round(data)):
        raise SlideError(
            slide,
            f"counts in {str(file)!r} are not integers: this looks like normalised data, not raw UMI counts",
        )


def is_raw_counts(values: Any) -> bool:
    """True when ``values`` (dense or sparse) are finite, non-negative integers."""
    import scipy.sparse as sp

    data = values.data if sp.issparse(values) else np.asarray(values).ravel()
    if data.size == 0:
        return True
    data = np.asarray(data, dtype=np.float64)
    return bool(np.isfinite(data).all() and (data >= 0).all() and np.array_equal(data, np.round(data)))


def fit_pitch(grid: np.ndarray, pixels: np.ndarray) -> np.ndarray | None:
    """Least-squares affine map from grid coordinates to pixels; return px per grid unit per axis.

    ``grid`` and ``pixels`` are ``(n, 2)``. The result is the length of each column
    of the linear part, i.e. how many pixels one step along each grid axis covers
    (robust to rotation and flips). None when the grid is degenerate (fewer than
    three spots, or all on one line).
    """
    ok = np.isfinite(grid).all(axis=1) & np.isfinite(pixels).all(axis=1)
    grid, pixels = grid[ok], pixels[ok]
    if len(grid) < 3:
        return None
    design = np.column_stack([grid, np.ones(len(grid))])
    if np.linalg.matrix_rank(design) < 3:
        return None
    coef, *_ = np.linalg.lstsq(design, pixels, rcond=None)
    steps = np.linalg.norm(coef[:2], axis=1)  # row i: pixel displacement for one step along grid axis i
    if not np.all(np.isfinite(steps)) or np.any(steps <= 0):
        return None
    return steps


def make_unique(names: Sequence[str]) -> list[str]:
    """Make names unique the AnnData way: later duplicates get ``-1``, ``-2``, ..."""
    seen: dict[str, int] = {}
    taken = set(names)
    out = []
    for name in names:
        if name not in seen:
            seen[name] = 0
            out.append(name)
            continue
        k = seen[name]
        while True:
            k += 1
            candidate = f"{name}-{k}"
            if candidate not in taken:
                break
        seen[name] = k
        taken.add(candidate)
        out.append(candidate)
    return out
