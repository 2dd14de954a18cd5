"""Layers of multi-level (many-to-one) encoders: several crops of one spot, each its own token sequence.

Every level is an image of the same pixel size centred on the same spot, its
field of view a multiple of the finest one. The layers here embed, mix and
gate such a list of token sequences, one sequence per level, whose lengths
differ:

- :func:`window_tokens`: the pixels of a square window of an image, cut into
  a ``g x g`` grid of patches through :func:`torch.nn.functional.grid_sample`
  (so every patch may be shifted by a learned offset);
- :class:`DeformablePatchEmbedding`: patches of one size -> tokens, with
  optional content-predicted offsets (zero-initialised: it starts as a plain
  patch embedding);
- :class:`LevelSelfAttention`: self-attention inside each level (its own
  projections per level);
- :class:`SharedTokenMLP`: one token MLP shared by every level;
- :class:`CrossLevelAttention`: the queries of each level attend to the
  tokens of every other level, one softmax per other level;
- :class:`LevelExcitation`: squeeze-excitation across levels; each level's
  tokens are mean-pooled, so the gates do not depend on sequence length;
- :class:`MultiLevelBlock`: the four in the order of M2OST's encoder block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from he2st.methods.nn.attention import MultiHeadAttention, attend

__all__ = [
    "CrossLevelAttention",
    "DeformablePatchEmbedding",
    "LevelExcitation",
    "LevelSelfAttention",
    "MultiLevelBlock",
    "SharedTokenMLP",
    "window_tokens",
]


def window_tokens(images: torch.Tensor, window_px: int, patch_px: int, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The patches of the centred ``window_px`` square of ``images``, flattened, one token per patch.

    Pixels are sampled bilinearly at their centres, so with no offsets the
    result equals cutting the window into ``patch_px`` squares.

    Parameters
    ----------
    images
        ``(B, C, S, S)`` batch.
    window_px
        Side of the centred window, a multiple of ``patch_px`` and at most ``S``.
    patch_px
        Side of one patch.
    offsets
        ``(B, N, 2)`` shift in pixels ``(dx, dy)`` of each of the ``N = (window_px / patch_px)**2``
        patches (row-major), or None.

    Returns
    -------
    torch.Tensor
        ``(B, N, patch_px * patch_px * C)``, each token ordered (row, column, channel).
    """
    b, c, h, w = images.shape
    g = window_px // patch_px
    if g * patch_px != window_px or window_px > min(h, w):
        raise ValueError(f"window of {window_px} px must be a multiple of the {patch_px} px patch and fit in {h}x{w}")
    dev, dt = images.device, images.dtype
    top, left = (h - window_px) / 2.0, (w - window_px) / 2.0
    cells = torch.arange(g, device=dev, dtype=dt) * patch_px
    inner = torch.arange(patch_px, device=dev, dtype=dt) + 0.5
    ys = top + cells.view(g, 1, 1, 1) + inner.view(1, 1, patch_px, 1)  # (g, 1, p, 1): token row, pixel row
    xs = left + cells.view(1, g, 1, 1) + inner.view(1, 1, 1, patch_px)  # (1, g, 1, p)
    ys, xs = torch.broadcast_tensors(ys, xs)  # (g, g, p, p)
    n, pp = g * g, patch_px * patch_px
    xs = xs.reshape(1, n, pp).expand(b, n, pp)
    ys = ys.reshape(1, n, pp).expand(b, n, pp)
    if offsets is not None:
        xs = xs + offsets[..., 0:1]
        ys = ys + offsets[..., 1:2]
    # align_corners=False: pixel j's centre is at normalised 2 (j + 0.5) / size - 1.
    grid = torch.stack((2.0 * xs / w - 1.0, 2.0 * ys / h - 1.0), dim=-1)
    sampled = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B, C, N, pp)
    return sampled.permute(0, 2, 3, 1).reshape(b, n, pp * c)


