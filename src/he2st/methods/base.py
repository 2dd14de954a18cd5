"""The method protocol and registry.

Every expression-prediction method in he2st is a small class behind one
protocol, registered by name (like timm's model registry)::

    m = he2st.methods.create_method("ridge", encoder="efficientnet_lite0")
    m.fit(train_slides, panel)
    pred = m.predict(test_slide)        # (n_spots, n_genes), normalised scale
    m.save("model/"); m2 = he2st.methods.load_method("model/")

A method fits its target normalisation (:class:`he2st.data.normalize.Normalizer`)
on the training slides it is given, so nothing about a test slide can leak into
a model through ``fit``.
"""

from __future__ import annotations

import abc
import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from he2st.errors import He2stInputError

STATE_FILE = "state.safetensors"
CONFIG_FILE = "method.json"


@dataclass(frozen=True)
class Capabilities:
    """What a method needs and offers; the runner reads these."""

    needs_tokens: bool = False
    needs_positions: bool = False
    needs_whole_slides: bool = False
    frozen_features: bool = True
    finetune: bool = False
    uncertainty: bool = False
    needs_labels: bool = False


class Method(abc.ABC):
    """Base class of every method.

    Subclasses set ``name`` and ``capabilities``, list their defaults in
    ``defaults`` (the paper's values), and implement :meth:`_fit`,
    :meth:`predict`, :meth:`get_state` and :meth:`set_state`.

    Parameters common to all methods
    --------------------------------
    normalization
        Target scale, see :func:`he2st.data.normalize.normalize` (default ``"cpm_log1p"``).
    seed
        Random seed; the same seed gives the same predictions.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    defaults: ClassVar[dict[str, Any]] = {}
    common_defaults: ClassVar[dict[str, Any]] = {"normalization": "cpm_log1p", "seed": 0}

    def __init__(self, **params: Any) -> None:
        merged = {**self.common_defaults, **self.defaults}
        unknown = set(params) - set(merged)
        if unknown:
            raise He2stInputError(
                f"method {self.name!r}: unknown parameter(s) {sorted(unknown)}; "
                f"known: {sorted(merged)}"
            )
        merged.update(params)
        self.params: dict[str, Any] = merged
        self.genes: list[str] | None = None
        self.normalizer_: Any = None

    # -- protocol -------------------------------------------------------
    def fit(self, train_slides: Sequence[Any], genes: Any, val_slides: Sequence[Any] | None = None) -> Method:
        """Fit on training slides for a gene panel.

        Parameters
        ----------
        train_slides
            Slides (AnnData) with raw counts; only these are used to fit
            normalisation, scalers, banks and weights.
        genes
            A :class:`he2st.data.genes.GenePanel` or a list of gene symbols.
        val_slides
            Optional validation slides (early stopping, model selection).
        """
        from he2st.data.normalize import Normalizer

        train_slides = list(train_slides)
        if not train_slides:
            raise He2stInputError(f"method {self.name!r}: fit needs at least one training slide")
        self.genes = _gene_list(genes)
        self.normalizer_ = Normalizer(self.params["normalization"]).fit(train_slides, self.genes)
        self._fit(train_slides, list(val_slides) if val_slides else None)
        return self

    @abc.abstractmethod
    def _fit(self, train_slides: list[Any], val_slides: list[Any] | None) -> None:
        """Method-specific training; ``self.genes`` and ``self.normalizer_`` are set."""

    @abc.abstractmethod
    def predict(self, slide: Any) -> np.ndarray:
        """Predict ``(n_spots, n_genes)`` expression in the normalised scale."""

    def predict_uncertainty(self, slide: Any) -> np.ndarray | None:
        """Per-spot, per-gene predictive standard deviation, or None if not supported."""
        return None

    def targets(self, slide: Any) -> np.ndarray:
        """Observed expression of a slide on the fitted panel and scale, dense float32."""
        self._check_fitted()
        return self.normalizer_.transform(slide, self.genes)

    # -- persistence ----------------------------------------------------
    @abc.abstractmethod
    def get_state(self) -> dict[str, np.ndarray]:
        """Learned arrays (weights, banks, scalers) by name."""

    @abc.abstractmethod
    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`get_state` returned (after ``genes`` and params are set)."""

    def get_extra(self) -> dict[str, Any]:
        """JSON-serialisable facts needed to rebuild the model before ``set_state``."""
        return {}

    def set_extra(self, extra: dict[str, Any]) -> None:
        """Inverse of :meth:`get_extra`."""

    def save(self, path: str | Path) -> Path:
        """Save to a directory: ``method.json`` and ``state.safetensors``.

        Written to a temporary directory and renamed, so an interrupted save
        never leaves a half-written model.
        """
        from safetensors.numpy import save_file

        from he2st._utils import atomic_dir

        self._check_fitted()
        path = Path(path)
        with atomic_dir(path) as tmp:
            config = {
                "method": self.name,
                "params": self.params,
                "genes": self.genes,
                "normalizer": self.normalizer_.get_state(),
                "extra": self.get_extra(),
                "he2st_version": _version(),
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=_json_safe))
            state = {k: np.ascontiguousarray(v) for k, v in self.get_state().items()}
            save_file(state, str(tmp / STATE_FILE))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Method:
        """Load a method saved with :meth:`save` (no code is executed from the files)."""
        from safetensors.numpy import load_file

        from he2st.data.normalize import Normalizer

        path = Path(path)
        cfg_file = path / CONFIG_FILE
        if not cfg_file.exists():
            raise He2stInputError(f"{path}: not a saved he2st method (no {CONFIG_FILE})")
        config = json.loads(cfg_file.read_text())
        klass = get_method_class(config["method"]) if cls is Method else cls
        if klass.name != config["method"]:
            raise He2stInputError(f"{path} holds method {config['method']!r}, not {klass.name!r}")
        obj = klass(**config["params"])
        obj.genes = list(config["genes"])
        obj.normalizer_ = Normalizer.from_state(config["normalizer"])
        obj.set_extra(config.get("extra", {}))
        obj.set_state(load_file(str(path / STATE_FILE)))
        return obj

    # -- helpers --------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.genes is None or self.normalizer_ is None:
            raise He2stInputError(f"method {self.name!r} is not fitted: call fit() first")

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({shown})"


