"""Per-spot features and tokens of slides, cached: the public entry points.

:func:`get_features` is the one call methods make::

    X = get_features(slide, "densenet121", weights="~/models/densenet121.pth", patch_px=224)

It returns ``slide.obsm["X_densenet121"]`` when the slide already holds features
computed with the same settings, else reads them from the on-disk cache
(:mod:`he2st.encoders.cache`), else extracts patches
(:func:`he2st.image.extract_patches`, itself cached), runs the encoder
(:func:`~he2st.encoders.inference.run_encoder`) and writes both.

Large slides stream: above :data:`STREAM_MIN_SPOTS` spots (``$HE2ST_STREAM_MIN_SPOTS``,
or ``stream=True``) the spots are processed :data:`STREAM_CHUNK_SPOTS` at a time
(``$HE2ST_STREAM_CHUNK``, ``chunk_spots=``, rounded down to whole batches): a chunk's
patches are read through the lazy image (:class:`he2st.image.PatchReader`, no
patch cache) while the previous chunk is encoded, and each finished chunk is
appended to a partial cache entry (:class:`~he2st.encoders.cache.PartialCache`),
so memory is bounded by two chunks of patches, not by the slide, and a killed
run resumes from its last finished chunk. The finished entry holds the same
values the one-pass path gives (the encoder sees the same batches). With a
stain normaliser the slide's source stains are estimated once, from a seeded
sample of at most :data:`STREAM_STAIN_SAMPLE` spots (all spots when there are no
more; the one-pass path uses every patch), recorded as ``stain_source`` in the
settings when it is a sample.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from he2st._utils import progress
from he2st.encoders.cache import (
    FEATURES_VERSION,
    PartialCache,
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
    "STREAM_CHUNK_SPOTS",
    "STREAM_MIN_SPOTS",
    "STREAM_STAIN_SAMPLE",
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

#: Slides with more spots than this stream (``$HE2ST_STREAM_MIN_SPOTS`` overrides it).
STREAM_MIN_SPOTS = 4096
#: Spots per streamed chunk, rounded down to whole batches (``$HE2ST_STREAM_CHUNK`` overrides it).
STREAM_CHUNK_SPOTS = 512
#: Most spots whose patches estimate a streamed slide's source stains.
STREAM_STAIN_SAMPLE = 1024


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise He2stInputError(f"${name} must be a positive integer, got {raw!r}")
    return value


def _streaming(n_spots: int, stream: bool | None) -> bool:
    """Whether a slide of ``n_spots`` streams: ``stream`` when given, else above the threshold."""
    if stream is not None:
        return bool(stream)
    return n_spots > _env_int("HE2ST_STREAM_MIN_SPOTS", STREAM_MIN_SPOTS)


def _chunk_spots(chunk_spots: int | None, batch_size: int) -> int:
    """Spots per chunk: the option, else ``$HE2ST_STREAM_CHUNK``, else the default, in whole batches."""
    if chunk_spots is None:
        chunk_spots = _env_int("HE2ST_STREAM_CHUNK", STREAM_CHUNK_SPOTS)
    elif int(chunk_spots) < 1:
        raise He2stInputError(f"chunk_spots must be a positive integer, got {chunk_spots!r}")
    # Whole batches: the encoder then sees the same batches as in one pass.
    return max(1, int(chunk_spots) // batch_size) * batch_size


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
    stream: bool | None = None,
    chunk_spots: int | None = None,
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
    stream
        Extract chunk by chunk, resumably (see the module notes); None: when the
        slide has more than :data:`STREAM_MIN_SPOTS` spots (``$HE2ST_STREAM_MIN_SPOTS``).
    chunk_spots
        Spots per streamed chunk (rounded down to whole batches); None:
        ``$HE2ST_STREAM_CHUNK`` or :data:`STREAM_CHUNK_SPOTS`.

    Returns
    -------
    numpy.ndarray
        ``slide.obsm["X_<encoder>"]``, float32, rows aligned with ``slide.obs_names``.
        The settings are recorded in ``slide.uns["he2st_features"]["X_<encoder>"]``;
        a call with other settings recomputes (and overwrites) them.
    """
    return _features(
        slide, _LazyEncoder(encoder, weights, seed), weights, patch_px, tta, stain, batch_size, precision,
        target_mpp, cache, num_workers, device, seed, stream, chunk_spots,
    )


