"""Reader for HEST-1k samples (Jaume et al. 2024, ``mahmoodlab/HEST``).

A HEST-1k download holds, per sample id ``<id>``:

- ``st/<id>.h5ad``: raw counts, ``obsm["spatial"]`` in the pixel frame of the WSI,
  ``obs`` ``array_row``, ``array_col``, ``in_tissue``;
- ``wsis/<id>.tif``: the pyramidal H&E whole-slide image;
- ``metadata/<id>.json``: ``pixel_size_um_estimated`` (or ``pixel_size_um_embedded``),
  ``spot_diameter`` and ``inter_spot_dist`` in µm, ``st_technology``, ``patient``, ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from he2st.errors import He2stInputError, SlideError
from he2st.io._common import MissingFileError, PathLike, require_file

_WSI_EXTS = (".tif", ".tiff", ".svs", ".ndpi", ".btf")
#: Spot diameter in µm by technology, used when the metadata lacks ``spot_diameter``.
_SPOT_UM = {"visium": 55.0, "spatial transcriptomics": 100.0, "st": 100.0}


def hest_sample_ids(root: PathLike) -> list[str]:
    """Sample ids of a HEST-1k folder (the stems of ``st/*.h5ad``).

    Parameters
    ----------
    root
        The HEST-1k folder.

    Returns
    -------
    list of str
        Sorted sample ids.
    """
    return sorted(p.stem for p in (Path(root) / "st").glob("*.h5ad"))


def is_hest_root(path: PathLike) -> bool:
    """True when ``path`` looks like a HEST-1k folder (``st/*.h5ad`` next to ``metadata/`` or ``wsis/``).

    Parameters
    ----------
    path
        Folder to test.

    Returns
    -------
    bool
    """
    p = Path(path)
    return (p / "st").is_dir() and ((p / "metadata").is_dir() or (p / "wsis").is_dir()) and bool(hest_sample_ids(p))


def read_hest(
    path: PathLike,
    sample_id: str | None = None,
    *,
    wsi: PathLike | None = None,
    metadata: PathLike | None = None,
    slide_id: str | None = None,
    patient: str | None = None,
    spot_diameter_px: float | None = None,
    mpp: float | None = None,
) -> Any:
    """Read one HEST-1k sample into a slide.

    Parameters
    ----------
    path
        The HEST folder (holding ``st/``, ``wsis/``, ``metadata/``), or the sample's ``st/<id>.h5ad``.
    sample_id
        Which sample of the folder; needed when it holds several.
    wsi, metadata
        Explicit files instead of ``wsis/<id>.tif`` and ``metadata/<id>.json``.
    slide_id
        Defaults to the sample id.
    patient
        Defaults to the metadata's ``patient`` (prefixed by the dataset title would be
        safer across datasets: HEST patient names such as ``"Patient 1"`` repeat), else the slide id.
    spot_diameter_px, mpp
        Defaults: ``spot_diameter`` (µm) / pixel size, and ``pixel_size_um_estimated``
        (``pixel_size_um_embedded`` when no estimate).

    Returns
    -------
    anndata.AnnData
        The slide, spots under tissue only, coordinates in the WSI frame (``scale = 1``).

    Raises
    ------
    MissingFileError
        The h5ad, WSI or metadata is missing.
    SlideError, ImageError
        Malformed content, spots outside the WSI, a WSI that is not an image.
    """
    import anndata as ad

    from he2st.io.h5ad import slide_from_anndata

    p = Path(path)
    if p.is_file() or p.suffix == ".h5ad":
        st = require_file(p, "HEST expression file")
        sample_id = sample_id or st.stem
        root = st.parent.parent if st.parent.name == "st" else st.parent
    else:
        if not p.is_dir():
            raise MissingFileError(f"HEST folder {str(p)!r} does not exist")
        root = p
        ids = hest_sample_ids(root)
        if not ids:
            raise MissingFileError(f"HEST folder {str(root)!r} has no st/<id>.h5ad files")
        if sample_id is None:
            if len(ids) > 1:
                raise He2stInputError(f"HEST folder {str(root)!r} holds {len(ids)} samples {ids[:10]}; pass sample_id")
            sample_id = ids[0]
        st = require_file(root / "st" / f"{sample_id}.h5ad", f"HEST expression file of sample {sample_id!r}")
    sid = slide_id or sample_id

    wsi_path = Path(wsi) if wsi is not None else _find_wsi(root, sample_id)
    if wsi_path is None:
        raise MissingFileError(
            f"slide {sid!r}: no whole-slide image for sample {sample_id!r}; expected "
            f"{str(root / 'wsis' / (sample_id + '.tif'))!r} (or pass wsi=)"
        )
    meta_path = Path(metadata) if metadata is not None else root / "metadata" / f"{sample_id}.json"
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SlideError(sid, f"HEST metadata {str(meta_path)!r} is not valid JSON: {exc}") from exc
    elif metadata is not None or mpp is None or spot_diameter_px is None:
        raise MissingFileError(
            f"slide {sid!r}: HEST metadata {str(meta_path)!r} does not exist; it gives the pixel size and "
            "spot diameter (or pass mpp and spot_diameter_px)"
        )

    notes = []
    mpp_source = "user" if mpp is not None else ""
    if mpp is None:
        for key in ("pixel_size_um_estimated", "pixel_size_um_embedded"):
            value = _number(meta.get(key))
            if value is not None and value > 0:
                mpp = value
                mpp_source = f"file:HEST metadata {key}"
                notes.append(f"mpp from {key}")
                break
        else:
            raise SlideError(
                sid, f"{str(meta_path)!r} has no positive pixel_size_um_estimated/pixel_size_um_embedded; pass mpp"
            )
    if spot_diameter_px is None:
        spot_um = _number(meta.get("spot_diameter"))
        if spot_um is None:
            tech = str(meta.get("st_technology", "")).strip().lower()
            spot_um = _SPOT_UM.get(tech)
        if spot_um is None or spot_um <= 0:
            raise SlideError(
                sid, f"{str(meta_path)!r} gives no spot_diameter (µm) nor a known st_technology; pass spot_diameter_px"
            )
        spot_diameter_px = spot_um / mpp
        notes.append(f"spot diameter {spot_um:g} µm / {mpp:g} µm/px")
    if patient is None:
        value = meta.get("patient")
        if isinstance(value, str) and value.strip() and value.strip().lower() not in ("nan", "none"):
            patient = value.strip()

    try:
        adata = ad.read_h5ad(st)
    except Exception as exc:  # h5py/anndata raise many types for a bad file
        raise SlideError(sid, f"{str(st)!r} is not a readable .h5ad file: {exc}") from exc
    # HEST h5ad files carry a downscaled-image library in uns["spatial"]; its
    # scale factors refer to that thumbnail, not to the WSI, so they are ignored.
    adata.uns.pop("spatial", None)
    return slide_from_anndata(
        adata,
        st,
        image=wsi_path,
        counts=None,
        slide_id=sid,
        patient=patient,
        spot_diameter_px=float(spot_diameter_px),
        mpp=float(mpp),
        mpp_source=mpp_source,
        reader="read_hest",
        notes=notes,
    )


def _find_wsi(root: Path, sample_id: str) -> Path | None:
    for ext in _WSI_EXTS:
        p = root / "wsis" / f"{sample_id}{ext}"
        if p.is_file():
            return p
    return None


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None
