"""Reader for legacy Spatial Transcriptomics (ST v1) data in the her2st layout.

The layout (Andersson et al. 2021, github ``almaan/her2st``) per section:

- ``ST-cnts/<sec>.tsv.gz``: spots x genes UMI counts, rows indexed ``"XxY"``
  (integer array coordinates);
- ``ST-spotfiles/<sec>_selection.tsv``: ``x y new_x new_y pixel_x pixel_y selected``,
  where ``pixel_x/pixel_y`` are the spot centres in the full-resolution H&E image
  and ``new_x/new_y`` the array coordinates refined by the spot detector;
- ``ST-pat/lbl/<sec>_labeled_coordinates.tsv`` (optional): a pathologist label per
  spot, with float ``x y`` matched to the counts by ``f"{round(x)}x{round(y)}"``.

Two ST array layouts exist, told apart by their array coordinates
(:func:`detect_st_array`):

- the "1k" array (her2st and most ST v1 data): every integer ``(x, y)`` cell,
  100 µm spots 200 µm apart, i.e. 200 µm per array unit;
- the "2k" array: a checkerboard (``x + y`` of one parity only, so that
  neighbouring spots are diagonal), 100 µm per array unit (spot diameter taken
  as 100 µm for both layouts).

The pitch of the grid in pixels per array unit then gives the pixel size
(µm per unit / pitch) when it is not known otherwise, recorded in
``uns["he2st"]["mpp_source"]`` as ``"lattice:..."`` with an
:class:`~he2st.errors.InferredMppWarning`, and the spot diameter (100 µm).
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from he2st.errors import InferredMppWarning, SlideError
from he2st.io._common import (
    READ_ERRORS,
    PathLike,
    check_numeric_frame,
    fit_pitch,
    image_frame,
    logger,
    require_file,
    stem_without_suffixes,
)

#: ST v1 geometry (Ståhl et al. 2016): spot diameter and centre-to-centre distance.
ST_SPOT_DIAMETER_UM = 100.0
ST_PITCH_UM = 200.0

#: Microns per array-coordinate unit of each ST array layout (see the module notes).
ST_UM_PER_UNIT = {"1k": ST_PITCH_UM, "2k": 100.0}

_TABLE_SUFFIXES = (".tsv.gz", ".tsv", ".csv.gz", ".csv", ".txt.gz", ".txt")
_SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


def read_st_legacy(
    counts: PathLike,
    spots: PathLike,
    image: PathLike | None = None,
    labels: PathLike | None = None,
    slide_id: str | None = None,
    patient: str | None = None,
    spot_diameter_px: float | None = None,
    mpp: float | None = None,
    array_type: str = "auto",
) -> Any:
    """Read one ST v1 section (her2st layout) into a slide.

    Parameters
    ----------
    counts
        Tab-separated counts table (optionally gzipped): first column the spot id
        ``"XxY"``, then one column per gene, integer UMI counts.
    spots
        Spot table with columns ``x y pixel_x pixel_y`` (and optionally ``new_x new_y``
        and ``selected``). Only rows with ``selected == 1`` are used when the column exists.
    image
        Full-resolution H&E image in which ``pixel_x/pixel_y`` are given. When given,
        every kept spot centre must lie inside it.
    labels
        Optional table with columns ``x y label``; joined on ``f"{round(x)}x{round(y)}"``.
        Spots without a label get a missing label.
    slide_id
        Defaults to the counts file name without its suffix (``C2.tsv.gz`` -> ``"C2"``).
    patient
        Defaults to ``slide_id``.
    spot_diameter_px
        Spot diameter in image pixels. Default: half the grid pitch fitted from the spot table.
    mpp
        Microns per pixel. Default: the array's µm per array unit (200 for "1k", 100
        for "2k") divided by the fitted grid pitch in pixels per unit, with an
        :class:`~he2st.errors.InferredMppWarning`.
    array_type
        ``"1k"``, ``"2k"`` or ``"auto"`` (detected from the spot coordinates with
        :func:`detect_st_array`).

    Returns
    -------
    anndata.AnnData
        Slide with the spots present in both the counts and the spot table, in the
        counts' order; ``obsm["spatial"] = (pixel_x, pixel_y)``, ``scale = 1``.
        ``uns["he2st"]["source"]`` records how many rows were dropped on each side.

    Raises
    ------
    MissingFileError
        A named file does not exist.
    SlideError
        Non-numeric, negative or non-integer counts; duplicated spot ids or genes;
        missing columns; no spot shared by counts and spot table; spots outside the
        image; all coordinates missing; conflicting labels for one spot.
    ImageError
        ``image`` is not a readable image.

    Warns
    -----
    UserWarning
        When rows with missing (NaN) coordinates are dropped from the spot table or
        the label table.
    InferredMppWarning
        When ``mpp`` is inferred from the array lattice.
    """
    counts = require_file(counts, "ST counts file")
    spots = require_file(spots, "ST spot file")
    if labels is not None:
        labels = require_file(labels, "ST label file")
    sid = slide_id or stem_without_suffixes(counts, _TABLE_SUFFIXES)
    image_path, size = image_frame(image)

    table = _read_counts(counts, sid)
    spot_table, n_unselected, n_nan = _read_spot_table(spots, sid)

    if array_type not in ("auto", "1k", "2k"):
        raise SlideError(sid, f"array_type must be '1k', '2k' or 'auto', got {array_type!r}")
    detected = detect_st_array(spot_table[["x", "y"]].to_numpy(int))
    layout = detected if array_type == "auto" else array_type
    um_per_unit = ST_UM_PER_UNIT[layout]
    steps = fit_pitch(_grid(spot_table), spot_table[["pixel_x", "pixel_y"]].to_numpy(float))
    pitch = None if steps is None else float(steps.mean())
    if spot_diameter_px is None:
        if pitch is None:
            raise SlideError(
                sid,
                f"cannot fit the spot grid pitch from {str(spots)!r} (fewer than 3 spots or all on one line); "
                "pass spot_diameter_px",
            )
        spot_diameter_px = pitch * ST_SPOT_DIAMETER_UM / um_per_unit
    mpp_source = "user" if mpp is not None else ""
    inferred_note = ""
    if mpp is None and pitch is not None:
        mpp = um_per_unit / pitch
        how = "detected from the spot coordinates" if array_type == "auto" else "array_type given"
        mpp_source = f"lattice:ST {layout} array ({how}), {um_per_unit:g} µm per array unit"
        inferred_note = (
            f"slide {sid!r}: microns per pixel inferred from the spot lattice of {str(spots)!r}: ST {layout} "
            f"array ({how}), {um_per_unit:g} µm per array unit / {pitch:.1f} px per unit = {mpp:.4f} µm/px; "
            "pass mpp= if the scanner's value is known"
        )

    common = table.index[table.index.isin(spot_table.index)]
    only_counts = len(table) - len(common)
    only_spots = len(spot_table) - len(common)
    if len(common) == 0:
        raise SlideError(
            sid,
            f"no spot id is shared by counts {str(counts)!r} ({len(table)} rows, e.g. {list(table.index[:3])}) "
            f"and spot file {str(spots)!r} ({len(spot_table)} rows, e.g. {list(spot_table.index[:3])}); "
            "expected ids 'XxY' built from the spot file's x and y",
        )
    kept = spot_table.loc[common]
    values = check_numeric_frame(table.loc[common], counts, sid)

    label_values = None
    label_note = ""
    if labels is not None:
        label_values, label_note = _join_labels(Path(labels), common, sid)

    notes = [
        f"{len(common)} spots kept",
        f"{only_counts} counts rows without a spot entry dropped",
        f"{only_spots} spot entries without counts dropped",
    ]
    if n_unselected:
        notes.append(f"{n_unselected} unselected spot entries ignored")
    if n_nan:
        notes.append(f"{n_nan} spot entries with NaN coordinates dropped")
    if label_note:
        notes.append(label_note)
    if pitch is not None:
        notes.append(f"grid pitch {pitch:.1f} px per array unit")
    notes.append(f"ST {layout} array" + (" (detected)" if array_type == "auto" else ""))
    files = f"counts={str(counts)!r}, spots={str(spots)!r}"
    if labels is not None:
        files += f", labels={str(labels)!r}"
    if image_path is not None:
        files += f", image={image_path!r}"
    source = f"read_st_legacy({files}): " + "; ".join(notes)
    log = logger.warning if only_counts else logger.info
    log("slide %r: %s", sid, "; ".join(notes))

    from he2st.data import make_slide

    slide = make_slide(
        values,
        common,
        table.columns,
        kept[["pixel_x", "pixel_y"]].to_numpy(float),
        slide_id=sid,
        patient=patient,
        image_path=image_path,
        spot_diameter_px=float(spot_diameter_px),
        mpp=mpp,
        mpp_source=mpp_source,
        scale=1.0,
        array_row=kept["y"].to_numpy(int),
        array_col=kept["x"].to_numpy(int),
        labels=label_values,
        counts=True,
        source=source,
        image_size=size,
    )
    if inferred_note:
        warnings.warn(inferred_note, InferredMppWarning, stacklevel=2)
    return slide


def detect_st_array(xy: np.ndarray) -> str:
    """Which ST array layout integer spot coordinates come from: ``"1k"`` or ``"2k"``.

    A "2k" array is a checkerboard: every ``x + y`` has the same parity, no two
    spots are axis neighbours (distance 1) and some are diagonal neighbours.
    Anything else is the "1k" array.

    Parameters
    ----------
    xy
        ``(n, 2)`` integer array coordinates ``(x, y)`` of the spots.

    Returns
    -------
    str
        ``"2k"`` for a checkerboard lattice, else ``"1k"``.
    """
    xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
    if len(xy) < 2 or len(np.unique((xy[:, 0] + xy[:, 1]) % 2)) != 1:
        return "1k"
    cells = {(int(x), int(y)) for x, y in xy}
    axis = any((x + 1, y) in cells or (x, y + 1) in cells for x, y in cells)
    diagonal = any((x + 1, y + 1) in cells or (x + 1, y - 1) in cells for x, y in cells)
    return "2k" if diagonal and not axis else "1k"


def _read_counts(path: Path, sid: str) -> pd.DataFrame:
    """Counts table indexed by spot id, with duplicated ids/genes and emptiness checked."""
    header = _header(path)
    genes = header[1:]
    dup_genes = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
    if len(dup_genes):
        # pandas would silently rename them "GENE.1": refuse instead.
        raise SlideError(sid, f"counts file {str(path)!r} has duplicated gene columns: {list(dup_genes[:5])}")
    try:
        table = pd.read_csv(path, sep="\t", index_col=0)
    except READ_ERRORS as exc:
        raise SlideError(sid, f"cannot parse counts file {str(path)!r} as a tab-separated table: {exc}") from exc
    if table.shape[0] == 0:
        raise SlideError(sid, f"counts file {str(path)!r} has no spots (empty slide)")
    if table.shape[1] == 0:
        raise SlideError(
            sid, f"counts file {str(path)!r} has no gene columns; expected a tab-separated spots x genes table"
        )
    table.index = table.index.astype(str)
    dup = table.index[table.index.duplicated()].unique()
    if len(dup):
        raise SlideError(sid, f"counts file {str(path)!r} has duplicated spot ids: {list(dup[:5])}")
    table.columns = table.columns.astype(str)
    return table


def _header(path: Path) -> list[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt") as fh:
            line = fh.readline()
    except READ_ERRORS as exc:
        raise SlideError(None, f"cannot read counts file {str(path)!r}: {exc}") from exc
    return line.rstrip("\r\n").split("\t")


def _read_spot_table(path: Path, sid: str) -> tuple[pd.DataFrame, int, int]:
    """Spot table indexed by ``"XxY"``, selected rows only, NaN rows dropped (with a warning)."""
    try:
        df = pd.read_csv(path, sep="\t")
    except READ_ERRORS as exc:
        raise SlideError(sid, f"cannot parse spot file {str(path)!r} as a tab-separated table: {exc}") from exc
    missing = [c for c in _SPOT_COLUMNS if c not in df.columns]
    if missing:
        raise SlideError(
            sid,
            f"spot file {str(path)!r} lacks columns {missing}; "
            f"expected {list(_SPOT_COLUMNS)} (+ new_x new_y selected)",
        )
    if len(df) == 0:
        raise SlideError(sid, f"spot file {str(path)!r} has no rows (empty slide)")
    numeric_cols = [c for c in (*_SPOT_COLUMNS, "new_x", "new_y", "selected") if c in df.columns]
    for c in numeric_cols:
        coerced = pd.to_numeric(df[c], errors="coerce")
        if (coerced.isna() & df[c].notna()).any():
            bad = df[c][coerced.isna() & df[c].notna()].iloc[0]
            raise SlideError(sid, f"spot file {str(path)!r}: column {c!r} has non-numeric value {bad!r}")
        df[c] = coerced
    n_unselected = 0
    if "selected" in df.columns:
        sel = df["selected"].fillna(0) == 1
        n_unselected = int((~sel).sum())
        df = df[sel]
    nan_rows = df[list(_SPOT_COLUMNS)].isna().any(axis=1)
    n_nan = int(nan_rows.sum())
    if n_nan:
        if n_nan == len(df):
            raise SlideError(sid, f"spot file {str(path)!r}: all {n_nan} spot rows have missing (NaN) coordinates")
        warnings.warn(
            f"slide {sid!r}: {n_nan} rows of spot file {str(path)!r} have missing (NaN) coordinates; dropped",
            UserWarning,
            stacklevel=3,
        )
        df = df[~nan_rows]
    if len(df) == 0:
        raise SlideError(sid, f"spot file {str(path)!r} has no selected spots (empty slide)")
    df = df.copy()
    df["x"] = np.rint(df["x"]).astype(int)
    df["y"] = np.rint(df["y"]).astype(int)
    df.index = pd.Index(df["x"].astype(str) + "x" + df["y"].astype(str))
    dup = df.index[df.index.duplicated()].unique()
    if len(dup):
        raise SlideError(sid, f"spot file {str(path)!r} has duplicated spot ids (x, y): {list(dup[:5])}")
    return df, n_unselected, n_nan


def _grid(spot_table: pd.DataFrame) -> np.ndarray:
    """Array coordinates for the pitch fit: the detector-refined ones when present."""
    if {"new_x", "new_y"} <= set(spot_table.columns) and spot_table[["new_x", "new_y"]].notna().all().all():
        return spot_table[["new_x", "new_y"]].to_numpy(float)
    return spot_table[["x", "y"]].to_numpy(float)


def _join_labels(path: Path, spot_ids: pd.Index, sid: str) -> tuple[list[Any], str]:
    """Per-spot labels in ``spot_ids`` order (NaN where unlabelled) and a provenance note."""
    try:
        df = pd.read_csv(path, sep="\t")
    except READ_ERRORS as exc:
        raise SlideError(sid, f"cannot parse label file {str(path)!r} as a tab-separated table: {exc}") from exc
    missing = [c for c in ("x", "y", "label") if c not in df.columns]
    if missing:
        raise SlideError(sid, f"label file {str(path)!r} lacks columns {missing}; expected x, y, label")
    xy = df[["x", "y"]].apply(pd.to_numeric, errors="coerce")
    nan_rows = xy.isna().any(axis=1)
    n_nan = int(nan_rows.sum())
    if n_nan:
        warnings.warn(
            f"slide {sid!r}: {n_nan} rows of label file {str(path)!r} have missing (NaN) x/y; dropped",
            UserWarning,
            stacklevel=3,
        )
    xy, lab = xy[~nan_rows], df.loc[~nan_rows, "label"]
    keys = [f"{round(x)}x{round(y)}" for x, y in zip(xy["x"], xy["y"], strict=True)]
    mapping: dict[str, Any] = {}
    for key, value in zip(keys, lab, strict=True):
        if key in mapping and mapping[key] != value:
            raise SlideError(
                sid, f"label file {str(path)!r} gives spot {key!r} two labels: {mapping[key]!r} and {value!r}"
            )
        mapping[key] = value
    values = [mapping.get(s, np.nan) for s in spot_ids]
    n_labelled = sum(s in mapping for s in spot_ids)
    kept_ids = set(spot_ids)
    n_unused = sum(k not in kept_ids for k in mapping)
    note = f"labels: {n_labelled}/{len(spot_ids)} spots labelled, {n_unused} label rows match no kept spot"
    if n_nan:
        note += f", {n_nan} label rows with NaN x/y dropped"
    return values, note
