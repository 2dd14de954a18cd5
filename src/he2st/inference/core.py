"""``he2st.predict``: a fitted model on one slide, as the AnnData scanpy and squidpy draw.

The slide may be sequenced or image-only (an H&E image with spot positions and
no expression, see :func:`he2st.data.make_slide`): the model only ever sees an
image-only copy of it (:func:`image_only`), so its counts can never reach a
prediction, and both give the same values.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from he2st.data.slide import make_slide, validate_slide
from he2st.errors import He2stInputError
from he2st.inference.output import THUMBNAIL_MAX_SIDE, prediction_adata


def image_only(slide: Any) -> Any:
    """An image-only copy of a slide: same spots, positions, labels, image and metadata; no expression.

    Parameters
    ----------
    slide
        A slide, sequenced or not.

    Returns
    -------
    anndata.AnnData
        A new slide with zero genes and ``counts=False`` (``meta(s).image_only``);
        an image-only slide is returned as it is.
    """
    m = validate_slide(slide)
    if m.image_only:
        return slide
    labels = slide.obs["label"].to_numpy() if "label" in slide.obs else None
    return make_slide(
        None,
        slide.obs_names,
        [],
        np.asarray(slide.obsm["spatial"], dtype=np.float64),
        slide_id=m.slide_id,
        patient=m.patient,
        image_path=m.image_path,
        spot_diameter_px=m.spot_diameter_px,
        mpp=m.mpp,
        scale=m.scale,
        array_row=slide.obs["array_row"].to_numpy(),
        array_col=slide.obs["array_col"].to_numpy(),
        labels=labels,
        counts=False,
        source=f"image-only copy of: {m.source}" if m.source else "image-only copy",
        mpp_source=m.mpp_source,
    )


def _as_model(model: Any) -> Any:
    """A fitted Method, loading a model folder (verified against its card) when given a path."""
    if isinstance(model, (str, os.PathLike)):
        from he2st.inference.card import load_model

        model, _ = load_model(model)
    if not hasattr(model, "predict") or not hasattr(model, "genes"):
        raise He2stInputError(f"predict: expected a fitted he2st method or a model folder, got {type(model).__name__}")
    if getattr(model, "genes", None) is None:
        raise He2stInputError(f"method {getattr(model, 'name', '?')!r} is not fitted: call fit() or load a model folder")
    return model


def _check_values(values: Any, shape: tuple[int, int], what: str, name: str, slide_id: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32)
    if arr.shape != shape:
        raise He2stInputError(f"method {name!r} returned {what} of shape {arr.shape} for slide {slide_id!r}, expected {shape}")
    if not np.isfinite(arr).all():
        raise He2stInputError(f"method {name!r} returned non-finite {what} for slide {slide_id!r}")
    return arr


def predict(model: Any, slide: Any, *, uncertainty: bool = True, thumbnail_max_side: int | None = THUMBNAIL_MAX_SIDE) -> Any:
    """Predict a slide's expression with a fitted model; returns the prediction AnnData.

    Parameters
    ----------
    model
        A fitted method (:func:`he2st.methods.create_method` ... ``.fit``), or a
        model folder written by :func:`he2st.inference.save_model` (loaded and
        verified with :func:`he2st.inference.load_model`).
    slide
        The slide to predict: image-only (never sequenced) or sequenced (its
        counts are ignored); or the path of an H&E image (predicted on a grid like
        the model's training spots, which its card records; µm per pixel from the
        file) or of an ``.h5ad`` slide. For other spots or grids read the image
        with :func:`he2st.io.read_image` first.
    uncertainty
        Store the method's predictive standard deviation in ``layers["sd"]``
        when it gives one.
    thumbnail_max_side
        Longer side of the H&E thumbnail in ``uns["spatial"]`` (None or 0: none).

    Returns
    -------
    anndata.AnnData
        ``X`` predictions (dense float32, the method's evaluation scale),
        ``var_names`` the model's genes, ``obs``/``obsm["spatial"]`` from the
        slide, ``layers["sd"]`` (with uncertainty), ``uns["spatial"]`` (scanpy's
        layout) and ``uns["he2st_prediction"]`` (scale, method, digests); see
        :mod:`he2st.inference.output`.

    Raises
    ------
    he2st.errors.He2stInputError
        Not a slide, an unfitted model, a tampered or foreign model folder, or
        a method returning values of the wrong shape or non-finite ones.

    Examples
    --------
    >>> pred = he2st.predict(model, slide)
    >>> scanpy.pl.spatial(pred, color=pred.var_names[0], library_id=pred.uns["he2st_prediction"]["slide_id"])
    """
    model = _as_model(model)
    if isinstance(slide, (str, os.PathLike)):
        from he2st.inference.files import read_input

        slide = read_input(slide, card=getattr(model, "he2st_card_", None))
    m = validate_slide(slide)
    blind = image_only(slide)
    genes = list(model.genes)
    shape = (int(slide.n_obs), len(genes))
    name = str(getattr(model, "name", type(model).__name__))
    values = _check_values(model.predict(blind), shape, "predictions", name, m.slide_id)
    sd = None
    if uncertainty:
        raw = model.predict_uncertainty(blind)
        if raw is not None:
            sd = _check_values(raw, shape, "uncertainty", name, m.slide_id)
    card = getattr(model, "he2st_card_", None) or {}
    _warn_other_resolution(card, m)
    normalizer = getattr(model, "normalizer_", None)
    scale = getattr(normalizer, "method", None) or model.params.get("normalization", "")
    info = {
        "scale": str(scale),
        "method": name,
        "params_json": _params_json(model.params),
        "card_sha256": card.get("card_sha256"),
        "model_dir": card.get("model_dir"),
        "state_sha256": (card.get("files") or {}).get("state.safetensors"),
        "uncertainty": sd is not None,
        "input_image_only": bool(m.image_only),
    }
    return prediction_adata(slide, values, genes, sd=sd, info=info, thumbnail_max_side=thumbnail_max_side)


def _warn_other_resolution(card: dict[str, Any], m: Any) -> None:
    """Warn when a model with pixel patches (no field of view) meets a slide of another resolution.

    A model with a field of view in microns reads every slide at that field of
    view (:meth:`he2st.methods.base.Method.read_mpp`); one trained on slides
    without mpp cuts patches in pixels, which cover another area here.
    """
    info = card.get("model") or {}
    train_mpp = info.get("train_mpp")
    if info.get("patch_um") or not train_mpp or not m.mpp:
        return
    ratio = float(m.mpp) / float(train_mpp)
    if not 0.8 <= ratio <= 1.25:
        warnings.warn(
            f"slide {m.slide_id!r} has {m.mpp:.3g} um/px but the model cuts patches in pixels and was trained on "
            f"{float(train_mpp):.3g} um/px: its patches cover a field of view {ratio:.2g}x the training one; "
            "resample the image or retrain with patch_um",
            UserWarning,
            stacklevel=3,
        )


def _params_json(params: dict[str, Any]) -> str:
    import json

    from he2st._utils import json_default_or_str

    return json.dumps(params, sort_keys=True, default=json_default_or_str)
