"""Per-spot features and tokens of slides, cached: the public entry points.

:func:`get_features` is the one call methods make::

    X = get_features(slide, "densenet121", weights="~/models/densenet121.pth", patch_px=224)

It returns ``slide.obsm["X_densenet121"]`` when the slide already holds features
computed with the same settings, else reads them from the on-disk cache
(:mod:`he2st.encoders.cache`), else extracts patches
(:func:`he2st.image.extract_patches`, itself cached), runs the encoder
(:func:`~he2st.encoders.inference.run_encoder`) and writes both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from he2st.encoders.cache import (
    FEATURES_VERSION,
    cache_path,
    feature_settings,
    read_cache,
    slide_content_key,
    state_id,
    write_cache,
)
from he2st.encoders.inference import (
    BF16_MIN_COSINE,
    PRECISIONS,
    preprocess,
    resolve_device,
    resolve_precision,
    run_encoder,
)
from he2st.errors import He2stInputError

__all__ = [
    "BF16_MIN_COSINE",
    "FEATURES_VERSION",
    "PRECISIONS",
    "UNS_KEY",
    "extract_features",
    "feature_key",
    "get_features",
    "get_tokens",
    "preprocess",
    "resolve_device",
    "resolve_precision",
    "run_encoder",
    "state_id",
]

#: ``slide.uns`` entry recording the settings behind each ``obsm["X_<encoder>"]``.
UNS_KEY = "he2st_features"


def feature_key(encoder: str | Any) -> str:
    """``obsm`` key of an encoder's features: ``"X_<name>"``."""
    name = encoder if isinstance(encoder, str) else encoder.info.name
    return f"X_{name}"


class _LazyEncoder:
    """Builds the encoder on first use, so cache hits never pay for building (or loading) it."""

    def __init__(self, encoder: Any, weights: Any, seed: int) -> None:
        from he2st.encoders._base import Encoder

        if isinstance(encoder, Encoder):
            if weights is not None:
                raise He2stInputError("weights= applies to an encoder name; this Encoder is already built")
            self._enc: Any = encoder
        elif isinstance(encoder, str):
            self._enc = None
        else:
            raise He2stInputError(f"encoder must be a registry name or an Encoder, got {type(encoder).__name__}")
        self.spec, self.weights, self.seed = encoder, weights, seed

    @property
    def built(self) -> bool:
        return self._enc is not None

    def get(self) -> Any:
        if self._enc is None:
            from he2st.encoders._base import create_encoder

            self._enc = create_encoder(self.spec, self.weights, seed=self.seed)
        return self._enc

    @property
    def ref(self) -> Any:
        """The Encoder when one was given, else the registry name (for settings)."""
        return self._enc if not isinstance(self.spec, str) else self.spec

    @property
    def name(self) -> str:
        return self.spec if isinstance(self.spec, str) else self.spec.info.name


# --------------------------------------------------------------------------- public API


