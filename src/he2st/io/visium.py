"""Reader for 10x Genomics Visium (Space Ranger ``outs/``) folders.

Space Ranger writes, under ``outs/``:

- ``filtered_feature_bc_matrix.h5`` (10x HDF5) or ``filtered_feature_bc_matrix/``
  (``matrix.mtx.gz``, ``barcodes.tsv.gz``, ``features.tsv.gz``; ``genes.tsv`` in
  old versions): features x barcodes UMI counts;
- ``spatial/tissue_positions.csv`` (Space Ranger >= 2, with header),
  ``spatial/tissue_positions_list.csv`` (Space Ranger 1, no header) or
  ``spatial/tissue_positions.parquet``: ``barcode, in_tissue, array_row, array_col,
  pxl_row_in_fullres, pxl_col_in_fullres``;
- ``spatial/scalefactors_json.json``: ``spot_diameter_fullres``, ``tissue_hires_scalef``,
  ``tissue_lowres_scalef``;
- ``spatial/tissue_hires_image.png`` / ``tissue_lowres_image.png``: downscaled H&E.

The full-resolution image is not part of ``outs/``; pass it as ``image=`` to work
at full resolution (recommended: patches at 0.5 µm/px need it).
"""

from __future__ import annotations

import gzip
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from he2st.errors import InferredMppWarning, SlideError
from he2st.io._common import (
    READ_ERRORS,
    MissingFileError,
    PathLike,
    check_count_values,
    first_existing,
    fit_pitch,
    image_frame,
    logger,
    make_unique,
    require_dir,
    require_file,
)

#: Visium geometry: 55 µm spots, 100 µm centre-to-centre on a hexagonal grid where
#: neighbours on a row are two ``array_col`` apart.
VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_COL_STEP_UM = 50.0
VISIUM_ROW_STEP_UM = 100.0 * math.sqrt(3) / 2

POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
_POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
_MATRIX_NAMES = ("filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix")


def find_outs(path: PathLike) -> Path | None:
    """The Space Ranger ``outs`` folder at or under ``path``, or None if ``path`` is not one.

    Parameters
    ----------
    path
        An ``outs`` folder (a matrix and ``spatial/``) or the run folder holding ``outs/``.

    Returns
    -------
    pathlib.Path or None
        The ``outs`` folder.
    """
    p = Path(path)
    for cand in (p, p / "outs"):
        if cand.is_dir() and first_existing(cand, _MATRIX_NAMES) and (cand / "spatial").is_dir():
            return cand
    return None