class DeformablePatchEmbedding(nn.Module):
    """Patches of one size -> tokens: ``LN -> Linear -> GELU -> Linear -> LN`` on the flattened pixels.

    With ``deform=True`` a linear map of each patch's pixels predicts a shift
    of that patch (``tanh``, at most half a patch each way); the patch is then
    resampled at the shifted place. The map starts at zero, so the module
    starts as the plain patch embedding.

    Parameters
    ----------
    patch_px
        Side of a patch in pixels.
    dim
        Token width.
    hidden
        Width of the hidden layer.
    channels
        Image channels.
    deform
        Learn per-patch offsets.
    """

    def __init__(self, patch_px: int, dim: int, hidden: int, channels: int = 3, deform: bool = False) -> None:
        super().__init__()
        self.patch_px = int(patch_px)
        flat = channels * self.patch_px**2
        self.embed = nn.Sequential(nn.LayerNorm(flat), nn.Linear(flat, hidden), nn.GELU(), nn.Linear(hidden, dim),
                                   nn.LayerNorm(dim))
        self.offset: nn.Linear | None = None
        if deform:
            self.offset = nn.Linear(flat, 2)
            nn.init.zeros_(self.offset.weight)
            nn.init.zeros_(self.offset.bias)

    def offsets(self, images: torch.Tensor, window_px: int) -> torch.Tensor | None:
        """The ``(B, N, 2)`` pixel shifts of the window's patches (None without ``deform``).

        Parameters
        ----------
        images
            ``(B, C, S, S)`` batch.
        window_px
            Side of the centred window.

        Returns
        -------
        torch.Tensor or None
            Shifts in pixels.
        """
        if self.offset is None:
            return None
        plain = window_tokens(images, window_px, self.patch_px)
        return torch.tanh(self.offset(plain)) * (self.patch_px / 2.0)

    def forward(self, images: torch.Tensor, window_px: int) -> torch.Tensor:
        """Tokens ``(B, (window_px / patch_px)**2, dim)`` of the centred window.

        Parameters
        ----------
        images
            ``(B, C, S, S)`` batch.
        window_px
            Side of the centred window.

        Returns
        -------
        torch.Tensor
            The embedded patches, row-major.
        """
        return self.embed(window_tokens(images, window_px, self.patch_px, self.offsets(images, window_px)))