def _gene_list(genes: Any) -> list[str]:
    names = list(getattr(genes, "genes", genes))
    if not names:
        raise He2stInputError("the gene panel is empty")
    return [str(g) for g in names]


def _json_safe(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)


def _version() -> str:
    from he2st import __version__

    return __version__


# -- registry -----------------------------------------------------------

# Built-in methods are listed by import path so that listing them (CLI
# ``--help``, ``list_methods()``) does not import torch.
_BUILTIN: dict[str, str] = {
    "mean": "he2st.methods.baselines:MeanPredictor",
    "ridge": "he2st.methods.baselines:RidgeProbe",
    "knn": "he2st.methods.baselines:KNNRetrieval",
    "stnet": "he2st.methods.stnet:STNet",
    "deepspace": "he2st.methods.deepspace:DeepSpaCE",
    "stimage": "he2st.methods.stimage:STimage",
    "ensemble": "he2st.methods.ensemble:Ensemble",
    "histogene": "he2st.methods.histogene:HisToGene",
    "hist2st": "he2st.methods.hist2st:Hist2ST",
    "thitogene": "he2st.methods.thitogene:THItoGene",
    "bleep": "he2st.methods.bleep:BLEEP",
    "mclstexp": "he2st.methods.mclstexp:MclSTExp",
    "cmrcnet": "he2st.methods.cmrcnet:CMRCNet",
}
_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator registering a :class:`Method` under ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"{cls!r} is not a he2st Method subclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"method name {name!r} is already registered to {existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    """Names of all registered methods, built-in and user-registered."""
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get_method_class(name: str) -> type[Method]:
    """The class registered under ``name`` (imports built-ins on demand)."""
    if name not in _REGISTRY:
        target = _BUILTIN.get(name)
        if target is None:
            raise He2stInputError(f"unknown method {name!r}; available: {list_methods()}")
        module, _, _ = target.partition(":")
        importlib.import_module(module)  # registers via the decorator
        if name not in _REGISTRY:
            raise RuntimeError(f"{target} did not register method {name!r}")
    return _REGISTRY[name]


def create_method(name: str, **params: Any) -> Method:
    """Instantiate a registered method with its paper's defaults overridden by ``params``."""
    return get_method_class(name)(**params)


def load_method(path: str | Path) -> Method:
    """Load any saved method; the class is read from ``method.json``."""
    return Method.load(path)
