"""The method protocol and registry.

Every expression-prediction method in he2st is a small class behind one
protocol, registered by name (like timm's model registry)::

    m = he2st.methods.create_method("ridge", encoder="efficientnet_lite0")
    m.fit(train_slides, panel)
    pred = m.predict(test_slide)        # (n_spots, n_genes), normalised scale
    m.save("model/"); m2 = he2st.methods.load_method("model/")

A method fits its target normalisation (:class:`he2st.pp.normalize.Normalizer`)
on the training slides it is given, so nothing about a test slide can leak into
a model through ``fit``.

Two scales: ``normalization`` is the scale :meth:`Method.predict` returns and
the protocol scores (default ``cpm_log1p``, the same for every method), and
``train_normalization`` the scale the network is trained on (its paper's; None
= the same). A method that trains on its own scale maps its outputs to the
evaluation scale with :meth:`Method.to_eval_scale`
(:meth:`he2st.pp.normalize.Normalizer.convert`, training constants only).

Physical scale. A method that reads image patches (one with a ``patch_px``
parameter) has a field of view in microns, ``patch_um_``, fixed at ``fit``:
the ``patch_um`` parameter when given, else ``patch_px`` times the median
microns per pixel (mpp) of the training slides. Every slide, training or test,
is then read at ``target_mpp = patch_um_ / patch_px``
(:meth:`Method.read_mpp`), so a model trained at 0.5 um/px sees the same tissue
on a 0.25 um/px image. A slide whose read would differ from ``patch_px`` pixels
by less than half a pixel is read as it is (nothing is resampled, cache keys
unchanged). When a training slide has no mpp and ``patch_um`` is None, the
model keeps the legacy pixel behaviour (``patch_um_ = None``: patches of
``patch_px`` image pixels on every slide). The field of view, the training mpp
and the identity of the encoder weights are saved with the model.
"""

from __future__ import annotations

import abc
import contextvars
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from he2st._utils import json_default_or_str, jsonable
from he2st.errors import (
    He2stInputError,
    MissingImageError,
    MissingMppError,
    RandomWeightsWarning,
    WeightsMismatchError,
)

#: Set while :meth:`Method.load` rebuilds a saved method: its encoder weights come from the saved
#: state, so the pretrained file need not exist on this machine.
_LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("he2st_method_loading", default=False)

STATE_FILE = "state.safetensors"
CONFIG_FILE = "method.json"

#: The shared parameter of every method that reads image patches (see the module docstring).
FIELD_OF_VIEW_DEFAULTS: dict[str, Any] = {"patch_um": None}

#: The shared parameter of every method on frozen encoder features: context views (:func:`parse_context`).
CONTEXT_DEFAULTS: dict[str, Any] = {"context": None}
#: The shared parameter of the feature-based methods that standardise features
#: (:mod:`he2st.methods.scaling`); ``"standard"`` is the scikit-learn StandardScaler.
SCALING_DEFAULTS: dict[str, Any] = {"feature_scaling": "standard"}


@dataclass(frozen=True)
class ContextSpec:
    """A parsed ``context`` parameter (see :func:`parse_context`).

    Parameters
    ----------
    fov
        Field-of-view multiples of the views, each concatenated in this order.
    neighbours
        Number of nearest spots whose mean 1x features are appended (0: none).
    """

    fov: tuple[float, ...] = (1.0,)
    neighbours: int = 0


