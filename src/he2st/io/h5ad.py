"""Reader for AnnData ``.h5ad`` files with spot coordinates (scanpy/squidpy, HEST, he2st's own)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from he2st.errors import InferredMppWarning, SlideError
from he2st.io._common import (
    PathLike,
    check_count_values,
    image_frame,
    is_raw_counts,
    logger,
    require_file,
)

_RESERVED_OBS = ("array_row", "array_col", "slide", "patient", "label")
_VISIUM_SPOT_UM = 55.0


def read_h5ad(
    path: PathLike,
    image: PathLike | None = None,
    counts: bool | None = None,
    slide_id: str | None = None,
    patient: str | None = None,
    spot_diameter_px: float | None = None,
    mpp: float | None = None,
    library_id: str | None = None,
    label_key: str | None = None,
    layer: str | None = None,
) -> Any:
    """Read any AnnData with ``obsm["spatial"]`` into a slide.

    Coordinates are taken as they are: they must be in the pixel frame of ``image``
    (``scale = 1``). Files written from a he2st slide keep their metadata
    (``uns["he2st"]``), which fills in every argument left as None.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    image
        The H&E image the coordinates refer to (full resolution for scanpy/squidpy
        Visium objects). Default: the one recorded in ``uns["he2st"]``, else none.
    counts
        Whether the matrix holds raw counts. None detects it: non-negative integers
        are counts; anything else is kept as pre-normalised values with
        ``uns["he2st"]["counts"] = False`` and a warning. When ``.X`` is not counts
        but ``layers["counts"]`` is, that layer is used (and the choice recorded).
    slide_id
        Default: ``uns["he2st"]``, else the single ``uns["spatial"]`` library id, else the file stem.
    patient
        Defaults to ``slide_id``.
    spot_diameter_px
        Default: ``uns["he2st"]``, else ``uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"]``.
    mpp
        Default: ``uns["he2st"]``, else 55 µm / spot diameter for Visium libraries
        (Space Ranger metadata present), else unknown (None).
    library_id
        Which ``uns["spatial"]`` library to use when there are several.
    label_key
        ``obs`` column to use as the per-spot label.
    layer
        Layer to read instead of ``.X``.

    Returns
    -------
    anndata.AnnData
        The slide; other ``obs``/``var``/``obsm`` entries are carried over.

    Raises
    ------
    MissingFileError, SlideError, ImageError
    """
    import anndata as ad

    path = require_file(path, "AnnData file")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for a bad file
        raise SlideError(None, f"{str(path)!r} is not a readable .h5ad file: {exc}") from exc
    return slide_from_anndata(
        adata,
        path,
        image=image,
        counts=counts,
        slide_id=slide_id,
        patient=patient,
        spot_diameter_px=spot_diameter_px,
        mpp=mpp,
        library_id=library_id,
        label_key=label_key,
        layer=layer,
        reader="read_h5ad",
    )


def slide_from_anndata(
    adata: Any,
    path: Path,
    *,
    image: PathLike | None = None,
    counts: bool | None = None,
    slide_id: str | None = None,
    patient: str | None = None,
    spot_diameter_px: float | None = None,
    mpp: float | None = None,
    library_id: str | None = None,
    label_key: str | None = None,
    layer: str | None = None,
    reader: str = "read_h5ad",
    notes: list[str] | None = None,
    mpp_source: str | None = None,
) -> Any:
    """Turn a loaded AnnData into a slide (shared by :func:`read_h5ad` and :func:`he2st.io.read_hest`).

    Spots with ``obs["in_tissue"] != 1`` and spots with NaN coordinates are dropped
    (the latter with a warning); what was dropped is recorded in the slide's
    ``uns["he2st"]["source"]``.

    Parameters
    ----------
    adata
        The loaded AnnData, with ``obsm["spatial"]`` pixel coordinates.
    path
        File it was read from, named in error messages and the provenance.
    image, counts, slide_id, patient, spot_diameter_px, mpp, library_id, label_key, layer
        As in :func:`read_h5ad`.
    reader
        Name of the calling reader, recorded in the provenance.
    notes
        Provenance notes of the caller, prepended to this function's own.
    mpp_source
        How the caller obtained ``mpp`` (recorded as ``uns["he2st"]["mpp_source"]``);
        None: ``"user"`` when ``mpp`` is given, else what this function infers.

    Returns
    -------
    anndata.AnnData
        The slide; other ``var`` columns, ``obs`` columns and ``obsm`` entries are carried over.

    Raises
    ------
    SlideError
        No ``obsm["spatial"]``, no spots, duplicated genes or spot ids, no spot
        diameter, or an unknown ``label_key``.
    """
    from he2st.data import make_slide

    notes = list(notes or [])
    prior = dict(adata.uns.get("he2st", {})) if isinstance(adata.uns.get("he2st"), dict) else {}
    lib, lib_data = _spatial_library(adata, library_id, path)
    sid = slide_id or prior.get("slide_id") or lib or path.stem
    sid = str(sid)

    if "spatial" not in adata.obsm:
        raise SlideError(sid, f"{str(path)!r} has no obsm['spatial'] (spot pixel coordinates)")
    if adata.n_obs == 0:
        raise SlideError(sid, f"{str(path)!r} has no spots (empty slide)")
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()
        raise SlideError(sid, f"{str(path)!r} has duplicated gene names {list(dup[:5])}; run var_names_make_unique()")
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()
        raise SlideError(sid, f"{str(path)!r} has duplicated spot ids: {list(dup[:5])}")

    if "in_tissue" in adata.obs:
        in_tissue = pd.to_numeric(adata.obs["in_tissue"], errors="coerce").to_numpy() == 1
        n_off = int((~in_tissue).sum())
        if n_off:
            if n_off == adata.n_obs:
                raise SlideError(sid, f"{str(path)!r}: no spot has in_tissue == 1 (empty slide)")
            adata = adata[in_tissue].copy()
            notes.append(f"{n_off} spots with in_tissue != 1 dropped")

    spatial = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if spatial.ndim != 2 or spatial.shape[1] < 2:
        raise SlideError(sid, f"{str(path)!r}: obsm['spatial'] has shape {spatial.shape}; expected (n_spots, 2)")
    spatial = spatial[:, :2]
    nan = ~np.isfinite(spatial).all(axis=1)
    if nan.any():
        if nan.all():
            raise SlideError(sid, f"{str(path)!r}: every spot has missing (NaN) coordinates")
        warnings.warn(
            f"slide {sid!r}: {int(nan.sum())} spots of {str(path)!r} have missing (NaN) coordinates; dropped",
            UserWarning,
            stacklevel=3,
        )
        adata = adata[~nan].copy()
        spatial = spatial[~nan]
        notes.append(f"{int(nan.sum())} spots with NaN coordinates dropped")

    X, counts, where = _choose_matrix(adata, layer, counts, path, sid, prior)
    notes.append(f"matrix from {where}" + ("" if counts else " (pre-normalised, not counts)"))

    scalefactors = (lib_data or {}).get("scalefactors", {}) if isinstance(lib_data, dict) else {}
    if spot_diameter_px is None:
        if prior.get("spot_diameter_px") is not None:
            spot_diameter_px = float(prior["spot_diameter_px"])
        elif scalefactors.get("spot_diameter_fullres") is not None:
            spot_diameter_px = float(scalefactors["spot_diameter_fullres"])
            notes.append(f"spot diameter from uns['spatial'][{lib!r}] scalefactors")
        else:
            raise SlideError(
                sid,
                f"{str(path)!r} records no spot diameter (no uns['spatial'][lib]['scalefactors']"
                "['spot_diameter_fullres']); pass spot_diameter_px",
            )
    if mpp_source is None:
        mpp_source = "user" if mpp is not None else ""
    if mpp is None:
        if prior.get("mpp") is not None:
            mpp = float(prior["mpp"])
            mpp_source = str(prior.get("mpp_source") or "file:uns['he2st']['mpp']")
        elif _is_visium(lib_data):
            mpp = _VISIUM_SPOT_UM / float(spot_diameter_px)
            mpp_source = "spot:Visium 55 µm spot diameter / scalefactors spot_diameter_fullres"
            notes.append("mpp = 55 µm / Visium spot diameter")
            warnings.warn(
                f"slide {sid!r}: {mpp:.4g} µm per pixel inferred (Visium 55 µm spot diameter / "
                "scalefactors spot_diameter_fullres); pass mpp= if the scanner's value is known",
                InferredMppWarning,
                stacklevel=3,
            )

    if image is None and prior.get("image_path"):
        if Path(prior["image_path"]).is_file():
            image = prior["image_path"]
        else:
            warnings.warn(
                f"slide {sid!r}: image {prior['image_path']!r} recorded in {str(path)!r} no longer exists; "
                "the slide has no image (pass image=)",
                UserWarning,
                stacklevel=3,
            )
    image_path, size = image_frame(image)
    scale = float(prior.get("scale", 1.0)) if prior else 1.0

    labels = None
    key = label_key or ("label" if "label" in adata.obs else None)
    if label_key is not None and label_key not in adata.obs:
        raise SlideError(sid, f"{str(path)!r} has no obs column {label_key!r}; columns: {list(adata.obs.columns)}")
    if key is not None:
        labels = adata.obs[key].astype(object).where(adata.obs[key].notna(), np.nan).tolist()

    def _obs_int(name: str) -> np.ndarray | None:
        return adata.obs[name].to_numpy() if name in adata.obs else None

    source = f"{reader}({str(path)!r}" + (f", image={image_path!r}" if image_path else "") + ")"
    if notes:
        source += ": " + "; ".join(notes)
    logger.info("slide %r: %s", sid, source)
    slide = make_slide(
        X,
        adata.obs_names,
        adata.var_names,
        spatial,
        slide_id=sid,
        patient=patient or prior.get("patient"),
        image_path=image_path,
        spot_diameter_px=float(spot_diameter_px),
        mpp=mpp,
        mpp_source=mpp_source,
        scale=scale,
        array_row=_obs_int("array_row"),
        array_col=_obs_int("array_col"),
        labels=labels,
        counts=counts,
        source=source,
        image_size=size,
    )
    # Carry over annotations the slide model does not define (gene ids, clusters, features).
    for col in adata.var.columns:
        slide.var[col] = adata.var[col].to_numpy()
    for col in adata.obs.columns:
        if col not in _RESERVED_OBS and col != key:
            slide.obs[col] = adata.obs[col].to_numpy()
    for k, v in adata.obsm.items():
        if k != "spatial" and getattr(v, "shape", (None,))[0] == slide.n_obs:
            slide.obsm[k] = v
    return slide


def _choose_matrix(
    adata: Any, layer: str | None, counts: bool | None, path: Path, sid: str, prior: dict[str, Any]
) -> tuple[Any, bool, str]:
    """The matrix to store, whether it is raw counts, and where it came from."""
    if layer is not None:
        if layer not in adata.layers:
            raise SlideError(sid, f"{str(path)!r} has no layer {layer!r}; layers: {list(adata.layers)}")
        X, where = adata.layers[layer], f"layers[{layer!r}]"
    else:
        X, where = adata.X, ".X"
    if X is None:
        raise SlideError(sid, f"{str(path)!r} has no expression matrix in {where}")
    if counts is None and prior.get("counts") is False:
        counts = False
    if counts is True:
        check_count_values(X, path, sid)
        return X, True, where
    if counts is False:
        return X, False, where
    if is_raw_counts(X):
        return X, True, where
    if layer is None and "counts" in adata.layers and is_raw_counts(adata.layers["counts"]):
        logger.info("slide %r: .X of %s is not raw counts; using layers['counts']", sid, path)
        return adata.layers["counts"], True, "layers['counts'] (.X is normalised)"
    warnings.warn(
        f"slide {sid!r}: {where} of {str(path)!r} is not raw counts (not all non-negative integers); "
        "kept as pre-normalised values (counts=False): count-based steps will refuse this slide",
        UserWarning,
        stacklevel=4,
    )
    return X, False, where


def _spatial_library(adata: Any, library_id: str | None, path: Path) -> tuple[str | None, dict[str, Any] | None]:
    """The scanpy/squidpy ``uns["spatial"]`` library to use, if any."""
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, dict) or not spatial:
        if library_id is not None:
            raise SlideError(library_id, f"{str(path)!r} has no uns['spatial'] libraries")
        return None, None
    if library_id is not None:
        if library_id not in spatial:
            raise SlideError(
                library_id, f"{str(path)!r} has no uns['spatial'][{library_id!r}]; libraries: {list(spatial)}"
            )
        return library_id, spatial[library_id]
    if len(spatial) > 1:
        raise SlideError(None, f"{str(path)!r} has several uns['spatial'] libraries {list(spatial)}; pass library_id")
    lib = next(iter(spatial))
    return str(lib), spatial[lib]


def _is_visium(lib_data: Any) -> bool:
    """True when a scanpy spatial library carries Space Ranger / Visium metadata."""
    if not isinstance(lib_data, dict):
        return False
    md = lib_data.get("metadata", {}) or {}
    text = " ".join(str(v) for v in md.values()).lower()
    return "spaceranger" in text or "spatial 3" in text or "visium" in text