def read_visium(
    outs_dir: PathLike,
    image: PathLike | None = None,
    slide_id: str | None = None,
    patient: str | None = None,
    spot_diameter_px: float | None = None,
    mpp: float | None = None,
    matrix: PathLike | None = None,
) -> Any:
    """Read a Space Ranger ``outs`` folder into a slide (spots under tissue only).

    Parameters
    ----------
    outs_dir
        The ``outs`` folder (or the run folder that contains it).
    image
        The full-resolution H&E image the run was aligned to. When given, spot
        coordinates are used as they are (``scale = 1``). When absent, the hires
        image in ``spatial/`` is used and coordinates and spot diameter are scaled
        by ``tissue_hires_scalef`` (the lowres image if no hires image exists, with
        a warning; no image at all, with a warning, if neither exists).
    slide_id
        Defaults to the run folder's name (the parent of ``outs``).
    patient
        Defaults to ``slide_id``.
    spot_diameter_px
        Spot diameter in pixels of the chosen image. Default: ``spot_diameter_fullres``
        times the scale.
    mpp
        Microns per pixel of the chosen image. Default: from the fitted grid pitch
        (100 µm between neighbouring spots), or 55 µm / spot diameter.
    matrix
        A specific matrix (``.h5`` file or mtx folder) instead of the filtered one.

    Returns
    -------
    anndata.AnnData
        Slide in the matrix's barcode order; ``var["gene_ids"]`` holds the feature ids.

    Raises
    ------
    MissingFileError
        The matrix, positions or scale factors are missing.
    SlideError
        Malformed files, no barcode in both matrix and tissue positions, spots outside the image.
    ImageError
        ``image`` is not a readable image.
    """
    root = Path(outs_dir)
    outs = find_outs(root) or root
    require_dir(outs, "Space Ranger outs folder")
    sid = slide_id or (outs.parent.name if outs.name == "outs" else outs.name)
    spatial_dir = outs / "spatial"

    matrix_path = Path(matrix) if matrix is not None else first_existing(outs, _MATRIX_NAMES)
    if matrix_path is None or not matrix_path.exists():
        raise MissingFileError(
            f"slide {sid!r}: no count matrix in {str(outs)!r}; expected filtered_feature_bc_matrix.h5 "
            "or a filtered_feature_bc_matrix/ folder"
        )
    if matrix_path.is_dir():
        X, barcodes, names, ids = read_10x_mtx(matrix_path)
    else:
        X, barcodes, names, ids = read_10x_h5(matrix_path)
    check_count_values(X, matrix_path, sid)

    positions, positions_path = read_positions(spatial_dir, sid)
    scalefactors_path = spatial_dir / "scalefactors_json.json"
    scalefactors = _read_scalefactors(scalefactors_path) if scalefactors_path.is_file() else None

    # Choose the image frame.
    notes = []
    if image is not None:
        image_path, size = image_frame(image)
        scale = 1.0
    else:
        hires, lowres = spatial_dir / "tissue_hires_image.png", spatial_dir / "tissue_lowres_image.png"
        if hires.is_file():
            key, chosen = "tissue_hires_scalef", hires
        elif lowres.is_file():
            key, chosen = "tissue_lowres_scalef", lowres
            warnings.warn(
                f"slide {sid!r}: no full-resolution image given and no hires image in {str(spatial_dir)!r}; "
                "using the lowres image (patches will be coarse)",
                UserWarning,
                stacklevel=2,
            )
        else:
            key, chosen = None, None
        if key is not None:
            if scalefactors is None:
                raise MissingFileError(
                    f"slide {sid!r}: {str(scalefactors_path)!r} does not exist; it is needed to map "
                    f"full-resolution coordinates onto {chosen.name}"
                )
            scale = _positive(scalefactors, key, scalefactors_path, sid)
            image_path, size = image_frame(chosen)
            notes.append(f"image {chosen.name}, coordinates scaled by {key}={scale:g}")
        else:
            warnings.warn(
                f"slide {sid!r}: no image given and none in {str(spatial_dir)!r}; the slide has no image "
                "(pass image= with the full-resolution H&E)",
                UserWarning,
                stacklevel=2,
            )
            image_path, size, scale = None, None, 1.0

    if spot_diameter_px is None:
        if scalefactors is None:
            raise MissingFileError(
                f"slide {sid!r}: {str(scalefactors_path)!r} does not exist; it gives the spot diameter "
                "(or pass spot_diameter_px)"
            )
        spot_diameter_px = _positive(scalefactors, "spot_diameter_fullres", scalefactors_path, sid) * scale

    pixels_all = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float) * scale
    mpp_source = "user" if mpp is not None else ""
    if mpp is None:
        steps = fit_pitch(positions[["array_col", "array_row"]].to_numpy(float), pixels_all)
        if steps is not None:
            mpp = float(np.mean([VISIUM_COL_STEP_UM / steps[0], VISIUM_ROW_STEP_UM / steps[1]]))
            mpp_source = "lattice:Visium array, 100 µm spot pitch"
        else:
            mpp = VISIUM_SPOT_DIAMETER_UM / float(spot_diameter_px)
            mpp_source = "spot:Visium 55 µm spot diameter / scalefactors spot_diameter_fullres"
        warnings.warn(
            f"slide {sid!r}: {mpp:.4g} µm per pixel inferred ({mpp_source.split(':', 1)[1]}); "
            "pass mpp= if the scanner's value is known",
            InferredMppWarning,
            stacklevel=2,
        )

    in_tissue = positions[positions["in_tissue"] == 1]
    n_off = len(positions) - len(in_tissue)
    bc = pd.Index(barcodes)
    keep = bc.isin(in_tissue.index)
    if not keep.any():
        raise SlideError(
            sid,
            f"no barcode of {str(matrix_path)!r} (e.g. {list(bc[:3])}) is an in-tissue spot of "
            f"{str(positions_path)!r} (e.g. {list(in_tissue.index[:3])})",
        )
    kept_bc = bc[keep]
    pos = in_tissue.loc[kept_bc]
    n_matrix_only = int((~keep).sum())
    n_pos_only = len(in_tissue) - len(kept_bc)
    notes[:0] = [
        f"{len(kept_bc)} in-tissue spots kept",
        f"{n_matrix_only} matrix barcodes not under tissue dropped",
        f"{n_pos_only} in-tissue positions without counts dropped",
        f"{n_off} positions outside tissue ignored",
    ]
    source = (
        f"read_visium(matrix={str(matrix_path)!r}, positions={str(positions_path)!r}"
        + (f", image={image_path!r}" if image_path else "")
        + "): "
        + "; ".join(notes)
    )
    logger.info("slide %r: %s", sid, "; ".join(notes))

    from he2st.data import make_slide

    adata = make_slide(
        X[np.flatnonzero(keep)],
        kept_bc,
        names,
        pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float) * scale,
        slide_id=sid,
        patient=patient,
        image_path=image_path,
        spot_diameter_px=float(spot_diameter_px),
        mpp=mpp,
        mpp_source=mpp_source,
        scale=scale,
        array_row=pos["array_row"].to_numpy(int),
        array_col=pos["array_col"].to_numpy(int),
        counts=True,
        source=source,
        image_size=size,
    )
    adata.var["gene_ids"] = list(ids)
    return adata


