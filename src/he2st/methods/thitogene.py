"""THItoGene: dynamic convolution, capsules, ViT and GAT over the spots of a slide (Jia et al. 2024)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from he2st.errors import He2stInputError
from he2st.methods.registry import register_method
from he2st.methods.nn.capsules import EfficientCapsNet
from he2st.methods.nn.dynconv import ODConv2d
from he2st.methods.families.slide import SLIDE_DEFAULTS, SlideBatch, SlideRegressor
from he2st.methods.nn.transformer import SpotTransformer

__all__ = ["POSITION_MODES", "THItoGene", "THItoGeneGAT", "THItoGeneNet", "stem_stride"]

#: How the x and y position embeddings enter the spot token.
POSITION_MODES = ("concat", "add")

#: Side of the capsule network's input map (a 112 px patch after THItoGene's stride-4 stem).
CAPS_INPUT = 28


def stem_stride(patch_px: int) -> int:
    """Stride of the dynamic-convolution stem: 4 for 112 px patches (a 28 x 28 map), 1 for small ones."""
    return max(1, patch_px // CAPS_INPUT)


class THItoGeneGAT(nn.Module):
    """THItoGene's two-layer graph attention network over the spot graph.

    ``gat_heads`` attention heads of width ``hidden`` (ELU each) are
    concatenated, then one head maps them to ``out`` (ELU); dropout acts on
    the input, between the layers and on the attention coefficients;
    LeakyReLU slope ``slope`` in the attention scores. No self loops: a spot
    attends only to the neighbours the graph gives it (the authors' adjacency
    has an empty diagonal), and no bias (their layers have none).

    Parameters
    ----------
    in_dim
        Width of the spot tokens.
    hidden
        Width of each first-layer head (1,024).
    out
        Output width (512).
    heads
        First-layer heads, concatenated (8).
    dropout
        Dropout on features and attention coefficients (0.2).
    slope
        Negative slope of the attention LeakyReLU (0.01).
    """

    def __init__(
        self, in_dim: int, hidden: int = 1024, out: int = 512, heads: int = 8, dropout: float = 0.2, slope: float = 0.01
    ) -> None:
        super().__init__()
        from torch_geometric.nn import GATConv

        common = {"negative_slope": slope, "dropout": dropout, "add_self_loops": False, "bias": False}
        self.heads = heads
        self.dropout = nn.Dropout(dropout)
        self.layer1 = GATConv(in_dim, hidden, heads=heads, concat=True, **common)
        self.layer2 = GATConv(heads * hidden, out, heads=1, concat=False, **common)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Spot features ``(n, out)``.

        Parameters
        ----------
        x
            ``(n, in_dim)`` spot tokens.
        edge_index
            ``(2, E)`` int64 spot graph (row 0 source, row 1 target), without self loops.

        Returns
        -------
        torch.Tensor
            ``(n, out)`` after the second layer's ELU.
        """
        h = F.elu(self.layer1(self.dropout(x), edge_index))
        return F.elu(self.layer2(self.dropout(h), edge_index))


