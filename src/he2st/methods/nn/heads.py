"""Heads and blocks shared by the neural methods.

- :class:`ProjectionHead`: linear -> GELU -> linear -> dropout -> residual ->
  LayerNorm, the projection of BLEEP (Xie et al. 2023), reused unchanged by
  mclSTExp (Min et al. 2024) and CMRCNet (Liu et al., Fig. 1c).
- :class:`SNN`: a self-normalising block, linear -> SELU -> AlphaDropout
  (Klambauer et al. 2017; CMRCNet Fig. 1d encodes expression with it).

Attention and Transformer blocks live in :mod:`he2st.methods.nn.attention`.
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

    Parameters
    ----------
    in_dim
        Input width.
    out_dim
        Output width.
    dropout
        AlphaDropout rate.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.25) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.dropout = nn.AlphaDropout(dropout)
        nn.init.normal_(self.linear.weight, std=in_dim**-0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.selu(self.linear(x)))