# ---------------------------------------------------------------------------
# Count matrices
# ---------------------------------------------------------------------------


def read_10x_h5(path: PathLike, genome: str | None = None) -> tuple[sp.csr_matrix, list[str], list[str], list[str]]:
    """Read a 10x HDF5 feature-barcode matrix (Cell Ranger / Space Ranger >= 3, or the v2 layout).

    Only features of type ``"Gene Expression"`` are kept. Gene symbols are made
    unique (``GENE``, ``GENE-1``, ...), as AnnData does.

    Parameters
    ----------
    path
        The ``.h5`` file.
    genome
        Genome group of a v2 file that holds several (default: the only one).

    Returns
    -------
    X, barcodes, gene_names, gene_ids
        ``X`` is CSR barcodes x genes (float32).

    Raises
    ------
    MissingFileError, SlideError
        The file is missing, is not HDF5, lacks the expected groups, or holds
        several genomes and ``genome`` is None.
    """
    import h5py

    path = require_file(path, "10x HDF5 matrix")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise SlideError(None, f"{str(path)!r} is not an HDF5 file: {exc}") from exc
    with fh:
        try:
            if "matrix" in fh:
                grp = fh["matrix"]
                feats = grp["features"]
                names = _strings(feats["name"][()])
                ids = _strings(feats["id"][()])
                types = (
                    _strings(feats["feature_type"][()]) if "feature_type" in feats else ["Gene Expression"] * len(ids)
                )
            else:
                keys = list(fh.keys())
                if genome is None:
                    if len(keys) != 1:
                        raise SlideError(
                            None, f"{str(path)!r} holds several genomes {keys}; pass genome= to choose one"
                        )
                    genome = keys[0]
                grp = fh[genome]
                names = _strings(grp["gene_names"][()])
                ids = _strings(grp["genes"][()])
                types = ["Gene Expression"] * len(ids)
            barcodes = _strings(grp["barcodes"][()])
            n_features, n_barcodes = (int(v) for v in grp["shape"][()])
            # Stored CSC features x barcodes: the same arrays read as CSR barcodes x features.
            X = sp.csr_matrix(
                (grp["data"][()].astype(np.float32), grp["indices"][()], grp["indptr"][()]),
                shape=(n_barcodes, n_features),
            )
            X.check_format(full_check=True)  # damaged indices would crash sparsetools later (SIGSEGV)
        except KeyError as exc:
            raise SlideError(
                None,
                f"{str(path)!r} is not a 10x feature-barcode matrix (missing dataset {exc}); expected group 'matrix'",
            ) from exc
        except SlideError:
            raise
        except (*READ_ERRORS, TypeError, IndexError, AttributeError) as exc:
            # h5py raises OSError/ValueError on damaged chunks, scipy ValueError on inconsistent arrays.
            raise SlideError(None, f"{str(path)!r} is a damaged 10x HDF5 matrix: {exc}") from exc
    if len(barcodes) != n_barcodes or len(names) != n_features:
        raise SlideError(None, f"{str(path)!r}: shape {(n_features, n_barcodes)} disagrees with feature/barcode lists")
    gex = np.array([t == "Gene Expression" for t in types])
    if not gex.all():
        X = X[:, np.flatnonzero(gex)]
        names = [n for n, g in zip(names, gex, strict=True) if g]
        ids = [i for i, g in zip(ids, gex, strict=True) if g]
    return X.tocsr(), barcodes, make_unique(names), ids