def _features(
    slide: Any, lazy: _LazyEncoder, weights: Any, patch_px: int, tta: bool, stain: Any, batch_size: int,
    precision: str, target_mpp: float | None, cache: bool, num_workers: int, device: Any, seed: int,
    stream: bool | None = None, chunk_spots: int | None = None,
) -> np.ndarray:
    from he2st.data.slide import meta

    m = meta(slide)
    streams = _streaming(slide.n_obs, stream)
    dev, prec, settings, path = _resolve(slide, lazy, weights, patch_px, target_mpp, tta, stain, precision, device,
                                         seed, cache, tokens=False, stream=streams)
    key = feature_key(lazy.name)
    recorded = slide.uns.get(UNS_KEY, {}).get(key)
    if key in slide.obsm and recorded is not None and _same(recorded, settings):
        return np.asarray(slide.obsm[key], dtype=np.float32)

    feats = read_cache(path, slide.n_obs) if path is not None else None
    if feats is None and streams:
        feats = _stream_extract(slide, lazy.get(), patch_px, target_mpp, tta, stain, batch_size, prec, num_workers,
                                dev, False, _chunk_spots(chunk_spots, batch_size), path, settings)
    elif feats is None:
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
             tokens: bool, stream: bool = False) -> tuple[Any, str, dict[str, Any], Path | None]:
    """Device, precision, the settings that key the cache, and the cache file (None without cache)."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, lazy.spec, dev)
    settings = feature_settings(lazy.ref, weights, patch_px, target_mpp, tta, stain, prec, seed)
    if stream and stain is not None and slide.n_obs > STREAM_STAIN_SAMPLE:
        # The source stains come from a sample of the spots, not all of them: other values, another key.
        settings["stain_source"] = f"sample{STREAM_STAIN_SAMPLE}"
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


def _stain_sample(n: int) -> np.ndarray:
    """Seeded, sorted positions of the spots whose patches estimate a streamed slide's stains."""
    if n <= STREAM_STAIN_SAMPLE:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=STREAM_STAIN_SAMPLE, replace=False))


def _stream_extract(
    slide: Any, enc: Any, patch_px: int, target_mpp: float | None, tta: bool, stain: Any, batch_size: int,
    precision: str, num_workers: int, device: Any, tokens: bool, chunk: int, path: Path | None,
    settings: dict[str, Any],
) -> np.ndarray:
    """Features (or tokens) of every spot, ``chunk`` spots at a time, resuming a partial cache entry.

    Reads the next chunk's patches in a background thread while this one is encoded;
    with a cache, each finished chunk is committed to the :class:`PartialCache` and
    the complete entry is read back from its final file.
    """
    from he2st.data.slide import meta
    from he2st.encoders.cache import entry_lock

    m = meta(slide)
    n = int(slide.n_obs)
    if n == 0:
        raise He2stInputError(f"slide {m.slide_id!r}: no spots to encode")
    if path is None:
        return _stream_chunks(slide, enc, patch_px, target_mpp, tta, stain, batch_size, precision, num_workers,
                              device, tokens, chunk, None, m.slide_id)
    with entry_lock(path):  # one writer per entry; a waiter then finds it done
        hit = read_cache(path, n, mmap=tokens)
        if hit is not None:
            return hit
        part = PartialCache(path, n, settings)
        _stream_chunks(slide, enc, patch_px, target_mpp, tta, stain, batch_size, precision, num_workers, device,
                       tokens, chunk, part, m.slide_id)
        part.finish(m.slide_id)
    result = read_cache(path, n, mmap=tokens)
    if result is None:  # pragma: no cover - only if the disk vanished under us
        raise He2stInputError(f"slide {m.slide_id!r}: streamed cache entry {path} could not be read back")
    return result


