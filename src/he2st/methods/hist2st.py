"""Hist2ST (Zeng et al. 2022) and the three variants of Jiang et al. 2024."""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from he2st.data.slide import meta, require_counts
from he2st.errors import He2stInputError, SlideError
from he2st.methods.base import CONTEXT_DEFAULTS, Capabilities, EncoderUse
from he2st.methods.registry import register_method
from he2st.methods.nn.likelihoods import ZINBHead, zinb_nll
from he2st.methods.families.slide import SLIDE_DEFAULTS, SlideBatch, SlideRegressor
from he2st.methods.nn.inputs import encoder_inputs, to_unit
from he2st.methods.nn.transformer import SpotTransformer

__all__ = ["GAT_VARIANTS", "MISSING_LABELS", "Hist2ST", "Hist2STNet"]

#: Label values that mean "no annotation" (ignored by the classification loss).
MISSING_LABELS = frozenset({"", "nan", "none", "undetermined", "unknown", "na"})

MODES = ("auto", "frozen", "finetune")
#: The GAT variant: one layer shared across its uses (Jiang et al.'s code) or independent layers.
GAT_VARIANTS = ("shared", "stacked")


class Hist2STNet(nn.Module):
    """Image branch -> position embeddings -> Transformer -> GraphSAGE (+JK-LSTM) -> heads.

    Parameters
    ----------
    n_genes
        Outputs of the mean-expression head.
    dim
        Width of the spot features.
    encoder
        An image encoder mapping ``(n, 3, S, S)`` pixels to ``(n, dim)``
        (Hist2ST's ConvMixer), or None when inputs are frozen features.
    feature_dim
        Width of frozen input features (then a trainable ``Linear(feature_dim,
        dim)`` replaces the backbone's last layer).
    n_pos, depth, heads, dim_head, mlp_dim, dropout, attention
        Position tables and Transformer shape.
    gnn_depth
        GraphSAGE layers (mean aggregation over neighbours, ReLU, L2
        normalisation); their outputs are read as a sequence by a 2-layer LSTM
        and averaged (jumping knowledge).
    gat_layers, gat_heads
        When ``gat_layers > 0`` the Transformer and GraphSAGE are replaced by
        a GAT (the "GAT" variant) of ``gat_heads`` concatenated heads.
    gat_variant
        ``"shared"`` (Jiang et al.'s code): ONE GAT layer applied
        ``gat_layers`` times, no self loops, its outputs read by the
        jumping-knowledge LSTM, positions unused (no position tables);
        ``"stacked"``: ``gat_layers`` independent layers with self loops and
        ELU between them, positions added to the features.
    zinb
        Add the ZINB head (mean, dispersion, dropout).
    distill
        Add the per-view weight network of self-distillation.
    cls_hidden, n_classes
        Regclass: a 4-layer MLP classifier (``len(cls_hidden) + 1`` linear layers).
    pos_init_std
        Standard deviation of the position embeddings' initialisation (torch's default 1).
    """

    def __init__(
        self,
        n_genes: int,
        dim: int,
        *,
        encoder: nn.Module | None = None,
        feature_dim: int | None = None,
        n_pos: int = 64,
        depth: int = 8,
        heads: int = 16,
        dim_head: int = 64,
        mlp_dim: int | None = None,
        dropout: float = 0.2,
        attention: str = "full",
        gnn_depth: int = 4,
        gat_layers: int = 0,
        gat_heads: int = 8,
        gat_variant: str = "shared",
        zinb: bool = True,
        distill: bool = True,
        cls_hidden: tuple[int, ...] = (256, 128, 64),
        n_classes: int = 0,
        pos_init_std: float = 1.0,
    ) -> None:
        super().__init__()
        from torch_geometric.nn import GATConv, SAGEConv

        if (encoder is None) == (feature_dim is None):
            raise ValueError("give exactly one of encoder (image input) and feature_dim (frozen features)")
        self.encoder = encoder
        self.project = None
        if feature_dim is not None:
            self.project = nn.Linear(feature_dim, dim)
            # Standardisation of the frozen features (set from the training spots).
            self.register_buffer("feat_shift", torch.zeros(feature_dim))
            self.register_buffer("feat_scale", torch.ones(feature_dim))
        if gat_variant not in GAT_VARIANTS:
            raise He2stInputError(f"hist2st: gat_variant must be one of {GAT_VARIANTS}, got {gat_variant!r}")
        self.gat_shared = gat_layers > 0 and gat_variant == "shared"
        self.gat_uses = gat_layers
        self.x_embed = self.y_embed = None
        if not self.gat_shared:  # the shared-GAT code never reads the positions
            self.x_embed = nn.Embedding(n_pos, dim)
            self.y_embed = nn.Embedding(n_pos, dim)
            nn.init.normal_(self.x_embed.weight, std=pos_init_std)
            nn.init.normal_(self.y_embed.weight, std=pos_init_std)
        self.dropout = nn.Dropout(dropout)
        self.gat = None
        self.transformer = self.sage = self.jk = None
        if gat_layers > 0:
            if dim % gat_heads:
                raise He2stInputError(f"hist2st: dim ({dim}) must be divisible by gat_heads ({gat_heads})")
            if self.gat_shared:
                # Concatenated heads of dim / heads; the bias after aggregation equals the
                # code's biased projection, as attention weights sum to one.
                self.gat = GATConv(dim, dim // gat_heads, heads=gat_heads, add_self_loops=False)
                self.jk = nn.LSTM(dim, dim, num_layers=2)
            else:
                self.gat = nn.ModuleList([GATConv(dim, dim // gat_heads, heads=gat_heads) for _ in range(gat_layers)])
        else:
            self.transformer = SpotTransformer(dim, depth, heads, dim_head, mlp_dim or dim, dropout, attention)
            self.sage = nn.ModuleList(
                [SAGEConv(dim, dim, aggr="mean", root_weight=False, bias=False) for _ in range(gnn_depth)]
            )
            self.jk = nn.LSTM(dim, dim, num_layers=2)
        self.gene_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_genes))
        self.zinb = ZINBHead(dim, n_genes) if zinb else None
        self.coef = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1)) if distill else None
        self.classifier = None
        if n_classes > 0:
            widths = (dim, *cls_hidden)
            layers: list[nn.Module] = []
            for a, b in itertools.pairwise(widths):
                layers += [nn.Linear(a, b), nn.ReLU()]
            self.classifier = nn.Sequential(*layers, nn.Linear(widths[-1], n_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-spot image features ``(n, dim)`` from images or frozen features."""
        if self.encoder is not None:
            return self.encoder(x)
        return self.project((x - self.feat_shift) / self.feat_scale)

    def embed(
        self, x: torch.Tensor, positions: torch.Tensor, edge_index: torch.Tensor, neighbors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Spot representations ``(n, dim)`` after the spatial modules.

        Parameters
        ----------
        x
            ``(n, 3, S, S)`` patches on the ``pixel_scale`` (with an image encoder)
            or ``(n, feature_dim)`` frozen features.
        positions
            ``(n, 2)`` int64 ``(x, y)`` indices into the position tables, in
            ``[0, n_pos)``.
        edge_index
            ``(2, E)`` int64 spot graph (row 0 source, row 1 target).
        neighbors
            Local attention neighbour lists (``LocalNeighbors`` or an
            ``(n, m)`` tensor, -1 = none), or None for global attention;
            unused by the GAT variant.

        Returns
        -------
        torch.Tensor
            ``(n, dim)`` spot representations (GraphSAGE outputs mixed by the
            jumping-knowledge LSTM, or the last GAT layer's).
        """
        h = self.dropout(self.features(x))
        if self.x_embed is not None:
            h = h + self.x_embed(positions[:, 0]) + self.y_embed(positions[:, 1])
        jk = []
        if self.gat_shared:
            for _ in range(self.gat_uses):
                h = self.gat(h, edge_index)
                jk.append(h)
        elif self.gat is not None:
            for i, layer in enumerate(self.gat):
                h = layer(h, edge_index)
                if i < len(self.gat) - 1:
                    h = F.elu(h)
            return h
        else:
            g = self.transformer(h, neighbors)
            for layer in self.sage:
                g = F.normalize(F.relu(layer(g, edge_index)), p=2.0, dim=1)
                jk.append(g)
        out, _ = self.jk(torch.stack(jk))  # jumping knowledge, a sequence over layers: (L, n, dim)
        return out.mean(0)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, edge_index: torch.Tensor, neighbors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean expression ``(n, n_genes)``.

        Parameters
        ----------
        x
            ``(n, 3, S, S)`` patches on the ``pixel_scale`` (with an image encoder)
            or ``(n, feature_dim)`` frozen features.
        positions
            ``(n, 2)`` int64 ``(x, y)`` indices into the position tables, in
            ``[0, n_pos)``.
        edge_index
            ``(2, E)`` int64 spot graph (row 0 source, row 1 target).
        neighbors
            Local attention neighbour lists (``LocalNeighbors`` or an
            ``(n, m)`` tensor, -1 = none), or None for global attention;
            unused by the GAT variant.

        Returns
        -------
        torch.Tensor
            ``(n, n_genes)`` predicted expression (normalised scale).
        """
        return self.gene_head(self.embed(x, positions, edge_index, neighbors))


@register_method("hist2st")
class Hist2ST(SlideRegressor):
    """Hist2ST: ConvMixer, Transformer and graph network over the spots of a slide.

    Zeng Y. et al., "Spatial transcriptomics prediction from histology jointly
    through Transformer and graph neural networks", Brief. Bioinform. 23:bbac297
    (2022); as reviewed by Jiang et al. 2024 (seed paper 002) and the authors'
    code (``biomed-AI/Hist2ST``, ``HIST2ST_train.py`` defaults); target scale
    and its sources: ``docs/fidelity.md#hist2st-target-scale``:

    - a 112 x 112 px patch per spot, scaled to [0, 1] (``pixel_scale="unit"``; the
      authors' dataset code feeds raw 0-255 values, ``pixel_scale="uint8"``);
    - ConvMixer (:func:`he2st.encoders.create_encoder` ``"convmixer"``):
      7 x 7 stride-7 patch embedding to 32 channels, 2 blocks with 5 x 5
      depthwise convolutions, a 1 x 1 reduction to 4 channels, flattened:
      ``(112/7)^2 * 4 = 1024`` features;
    - dropout 0.2, then learnable x and y position embeddings (64 rows each);
    - a Transformer of 8 layers, 16 heads of width 64, MLP width 1024;
    - GraphSAGE (4 layers, mean over the neighbours, ReLU, L2 normalisation)
      on the 4-nearest-neighbour spot graph pruned to 2 grid units, the four
      layer outputs aggregated by a 2-layer LSTM and averaged (jumping knowledge);
    - a LayerNorm + linear head for the mean expression, MSE on the code's
      targets ``log10(1 + 1e4 * count / panel_total)`` (dataset.py:84;
      ``train_normalization="hist2st_lognorm"``, which keeps the paper's
      balance of the MSE, ZINB and distillation terms); :meth:`predict`
      returns ``normalization``'s common scale;
    - a ZINB head (mean, dispersion, dropout) on the raw panel counts with
      size factors ``total / median(total)`` per slide, weight 0.25;
    - self-distillation: 5 views of the patches (random grayscale, rotation,
      flip: preset ``"hist2st"``); a small network weights the views per spot
      (softmax over views) and the MSE between the weighted view prediction
      and the prediction is added with weight 0.5;
    - Adam, learning rate 1e-5, 350 epochs, one slide per step.

    Setting by setting, with the code's file:line: ``docs/fidelity.md#hist2st``; ``#hist2st-gat-variant``
    (the GAT variant).

    Variants (Jiang et al. 2024, Suppl. 7.1)
    ----------------------------------------
    ``regclass=True``
        A 4-layer MLP on the same spot features classifies the spot label
        (``obs["label"]``); loss ``+ gamma * CE``. Labels such as
        ``"undetermined"`` are ignored. A training slide without labels is
        refused unless ``allow_unlabeled=True`` (then it adds no CE term, as
        the authors' code gives such slides label -1).
        :meth:`predict_labels` returns the predicted classes.
    ``encoder=<any he2st encoder>``
        A pretrained backbone replaces the ConvMixer; only its last layer is
        trained. In ``mode="frozen"`` (the default for pretrained encoders) the
        backbone's pooled features come from the feature cache
        (:func:`he2st.encoders.get_features`), are standardised with the
        training spots' mean and standard deviation, and a new trainable linear
        layer maps them to ``dim``. The 5 distillation views are drawn once at
        ``fit`` and their features cached too (the backbone is frozen, so
        re-drawing them every step would only re-run it).
    ``gat=True``
        The Transformer and the graph network are replaced by a GAT on the
        same spot graph. Default ``gat_variant="shared"``, the benchmark's
        code (``BiomedicalMachineLearning/DeepHis2Exp``,
        ``Development/SimST/CNN_GAT(10x_visium).py``): one GAT layer of 8
        concatenated heads (``dim / 8`` wide each, LeakyReLU slope 0.2, no
        self loops, no activation) applied ``gat_layers=4`` times, its four
        outputs read by the 2-layer jumping-knowledge LSTM and averaged; the
        spot positions are not used. ``gat_variant="stacked"`` is he2st's
        earlier reading of the paper's "4-layer GAT": four independent layers
        with self loops and ELU between them, positions added. Details in
        ``docs/fidelity.md#hist2st-gat-variant``.

    Departures: the code's StepLR schedule (x0.9 every 50 epochs) is not
    applied (the shared training loop has no scheduler); the ConvMixer's
    dropout acts on its output rather than on its first feature map; large
    slides are windowed and attention may be local (see
    :mod:`he2st.methods.families.slide`).

    Defaults
    --------
    normalization="cpm_log1p" (evaluation), train_normalization="hist2st_lognorm",
    seed=0, patch_px=112, encoder="convmixer",
    weights=None, mode="auto" (finetune for the ConvMixer, frozen for a
    pretrained encoder), channel=32, kernel_size=5, patch_size=7,
    convmixer_depth=2, dim=1024 (pretrained encoders; the ConvMixer's width is
    fixed by its shape), depth=8, heads=16, dim_head=64, mlp_dim=None (= dim),
    dropout=0.2, n_pos=64, pos_init_std=1.0, gnn_depth=4, neighbors=4, graph_max_distance=2.0,
    zinb_weight=0.25, distill_views=5, distill_weight=0.5, augment="hist2st", pixel_scale="unit",
    regclass=False, gamma=1.0 (the paper sweeps gamma and states no default),
    cls_hidden=[256, 128, 64], allow_unlabeled=False, gat=False, gat_layers=4,
    gat_heads=8, gat_variant="shared", epochs=350, lr=1e-5, optimizer="adam", weight_decay=0.0,
    grad_clip=None, patience=None, attention="full", attention_k=64,
    attention_radius=None, window_px=4000.0, window_min_spots=1000,
    window_overlap=0.5, device="auto", context=None (frozen pretrained features only;
    :func:`he2st.methods.base.parse_context`).

    Examples
    --------
    >>> m = he2st.methods.create_method("hist2st", epochs=50)
    >>> rc = he2st.methods.create_method("hist2st", regclass=True, gamma=0.5)
    >>> pe = he2st.methods.create_method("hist2st", encoder="efficientnet_lite0", weights="imagenet")
    >>> gat = he2st.methods.create_method("hist2st", encoder="efficientnet_lite0", weights="imagenet", gat=True)
    """

    paper: ClassVar[str] = "Zeng et al., Brief. Bioinform. 2022 (Hist2ST)"

    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_positions=True, needs_whole_slides=True, frozen_features=True, finetune=True, needs_labels=False
    )
    defaults: ClassVar[dict[str, Any]] = {
        **SLIDE_DEFAULTS,
        **CONTEXT_DEFAULTS,
        "patch_px": 112,
        "encoder": "convmixer",
        "weights": None,
        "mode": "auto",
        "channel": 32,
        "kernel_size": 5,
        "patch_size": 7,
        "convmixer_depth": 2,
        "dim": 1024,
        "depth": 8,
        "heads": 16,
        "dim_head": 64,
        "mlp_dim": None,
        "dropout": 0.2,
        "gnn_depth": 4,
        "zinb_weight": 0.25,
        "distill_views": 5,
        "distill_weight": 0.5,
        "augment": "hist2st",
        "pixel_scale": "unit",
        "regclass": False,
        "gamma": 1.0,
        "cls_hidden": [256, 128, 64],
        "allow_unlabeled": False,
        "gat": False,
        "gat_layers": 4,
        "gat_heads": 8,
        "gat_variant": "shared",
        "epochs": 350,
        "lr": 1e-5,
        "train_normalization": "hist2st_lognorm",
    }

    # -- parameters -------------------------------------------------------------------
    def _check_params(self) -> None:
        super()._check_params()
        p = self.params
        if p["mode"] not in MODES:
            raise He2stInputError(f"method 'hist2st': mode must be one of {MODES}, got {p['mode']!r}")
        if p["encoder"] == "convmixer" and p["mode"] == "frozen":
            raise He2stInputError(
                "method 'hist2st': the ConvMixer is trained from scratch with the rest of the model; "
                "mode='frozen' needs a pretrained encoder (e.g. encoder='efficientnet_lite0', weights='imagenet')"
            )
        if p.get("context") is not None and (p["encoder"] == "convmixer" or p["mode"] == "finetune"):
            raise He2stInputError("method 'hist2st': the context option needs frozen features of a pretrained encoder "
                                  "(e.g. encoder='efficientnet_lite0', weights='imagenet')")
        if p["encoder"] != "convmixer" and p["mode"] == "finetune":
            raise He2stInputError(
                "method 'hist2st': with a pretrained encoder only its last layer is trained, which is "
                "mode='frozen' (cached backbone features + a trainable last layer); mode='finetune' is not offered"
            )
        for key in ("zinb_weight", "distill_weight", "gamma"):
            if float(p[key]) < 0:
                raise He2stInputError(f"method 'hist2st': {key} must be >= 0, got {p[key]!r}")
        if int(p["distill_views"]) < 0:
            raise He2stInputError(f"method 'hist2st': distill_views must be >= 0, got {p['distill_views']!r}")
        if p["gat_variant"] not in GAT_VARIANTS:
            raise He2stInputError(f"method 'hist2st': gat_variant must be one of {GAT_VARIANTS}, got {p['gat_variant']!r}")
        if len(tuple(p["cls_hidden"])) != 3:
            raise He2stInputError(f"method 'hist2st': cls_hidden must give 3 widths (a 4-layer MLP), got {p['cls_hidden']!r}")

    def encoders(self) -> list[EncoderUse]:
        """The image encoder; the ConvMixer (mode ``"auto"``) is trained from scratch with the model."""
        p = self.params
        return [EncoderUse(str(p["encoder"]), p["weights"], trained=not self.frozen)]

    @property
    def frozen(self) -> bool:
        """True when inputs are cached features of a pretrained backbone."""
        return self.params["encoder"] != "convmixer"

    @property
    def _zinb_on(self) -> bool:
        return float(self.params["zinb_weight"]) > 0

    @property
    def _distill_on(self) -> bool:
        return int(self.params["distill_views"]) > 0 and float(self.params["distill_weight"]) > 0

    # -- data -------------------------------------------------------------------------
    def _setup(self, train_slides: list[Any]) -> None:
        p = self.params
        if self._zinb_on:
            for s in train_slides:
                require_counts(s, "hist2st's ZINB loss (set zinb_weight=0 to train without it)")
        if p["regclass"]:
            self.dims_["classes"] = self._label_classes(train_slides)
        if self.frozen:
            self._encoder_cache = None
            self.dims_["feature_dim"] = int(self._features(train_slides[0]).shape[1])

    def _label_classes(self, slides: list[Any]) -> list[str]:
        classes: set[str] = set()
        for s in slides:
            labels = _slide_labels(s)
            if labels is None:
                if self.params["allow_unlabeled"]:
                    continue
                raise SlideError(
                    meta(s).slide_id,
                    "regclass=True needs spot labels in obs['label'] and this slide has none "
                    "(no 'label' column, or every label missing/undetermined); pass only labelled "
                    "training slides, or allow_unlabeled=True to train their regression losses only",
                )
            classes.update(x for x in labels if x is not None)
        if not classes:
            raise He2stInputError("method 'hist2st': regclass=True but no training slide has spot labels")
        return sorted(classes)

    def _features(self, slide: Any) -> np.ndarray:
        """Frozen features ``(n, d)`` float32 of a slide, checked for shape and NaN/inf."""
        p = self.params
        return encoder_inputs(slide, p["encoder"], p["weights"], int(p["patch_px"]), target_mpp=self.read_mpp(slide),
                              context=p.get("context"))

    def _slide_inputs(self, slide: Any, train: bool) -> np.ndarray:
        if self.frozen:
            return self._features(slide)
        return super()._slide_inputs(slide, train)

    def _slide_extras(self, slide: Any, train: bool) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self._zinb_on:
            counts = _panel_counts(slide, list(self.genes or []))
            out["counts"] = counts
            out["size_factors"] = size_factors(counts)
        if self.params["regclass"]:
            classes = {c: i for i, c in enumerate(self.dims_["classes"])}
            labels = _slide_labels(slide)
            if labels is None:
                codes = np.full(slide.n_obs, -1, dtype=np.int64)
            else:
                codes = np.array([classes.get(x, -1) if x is not None else -1 for x in labels], dtype=np.int64)
            out["labels"] = codes
        if self.frozen and self._distill_on:
            out["views"] = self._view_features(slide)
        return out

    def _view_features(self, slide: Any) -> np.ndarray:
        """Backbone features of ``distill_views`` augmented copies of each patch, ``(n, V, d)``.

        With ``context``, each view is followed by the unaugmented context columns.
        """
        from he2st.encoders import create_encoder, preprocess
        from he2st.image import extract_patches

        p = self.params
        if getattr(self, "_encoder_cache", None) is None:
            self._encoder_cache = create_encoder(p["encoder"], weights=p["weights"])
        enc = self._encoder_cache
        aug = self.augmenter
        size = int(p["patch_px"])
        images = extract_patches(slide, size_px=size, target_mpp=self.read_mpp(slide, size)).images
        views = []
        with torch.no_grad():
            for _ in range(int(p["distill_views"])):
                feats = []
                for s in range(0, len(images), 64):
                    x = to_unit(torch.from_numpy(np.array(images[s : s + 64])))
                    if aug is not None:
                        x = aug(x)
                    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                    feats.append(enc(preprocess(u8, enc.info)).float().numpy())
                views.append(np.concatenate(feats))
        out = np.stack(views, axis=1).astype(np.float32)
        if p.get("context") is not None:
            # Context: the augmented spot patch, with the (unaugmented) wider views and neighbour means.
            rest = self._features(slide)[:, out.shape[2]:]
            out = np.concatenate([out, np.broadcast_to(rest[:, None, :], (*out.shape[:2], rest.shape[1]))], axis=2)
        return out

    # -- model --------------------------------------------------------------------------
    def _build_model(self) -> nn.Module:
        p = self.params
        encoder = None
        if self.frozen:
            dim = int(p["dim"])
            feature_dim = int(self.dims_["feature_dim"])
        else:
            from he2st.encoders import create_encoder

            encoder = create_encoder(
                "convmixer",
                seed=int(p["seed"]),
                channel=int(p["channel"]),
                kernel_size=int(p["kernel_size"]),
                patch_size=int(p["patch_size"]),
                depth=int(p["convmixer_depth"]),
                input_size=int(p["patch_px"]),
            ).train()
            dim = int(encoder.info.dim)
            feature_dim = None
        self.dims_["dim"] = dim
        return Hist2STNet(
            dim=dim,
            encoder=encoder,
            feature_dim=feature_dim,
            gnn_depth=int(p["gnn_depth"]),
            gat_layers=int(p["gat_layers"]) if p["gat"] else 0,
            gat_heads=int(p["gat_heads"]),
            gat_variant=str(p["gat_variant"]),
            zinb=self._zinb_on,
            distill=self._distill_on,
            cls_hidden=tuple(int(w) for w in p["cls_hidden"]),
            n_classes=len(self.dims_.get("classes", [])) if p["regclass"] else 0,
            **self._transformer_kwargs(),
        )

    def _init_model(self, model: nn.Module, train: list[Any]) -> None:
        super()._init_model(model, train)
        if self.frozen:
            feats = np.concatenate([d.inputs for d in train]).astype(np.float64)
            sd = feats.std(axis=0)
            with torch.no_grad():
                model.feat_shift.copy_(torch.from_numpy(feats.mean(axis=0)).float())
                model.feat_scale.copy_(torch.from_numpy(np.where(sd > 1e-8, sd, 1.0)).float())

    def _inputs(self, batch: SlideBatch) -> torch.Tensor:
        # Pixels on [0, 1] here (augmentation works on them); _net_input applies pixel_scale.
        return batch.inputs if self.frozen else to_unit(batch.inputs)

    def _net_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.frozen else self._scale_pixels(x)

    def _forward(self, model: nn.Module, batch: SlideBatch) -> torch.Tensor:
        return model(self._net_input(self._inputs(batch)), batch.positions, batch.edge_index, batch.neighbors)

    def loss_terms(self, model: nn.Module, batch: SlideBatch) -> dict[str, torch.Tensor]:
        """The unweighted loss terms of one slide or window: ``mse``, ``zinb``, ``distill``, ``ce``.

        The training loss is ``mse + zinb_weight * zinb + distill_weight *
        distill + gamma * ce`` (terms that are switched off are absent).

        Parameters
        ----------
        model
            The :class:`Hist2STNet` being trained.
        batch
            One slide or window, with ``targets`` and the extras its terms
            need (``counts`` and ``size_factors`` for ZINB, ``views`` for
            distillation on frozen features, ``labels`` for regclass).

        Returns
        -------
        dict of str to torch.Tensor
            Scalar terms: ``mse`` always; ``zinb``, ``distill`` and ``ce`` when
            the ZINB head, self-distillation and the classifier are on.
        """
        p = self.params
        x = self._inputs(batch)
        h = model.embed(self._net_input(x), batch.positions, batch.edge_index, batch.neighbors)
        pred = model.gene_head(h)
        terms = {"mse": F.mse_loss(pred, batch.targets)}
        if model.zinb is not None:
            mu, theta, pi = model.zinb(h)
            sf = batch.extras["size_factors"].unsqueeze(1)
            terms["zinb"] = zinb_nll(batch.extras["counts"], mu * sf, theta, pi).mean()
        if model.coef is not None:
            preds, weights = [], []
            aug = None if self.frozen else self.augmenter
            for v in range(int(p["distill_views"])):
                xv = batch.extras["views"][:, v] if self.frozen else (aug(x) if aug is not None else x)
                hv = model.embed(self._net_input(xv), batch.positions, batch.edge_index, batch.neighbors)
                preds.append(model.gene_head(hv))
                weights.append(model.coef(hv))
            w = torch.softmax(torch.stack(weights), dim=0)  # (V, n, 1): softmax over views per spot
            distilled = (torch.stack(preds) * w).sum(0)
            terms["distill"] = F.mse_loss(distilled, pred)
        if model.classifier is not None:
            labels = batch.extras["labels"]
            logits = model.classifier(h)
            if (labels >= 0).any():
                terms["ce"] = F.cross_entropy(logits, labels, ignore_index=-1)
            else:
                terms["ce"] = logits.sum() * 0.0  # keeps the graph; an unlabelled window adds nothing
        return terms

    def _loss(self, model: nn.Module, batch: SlideBatch) -> torch.Tensor:
        p = self.params
        t = self.loss_terms(model, batch)
        loss = t["mse"]
        if "zinb" in t:
            loss = loss + float(p["zinb_weight"]) * t["zinb"]
        if "distill" in t:
            loss = loss + float(p["distill_weight"]) * t["distill"]
        if "ce" in t:
            loss = loss + float(p["gamma"]) * t["ce"]
        return loss

    # -- regclass ------------------------------------------------------------------------
    def predict_labels(self, slide: Any) -> np.ndarray:
        """Regclass: the predicted spot class (object array of label names)."""
        if not self.params["regclass"]:
            raise He2stInputError("method 'hist2st': predict_labels needs regclass=True")
        self._require_model()

        def probs(model: nn.Module, batch: SlideBatch) -> torch.Tensor:
            h = model.embed(self._inputs(batch), batch.positions, batch.edge_index, batch.neighbors)
            return torch.softmax(model.classifier(h), dim=1)

        pr = self._predict_data(self.slide_data(slide, train=False), probs)
        return np.asarray(self.dims_["classes"], dtype=object)[pr.argmax(axis=1)]


def _slide_labels(slide: Any) -> list[str | None] | None:
    """Spot labels as strings (None where missing), or None when the slide has no usable label."""
    if "label" not in slide.obs:
        return None
    raw = slide.obs["label"]
    out: list[str | None] = []
    for v in raw.astype(object):
        s = None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip()
        out.append(None if s is None or s.lower() in MISSING_LABELS else s)
    return out if any(x is not None for x in out) else None


def _panel_counts(slide: Any, genes: list[str]) -> np.ndarray:
    """Raw counts of the panel genes, dense float32 ``(n, g)``."""
    import scipy.sparse as sp

    idx = slide.var_names.get_indexer(genes)
    if (idx < 0).any():
        missing = [g for g, i in zip(genes, idx, strict=True) if i < 0]
        raise SlideError(meta(slide).slide_id, f"{len(missing)} panel genes missing for the ZINB loss: {missing[:10]}")
    X = slide.X[:, idx]
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)


def size_factors(counts: np.ndarray) -> np.ndarray:
    """Hist2ST's per-spot size factors: panel total / median panel total of the slide.

    A slide whose median total is 0 (mostly empty spots) is scaled by its mean
    total instead; all-zero slides get factors of 1.
    """
    totals = np.asarray(counts, dtype=np.float64).sum(axis=1)
    ref = np.median(totals)
    if ref <= 0:
        ref = totals.mean()
    if ref <= 0:
        return np.ones(len(totals), dtype=np.float32)
    return (totals / ref).astype(np.float32)