def get_features(
    slide: Any,
    encoder: str | Any = "efficientnet_lite0",
    weights: str | Path | None = None,
    patch_px: int = 224,
    tta: bool = False,
    stain: Any = None,
    batch_size: int = 32,
    precision: str = "auto",
    *,
    target_mpp: float | None = None,
    cache: bool = True,
    num_workers: int = 1,
    device: Any = None,
    seed: int = 0,
) -> np.ndarray:
    """Features of every spot of a slide, ``(n_spots, dim)`` float32, cached.

    Parameters
    ----------
    slide
        A slide AnnData with an image (``uns["he2st"]["image_path"]``).
    encoder
        Registry name (see :func:`~he2st.encoders.list_encoders`) or a built
        :class:`~he2st.encoders.Encoder`.
    weights
        For a name: ``None`` (seeded random init), a checkpoint path, or a named set
        (``"imagenet"`` for ``efficientnet_lite0``).
    patch_px
        Side of the patch cut around each spot, in image pixels (before resizing to
        the encoder's input size).
    tta
        Average features over the 8 dihedral symmetries of each patch (ST-Net).
    stain
        A fitted :class:`he2st.image.stain.StainNormalizer` applied to the patches, or None.
    batch_size
        Patches per forward pass.
    precision
        ``"auto"`` (bf16 + channels-last for CNNs on bf16 CPUs, see module notes),
        ``"fp32"`` or ``"bf16"``.
    target_mpp
        Resample patches to this many microns per pixel (needs the slide's ``mpp``).
    cache
        Read and write the on-disk cache (the result is stored in ``obsm`` either way).
    num_workers
        Threads preparing batches ahead of the encoder.
    device
        ``None`` (CUDA if available, else CPU) or a torch device.
    seed
        Seed of the random initialisation when ``weights`` is None.

    Returns
    -------
    numpy.ndarray
        ``slide.obsm["X_<encoder>"]``, float32, rows aligned with ``slide.obs_names``.
        The settings are recorded in ``slide.uns["he2st_features"]["X_<encoder>"]``;
        a call with other settings recomputes (and overwrites) them.
    """
    return _features(
        slide, _LazyEncoder(encoder, weights, seed), weights, patch_px, tta, stain, batch_size, precision,
        target_mpp, cache, num_workers, device, seed,
    )


def _features(
    slide: Any, lazy: _LazyEncoder, weights: Any, patch_px: int, tta: bool, stain: Any, batch_size: int,
    precision: str, target_mpp: float | None, cache: bool, num_workers: int, device: Any, seed: int,
) -> np.ndarray:
    from he2st.data.slide import meta

    m = meta(slide)
    dev, prec, settings, path = _resolve(slide, lazy, weights, patch_px, target_mpp, tta, stain, precision, device,
                                         seed, cache, tokens=False)
    key = feature_key(lazy.name)
    recorded = slide.uns.get(UNS_KEY, {}).get(key)
    if key in slide.obsm and recorded is not None and _same(recorded, settings):
        return np.asarray(slide.obsm[key], dtype=np.float32)

    feats = read_cache(path, slide.n_obs) if path is not None else None
    if feats is None:
        feats = _extract(slide, lazy.get(), patch_px, target_mpp, tta, stain, batch_size, prec, num_workers, dev, False)
        if path is not None:
            write_cache(path, feats, settings, slide)
    feats = np.asarray(feats, dtype=np.float32)
    if feats.shape[0] != slide.n_obs:  # pragma: no cover - guarded by read_cache and _extract
        raise He2stInputError(f"slide {m.slide_id!r}: {feats.shape[0]} feature rows for {slide.n_obs} spots")
    slide.obsm[key] = feats
    uns = dict(slide.uns.get(UNS_KEY, {}))
    uns[key] = settings
    slide.uns[UNS_KEY] = uns
    return feats


