"""Per-spot features and tokens: preprocessing, batched inference, and the feature cache.

:func:`get_features` is the one call methods make::

    X = get_features(slide, "densenet121", weights="~/models/densenet121.pth", patch_px=224)

It returns ``slide.obsm["X_densenet121"]`` when the slide already holds features
computed with the same settings, else reads them from the on-disk cache, else
extracts patches (:func:`he2st.image.extract_patches`, itself cached), runs the
encoder and writes both.

Cache layout: ``default_cache_dir()/"features"/<encoder>/<key>.npy`` (float32,
``(n_spots, dim)``) and ``.../tokens/<encoder>/<key>.npy`` (float16,
``(n_spots, T, D)``), each with a JSON sidecar of its settings. The key hashes the
slide's content (the patch cache key: image file sha256, spot coordinates and
ids, patch size, resampling) with the encoder name, the weights' sha256 (or the
seed of a random init), stain normalisation (``StainNormalizer.cache_key()``),
test-time augmentation and numeric precision. Files are written atomically.

Precision: CNNs always run channels-last (the same float32 arithmetic in
another memory order, about twice as fast on CPU). ``precision="auto"`` adds
bfloat16 autocast for the ImageNet CNNs on CPUs with native bf16
(AVX512-BF16/AMX), where it is about twice as fast again; transformers stay in
float32 on CPU. On real H&E patches bf16 features keep a cosine similarity above
:data:`BF16_MIN_COSINE` to float32 ones (tested with EfficientNet-Lite0's
ImageNet weights: >= 0.996 on her2st spots). Featureless patches (blank glass,
flat colour) are the weak case: their small, bias-dominated features can drift
more in bf16; pass ``precision="fp32"`` when those matter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from he2st._utils import atomic_path, atomic_write_json, default_cache_dir, progress, sha256_arrays
from he2st.errors import He2stInputError

#: Bump when extraction changes in a way that changes feature values.
FEATURES_VERSION = 1
#: ``slide.uns`` entry recording the settings behind each ``obsm["X_<encoder>"]``.
UNS_KEY = "he2st_features"
#: bf16 features of CNNs keep at least this cosine similarity to float32 ones (tested).
BF16_MIN_COSINE = 0.99

PRECISIONS = ("auto", "fp32", "bf16")


# --------------------------------------------------------------------------- preprocessing


def preprocess(images: Any, info: Any, *, device: Any = None) -> Any:
    """uint8 RGB images -> normalised float tensor ``(N, 3, S, S)`` for an encoder.

    Parameters
    ----------
    images
        ``uint8`` array or tensor ``(N, H, W, 3)`` (or one image ``(H, W, 3)``).
    info
        The encoder's :class:`~he2st.encoders.EncoderInfo` (``input_size``, ``mean``, ``std``).
    device
        Where to put the result.

    Notes
    -----
    Images are scaled to [0, 1], resized to ``input_size`` with antialiased
    bilinear interpolation when their size differs, then normalised per channel.
    """
    import torch
    import torch.nn.functional as F

    if isinstance(images, torch.Tensor):
        x = images
    else:
        arr = np.asarray(images)
        if not (arr.flags.c_contiguous and arr.flags.writeable):  # torch wants writable memory
            arr = np.array(arr)
        x = torch.from_numpy(arr)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise He2stInputError(
            f"preprocess expects uint8 RGB images (N, H, W, 3), got {x.dtype} {tuple(x.shape)}"
        )
    x = x.to(device) if device is not None else x
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    s = int(info.input_size)
    if x.shape[-2:] != (s, s):
        x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(info.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(info.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


# --------------------------------------------------------------------------- precision and device


def _cpu_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - very old or exotic builds
        return False


def resolve_device(device: Any = None) -> Any:
    """``None`` -> CUDA when available, else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, encoder: Any, device: Any) -> str:
    """Resolve ``"auto"``: ``"bf16"`` on bf16 GPUs, and on bf16-capable CPUs for the CNNs registered
    with ``auto_bf16`` (all ImageNet CNNs; not the ConvMixer, not transformers); else ``"fp32"``.

    ``encoder`` is a registry name or an :class:`~he2st.encoders.Encoder`.
    """
    import torch

    from he2st.encoders._base import auto_bf16

    if precision not in PRECISIONS:
        raise He2stInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    device = resolve_device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and auto_bf16(encoder) and _cpu_has_bf16():
        return "bf16"
    return "fp32"


# --------------------------------------------------------------------------- inference


