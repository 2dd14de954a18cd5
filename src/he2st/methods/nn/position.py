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

Two encodings act on tokens rather than being added to them:

- :class:`RelativeGridBias` (LeViT, Graham et al. 2021; TRIPLEX's neighbour
  encoder): one learnt attention logit per head and per absolute offset
  ``(|dr|, |dc|)`` between two cells of a small ``rows x cols`` token grid,
  added to the attention logits;
- :class:`SpotGridConv` (a conditional position encoding, PEG of Chu et al.
  2023, on the sparse spot array: TRIPLEX's APEG): spot tokens are scattered
  onto their integer array grid, a depthwise convolution runs over the grid
  and its output at each spot is added to the spot's token.
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


class RelativeGridBias(nn.Module):
    """Learnt attention biases of the tokens of a ``rows x cols`` grid, one per head and absolute offset.

    Cells are numbered row-major. The bias between cells ``(r1, c1)`` and
    ``(r2, c2)`` is ``B[h, (|r1 - r2|, |c1 - c2|)]``; all biases start at zero.

    Parameters
    ----------
    rows, cols
        Grid shape (TRIPLEX: 5 x 5 neighbour cells).
    heads
        Attention heads (one bias table each).
    """

    def __init__(self, rows: int, cols: int, heads: int) -> None:
        super().__init__()
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        r, c = r.reshape(-1), c.reshape(-1)
        dr = (r[:, None] - r[None, :]).abs()
        dc = (c[:, None] - c[None, :]).abs()
        # Offset (dr, dc) -> table column; the table has rows x cols distinct offsets.
        self.register_buffer("index", dr * cols + dc, persistent=False)
        self.bias = nn.Parameter(torch.zeros(heads, rows * cols))

    def forward(self) -> torch.Tensor:
        """The bias of every pair of cells.

        Returns
        -------
        torch.Tensor
            ``(heads, rows * cols, rows * cols)`` additive attention logits.
        """
        return self.bias[:, self.index]


class SpotGridConv(nn.Module):
    """Conditional position encoding of spot tokens on their integer array grid (TRIPLEX's APEG).

    The tokens ``(n, dim)`` are placed at their grid cells (shifted so the
    smallest coordinate is 0; empty cells are zero; tokens sharing a cell are
    summed there), a ``kernel_size`` depthwise convolution with bias runs over
    the dense grid, and each token gets the convolution's value at its own
    cell added: ``x_i + conv(X)[g_i]``. Only the spots' cells are read back,
    in the spots' order.

    Parameters
    ----------
    dim
        Token width (channels of the depthwise convolution).
    kernel_size
        Side of the convolution kernel (odd; padding keeps the grid size).
    """

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=True)

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Tokens with the grid convolution added.

        Parameters
        ----------
        x
            ``(n, dim)`` spot tokens (or ``(1, n, dim)``).
        grid
            ``(n, 2)`` integer array coordinates ``(col, row)``.

        Returns
        -------
        torch.Tensor
            The shape of ``x``.
        """
        squeeze = x.dim() == 3
        tokens = x[0] if squeeze else x
        g = grid.long().to(tokens.device)
        g = g - g.min(dim=0).values
        cols, rows = int(g[:, 0].max()) + 1, int(g[:, 1].max()) + 1
        dense = tokens.new_zeros(rows, cols, tokens.shape[1])
        dense = dense.index_put((g[:, 1], g[:, 0]), tokens, accumulate=True)
        out = self.conv(dense.permute(2, 0, 1).unsqueeze(0))[0]  # (dim, rows, cols)
        y = tokens + out[:, g[:, 1], g[:, 0]].transpose(0, 1)
        return y.unsqueeze(0) if squeeze else y
