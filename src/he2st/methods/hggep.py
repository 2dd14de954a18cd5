"""HGGEP: gradient enhancement, ShuffleNet stages, ViTs and a spot hypergraph (Li et al. 2024)."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from he2st.errors import He2stInputError, RandomWeightsWarning
from he2st.methods.base import _LOADING, Capabilities, EncoderUse
from he2st.methods.families.slide import SLIDE_DEFAULTS, SlideRegressor
from he2st.methods.hist2st import Hist2ST
from he2st.methods.nn.attention import ChannelSpatialAttention
from he2st.methods.nn.cdc import CENTRAL_DIFFERENCE_KERNELS, GradientEnhancement
from he2st.methods.nn.hypergraph import HypergraphResidual, spot_hyperedges
from he2st.methods.nn.likelihoods import ZINBHead
from he2st.methods.nn.transformer import SpotTransformer
from he2st.methods.registry import register_method

__all__ = ["BACKBONE", "HGGEP", "HGGEPNet"]

#: The backbone encoder (torchvision's ShuffleNet-V2 0.5x, as in the authors' code).
BACKBONE = "shufflenet_v2_x0_5"

#: Hist2ST's settings that HGGEP's defaults take unchanged.
_HIST2ST_TRAINING = (
    "zinb_weight", "distill_views", "distill_weight", "augment", "pixel_scale", "regclass", "train_normalization"
)


def _stage(channels_in: int, channels_out: int, grid: int, ratio: int) -> nn.Sequential:
    """CBAM -> BatchNorm -> 1 x 1 convolution -> ``grid x grid`` map (identity at 112 px) -> flattened."""
    return nn.Sequential(
        ChannelSpatialAttention(channels_in, ratio),
        nn.BatchNorm2d(channels_in),
        nn.Conv2d(channels_in, channels_out, 1),
        nn.AdaptiveAvgPool2d(grid),
        nn.Flatten(),
    )


class HGGEPNet(nn.Module):
    """GEM -> ShuffleNet stages -> CBAM per stage -> three ViTs -> hypergraph -> LSTM over stages -> heads.

    Parameters
    ----------
    n_genes
        Outputs of the gene head.
    backbone
        A torchvision ShuffleNet-V2 classifier (its ``conv1``, ``stage2-4``
        and ``conv5`` are used; its max-pool is skipped, as in the authors' code).
    dim
        Width of the spot features (1,024).
    stage_grid
        Side of the map each stage is flattened from (4: a 112 px patch's
        maps are 4 x 4; other sizes are average-pooled to it); the stage-4 and
        conv5 maps are reduced to ``dim / stage_grid^2`` channels.
    gem, cdc_theta, cdc_kernel
        Gradient enhancement module on or off, its difference convolution's theta and kernel.
    cbam_ratio
        Channel-attention reduction (16).
    hypergraph, hyperedge_k, hyper_hidden, hyper_dropout
        Hypergraph module on or off, picks per spot minus one, hidden width, dropout.
    lstm_layers
        Layers of the LSTM that reads the stage features as a sequence.
    zinb, distill
        Add the ZINB head and the self-distillation weight network (Hist2ST's).
    freeze_backbone
        Keep the ShuffleNet weights and BatchNorm statistics fixed.
    n_pos, depth, heads, dim_head, mlp_dim, dropout, attention, pos_init_std
        Position tables and the shape of each of the three ViTs.
    """

    def __init__(
        self,
        n_genes: int,
        backbone: nn.Module,
        *,
        dim: int = 1024,
        stage_grid: int = 4,
        gem: bool = True,
        cdc_theta: float = 0.7,
        cdc_kernel: str = "cross",
        cbam_ratio: int = 16,
        hypergraph: bool = True,
        hyperedge_k: int = 3,
        hyper_hidden: int = 512,
        hyper_dropout: float = 0.5,
        lstm_layers: int = 4,
        zinb: bool = True,
        distill: bool = True,
        freeze_backbone: bool = False,
        n_pos: int = 64,
        depth: int = 4,
        heads: int = 16,
        dim_head: int = 64,
        mlp_dim: int | None = 1024,
        dropout: float = 0.2,
        attention: str = "full",
        pos_init_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.gem = GradientEnhancement(3, 3, cdc_theta, cdc_kernel) if gem else None
        b = backbone
        self.backbone = nn.ModuleDict(
            {"conv1": b.conv1, "stage2": b.stage2, "stage3": b.stage3, "stage4": b.stage4, "conv5": b.conv5}
        )
        self.freeze_backbone = bool(freeze_backbone)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
        c4 = b.stage4[-1].branch2[-3].out_channels * 2  # stage-4 width (192 at 0.5x)
        c5 = b.conv5[0].out_channels  # 1024
        cells = stage_grid * stage_grid
        self.down4 = _stage(c4, dim // cells, stage_grid, cbam_ratio)
        self.down5 = _stage(c5, dim // cells, stage_grid, cbam_ratio)
        self.down6 = _stage(c5, dim, 1, cbam_ratio)
        self.x_embed = nn.Embedding(n_pos, dim)
        self.y_embed = nn.Embedding(n_pos, dim)
        nn.init.normal_(self.x_embed.weight, std=pos_init_std)
        nn.init.normal_(self.y_embed.weight, std=pos_init_std)
        self.vits = nn.ModuleList(
            [SpotTransformer(dim, depth, heads, dim_head, mlp_dim or dim, dropout, attention) for _ in range(3)]
        )
        self.hyperedge_k = int(hyperedge_k)
        self.hgnn = HypergraphResidual(dim, hyper_hidden, hyper_dropout) if hypergraph else None
        self.jk = nn.LSTM(dim, dim, num_layers=lstm_layers)
        self.gene_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_genes))
        self.zinb = ZINBHead(dim, n_genes) if zinb else None
        self.coef = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1)) if distill else None
        self.classifier = None  # Hist2ST's regclass head: not part of HGGEP

    def train(self, mode: bool = True) -> HGGEPNet:
        """Train mode, with a frozen backbone's BatchNorm statistics kept fixed."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patches ``(n, 3, S, S)`` -> the three stage features ``(n, dim)`` before the ViTs."""
        if self.gem is not None:
            x = self.gem(x)
        bb = self.backbone
        with torch.set_grad_enabled(torch.is_grad_enabled() and not (self.freeze_backbone and self.gem is None)):
            s4 = bb["stage4"](bb["stage3"](bb["stage2"](bb["conv1"](x))))
            s5 = bb["conv5"](s4)
        return self.down4(s4), self.down5(s5), self.down6(F.adaptive_max_pool2d(s5, 1))

    def embed(
        self, x: torch.Tensor, positions: torch.Tensor, edge_index: torch.Tensor, neighbors: Any = None
    ) -> torch.Tensor:
        """Spot representations ``(n, dim)``: the LSTM over the stage (and hypergraph) features, averaged.

        Parameters
        ----------
        x
            ``(n, 3, S, S)`` patches on the ``pixel_scale``.
        positions
            ``(n, 2)`` int64 ``(x, y)`` indices into the position tables.
        edge_index
            ``(2, E)`` spot graph (row 0 neighbour, row 1 spot) behind the hyperedges.
        neighbors
            Local attention neighbour lists, or None for global attention.

        Returns
        -------
        torch.Tensor
            ``(n, dim)`` spot representations.
        """
        pos = self.x_embed(positions[:, 0]) + self.y_embed(positions[:, 1])
        seq = [vit(h + pos, neighbors) for vit, h in zip(self.vits, self.stages(x), strict=True)]
        if self.hgnn is not None:
            fused = seq[0] + seq[1] + seq[2]
            seq.append(self.hgnn(fused, spot_hyperedges(fused, edge_index, self.hyperedge_k)))
        out, _ = self.jk(torch.stack(seq))
        return out.mean(0)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, edge_index: torch.Tensor, neighbors: Any = None
    ) -> torch.Tensor:
        """Predicted expression ``(n, n_genes)`` (normalised scale): the gene head on :meth:`embed`.

        Parameters
        ----------
        x, positions, edge_index, neighbors
            As in :meth:`embed`.

        Returns
        -------
        torch.Tensor
            ``(n, n_genes)``.
        """
        return self.gene_head(self.embed(x, positions, edge_index, neighbors))


@register_method("hggep")
class HGGEP(Hist2ST):
    """HGGEP: gradient-enhanced multi-stage image features, ViTs and a spot hypergraph.

    Li B., Zhang Y., Wang Q. et al., "Gene expression prediction from
    histology images via hypergraph neural networks", Brief. Bioinform.
    25(6):bbae500 (2024); every default is the authors' code
    (``QSong-github/HGGEP``: ``HGGEP.py`` for the network, ``HGGEP_train.py``
    and ``dataset.py``, Hist2ST's, for training). Setting by setting, with
    file:line, in ``docs/fidelity.md#hggep``:

    - a 112 x 112 px patch per spot (``dataset.py``: ``r = 224 // 4``, 2r px);
    - the gradient enhancement module (:class:`he2st.methods.nn.cdc.GradientEnhancement`):
      a stride-2 3 x 3 convolution and a stride-2 cross-shaped central-difference
      convolution (theta 0.7), each BatchNorm + ReLU6, fused by a 1 x 1
      convolution (padding 1) to 3 channels;
    - ShuffleNet-V2 0.5x's ``conv1``, stages 2-4 and ``conv5`` (its max-pool
      skipped): 192-channel stage-4 and 1,024-channel conv5 maps of 4 x 4;
    - each of three stage features refined by CBAM (reduction 16, 7 x 7 spatial
      kernel), BatchNorm and a 1 x 1 convolution: stage 4 and conv5 to 64
      channels, flattened (4 x 4 x 64 = 1,024), and the max-pooled conv5 to 1,024;
    - learnable x and y array-coordinate embeddings (64 rows of 1,024) added to
      each, then three independent ViTs of 4 layers, 16 heads of 64, MLP 1,024,
      dropout 0.2;
    - the hypergraph association module: the sum of the three ViT outputs,
      hyperedges from the spot graph (8 nearest spots on the array, pruned to
      2 grid units) and the feature distances, ``k + 1 = 4`` picks per spot
      (:func:`he2st.methods.nn.hypergraph.spot_hyperedges`), two
      ``HypergraphConv`` (1,024 -> 512 -> 1,024, ReLU, LayerNorm, dropout 0.5)
      plus a residual;
    - the three stage features and the hypergraph output read as a sequence by
      a 4-layer LSTM (1,024) and averaged; a LayerNorm + linear gene head;
    - Hist2ST's losses (:class:`he2st.methods.hist2st.Hist2ST`): MSE on
      ``log10(1 + 1e4 * count / panel_total)`` (``train_normalization="hist2st_lognorm"``),
      ZINB on the raw counts with weight 0.25, self-distillation over 5
      augmented views (grayscale, rotation, flip) with weight 0.5;
    - Adam, learning rate 1e-5, 500 epochs (100 rounds of 5), one slide per step.

    Weights: ShuffleNet starts from ImageNet, as the authors' code
    (``weights="imagenet"``: torchvision's ``shufflenetv2_x0.5-f707e7126e.pth``,
    found in ``$HE2ST_WEIGHTS_DIR`` or torch's hub cache; a missing file fails
    when the method is created, listing the paths tried; nothing is
    downloaded). ``weights=None`` trains it from a random initialisation and
    ``fit`` says so with a ``RandomWeightsWarning``.

    Departures: unit hyperedge weights (the
    code passes per-incidence distances where ``HypergraphConv`` reads
    per-hyperedge weights, so they were misaligned); the hypergraph dropout acts
    in training only (the code's ``F.dropout`` also drops at test time); the
    checkpoint is the last epoch (the code keeps the one with the best test-set
    Pearson); patches scaled to [0, 1] (``pixel_scale="uint8"`` for the
    code's 0-255). Large slides are windowed and attention may be local (see
    :mod:`he2st.methods.families.slide`).

    Ablations: ``gem=False`` (backbone on the raw patch), ``hypergraph=False``
    (LSTM over the three stages only), ``cdc_theta=0`` (plain convolution in
    the difference branch). ``freeze_backbone=True`` keeps the ShuffleNet
    weights fixed (the GEM, attention, ViTs and heads are still trained).

    Defaults
    --------
    normalization="cpm_log1p" (evaluation), train_normalization="hist2st_lognorm",
    seed=0, patch_px=112, weights="imagenet", freeze_backbone=False, dim=1024,
    stage_grid=4, gem=True, cdc_theta=0.7, cdc_kernel="cross", cbam_ratio=16,
    n_pos=64, pos_init_std=1.0, depth=4, heads=16, dim_head=64, mlp_dim=1024,
    dropout=0.2, hypergraph=True, hyperedge_k=3, hyper_hidden=512,
    hyper_dropout=0.5, lstm_layers=4, neighbors=8, graph_max_distance=2.0,
    zinb_weight=0.25, distill_views=5, distill_weight=0.5, augment="hist2st",
    pixel_scale="unit", regclass=False, epochs=500, lr=1e-5, optimizer="adam",
    weight_decay=0.0, grad_clip=None, patience=None, attention="full",
    attention_k=64, attention_radius=None, window_px=4000.0,
    window_min_spots=1000, window_overlap=0.5, device="auto".

    Examples
    --------
    >>> m = he2st.methods.create_method("hggep", epochs=50)
    >>> ablated = he2st.methods.create_method("hggep", hypergraph=False)
    """

    paper: ClassVar[str] = "Li et al., Brief. Bioinform. 2024 (HGGEP)"

    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_positions=True, needs_whole_slides=True, frozen_features=False, finetune=True
    )
    defaults: ClassVar[dict[str, Any]] = {
        **SLIDE_DEFAULTS,
        "patch_px": 112,
        "weights": "imagenet",
        "freeze_backbone": False,
        "dim": 1024,
        "stage_grid": 4,
        "gem": True,
        "cdc_theta": 0.7,
        "cdc_kernel": "cross",
        "cbam_ratio": 16,
        "depth": 4,
        "heads": 16,
        "dim_head": 64,
        "mlp_dim": 1024,
        "dropout": 0.2,
        "hypergraph": True,
        "hyperedge_k": 3,
        "hyper_hidden": 512,
        "hyper_dropout": 0.5,
        "lstm_layers": 4,
        "neighbors": 8,
        "graph_max_distance": 2.0,
        # Hist2ST's losses, augmentation and targets, which HGGEP's training script keeps.
        **{k: Hist2ST.defaults[k] for k in _HIST2ST_TRAINING},
        "epochs": 500,
        "lr": 1e-5,
    }

    def _check_params(self) -> None:
        SlideRegressor._check_params(self)
        p = self.params
        bad = He2stInputError
        if p["regclass"]:
            raise bad("method 'hggep': regclass (Hist2ST's classification variant) is not part of HGGEP")
        if p["cdc_kernel"] not in CENTRAL_DIFFERENCE_KERNELS:
            raise bad(f"method 'hggep': cdc_kernel must be one of {CENTRAL_DIFFERENCE_KERNELS}, got {p['cdc_kernel']!r}")
        if not 0.0 <= float(p["cdc_theta"]) <= 1.0:
            raise bad(f"method 'hggep': cdc_theta must be in [0, 1], got {p['cdc_theta']!r}")
        for key in ("zinb_weight", "distill_weight", "distill_views", "hyperedge_k"):
            if float(p[key]) < 0:
                raise bad(f"method 'hggep': {key} must be >= 0, got {p[key]!r}")
        for key in ("dim", "stage_grid", "cbam_ratio", "lstm_layers", "hyper_hidden", "depth", "heads", "dim_head"):
            if int(p[key]) < 1:
                raise bad(f"method 'hggep': {key} must be >= 1, got {p[key]!r}")
        cells = int(p["stage_grid"]) ** 2
        if int(p["dim"]) % cells:
            raise bad(
                f"method 'hggep': dim ({p['dim']}) must be divisible by stage_grid^2 ({cells}): "
                "the stage maps are flattened from stage_grid x stage_grid cells"
            )
        if not 0.0 <= float(p["hyper_dropout"]) < 1.0:
            raise bad(f"method 'hggep': hyper_dropout must be in [0, 1), got {p['hyper_dropout']!r}")

    def encoders(self) -> list[EncoderUse]:
        """The ShuffleNet backbone, trained with the model unless ``freeze_backbone``."""
        return [EncoderUse(BACKBONE, self.params["weights"], trained=not self.params["freeze_backbone"])]

    @property
    def frozen(self) -> bool:
        """False: HGGEP always reads pixels (there is no cached-feature mode)."""
        return False

    def _fit(self, train_slides: list[Any], val_slides: list[Any] | None) -> None:
        p = self.params
        if p["weights"] is None and not p["freeze_backbone"]:
            # A frozen random backbone is reported by Method.fit; a trained one is reported here.
            warnings.warn(
                RandomWeightsWarning(
                    "method 'hggep': the ShuffleNet-V2 backbone starts from random weights (weights=None); "
                    "the authors start it from ImageNet: pass weights='imagenet' (torchvision's "
                    "shufflenetv2_x0.5-f707e7126e.pth in $HE2ST_WEIGHTS_DIR or torch's hub cache) or a checkpoint path"
                ),
                stacklevel=3,
            )
        super()._fit(train_slides, val_slides)

    def _build_model(self) -> nn.Module:
        from he2st.encoders import create_encoder

        p = self.params
        torch.manual_seed(int(p["seed"]))
        # While a saved model loads, set_state replaces every weight: no weights file is read.
        weights = None if _LOADING.get() else p["weights"]
        backbone = create_encoder(BACKBONE, weights=weights, seed=int(p["seed"])).model
        kw = self._transformer_kwargs()
        return HGGEPNet(
            backbone=backbone,
            dim=int(p["dim"]),
            stage_grid=int(p["stage_grid"]),
            gem=bool(p["gem"]),
            cdc_theta=float(p["cdc_theta"]),
            cdc_kernel=str(p["cdc_kernel"]),
            cbam_ratio=int(p["cbam_ratio"]),
            hypergraph=bool(p["hypergraph"]),
            hyperedge_k=int(p["hyperedge_k"]),
            hyper_hidden=int(p["hyper_hidden"]),
            hyper_dropout=float(p["hyper_dropout"]),
            lstm_layers=int(p["lstm_layers"]),
            zinb=self._zinb_on,
            distill=self._distill_on,
            freeze_backbone=bool(p["freeze_backbone"]),
            **kw,
        )