def _stream_chunks(
    slide: Any, enc: Any, patch_px: int, target_mpp: float | None, tta: bool, stain: Any, batch_size: int,
    precision: str, num_workers: int, device: Any, tokens: bool, chunk: int, part: PartialCache | None,
    slide_id: str,
) -> np.ndarray:
    """The chunk loop of :func:`_stream_extract`: rows ``[part.done, n)`` encoded into ``part`` (or memory)."""
    from concurrent.futures import ThreadPoolExecutor

    from he2st.image.patches import PatchReader

    n = int(slide.n_obs)
    out = part.array if part is not None else None
    start = part.done if part is not None else 0
    what = "tokens" if tokens else "features"
    spans = [(s, min(s + chunk, n)) for s in range(start, n, chunk)]
    with PatchReader(slide, patch_px, target_mpp) as reader:
        if spans and stain is not None and hasattr(stain, "with_source"):
            # One estimate for the whole slide, the same on every resume (seeded sample).
            stain = stain.with_source(reader.read(_stain_sample(n)))
        bar = iter(progress(range(start, n), description=f"{enc.info.name} {what} {slide_id}", total=n - start))
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="he2st-patches")
        try:
            ahead = pool.submit(reader.read, np.arange(*spans[0])) if spans else None
            for k, (s, e) in enumerate(spans):
                images = ahead.result()  # type: ignore[union-attr]
                ahead = pool.submit(reader.read, np.arange(*spans[k + 1])) if k + 1 < len(spans) else None
                y = run_encoder(
                    enc, images, batch_size=batch_size, precision=precision, tta=tta, tokens=tokens, stain=stain,
                    num_workers=num_workers, device=device, description=f"{enc.info.name} {what} {slide_id}",
                    progress_bar=False,
                )
                del images
                if out is None:
                    shape = (n, *y.shape[1:])
                    out = part.allocate(shape, y.dtype) if part is not None else np.empty(shape, dtype=y.dtype)
                if out.shape[1:] != y.shape[1:] or out.dtype != y.dtype:
                    raise He2stInputError(
                        f"slide {slide_id!r}: the encoder gave {y.dtype} {y.shape[1:]} rows, the partial cache "
                        f"holds {out.dtype} {out.shape[1:]}"
                    )
                out[s:e] = y
                if part is not None:
                    part.commit(e)
                for _ in range(e - s):
                    next(bar, None)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()  # type: ignore[attr-defined]
    return out  # type: ignore[return-value]


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
    stream: bool | None = None,
    chunk_spots: int | None = None,
) -> np.ndarray:
    """Token outputs of every spot, ``(n_spots, T, token_dim)`` **float16**, cached on disk.

    ViT tokens are CLS (+ registers) + patch tokens; CNN tokens are the cells of the
    last feature map (row-major). Not stored in ``obsm`` (they are large); a cache
    hit returns a read-only memory map. Parameters as :func:`get_features`.

    Parameters
    ----------
    slide, encoder, weights, patch_px, stain, batch_size, precision, target_mpp, cache, num_workers, device, seed
        As :func:`get_features` (tokens have no test-time augmentation).
    stream, chunk_spots
        Chunked, resumable extraction, as :func:`get_features`.

    Returns
    -------
    numpy.ndarray
        float16 ``(n_spots, T, token_dim)``, rows aligned with ``slide.obs_names``.
    """
    lazy = _LazyEncoder(encoder, weights, seed)
    streams = _streaming(slide.n_obs, stream)
    dev, prec, settings, path = _resolve(slide, lazy, weights, patch_px, target_mpp, False, stain, precision, device,
                                         seed, cache, tokens=True, stream=streams)
    if path is not None:
        hit = read_cache(path, slide.n_obs, mmap=True)
        if hit is not None:
            return hit
    if streams:
        return _stream_extract(slide, lazy.get(), patch_px, target_mpp, False, stain, batch_size, prec, num_workers,
                               dev, True, _chunk_spots(chunk_spots, batch_size), path, settings)
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
        ``target_mpp``, ``cache``, ``num_workers``, ``device``, ``seed``, ``stream``
        and ``chunk_spots``, as :func:`get_features`.

    Returns
    -------
    list of numpy.ndarray
        One float32 ``(n_spots, dim)`` array per slide.
    """
    slides = [slides] if hasattr(slides, "obsm") else list(slides)  # one slide, a Cohort or a list
    known = {"target_mpp", "cache", "num_workers", "device", "seed", "stream", "chunk_spots"}
    unknown = set(kw) - known
    if unknown:
        raise He2stInputError(f"extract_features: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    seed = kw.get("seed", 0)
    lazy = _LazyEncoder(encoder, weights, seed)
    return [
        _features(
            s, lazy, weights, patch_px, tta, stain, batch_size, precision, kw.get("target_mpp"),
            kw.get("cache", True), kw.get("num_workers", 1), kw.get("device"), seed, kw.get("stream"),
            kw.get("chunk_spots"),
        )
        for s in slides
    ]
