"""The prediction AnnData: laid out like a scanpy/squidpy Visium object, so their plots draw it as is.

A prediction of one slide is an :class:`anndata.AnnData` with

- ``X``: predicted expression, dense float32 ``(n_spots, n_genes)``, on the
  method's evaluation scale (``uns["he2st_prediction"]["scale"]``);
- ``var_names``: the model's genes;
- ``obs``: ``array_row``, ``array_col``, ``slide``, ``patient`` (and ``label``
  when the slide has one), indexed by spot id;
- ``obsm["spatial"]``: the spots' (x, y) pixel centres in the full-resolution
  image, as in the slide;
- ``layers["sd"]``: the predictive standard deviation, when the method gives
  one (the benchmark runner names it ``"uncertainty"``);
- ``uns["spatial"][library_id]``: ``images["hires"]`` (a thumbnail of the H&E
  image, uint8, never the whole full-resolution image), ``scalefactors``
  (``tissue_hires_scalef`` = thumbnail / full resolution,
  ``spot_diameter_fullres``, ``fiducial_diameter_fullres``) and ``metadata``;
  ``library_id`` is the slide id;
- ``uns["he2st_prediction"]``: what was predicted and how (scale, method,
  model digests, slide, image), see :func:`prediction_adata`.

``scanpy.pl.spatial(pred, color=gene, library_id=slide_id)`` and
``squidpy.pl.spatial_scatter(pred, color=gene)`` draw it unchanged.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from he2st.data.slide import meta
from he2st.errors import He2stInputError

#: Key of the prediction's own metadata in ``uns``.
PREDICTION_KEY = "he2st_prediction"
#: Longer side of the thumbnail stored in ``uns["spatial"]`` by default.
THUMBNAIL_MAX_SIDE = 2000
#: Visium's fiducial / spot diameter (65 um / 55 um), used for ``fiducial_diameter_fullres``.
FIDUCIAL_RATIO = 65.0 / 55.0

_THUMBS: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
_THUMBS_LOCK = threading.Lock()
_THUMBS_MAX = 4


def _thumbnail(path: str, max_side: int) -> tuple[np.ndarray, int, int]:
    """(thumbnail, full width, full height) of an image, the last few memoised (the runner reuses a slide)."""
    from he2st.image import open_image

    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, int(max_side))
    with _THUMBS_LOCK:
        hit = _THUMBS.get(key)
        if hit is not None:
            _THUMBS.move_to_end(key)
            return hit
    with open_image(path) as img:
        thumb = np.ascontiguousarray(img.thumbnail(max_side), dtype=np.uint8)
        value = (thumb, int(img.width), int(img.height))
    with _THUMBS_LOCK:
        _THUMBS[key] = value  # type: ignore[assignment]
        while len(_THUMBS) > _THUMBS_MAX:
            _THUMBS.popitem(last=False)
    return value


def spatial_library(slide: Any, *, thumbnail_max_side: int | None = THUMBNAIL_MAX_SIDE) -> dict[str, Any]:
    """The scanpy/squidpy ``uns["spatial"][library_id]`` entry of a slide, built from its image's thumbnail.

    Parameters
    ----------
    slide
        A slide (:func:`he2st.data.make_slide`); its image is opened lazily and
        only a thumbnail is read.
    thumbnail_max_side
        Longer side of the stored thumbnail in pixels; None or 0 stores no image
        (scale factors only). An image smaller than this is stored at full size.

    Returns
    -------
    dict
        ``{"images": {"hires": uint8 (h, w, 3)}, "scalefactors": {...}, "metadata": {...}}``;
        ``images`` is empty when the slide has no image file or none is wanted
        (a warning says so when the recorded file is missing).

    Raises
    ------
    he2st.errors.ImageError
        The image file exists but cannot be read.
    """
    m = meta(slide)
    images: dict[str, np.ndarray] = {}
    scalefactors: dict[str, float] = {
        "spot_diameter_fullres": float(m.spot_diameter_px),
        "fiducial_diameter_fullres": float(m.spot_diameter_px * FIDUCIAL_RATIO),
    }
    metadata: dict[str, Any] = {"source": "he2st", "slide_id": m.slide_id}
    if m.mpp is not None:
        metadata["mpp"] = float(m.mpp)
    if m.image_path:
        metadata["image_path"] = str(m.image_path)
    if thumbnail_max_side and m.image_path:
        if Path(m.image_path).is_file():
            thumb, width, height = _thumbnail(str(m.image_path), int(thumbnail_max_side))
            images["hires"] = thumb
            scalefactors["tissue_hires_scalef"] = float(thumb.shape[1] / width)
            metadata["image_width"], metadata["image_height"] = width, height
        else:
            warnings.warn(
                f"slide {m.slide_id!r}: image {m.image_path!r} does not exist; the prediction has no thumbnail",
                UserWarning,
                stacklevel=3,
            )
    if "tissue_hires_scalef" not in scalefactors:
        scalefactors["tissue_hires_scalef"] = 1.0
    return {"images": images, "scalefactors": scalefactors, "metadata": metadata}


def _dense(values: Any, shape: tuple[int, int], what: str, slide_id: str) -> np.ndarray:
    arr = values.toarray() if hasattr(values, "toarray") else np.asarray(values)
    arr = np.asarray(arr, dtype=np.float32)
    if arr.shape != shape:
        raise He2stInputError(f"slide {slide_id!r}: {what} has shape {arr.shape}, expected {shape} (spots x genes)")
    return np.ascontiguousarray(arr)


def _h5_safe(d: Mapping[str, Any]) -> dict[str, Any]:
    """A dict anndata can write to ``uns``: None values dropped, nested dicts too, lists kept."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, Mapping):
            out[str(k)] = _h5_safe(v)
        elif isinstance(v, (list, tuple)):
            out[str(k)] = [str(x) for x in v] if any(isinstance(x, str) for x in v) or not v else list(v)
        elif isinstance(v, (np.generic,)):
            out[str(k)] = v.item()
        else:
            out[str(k)] = v
    return out


