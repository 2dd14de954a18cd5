"""ST-Net: DenseNet-121 and one linear layer per spot (He et al., Nat. Biomed. Eng. 2020)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from he2st.methods.registry import register_method
from he2st.methods.families.spot import SPOT_DEFAULTS, SpotRegressor


@register_method("stnet")
class STNet(SpotRegressor):
    """ST-Net: an ImageNet DenseNet-121 whose last layer is replaced by one linear layer to the panel.

    He B. et al., "Integrating spatial gene expression and breast tumour
    morphology via deep learning", Nat. Biomed. Eng. 4:827 (2020); settings as
    reviewed by Jiang et al. 2024 (seed paper 002: Table S1, Suppl. 7.1) and the
    authors' repository (``bryanhe/ST-Net``); every setting with its source:
    ``docs/fidelity.md#st-net``:

    - 224 x 224 px patch centred on each spot; DenseNet-121 pre-trained on
      ImageNet; the classifier replaced by one ``Linear(1024, n_genes)`` whose
      weights start at zero and whose bias starts at the training mean
      expression (so training starts from the mean predictor, as in the
      repository);
    - target: the ``--norm`` form the published runs use (README.md:38),
      ``ln((1 + count) / (n_genes + total))`` over all genes of the slide
      (stnet/datasets/spatial.py:159-178; ``train_normalization="stnet_norm"``);
      :meth:`predict` returns ``normalization``'s common scale (default
      ``cpm_log1p``; see :mod:`he2st.pp.normalize` for the map);
    - genes: the 250 with the highest mean count (``--gene_n 250``,
      stnet/parser.py:180). The protocol, not the method, chooses panels:
      pass ``genes="mean:250"`` to :func:`he2st.evaluate.protocol.choose_panel`
      (or the benchmark configuration) for ST-Net's recipe, read from the
      training slides only;
    - loss: squared error averaged over genes and *summed* over the spots of a
      batch (the repository's loss; this keeps the paper's learning rate
      meaningful). The validation loss is the plain mean squared error;
    - SGD with momentum 0.9, learning rate 1e-6, no weight decay, batch 32,
      50 epochs, the epoch with the lowest loss on an inner validation split
      kept (no early stop);
    - augmentation: random horizontal / vertical flips and 90 degree rotations
      (preset ``"stnet"``, finetune mode only);
    - test-time augmentation: prediction averaged over the 8 dihedral
      symmetries (``tta=True``; in frozen mode the cached features are
      averaged, which for a linear head is the same as averaging predictions).

    Departures: in frozen mode the DenseNet is not trained and its features are
    standardised (see :mod:`he2st.methods.families.spot`); the images are
    normalised with the encoder's ImageNet statistics rather than statistics
    estimated on the training patches.

    Defaults
    --------
    normalization="cpm_log1p" (evaluation), train_normalization="stnet_norm",
    seed=0, mode="frozen", encoder="densenet121",
    weights="imagenet", patch_px=224, input_px=None (encoder input size),
    tta=True, stain=None, augment="stnet", epochs=50, batch_size=32, lr=1e-6,
    optimizer="sgd", momentum=0.9, weight_decay=0.0, patience=None,
    val_split="auto", val_fraction=0.1, n_models=1, standardize=True,
    stain_fit_spots=64, device="auto",
    patch_um=None, context=None (:func:`he2st.methods.base.parse_context`), feature_scaling="standard" (:mod:`he2st.methods.scaling`).

    The paper's lr of 1e-6 trains a 7M-parameter network for 50 epochs on a GPU;
    a frozen-feature head on a CPU needs a larger one (e.g. ``lr=1e-3``).

    Examples
    --------
    >>> m = he2st.methods.create_method("stnet", encoder="efficientnet_lite0", lr=1e-3, epochs=20)
    >>> m.fit(train_slides, panel)
    >>> pred = m.predict(test_slide)
    """

    paper: ClassVar[str] = "He et al., Nat. Biomed. Eng. 2020 (ST-Net)"
    supports_train_normalization: ClassVar[bool] = True

    defaults: ClassVar[dict[str, Any]] = {
        **SPOT_DEFAULTS,
        "train_normalization": "stnet_norm",
        "encoder": "densenet121",
        "weights": "imagenet",
        "patch_px": 224,
        "tta": True,
        "augment": "stnet",
        "epochs": 50,
        "batch_size": 32,
        "lr": 1e-6,
        "optimizer": "sgd",
        "momentum": 0.9,
        "weight_decay": 0.0,
        "patience": None,
        "val_split": "auto",
        "val_fraction": 0.1,
        "n_models": 1,
    }

    def _make_head(self, in_dim: int) -> nn.Module:
        return nn.Linear(in_dim, len(self.genes or []))

    def _init_head(self, head: nn.Module, targets: tuple[np.ndarray, ...]) -> None:
        # ST-Net starts from the mean predictor: zero weights, bias = training mean.
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.from_numpy(targets[0].mean(axis=0)).float())

    def _targets(self, slide: Any) -> tuple[np.ndarray, ...]:
        return (np.asarray(self.train_targets(slide), dtype=np.float32),)

    def _loss(self, out: torch.Tensor, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return (out - targets[0]).pow(2).mean(dim=1).sum()

    def _val_loss(self, out: torch.Tensor, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return (out - targets[0]).pow(2).mean()

    def _decode(self, out: torch.Tensor) -> dict[str, np.ndarray]:
        return {"mean": out.float().cpu().numpy()}
