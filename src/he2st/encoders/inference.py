"""Batched encoder inference: preprocessing, device and precision, the prefetching loop.

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

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from he2st._utils import progress
from he2st.errors import He2stInputError

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

    Returns
    -------
    torch.Tensor
        float32 ``(N, 3, input_size, input_size)``, contiguous.
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

    Parameters
    ----------
    precision
        ``"auto"``, ``"fp32"`` or ``"bf16"``.
    encoder
        The encoder that will run (its ``auto_bf16`` flag matters on CPU).
    device
        The device it will run on (None: as :func:`resolve_device`).

    Returns
    -------
    str
        ``"fp32"`` or ``"bf16"``.
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
    progress_bar: bool = True,
) -> np.ndarray:
    """Run ``encoder`` over uint8 images ``(N, H, W, 3)`` in batches; features ``(N, dim)`` float32.

    With ``tokens=True`` returns ``(N, T, token_dim)`` float16. ``precision`` is
    ``"fp32"`` or ``"bf16"`` (resolve ``"auto"`` with :func:`resolve_precision`).
    CNNs run channels-last (same float32 arithmetic, reordered memory: about twice
    as fast with oneDNN on CPU). ``num_workers`` threads prepare the next
    batches (stain normalisation, resize, normalisation) while the encoder runs.
    When ``stats`` is a dict it receives ``wait_s`` (time the encoder waited for
    batches: the data path's visible cost), ``forward_s`` (encoder time) and ``n``.

    Parameters
    ----------
    encoder
        A built :class:`~he2st.encoders.Encoder`; put in eval mode for the run and
        restored to its training mode afterwards.
    images
        uint8 RGB ``(N, H, W, 3)``, e.g. a read-only memory map of cached patches.
    batch_size
        Images per forward pass.
    precision
        ``"fp32"`` or ``"bf16"`` (autocast).
    tta
        Average over the 8 dihedral symmetries (pooled features only).
    tokens
        Return token outputs instead of pooled features.
    stain
        A fitted stain normaliser applied to each batch, or None.
    num_workers
        Threads preparing batches ahead (0: prepare in the main thread).
    device
        None (CUDA if available) or a torch device.
    description
        Label of the progress bar.
    stats
        Dict receiving the timings, or None.
    progress_bar
        Show a progress bar over the batches (False when the caller shows its own,
        e.g. the streaming extraction's bar over spots).

    Returns
    -------
    numpy.ndarray
        float32 ``(N, dim)``, or float16 ``(N, T, token_dim)`` with ``tokens=True``.
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
    if stain is not None and hasattr(stain, "with_source") and getattr(stain, "fixed_source_", None) is None:
        # One source-stain estimate for the whole slide: per-batch estimates would
        # give neighbouring batches different colours. A normaliser that already has
        # one (the streaming extraction estimates it once per slide) keeps it.
        stain = stain.with_source(images)

    def load(span: tuple[int, int]) -> Any:
        batch = np.array(images[span[0] : span[1]])  # copy out of a read-only memory map
        if stain is not None:
            batch = stain.transform(batch)
        x = preprocess(batch, info)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    try:
        return _loop(encoder, load, spans, n, num_workers, device, bf16, tta, tokens, description, stats, progress_bar)
    finally:
        encoder.train(was_training)  # a model being fine-tuned goes back to training mode


def _loop(
    encoder: Any, load: Any, spans: list[tuple[int, int]], n: int, num_workers: int, device: Any, bf16: bool,
    tta: bool, tokens: bool, description: str, stats: dict[str, float] | None, progress_bar: bool = True,
) -> np.ndarray:
    import time

    import torch

    from he2st.image.augment import dihedral

    out: np.ndarray | None = None
    wait = fwd = 0.0
    with torch.inference_mode(), _prefetch(load, spans, num_workers) as batches:
        pairs = zip(spans, batches)
        it = iter(progress(pairs, description=description, total=len(spans)) if progress_bar else pairs)
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
