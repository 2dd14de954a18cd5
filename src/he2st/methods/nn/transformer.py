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

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from he2st.errors import He2stInputError

__all__ = ["ATTENTION_MODES", "LocalNeighbors", "SpotAttention", "SpotTransformer", "attention_neighbors", "count_parameters"]

ATTENTION_MODES = ("full", "full_explicit", "knn", "radius")

# Queries per chunk of local attention (spatially coherent, see LocalNeighbors).
_LOCAL_CHUNK = 256


@dataclass
class LocalNeighbors:
    """Neighbour lists for local attention and a spatially coherent order of the spots.

    Attributes
    ----------
    index
        ``(n, m)`` int64 neighbour indices, -1 where a spot has fewer than ``m``.
    order
        A permutation of the spots in which consecutive spots are spatial
        neighbours (row-major over square tiles), so that a chunk of queries
        shares most of its keys.
    """

    index: torch.Tensor
    order: torch.Tensor

    def to(self, device: torch.device | str) -> LocalNeighbors:
        return LocalNeighbors(self.index.to(device), self.order.to(device))

    @property
    def shape(self) -> torch.Size:
        return self.index.shape


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


class SpotAttention(nn.Module):
    """Multi-head self-attention over the spots of one slide.

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
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.explicit = heads, dim_head, explicit
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, neighbors: LocalNeighbors | torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(n, dim)``; ``neighbors``: local neighbour lists (a tensor ``(n, m)``, -1 = none) or None (global)."""
        n = x.shape[0]
        q, k, v = self.to_qkv(x).view(n, 3, self.heads, self.dim_head).unbind(1)  # (n, h, d) each
        if neighbors is None:
            out = self._global(q, k, v)
        else:
            if isinstance(neighbors, torch.Tensor):
                neighbors = LocalNeighbors(neighbors, torch.arange(n))
            out = self._local(q, k, v, neighbors.to(x.device))
        return self.to_out(out.reshape(n, self.heads * self.dim_head))

    def _global(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, h, n, d)
        if self.explicit:
            attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
            out = torch.matmul(attn, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return out.squeeze(0).transpose(0, 1)  # (n, h, d)

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nbr: LocalNeighbors) -> torch.Tensor:
        n, m = nbr.index.shape
        if m == 0:
            raise He2stInputError("local attention got empty neighbour lists")
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        # Row gathers from the strided views of the fused projection are slow.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        outs = []
        for s in range(0, n, _LOCAL_CHUNK):
            rows = nbr.order[s : s + _LOCAL_CHUNK]
            idx = nbr.index[rows]
            # The chunk's queries attend within the union of their neighbours;
            # the mask keeps each query to its own neighbours.
            keys, pos = torch.unique(idx.clamp(min=0), return_inverse=True)
            valid = idx >= 0
            mask = torch.zeros(len(rows), len(keys), dtype=torch.bool, device=q.device)
            r = torch.arange(len(rows), device=q.device).unsqueeze(1).expand_as(idx)
            mask[r[valid], pos[valid]] = True
            args = (q[rows], k, v, keys, mask, self.scale)
            outs.append(checkpoint(_local_chunk, *args, use_reentrant=False) if grad else _local_chunk(*args))
        out = torch.empty_like(q)
        return out.index_copy(0, nbr.order, torch.cat(outs))


def _local_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Queries ``q`` (c, h, d) attend to ``k``/``v`` rows ``keys`` where ``mask`` (c, K) allows."""
    kk = k[keys].transpose(0, 1).unsqueeze(0)  # (1, h, K, d)
    vv = v[keys].transpose(0, 1).unsqueeze(0)
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), kk, vv, attn_mask=mask, scale=scale)
    return out.squeeze(0).transpose(0, 1)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float, explicit: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SpotAttention(dim, heads, dim_head, dropout, explicit=explicit)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = _FeedForward(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor, neighbors: LocalNeighbors | torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), neighbors)
        return x + self.ff(self.norm2(x))


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
            [_Block(dim, heads, dim_head, mlp_dim or dim, dropout, explicit) for _ in range(depth)]
        )

    @property
    def local(self) -> bool:
        return self.attention in ("knn", "radius")

    def forward(self, x: torch.Tensor, neighbors: LocalNeighbors | torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(n, dim)`` tokens of one slide; returns ``(n, dim)``."""
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
