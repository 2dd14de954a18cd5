"""A Transformer over the spots of a slide, with full or local attention.

HisToGene, Hist2ST and THItoGene treat the spots of one slide (or window) as
the tokens of a pre-norm Transformer (``x + Attn(LN(x))``, ``x + FF(LN(x))``,
GELU feed-forward, ``dim_head = 64`` per head, no attention dropout, as in
their code). Global attention costs ``O(n^2)`` per layer; three forms are
offered:

``"full"``
    Every spot attends to every spot, through
    :func:`torch.nn.functional.scaled_dot_product_attention`, whose CPU and
    CUDA kernels never materialise the ``n x n`` matrix (memory ``O(n)``,
    time ``O(n^2)``). Numerically the published model.
``"full_explicit"``
    The same attention computed as ``softmax(Q K^T) V`` with the matrix
    materialised, as the published implementations do. Memory ``O(n^2)`` per
    layer and head; kept to measure what those implementations need.
``"local"``
    Every spot attends only to a fixed set of neighbours (its ``k`` nearest
    spots, or the spots within a radius, see :func:`attention_neighbors`).
    Queries are processed in chunks of 256 spatially adjacent spots: a chunk
    gathers the union of its spots' neighbours (a few hundred keys) once and
    runs masked attention over it, each chunk recomputed in the backward pass
    (activation checkpointing). Memory is ``O(n)`` plus one chunk.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from he2st.errors import He2stInputError
from he2st.methods.nn.attention import LocalNeighbors, MultiHeadAttention, TransformerBlock

__all__ = ["ATTENTION_MODES", "LocalNeighbors", "SpotAttention", "SpotTransformer", "attention_neighbors", "count_parameters"]

ATTENTION_MODES = ("full", "full_explicit", "knn", "radius")


def attention_neighbors(
    coords: np.ndarray, mode: str, *, k: int = 64, radius: float | None = None, max_neighbors: int = 256
) -> LocalNeighbors | None:
    """Neighbour lists for local attention, or None for global attention.

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres in pixels.
    mode
        ``"full"`` / ``"full_explicit"`` (returns None), ``"knn"`` (the ``k``
        nearest spots, the spot itself included) or ``"radius"`` (all spots
        within ``radius`` pixels, at most ``max_neighbors``).

    Returns
    -------
    LocalNeighbors or None
        Indices ``(n, m)`` padded with -1 where a spot has fewer neighbours,
        and a tile order of the spots.
    """
    from he2st.methods.nn.graphs import knn_neighbors, radius_neighbors, spot_spacing

    if mode in ("full", "full_explicit"):
        return None
    if mode == "knn":
        if k < 1:
            raise He2stInputError(f"local attention needs attention_k >= 1, got {k}")
        idx, _ = knn_neighbors(coords, k, include_self=True)
    elif mode == "radius":
        if radius is None or not radius > 0:
            raise He2stInputError(f"attention='radius' needs a positive attention_radius (pixels), got {radius}")
        idx = radius_neighbors(coords, radius, include_self=True, max_neighbors=max_neighbors)
    else:
        raise He2stInputError(f"unknown attention {mode!r}; use one of {ATTENTION_MODES}")
    coords = np.asarray(coords, dtype=np.float64)
    # Square tiles of ~16 x 16 spots, visited row by row, spots row-major inside.
    tile = 16.0 * spot_spacing(coords) if len(coords) > 1 else 1.0
    cell = np.floor((coords - coords.min(axis=0)) / tile).astype(np.int64) if len(coords) else np.zeros((0, 2), np.int64)
    order = np.lexsort((coords[:, 0], coords[:, 1], cell[:, 0], cell[:, 1])) if len(coords) else np.zeros(0, np.int64)
    return LocalNeighbors(torch.from_numpy(np.ascontiguousarray(idx)), torch.from_numpy(order.astype(np.int64)))


class SpotAttention(MultiHeadAttention):
    """Multi-head self-attention over the spots of one slide (the spot Transformer's layout).

    A :class:`~he2st.methods.nn.attention.MultiHeadAttention` with one fused,
    bias-free query/key/value projection, called as ``forward(x, neighbors)``.

    Parameters
    ----------
    dim
        Token width.
    heads, dim_head
        Number of heads and width of each (inner width ``heads * dim_head``).
    dropout
        Dropout on the output projection.
    explicit
        Materialise the attention matrix for global attention (see module docs).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, explicit: bool = False) -> None:
        super().__init__(dim, heads, dim_head, dropout=dropout, fused=True, explicit=explicit)

    def forward(self, x: torch.Tensor, neighbors: LocalNeighbors | torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Attended spot tokens.

        Parameters
        ----------
        x
            ``(n, dim)`` tokens of one slide.
        neighbors
            Local neighbour lists (a tensor ``(n, m)``, -1 = none) or None (global).

        Returns
        -------
        torch.Tensor
            ``(n, dim)``.
        """
        return super().forward(x, neighbors=neighbors)


class SpotTransformer(nn.Module):
    """Pre-norm Transformer encoder over spots (HisToGene/Hist2ST/THItoGene style).

    Parameters
    ----------
    dim
        Token width.
    depth
        Number of blocks.
    heads, dim_head
        Attention heads and their width.
    mlp_dim
        Hidden width of the feed-forward layers.
    dropout
        Dropout in the feed-forward layers and after attention.
    attention
        ``"full"``, ``"full_explicit"``, ``"knn"`` or ``"radius"``; the last two
        need ``neighbors`` in :meth:`forward` (see :func:`attention_neighbors`).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int = 64,
        mlp_dim: int | None = None,
        dropout: float = 0.0,
        attention: str = "full",
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise He2stInputError(f"unknown attention {attention!r}; use one of {ATTENTION_MODES}")
        self.attention = attention
        explicit = attention == "full_explicit"
        self.blocks = nn.ModuleList(
            [TransformerBlock(dim, heads, dim_head, mlp_dim or dim, dropout=dropout, fused=True, explicit=explicit)
             for _ in range(depth)]
        )

    @property
    def local(self) -> bool:
        return self.attention in ("knn", "radius")

    def forward(self, x: torch.Tensor, neighbors: LocalNeighbors | torch.Tensor | None = None) -> torch.Tensor:
        """Encoded spot tokens.

        Parameters
        ----------
        x
            ``(n, dim)`` tokens of one slide.
        neighbors
            Local neighbour lists (required for ``"knn"``/``"radius"`` attention).

        Returns
        -------
        torch.Tensor
            ``(n, dim)``.
        """
        if self.local and neighbors is None:
            raise He2stInputError(f"attention={self.attention!r} needs neighbour lists (attention_neighbors)")
        if not self.local:
            neighbors = None
        for block in self.blocks:
            x = block(x, neighbors)
        return x


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
