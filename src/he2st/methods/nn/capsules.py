"""Efficient-CapsNet with self-attention routing (THItoGene's capsule module).

Mazzia, Salvetti & Chiaberge, "Efficient-CapsNet: capsule network with
self-attention routing", Sci. Rep. 11:14634 (2021). A small convolutional stem
produces primary capsules with one depthwise convolution; each primary capsule
``i`` predicts every output capsule ``j`` (``u_hat[j, i] = W[j, i] u[i]``); the
coupling of ``i`` to ``j`` is a softmax over ``j`` of the agreement of
``u_hat[j, i]`` with all predictions for ``j``, scaled by ``1/sqrt(d)``; output
capsules are the squashed, coupling-weighted (plus a learned prior) sums.
THItoGene routes 16 primary capsules of 8 dimensions to 20 capsules of 64.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AttentionRouting", "EfficientCapsNet", "squash"]


def squash(s: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    """Efficient-CapsNet's squash: ``(1 - 1/exp(|s|)) * s / |s|`` along the last axis.

    Parameters
    ----------
    s
        Capsule vectors, ``(..., d)``.
    eps
        Added to the norm in the denominator (a zero vector stays zero).

    Returns
    -------
    torch.Tensor
        Squashed capsules of the shape of ``s``, each of norm below 1.
    """
    norm = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
    return (1.0 - torch.exp(-norm)) * s / (norm + eps)


class AttentionRouting(nn.Module):
    """Route ``n_in`` capsules of ``d_in`` dims to ``n_out`` capsules of ``d_out`` dims.

    Parameters
    ----------
    n_in
        Input (primary) capsules.
    d_in
        Width of each input capsule.
    n_out
        Output capsules.
    d_out
        Width of each output capsule.
    """

    def __init__(self, n_in: int, d_in: int, n_out: int, d_out: int) -> None:
        super().__init__()
        self.d_out = d_out
        self.W = nn.Parameter(torch.empty(n_out, n_in, d_in, d_out))
        nn.init.kaiming_normal_(self.W)
        self.prior = nn.Parameter(torch.zeros(n_out, n_in, 1))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``u``: ``(B, n_in, d_in)`` -> ``(B, n_out, d_out)``."""
        u_hat = torch.einsum("bid,jide->bjie", u, self.W)  # (B, n_out, n_in, d_out)
        # Agreement of each prediction with the sum of all predictions for the
        # same output capsule, i.e. the row sums of the self-attention matrix
        # u_hat u_hat^T of Efficient-CapsNet.
        agree = (u_hat * u_hat.sum(dim=2, keepdim=True)).sum(-1, keepdim=True) / self.d_out**0.5
        coupling = torch.softmax(agree, dim=1) + self.prior  # softmax over output capsules
        return squash((u_hat * coupling).sum(dim=2))


class EfficientCapsNet(nn.Module):
    """Convolutional stem, primary capsules and attention routing.

    Parameters
    ----------
    in_channels
        Channels of the input feature map (THItoGene: 16, from its dynamic-convolution stem).
    in_size
        Side of the input map (28 for a 112 px patch after the stride-4 stem).
    n_primary, d_primary
        Primary capsules and their width (16 x 8).
    n_caps, d_caps
        Routed capsules and their width (THItoGene: ``caps=20``, ``route_dim=64``).

    The stem is conv 5x5 (32) -> 3x3 (64) -> 3x3 (64) -> 3x3 stride 2 (128),
    each with batch norm and ReLU, unpadded; the primary capsules come from a
    depthwise convolution spanning the whole remaining map (9x9 for a 28 px
    input), so ``n_primary * d_primary`` must equal 128.
    """

    def __init__(
        self,
        in_channels: int = 16,
        in_size: int = 28,
        n_primary: int = 16,
        d_primary: int = 8,
        n_caps: int = 20,
        d_caps: int = 64,
    ) -> None:
        super().__init__()
        if n_primary * d_primary != 128:
            raise ValueError(f"n_primary * d_primary must be 128 (the stem's channels), got {n_primary * d_primary}")
        side = ((in_size - 4 - 2 - 2) - 3) // 2 + 1
        if side < 1:
            raise ValueError(f"EfficientCapsNet needs an input map of at least 11 px, got {in_size}")

        def block(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
            conv = nn.Conv2d(cin, cout, k, stride=stride)
            nn.init.kaiming_normal_(conv.weight)
            return [conv, nn.BatchNorm2d(cout), nn.ReLU()]

        self.stem = nn.Sequential(
            *block(in_channels, 32, 5), *block(32, 64, 3), *block(64, 64, 3), *block(64, 128, 3, stride=2)
        )
        self.primary = nn.Conv2d(128, 128, side, groups=128)
        self.n_primary, self.d_primary = n_primary, d_primary
        self.routing = AttentionRouting(n_primary, d_primary, n_caps, d_caps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, S, S)`` -> capsules ``(B, n_caps, d_caps)``."""
        h = self.primary(self.stem(x))  # (B, 128, 1, 1)
        u = squash(h.view(h.shape[0], self.n_primary, self.d_primary))
        return self.routing(u)