def parse_context(spec: Any, method: str = "") -> ContextSpec | None:
    """Parse and check a ``context`` parameter; raise naming the option.

    A spot's features become those of its patch at each field-of-view multiple
    in ``fov`` (the method's field of view ``patch_um_`` times the multiple,
    around the same centre, resampled to ``patch_px`` pixels and encoded by the
    same encoder), concatenated, then, with ``neighbours: k``, the mean 1x
    features of the ``k`` nearest other spots of the same slide (by
    ``obsm["spatial"]``). ``{"fov": [1, 3, 5], "neighbours": 6}`` gives
    ``4 x dim`` features.

    Parameters
    ----------
    spec
        None (plain features), or a mapping with ``fov`` (a list of positive
        numbers; default ``[1]``) and/or ``neighbours`` (an integer >= 0;
        default 0).
    method
        Method name, quoted in messages.

    Returns
    -------
    ContextSpec or None
        None when ``spec`` is None.

    Raises
    ------
    He2stInputError
        Not a mapping, unknown keys, an empty or non-positive ``fov``, a
        repeated multiple, or a negative or non-integer ``neighbours``.
    """
    if spec is None:
        return None
    where = f"method {method!r}: " if method else ""
    if isinstance(spec, ContextSpec):
        return spec
    if not isinstance(spec, dict):
        raise He2stInputError(f"{where}context must be a mapping like {{'fov': [1, 3], 'neighbours': 6}} or None, got {spec!r}")
    unknown = set(spec) - {"fov", "neighbours"}
    if unknown:
        raise He2stInputError(f"{where}context has unknown key(s) {sorted(unknown)}; known: ['fov', 'neighbours']")
    fov = spec.get("fov", [1])
    if isinstance(fov, (int, float)) and not isinstance(fov, bool):
        fov = [fov]
    if (not isinstance(fov, (list, tuple)) or not fov
            or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and np.isfinite(f) and f > 0 for f in fov)):
        raise He2stInputError(f"{where}context fov must be a non-empty list of positive multiples of the field of view, got {fov!r}")
    if len(set(float(f) for f in fov)) != len(fov):
        raise He2stInputError(f"{where}context fov repeats a multiple: {fov!r}")
    k = spec.get("neighbours", 0)
    if k is None:
        k = 0
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise He2stInputError(f"{where}context neighbours must be an integer >= 0, got {k!r}")
    return ContextSpec(tuple(float(f) for f in fov), int(k))


@dataclass(frozen=True)
class EncoderUse:
    """An image encoder a method uses, as its parameters set it.

    Parameters
    ----------
    encoder
        Registry name (:func:`he2st.encoders.list_encoders`).
    weights
        A named weight set, a path, or None (random initialisation).
    trained
        Whether the method trains the encoder (fine-tuning or training from scratch);
        False for frozen features, whose quality is the weights'.
    """

    encoder: str
    weights: Any
    trained: bool = False


@dataclass(frozen=True)
class Capabilities:
    """What a method needs and offers.

    Declarations for users and tools: ``he2st methods`` and
    :func:`he2st.methods.method_info` show them, and
    :class:`~he2st.methods.ensemble.Ensemble` takes its members'. They are not
    enforced here: a method checks its own inputs (Hist2ST's ``regclass``
    variant, for example, refuses training slides without labels).

    Parameters
    ----------
    needs_tokens
        Uses patch tokens (ViT tokens or CNN feature-map cells), not one vector.
    needs_positions
        Uses spot positions (position encodings, spot graphs).
    needs_whole_slides
        Trains and predicts a whole slide (or window) at once.
    frozen_features
        Has a mode on cached frozen-encoder features.
    finetune
        Has a mode that trains the image encoder end to end.
    uncertainty
        :meth:`Method.predict_uncertainty` returns a standard deviation.
    needs_labels
        Training slides must carry spot labels (``obs["label"]``).
    """

    needs_tokens: bool = False
    needs_positions: bool = False
    needs_whole_slides: bool = False
    frozen_features: bool = True
    finetune: bool = False
    uncertainty: bool = False
    needs_labels: bool = False


def param_type_mismatch(value: Any, default: Any) -> str | None:
    """What a method parameter should be, when ``value`` is plainly of the wrong kind for ``default``.

    Only kinds a parameter cannot reasonably switch are checked (a number given as a
    string, a list as a scalar, a flag as text); None is always accepted (it turns an
    option off), and a string default also accepts a flag (e.g. ``"auto"`` or True).

    Parameters
    ----------
    value
        The value given.
    default
        The method's default for the parameter.

    Returns
    -------
    str or None
        E.g. ``"a number"``; None when ``value`` fits.
    """
    if value is None or default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, (int, float)):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, (str, bool)) else "a string"
    if isinstance(default, (list, tuple)):
        return None if isinstance(value, (list, tuple)) else "a list"
    if isinstance(default, dict):
        return None if isinstance(value, dict) else "a table (mapping)"
    return None


