"""Spot position encodings (mclSTExp and its ablation, supplementary Table S4).

Every encoding maps integer spot coordinates ``(x, y)`` (``(B, 2)``, x =
column, y = row; array coordinates by default) to a ``(B, dim)`` vector that
is *added* to the spot's expression (mclSTExp eq. 6: ``Spot + S_x + S_y``).

- ``"learnable"`` (mclSTExp's default): one-hot over ``max_positions``
  positions per axis followed by a linear map to ``dim`` -- i.e. two
  embedding tables, ``S_x = W_x[x]`` and ``S_y = W_y[y]``; the paper uses
  ``max_positions = 65536``.
- ``"sinusoidal"`` (Vaswani et al. 2017, 2-D form): fixed; the first
  ``dim // 2`` channels encode x, the rest y, each as interleaved
  ``sin(p w_i), cos(p w_i)`` with ``w_i = 10000^(-2i / d_axis)``.
- ``"naive"``: coordinates min-max scaled within the batch (one scale for both
  axes, so the aspect ratio is kept) and mapped by ``LayerNorm(GELU(W p + b))``;
  a linear encoding of raw position, as the commented-out variant in the
  mclSTExp repository (our reading of "naive PE").
- ``"none"``: zeros (the ablation without position).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

POSITION_ENCODINGS = ("none", "sinusoidal", "naive", "learnable")


class NoPositionEncoding(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.zeros(pos.shape[0], self.dim, device=pos.device)


class LearnablePositionEncoding(nn.Module):
    """``W_x[x] + W_y[y]`` with two ``(max_positions, dim)`` tables (N(0, 1) init).

    Parameters
    ----------
    dim
        Encoding width.
    max_positions
        Rows of each table; coordinates must lie in ``[0, max_positions)``
        (mclSTExp: 65536).
    """

    def __init__(self, dim: int, max_positions: int = 65536) -> None:
        super().__init__()
        self.max_positions = int(max_positions)
        self.x_embed = nn.Embedding(self.max_positions, dim)
        self.y_embed = nn.Embedding(self.max_positions, dim)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        """Encode spot positions.

        Parameters
        ----------
        pos
            ``(B, 2)`` integer ``(x, y)`` coordinates in ``[0, max_positions)``.

        Returns
        -------
        torch.Tensor
            ``(B, dim)`` encodings ``W_x[x] + W_y[y]``.
        """
        pos = pos.long()
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self.max_positions):
            raise ValueError(
                f"spot coordinates must lie in [0, {self.max_positions}) for the learnable position "
                f"encoding, got [{int(pos.min())}, {int(pos.max())}]; raise max_positions"
            )
        return self.x_embed(pos[:, 0]) + self.y_embed(pos[:, 1])


def sinusoidal_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """``(B,) -> (B, dim)``: channel ``2i`` is ``sin(p w_i)``, ``2i+1`` is ``cos(p w_i)``, ``w_i = 10000^(-2i/dim)``.

    Parameters
    ----------
    pos
        ``(B,)`` positions (cast to float32).
    dim
        Encoding width (an odd ``dim`` ends with a sine channel).

    Returns
    -------
    torch.Tensor
        ``(B, dim)`` float32 encodings, on ``pos``'s device.
    """
    i = torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32)
    w = torch.exp(-math.log(10000.0) * i / dim)
    ang = pos.float()[:, None] * w[None, :]
    out = torch.empty(pos.shape[0], dim, device=pos.device)
    out[:, 0::2] = torch.sin(ang)
    out[:, 1::2] = torch.cos(ang[:, : dim // 2])
    return out


class SinusoidalPositionEncoding(nn.Module):
    """Fixed 2-D sinusoidal encoding: x in the first ``dim // 2`` channels, y in the rest."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.dx = dim // 2
        self.dy = dim - self.dx

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.dx:
            parts.append(sinusoidal_1d(pos[:, 0], self.dx))
        parts.append(sinusoidal_1d(pos[:, 1], self.dy))
        return torch.cat(parts, dim=1)


class NaivePositionEncoding(nn.Module):
    """``LayerNorm(GELU(W p~ + b))`` of batch-min-max scaled coordinates ``p~`` in [0, 1]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(2, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        p = pos.float()
        lo = p.min(dim=0).values
        scale = (p.max(dim=0).values - lo).max().clamp_min(1.0)
        return self.norm(F.gelu(self.linear((p - lo) / scale)))


def make_position_encoding(kind: str, dim: int, max_positions: int = 65536) -> nn.Module:
    """Position encoding by name (see module docstring).

    Parameters
    ----------
    kind
        One of ``"none"``, ``"sinusoidal"``, ``"naive"``, ``"learnable"``.
    dim
        Encoding width.
    max_positions
        Rows of each table of the ``"learnable"`` encoding (ignored otherwise).

    Returns
    -------
    torch.nn.Module
        A module mapping ``(B, 2)`` coordinates to ``(B, dim)`` encodings.
    """
    if kind == "learnable":
        return LearnablePositionEncoding(dim, max_positions)
    if kind == "sinusoidal":
        return SinusoidalPositionEncoding(dim)
    if kind == "naive":
        return NaivePositionEncoding(dim)
    if kind == "none":
        return NoPositionEncoding(dim)
    raise ValueError(f"unknown position encoding {kind!r}; use one of {POSITION_ENCODINGS}")
