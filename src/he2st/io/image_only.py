"""Reader for an H&E image that was never sequenced: an image-only slide, the input of prediction.

:func:`read_image` makes a slide with zero genes (``counts = False``) whose spots
come either from a table of pixel positions or from a lattice laid over the
tissue (:func:`he2st.image.make_grid`). The image is only referenced
(``uns["he2st"]["image_path"]``); its header and, for a grid, a thumbnail are
all that is read. The pixel size comes from the caller or the file's metadata
(:func:`he2st.image.resolve_mpp`) and is never guessed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from he2st.errors import He2stInputError, SlideError
from he2st.io._common import READ_ERRORS, PathLike, image_frame, logger, require_file

#: Spot diameter assumed for a table of spots when none is given: Visium's 55 µm.
DEFAULT_SPOT_DIAMETER_UM = 55.0

#: Pixel-coordinate column pairs accepted in a spot table, (x = column, y = row), in order of preference.
#: Legacy ST spot files (``*_selection.tsv``) hold pixels in ``pixel_x, pixel_y`` and ARRAY
#: coordinates in ``x, y``, so ``pixel_x, pixel_y`` win over ``x, y``.
XY_COLUMNS = (
    ("pixel_x", "pixel_y"),
    ("pxl_col_in_fullres", "pxl_row_in_fullres"),
    ("imagecol", "imagerow"),
    ("x", "y"),
)
_ID_COLUMNS = ("id", "barcode")


def read_image(
    path: PathLike,
    *,
    mpp: float | None = None,
    spots: Any = None,
    grid: Any = None,
    slide_id: str | None = None,
    patient: str | None = None,
    spot_diameter_um: float | None = None,
) -> Any:
    """Read an H&E image as an image-only slide (zero genes), with spots from a table or a grid.

    Parameters
    ----------
    path
        The image (TIFF, OME-TIFF, SVS and other whole-slide formats, JPEG, PNG).
        Opened lazily later; only its header (and a thumbnail for a grid) is read now.
    mpp
        Microns per pixel of the image. Wins over the file's metadata (a warning
        when they differ by more than 5 %); required when the file records none.
    spots
        Spot centres in level-0 pixels: a CSV/TSV file or a DataFrame with columns
        ``x, y`` (or ``pxl_col_in_fullres, pxl_row_in_fullres``, or ``imagecol,
        imagerow``), an optional ``id``/``barcode`` column and optional
        ``array_row, array_col``; or an ``(n, 2)`` array of ``(x, y)``. A legacy ST
        spot file (``x, y, pixel_x, pixel_y[, selected]``: array coordinates and
        pixels) is read as such: pixels from ``pixel_x, pixel_y``, the selected
        spots only, ids ``"<x>x<y>"`` as in its count matrix.
    grid
        A lattice over the tissue instead of ``spots``: a :class:`he2st.image.GridSpec`,
        a dict ``{"pitch_um": 100, "spot_diameter_um": 55, "kind": "hex"}``, or a bare
        pitch in µm (hex lattice).
    slide_id
        Defaults to the image file name without its suffix.
    patient
        Defaults to ``slide_id``.
    spot_diameter_um
        Spot diameter in µm. Default: the grid's (``0.55 x pitch``), or 55 µm for a table.

    Returns
    -------
    anndata.AnnData
        An image-only slide: zero genes, ``counts=False``, ``obsm["spatial"]`` the spot
        centres, ``uns["he2st"]`` with ``image_path``, ``mpp``, ``mpp_source``
        (``"user"`` or ``"file:<tag>"``) and ``spot_diameter_px = spot_diameter_um / mpp``.

    Raises
    ------
    He2stInputError
        Both or neither of ``spots`` and ``grid``; a spot table without pixel columns,
        with NaN, duplicated ids or no rows; spots outside the image (:class:`SlideError`);
        an invalid grid.
    UnknownMppError
        Neither ``mpp`` nor the file gives the pixel size.
    ImageError
        The image is missing or unreadable; a grid finds no tissue.
    MissingFileError
        ``spots`` names a file that does not exist.
    """
    from he2st.image import GridSpec, make_grid, resolve_mpp

    image_path, size = image_frame(path)
    assert image_path is not None and size is not None
    sid = str(slide_id) if slide_id is not None else _stem(Path(path))
    if (spots is None) == (grid is None):
        both = "both" if spots is not None else "neither"
        raise He2stInputError(
            f"read_image({str(path)!r}): give exactly one of spots= (a table or array of pixel positions) "
            f"and grid= (e.g. grid={{'pitch_um': 100}}); got {both}"
        )
    mpp, mpp_source = resolve_mpp(path, mpp)
    if spot_diameter_um is not None and not (np.isfinite(spot_diameter_um) and spot_diameter_um > 0):
        raise He2stInputError(f"read_image({str(path)!r}): spot_diameter_um must be positive, got {spot_diameter_um!r}")

    if grid is not None:
        spec = GridSpec.coerce(grid)
        diameter_um = float(spot_diameter_um) if spot_diameter_um is not None else spec.diameter_um
        g = make_grid(
            image_path, mpp=mpp, pitch_um=spec.pitch_um, spot_diameter_um=diameter_um, kind=spec.kind
        )
        xy, ids, rows, cols = g.xy, g.ids, g.array_row, g.array_col
        how = f"{len(ids)} spots on a {spec.kind} grid, pitch {spec.pitch_um:g} µm, kept where >= 50 % tissue"
    else:
        diameter_um = float(spot_diameter_um) if spot_diameter_um is not None else DEFAULT_SPOT_DIAMETER_UM
        xy, ids, rows, cols, what = _spot_table(spots, sid)
        _check_inside(xy, ids, size, image_path, what, sid)
        how = f"{len(ids)} spots from {what}"

    source = f"read_image({image_path!r}): {how}; mpp {mpp:g} µm/px ({mpp_source})"
    logger.info("slide %r: %s", sid, source)

    from he2st.data import make_slide

    return make_slide(
        None,
        ids,
        [],
        xy,
        slide_id=sid,
        patient=patient,
        image_path=image_path,
        spot_diameter_px=diameter_um / mpp,
        mpp=mpp,
        mpp_source=mpp_source,
        array_row=rows,
        array_col=cols,
        counts=False,
        source=source,
        image_size=size,
    )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _spot_table(spots: Any, sid: str) -> tuple[np.ndarray, list[str], Any, Any, str]:
    """``(xy, ids, array_row or None, array_col or None, description)`` of a spot table or array."""
    if isinstance(spots, (str, Path)) or hasattr(spots, "__fspath__"):
        p = require_file(spots, "spot table")
        name = p.name.lower().removesuffix(".gz")
        sep = "," if name.endswith(".csv") else "\t"
        try:
            df = pd.read_csv(p, sep=sep)
        except READ_ERRORS as exc:
            raise SlideError(sid, f"cannot parse spot table {str(p)!r}: {exc}") from exc
        if df.shape[1] == 1 and sep == "\t":  # a comma-separated file named .tsv/.txt
            df = pd.read_csv(p, sep=",")
        return _from_frame(df, sid, f"spot table {str(p)!r}", use_index=False)
    if isinstance(spots, pd.DataFrame):
        return _from_frame(spots, sid, "the spots DataFrame", use_index=not isinstance(spots.index, pd.RangeIndex))
    arr = np.asarray(spots)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.dtype.kind not in "biuf":
        raise SlideError(
            sid, f"spots must be a table (CSV/TSV path or DataFrame) or a numeric (n, 2) array of x, y; got shape {arr.shape}"
        )
    what = "the spots array"
    xy = arr.astype(np.float64)
    _check_finite(xy, [f"spot{i}" for i in range(len(xy))], what, sid)
    return xy, [f"spot{i}" for i in range(len(xy))], None, None, what


def _from_frame(df: pd.DataFrame, sid: str, what: str, use_index: bool) -> tuple[np.ndarray, list[str], Any, Any, str]:
    if len(df) == 0:
        raise SlideError(sid, f"{what} has no rows (empty slide)")
    st_layout = {"pixel_x", "pixel_y", "x", "y"} <= set(df.columns)
    if st_layout and "selected" in df.columns:
        # Legacy ST spot file: only spots marked selected (under the tissue) were kept by the
        # pipeline that made the count matrix.
        df = df[pd.to_numeric(df["selected"], errors="coerce") == 1]
        if len(df) == 0:
            raise SlideError(sid, f"{what} has no spot with selected == 1")
    pair = next(((cx, cy) for cx, cy in XY_COLUMNS if cx in df.columns and cy in df.columns), None)
    if pair is None:
        raise SlideError(
            sid,
            f"{what} has columns {list(df.columns)[:8]}; expected pixel columns x, y "
            "(or pixel_x, pixel_y, or pxl_col_in_fullres, pxl_row_in_fullres, or imagecol, imagerow)",
        )
    xy = df[list(pair)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    id_col = next((c for c in _ID_COLUMNS if c in df.columns), None)
    if id_col is not None:
        ids = [str(v) for v in df[id_col]]
    elif use_index:
        ids = [str(v) for v in df.index]
    elif st_layout:
        # The legacy ST spot id, "<x>x<y>" of the array coordinates, as in its count matrix.
        ids = [f"{round(float(a))}x{round(float(b))}" for a, b in zip(df["x"], df["y"])]
    else:
        ids = [f"spot{i}" for i in range(len(df))]
    dup = pd.Index(ids)[pd.Index(ids).duplicated()].unique()
    if len(dup):
        raise SlideError(sid, f"{what} has duplicated spot ids: {list(dup[:5])}")
    _check_finite(xy, ids, what, sid)
    rows = cols = None
    if {"array_row", "array_col"} <= set(df.columns):
        rows, cols = df["array_row"].to_numpy(), df["array_col"].to_numpy()
    elif st_layout:
        rows = df["y"].round().astype(int).to_numpy()
        cols = df["x"].round().astype(int).to_numpy()
    return xy, ids, rows, cols, what


def _check_finite(xy: np.ndarray, ids: list[str], what: str, sid: str) -> None:
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        examples = [ids[i] for i in np.flatnonzero(bad)[:3]]
        raise SlideError(sid, f"{what}: {int(bad.sum())} spots have missing or non-numeric x/y, e.g. {examples}")


def _check_inside(xy: np.ndarray, ids: list[str], size: tuple[int, int], image: str, what: str, sid: str) -> None:
    w, h = size
    out = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
    if out.any():
        idx = np.flatnonzero(out)[:3]
        examples = ", ".join(f"{ids[i]} at ({xy[i, 0]:.1f}, {xy[i, 1]:.1f})" for i in idx)
        raise SlideError(
            sid,
            f"{int(out.sum())} of {len(ids)} spots of {what} lie outside the {w}x{h} image {image!r} "
            f"(e.g. {examples}); expected x in [0, {w}) and y in [0, {h}) in full-resolution pixels "
            "(are the coordinates from a downscaled image?)",
        )
