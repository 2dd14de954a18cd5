"""Image inputs of the neural methods, assembled once for every family.

Each family (spot, slide, contrastive) feeds its network either cached encoder
outputs (``mode="frozen"``) or raw spot patches that a backbone sees during
training (``mode="finetune"``). What they share lives here:

- :func:`encoder_inputs` / :func:`check_encoder_inputs`: frozen features or
  tokens of a slide, checked for shape, width and NaN/inf;
- :func:`context_features`: the ``context`` option (wider fields of view and
  neighbour means concatenated to each spot's features), for every family;
- :func:`image_inputs`: the frozen-or-finetune dispatch (cached features, or
  stain-normalised patches resized to the encoder's input size);
- :func:`resize_uint8`, :func:`to_unit`, :func:`unit_batch`: patch arrays to
  ``[0, 1]`` tensors, augmented while training;
- :func:`make_augmenter`: the augmentation callable of a preset;
- :class:`FeatureModel` / :class:`BackboneModel`: a head on standardised
  frozen features, or backbone + head on normalised pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from he2st.data.slide import meta
from he2st.errors import He2stInputError

__all__ = [
    "BackboneModel",
    "FeatureModel",
    "check_encoder_inputs",
    "context_features",
    "encoder_input_px",
    "encoder_inputs",
    "image_inputs",
    "make_augmenter",
    "neighbour_mean",
    "resize_uint8",
    "to_unit",
    "unit_batch",
    "view_mpp",
]


# -- frozen encoder outputs ------------------------------------------------------------


def check_encoder_inputs(
    x: np.ndarray, slide: Any, encoder: Any, *, what: str = "features", ndim: int = 2, dim: int | None = None
) -> np.ndarray:
    """Check cached encoder outputs of a slide; raise a message naming the slide.

    Parameters
    ----------
    x
        Encoder outputs, one row per spot.
    slide
        The slide they belong to (its id and spot count go into the messages).
    encoder
        Encoder name, quoted in the messages.
    what
        ``"features"`` or ``"tokens"``, used in the messages.
    ndim
        Expected number of axes (2 for features ``(n, d)``, 3 for tokens ``(n, T, D)``).
    dim
        Expected width of the last axis (the one the model was trained on), or None.

    Returns
    -------
    numpy.ndarray
        ``x`` itself.

    Raises
    ------
    He2stInputError
        Wrong shape or spot count, NaN/inf values, or a width other than ``dim``.
    """
    sid = meta(slide).slide_id
    if x.ndim != ndim or x.shape[0] != slide.n_obs:
        raise He2stInputError(f"slide {sid!r}: encoder {encoder!r} gave {what} of shape {x.shape} for {slide.n_obs} spots")
    if not np.isfinite(x).all():
        raise He2stInputError(f"slide {sid!r}: encoder {encoder!r} returned NaN/inf {what}")
    if dim is not None and x.shape[-1] != dim:
        raise He2stInputError(f"slide {sid!r}: {what} have {x.shape[-1]} dimensions, the model was trained on {dim}")
    return x


def encoder_inputs(
    slide: Any,
    encoder: str,
    weights: Any,
    patch_px: int,
    *,
    tokens: bool = False,
    tta: bool = False,
    stain: Any = None,
    dim: int | None = None,
    dtype: Any = np.float32,
    target_mpp: float | None = None,
    context: Any = None,
) -> np.ndarray:
    """Cached frozen features ``(n, d)`` or tokens ``(n, T, D)`` of a slide, checked.

    Parameters
    ----------
    slide
        A slide AnnData.
    encoder, weights, patch_px
        Encoder settings (see :func:`he2st.encoders.get_features`).
    tokens
        Return the encoder's tokens (:func:`he2st.encoders.get_tokens`) instead of pooled features.
    tta, stain
        Dihedral test-time averaging (features only) and a fitted stain normaliser.
    dim
        Width the model was trained on (checked when given).
    dtype
        Output dtype; None keeps the cache's own (tokens may be memory-mapped).
    target_mpp
        Resample the patches to this many microns per pixel (a method's
        :meth:`~he2st.methods.base.Method.read_mpp`); None reads ``patch_px``
        image pixels. Part of the feature-cache key only when not None.
    context
        A method's ``context`` parameter (:func:`he2st.methods.base.parse_context`):
        None gives the plain features; otherwise the features of each
        field-of-view multiple, concatenated, then the mean features of
        nearest spots (:func:`context_features`). Features only.

    Returns
    -------
    numpy.ndarray
        One row per spot of ``slide``.
    """
    from he2st.encoders import get_features, get_tokens
    from he2st.methods.base import parse_context

    spec = parse_context(context)
    if spec is not None:
        if tokens:
            raise He2stInputError(
                f"slide {meta(slide).slide_id!r}: the context option adds feature vectors and does not apply to "
                f"token inputs (encoder {encoder!r}); use context=None"
            )
        x = context_features(slide, encoder, weights, patch_px, spec, tta=tta, stain=stain, target_mpp=target_mpp)
        x = x if dtype is None else np.asarray(x, dtype=dtype)
        return check_encoder_inputs(x, slide, encoder, dim=dim)
    # target_mpp is passed only when set, so that callers (and test doubles) of the
    # pixel-only signature see exactly the calls they saw before.
    extra = {} if target_mpp is None else {"target_mpp": float(target_mpp)}
    if tokens:
        raw = get_tokens(slide, encoder, weights=weights, patch_px=patch_px, stain=stain, **extra)
    else:
        raw = get_features(slide, encoder=encoder, weights=weights, patch_px=patch_px, tta=tta, stain=stain, **extra)
    x = np.asarray(raw) if dtype is None else np.asarray(raw, dtype=dtype)
    return check_encoder_inputs(x, slide, encoder, what="tokens" if tokens else "features", ndim=3 if tokens else 2, dim=dim)


def view_mpp(slide: Any, patch_px: int, target_mpp: float | None, fov: float) -> float | None:
    """Microns per pixel of a context view ``fov`` times the method's field of view.

    Parameters
    ----------
    slide
        A slide AnnData.
    patch_px
        Side of every view in output pixels.
    target_mpp
        The 1x view's ``target_mpp`` (:meth:`~he2st.methods.base.Method.read_mpp`;
        None when the slide's own pixels give it).
    fov
        The multiple.

    Returns
    -------
    float or None
        None for the 1x view read as the slide's own pixels; otherwise
        ``fov`` times the 1x view's microns per pixel.

    Raises
    ------
    He2stInputError
        A view wider than 1x on a slide whose microns per pixel are unknown.
    """
    if fov == 1.0:
        return target_mpp
    if target_mpp is not None:
        return float(target_mpp) * fov
    m = meta(slide)
    if m.mpp is None:
        raise He2stInputError(
            f"slide {m.slide_id!r}: context fov {fov:g} needs the slide's microns per pixel "
            "(uns['he2st']['mpp'] is None); set it or use context fov [1]"
        )
    return float(m.mpp) * fov


def neighbour_mean(slide: Any, x: np.ndarray, k: int) -> np.ndarray:
    """Mean of ``x`` over each spot's ``k`` nearest other spots of the slide.

    Nearest by Euclidean distance between ``obsm["spatial"]`` positions (pixels;
    the ranking is the same in microns), the spot itself excluded; with fewer
    than ``k`` other spots, all of them; a slide of one spot gets its own row.
    On a Visium/ST hex lattice ``k=6`` is the first ring.

    Parameters
    ----------
    slide
        A slide AnnData (positions).
    x
        ``(n, d)`` features of its spots.
    k
        Number of neighbours.

    Returns
    -------
    numpy.ndarray
        ``(n, d)`` float64 means.
    """
    from scipy.spatial import cKDTree

    n = len(x)
    kk = min(int(k), n - 1)
    if kk < 1:
        return np.asarray(x, dtype=np.float64).copy()
    xy = np.asarray(slide.obsm["spatial"], dtype=np.float64)
    _, idx = cKDTree(xy).query(xy, k=kk + 1)
    idx = np.asarray(idx).reshape(n, kk + 1)
    rows = np.arange(n)[:, None]
    # Drop the spot itself (normally column 0; not always when another spot shares its position).
    own = idx == rows
    keep = np.where(own.any(axis=1, keepdims=True), ~own, np.arange(kk + 1)[None, :] < kk)
    nb = idx[keep].reshape(n, kk)
    return np.asarray(x, dtype=np.float64)[nb].mean(axis=1)


def context_features(
    slide: Any,
    encoder: str,
    weights: Any,
    patch_px: int,
    spec: Any,
    *,
    tta: bool = False,
    stain: Any = None,
    target_mpp: float | None = None,
) -> np.ndarray:
    """A slide's context features: one view per field-of-view multiple, then neighbour means.

    Each view ``f`` is the patch of ``f`` times the 1x field of view around the
    same spot centre, resampled to ``patch_px`` pixels (``target_mpp`` times
    ``f``; outside the image padded white) and encoded by the same encoder; each
    is read from, or written to, the feature cache like any features (its key
    holds the view's ``target_mpp``). With ``neighbours: k`` the mean 1x
    features of the ``k`` nearest other spots follow.

    Parameters
    ----------
    slide
        A slide AnnData.
    encoder, weights, patch_px
        Encoder settings (see :func:`he2st.encoders.get_features`).
    spec
        A :class:`he2st.methods.base.ContextSpec` or a ``context`` mapping.
    tta, stain
        As for :func:`encoder_inputs`.
    target_mpp
        The 1x view's microns per pixel (None: the slide's own pixels).

    Returns
    -------
    numpy.ndarray
        ``(n, dim * (len(fov) + (neighbours > 0)))`` float32.
    """
    from he2st.encoders import get_features
    from he2st.methods.base import parse_context

    spec = parse_context(spec)
    assert spec is not None

    def view(mpp: float | None) -> np.ndarray:
        extra = {} if mpp is None else {"target_mpp": float(mpp)}
        return np.asarray(get_features(slide, encoder=encoder, weights=weights, patch_px=patch_px, tta=tta,
                                       stain=stain, **extra), dtype=np.float32)

    views = {f: view(view_mpp(slide, patch_px, target_mpp, f)) for f in spec.fov}
    parts = [views[f] for f in spec.fov]
    if spec.neighbours:
        base = views[1.0] if 1.0 in views else view(target_mpp)
        parts.append(neighbour_mean(slide, base, spec.neighbours).astype(np.float32))
    return np.concatenate(parts, axis=1)


# -- patches -----------------------------------------------------------------------------


def resize_uint8(images: np.ndarray, size: int, chunk: int = 256) -> np.ndarray:
    """Resize uint8 patches to a square side (bilinear, antialiased).

    Parameters
    ----------
    images
        ``(n, h, w, 3)`` uint8 patches.
    size
        Output side in pixels.
    chunk
        Patches resized per torch call (bounds memory).

    Returns
    -------
    numpy.ndarray
        ``(n, size, size, 3)`` uint8, always a writable copy.
    """
    from torch.nn import functional as F

    if images.shape[1] == size and images.shape[2] == size:
        return np.array(images, dtype=np.uint8)  # a writable copy (cached patches are read-only maps)
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(np.array(images[i : i + chunk], dtype=np.uint8)).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + chunk] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, S, S, 3)`` -> float ``(B, 3, S, S)`` in ``[0, 1]``."""
    return x_uint8.permute(0, 3, 1, 2).float().div_(255.0)