def read_10x_mtx(folder: PathLike) -> tuple[sp.csr_matrix, list[str], list[str], list[str]]:
    """Read a 10x Matrix Market folder (``matrix.mtx[.gz]``, ``barcodes.tsv[.gz]``, ``features.tsv[.gz]``).

    Old Cell Ranger folders with ``genes.tsv`` instead of ``features.tsv`` work too.

    Parameters
    ----------
    folder
        The matrix folder (e.g. ``filtered_feature_bc_matrix/``).

    Returns
    -------
    X, barcodes, gene_names, gene_ids
        As :func:`read_10x_h5`.
    """
    folder = require_dir(folder, "10x matrix folder")
    mtx = first_existing(folder, ("matrix.mtx.gz", "matrix.mtx"))
    bcs = first_existing(folder, ("barcodes.tsv.gz", "barcodes.tsv"))
    feats = first_existing(folder, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
    expected = ((mtx, "matrix.mtx[.gz]"), (bcs, "barcodes.tsv[.gz]"), (feats, "features.tsv[.gz] or genes.tsv"))
    for found, what in expected:
        if found is None:
            raise MissingFileError(f"10x matrix folder {str(folder)!r} has no {what}")
    try:
        M = _read_mtx(mtx)
        X = sp.csr_matrix(M.T, dtype=np.float32)
    except SlideError:
        raise
    except (*READ_ERRORS, TypeError, IndexError) as exc:
        raise SlideError(None, f"{str(mtx)!r} is not a readable Matrix Market file: {exc}") from exc
    barcodes = _read_tsv(bcs)[0].tolist()
    ftab = _read_tsv(feats)
    ids = ftab[0].tolist()
    names = ftab[1].tolist() if ftab.shape[1] > 1 else ids
    if X.shape != (len(barcodes), len(ids)):
        raise SlideError(
            None,
            f"{str(mtx)!r} is {M.shape[0]} features x {M.shape[1]} barcodes but {str(feats)!r} lists "
            f"{len(ids)} features and {str(bcs)!r} {len(barcodes)} barcodes",
        )
    if ftab.shape[1] > 2:
        gex = (ftab[2] == "Gene Expression").to_numpy()
        if not gex.all():
            X = X[:, np.flatnonzero(gex)]
            names = [n for n, g in zip(names, gex, strict=True) if g]
            ids = [i for i, g in zip(ids, gex, strict=True) if g]
    return X.tocsr(), barcodes, make_unique(names), ids


def _read_mtx(path: Path) -> sp.coo_matrix:
    """A coordinate Matrix Market file (the 10x layout), parsed and bounds-checked here.

    scipy's reader (fast_matrix_market) crashed the interpreter (SIGSEGV) on some
    damaged files; this parser only uses pandas and checks every index.
    """
    with _open_maybe_gz(path, "rt") as fh:
        banner = fh.readline().lower().split()
        if banner[:3] != ["%%matrixmarket", "matrix", "coordinate"] or len(banner) < 5:
            raise SlideError(None, f"{str(path)!r} is not a coordinate Matrix Market file (banner {banner[:5]})")
        field = banner[3]
        line = fh.readline()
        while line.startswith("%"):
            line = fh.readline()
        n_rows, n_cols, nnz = (int(v) for v in line.split())
        body = pd.read_csv(fh, sep=r"\s+", header=None, comment="%", dtype=np.float64) if nnz else pd.DataFrame()
    n_fields = 2 if field == "pattern" else 3
    if body.shape != (nnz, n_fields) and not (nnz == 0 and body.empty):
        raise SlideError(None, f"{str(path)!r}: {body.shape[0]} x {body.shape[1]} entries, header says {nnz} x {n_fields}")
    values = body.to_numpy() if nnz else np.zeros((0, n_fields))
    rows, cols = values[:, 0] - 1, values[:, 1] - 1
    data = values[:, 2] if n_fields == 3 else np.ones(len(values))
    inside = (rows >= 0) & (rows < n_rows) & (cols >= 0) & (cols < n_cols) & (rows == np.round(rows)) & (cols == np.round(cols))
    if not inside.all() or not np.isfinite(data).all():
        raise SlideError(None, f"{str(path)!r}: entries outside the {n_rows} x {n_cols} matrix or not finite")
    return sp.coo_matrix((data, (rows.astype(np.int64), cols.astype(np.int64))), shape=(n_rows, n_cols))


def _read_tsv(path: Path) -> pd.DataFrame:
    """A header-less tab-separated table of strings (barcodes, features), errors naming the file."""
    try:
        return pd.read_csv(path, sep="\t", header=None, dtype=str)
    except (*READ_ERRORS, pd.errors.EmptyDataError) as exc:
        raise SlideError(None, f"cannot read {str(path)!r} as a tab-separated table: {exc}") from exc


def _open_maybe_gz(path: Path, mode: str) -> Any:
    return gzip.open(path, mode) if path.name.endswith(".gz") else open(path, mode)


def _strings(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


# ---------------------------------------------------------------------------
# Positions and scale factors
# ---------------------------------------------------------------------------


def read_positions(spatial_dir: PathLike, slide: str | None = None) -> tuple[pd.DataFrame, Path]:
    """Tissue positions indexed by barcode, from whichever of the three Space Ranger files exists.

    Parameters
    ----------
    spatial_dir
        The ``spatial/`` folder of a Space Ranger ``outs``: ``tissue_positions.parquet``,
        ``tissue_positions.csv`` (with header) or ``tissue_positions_list.csv`` (without).
    slide
        Slide id named in error messages and warnings.

    Returns
    -------
    positions : pandas.DataFrame
        Indexed by barcode, columns ``in_tissue, array_row, array_col,
        pxl_row_in_fullres, pxl_col_in_fullres``; in-tissue spots with NaN
        coordinates are dropped with a warning.
    path : pathlib.Path
        The file read.
    """
    spatial_dir = Path(spatial_dir)
    path = first_existing(spatial_dir, _POSITION_FILES)
    if path is None:
        raise MissingFileError(
            f"slide {slide!r}: no spot positions in {str(spatial_dir)!r}; expected one of {list(_POSITION_FILES)}"
        )
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            with open(path) as fh:
                first = fh.readline().split(",")[0].strip()
            has_header = first == "barcode"
            df = pd.read_csv(path, header=0 if has_header else None)
            if not has_header:
                if df.shape[1] != len(POSITION_COLUMNS):
                    raise SlideError(
                        slide,
                        f"{str(path)!r} has {df.shape[1]} columns; "
                        f"expected {len(POSITION_COLUMNS)}: {POSITION_COLUMNS}",
                    )
                df.columns = POSITION_COLUMNS
    except READ_ERRORS as exc:
        if isinstance(exc, SlideError):
            raise
        raise SlideError(slide, f"cannot read spot positions {str(path)!r}: {exc}") from exc
    missing = [c for c in POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise SlideError(slide, f"{str(path)!r} lacks columns {missing}; expected {POSITION_COLUMNS}")
    df = df[POSITION_COLUMNS].copy()
    df["barcode"] = df["barcode"].astype(str)
    if df["barcode"].duplicated().any():
        dup = df["barcode"][df["barcode"].duplicated()].unique()
        raise SlideError(slide, f"{str(path)!r} has duplicated barcodes: {list(dup[:5])}")
    for c in POSITION_COLUMNS[1:]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    nan = df[POSITION_COLUMNS[1:]].isna().any(axis=1) & (df["in_tissue"] == 1)
    if nan.any():
        if nan.sum() == (df["in_tissue"] == 1).sum():
            raise SlideError(slide, f"{str(path)!r}: every in-tissue spot has missing (NaN) coordinates")
        warnings.warn(
            f"slide {slide!r}: {int(nan.sum())} in-tissue spots of {str(path)!r} have missing (NaN) coordinates; "
            "dropped",
            UserWarning,
            stacklevel=3,
        )
        df = df[~nan]
    return df.set_index("barcode"), path


def _read_scalefactors(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlideError(None, f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SlideError(None, f"{str(path)!r} should hold a JSON object of scale factors")
    return data


def _positive(d: dict[str, Any], key: str, path: Path, slide: str) -> float:
    try:
        value = float(d[key])
    except (KeyError, TypeError, ValueError):
        raise SlideError(slide, f"{str(path)!r} has no numeric {key!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise SlideError(slide, f"{str(path)!r}: {key} must be positive, got {value}")
    return value
