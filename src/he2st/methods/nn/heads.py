"""Heads and blocks shared by the neural methods.

- :class:`ProjectionHead`: linear -> GELU -> linear -> dropout -> residual ->
  LayerNorm, the projection of BLEEP (Xie et al. 2023), reused unchanged by
  mclSTExp (Min et al. 2024) and CMRCNet (Liu et al., Fig. 1c).
- :class:`SNN`: a self-normalising block, linear -> SELU -> AlphaDropout
  (Klambauer et al. 2017; CMRCNet Fig. 1d encodes expression with it).
- :class:`MultiHeadAttention` / :class:`TransformerBlock`: pre-norm
  multi-head (self- or cross-) attention with a free per-head width, as
  mclSTExp's spot encoder (8 heads x 64 over an ``n_genes``-wide token) and
  CMRCNet's fusion blocks (ViT-style, 8 heads over 256) need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """BLEEP's projection head.

    ``h = W1 x``; ``y = LayerNorm(h + Dropout(W2 GELU(h)))``.

    Parameters
    ----------
    in_dim
        Input width (encoder features or number of genes).
    out_dim
        Embedding width (256 in BLEEP, mclSTExp and CMRCNet).
    dropout
        Dropout before the residual sum (BLEEP: 0.1; mclSTExp: 0).
    """

    def __init__(self, in_dim: int, out_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.dropout(self.fc(F.gelu(projected)))
        return self.layer_norm(x + projected)


class SNN(nn.Module):
    """Self-normalising block: ``AlphaDropout(SELU(W x + b))``.

    Weights are drawn from ``N(0, 1/in_dim)`` (LeCun normal), the
    initialisation SELU's self-normalising property assumes.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.25) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.dropout = nn.AlphaDropout(dropout)
        nn.init.normal_(self.linear.weight, std=in_dim**-0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.selu(self.linear(x)))


class MultiHeadAttention(nn.Module):
    """Multi-head attention with ``heads x head_dim`` inner width.

    ``forward(x, context=None)``: queries from ``x`` ``(B, N, dim)``, keys and
    values from ``context`` ``(B, M, context_dim)`` (self-attention when None).
    """

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 64, context_dim: int | None = None,
                 qkv_bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.dropout(self.to_out(out))


class TransformerBlock(nn.Module):
    """Pre-norm Transformer encoder block: ``x + MHSA(LN x)``, then ``x + MLP(LN x)``.

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
    """

    def __init__(self, dim: int, heads: int = 8, head_dim: int | None = None, mlp_dim: int | None = None,
                 qkv_bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        head_dim = head_dim or max(dim // heads, 1)
        mlp_dim = mlp_dim or 4 * dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, head_dim, qkv_bias=qkv_bias, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
