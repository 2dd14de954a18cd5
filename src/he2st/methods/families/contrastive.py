"""The machinery shared by the contrastive retrieval methods (BLEEP, mclSTExp, CMRCNet).

All three learn a joint embedding of a spot's image and its expression, then
predict a test spot from the expression of the reference spots whose
*expression* embeddings lie nearest its *image* embedding. A subclass of
:class:`ContrastiveRetrieval` says only how its two encoders and its training
loss are built (a :class:`RetrievalNet`); data assembly, training
(:func:`he2st.methods.nn.train.fit_module`), the reference bank, search,
aggregation, leakage guards and persistence live here once.

Modes
-----
``mode="frozen"`` (CPU default)
    Image features (or tokens, for methods with ``input_kind = "tokens"``)
    come from the encoder cache (:func:`he2st.encoders.get_features` /
    :func:`~he2st.encoders.get_tokens`); only the heads train. Features are
    standardised with the training spots' mean and sd (``standardize``).
``mode="finetune"``
    Encoder and heads train end to end on the spot patches, augmented with
    the method's preset (:func:`he2st.image.augment.make_augment`).

Reference bank
--------------
After training, every training spot's expression is embedded with the
expression encoder; those embeddings and the spots' normalised expression
form the bank (:class:`he2st.retrieval.ReferenceBank`). Slides that have
expression but no image can be added with ``reference_slides=`` (the
expression encoder needs no image): a list of slides, a
:class:`~he2st.data.Cohort`, or a JSON spec ``{"data": "her2st", "params":
{...}, "images": "without"}`` loaded with the benchmark runner's cohort
loader (``images``: ``"any"``, ``"with"`` or ``"without"``; ``"slides"``: an
optional list of ids). Reference slides are normalised with the normaliser
fitted on the training slides. After fitting, :meth:`add_reference_slides`
adds more.

Reference slides sequenced at another depth bias retrieval (the count-only
her2st sections, 2-9x shallower, made every retrieval method worse on C2-C6).
``reference_correction`` (he2st's addition; default None, the papers' bank)
corrects them with :mod:`he2st.retrieval.correction`, fitted on the training
rows only: ``"scale"`` moves each reference slide's values, gene by gene, to
the training spots' mean and sd before their keys are embedded; ``"harmony"``
runs Harmony on the bank's keys with the slide as batch, expressed in the
training rows' frame (training keys do not move); ``"scale+harmony"`` does both.

Leakage guards
--------------
The bank records the id, patient and origin of every slide it holds
(``"train"``, ``"validation"`` for the slides passed as ``val_slides``, or
``"reference"``). :meth:`predict` refuses a slide that is in the bank
(``on_bank_overlap="error"``) or leaves its rows out (``"exclude"``), and with
``exclude_test_patient`` (``"auto"``: when no TRAINING slide is from the test
patient, i.e. a patient-level split; validation and reference slides do not
count) excludes every bank slide of the test slide's patient, whatever its
origin, so a validation or reference section of the test patient can never be
retrieved.

Search
------
``search="exact"`` (chunked torch, or faiss flat with ``search_backend="faiss"``),
``"ivf"`` (faiss IVF-Flat over fine k-means cells of ~64 reference spots; the fast
choice for large banks), ``"hnsw"`` or ``"auto"`` (exact up to
200k reference spots, IVF above); approximate indexes are calibrated on the
training image embeddings to reach ``target_recall`` at ``top_k``.

Selection and weights
---------------------
The ``top_k`` neighbours are SELECTED by ``select_metric`` (the bank's search
metric) and WEIGHTED (``aggregation``) by distances in ``weight_metric``
(None: the selection metric), recomputed exactly for the selected rows. The
authors select by cosine similarity and weight by another distance: mclSTExp
(eq. 14-16) by inverse squared Euclidean distance, BLEEP's
``weighted_average`` by ``exp(-d^2)`` (``aggregation="softmax"``,
``weight_metric="l2"``).

Physical scale
--------------
``patch_um`` (default None: ``patch_px`` times the training slides' median
microns per pixel) is the field of view of a spot's patch; features, tokens and
finetuning patches of every slide are read at ``patch_um_ / patch_px`` microns
per pixel (:meth:`he2st.methods.base.Method.read_mpp`), and pixel positions
(``position_source="pixel"``) are expressed in the training slides' pixels.
Prediction needs only the image: the bank holds the expression.

Context and feature scaling
---------------------------
``context`` (default None; frozen feature vectors only, not tokens nor
finetuning) appends wider fields of view and/or neighbour means to each spot's
features (:func:`he2st.methods.base.parse_context`). ``feature_scaling``
(default ``"standard"``) sets the frozen features' ``shift``/``scale``
(:mod:`he2st.methods.scaling`; ``"slide"`` centres each slide on its own mean
first); token inputs keep ``"standard"``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from he2st.data.slide import meta
from he2st.errors import He2stInputError
from he2st.methods.base import CONTEXT_DEFAULTS, FIELD_OF_VIEW_DEFAULTS, SCALING_DEFAULTS, Capabilities
from he2st.methods.families.banked import BankedMethod
from he2st.methods.nn.inputs import image_inputs, make_augmenter, to_unit, unit_batch
from he2st.methods.scaling import centre_slide, scaler_buffers
from he2st.methods.nn.train import (
    MODES,
    SCHEDULERS,
    VAL_SPLITS,
    History,
    default_device,
    fit_module,
    inner_split,
    load_module_state,
    minibatches,
    module_state,
    schedule_kwargs,
    set_seed,
)
from he2st.retrieval.aggregation import AGGREGATIONS, aggregate
from he2st.retrieval.bank import BankLeakageError, ReferenceBank
from he2st.retrieval.correction import CORRECTIONS, harmonize_to_training, match_moments, moments
from he2st.retrieval.search import BACKENDS, KINDS, METRICS, Neighbors, exact_distances

OVERLAP = ("error", "exclude")
POSITION_SOURCES = ("array", "pixel")

#: Keys every contrastive retrieval method understands; subclasses give their paper's values.
CONTRASTIVE_DEFAULTS: dict[str, Any] = {
    "mode": "frozen",
    "encoder": "resnet50",
    "weights": "imagenet",
    "patch_px": 224,
    "input_px": None,
    "augment": "bleep",
    "standardize": True,
    "embed_dim": 256,
    "dropout": 0.1,
    "temperature": 1.0,
    "lam": 0.5,
    "epochs": 10,
    "batch_size": 256,
    "lr": 1e-3,
    "optimizer": "adamw",
    "weight_decay": 1e-3,
    "patience": None,
    "scheduler": "none",
    "lr_min": 0.0,
    "lr_step": 30,
    "lr_gamma": 0.1,
    "val_split": "spot",
    "val_fraction": 0.0,
    "top_k": 50,
    "select_metric": "cosine",
    "weight_metric": None,
    "aggregation": "mean",
    "softmax_temperature": 1.0,
    "search": "exact",
    "search_backend": "torch",
    "target_recall": 0.95,
    "bank_chunk": None,
    "reference_slides": None,
    "reference_fill_missing": False,
    "reference_correction": None,
    "exclude_test_patient": "auto",
    "on_bank_overlap": "error",
    "device": "auto",
    **FIELD_OF_VIEW_DEFAULTS,
    **CONTEXT_DEFAULTS,
    **SCALING_DEFAULTS,
}


class RetrievalNet(nn.Module):
    """Image input stage shared by the retrieval networks; subclasses add the heads.

    ``image_input(x)`` turns a raw batch into encoder output: standardised
    cached features / tokens in frozen mode, or ``backbone`` output (pooled
    features, or tokens when ``tokens``) on ``[0, 1]`` RGB patches in
    finetune mode (the backbone's normalisation is applied here).

    Subclasses implement :meth:`embed_image` (encoder output -> ``(B, D)``),
    :meth:`embed_expression` (``(B, n_genes)`` expression and ``(B, 2)``
    positions -> ``(B, D)``; the batch is a "sentence" for mclSTExp) and
    :meth:`loss`.

    Parameters
    ----------
    feature_dim
        Width of the encoder output (size of the frozen-feature ``shift``/``scale``).
    backbone
        Finetuning image encoder, or None in frozen mode.
    tokens
        Feed the backbone's tokens instead of its pooled features.
    mean, std
        Pixel normalisation of the backbone.
    """

    def __init__(self, feature_dim: int, backbone: nn.Module | None = None, tokens: bool = False,
                 mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokens = tokens
        self.register_buffer("shift", torch.zeros(feature_dim))
        self.register_buffer("scale", torch.ones(feature_dim))
        self.register_buffer("pix_mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pix_std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def image_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is None:
            return (x.float() - self.shift) / self.scale
        x = (x - self.pix_mean) / self.pix_std
        return self.backbone.forward_tokens(x) if self.tokens else self.backbone(x)

    @abc.abstractmethod
    def embed_image(self, feats: torch.Tensor) -> torch.Tensor:
        """Encoder output -> ``(B, D)`` image embedding."""

    @abc.abstractmethod
    def embed_expression(self, expr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Expression embedding of a batch.

        Parameters
        ----------
        expr
            ``(B, n_genes)`` normalised expression.
        pos
            ``(B, 2)`` spot positions (used by mclSTExp).

        Returns
        -------
        torch.Tensor
            ``(B, D)``.
        """

    @abc.abstractmethod
    def loss(self, feats: torch.Tensor, expr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch.

        Parameters
        ----------
        feats
            Encoder output of the batch (:meth:`image_input`).
        expr
            ``(B, n_genes)`` normalised expression.
        pos
            ``(B, 2)`` spot positions.

        Returns
        -------
        torch.Tensor
            Scalar loss.
        """


class ContrastiveRetrieval(BankedMethod):
    """Base of BLEEP, mclSTExp and CMRCNet; see the module docstring.

    Subclasses set ``input_kind`` (``"features"`` or ``"tokens"``), give their
    paper's ``defaults`` and implement :meth:`_make_net`.
    """

    input_kind: ClassVar[str] = "features"
    family: ClassVar[str] = "contrastive"
    capabilities: ClassVar[Capabilities] = Capabilities(frozen_features=True, finetune=True)
    defaults: ClassVar[dict[str, Any]] = dict(CONTRASTIVE_DEFAULTS)

    def __init__(self, **params: Any) -> None:
        refs = params.get("reference_slides")
        self._reference_objs: list[Any] | None = None
        if refs is not None and not isinstance(refs, (dict, str)) and not _all_str(refs):
            # Slide objects are kept on the instance; params keep their ids (JSON-safe, saved).
            self._reference_objs = list(refs)
            params = {**params, "reference_slides": [meta(s).slide_id for s in self._reference_objs]}
        if "metric" in params:
            # The former single ``metric`` (models saved before the split) selected and weighted alike.
            legacy = params.pop("metric")
            params.setdefault("select_metric", legacy)
            params.setdefault("weight_metric", legacy)
        super().__init__(**params)
        self.ref_target_: np.ndarray | None = None
        self._check_params()
        self.calibration_queries_: np.ndarray | None = None
        self._loading = False

    # -- hooks ---------------------------------------------------------------
    @abc.abstractmethod
    def _make_net(self, feature_dim: int, n_genes: int, n_tokens: int | None, backbone: nn.Module | None,
                  mean: Sequence[float], std: Sequence[float]) -> RetrievalNet:
        """The method's network for encoder outputs of width ``feature_dim``."""

    # -- parameters -----------------------------------------------------------
    def _check_params(self) -> None:
        p = self.params

        self._check_choice("mode", MODES)
        self._check_choice("select_metric", METRICS)
        self._check_choice("weight_metric", (None, *METRICS))
        self._check_choice("scheduler", SCHEDULERS)
        self._check_choice("aggregation", AGGREGATIONS)
        self._check_choice("search", KINDS)
        self._check_choice("search_backend", BACKENDS)
        self._check_choice("on_bank_overlap", OVERLAP)
        self._check_choice("exclude_test_patient", ("auto", True, False))
        self._check_choice("reference_correction", CORRECTIONS)
        self._check_choice("val_split", VAL_SPLITS)
        if p.get("context") is not None and (p["mode"] != "frozen" or self.input_kind == "tokens"):
            raise He2stInputError(
                f"method {self.name!r}: the context option needs frozen feature vectors (mode='frozen' on "
                f"features, not tokens); got mode={p['mode']!r}, inputs {self.input_kind!r}"
            )
        if p.get("feature_scaling", "standard") != "standard" and self.input_kind == "tokens":
            raise He2stInputError(
                f"method {self.name!r}: feature_scaling={p['feature_scaling']!r} applies to feature vectors; "
                "token inputs are standardised per dimension (feature_scaling='standard', or standardize=False)"
            )
        if p["bank_chunk"] is not None and int(p["bank_chunk"]) < 1:
            raise He2stInputError(f"method {self.name!r}: bank_chunk must be >= 1 or None, got {p['bank_chunk']!r}")
        for key in ("epochs", "batch_size", "top_k", "embed_dim"):
            if int(p[key]) < 1:
                raise He2stInputError(f"method {self.name!r}: {key} must be >= 1, got {p[key]!r}")
        if not 0 <= float(p["val_fraction"]) < 1:
            raise He2stInputError(f"method {self.name!r}: val_fraction must be in [0, 1), got {p['val_fraction']!r}")
        if not 0 <= float(p["lam"]) <= 1:
            raise He2stInputError(f"method {self.name!r}: lam must be in [0, 1], got {p['lam']!r}")
        if float(p["temperature"]) <= 0:
            raise He2stInputError(f"method {self.name!r}: temperature must be positive, got {p['temperature']!r}")
        if "position_source" in p:
            self._check_choice("position_source", POSITION_SOURCES)

    # -- data -------------------------------------------------------------------
    def _positions(self, slide: Any) -> np.ndarray:
        """``(n, 2)`` int64 spot coordinates (x, y): array col/row, or rounded pixels."""
        if self.params.get("position_source", "array") == "pixel":
            # An expression-only reference slide may lack mpp: its pixels are taken as they are.
            scale = self.pixel_scale(slide) if meta(slide).mpp is not None else 1.0
            xy = np.asarray(slide.obsm["spatial"], dtype=np.float64) * scale
            return np.rint(xy).astype(np.int64)
        return np.stack([slide.obs["array_col"].to_numpy(), slide.obs["array_row"].to_numpy()], axis=1).astype(np.int64)

    def _image_inputs(self, slide: Any) -> np.ndarray:
        """Frozen features ``(n, d)`` / tokens ``(n, T, D)``, or uint8 patches in finetune mode."""
        p = self.params
        self.check_servable(slide)
        x = image_inputs(
            slide, p["mode"], p["encoder"], p["weights"], int(p["patch_px"]), input_px=p["input_px"],
            tokens=self.input_kind == "tokens", dim=self._net_spec.get("feature_dim") if p["mode"] == "frozen" else None,
            target_mpp=self.read_mpp(slide), context=p.get("context"),
        )
        if p["mode"] == "frozen" and p["standardize"] and p.get("feature_scaling") == "slide" and x.ndim == 2:
            x = centre_slide(x)  # each slide's own mean, at fit and at predict (he2st.methods.scaling)
        return x

    def _augmenter(self) -> Any:
        """The training augmentation (finetune mode only; None otherwise)."""
        if self.params["mode"] != "finetune":
            return None
        return make_augmenter(self.params["augment"], seed=int(self.params["seed"]))

    def _backbone(self) -> tuple[nn.Module, int, Sequence[float], Sequence[float]]:
        from he2st.encoders import create_encoder

        p = self.params
        # A reloaded model gets its encoder weights from its state, not from the pretrained file.
        weights = None if self._loading else p["weights"]
        enc = create_encoder(p["encoder"], weights=weights, seed=int(p["seed"]))
        info = enc.info
        if self.input_kind == "tokens":
            if not info.has_tokens:
                raise He2stInputError(f"method {self.name!r}: encoder {p['encoder']!r} exposes no tokens")
            dim = int(info.token_dim)
        else:
            dim = int(info.dim)
        return enc.train(), dim, info.mean, info.std

    def _build_net(self) -> RetrievalNet:
        spec = self._net_spec
        if self.params["mode"] == "finetune":
            backbone, dim, mean, std = self._backbone()
            spec["feature_dim"] = dim
        else:
            backbone, mean, std = None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        net = self._make_net(int(spec["feature_dim"]), int(spec["n_genes"]), spec.get("n_tokens"), backbone, mean, std)
        if backbone is not None:
            net.tokens = self.input_kind == "tokens"
        return net

    def _reference_slides(self, train_ids: set[str]) -> list[Any]:
        """Expression-only slides to add to the bank (never a training slide)."""
        spec = self.params["reference_slides"]
        if spec is None or (isinstance(spec, (list, tuple)) and not spec and self._reference_objs is None):
            return []
        if self._reference_objs is not None:
            slides = list(self._reference_objs)
        elif isinstance(spec, dict):
            slides = _load_reference_spec(spec, self.name)
        else:
            raise He2stInputError(
                f"method {self.name!r}: reference_slides {spec!r} names slides by id only; pass the slides "
                "themselves or a spec {'data': ..., 'params': ..., 'images': ...}"
            )
        dup = sorted(train_ids & {meta(s).slide_id for s in slides})
        if dup:
            raise He2stInputError(
                f"method {self.name!r}: reference slides {dup} are also training slides; "
                "a slide contributes to the bank once"
            )
        return slides

    # -- fitting ---------------------------------------------------------------------
    def _fit(self, train_slides: list[Any], val_slides: list[Any] | None) -> None:
        p = self.params
        gen = set_seed(int(p["seed"]))
        device = default_device(p["device"])
        train_ids = [meta(s).slide_id for s in train_slides]
        refs = self._reference_slides(set(train_ids))  # fail early, before training

        slides = list(train_slides) + list(val_slides or [])
        X = [self._image_inputs(s) for s in slides]
        Y = [np.asarray(self.targets(s), dtype=np.float32) for s in slides]
        P = [self._positions(s) for s in slides]
        slide_idx = np.concatenate([np.full(len(y), i, dtype=np.int64) for i, y in enumerate(Y)])
        Xa, Ya, Pa = np.concatenate(X), np.concatenate(Y), np.concatenate(P)
        n_train_rows = sum(len(y) for y in Y[: len(train_slides)])
        if val_slides:
            tr, va = np.arange(n_train_rows), np.arange(n_train_rows, len(Ya))
        else:
            tr, va = inner_split(slide_idx, len(train_slides), p["val_split"], float(p["val_fraction"]), int(p["seed"]))
        if len(tr) < 2:
            raise He2stInputError(f"method {self.name!r}: fewer than 2 training spots on slides {train_ids}")

        frozen = p["mode"] == "frozen"
        self._net_spec = {"n_genes": len(self.genes or []), "feature_dim": int(Xa.shape[-1]) if frozen else None,
                          "n_tokens": int(Xa.shape[1]) if (frozen and Xa.ndim == 3) else None}
        net = self._build_net()
        kind = p.get("feature_scaling", "standard")
        if frozen and p["standardize"] and (kind == "standard" or Xa.ndim != 2):
            mean, sd = _column_moments(Xa, tr)
            net.shift.copy_(torch.from_numpy(mean).float())
            net.scale.copy_(torch.from_numpy(np.where(sd > 1e-8, sd, 1.0)).float())
        elif frozen and p["standardize"] and kind != "none":
            shift, scale = scaler_buffers(Xa, kind, tr)  # "slide": Xa is already centred per slide
            net.shift.copy_(torch.from_numpy(shift).float())
            net.scale.copy_(torch.from_numpy(scale).float())
        net.to(device)

        Xt, Yt, Pt = torch.from_numpy(np.ascontiguousarray(Xa)), torch.from_numpy(Ya), torch.from_numpy(Pa)
        augment = self._augmenter()

        def batch_inputs(rows: torch.Tensor, train: bool) -> torch.Tensor:
            x = Xt[rows]
            if not frozen:
                x = unit_batch(x, augment if train else None)
            return net.image_input(x.to(device))

        def loss_fn(rows: torch.Tensor) -> torch.Tensor:
            return net.loss(batch_inputs(rows, True), Yt[rows].to(device), Pt[rows].to(device))

        def val_loss_fn(rows: torch.Tensor) -> torch.Tensor:
            return net.loss(batch_inputs(rows, False), Yt[rows].to(device), Pt[rows].to(device))

        tr_t, va_t, bs = torch.from_numpy(tr), torch.from_numpy(va), int(p["batch_size"])

        def train_batches(epoch: int) -> Any:
            for b in minibatches(len(tr_t), bs, gen):
                if len(b) >= 2:  # a contrastive batch needs negatives
                    yield tr_t[b]

        def val_batches() -> Any:
            for b in minibatches(len(va_t), bs, shuffle=False):
                if len(b) >= 2:
                    yield va_t[b]

        history: History = fit_module(
            net, loss_fn, train_batches, epochs=int(p["epochs"]), lr=float(p["lr"]), optimizer=str(p["optimizer"]),
            weight_decay=float(p["weight_decay"]), val_batches=val_batches if len(va) >= 2 else None,
            val_loss_fn=val_loss_fn, patience=None if p["patience"] is None else int(p["patience"]),
            **schedule_kwargs(p), description=f"{self.name}",
        )
        self.history_ = history.as_dict()
        self.net_ = net.eval()

        # The bank: every training (and validation) spot, then the expression-only references.
        blocks = []
        for i, (s, y, pos) in enumerate(zip(slides, Y, P)):
            m = meta(s)
            origin = "train" if i < len(train_slides) else "validation"
            blocks.append((self._embed_expression(y, pos), y, m.slide_id, m.patient, origin))
        # Training moments of the bank's values: the target of the reference slides' depth correction.
        self.ref_target_ = np.stack(moments(np.concatenate(Y))) if refs else None
        for s in refs:
            blocks.append(self._reference_block(s))
        self.bank_ = self._corrected_bank(blocks)
        # "patients" holds the TRAINING slides' patients only: exclude_test_patient="auto" asks
        # whether the split is patient-level, and a validation slide does not make it one.
        self._train_info = {"slides": train_ids, "patients": sorted({meta(s).patient for s in train_slides}),
                            "val_slides": [meta(s).slide_id for s in val_slides or []]}
        if p["search"] == "exact":
            self._build_index(None)
        else:
            # The training image embeddings are the queries an approximate index is calibrated on.
            self._build_index(self._embed_images(Xa))
        self.net_.cpu()

    def _reference_block(self, slide: Any) -> tuple[np.ndarray, np.ndarray, str, str, str]:
        m = meta(slide)
        y = np.asarray(self.normalizer_.transform(slide, self.genes, fill_missing=bool(self.params["reference_fill_missing"])),
                       dtype=np.float32)
        if self.params["reference_correction"] in ("scale", "scale+harmony"):
            if self.ref_target_ is None:
                raise He2stInputError(f"method {self.name!r}: no training moments to scale reference slide {m.slide_id!r} to")
            mean, sd, low = self.ref_target_
            y = match_moments(y, mean, sd, low)
        return self._embed_expression(y, self._positions(slide)), y, m.slide_id, m.patient, "reference"

    def _corrected_bank(self, blocks: list[tuple[np.ndarray, np.ndarray, str, str, str]]) -> ReferenceBank:
        """The bank of ``blocks``; with a Harmony correction, reference keys moved toward the training rows'."""
        if self.params["reference_correction"] in ("harmony", "scale+harmony") and any(b[4] == "reference" for b in blocks):
            emb = np.concatenate([b[0] for b in blocks])
            batches = np.concatenate([np.full(len(b[0]), b[2], dtype=object) for b in blocks])
            training = np.concatenate([np.full(len(b[0]), b[4] != "reference") for b in blocks])
            fixed = harmonize_to_training(emb, batches, training, seed=int(self.params["seed"]))
            bounds = np.cumsum([0] + [len(b[0]) for b in blocks])
            blocks = [(fixed[a:z], *b[1:]) for b, a, z in zip(blocks, bounds[:-1], bounds[1:])]
        return ReferenceBank.from_blocks(blocks, metric=self.params["select_metric"], genes=self.genes)

    def _build_index(self, queries: np.ndarray | None) -> None:
        """Search index of the bank; approximate kinds are calibrated on ``queries`` (training images)."""
        p = self.params
        assert self.bank_ is not None
        calib = None
        if queries is not None and p["search"] in ("ivf", "hnsw", "auto"):
            rng = np.random.default_rng(int(p["seed"]))
            calib = queries[np.sort(rng.choice(len(queries), size=min(len(queries), 2000), replace=False))]
        # Kept (and saved) so that adding reference slides later re-calibrates on image queries, not
        # on bank rows: cross-modal queries need far more probes than in-modality ones.
        self.calibration_queries_ = calib
        self.bank_.build_index(p["search"], backend=p["search_backend"], k=int(p["top_k"]),
                               target_recall=float(p["target_recall"]), calibration_queries=calib, seed=int(p["seed"]))

    # -- embeddings ---------------------------------------------------------------------
    @torch.no_grad()
    def _embed_expression(self, y: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Expression embeddings of one slide, in its spot order, ``batch_size`` spots at a time."""
        assert self.net_ is not None
        net = self.net_.eval()
        dev = next(net.parameters()).device
        # Spots embedded together: mclSTExp's attention runs over them (its repository: 32).
        bs = int(self.params["bank_chunk"] or self.params["batch_size"])
        out = [net.embed_expression(torch.from_numpy(y[i : i + bs]).to(dev), torch.from_numpy(pos[i : i + bs]).to(dev))
               .float().cpu().numpy() for i in range(0, len(y), bs)]
        return np.concatenate(out).astype(np.float32)

    @torch.no_grad()
    def _embed_images(self, x: np.ndarray) -> np.ndarray:
        assert self.net_ is not None
        net = self.net_.eval()
        dev = next(net.parameters()).device
        frozen = self.params["mode"] == "frozen"
        bs = 1024 if frozen else int(self.params["batch_size"])
        out = []
        for i in range(0, len(x), bs):
            xb = torch.from_numpy(np.array(x[i : i + bs]))  # a copy: cached tokens are read-only memmaps
            if not frozen:
                xb = to_unit(xb)
            out.append(net.embed_image(net.image_input(xb.to(dev))).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def image_embeddings(self, slide: Any) -> np.ndarray:
        """``(n_spots, embed_dim)`` image embeddings of a slide (the retrieval queries)."""
        self._check_ready()
        return self._embed_images(self._image_inputs(slide))

    def expression_embeddings(self, slide: Any) -> np.ndarray:
        """``(n_spots, embed_dim)`` expression embeddings of a slide (what a bank holds); no image needed."""
        self._check_ready()
        y = np.asarray(self.normalizer_.transform(slide, self.genes), dtype=np.float32)
        return self._embed_expression(y, self._positions(slide))

    # -- prediction -------------------------------------------------------------------
    def neighbors(self, slide: Any) -> Neighbors:
        """The bank rows retrieved for every spot of ``slide`` (see :attr:`bank_` for their provenance)."""
        self._check_ready()
        assert self.bank_ is not None
        q = self.image_embeddings(slide)
        return self.bank_.search(q, int(self.params["top_k"]), exclude=self._exclusions(slide))

    def predict(self, slide: Any) -> np.ndarray:
        """Predicted expression ``(n_spots, n_genes)``: aggregated expression of the retrieved bank spots."""
        self._check_ready()
        assert self.bank_ is not None
        p = self.params
        q = self.image_embeddings(slide)
        nb = self.weighting_neighbors(q, self.bank_.search(q, int(p["top_k"]), exclude=self._exclusions(slide)))
        return aggregate(self.bank_.values, nb, p["aggregation"], float(p["softmax_temperature"]))

    def weighting_neighbors(self, queries: np.ndarray, selected: Neighbors) -> Neighbors:
        """The selected neighbours with their distances in ``weight_metric`` (what the weights use).

        Parameters
        ----------
        queries
            ``(n_queries, dim)`` image embeddings.
        selected
            The rows selected by ``select_metric`` (:meth:`neighbors`).

        Returns
        -------
        Neighbors
            Same rows, in the same order; distances recomputed exactly in
            ``weight_metric`` (``selected`` itself when the two metrics agree).
        """
        assert self.bank_ is not None
        metric = self.params["weight_metric"] or selected.metric
        if metric == selected.metric:
            return selected
        dist = np.full(selected.indices.shape, np.inf, dtype=np.float32)
        emb = self.bank_.embeddings
        for s in range(0, len(queries), 256):
            idx = selected.indices[s : s + 256]
            ok = idx >= 0
            rows = np.asarray(emb[np.where(ok, idx, 0).ravel()], dtype=np.float32).reshape(idx.shape + (emb.shape[1],))
            dist[s : s + 256] = np.where(ok, exact_distances(np.asarray(queries[s : s + 256]), rows, metric), np.inf)
        return Neighbors(selected.indices, dist, metric)

    def add_reference_slides(self, slides: Sequence[Any]) -> None:
        """Add expression-only slides to the fitted bank (their images are not needed)."""
        self._check_ready()
        assert self.bank_ is not None
        blocks = [(np.asarray(self.bank_.embeddings[s.start : s.stop]), np.asarray(self.bank_.values[s.start : s.stop]),
                   s.slide_id, s.patient, s.origin) for s in self.bank_.slides]
        if self.ref_target_ is None:
            # Training moments from the bank's own training rows (models fitted without reference slides).
            rows = [np.asarray(self.bank_.values[s.start : s.stop]) for s in self.bank_.slides if s.origin != "reference"]
            self.ref_target_ = np.stack(moments(np.concatenate(rows)))
        for s in slides:
            if self.bank_.contains_slide(meta(s).slide_id):
                raise He2stInputError(f"slide {meta(s).slide_id!r} is already in the bank of method {self.name!r}")
            blocks.append(self._reference_block(s))
        # With Harmony, it is refitted on the whole bank (earlier reference keys, already corrected, move little).
        self.bank_ = self._corrected_bank(blocks)
        # IVF / HNSW are re-calibrated on the kept sample of training image embeddings.
        self._build_index(self.calibration_queries_)

    # -- persistence --------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        self._check_ready()
        assert self.net_ is not None and self.bank_ is not None
        out = {**module_state(self.net_, "model."), **self.bank_.state_arrays("bank.")}
        if self.calibration_queries_ is not None:
            out["calibration_queries"] = np.ascontiguousarray(self.calibration_queries_, dtype=np.float32)
        if self.ref_target_ is not None:
            out["reference_target_moments"] = np.ascontiguousarray(self.ref_target_, dtype=np.float64)
        return out

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self._loading = True
        try:
            net = self._build_net()
        finally:
            self._loading = False
        load_module_state(net, state, "model.")
        self.net_ = net.eval()
        self.bank_ = ReferenceBank.from_state(state, self._bank_meta, "bank.")
        self.calibration_queries_ = np.asarray(state["calibration_queries"]) if "calibration_queries" in state else None
        self.ref_target_ = np.asarray(state["reference_target_moments"]) if "reference_target_moments" in state else None


def _column_moments(x: np.ndarray, rows: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd of the last axis over ``x[rows]`` (features, or every token), in float64 chunks."""
    total = np.zeros(x.shape[-1])
    sq = np.zeros(x.shape[-1])
    count = 0
    for s in range(0, len(rows), chunk):
        block = x[rows[s : s + chunk]].reshape(-1, x.shape[-1]).astype(np.float64)
        total += block.sum(axis=0)
        sq += (block * block).sum(axis=0)
        count += len(block)
    mean = total / count
    return mean, np.sqrt(np.maximum(sq / count - mean * mean, 0.0))


def _all_str(values: Any) -> bool:
    try:
        return all(isinstance(v, str) for v in values)
    except TypeError:
        return False


#: The last cohort loaded for a ``reference_slides`` spec (one entry).
_SPEC_CACHE: dict[str, Any] = {}


def _load_reference_spec(spec: dict[str, Any], method: str) -> list[Any]:
    """Slides named by a JSON spec ``{"data", "params", "images", "slides"}``."""
    unknown = set(spec) - {"data", "params", "images", "slides"}
    if unknown or "data" not in spec:
        raise He2stInputError(
            f"method {method!r}: reference_slides spec needs 'data' and accepts 'params', 'images', 'slides'; "
            f"got keys {sorted(spec)}"
        )
    images = spec.get("images", "any")
    if images not in ("any", "with", "without"):
        raise He2stInputError(f"method {method!r}: reference_slides 'images' must be any/with/without, got {images!r}")
    import json

    from he2st.datasets import load as load_cohort

    # A benchmark fits one model per fold with the same spec: load the cohort once per process.
    key = json.dumps({"data": spec["data"], "params": spec.get("params")}, sort_keys=True, default=str)
    cohort = _SPEC_CACHE.get(key)
    if cohort is None:
        cohort = load_cohort(spec["data"], spec.get("params"))
        _SPEC_CACHE.clear()
        _SPEC_CACHE[key] = cohort
    slides = list(cohort)
    if spec.get("slides") is not None:
        want = [str(s) for s in spec["slides"]]
        slides = [cohort[s] for s in want]
    if images == "with":
        slides = [s for s in slides if meta(s).image_path]
    elif images == "without":
        slides = [s for s in slides if not meta(s).image_path]
    if not slides:
        raise He2stInputError(f"method {method!r}: reference_slides spec {spec!r} selects no slide")
    return slides


__all__ = ["CONTRASTIVE_DEFAULTS", "BankLeakageError", "ContrastiveRetrieval", "RetrievalNet"]