class Method(abc.ABC):
    """Base class of every method.

    Subclasses set ``name`` and ``capabilities``, list their defaults in
    ``defaults`` (the paper's values), and implement :meth:`_fit`,
    :meth:`predict`, :meth:`get_state` and :meth:`set_state`.

    Parameters common to all methods
    --------------------------------
    normalization
        Evaluation scale of :meth:`predict` and :meth:`targets`, see
        :mod:`he2st.pp.normalize` (default ``"cpm_log1p"``).
    train_normalization
        Scale of the training targets (:meth:`train_targets`), the paper's;
        None = ``normalization``. Only methods with
        ``supports_train_normalization`` accept a different one.
    seed
        Random seed; the same seed gives the same predictions.
    """

    name: ClassVar[str] = ""
    #: Method family: ``"baseline"``, ``"spot"``, ``"slide"``, ``"contrastive"``, ``"graph"`` or ``"meta"``.
    family: ClassVar[str] = ""
    #: The paper whose code the defaults follow (short citation), empty for he2st's own.
    paper: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    defaults: ClassVar[dict[str, Any]] = {}
    common_defaults: ClassVar[dict[str, Any]] = {"normalization": "cpm_log1p", "train_normalization": None, "seed": 0}
    #: Whether ``fit`` reads cached frozen features of its ``encoder``/``weights``/``patch_px`` (and ``context``),
    #: which a benchmark executor then computes first as tasks of their own (:meth:`feature_requests`).
    reads_frozen_features: ClassVar[bool] = False
    #: Whether training targets come from :meth:`train_targets` and predictions pass :meth:`to_eval_scale`.
    supports_train_normalization: ClassVar[bool] = False
    #: Values of ``feature_scaling`` the method accepts (methods with that parameter).
    _scaling_kinds: ClassVar[tuple[str, ...]] = ("standard", "floor", "robust", "slide", "none")

    def __init__(self, **params: Any) -> None:
        merged = {**self.common_defaults, **self.defaults}
        unknown = set(params) - set(merged)
        if unknown:
            raise He2stInputError(
                f"method {self.name!r}: unknown parameter(s) {sorted(unknown)}; "
                f"known: {sorted(merged)}"
            )
        for key, value in params.items():
            expected = param_type_mismatch(value, merged[key])
            if expected:
                raise He2stInputError(
                    f"method {self.name!r}: parameter {key!r} must be {expected} (like its default "
                    f"{merged[key]!r}), got {value!r}"
                )
        merged.update(params)
        self.params: dict[str, Any] = merged
        self.genes: list[str] | None = None
        self.normalizer_: Any = None
        self.train_normalizer_: Any = None
        #: Field of view of a patch in microns (None: patches in image pixels, the legacy behaviour).
        self.patch_um_: float | None = None
        #: Median microns per pixel of the training slides: the pixel frame of positions and windows.
        self.train_mpp_: float | None = None
        #: Encoder weights the model was trained with: ``{"encoder", "weights", "trained", "weights_id"}``.
        self.encoder_ids_: list[dict[str, Any]] = []
        um = merged.get("patch_um")
        if um is not None and not (isinstance(um, (int, float)) and not isinstance(um, bool) and np.isfinite(um) and um > 0):
            raise He2stInputError(f"method {self.name!r}: patch_um must be a positive number of microns or None, got {um!r}")
        parse_context(merged.get("context"), self.name)
        if "feature_scaling" in merged:
            from he2st.methods.scaling import check_scaling

            check_scaling(merged["feature_scaling"], self.name, self._scaling_kinds)
        self.check_weights()

    # -- encoder weights --------------------------------------------------
    def encoders(self) -> list[EncoderUse]:
        """The image encoders this method's parameters select (none for methods on pixels or counts).

        The default reads the ``encoder``, ``weights`` and ``mode`` parameters; a method
        whose encoder is chosen otherwise overrides it.

        Returns
        -------
        list of EncoderUse
            One entry per encoder (no network is built).
        """
        p = self.params
        if not p.get("encoder"):
            return []
        return [EncoderUse(str(p["encoder"]), p.get("weights"), trained=p.get("mode") == "finetune")]

    def feature_requests(self, train_slides: Sequence[Any], slides: Sequence[Any]) -> list[dict[str, Any]]:
        """The frozen-feature computations a fit on ``train_slides`` will ask the feature cache for.

        A benchmark executor (:mod:`he2st.benchmark.executor`) runs each request once
        per slide and encoder setting, as its own task, before the fits that read
        it, so parallel fits find the cache warm. The default is none: the method
        computes (and caches) whatever it needs during ``fit``. A request that is
        not exactly what ``fit`` reads only costs time, never changes a result.

        Parameters
        ----------
        train_slides
            The fold's training slides (they fix the field of view, ``patch_um_``).
        slides
            Every slide the fit and its predictions read.

        Returns
        -------
        list of dict
            ``{"slide", "encoder", "weights", "patch_px", "tta", "target_mpp"}``, the
            arguments of :func:`he2st.methods.nn.inputs.encoder_inputs`; none unless
            :attr:`reads_frozen_features`.
        """
        if not self.reads_frozen_features:
            return []
        return self._frozen_feature_requests(train_slides, slides, tta=bool(self.params.get("tta", False)))

    def _frozen_feature_requests(self, train_slides: Sequence[Any], slides: Sequence[Any], tta: bool) -> list[dict[str, Any]]:
        """Requests of a method reading frozen features with its ``encoder``/``weights``/``patch_px``.

        None with a stain normaliser: it is fitted on the training slides, so its
        features are specific to the fold.
        """
        from he2st.data.slide import meta

        p = self.params
        if p.get("stain") or not p.get("encoder"):
            return []
        from he2st.methods.nn.inputs import view_mpp

        self._fit_scale(list(train_slides))
        spec = parse_context(p.get("context"), self.name)
        # Context views: each field-of-view multiple is its own cached feature (the 1x view for neighbour means).
        fovs = (1.0,) if spec is None else tuple(dict.fromkeys(spec.fov + ((1.0,) if spec.neighbours else ())))
        out = []
        for s in slides:
            size = self._patch_px(s)
            base = self.read_mpp(s, size)
            for f in fovs:
                out.append({"slide": meta(s).slide_id, "encoder": str(p["encoder"]), "weights": p.get("weights"),
                            "patch_px": int(size), "tta": bool(tta),
                            "target_mpp": base if f == 1.0 else view_mpp(s, size, base, f)})
        return out

    def check_weights(self) -> None:
        """Resolve every named or given weights file now, so that a missing one fails at construction.

        Nothing is loaded or built; skipped while :meth:`load` rebuilds a saved method.

        Raises
        ------
        he2st.encoders.WeightsError
            A weights file is missing; the message lists every path tried.
        """
        if _LOADING.get():
            return
        uses = [u for u in self.encoders() if u.weights is not None]
        if uses:
            from he2st.encoders._base import resolve_weights

            for u in uses:
                resolve_weights(u.encoder, u.weights)

    @property
    def pretrained(self) -> bool | None:
        """True when every encoder starts from a weights file, False when one is random, None without encoders."""
        uses = self._weighted_encoders()
        return None if not uses else all(u.weights is not None for u in uses)

    def _weighted_encoders(self) -> list[EncoderUse]:
        # Statistics "encoders" (colour histograms) have no weights to be pretrained.
        from he2st.encoders._base import encoder_kind

        return [u for u in self.encoders() if encoder_kind(u.encoder) != "stats"]

    def _warn_random_weights(self) -> None:
        from he2st.encoders import get_spec

        for u in self._weighted_encoders():
            if u.weights is None and not u.trained:
                named = sorted(get_spec(u.encoder).named_weights)
                how = f"weights={named[0]!r} or a checkpoint path" if named else "weights=<checkpoint path>"
                warnings.warn(
                    RandomWeightsWarning(
                        f"method {self.name!r}: encoder {u.encoder!r} has random weights (weights=None) and is "
                        f"not trained, so its features carry no pretrained knowledge; pass {how} "
                        "for a meaningful model"
                    ),
                    stacklevel=3,
                )

    # -- protocol -------------------------------------------------------
    def fit(self, train_slides: Sequence[Any], genes: Any, val_slides: Sequence[Any] | None = None) -> Method:
        """Fit on training slides for a gene panel.

        Parameters
        ----------
        train_slides
            Slides (AnnData) with raw counts; only these are used to fit
            normalisation, scalers, banks and weights.
        genes
            A :class:`he2st.pp.genes.GenePanel` or a list of gene symbols.
        val_slides
            Optional validation slides (early stopping, model selection).

        Returns
        -------
        Method
            ``self``, fitted (``genes`` and ``normalizer_`` set).
        """
        from he2st.pp.normalize import Normalizer

        train_slides = list(train_slides)
        if not train_slides:
            raise He2stInputError(f"method {self.name!r}: fit needs at least one training slide")
        self.genes = _gene_list(genes)
        self.normalizer_ = Normalizer(self.params["normalization"]).fit(train_slides, self.genes)
        train_method = self.params.get("train_normalization") or self.params["normalization"]
        if train_method == self.normalizer_.method:
            self.train_normalizer_ = self.normalizer_
        elif not self.supports_train_normalization:
            raise He2stInputError(
                f"method {self.name!r} trains on its evaluation scale; "
                f"train_normalization={train_method!r} differs from normalization={self.normalizer_.method!r}"
            )
        else:
            self.train_normalizer_ = Normalizer(train_method).fit(train_slides, self.genes)
        self._fit_scale(train_slides)
        self.encoder_ids_ = self._encoder_ids()
        self._warn_random_weights()
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
        """Observed expression of a slide on the fitted panel and evaluation scale, dense float32."""
        self._check_fitted()
        return self.normalizer_.transform(slide, self.genes)

    def train_targets(self, slide: Any) -> np.ndarray:
        """Observed expression on the fitted panel and the TRAINING scale, dense float32.

        Parameters
        ----------
        slide
            A slide with raw counts for the panel.

        Returns
        -------
        numpy.ndarray
            ``(n_spots, n_genes)`` float32 on ``train_normalization``'s scale.
        """
        self._check_fitted()
        return (self.train_normalizer_ or self.normalizer_).transform(slide, self.genes)

    def to_eval_scale(self, values: np.ndarray) -> np.ndarray:
        """Predictions on the training scale -> the evaluation scale (identity when they agree).

        Parameters
        ----------
        values
            ``(..., n_genes)`` values on ``train_normalization``'s scale.

        Returns
        -------
        numpy.ndarray
            float32 values on ``normalization``'s scale; see
            :meth:`he2st.pp.normalize.Normalizer.convert` for the leak-free map.
        """
        self._check_fitted()
        train = self.train_normalizer_ or self.normalizer_
        return train.convert(values, self.normalizer_, self.genes)

    # -- physical scale and serving checks ------------------------------------------
    @property
    def reads_images(self) -> bool:
        """Whether the method predicts from image patches (it has a ``patch_px`` parameter)."""
        return "patch_px" in self.params

    def _patch_px(self, slide: Any) -> int:
        """Side of the patch given to the network for ``slide``, in output pixels."""
        return int(self.params["patch_px"])

    def _fit_scale(self, slides: Sequence[Any]) -> None:
        """Set :attr:`patch_um_` and :attr:`train_mpp_` from the training slides (see the module docstring)."""
        from he2st.data.slide import meta

        self.patch_um_ = self.train_mpp_ = None
        if not self.reads_images:
            return
        given = self.params.get("patch_um")
        mpps = [meta(s).mpp for s in slides]
        if given is None:
            if not slides or any(m is None for m in mpps):
                return  # legacy: patches in image pixels
            self.patch_um_ = float(np.median([self._patch_px(s) * float(meta(s).mpp) for s in slides]))
        else:
            for s in slides:
                self._slide_mpp(s, float(given))
            self.patch_um_ = float(given)
        self.train_mpp_ = float(np.median([float(m) for m in mpps]))

    def _slide_mpp(self, slide: Any, patch_um: float | None = None) -> float:
        """Microns per pixel of ``slide``; a specific error when unknown."""
        from he2st.data.slide import meta

        m = meta(slide)
        if m.mpp is None:
            um = self.patch_um_ if patch_um is None else patch_um
            raise MissingMppError(
                m.slide_id,
                f"its microns per pixel are unknown (uns['he2st']['mpp'] is None), but method {self.name!r} "
                f"reads patches of {um:g} um; set slide.uns['he2st']['mpp'] (from the scanner metadata, or "
                "the spot pitch in microns divided by the pitch in pixels), or pass mpp= to the reader",
            )
        return float(m.mpp)

    def read_mpp(self, slide: Any, size_px: int | None = None) -> float | None:
        """The ``target_mpp`` to read ``slide``'s patches at, so that they cover :attr:`patch_um_` microns.

        Parameters
        ----------
        slide
            A slide AnnData.
        size_px
            Side of the output patch (default: :meth:`_patch_px` of the slide).

        Returns
        -------
        float or None
            ``patch_um_ / size_px``; None without a field of view (legacy pixels)
            or when the slide's own pixels already give it (the read would
            differ from ``size_px`` by under half a pixel: nothing is resampled
            and feature-cache keys stay those of ``target_mpp=None``).

        Raises
        ------
        he2st.errors.MissingMppError
            The model has a field of view and the slide has no mpp.
        """
        if self.patch_um_ is None:
            return None
        size = self._patch_px(slide) if size_px is None else int(size_px)
        mpp = self._slide_mpp(slide)
        target = self.patch_um_ / size
        if round(self.patch_um_ / mpp) == size or abs(mpp - target) <= 1e-6 * target:
            return None
        return target

    def pixel_scale(self, slide: Any) -> float:
        """Factor from ``slide``'s pixels to the training pixel frame (``slide mpp / train_mpp_``).

        Spot coordinates, windows, radii and pixel positions of a slide are
        multiplied by it, so they mean the same microns as during training. 1.0
        without a field of view, or when the difference would move a patch by
        under half a pixel.

        Parameters
        ----------
        slide
            A slide AnnData.

        Returns
        -------
        float
            The factor.
        """
        if self.patch_um_ is None or self.train_mpp_ is None:
            return 1.0
        f = self._slide_mpp(slide) / self.train_mpp_
        return 1.0 if abs(f - 1.0) * self._patch_px(slide) < 0.5 else float(f)

    def _encoder_ids(self) -> list[dict[str, Any]]:
        """The weights identity of each encoder (sha256 of its file; None for a random init)."""
        from he2st.encoders._base import weights_id

        out = []
        for u in self._weighted_encoders():
            wid = None if u.weights is None else weights_id(u.encoder, u.weights)
            out.append({"encoder": u.encoder, "weights": None if u.weights is None else str(u.weights),
                        "trained": bool(u.trained), "weights_id": wid})
        return out

    def check_servable(self, slide: Any) -> None:
        """Refuse a slide this model cannot predict, with a specific error.

        Parameters
        ----------
        slide
            The slide to predict (or train on).

        Raises
        ------
        he2st.errors.MissingImageError
            The method reads images and the slide has none.
        he2st.errors.MissingMppError
            The model has a field of view in microns and the slide has no mpp.
        he2st.errors.WeightsMismatchError
            A frozen encoder's weights file now differs (sha256) from the one
            the model was trained with.
        """
        if not self.reads_images:
            return
        from he2st.data.slide import meta

        m = meta(slide)
        if not m.image_path:
            raise MissingImageError(
                m.slide_id,
                f"has no image (uns['he2st']['image_path'] is None); method {self.name!r} predicts from the H&E "
                "image of each spot",
            )
        if self.patch_um_ is not None:
            self._slide_mpp(slide)
        self.check_weights_identity()

    def check_weights_identity(self) -> None:
        """Check that every frozen encoder's weights file is the one the model was trained with.

        Raises
        ------
        he2st.errors.WeightsMismatchError
            A file's sha256 differs from the recorded one.
        """
        from he2st.encoders._base import resolve_weights, weights_id

        if not self.encoder_ids_:
            return  # not fitted, or saved before weights were recorded
        for rec, use in zip(self.encoder_ids_, self._weighted_encoders()):
            if use.trained or use.weights is None or not rec.get("weights_id"):
                continue  # trained encoders carry their weights in the state; random inits have no file
            now = weights_id(use.encoder, use.weights)
            if use.encoder != rec.get("encoder") or now != rec["weights_id"]:
                path = resolve_weights(use.encoder, use.weights)
                raise WeightsMismatchError(
                    f"method {self.name!r}: encoder {use.encoder!r} weights {str(use.weights)!r} resolve to "
                    f"{str(path)!r} (sha256 {now[:16]}...), but the model was trained on features of "
                    f"{rec.get('encoder')!r} weights with sha256 {rec['weights_id'][:16]}...; its predictions "
                    "would be meaningless. Restore the training weights file (see $HE2ST_WEIGHTS_DIR) or refit "
                    "the model"
                )

    def _serving_state(self) -> dict[str, Any]:
        """What :meth:`save` records for serving: field of view, training mpp, encoder weights."""
        return jsonable({"patch_um": self.patch_um_, "train_mpp": self.train_mpp_, "encoders": self.encoder_ids_})

    def _set_serving_state(self, state: dict[str, Any] | None) -> None:
        """Inverse of :meth:`_serving_state`; a model saved without it keeps the legacy pixel behaviour."""
        state = state or {}
        um, mpp = state.get("patch_um"), state.get("train_mpp")
        self.patch_um_ = None if um is None else float(um)
        self.train_mpp_ = None if mpp is None else float(mpp)
        self.encoder_ids_ = [dict(e) for e in state.get("encoders", [])]

    def card_info(self) -> dict[str, Any]:
        """A read-only summary of the model for its model card.

        Returns
        -------
        dict
            ``method``, ``family``, ``paper``, ``params``, ``genes`` (None before
            ``fit``), ``normalization``, ``train_normalization``, ``encoders``
            (name, weights, trained, pretrained, ``weights_id``: the sha256 of the
            weights file, or None for a random init or when unknown), ``patch_px``,
            ``patch_um`` (field of view in microns, None for pixel patches),
            ``train_mpp``, ``pretrained`` and ``fitted``; JSON values only.
        """
        fitted = self.genes is not None and self.normalizer_ is not None
        if fitted:
            norm = self.normalizer_.method
            train_norm = (self.train_normalizer_ or self.normalizer_).method
        else:
            norm = self.params.get("normalization")
            train_norm = self.params.get("train_normalization") or norm
        from he2st.encoders._base import encoder_kind

        recorded = list(self.encoder_ids_)
        if not recorded:
            recorded = [{"encoder": u.encoder, "weights": None if u.weights is None else str(u.weights),
                         "trained": bool(u.trained), "weights_id": _known_weights_id(u)}
                        for u in self._weighted_encoders()]
        # Every encoder in the order the method uses them; statistics "encoders" (colour
        # histograms) have no weights and are listed with weights_id None.
        encoders, rec = [], iter(recorded)
        for u in self.encoders():
            if encoder_kind(u.encoder) == "stats":
                e = {"encoder": u.encoder, "weights": None, "trained": False, "weights_id": None}
            else:
                e = next(rec, None) or {"encoder": u.encoder, "weights": None, "trained": bool(u.trained),
                                        "weights_id": None}
            encoders.append({**e, "pretrained": e.get("weights") is not None})
        return jsonable({
            "method": self.name,
            "family": self.family,
            "paper": self.paper,
            "params": dict(self.params),
            "genes": list(self.genes) if self.genes is not None else None,
            "normalization": norm,
            "train_normalization": train_norm,
            "encoders": encoders,
            "patch_px": self.params.get("patch_px"),
            "patch_um": self.patch_um_,
            "train_mpp": self.train_mpp_,
            "pretrained": self.pretrained,
            "fitted": fitted,
        })

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
                "train_normalizer": (self.train_normalizer_ or self.normalizer_).get_state(),
                "extra": self.get_extra(),
                "serving": self._serving_state(),
                "he2st_version": _version(),
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=json_default_or_str))
            state = {k: np.ascontiguousarray(v) for k, v in self.get_state().items()}
            save_file(state, str(tmp / STATE_FILE))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Method:
        """Load a method saved with :meth:`save` (no code is executed from the files).

        Parameters
        ----------
        path
            The folder :meth:`save` wrote.

        Returns
        -------
        Method
            The fitted method.

        Raises
        ------
        He2stInputError
            The folder is not a saved method: ``method.json`` missing, not JSON, or
            lacking keys; an unknown method; ``state.safetensors`` missing or damaged;
            a state that does not fit the method. The message names the file.
        """
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from he2st.pp.normalize import Normalizer

        path = Path(path)
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            raise He2stInputError(f"{str(path)!r}: not a saved he2st method (no {CONFIG_FILE})")
        try:
            config = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise He2stInputError(f"{str(cfg_file)!r} is not valid JSON ({exc}); expected the file Method.save writes") from exc
        missing = [k for k in ("method", "params", "genes", "normalizer") if not isinstance(config, dict) or k not in config]
        if missing:
            raise He2stInputError(f"{str(cfg_file)!r} lacks keys {missing}; expected the file Method.save writes")
        from he2st.methods.registry import get_method_class

        name = config["method"]
        if not isinstance(name, str):
            raise He2stInputError(f"{str(cfg_file)!r}: 'method' should be a method name, got {name!r}")
        klass = get_method_class(name) if cls is Method else cls
        if klass.name != name:
            raise He2stInputError(f"{str(path)!r} holds method {name!r}, not {klass.name!r}")
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise He2stInputError(f"{str(state_file)!r} does not exist: the saved method {name!r} is incomplete")
        try:
            state = load_file(str(state_file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise He2stInputError(f"{str(state_file)!r} is not a readable safetensors file: {exc}") from exc
        token = _LOADING.set(True)
        try:
            obj = klass(**config["params"])
            obj.genes = [str(g) for g in config["genes"]]
            obj.normalizer_ = Normalizer.from_state(config["normalizer"])
            obj.train_normalizer_ = Normalizer.from_state(config.get("train_normalizer") or config["normalizer"])
            obj._set_serving_state(config.get("serving"))
            obj.set_extra(config.get("extra", {}))
            obj.set_state(state)
        except He2stInputError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            # A hand-edited or foreign folder: parameters or arrays that do not fit the class.
            raise He2stInputError(
                f"{str(path)!r}: the saved {name!r} does not fit its class ({type(exc).__name__}: {exc})"
            ) from exc
        finally:
            _LOADING.reset(token)
        return obj

    # -- helpers --------------------------------------------------------
    def _check_choice(self, key: str, allowed: Sequence[Any]) -> None:
        """Raise a specific error when parameter ``key`` is not one of ``allowed``."""
        if self.params[key] not in allowed:
            raise He2stInputError(f"method {self.name!r}: {key} must be one of {tuple(allowed)}, got {self.params[key]!r}")

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


def _known_weights_id(use: EncoderUse) -> str | None:
    """sha256 of an encoder's weights file when it can be resolved now, else None."""
    if use.weights is None:
        return None
    try:
        from he2st.encoders._base import weights_id

        return weights_id(use.encoder, use.weights)
    except He2stInputError:
        return None


def _version() -> str:
    from he2st import __version__

    return __version__