def run_encoder(
    encoder: Any,
    images: np.ndarray,
    *,
    batch_size: int = 32,
    precision: str = "fp32",
    tta: bool = False,
    tokens: bool = False,
    stain: Any = None,
    num_workers: int = 1,
    device: Any = None,
    description: str = "features",
    stats: dict[str, float] | None = None,
) -> np.ndarray:
    """Run ``encoder`` over uint8 images ``(N, H, W, 3)`` in batches; features ``(N, dim)`` float32.

    With ``tokens=True`` returns ``(N, T, token_dim)`` float16. ``precision`` is
    ``"fp32"`` or ``"bf16"`` (resolve ``"auto"`` with :func:`resolve_precision`).
    CNNs run channels-last (same float32 arithmetic, reordered memory: about twice
    as fast with oneDNN on CPU). ``num_workers`` threads prepare the next
    batches (stain normalisation, resize, normalisation) while the encoder runs.
    When ``stats`` is a dict it receives ``wait_s`` (time the encoder waited for
    batches: the data path's visible cost), ``forward_s`` (encoder time) and ``n``.
    """
    import torch

    if precision not in ("fp32", "bf16"):
        raise He2stInputError(f"run_encoder: precision must be 'fp32' or 'bf16', got {precision!r}")
    if batch_size < 1:
        raise He2stInputError(f"batch_size must be >= 1, got {batch_size}")
    info = encoder.info
    if tokens and not info.has_tokens:
        raise He2stInputError(f"encoder {info.name!r} has no tokens")
    if tokens and tta:
        raise He2stInputError("test-time augmentation moves tokens; it applies to pooled features only")
    device = resolve_device(device)
    was_training = encoder.training
    encoder.to(device).eval()  # BatchNorm running statistics, no dropout
    bf16 = precision == "bf16"
    channels_last = info.kind == "cnn"
    if channels_last:
        encoder.to(memory_format=torch.channels_last)

    n = int(images.shape[0])
    spans = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if stain is not None and hasattr(stain, "with_source"):
        # One source-stain estimate for the whole slide: per-batch estimates would
        # give neighbouring batches different colours.
        stain = stain.with_source(images)

    def load(span: tuple[int, int]) -> Any:
        batch = np.array(images[span[0] : span[1]])  # copy out of a read-only memory map
        if stain is not None:
            batch = stain.transform(batch)
        x = preprocess(batch, info)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    try:
        return _loop(encoder, load, spans, n, num_workers, device, bf16, tta, tokens, description, stats)
    finally:
        encoder.train(was_training)  # a model being fine-tuned goes back to training mode


def _loop(
    encoder: Any, load: Any, spans: list[tuple[int, int]], n: int, num_workers: int, device: Any, bf16: bool,
    tta: bool, tokens: bool, description: str, stats: dict[str, float] | None,
) -> np.ndarray:
    import time

    import torch

    from he2st.image.augment import dihedral

    out: np.ndarray | None = None
    wait = fwd = 0.0
    with torch.inference_mode(), _prefetch(load, spans, num_workers) as batches:
        it = iter(progress(zip(spans, batches), description=description, total=len(spans)))
        while True:
            t0 = time.perf_counter()
            try:
                (s, e), x = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            wait += t1 - t0
            x = x.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if tokens:
                    y = encoder.forward_tokens(x)
                elif tta:
                    # ST-Net's test-time augmentation: the 8 symmetries of the square, averaged.
                    y = sum(encoder(dihedral(x, k)).float() for k in range(8)) / 8.0
                else:
                    y = encoder(x)
            y = y.float().cpu().numpy()
            if out is None:
                out = np.empty((n, *y.shape[1:]), dtype=np.float16 if tokens else np.float32)
            out[s:e] = y
            fwd += time.perf_counter() - t1
    if stats is not None:
        stats.update(wait_s=wait, forward_s=fwd, n=n)
    if out is None:
        raise He2stInputError("no images to encode")
    return out


class _prefetch:
    """Context manager yielding ``load(span)`` for each span, ``workers`` batches ahead, in order."""

    def __init__(self, load: Any, spans: list[tuple[int, int]], workers: int) -> None:
        self.load, self.spans, self.workers = load, spans, max(0, int(workers))
        self.pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Iterator[Any]:
        if self.workers == 0:
            return (self.load(s) for s in self.spans)
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="he2st-load")
        return self._iter()

    def _iter(self) -> Iterator[Any]:
        assert self.pool is not None
        pending: list[Future] = []
        it = iter(self.spans)
        ahead = self.workers + 1  # bounded lookahead keeps memory to a few batches
        for span in it:
            pending.append(self.pool.submit(self.load, span))
            if len(pending) >= ahead:
                break
        while pending:
            fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append(self.pool.submit(self.load, nxt))
            yield fut.result()

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- settings and cache


def feature_key(encoder: str | Any) -> str:
    """``obsm`` key of an encoder's features: ``"X_<name>"``."""
    name = encoder if isinstance(encoder, str) else encoder.info.name
    return f"X_{name}"


