"""The one multi-head attention of the neural methods, and its pre-norm Transformer block.

Every method's attention reduces to :func:`attend` (queries, keys and values
split into heads, :func:`torch.nn.functional.scaled_dot_product_attention`,
heads merged again):

- :class:`MultiHeadAttention`: self- or cross-attention with a free per-head
  width (``heads x head_dim`` need not equal the token width, as mclSTExp's
  8 x 64 heads over an ``n_genes``-wide token); the query/key/value
  projections are three linear maps, or one fused map for self-attention
  (``fused=True``, the spot Transformer of HisToGene, Hist2ST and THItoGene).
  Over the spots of one slide it also runs *local* attention, every spot
  attending only to its neighbour list (:class:`LocalNeighbors`), or the
  published explicit ``softmax(Q K^T) V`` (``explicit=True``);
- :class:`TransformerBlock`: ``x + MHA(LN x)``, then ``x + MLP(LN x)``
  (GELU MLP), shared by the spot Transformer, mclSTExp and CMRCNet;
- CMRCNet's residual cross-attention (:class:`he2st.methods.cmrcnet.ResidualCrossAttention`)
  computes its own queries, keys and values and calls :func:`attend`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from he2st.errors import He2stInputError

__all__ = ["ChannelSpatialAttention", "LocalNeighbors", "MultiHeadAttention", "TransformerBlock", "attend", "merge_heads", "split_heads"]

# Queries per chunk of local attention (spatially coherent, see LocalNeighbors).
_LOCAL_CHUNK = 256


@dataclass
class LocalNeighbors:
    """Neighbour lists for local attention and a spatially coherent order of the spots.

    Parameters
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
        """The same lists on ``device``."""
        return LocalNeighbors(self.index.to(device), self.order.to(device))

    @property
    def shape(self) -> torch.Size:
        """Shape ``(n, m)`` of the neighbour index."""
        return self.index.shape


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, heads * d)`` -> ``(B, heads, N, d)``.

    Parameters
    ----------
    t
        Projected tokens.
    heads
        Number of heads.

    Returns
    -------
    torch.Tensor
        A view with the heads on the second axis.
    """
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, d)`` -> ``(B, N, heads * d)``, the inverse of :func:`split_heads`."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    scale: float | None = None,
    explicit: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head scaled dot-product attention on projected tokens.

    Parameters
    ----------
    q
        ``(B, N, heads * d)`` queries.
    k, v
        ``(B, M, heads * d)`` keys and values.
    heads
        Number of heads.
    scale
        Logit scale (default ``d ** -0.5``).
    explicit
        Materialise the ``N x M`` attention matrix (``softmax(Q K^T) V``), as
        the published slide-level models do; otherwise the fused kernel, which
        never holds it.
    bias
        Additive attention logits broadcastable to ``(B, heads, N, M)``
        (relative-position biases, ``-inf``-like values for masked keys), or None.

    Returns
    -------
    torch.Tensor
        ``(B, N, heads * d)`` attended values.
    """
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    if explicit:
        s = qh.shape[-1] ** -0.5 if scale is None else scale
        logits = torch.matmul(qh, kh.transpose(-1, -2)) * s
        if bias is not None:
            logits = logits + bias
        out = torch.matmul(torch.softmax(logits, dim=-1), vh)
    else:
        mask = None if bias is None else bias.to(qh.dtype)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return merge_heads(out)


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention with ``heads x head_dim`` inner width.

    ``forward(x, context=None, neighbors=None)``: queries from ``x``
    ``(B, N, dim)`` or ``(N, dim)``, keys and values from ``context``
    ``(B, M, context_dim)`` (self-attention when None); with ``neighbors``
    (a slide's tokens ``(n, dim)``), each query attends only to its neighbours.

    Parameters
    ----------
    dim
        Token width (input and output).
    heads, head_dim
        Number of heads and the width of each.
    context_dim
        Width of the context tokens (default ``dim``).
    qkv_bias
        Bias on the query/key/value projections.
    dropout
        Dropout after the output projection.
    fused
        One ``dim -> 3 * inner`` projection for queries, keys and values
        (self-attention only); three separate maps otherwise.
    explicit
        Materialise the attention matrix in global attention (see :func:`attend`).
    """

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 64, context_dim: int | None = None,
                 qkv_bias: bool = False, dropout: float = 0.0, *, fused: bool = False, explicit: bool = False) -> None:
        super().__init__()
        if fused and context_dim not in (None, dim):
            raise ValueError("a fused query/key/value projection serves self-attention only")
        inner = heads * head_dim
        self.heads, self.head_dim, self.fused, self.explicit = heads, head_dim, fused, explicit
        self.scale = head_dim**-0.5
        if fused:
            self.to_qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
            self.to_k = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
            self.to_v = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)

    def _project(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fused:
            if context is not None:
                raise ValueError("a fused query/key/value projection serves self-attention only")
            b, n, _ = x.shape
            q, k, v = self.to_qkv(x).view(b, n, 3, self.heads * self.head_dim).unbind(2)
            return q, k, v
        context = x if context is None else context
        return self.to_q(x), self.to_k(context), self.to_v(context)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                neighbors: LocalNeighbors | torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Attended tokens.

        Parameters
        ----------
        x
            Query tokens ``(B, N, dim)`` or ``(N, dim)``.
        context
            Key/value tokens ``(B, M, context_dim)`` (None: self-attention).
        neighbors
            Local neighbour lists of the tokens of one slide (None: global attention).
        bias
            Additive attention logits broadcastable to ``(B, heads, N, M)``
            (global attention only; see :func:`attend`).

        Returns
        -------
        torch.Tensor
            The shape of ``x``.
        """
        if x.dim() == 2:
            ctx = None if context is None else context.unsqueeze(0)
            return MultiHeadAttention.forward(self, x.unsqueeze(0), ctx, neighbors, bias).squeeze(0)
        q, k, v = self._project(x, context)
        if neighbors is None:
            out = attend(q, k, v, self.heads, scale=self.scale, explicit=self.explicit, bias=bias)
        else:
            if bias is not None:
                raise He2stInputError("an attention bias serves global attention only")
            if x.shape[0] != 1:
                raise He2stInputError("local attention runs over the tokens of one slide, (n, dim)")
            n = x.shape[1]
            if isinstance(neighbors, torch.Tensor):
                neighbors = LocalNeighbors(neighbors, torch.arange(n))
            q, k, v = (t[0].view(n, self.heads, self.head_dim) for t in (q, k, v))
            out = self._local(q, k, v, neighbors.to(x.device)).reshape(1, n, self.heads * self.head_dim)
        return self.dropout(self.to_out(out))

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nbr: LocalNeighbors) -> torch.Tensor:
        """Queries ``(n, h, d)`` attend to their own neighbours, 256 spatially adjacent queries at a time."""
        n, m = nbr.index.shape
        if m == 0:
            raise He2stInputError("local attention got empty neighbour lists")
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        # Row gathers from the strided views of the projection are slow.
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
            # Each chunk is recomputed in the backward pass (activation checkpointing): memory O(n).
            outs.append(checkpoint(_local_chunk, *args, use_reentrant=False) if grad else _local_chunk(*args))
        out = torch.empty_like(q)
        return out.index_copy(0, nbr.order, torch.cat(outs))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Weights saved before the attention implementations were merged kept the output
        # projection of the spot Transformer in a Sequential ("to_out.0.*").
        for name in ("weight", "bias"):
            old = f"{prefix}to_out.0.{name}"
            if old in state_dict:
                state_dict[f"{prefix}to_out.{name}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args)


def _local_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Queries ``q`` (c, h, d) attend to ``k``/``v`` rows ``keys`` where ``mask`` (c, K) allows."""
    kk = k[keys].transpose(0, 1).unsqueeze(0)  # (1, h, K, d)
    vv = v[keys].transpose(0, 1).unsqueeze(0)
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), kk, vv, attn_mask=mask, scale=scale)
    return out.squeeze(0).transpose(0, 1)


class TransformerBlock(nn.Module):
    """Pre-norm Transformer encoder block: ``x + MHA(LN x)``, then ``x + MLP(LN x)``.

    Parameters
    ----------
    dim
        Token width.
    heads, head_dim
        Attention heads and per-head width (defaults to ``dim // heads``).
    mlp_dim
        Hidden width of the GELU MLP (default ``4 * dim``).
    qkv_bias, dropout
        Bias on the query/key/value projections; dropout after attention
        and inside the MLP.
    fused, explicit
        See :class:`MultiHeadAttention`.
    """

    def __init__(self, dim: int, heads: int = 8, head_dim: int | None = None, mlp_dim: int | None = None,
                 qkv_bias: bool = False, dropout: float = 0.0, *, fused: bool = False, explicit: bool = False) -> None:
        super().__init__()
        head_dim = head_dim or max(dim // heads, 1)
        mlp_dim = mlp_dim or 4 * dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, head_dim, qkv_bias=qkv_bias, dropout=dropout, fused=fused,
                                       explicit=explicit)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, neighbors: LocalNeighbors | torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output.

        Parameters
        ----------
        x
            Tokens ``(B, N, dim)`` or ``(N, dim)``.
        neighbors
            Local neighbour lists (None: global attention).
        bias
            Additive attention logits (relative-position biases, key masks), see :func:`attend`.

        Returns
        -------
        torch.Tensor
            The shape of ``x``.
        """
        x = x + self.attn(self.norm1(x), neighbors=neighbors, bias=bias)
        return x + self.mlp(self.norm2(x))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The spot Transformer's blocks named their MLP "ff.net" before the blocks were merged.
        old = f"{prefix}ff.net."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[f"{prefix}mlp.{key[len(old):]}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)


class ChannelSpatialAttention(nn.Module):
    """CBAM (Woo et al., ECCV 2018): channel attention, then spatial attention, on a feature map.

    Channel weights are ``sigmoid(MLP(avgpool x) + MLP(maxpool x))`` with a
    shared bias-free 1 x 1 MLP reducing by ``ratio``; spatial weights are
    ``sigmoid(conv7x7([mean_c x, max_c x]))``. HGGEP refines each backbone
    stage with one.

    Parameters
    ----------
    channels
        Channels of the feature map.
    ratio
        Reduction of the channel MLP (16).
    spatial_kernel
        Side of the spatial convolution (7).
    """

    def __init__(self, channels: int, ratio: int = 16, spatial_kernel: int = 7) -> None:
        super().__init__()
        hidden = max(1, channels // ratio)
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, channels, 1, bias=False)
        )
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> the same shape, reweighted per channel and per position."""
        gate = self.channel_mlp(F.adaptive_avg_pool2d(x, 1)) + self.channel_mlp(F.adaptive_max_pool2d(x, 1))
        x = torch.sigmoid(gate) * x
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled)) * x
