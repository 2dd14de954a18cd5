"""THItoGene: dynamic convolution, capsules, ViT and GAT over the spots of a slide (Jia et al. 2024)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from he2st.methods.registry import register_method
from he2st.methods.nn.capsules import EfficientCapsNet
from he2st.methods.nn.dynconv import ODConv2d
from he2st.methods.families.slide import SLIDE_DEFAULTS, SlideBatch, SlideRegressor
from he2st.methods.nn.inputs import to_unit
from he2st.methods.nn.transformer import SpotTransformer

__all__ = ["THItoGene", "THItoGeneNet", "stem_stride"]

#: Side of the capsule network's input map (a 112 px patch after THItoGene's stride-4 stem).
CAPS_INPUT = 28


def stem_stride(patch_px: int) -> int:
    """Stride of the dynamic-convolution stem: 4 for 112 px patches (a 28 x 28 map), 1 for small ones."""
    return max(1, patch_px // CAPS_INPUT)


class THItoGeneNet(nn.Module):
    """ODConv stem -> Efficient-CapsNet -> + position embeddings -> ViT -> GAT -> gene head.

    Parameters
    ----------
    patch_px
        Side of the input patches.
    n_genes
        Outputs.
    caps, route_dim
        Routed capsules and their width (20 x 64); a spot token is the
        flattened capsules, ``caps * route_dim`` wide.
    n_pos
        Rows of the x and y position tables (width ``route_dim``, added to every capsule).
    depth, heads, dim_head, mlp_dim, dropout, attention
        ViT shape (THItoGene: 4 layers, 16 heads).
    gat_heads
        Heads of the GAT layer (8), averaged.
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
        depth: int = 4,
        heads: int = 16,
        dim_head: int = 64,
        mlp_dim: int | None = None,
        dropout: float = 0.1,
        gat_heads: int = 8,
        attention: str = "full",
        stride: int | None = None,
        pos_init_std: float = 1.0,
    ) -> None:
        super().__init__()
        from torch_geometric.nn import GATConv

        stride = stride or stem_stride(patch_px)
        self.stem = ODConv2d(3, 16, kernel_size=4, stride=stride)
        side = (patch_px - 4) // stride + 1
        self.capsules = EfficientCapsNet(16, side, n_primary=16, d_primary=8, n_caps=caps, d_caps=route_dim)
        self.x_embed = nn.Embedding(n_pos, route_dim)
        self.y_embed = nn.Embedding(n_pos, route_dim)
        nn.init.normal_(self.x_embed.weight, std=pos_init_std)
        nn.init.normal_(self.y_embed.weight, std=pos_init_std)
        dim = caps * route_dim
        self.vit = SpotTransformer(dim, depth, heads, dim_head, mlp_dim or 2 * dim, dropout, attention)
        self.gat = GATConv(dim, dim, heads=gat_heads, concat=False, dropout=0.0)
        self.gene_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_genes))

    def tokens(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Capsule tokens with position embeddings, ``(n, caps * route_dim)``.

        Parameters
        ----------
        images
            ``(n, 3, S, S)`` float patches in [0, 1], ``S = patch_px``.
        positions
            ``(n, 2)`` int64 ``(x, y)`` indices into the position tables, in
            ``[0, n_pos)``.

        Returns
        -------
        torch.Tensor
            ``(n, caps * route_dim)`` flattened capsules, the spot's x and y
            embeddings added to every capsule.
        """
        caps = self.capsules(F.relu(self.stem(images)))  # (n, caps, route_dim)
        pos = self.x_embed(positions[:, 0]) + self.y_embed(positions[:, 1])
        return (caps + pos.unsqueeze(1)).flatten(1)

    def forward(
        self, images: torch.Tensor, positions: torch.Tensor, edge_index: torch.Tensor, neighbors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``images``: float ``(n, 3, S, S)`` in [0, 1] -> ``(n, n_genes)``.

        Parameters
        ----------
        images
            ``(n, 3, S, S)`` float patches in [0, 1], ``S = patch_px``.
        positions
            ``(n, 2)`` int64 ``(x, y)`` indices into the position tables, in
            ``[0, n_pos)``.
        edge_index
            ``(2, E)`` int64 spot graph (row 0 source, row 1 target) of the GAT
            layer.
        neighbors
            Local attention neighbour lists (``LocalNeighbors`` or an
            ``(n, m)`` tensor, -1 = none), or None for global attention.

        Returns
        -------
        torch.Tensor
            ``(n, n_genes)`` predicted expression (normalised scale).
        """
        h = self.vit(self.tokens(images, positions), neighbors)
        return self.gene_head(F.elu(self.gat(h, edge_index)))


@register_method("thitogene")
class THItoGene(SlideRegressor):
    """THItoGene: adaptive image features (dynamic convolution + capsules), ViT and GAT.

    Jia Y. et al., "THItoGene: a deep learning method for predicting spatial
    transcriptomics from histological images", Brief. Bioinform. 25:bbad464
    (2024); as described by Shi et al. (seed paper 003, Appendix B) and the
    authors' README, training script and published module sizes
    (``yrjia1015/THItoGene``: ``route_dim=64, caps=20, heads=[16, 8],
    n_layers=4``, lr 1e-5, 300 epochs):

    - a 112 x 112 px patch per spot, scaled to [0, 1];
    - omni-dimensional dynamic convolution (ODConv, 4 kernels of 4 x 4,
      stride 4, 3 -> 16 channels; :class:`he2st.methods.nn.dynconv.ODConv2d`):
      each patch gets its own kernel mixture;
    - Efficient-CapsNet (:class:`he2st.methods.nn.capsules.EfficientCapsNet`):
      convolutional stem, 16 primary capsules of 8 dims, self-attention
      routing to 20 capsules of 64 dims;
    - learnable x and y coordinate embeddings (64 rows of width 64) added to
      every capsule; the capsules flattened to a 1280-d spot token;
    - a ViT of 4 layers, 16 heads of width 64, MLP width 2 x 1280, dropout 0.1;
    - a GAT layer with 8 heads (averaged, self loops) over the 4-nearest-neighbour
      spot graph, ELU, then a LayerNorm + linear head; MSE on Hist2ST's
      targets ``log10(1 + 1e4 * count / panel_total)`` (THItoGene reuses
      Hist2ST's dataset code; ``train_normalization="hist2st_lognorm"``, see
      ``docs/fidelity.md#hist2st-target-scale``); :meth:`predict` returns
      ``normalization``'s common scale;
    - Adam, learning rate 1e-5, 300 epochs, one slide per step, no augmentation.

    The ODConv (3,815 parameters) and capsule network (317,344) match the
    sizes printed by the authors' model summary; the ViT's MLP width,
    dropout and the GAT's head averaging are not documented and are our choice.
    The stem's stride is ``stem_stride`` (default ``max(1, patch_px // 28)``:
    4 for 112 px patches, giving the capsule network its 28 x 28 input).

    On small cohorts the position embeddings, initialised N(0, 1) like
    torch's default, dwarf the squashed capsules (norm < 1) and the network
    memorises positions; ``pos_init_std=0.02`` (ViT-style) avoids that.

    Departures: large slides are windowed and attention may be local (see
    :mod:`he2st.methods.families.slide`); positions on slides spanning more than 64
    array units are rescaled into the tables.

    Defaults
    --------
    normalization="cpm_log1p" (evaluation), train_normalization="hist2st_lognorm",
    seed=0, patch_px=112, caps=20, route_dim=64,
    n_pos=64, pos_init_std=1.0, depth=4, heads=16, dim_head=64, mlp_dim=None (= 2 x caps x
    route_dim), dropout=0.1, gat_heads=8, stem_stride=None (auto), neighbors=4,
    graph_max_distance=2.0, augment="none", epochs=300, lr=1e-5,
    optimizer="adam", weight_decay=0.0, grad_clip=None, patience=None,
    attention="full", attention_k=64, attention_radius=None, window_px=4000.0,
    window_min_spots=1000, window_overlap=0.5, device="auto".

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
        "depth": 4,
        "heads": 16,
        "dim_head": 64,
        "mlp_dim": None,
        "dropout": 0.1,
        "gat_heads": 8,
        "stem_stride": None,
        "augment": "none",
        "train_normalization": "hist2st_lognorm",
        "epochs": 300,
        "lr": 1e-5,
    }

    def _build_model(self) -> nn.Module:
        p = self.params
        return THItoGeneNet(
            patch_px=int(p["patch_px"]),
            caps=int(p["caps"]),
            route_dim=int(p["route_dim"]),
            gat_heads=int(p["gat_heads"]),
            stride=None if p["stem_stride"] is None else int(p["stem_stride"]),
            **self._transformer_kwargs(),
        )

    def _loss(self, model: nn.Module, batch: SlideBatch) -> torch.Tensor:
        x = to_unit(batch.inputs)
        if self.augmenter is not None:
            x = self.augmenter(x)
        return F.mse_loss(model(x, batch.positions, batch.edge_index, batch.neighbors), batch.targets)

    def _forward(self, model: nn.Module, batch: SlideBatch) -> torch.Tensor:
        return model(to_unit(batch.inputs), batch.positions, batch.edge_index, batch.neighbors)