def _resolve(slide: Any, lazy: _LazyEncoder, weights: Any, patch_px: int, target_mpp: float | None, tta: bool,
             stain: Any, precision: str, device: Any, seed: int, cache: bool,
             tokens: bool) -> tuple[Any, str, dict[str, Any], Path | None]:
    """Device, precision, the settings that key the cache, and the cache file (None without cache)."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, lazy.spec, dev)
    settings = feature_settings(lazy.ref, weights, patch_px, target_mpp, tta, stain, prec, seed)
    path = cache_path(settings, slide_content_key(slide, patch_px, target_mpp), tokens=tokens) if cache else None
    return dev, prec, settings, path


def _same(recorded: Any, settings: dict[str, Any]) -> bool:
    # h5ad round trips turn lists into arrays and ints into numpy scalars: compare as JSON.
    def norm(d: Any) -> str:
        return json.dumps({k: (np.asarray(v).tolist() if isinstance(v, (list, np.ndarray, np.generic)) else v)
                           for k, v in dict(d).items()}, sort_keys=True)

    try:
        return norm(recorded) == norm(settings)
    except (TypeError, ValueError):
        return False


def _extract(
    slide: Any, enc: Any, patch_px: int, target_mpp: float | None, tta: bool, stain: Any, batch_size: int,
    precision: str, num_workers: int, device: Any, tokens: bool,
) -> np.ndarray:
    from he2st.data.slide import meta
    from he2st.image import extract_patches

    m = meta(slide)
    patches = extract_patches(slide, size_px=patch_px, target_mpp=target_mpp, cache=True)
    if list(patches.obs_names) != [str(s) for s in slide.obs_names]:
        raise He2stInputError(f"slide {m.slide_id!r}: patches are not aligned with obs_names")
    what = "tokens" if tokens else "features"
    return run_encoder(
        enc, patches.images, batch_size=batch_size, precision=precision, tta=tta, tokens=tokens, stain=stain,
        num_workers=num_workers, device=device, description=f"{enc.info.name} {what} {m.slide_id}",
    )


def get_tokens(
    slide: Any,
    encoder: str | Any,
    weights: str | Path | None = None,
    patch_px: int = 224,
    stain: Any = None,
    batch_size: int = 32,
    precision: str = "auto",
    *,
    target_mpp: float | None = None,
    cache: bool = True,
    num_workers: int = 1,
    device: Any = None,
    seed: int = 0,
) -> np.ndarray:
    """Token outputs of every spot, ``(n_spots, T, token_dim)`` **float16**, cached on disk.

    ViT tokens are CLS (+ registers) + patch tokens; CNN tokens are the cells of the
    last feature map (row-major). Not stored in ``obsm`` (they are large); a cache
    hit returns a read-only memory map. Parameters as :func:`get_features`.

    Parameters
    ----------
    slide, encoder, weights, patch_px, stain, batch_size, precision, target_mpp, cache, num_workers, device, seed
        As :func:`get_features` (tokens have no test-time augmentation).

    Returns
    -------
    numpy.ndarray
        float16 ``(n_spots, T, token_dim)``, rows aligned with ``slide.obs_names``.
    """
    lazy = _LazyEncoder(encoder, weights, seed)
    dev, prec, settings, path = _resolve(slide, lazy, weights, patch_px, target_mpp, False, stain, precision, device,
                                         seed, cache, tokens=True)
    if path is not None:
        hit = read_cache(path, slide.n_obs, mmap=True)
        if hit is not None:
            return hit
    toks = _extract(slide, lazy.get(), patch_px, target_mpp, False, stain, batch_size, prec, num_workers, dev, True)
    if path is not None:
        write_cache(path, toks, settings, slide)
    return toks


def extract_features(
    slides: Sequence[Any] | Any,
    encoder: str | Any = "efficientnet_lite0",
    weights: str | Path | None = None,
    patch_px: int = 224,
    tta: bool = False,
    stain: Any = None,
    batch_size: int = 32,
    precision: str = "auto",
    **kw: Any,
) -> list[np.ndarray]:
    """:func:`get_features` for every slide of a cohort (or list), building the encoder at most once.

    Returns the feature arrays in slide order; each slide also gets its ``obsm`` entry.

    Parameters
    ----------
    slides
        One slide, a :class:`~he2st.data.Cohort` or a sequence of slides.
    encoder, weights, patch_px, tta, stain, batch_size, precision
        As :func:`get_features`.
    **kw
        ``target_mpp``, ``cache``, ``num_workers``, ``device`` and ``seed``, as
        :func:`get_features`.

    Returns
    -------
    list of numpy.ndarray
        One float32 ``(n_spots, dim)`` array per slide.
    """
    slides = [slides] if hasattr(slides, "obsm") else list(slides)  # one slide, a Cohort or a list
    known = {"target_mpp", "cache", "num_workers", "device", "seed"}
    unknown = set(kw) - known
    if unknown:
        raise He2stInputError(f"extract_features: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    seed = kw.get("seed", 0)
    lazy = _LazyEncoder(encoder, weights, seed)
    return [
        _features(
            s, lazy, weights, patch_px, tta, stain, batch_size, precision, kw.get("target_mpp"),
            kw.get("cache", True), kw.get("num_workers", 1), kw.get("device"), seed,
        )
        for s in slides
    ]