def _settings(
    enc: Any,
    weights: Any,
    patch_px: int,
    target_mpp: float | None,
    tta: bool,
    stain: Any,
    precision: str,
    seed: int,
) -> dict[str, Any]:
    """What determines the features, as JSON/h5ad-safe values (no None)."""
    from he2st.encoders._base import Encoder, get_spec, weights_id

    if stain is not None and not hasattr(stain, "cache_key"):
        raise He2stInputError(
            f"stain must be a fitted he2st.image.stain.StainNormalizer (with cache_key()), got {type(stain).__name__}"
        )
    s: dict[str, Any] = {
        "version": FEATURES_VERSION,
        "patch_px": int(patch_px),
        "target_mpp": "none" if target_mpp is None else float(target_mpp),
        "tta": bool(tta),
        "stain": "none" if stain is None else str(stain.cache_key()),
        "precision": precision,
    }
    if isinstance(enc, Encoder):
        i = enc.info
        s.update(
            encoder=i.name, weights=state_id(enc), arch=i.arch, input_size=int(i.input_size),
            mean=[float(v) for v in i.mean], std=[float(v) for v in i.std], dim=int(i.dim),
        )
    else:
        spec = get_spec(enc)
        s.update(encoder=spec.name, weights=weights_id(spec.name, weights, seed), dim=int(spec.dim))
    return s


_STATE_MEMO: Any = None


def state_id(module: Any) -> str:
    """sha256 of a module's current parameters and buffers, memoised until any of them changes.

    A built encoder may have been fine-tuned or loaded since it was created, so its
    ``info.weights_id`` cannot identify its features; its actual tensors do. The
    digest is recomputed only when a tensor's version counter moves (every in-place
    update, e.g. an optimiser step or ``load_state_dict``, bumps it).
    """
    import hashlib
    import weakref

    import torch

    global _STATE_MEMO
    if _STATE_MEMO is None:
        _STATE_MEMO = weakref.WeakKeyDictionary()
    tensors = list(module.state_dict(keep_vars=True).items())
    versions = tuple(t._version for _, t in tensors)
    hit = _STATE_MEMO.get(module)
    if hit is not None and hit[0] == versions and hit[1] == [k for k, _ in tensors]:
        return hit[2]
    h = hashlib.sha256()
    for k, t in tensors:
        a = t.detach().to("cpu").contiguous()
        h.update(f"{k}|{a.dtype}|{tuple(a.shape)}".encode())
        h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    digest = "state-" + h.hexdigest()
    _STATE_MEMO[module] = (versions, [k for k, _ in tensors], digest)
    return digest


def _slide_key(slide: Any, patch_px: int, target_mpp: float | None) -> str:
    # The patch cache key already hashes what the patches depend on (image bytes,
    # spot centres and ids, patch size, resampling), with a memoised file hash.
    from he2st.image import PatchCache

    return PatchCache().key(slide, patch_px, target_mpp)


def _cache_path(settings: dict[str, Any], slide_key: str, tokens: bool) -> Path:
    key = sha256_arrays(slide_key, json.dumps(settings, sort_keys=True))
    root = default_cache_dir() / "features"
    sub = root / "tokens" / settings["encoder"] if tokens else root / settings["encoder"]
    return sub / f"{key}.npy"


def _read_cache(path: Path, n: int, mmap: bool = False) -> np.ndarray | None:
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        return None
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError):
        return None  # damaged: recompute, never trust
    return arr if arr.shape[0] == n else None


def _write_cache(path: Path, arr: np.ndarray, settings: dict[str, Any], slide: Any) -> None:
    from he2st.data.slide import meta

    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, arr)
    # The sidecar is written last: an entry without it is incomplete and ignored.
    atomic_write_json(
        path.with_suffix(".json"),
        {**settings, "slide_id": meta(slide).slide_id, "shape": list(arr.shape), "dtype": str(arr.dtype)},
    )


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

    feats = _read_cache(path, slide.n_obs) if path is not None else None
    if feats is None:
        feats = _extract(slide, lazy.get(), patch_px, target_mpp, tta, stain, batch_size, prec, num_workers, dev, False)
        if path is not None:
            _write_cache(path, feats, settings, slide)
    feats = np.asarray(feats, dtype=np.float32)
    if feats.shape[0] != slide.n_obs:  # pragma: no cover - guarded by _read_cache and _extract
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
    settings = _settings(lazy.ref, weights, patch_px, target_mpp, tta, stain, prec, seed)
    path = _cache_path(settings, _slide_key(slide, patch_px, target_mpp), tokens=tokens) if cache else None
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
    """
    lazy = _LazyEncoder(encoder, weights, seed)
    dev, prec, settings, path = _resolve(slide, lazy, weights, patch_px, target_mpp, False, stain, precision, device,
                                         seed, cache, tokens=True)
    if path is not None:
        hit = _read_cache(path, slide.n_obs, mmap=True)
        if hit is not None:
            return hit
    toks = _extract(slide, lazy.get(), patch_px, target_mpp, False, stain, batch_size, prec, num_workers, dev, True)
    if path is not None:
        _write_cache(path, toks, settings, slide)
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
