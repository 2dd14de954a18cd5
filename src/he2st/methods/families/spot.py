"""Spot-level regression: each spot is predicted from its own image patch.

The shared machinery of ST-Net, DeepSpaCE and STimage (Jiang et al. 2024,
Fig. 1a top: image encoder -> prediction head [-> distribution module]).
A :class:`SpotRegressor` subclass only says what its head, targets, loss and
output decoding are; data assembly, the inner validation split, training
(:func:`he2st.methods.nn.train.fit_module`), test-time augmentation, member
ensembles and persistence live here once.

Two modes
---------
``mode="frozen"`` (the CPU default)
    Features come from the encoder feature cache
    (:func:`he2st.encoders.get_features` with the method's ``encoder``,
    ``weights``, ``patch_px``, ``tta`` and fitted stain normaliser); only the
    head trains. Features are standardised with the mean and standard
    deviation of the training spots (``standardize=True``), which a frozen
    trunk followed by BatchNorm-free heads needs for SGD to behave. With
    ``tta=True`` the cache returns features averaged over the 8 dihedral
    symmetries; those are used for training and prediction alike. Random
    image augmentation cannot act on cached features, so ``augment`` is
    ignored in this mode.
``mode="finetune"``
    Backbone (:func:`he2st.encoders.create_encoder`) and head train end to
    end on the spot patches (:func:`he2st.image.extract_patches`, stain
    normalised when ``stain`` is set), resized to ``input_px`` (default: the
    encoder's input size) and augmented by :func:`he2st.image.augment.make_augment`
    (``augment``). With ``tta=True`` predictions are averaged over the 8
    dihedral symmetries (:func:`he2st.image.augment.dihedral`).

Validation and members
----------------------
When ``fit`` gets no validation slides, an inner split of the training data is
made (``val_split``): ``"slide"`` holds out ``round(val_fraction * n)`` (at
least 1) whole training slides, ``"spot"`` a random ``val_fraction`` of the
training spots, ``"auto"`` is ``"slide"`` with 3 or more training slides and
``"spot"`` otherwise; ``val_fraction=0`` trains without validation and keeps
the last epoch. The weights of the epoch with the lowest validation loss are
kept (early stopping after ``patience`` epochs without improvement when
``patience`` is set). ``n_models`` independent members (seeds ``seed``,
``seed + 1``, ...) are trained; predictions are averaged. ``member_data``
says what each member trains on: ``"same"`` (every member the same training
rows; members differ by their seed: data order, augmentation and any random
head initialisation) or ``"bootstrap"`` (member ``m`` draws its training rows
with replacement from the training rows, seed ``seed + m``; bagging, so that
the members' spread measures the sampling uncertainty of the fit too).
``scheduler`` (``"none"``, ``"cosine"``, ``"step"``, with ``lr_min``,
``lr_step``, ``lr_gamma``) sets the learning-rate schedule
(:func:`he2st.methods.nn.train.scheduled_lr`).

Physical scale
--------------
``patch_um`` (default None: ``patch_px`` times the training slides' median
microns per pixel) is the field of view of a patch in microns; every slide is
read at ``patch_um_ / patch_px`` microns per pixel
(:meth:`he2st.methods.base.Method.read_mpp`), in both modes, before the stain
normaliser, the augmentation and the encoder see it.

Context and feature scaling (frozen mode)
-----------------------------------------
``context`` (default None) adds, to each spot's features, those of wider
fields of view around it and/or the mean features of its nearest spots
(:func:`he2st.methods.base.parse_context`,
:func:`he2st.methods.nn.inputs.context_features`); finetuning refuses it.
``feature_scaling`` (default ``"standard"``, the paper's standardisation) sets
the ``shift``/``scale`` buffers of the :class:`~he2st.methods.nn.inputs.FeatureModel`
(:mod:`he2st.methods.scaling`); with ``"slide"`` each slide's features are
centred on their own mean first, at fit and at predict. Both need
``standardize=True`` to matter for scaling; both are saved with the model.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from he2st.data.slide import meta
from he2st.errors import He2stInputError
from he2st._utils import jsonable
from he2st.methods.base import CONTEXT_DEFAULTS, FIELD_OF_VIEW_DEFAULTS, SCALING_DEFAULTS, Capabilities, Method
from he2st.methods.nn.inputs import BackboneModel, FeatureModel, image_inputs, make_augmenter, to_unit, unit_batch
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

#: What each member of an ensemble trains on (see the module docstring).
MEMBER_DATA = ("same", "bootstrap")

#: Keys every :class:`SpotRegressor` understands; subclasses give their paper's values in ``defaults``.
SPOT_DEFAULTS: dict[str, Any] = {
    "mode": "frozen",
    "encoder": "efficientnet_lite0",
    "weights": "imagenet",
    "patch_px": 224,
    "input_px": None,
    "tta": False,
    "stain": None,
    "augment": "none",
    "epochs": 10,
    "batch_size": 32,
    "lr": 1e-4,
    "optimizer": "adam",
    "weight_decay": 0.0,
    "momentum": 0.9,
    "patience": None,
    "val_split": "auto",
    "val_fraction": 0.1,
    "n_models": 1,
    "member_data": "same",
    "scheduler": "none",
    "lr_min": 0.0,
    "lr_step": 30,
    "lr_gamma": 0.1,
    "standardize": True,
    "stain_fit_spots": 64,
    "device": "auto",
    **FIELD_OF_VIEW_DEFAULTS,
    **CONTEXT_DEFAULTS,
    **SCALING_DEFAULTS,
}


# -- the base class -------------------------------------------------------------------------


class SpotRegressor(Method):
    """Base of methods predicting each spot from its own patch; see the module docstring.

    Subclasses implement :meth:`_make_head`, :meth:`_targets`, :meth:`_loss`
    and :meth:`_decode`, and may override :meth:`_prepare` (fit target
    transforms on the training slides), :meth:`_init_head`, :meth:`_keep`
    (spots used for training), :meth:`_patch_px` and the state hooks.
    """

    family: ClassVar[str] = "spot"
    capabilities: ClassVar[Capabilities] = Capabilities(frozen_features=True, finetune=True)
    defaults: ClassVar[dict[str, Any]] = dict(SPOT_DEFAULTS)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._check_params()
        self.models_: list[nn.Module] = []
        self.in_dim_: int | None = None
        self.stain_: Any = None
        self.history_: list[dict[str, Any]] = []
        self._patch_memo: dict[tuple[str, int, float | None], Any] = {}
        self._extra: dict[str, Any] = {}
        self._loading = False

    # -- hooks --------------------------------------------------------------------
    @abc.abstractmethod
    def _make_head(self, in_dim: int) -> nn.Module:
        """The trainable head on ``in_dim`` features."""

    @abc.abstractmethod
    def _targets(self, slide: Any) -> tuple[np.ndarray, ...]:
        """Training targets of a slide, row-aligned with its spots (float32 arrays)."""

    @abc.abstractmethod
    def _loss(self, out: Any, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Training loss of a batch."""

    @abc.abstractmethod
    def _decode(self, out: Any) -> dict[str, np.ndarray]:
        """Model output -> ``{"mean": (B, n_genes)}`` on the normalised scale (plus extras)."""

    def _val_loss(self, out: Any, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Validation loss (default: the training loss)."""
        return self._loss(out, targets)

    def _prepare(self, train_slides: list[Any]) -> None:
        """Fit target transforms on the training slides (before data assembly)."""

    def _init_head(self, head: nn.Module, targets: tuple[np.ndarray, ...]) -> None:
        """Initialise the head from the training targets (default: leave as built)."""

    def _keep(self, slide: Any) -> np.ndarray | None:
        """Boolean mask of spots used for training, or None for all."""
        return None

    def _patch_px(self, slide: Any) -> int:
        """Side of the patch given to the encoder, in pixels (it covers ``patch_um_`` microns when set)."""
        return int(self.params["patch_px"])

    def _state_arrays(self) -> dict[str, np.ndarray]:
        """Extra learned arrays of the subclass (scalers, reference sizes)."""
        return {}

    def _set_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`_state_arrays`."""

    # -- public ------------------------------------------------------------------
    def flagged_spots(self, slide: Any) -> np.ndarray:
        """Spots that the training filter would drop (white tiles, low tissue).

        They still get a prediction from :meth:`predict`; the flag says it
        comes from an image of a kind the model did not learn from.
        """
        keep = self._keep(slide)
        return np.zeros(slide.n_obs, dtype=bool) if keep is None else ~np.asarray(keep, dtype=bool)

    def predict(self, slide: Any) -> np.ndarray:
        """Predicted expression ``(n_spots, n_genes)`` on the normalised scale (mean of the members)."""
        outs = self._member_outputs(slide)
        # Identity unless the method trains on its own scale (``train_normalization``).
        return self.to_eval_scale(np.mean([o["mean"] for o in outs], axis=0))

    # -- fitting --------------------------------------------------------------------
    def _check_params(self) -> None:
        p = self.params
        if p["mode"] not in MODES:
            raise He2stInputError(f"method {self.name!r}: mode must be one of {MODES}, got {p['mode']!r}")
        if p["val_split"] not in VAL_SPLITS:
            raise He2stInputError(f"method {self.name!r}: val_split must be one of {VAL_SPLITS}, got {p['val_split']!r}")
        if not 0 <= float(p["val_fraction"]) < 1:
            raise He2stInputError(f"method {self.name!r}: val_fraction must be in [0, 1), got {p['val_fraction']!r}")
        if p["member_data"] not in MEMBER_DATA:
            raise He2stInputError(f"method {self.name!r}: member_data must be one of {MEMBER_DATA}, got {p['member_data']!r}")
        if p["scheduler"] not in SCHEDULERS:
            raise He2stInputError(f"method {self.name!r}: scheduler must be one of {SCHEDULERS}, got {p['scheduler']!r}")
        for key in ("n_models", "epochs", "batch_size"):
            if int(p[key]) < 1:
                raise He2stInputError(f"method {self.name!r}: {key} must be >= 1, got {p[key]!r}")
        if p.get("context") is not None and p["mode"] != "frozen":
            raise He2stInputError(f"method {self.name!r}: the context option needs mode='frozen', got mode={p['mode']!r}")

    @property
    def reads_frozen_features(self) -> bool:  # type: ignore[override]
        """Frozen mode reads cached encoder features (the executor precomputes them); finetune mode reads pixels."""
        return self.params.get("mode") == "frozen"

    def _fit(self, train_slides: list[Any], val_slides: list[Any] | None) -> None:
        p = self.params
        self._patch_memo = {}
        self.in_dim_ = None
        try:
            self.stain_ = self._fit_stain(train_slides)
            self._prepare(train_slides)
            X, T, slide_idx = self._assemble(train_slides)
            if val_slides:
                Xv, Tv, _ = self._assemble(val_slides)
                X = np.concatenate([X, Xv])
                T = tuple(np.concatenate([a, b]) for a, b in zip(T, Tv))
                tr = np.arange(len(X) - len(Xv))
                va = np.arange(len(X) - len(Xv), len(X))
            else:
                tr, va = inner_split(slide_idx, len(train_slides), p["val_split"], float(p["val_fraction"]), int(p["seed"]))
            self._train_members(X, T, tr, va)
        finally:
            self._patch_memo = {}

    def _assemble(self, slides: list[Any]) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
        """Inputs, targets and slide numbers of the kept spots of ``slides``, stacked."""
        xs, ts, idx = [], [], []
        for i, s in enumerate(slides):
            x = self._inputs(s)
            t = self._targets(s)
            keep = self._keep(s)
            if keep is not None:
                keep = np.asarray(keep, dtype=bool)
                x, t = x[keep], tuple(a[keep] for a in t)
            xs.append(x)
            ts.append(t)
            idx.append(np.full(len(x), i, dtype=np.int64))
        n = sum(len(x) for x in xs)
        if n < 2:
            ids = [meta(s).slide_id for s in slides]
            raise He2stInputError(
                f"method {self.name!r}: fewer than 2 spots left for training on slides {ids} after the "
                "tissue/white-tile filter; relax the filter or check the images"
            )
        X = np.concatenate(xs)
        T = tuple(np.concatenate([t[j] for t in ts]).astype(np.float32) for j in range(len(ts[0])))
        return X, T, np.concatenate(idx)

    def _train_members(self, X: np.ndarray, T: tuple[np.ndarray, ...], tr: np.ndarray, va: np.ndarray) -> None:
        p = self.params
        device = default_device(p["device"])
        frozen = p["mode"] == "frozen"
        Xt = torch.from_numpy(np.ascontiguousarray(X))
        Tt = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in T)
        self.in_dim_ = int(X.shape[1]) if frozen else None
        self.models_, self.history_ = [], []
        va_t = torch.from_numpy(va)
        bs = int(p["batch_size"])
        for m in range(int(p["n_models"])):
            gen = set_seed(int(p["seed"]) + m)
            tr_m = member_rows(tr, p["member_data"], int(p["seed"]) + m)
            tr_t = torch.from_numpy(tr_m)
            model = self._build_model(seed=int(p["seed"]) + m)
            augment = None if frozen else make_augmenter(p["augment"], seed=int(p["seed"]) + m)
            kind = p.get("feature_scaling", "standard")
            if frozen and p["standardize"] and kind == "standard":
                Xtr = X[tr_m].astype(np.float64)
                sd = Xtr.std(axis=0)
                model.shift.copy_(torch.from_numpy(Xtr.mean(axis=0)).float())
                model.scale.copy_(torch.from_numpy(np.where(sd > 1e-8, sd, 1.0)).float())
            elif frozen and p["standardize"] and kind != "none":
                shift, scale = scaler_buffers(X, kind, tr_m)  # "slide": X is already centred per slide
                model.shift.copy_(torch.from_numpy(shift).float())
                model.scale.copy_(torch.from_numpy(scale).float())
            self._init_head(model.head, tuple(a[tr_m] for a in T))
            model.to(device)

            def batch_out(rows: torch.Tensor, train: bool, model: nn.Module = model, augment: Any = augment) -> Any:
                x = Xt[rows].to(device)
                if not frozen:
                    x = unit_batch(x, augment if train else None)
                return model(x)

            def loss_fn(rows: torch.Tensor, batch_out: Any = batch_out) -> torch.Tensor:
                return self._loss(batch_out(rows, True), tuple(t[rows].to(device) for t in Tt))

            def val_loss_fn(rows: torch.Tensor, batch_out: Any = batch_out) -> torch.Tensor:
                return self._val_loss(batch_out(rows, False), tuple(t[rows].to(device) for t in Tt))

            def train_batches(epoch: int, gen: torch.Generator = gen, tr_t: torch.Tensor = tr_t) -> Any:
                for b in minibatches(len(tr_t), bs, gen):
                    yield tr_t[b]

            def val_batches() -> Any:
                for b in minibatches(len(va_t), max(bs, 256), shuffle=False):
                    yield va_t[b]

            history: History = fit_module(
                model,
                loss_fn,
                train_batches,
                epochs=int(p["epochs"]),
                lr=float(p["lr"]),
                optimizer=str(p["optimizer"]),
                weight_decay=float(p["weight_decay"]),
                momentum=float(p["momentum"]),
                val_batches=val_batches if len(va) else None,
                val_loss_fn=val_loss_fn,
                patience=None if p["patience"] is None else int(p["patience"]),
                **schedule_kwargs(p),
                description=f"{self.name} member {m + 1}/{p['n_models']}",
            )
            self.models_.append(model.cpu().eval())
            self.history_.append(history.as_dict())

    def _build_model(self, seed: int) -> nn.Module:
        p = self.params
        if p["mode"] == "frozen":
            if self.in_dim_ is None:
                raise He2stInputError(f"method {self.name!r}: feature dimension unknown (not fitted)")
            return FeatureModel(self._make_head(self.in_dim_), self.in_dim_)
        from he2st.encoders import create_encoder

        # Every member starts from the pretrained weights; a reloaded model gets its weights from its state.
        weights = None if self._loading else p["weights"]
        backbone = create_encoder(p["encoder"], weights=weights, seed=seed)
        backbone.train()
        info = backbone.info
        return BackboneModel(backbone, self._make_head(int(info.dim)), info.mean, info.std)

    # -- data ------------------------------------------------------------------------------
    def _patches(self, slide: Any) -> Any:
        """Patches of a slide at this method's patch size (memoised during ``fit``)."""
        size = self._patch_px(slide)
        return self._memo_patches(slide, size, self.read_mpp(slide, size))

    def _memo_patches(self, slide: Any, size_px: int, target_mpp: float | None) -> Any:
        """:func:`he2st.image.extract_patches` of ``slide`` at ``size_px`` / ``target_mpp``, memoised during ``fit``."""
        from he2st.image import extract_patches

        key = (meta(slide).slide_id, size_px, target_mpp)
        if key not in self._patch_memo:
            self._patch_memo[key] = extract_patches(slide, size_px=size_px, target_mpp=target_mpp)
        return self._patch_memo[key]

    def _inputs(self, slide: Any) -> np.ndarray:
        """Frozen features ``(n, d)`` float32, or patches ``(n, S, S, 3)`` uint8 in finetune mode."""
        p = self.params
        frozen = p["mode"] == "frozen"
        self.check_servable(slide)
        size = self._patch_px(slide)
        x = image_inputs(
            slide, p["mode"], p["encoder"], p["weights"], size, input_px=p["input_px"],
            tta=bool(p["tta"]), stain=self.stain_, dim=self.in_dim_ if frozen else None,
            patches=None if frozen else self._patches(slide), target_mpp=self.read_mpp(slide, size),
            context=p.get("context"),
        )
        if frozen and p["standardize"] and p.get("feature_scaling") == "slide":
            x = centre_slide(x)  # each slide's own mean, at fit and at predict (he2st.methods.scaling)
        return x

    def _fit_stain(self, slides: list[Any]) -> Any:
        """Stain normaliser fitted on patches of the TRAINING slides only (None when ``stain`` is unset)."""
        name = self.params["stain"]
        if not name:
            return None
        from he2st.image.stain import StainNormalizer

        rng = np.random.default_rng(int(self.params["seed"]))
        per_slide = int(self.params["stain_fit_spots"])
        sample = []
        for s in slides:
            patches = self._patches(s)
            # Prefer tissue-rich patches: glass carries no stain information.
            order = np.flatnonzero(np.asarray(patches.tissue_fraction) >= 0.5)
            if len(order) == 0:
                order = np.arange(len(patches))
            take = np.sort(rng.choice(order, size=min(len(order), per_slide), replace=False))
            sample.append(np.asarray(patches.images[take]))
        return StainNormalizer(name).fit(np.concatenate(sample))

    # -- prediction ---------------------------------------------------------------------------
    def _check_ready(self) -> None:
        self._check_fitted()
        if not self.models_:
            raise He2stInputError(f"method {self.name!r} is not fitted: call fit() first")

    @torch.no_grad()
    def _member_outputs(self, slide: Any) -> list[dict[str, np.ndarray]]:
        """Decoded outputs of every member on every spot of ``slide``."""
        self._check_ready()
        p = self.params
        frozen = p["mode"] == "frozen"
        device = default_device(p["device"])
        X = torch.from_numpy(np.ascontiguousarray(self._inputs(slide)))
        bs = 1024 if frozen else int(p["batch_size"])
        results = []
        for model in self.models_:
            model.to(device).eval()
            parts: list[dict[str, np.ndarray]] = []
            for start in range(0, len(X), bs):
                x = X[start : start + bs].to(device)
                if frozen:
                    parts.append(self._decode(model(x)))
                else:
                    parts.append(self._decode_images(model, to_unit(x)))
            model.cpu()
            results.append({k: np.concatenate([d[k] for d in parts]) for k in parts[0]})
        return results

    def _decode_images(self, model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Decoded outputs on a ``[0, 1]`` image batch, averaged over the 8 dihedral symmetries with ``tta``."""
        if not self.params["tta"]:
            return self._decode(model(x))
        from he2st.image.augment import dihedral

        outs = [self._decode(model(dihedral(x, k))) for k in range(8)]
        return {key: np.mean([o[key] for o in outs], axis=0) for key in outs[0]}

    # -- persistence -------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        self._check_ready()
        state: dict[str, np.ndarray] = {}
        for i, model in enumerate(self.models_):
            state.update(module_state(model, prefix=f"member{i}."))
        state.update(self._state_arrays())
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self._set_state_arrays(state)
        n = int(self._extra.get("n_members", self.params["n_models"]))
        self.models_ = []
        self._loading = True
        try:
            for i in range(n):
                model = self._build_model(seed=int(self.params["seed"]) + i)
                load_module_state(model, state, prefix=f"member{i}.")
                self.models_.append(model.eval())
        finally:
            self._loading = False

    def get_extra(self) -> dict[str, Any]:
        self._check_ready()
        return jsonable(
            {
                "in_dim": self.in_dim_,
                "n_members": len(self.models_),
                "history": self.history_,
                "stain": None if self.stain_ is None else self.stain_.get_state(),
            }
        )

    def set_extra(self, extra: dict[str, Any]) -> None:
        self._extra = dict(extra)
        self.in_dim_ = extra.get("in_dim")
        self.history_ = list(extra.get("history", []))
        self.stain_ = None
        if extra.get("stain") is not None:
            from he2st.image.stain import StainNormalizer

            self.stain_ = StainNormalizer.from_state(extra["stain"])


def member_rows(rows: np.ndarray, how: str, seed: int) -> np.ndarray:
    """Training rows of one ensemble member.

    Parameters
    ----------
    rows
        The training rows of the inner split.
    how
        ``"same"`` (``rows`` itself) or ``"bootstrap"`` (``len(rows)`` draws
        with replacement).
    seed
        Seed of the member's draw.

    Returns
    -------
    numpy.ndarray
        int64 row indices (sorted for a bootstrap; repeats kept).
    """
    if how == "same" or len(rows) == 0:
        return rows
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=len(rows), replace=True))


__all__ = ["MEMBER_DATA", "MODES", "SPOT_DEFAULTS", "SpotRegressor", "member_rows"]