def unit_batch(x_uint8: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """A uint8 patch batch as ``[0, 1]`` floats, augmented when ``augment`` is given.

    Parameters
    ----------
    x_uint8
        ``(B, S, S, 3)`` uint8 patches.
    augment
        Augmentation callable (training batches only), or None.

    Returns
    -------
    torch.Tensor
        ``(B, 3, S, S)`` float batch.
    """
    x = to_unit(x_uint8)
    return x if augment is None else augment(x)


def make_augmenter(preset: str | None, seed: int | None = None) -> Any:
    """The augmentation callable of a preset, or None for ``"none"``/None.

    Parameters
    ----------
    preset
        A preset of :func:`he2st.image.augment.make_augment`, ``"none"`` or None.
    seed
        Seed of the augmenter's private generator.

    Returns
    -------
    callable or None
        ``augment(x)`` on ``(B, 3, S, S)`` ``[0, 1]`` batches.
    """
    if preset in (None, "none"):
        return None
    from he2st.image.augment import make_augment

    return make_augment(preset, seed=seed)


def encoder_input_px(encoder: str, input_px: int | None = None) -> int:
    """Side of the patches a finetuned backbone sees: ``input_px``, or the encoder's input size.

    Parameters
    ----------
    encoder
        Encoder name (:func:`he2st.encoders.create_encoder`).
    input_px
        Explicit side; None asks the encoder.

    Returns
    -------
    int
        Side in pixels.
    """
    if input_px is not None:
        return int(input_px)
    from he2st.encoders import create_encoder

    return int(create_encoder(encoder, device="meta").info.input_size)


def image_inputs(
    slide: Any,
    mode: str,
    encoder: str,
    weights: Any,
    patch_px: int,
    *,
    input_px: int | None = None,
    tokens: bool = False,
    tta: bool = False,
    stain: Any = None,
    dim: int | None = None,
    patches: Any = None,
    target_mpp: float | None = None,
    context: Any = None,
) -> np.ndarray:
    """A slide's network inputs: frozen encoder outputs, or patches for finetuning.

    Parameters
    ----------
    slide
        A slide AnnData.
    mode
        ``"frozen"``: cached features/tokens (:func:`encoder_inputs`, float32
        features; tokens in the cache's dtype). ``"finetune"``: the spot
        patches, stain normalised when ``stain`` is set, resized to
        ``input_px`` (default: the encoder's input size).
    encoder, weights, patch_px
        Encoder settings; ``patch_px`` is the side cut around each spot.
    input_px
        Side of the finetuning patches (None: the encoder's input size).
    tokens, tta, stain, dim
        See :func:`encoder_inputs`; ``stain`` also normalises finetuning patches.
    patches
        Already extracted :class:`he2st.image.Patches` of the slide (finetune
        mode; extracted here when None).
    target_mpp
        Microns per pixel to resample the patches to (see :func:`encoder_inputs`).
    context
        Context views of frozen features (see :func:`encoder_inputs`); the
        finetune mode refuses it.

    Returns
    -------
    numpy.ndarray
        Frozen: float ``(n, d)`` / ``(n, T, D)``; finetune: uint8 ``(n, S, S, 3)``.
    """
    if mode == "frozen":
        return encoder_inputs(slide, encoder, weights, patch_px, tokens=tokens, tta=tta, stain=stain, dim=dim,
                              dtype=None if tokens else np.float32, target_mpp=target_mpp, context=context)
    if context is not None:
        raise He2stInputError(
            f"slide {meta(slide).slide_id!r}: the context option applies to frozen features (mode='frozen'), "
            f"not to mode={mode!r}; use context=None"
        )
    if patches is None:
        from he2st.image import extract_patches

        patches = extract_patches(slide, size_px=patch_px, target_mpp=target_mpp)
    images = np.asarray(patches.images)
    if stain is not None:
        images = stain.transform(images)
    return resize_uint8(images, encoder_input_px(encoder, input_px))


# -- models --------------------------------------------------------------------------------


class FeatureModel(nn.Module):
    """A head on standardised frozen features: ``head((x - shift) / scale)``.

    Parameters
    ----------
    head
        The trainable module on ``in_dim`` features.
    in_dim
        Feature width (size of the ``shift``/``scale`` buffers, identity until set).
    """

    def __init__(self, head: nn.Module, in_dim: int) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))

    def forward(self, x: torch.Tensor) -> Any:
        return self.head((x - self.shift) / self.scale)


class BackboneModel(nn.Module):
    """Backbone + head on ``[0, 1]`` RGB batches ``(B, 3, S, S)``; the encoder's normalisation is inside.

    Parameters
    ----------
    backbone
        Image encoder returning pooled features.
    head
        Module on the backbone's output.
    mean, std
        Per-channel pixel normalisation of the backbone.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> Any:
        return self.head(self.backbone((x - self.mean) / self.std))