class THItoGeneNet(nn.Module):
    """ODConv stem -> Efficient-CapsNet (+ position capsules) -> ViT -> two-layer GAT -> gene head.

    Parameters
    ----------
    patch_px
        Side of the input patches.
    n_genes
        Outputs.
    caps, route_dim
        Routed capsules and their width (20 x 64).
    n_pos
        Rows of the x and y position tables (width ``route_dim``).
    positions
        ``"concat"`` (the authors' code): the x and y embeddings join the
        capsules as two more, so a spot token is ``(caps + 2) * route_dim``
        wide (1,408); ``"add"``: they are added to every capsule
        (``caps * route_dim``).
    depth, heads, dim_head, mlp_dim, dropout, attention
        ViT shape (THItoGene: 4 layers, 16 heads of 64, MLP 2,048, dropout
        0.2, also on the input tokens).
    gat_heads, gat_hidden, gat_out, gat_slope
        The two-layer GAT (:class:`THItoGeneGAT`: 8 heads x 1,024 -> 512,
        slope 0.01).
    head_hidden
        Hidden width of the gene head (``Linear -> ReLU -> LayerNorm -> Linear``, 1,024).
    stride
        Stride of the ODConv stem; None: :func:`stem_stride` (4 for 112 px).
    pos_init_std
        Standard deviation of the position embeddings' initialisation (torch's default 1).
    """

    def __init__(
        self,
        patch_px: int,
        n_genes: int,
        caps: int = 20,
        route_dim: int = 64,
        n_pos: int = 64,
        positions: str = "concat",
        depth: int = 4,
        heads: int = 16,
        dim_head: int = 64,
        mlp_dim: int | None = 2048,
        dropout: float = 0.2,
        gat_heads: int = 8,
        gat_hidden: int = 1024,
        gat_out: int = 512,
        gat_slope: float = 0.01,
        head_hidden: int = 1024,
        attention: str = "full",
        stride: int | None = None,
        pos_init_std: float = 1.0,
    ) -> None:
        super().__init__()
        if positions not in POSITION_MODES:
            raise He2stInputError(f"thitogene: positions must be one of {POSITION_MODES}, got {positions!r}")
        stride = stride or stem_stride(patch_px)
        self.positions = positions
        self.stem = ODConv2d(3, 16, kernel_size=4, stride=stride)
        side = (patch_px - 4) // stride + 1
        self.capsules = EfficientCapsNet(16, side, n_primary=16, d_primary=8, n_caps=caps, d_caps=route_dim)
        self.x_embed = nn.Embedding(n_pos, route_dim)
        self.y_embed = nn.Embedding(n_pos, route_dim)
        nn.init.normal_(self.x_embed.weight, std=pos_init_std)
        nn.init.normal_(self.y_embed.weight, std=pos_init_std)
        self.dim = (caps + 2 if positions == "concat" else caps) * route_dim
        self.token_dropout = nn.Dropout(dropout)  # the ViT's embedding dropout
        self.vit = SpotTransformer(self.dim, depth, heads, dim_head, mlp_dim or 2 * self.dim, dropout, attention)
        self.gat = THItoGeneGAT(self.dim, gat_hidden, gat_out, gat_heads, dropout, gat_slope)
        self.gene_head = nn.Sequential(
            nn.Linear(gat_out, head_hidden), nn.ReLU(), nn.LayerNorm(head_hidden), nn.Linear(head_hidden, n_genes)
        )

    def tokens(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Spot tokens: the capsules with the position embeddings, flattened.

        Parameters
        ----------
        images
            ``(n, 3, S, S)`` float patches on the ``pixel_scale``, ``S = patch_px``.
        positions
            ``(n, 2)`` int64 ``(x, y)`` indices into the position tables, in
            ``[0, n_pos)``.

        Returns
        -------
        torch.Tensor
            ``(n, self.dim)``: ``(caps + 2) * route_dim`` with the x and y
            embeddings as two extra capsules (``"concat"``), or ``caps *
            route_dim`` with them added to every capsule (``"add"``).
        """
        caps = self.capsules(F.relu(self.stem(images)))  # (n, caps, route_dim)
        px, py = self.x_embed(positions[:, 0]), self.y_embed(positions[:, 1])
        if self.positions == "concat":
            return torch.cat([caps, px.unsqueeze(1), py.unsqueeze(1)], dim=1).flatten(1)
        return (caps + (px + py).unsqueeze(1)).flatten(1)

    def forward(
        self, images: torch.Tensor, positions: torch.Tensor, edge_index: torch.Tensor, neighbors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``images``: float ``(n, 3, S, S)`` on the ``pixel_scale`` -> ``(n, n_genes)``.

        Parameters
        ----------
        images
            ``(n, 3, S, S)`` float patches on the ``pixel_scale``, ``S = patch_px``.
        positions
            ``(n, 2)`` int64 ``(x, y)`` indices into the position tables, in
            ``[0, n_pos)``.
        edge_index
            ``(2, E)`` int64 spot graph (row 0 source, row 1 target) of the GAT.
        neighbors
            Local attention neighbour lists (``LocalNeighbors`` or an
            ``(n, m)`` tensor, -1 = none), or None for global attention.

        Returns
        -------
        torch.Tensor
            ``(n, n_genes)`` predicted expression (normalised scale).
        """
        h = self.vit(self.token_dropout(self.tokens(images, positions)), neighbors)
        return self.gene_head(self.gat(h, edge_index))


@register_method("thitogene")
class THItoGene(SlideRegressor):
    """THItoGene: adaptive image features (dynamic convolution + capsules), ViT and GAT.

    Jia Y. et al., "THItoGene: a deep learning method for predicting spatial
    transcriptomics from histological images", Brief. Bioinform. 25:bbad464
    (2024), as described by Shi et al. (seed paper 003, Appendix B); every
    default is the authors' code (``yrjia1015/THItoGene``: ``vis_model.py``
    for the network, ``GATLayer.py``, ``transformer.py``, ``train.py`` and
    ``dataset.py`` for training). Setting by setting, with file:line, in
    ``docs/fidelity.md#thitogene``:

    - a 112 x 112 px patch per spot;
    - omni-dimensional dynamic convolution (ODConv, 4 kernels of 4 x 4,
      stride 4, 3 -> 16 channels, ReLU; :class:`he2st.methods.nn.dynconv.ODConv2d`);
    - Efficient-CapsNet (:class:`he2st.methods.nn.capsules.EfficientCapsNet`):
      16 primary capsules of 8 dims, self-attention routing to 20 capsules of 64;
    - learnable x and y array-coordinate embeddings (64 rows of width 64)
      concatenated to the capsules as two more: a ``(20 + 2) x 64 = 1408``-d
      spot token (``positions="add"`` adds them to every capsule instead);
    - a ViT of 4 layers, 16 heads of width 64, MLP width 2,048, dropout 0.2
      (also on the input tokens);
    - a two-layer GAT (:class:`THItoGeneGAT`): 8 heads x 1,024 concatenated
      (ELU) -> 512 (ELU), LeakyReLU slope 0.01, dropout 0.2, over the
      4-nearest-neighbour spot graph without pruning or self loops;
    - a gene head ``Linear(512, 1024) -> ReLU -> LayerNorm -> Linear``; MSE on
      Hist2ST's targets ``log10(1 + 1e4 * count / panel_total)`` (THItoGene reuses
      Hist2ST's dataset code; ``train_normalization="hist2st_lognorm"``, see
      ``docs/fidelity.md#hist2st-target-scale``); :meth:`predict` returns
      ``normalization``'s common scale;
    - Adam, learning rate 1e-5, 300 epochs, one slide per step, no
      augmentation, the last epoch kept.

    The ODConv (3,815 parameters) and capsule network (317,344) match the
    authors' modules. The stem's stride is ``stem_stride`` (default
    ``max(1, patch_px // 28)``: 4 for 112 px patches, the capsule network's
    28 x 28 input).

    On small cohorts the position embeddings, initialised N(0, 1) like
    torch's default, dwarf the squashed capsules (norm < 1) and the network
    memorises positions; ``pos_init_std=0.02`` (ViT-style) avoids that.

    Departures: patches are scaled to [0, 1] (``pixel_scale="unit"``; the
    authors' code feeds 0-255 pixel values, ``pixel_scale="uint8"``); targets
    are Hist2ST's (``train_normalization="hist2st_lognorm"``, scored on
    ``cpm_log1p``); large slides are windowed and attention may be local (see
    :mod:`he2st.methods.families.slide`); positions on slides spanning more than
    64 array units are rescaled into the tables.

    Defaults
    --------
    normalization="cpm_log1p" (evaluation), train_normalization="hist2st_lognorm",
    seed=0, patch_px=112, caps=20, route_dim=64,
    n_pos=64, positions="concat", pos_init_std=1.0, depth=4, heads=16,
    dim_head=64, mlp_dim=2048, dropout=0.2, gat_heads=8, gat_hidden=1024,
    gat_out=512, gat_slope=0.01, head_hidden=1024, stem_stride=None (auto),
    neighbors=4, graph_max_distance=None, augment="none", pixel_scale="unit", epochs=300,
    lr=1e-5, optimizer="adam", weight_decay=0.0, grad_clip=None,
    patience=None, attention="full", attention_k=64, attention_radius=None,
    window_px=4000.0, window_min_spots=1000, window_overlap=0.5,
    device="auto".

    Examples
    --------
    >>> m = he2st.methods.create_method("thitogene", epochs=30)
    >>> m.fit(train_slides, panel)
    >>> pred = m.predict(test_slide)
    """

    paper: ClassVar[str] = "Jia et al. 2024 (THItoGene)"

    defaults: ClassVar[dict[str, Any]] = {
        **SLIDE_DEFAULTS,
        "patch_px": 112,
        "caps": 20,
        "route_dim": 64,
        "positions": "concat",
        "depth": 4,
        "heads": 16,
        "dim_head": 64,
        "mlp_dim": 2048,
        "dropout": 0.2,
        "gat_heads": 8,
        "gat_hidden": 1024,
        "gat_out": 512,
        "gat_slope": 0.01,
        "head_hidden": 1024,
        "stem_stride": None,
        "graph_max_distance": None,
        "augment": "none",
        "pixel_scale": "unit",
        "train_normalization": "hist2st_lognorm",
        "epochs": 300,
        "lr": 1e-5,
    }

    def _check_params(self) -> None:
        super()._check_params()
        if self.params["positions"] not in POSITION_MODES:
            raise He2stInputError(
                f"method 'thitogene': positions must be one of {POSITION_MODES}, got {self.params['positions']!r}"
            )

    def _build_model(self) -> nn.Module:
        p = self.params
        return THItoGeneNet(
            patch_px=int(p["patch_px"]),
            caps=int(p["caps"]),
            route_dim=int(p["route_dim"]),
            positions=str(p["positions"]),
            gat_heads=int(p["gat_heads"]),
            gat_hidden=int(p["gat_hidden"]),
            gat_out=int(p["gat_out"]),
            gat_slope=float(p["gat_slope"]),
            head_hidden=int(p["head_hidden"]),
            stride=None if p["stem_stride"] is None else int(p["stem_stride"]),
            **self._transformer_kwargs(),
        )

    def _loss(self, model: nn.Module, batch: SlideBatch) -> torch.Tensor:
        x = self._pixels(batch.inputs, train=True)
        return F.mse_loss(model(x, batch.positions, batch.edge_index, batch.neighbors), batch.targets)

    def _forward(self, model: nn.Module, batch: SlideBatch) -> torch.Tensor:
        return model(self._pixels(batch.inputs, train=False), batch.positions, batch.edge_index, batch.neighbors)
