"""DeepSpaCE: VGG16, fully connected layers and a smooth-L1 loss on min-max scaled expression (Monjo et al. 2022)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from he2st.data.slide import meta
from he2st.methods.registry import register_method
from he2st.methods.families.spot import SPOT_DEFAULTS, SpotRegressor
from he2st.pp.normalize import MinMaxScaler

__all__ = ["DeepSpaCE", "MinMaxScaler"]


@register_method("deepspace")
class DeepSpaCE(SpotRegressor):
    """DeepSpaCE: VGG16 features, two fully connected layers, smooth-L1 loss on min-max scaled expression.

    Monjo T. et al., "Efficient prediction of a spatial transcriptomics profile
    better characterizes breast cancer tissue sections without costly
    experimentation", Sci. Rep. 12:4133 (2022); settings from Jiang et al.
    2024 (seed paper 002: "DeepSpaCE", Table S1, Suppl. 7.1) and the authors'
    repository (``tmonjo/DeepSpaCE``); every setting with its source:
    ``docs/fidelity.md#deepspace``:

    - patch side 1.5 x the spot diameter (``patch_scale=1.5``; ``patch_px``
      overrides it), ImageNet VGG16 trunk (the encoder ``vgg16`` returns fc7);
    - head: the repository's, VGG16's last classifier layer replaced by one
      ``Linear(4096, n_genes)`` on fc7 (DeepSpaceLib.py:352; ``hidden=0``).
      ``hidden=4096`` adds he2st's extra ``Linear(d, hidden) -> ReLU ->
      Dropout(dropout)`` layer before it (an option, not the paper's);
    - targets: each gene min-max scaled to [0, 1] with the minimum and maximum
      over the spots of the TRAINING slides (:class:`MinMaxScaler`); predictions
      are mapped back with the inverse, so :meth:`predict` returns the
      method's ``normalization`` scale. DeepSpaCE scales SCTransform values;
      SCTransform needs R, so the base scale here is ``cpm_log1p``;
    - loss: smooth L1 (beta 1) averaged over genes;
    - the output layer starts at the mean predictor (zero weights, bias at the
      training mean; our choice, as ST-Net's initialisation);
    - Adam, lr 1e-4, weight decay 1e-4, batch 128, up to 10 epochs with early
      stopping after 5 epochs without improvement of the validation loss; the
      validation set is a random 20 % of the training spots (the repository's
      first fold of a 5-fold split);
    - tiles whose mean RGB exceeds 80 % of 255 (``max_mean_rgb=0.8``) are
      white background and are dropped from training. At prediction they are
      still predicted; :meth:`flagged_spots` marks them. (The repository
      thresholds at the 80th percentile of tile means and drops tiles with more
      than half of their pixels above it; the benchmark describes the simpler
      absolute rule used here.)
    - augmentation (finetune mode): flips, crops and colour shifts
      (``augment="deepspace"``).

    Defaults
    --------
    normalization="cpm_log1p", seed=0, mode="frozen", encoder="vgg16",
    weights="imagenet", patch_px=None (1.5 x spot diameter), patch_scale=1.5,
    input_px=None, tta=False, stain=None, augment="deepspace", hidden=0,
    dropout=0.5 (only with hidden > 0), max_mean_rgb=0.8, epochs=10, batch_size=128, lr=1e-4,
    optimizer="adam", weight_decay=1e-4, momentum=0.9 (unused), patience=5,
    val_split="spot", val_fraction=0.2, n_models=1, standardize=True,
    stain_fit_spots=64, device="auto",
    patch_um=None, context=None (:func:`he2st.methods.base.parse_context`), feature_scaling="standard" (:mod:`he2st.methods.scaling`).
    """

    paper: ClassVar[str] = "Monjo et al. 2022 (DeepSpaCE)"

    defaults: ClassVar[dict[str, Any]] = {
        **SPOT_DEFAULTS,
        "normalization": "cpm_log1p",
        "encoder": "vgg16",
        "weights": "imagenet",
        "patch_px": None,
        "patch_scale": 1.5,
        "tta": False,
        "augment": "deepspace",
        "hidden": 0,
        "dropout": 0.5,
        "max_mean_rgb": 0.8,
        "epochs": 10,
        "batch_size": 128,
        "lr": 1e-4,
        "optimizer": "adam",
        "weight_decay": 1e-4,
        "patience": 5,
        "val_split": "spot",
        "val_fraction": 0.2,
        "n_models": 1,
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.scaler_ = MinMaxScaler()

    def _patch_px(self, slide: Any) -> int:
        if self.params["patch_px"] is not None:
            return int(self.params["patch_px"])
        return max(8, int(round(float(self.params["patch_scale"]) * meta(slide).spot_diameter_px)))

    def _prepare(self, train_slides: list[Any]) -> None:
        # Fitted on the training slides only; validation and test slides never move the scale.
        self.scaler_ = MinMaxScaler().fit([np.asarray(self.targets(s)) for s in train_slides])

    def _keep(self, slide: Any) -> np.ndarray | None:
        limit = float(self.params["max_mean_rgb"])
        if limit >= 1:
            return None
        images = np.asarray(self._patches(slide).images)
        means = images.reshape(len(images), -1).mean(axis=1)  # mean over pixels and the 3 channels
        return means <= limit * 255.0

    def _make_head(self, in_dim: int) -> nn.Module:
        g, h = len(self.genes or []), int(self.params["hidden"])
        if h <= 0:
            return nn.Linear(in_dim, g)
        return nn.Sequential(nn.Linear(in_dim, h), nn.ReLU(), nn.Dropout(float(self.params["dropout"])), nn.Linear(h, g))

    def _init_head(self, head: nn.Module, targets: tuple[np.ndarray, ...]) -> None:
        # Start from the mean predictor (zero output weights, bias = training mean of the scaled
        # targets), as ST-Net does: on standardised frozen features a randomly initialised output
        # layer adds noise of about a third of the [0, 1] range that 10 epochs do not remove.
        last = head if isinstance(head, nn.Linear) else head[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.from_numpy(targets[0].mean(axis=0)).float())

    def _targets(self, slide: Any) -> tuple[np.ndarray, ...]:
        return (self.scaler_.transform(self.targets(slide)),)

    def _loss(self, out: torch.Tensor, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.smooth_l1_loss(out, targets[0], beta=1.0)

    def _decode(self, out: torch.Tensor) -> dict[str, np.ndarray]:
        return {"mean": self.scaler_.inverse_transform(out.float().cpu().numpy())}

    def _state_arrays(self) -> dict[str, np.ndarray]:
        lo, span = self.scaler_._check()
        return {"scaler.min": lo, "scaler.span": span}

    def _set_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        self.scaler_ = MinMaxScaler()
        self.scaler_.min_ = np.asarray(state["scaler.min"], dtype=np.float64)
        self.scaler_.span_ = np.asarray(state["scaler.span"], dtype=np.float64)