def prediction_adata(
    slide: Any,
    predicted: Any,
    genes: Sequence[str],
    *,
    sd: Any = None,
    sd_layer: str = "sd",
    info: Mapping[str, Any] | None = None,
    thumbnail_max_side: int | None = THUMBNAIL_MAX_SIDE,
) -> Any:
    """Build the prediction AnnData of a slide (see the module docstring for the layout).

    Parameters
    ----------
    slide
        The slide that was predicted (sequenced or image-only); its spots,
        positions, labels and image are used, never its counts.
    predicted
        ``(n_spots, n_genes)`` predictions (stored dense float32 in ``X``).
    genes
        Gene names of the columns.
    sd
        Optional predictive standard deviation, same shape, stored in ``layers[sd_layer]``.
    sd_layer
        Name of that layer (``"sd"``; the benchmark runner keeps ``"uncertainty"``).
    info
        Entries of ``uns["he2st_prediction"]`` (e.g. ``scale``, ``method``,
        ``model_sha256``); ``slide_id``, ``image_path``, ``spot_diameter_px``,
        ``mpp`` (when known), ``library_id`` and ``he2st_version`` are added. None
        values are dropped (h5ad cannot store them).
    thumbnail_max_side
        Longer side of the H&E thumbnail in ``uns["spatial"]``; None or 0 stores none.

    Returns
    -------
    anndata.AnnData
        The prediction, ready for ``write_h5ad`` and for scanpy/squidpy's spatial plots.

    Raises
    ------
    he2st.errors.He2stInputError
        Predictions (or sd) of the wrong shape, or duplicated gene names.
    """
    import anndata as ad
    import pandas as pd

    from he2st import __version__

    m = meta(slide)
    genes = [str(g) for g in genes]
    if len(set(genes)) != len(genes):
        raise He2stInputError(f"slide {m.slide_id!r}: the predicted genes are not unique")
    shape = (int(slide.n_obs), len(genes))
    X = _dense(predicted, shape, "the prediction", m.slide_id)
    obs = pd.DataFrame(index=pd.Index(slide.obs_names.astype(str).copy()))
    for col in ("array_row", "array_col", "slide", "patient", "label"):
        if col in slide.obs:
            obs[col] = slide.obs[col].to_numpy()
    for col in ("slide", "patient", "label"):
        if col in obs:
            obs[col] = pd.Categorical(obs[col].astype(str) if col != "label" else obs[col])
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    a.obsm["spatial"] = np.asarray(slide.obsm["spatial"], dtype=np.float64).copy()
    if sd is not None:
        a.layers[sd_layer] = _dense(sd, shape, "the uncertainty (sd)", m.slide_id)
    library_id = m.slide_id
    a.uns["spatial"] = {library_id: spatial_library(slide, thumbnail_max_side=thumbnail_max_side)}
    record = {
        **dict(info or {}),
        "slide_id": m.slide_id,
        "patient": m.patient,
        "library_id": library_id,
        "image_path": str(m.image_path or ""),
        "spot_diameter_px": float(m.spot_diameter_px),
        "mpp": m.mpp,
        "he2st_version": __version__,
        "sd_layer": sd_layer if sd is not None else None,
    }
    a.uns[PREDICTION_KEY] = _h5_safe(record)
    return a


def write_h5ad(adata: Any, path: str | os.PathLike, *, compression: str | None = "gzip") -> Path:
    """Write an AnnData as ``.h5ad`` atomically, failing cleanly on a full disk.

    The file is built in memory and then written with plain file I/O through
    :func:`he2st._utils.atomic_path`: HDF5 writing straight to a disk that fills
    up leaves h5py objects that crash the interpreter when freed, whereas this
    raises :class:`he2st.errors.DiskFullError` and leaves nothing behind.

    Parameters
    ----------
    adata
        The AnnData (string columns become categoricals, as ``write_h5ad`` does).
    path
        The ``.h5ad`` file.
    compression
        HDF5 compression of the arrays (``"gzip"``, or None).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import io

    import h5py

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    from he2st._utils import atomic_path

    adata.strings_to_categoricals()
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        write_elem(f, "/", adata, dataset_kwargs={"compression": compression} if compression else {})
    path = Path(path)
    with atomic_path(path, suffix=".h5ad") as tmp, open(tmp, "wb") as fh:
        fh.write(buf.getbuffer())
    return path