class LevelSelfAttention(nn.Module):
    """Self-attention within each level, separate projections per level, residual added.

    No normalisation before the attention (the authors' M2OST code defines one and does not use it).

    Parameters
    ----------
    dim
        Token width.
    n_levels
        Number of levels.
    heads, head_dim
        Heads per level and the width of each.
    dropout
        Dropout after the output projection.
    """

    def __init__(self, dim: int, n_levels: int, heads: int, head_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.ModuleList(
            MultiHeadAttention(dim, heads, head_dim, dropout=dropout, fused=True) for _ in range(n_levels)
        )

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``x + attention(x)`` for each level's ``(B, N_l, dim)`` tokens."""
        return [x + a(x) for a, x in zip(self.attn, xs)]


class SharedTokenMLP(nn.Module):
    """One token MLP for every level: ``x + GELU(W2 GELU(W1 LN x))``.

    Parameters
    ----------
    dim
        Token width.
    hidden
        Hidden width.
    dropout
        Dropout after the first activation.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.GELU())

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The MLP with its residual, applied to each level's tokens."""
        return [x + self.net(x) for x in xs]


class CrossLevelAttention(nn.Module):
    """Each level's queries attend to each other level's tokens; the results are concatenated and projected.

    The tokens of all levels share one LayerNorm; every level has its own
    query, key and value maps. For level ``i`` and every other level ``j``
    (ascending), ``softmax(Q_i K_j^T / sqrt(d)) V_j`` is computed over ``j``'s
    tokens alone, so sequences of any lengths mix; the ``L - 1`` results are
    concatenated and mapped back to ``dim``.

    Parameters
    ----------
    dim
        Token width.
    n_levels
        Number of levels (at least 2).
    heads, head_dim
        Attention heads and their width.
    dropout
        Dropout on the attention weights and after the output map.
    residual
        Add the input to the output (the authors' code does not).
    """

    def __init__(self, dim: int, n_levels: int, heads: int = 3, head_dim: int = 64, dropout: float = 0.0,
                 residual: bool = False) -> None:
        super().__init__()
        if n_levels < 2:
            raise ValueError("cross-level attention needs at least two levels")
        inner = heads * head_dim
        self.heads, self.scale, self.residual = heads, head_dim**-0.5, residual
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.ModuleList(nn.Linear(dim, inner, bias=False) for _ in range(n_levels))
        self.to_k = nn.ModuleList(nn.Linear(dim, inner, bias=False) for _ in range(n_levels))
        self.to_v = nn.ModuleList(nn.Linear(dim, inner, bias=False) for _ in range(n_levels))
        self.to_out = nn.ModuleList(
            nn.Sequential(nn.Linear((n_levels - 1) * inner, dim), nn.Dropout(dropout)) for _ in range(n_levels)
        )
        self.dropout = nn.Dropout(dropout)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout.p > 0:
            from he2st.methods.nn.attention import merge_heads, split_heads

            qh, kh, vh = (split_heads(t, self.heads) for t in (q, k, v))
            w = self.dropout(torch.softmax(qh @ kh.transpose(-1, -2) * self.scale, dim=-1))
            return merge_heads(w @ vh)
        return attend(q, k, v, self.heads, scale=self.scale)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Mixed tokens, one ``(B, N_l, dim)`` tensor per level (the input shapes)."""
        normed = [self.norm(x) for x in xs]
        q = [f(x) for f, x in zip(self.to_q, normed)]
        k = [f(x) for f, x in zip(self.to_k, normed)]
        v = [f(x) for f, x in zip(self.to_v, normed)]
        out = []
        for i in range(len(xs)):
            parts = [self._attend(q[i], k[j], v[j]) for j in range(len(xs)) if j != i]
            y = self.to_out[i](torch.cat(parts, dim=-1))
            out.append(xs[i] + y if self.residual else y)
        return out


class LevelExcitation(nn.Module):
    """Squeeze-excitation across levels: ``x_l * (1 + g_l)`` with channel gates ``g`` from every level.

    Each level's tokens are averaged over the sequence (the squeeze, so any
    length and token order give the same summary), the ``L`` summaries
    concatenated, and ``sigmoid(W2 GELU(W1 LN s))`` split into one gate
    vector per level.

    Parameters
    ----------
    dim
        Token width of each level.
    n_levels
        Number of levels.
    hidden
        Hidden width of the excitation MLP.
    dropout
        Dropout inside the MLP.
    """

    def __init__(self, dim: int, n_levels: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_levels = n_levels
        width = dim * n_levels
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, width), nn.Dropout(dropout), nn.Sigmoid())

    def gates(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-level channel gates ``(B, dim)`` in ``(0, 1)``.

        Parameters
        ----------
        xs
            One ``(B, N_l, dim)`` tensor per level.

        Returns
        -------
        list of torch.Tensor
            The gates, level by level.
        """
        squeezed = torch.cat([x.mean(dim=1) for x in xs], dim=-1)
        return list(self.net(squeezed).chunk(self.n_levels, dim=-1))

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Gated tokens with the residual, shapes unchanged."""
        return [x * g.unsqueeze(1) + x for x, g in zip(xs, self.gates(xs))]


class MultiLevelBlock(nn.Module):
    """M2OST's encoder block: intra-level attention, shared MLP, cross-level attention, cross-level excitation.

    Parameters
    ----------
    dim
        Token width of every level.
    n_levels
        Number of levels.
    heads
        Intra-level heads per level.
    head_dim
        Width of every attention head.
    cross_heads
        Heads of the cross-level attention.
    mlp_hidden
        Hidden width of the shared token MLP.
    excite_hidden
        Hidden width of the excitation MLP.
    dropout
        Dropout everywhere in the block.
    cross_residual
        Residual connection around the cross-level attention.
    """

    def __init__(self, dim: int, n_levels: int, heads: int, head_dim: int, cross_heads: int, mlp_hidden: int,
                 excite_hidden: int, dropout: float = 0.0, cross_residual: bool = False) -> None:
        super().__init__()
        self.intra = LevelSelfAttention(dim, n_levels, heads, head_dim, dropout)
        self.mlp = SharedTokenMLP(dim, mlp_hidden, dropout)
        self.cross = CrossLevelAttention(dim, n_levels, cross_heads, head_dim, dropout, residual=cross_residual)
        self.excite = LevelExcitation(dim, n_levels, excite_hidden, dropout)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The block's output, one tensor per level (shapes unchanged)."""
        return self.excite(self.cross(self.mlp(self.intra(xs))))
