"""The slide data model.

A slide is a plain :class:`anndata.AnnData`:

- ``.X``: raw UMI counts, CSR, float32 (or, for sources that ship only
  normalised values, those values with ``uns["he2st"]["counts"] = False``);
  an image-only slide (an H&E image that was never sequenced, the input of
  prediction) has zero genes and ``counts = False``;
- ``.obs``: ``array_row``, ``array_col`` (ints), ``slide``, ``patient``
  (categoricals) and optional ``label``; ``obs_names`` unique within the slide;
- ``.obsm["spatial"]``: float64 (x, y) pixel centre of each spot in the slide's
  image (x = column, y = row);
- ``.uns["he2st"]``: a dict of metadata, see :data:`META_KEYS`.

This module builds such objects (:func:`make_slide`), validates them and reads
their metadata. It does not read files (see :mod:`he2st.io`) and does not open
images (see :func:`he2st.image.open_image`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from he2st.errors import NotCountsError, SlideError

UNS_KEY = "he2st"
SPATIAL_KEY = "spatial"

#: Keys of ``adata.uns["he2st"]`` and their meaning.
META_KEYS = {
    "slide_id": "slide identifier (str), also in obs['slide']",
    "patient": "patient identifier (str), also in obs['patient']",
    "image_path": "path of the full-resolution H&E image, or None",
    "spot_diameter_px": "spot diameter in image pixels (float)",
    "mpp": "microns per image pixel (float) or None when unknown",
    "mpp_source": "how mpp was obtained: 'file:<tag>', 'user', 'lattice:<assumption>', 'spot:<assumption>' or ''",
    "scale": "factor from the source's pixel frame to the image's pixels (float)",
    "counts": "True when .X holds raw counts; False for pre-normalised sources",
    "source": "reader that made the slide and the files it read (str)",
}


@dataclass(frozen=True)
class SlideMeta:
    """Typed view of ``adata.uns["he2st"]`` (see :data:`META_KEYS`).

    Parameters
    ----------
    slide_id
        Slide identifier, also in ``obs["slide"]``.
    patient
        Patient identifier, also in ``obs["patient"]``.
    image_path
        Path of the full-resolution H&E image, or None.
    spot_diameter_px
        Spot diameter in image pixels.
    mpp
        Microns per image pixel, or None when unknown.
    scale
        Factor from the source's pixel frame to the image's pixels.
    counts
        True when ``.X`` holds raw counts; False for pre-normalised sources.
    source
        Reader that made the slide and the files it read.
    mpp_source
        How ``mpp`` was obtained (see :data:`META_KEYS`); empty when not recorded.
    n_genes
        Number of genes of the slide (0 for an image-only slide; -1 when unknown).
    """

    slide_id: str
    patient: str
    image_path: str | None
    spot_diameter_px: float
    mpp: float | None
    scale: float
    counts: bool
    source: str
    mpp_source: str = ""
    n_genes: int = -1

    @property
    def image_only(self) -> bool:
        """True for a slide without expression (never sequenced)."""
        return not self.counts and self.n_genes == 0


def make_slide(
    X: Any,
    obs_names: Sequence[str],
    var_names: Sequence[str],
    spatial: np.ndarray,
    *,
    slide_id: str,
    patient: str | None = None,
    image_path: str | None = None,
    spot_diameter_px: float,
    mpp: float | None = None,
    scale: float = 1.0,
    array_row: Sequence[int] | None = None,
    array_col: Sequence[int] | None = None,
    labels: Sequence[Any] | None = None,
    counts: bool = True,
    source: str = "",
    image_size: tuple[int, int] | None = None,
    mpp_source: str = "",
) -> Any:
    """Build and validate a slide AnnData.

    Parameters
    ----------
    X
        Spots x genes matrix (dense or sparse). Stored as CSR float32. ``None``
        (with no ``var_names`` and ``counts=False``) makes an image-only slide.
    obs_names, var_names
        Spot ids (unique) and gene symbols.
    spatial
        ``(n_spots, 2)`` pixel (x, y) of the spot centres in the image frame.
    slide_id, patient
        Identifiers; ``patient`` defaults to ``slide_id``.
    image_path
        Full-resolution H&E image, opened lazily later.
    spot_diameter_px
        Spot diameter in image pixels.
    mpp
        Microns per pixel, when known.
    scale
        Factor that was applied to the source's pixel coordinates to reach the image frame.
    array_row, array_col
        Integer array coordinates; derived from ``spatial`` ranks when absent.
    labels
        Optional per-spot annotation (e.g. pathologist region).
    counts
        Whether ``X`` holds raw counts. When True the values are checked to be
        finite, non-negative and integral.
    source
        Free text naming the reader and files, kept for provenance.
    image_size
        ``(width, height)`` of the image; when given, every spot centre must lie inside it.
    mpp_source
        How ``mpp`` was obtained, e.g. ``"file:aperio MPP"``, ``"user"`` or
        ``"lattice:ST 1k array, 200 um per unit"`` (recorded, see :data:`META_KEYS`).

    Returns
    -------
    anndata.AnnData
        The validated slide.

    Raises
    ------
    SlideError
        Empty slide, duplicated spot ids or genes, NaN coordinates, negative or
        non-integral counts, spots outside the image, shape mismatches, no
        genes on a slide that claims counts.
    """
    import anndata as ad

    obs_names = pd.Index([str(s) for s in obs_names])
    var_names = pd.Index([str(g) for g in var_names])
    n = len(obs_names)
    if n == 0:
        raise SlideError(slide_id, "has no spots (empty slide)")
    if X is None:
        X = sp.csr_matrix((n, len(var_names)), dtype=np.float32)
    if len(var_names) == 0 and counts:
        raise SlideError(slide_id, "has no genes (an image-only slide is made with counts=False)")
    dup = obs_names[obs_names.duplicated()].unique()
    if len(dup):
        raise SlideError(slide_id, f"duplicated spot ids: {list(dup[:5])}")
    dupg = var_names[var_names.duplicated()].unique()
    if len(dupg):
        raise SlideError(slide_id, f"duplicated gene names: {list(dupg[:5])}")

    X = _to_csr_float32(X, slide_id)
    if X.shape != (n, len(var_names)):
        raise SlideError(slide_id, f"matrix shape {X.shape} != ({n} spots, {len(var_names)} genes)")
    if counts:
        check_counts(X, slide_id)

    spatial = np.asarray(spatial, dtype=np.float64)
    if spatial.shape != (n, 2):
        raise SlideError(slide_id, f"spatial must be ({n}, 2), got {spatial.shape}")
    bad = ~np.isfinite(spatial).all(axis=1)
    if bad.any():
        raise SlideError(
            slide_id, f"{int(bad.sum())} spots have NaN/inf pixel coordinates, e.g. {list(obs_names[bad][:5])}"
        )
    if image_size is not None:
        w, h = image_size
        out = (spatial[:, 0] < 0) | (spatial[:, 1] < 0) | (spatial[:, 0] >= w) | (spatial[:, 1] >= h)
        if out.any():
            raise SlideError(
                slide_id,
                f"{int(out.sum())} spot centres lie outside the {w}x{h} image "
                f"(e.g. {list(obs_names[out][:3])} at {spatial[out][:3].round(1).tolist()}); "
                "are the coordinates in another pixel frame (scale factor)?",
            )
    if not np.isfinite(spot_diameter_px) or spot_diameter_px <= 0:
        raise SlideError(slide_id, f"spot_diameter_px must be positive, got {spot_diameter_px}")

    patient = patient if patient is not None else slide_id
    obs = pd.DataFrame(index=obs_names)
    obs["array_row"] = _array_coord(array_row, spatial[:, 1], n, slide_id, "array_row")
    obs["array_col"] = _array_coord(array_col, spatial[:, 0], n, slide_id, "array_col")
    obs["slide"] = pd.Categorical([slide_id] * n)
    obs["patient"] = pd.Categorical([patient] * n)
    if labels is not None:
        labels = list(labels)
        if len(labels) != n:
            raise SlideError(slide_id, f"{len(labels)} labels for {n} spots")
        obs["label"] = pd.Categorical(labels)

    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=var_names))
    adata.obsm[SPATIAL_KEY] = spatial
    adata.uns[UNS_KEY] = {
        "slide_id": str(slide_id),
        "patient": str(patient),
        "image_path": None if image_path is None else str(image_path),
        "spot_diameter_px": float(spot_diameter_px),
        "mpp": None if mpp is None else float(mpp),
        "scale": float(scale),
        "counts": bool(counts),
        "source": str(source),
        "mpp_source": str(mpp_source),
    }
    return adata


def _to_csr_float32(X: Any, slide_id: str) -> sp.csr_matrix:
    try:
        if sp.issparse(X):
            X = sp.csr_matrix(X, dtype=np.float32)
        else:
            arr = np.asarray(X)
            if arr.dtype.kind not in "biuf":
                arr = arr.astype(np.float64)  # raises on non-numeric strings
            X = sp.csr_matrix(arr.astype(np.float32))
    except (TypeError, ValueError) as exc:
        raise SlideError(slide_id, f"expression matrix is not numeric ({exc})") from exc
    return X


def check_counts(X: sp.spmatrix | np.ndarray, slide_id: str | None) -> None:
    """Raise :class:`SlideError` unless ``X`` holds finite, non-negative integers.

    Parameters
    ----------
    X
        Matrix to check, dense or sparse (only the stored values of a sparse one).
    slide_id
        Slide named in the error message, or None.

    Raises
    ------
    SlideError
        NaN or inf values, negative values, or non-integral values (normalised data).
    """
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    if data.size == 0:
        return
    if not np.isfinite(data).all():
        raise SlideError(slide_id, "counts contain NaN or inf")
    if (data < 0).any():
        raise SlideError(slide_id, f"counts contain negative values (min {data.min():g})")
    if not np.allclose(data, np.round(data)):
        raise SlideError(
            slide_id,
            "values are not integral: this looks like normalised data, not raw counts "
            "(read it with counts=False if that is intended)",
        )


def _array_coord(values: Sequence[int] | None, pixel: np.ndarray, n: int, slide_id: str, name: str) -> np.ndarray:
    if values is None:
        # Dense rank of the pixel coordinate: a stand-in grid index when the
        # source has none (plain h5ad files).
        return pd.Series(pixel).rank(method="dense").astype(int).to_numpy() - 1
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise SlideError(slide_id, f"{name} has {arr.shape[0]} values for {n} spots")
    if not np.isfinite(arr.astype(float)).all():
        raise SlideError(slide_id, f"{name} contains NaN")
    return arr.astype(int)


def meta(adata: Any) -> SlideMeta:
    """Return the he2st metadata of a slide, with a clear error if it is missing.

    Parameters
    ----------
    adata
        A slide (an AnnData with ``uns["he2st"]``).

    Returns
    -------
    SlideMeta
        The metadata; optional keys missing from older files take their defaults
        (patient = slide id, scale 1, counts True).

    Raises
    ------
    SlideError
        ``uns["he2st"]`` is missing.
    """
    try:
        m = adata.uns[UNS_KEY]
    except KeyError:
        raise SlideError(None, "AnnData has no uns['he2st']: build slides with he2st.io readers or make_slide") from None
    return SlideMeta(
        slide_id=str(m["slide_id"]),
        patient=str(m.get("patient", m["slide_id"])),
        image_path=m.get("image_path"),
        spot_diameter_px=float(m["spot_diameter_px"]),
        mpp=None if m.get("mpp") is None else float(m["mpp"]),
        scale=float(m.get("scale", 1.0)),
        counts=bool(m.get("counts", True)),
        source=str(m.get("source", "")),
        mpp_source=str(m.get("mpp_source", "")),
        n_genes=int(adata.n_vars),
    )


def slide_id(adata: Any) -> str:
    """Identifier of a slide.

    Parameters
    ----------
    adata
        A slide.

    Returns
    -------
    str
        ``uns["he2st"]["slide_id"]``.
    """
    return meta(adata).slide_id


def require_counts(adata: Any, operation: str) -> None:
    """Raise :class:`NotCountsError` if ``adata`` does not hold raw counts.

    Parameters
    ----------
    adata
        A slide.
    operation
        Name of the operation that needs counts, for the error message.

    Raises
    ------
    NotCountsError
        The slide's ``uns["he2st"]["counts"]`` is False (pre-normalised values).
    """
    m = meta(adata)
    if m.image_only:
        raise NotCountsError(
            f"slide {m.slide_id!r}: {operation} needs raw counts, but this is an image-only slide "
            f"(no expression; source: {m.source or 'unknown'})"
        )
    if not m.counts:
        raise NotCountsError(
            f"slide {m.slide_id!r}: {operation} needs raw counts, but this slide holds "
            f"pre-normalised values (source: {m.source or 'unknown'})"
        )


def validate_slide(adata: Any) -> SlideMeta:
    """Check that ``adata`` follows the slide data model; return its metadata.

    Parameters
    ----------
    adata
        The AnnData to check.

    Returns
    -------
    SlideMeta
        Its metadata.

    Raises
    ------
    SlideError
        Missing ``uns["he2st"]`` or ``obsm["spatial"]``, no spots, duplicated spot
        ids, or a missing ``obs`` column (``array_row``, ``array_col``, ``slide``, ``patient``).
    """
    m = meta(adata)
    if SPATIAL_KEY not in adata.obsm:
        raise SlideError(m.slide_id, "obsm['spatial'] is missing")
    if adata.n_obs == 0:
        raise SlideError(m.slide_id, "has no spots (empty slide)")
    if not adata.obs_names.is_unique:
        raise SlideError(m.slide_id, "spot ids are not unique")
    for col in ("array_row", "array_col", "slide", "patient"):
        if col not in adata.obs:
            raise SlideError(m.slide_id, f"obs[{col!r}] is missing")
    return m
