"""Difference convolution and the gradient enhancement module (HGGEP).

A central-difference convolution (Yu et al., CVPR 2020) mixes a plain
convolution with the response of its kernel to the centre pixel alone:

``y = conv(x, w) - theta * conv_1x1(x, sum(w))``

so that at ``theta = 1`` it is a pure difference operator (for every output
position, ``sum_k w_k (x_k - x_centre)``): zero on a constant image, away
from the zero-padded border. ``theta = 0`` is a plain convolution.
HGGEP uses the horizontal-vertical "cross" variant: the learnable 3 x 3
kernel has only its centre and its four edge neighbours (5 weights), the
corners fixed at zero.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CENTRAL_DIFFERENCE_KERNELS", "CentralDifferenceConv2d", "GradientEnhancement", "conv_bn_relu6"]

#: Kernel shapes of :class:`CentralDifferenceConv2d`: the full 3 x 3 square or the 5-tap cross.
CENTRAL_DIFFERENCE_KERNELS = ("cross", "full")

# Positions of the five cross taps in a flattened 3 x 3 kernel: top, left, centre, right, bottom.
_CROSS_TAPS = (1, 3, 4, 5, 7)


class CentralDifferenceConv2d(nn.Module):
    """3 x 3 central-difference convolution with a ``theta`` mix (no bias).

    Parameters
    ----------
    in_channels, out_channels
        Channels in and out.
    stride
        Stride of both the 3 x 3 and the centre (1 x 1) terms.
    theta
        Weight of the difference term: 0 is a plain convolution, 1 a pure
        difference operator (HGGEP: 0.7).
    kernel
        ``"cross"`` (HGGEP's horizontal-vertical cross: 5 learnable taps) or
        ``"full"`` (all 9 taps).
    groups
        Convolution groups.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, theta: float = 0.7, kernel: str = "cross", groups: int = 1
    ) -> None:
        super().__init__()
        if kernel not in CENTRAL_DIFFERENCE_KERNELS:
            raise ValueError(f"kernel must be one of {CENTRAL_DIFFERENCE_KERNELS}, got {kernel!r}")
        self.kernel, self.stride, self.theta, self.groups = kernel, int(stride), float(theta), int(groups)
        taps = 5 if kernel == "cross" else 9
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, taps))
        # The same fan-in scaling as a Conv2d of this many taps.
        nn.init.kaiming_uniform_(self.weight.view(out_channels, -1, 1, taps), a=5**0.5)

    def kernel3x3(self) -> torch.Tensor:
        """The effective ``(out, in / groups, 3, 3)`` kernel (zeros at the cross's corners)."""
        o, i, taps = self.weight.shape
        if taps == 9:
            return self.weight.view(o, i, 3, 3)
        # Place the five taps by a fixed 0/1 matrix (no in-place writes into the autograd graph).
        place = torch.zeros(5, 9, dtype=self.weight.dtype, device=self.weight.device)
        place[torch.arange(5), torch.tensor(_CROSS_TAPS)] = 1.0
        return (self.weight @ place).view(o, i, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in, H, W)`` -> ``(B, out, ceil(H / stride), ceil(W / stride))``."""
        out = F.conv2d(x, self.kernel3x3(), stride=self.stride, padding=1, groups=self.groups)
        if self.theta == 0.0:
            return out
        centre = self.weight.sum(dim=2)[:, :, None, None]
        # A strided 1 x 1 convolution is subsampling then a 1 x 1 convolution; written that way
        # because torch 2.14's CPU backward of a STRIDED 1 x 1 convolution on a channels-last input
        # that needs no gradient (image patches arrive as NHWC views) corrupts the heap.
        x_centre = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        return out - self.theta * F.conv2d(x_centre, centre, groups=self.groups)


def conv_bn_relu6(conv: nn.Module, channels: int) -> nn.Sequential:
    """``conv -> BatchNorm2d(channels) -> ReLU6``.

    Parameters
    ----------
    conv
        The convolution.
    channels
        Its output channels.

    Returns
    -------
    torch.nn.Sequential
        The three layers.
    """
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU6())


class GradientEnhancement(nn.Module):
    """HGGEP's gradient enhancement module: a plain and a difference branch, fused.

    Both branches are stride-2 3 x 3 convolutions (BatchNorm, ReLU6); the
    difference branch is a :class:`CentralDifferenceConv2d`. Their outputs are
    concatenated and fused by a 1 x 1 convolution (BatchNorm, ReLU6). As in the
    authors' code the fusing convolution keeps a padding of 1, so the map grows
    by 2 pixels per side (a 112 px patch gives 58 x 58, which the ShuffleNet
    stages take down to 4 x 4).

    Parameters
    ----------
    in_channels, out_channels
        Channels in and out (3 and 3 in HGGEP).
    theta
        ``theta`` of the difference branch (0.7).
    kernel
        Kernel of the difference branch (``"cross"``).
    fuse_padding
        Padding of the 1 x 1 fusing convolution (the authors' 1).
    """

    def __init__(
        self, in_channels: int = 3, out_channels: int = 3, theta: float = 0.7, kernel: str = "cross", fuse_padding: int = 1
    ) -> None:
        super().__init__()
        self.plain = conv_bn_relu6(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), out_channels)
        self.difference = conv_bn_relu6(CentralDifferenceConv2d(in_channels, out_channels, 2, theta, kernel), out_channels)
        self.fuse = conv_bn_relu6(nn.Conv2d(2 * out_channels, out_channels, 1, padding=fuse_padding), out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in, H, W)`` -> ``(B, out, ceil(H / 2) + 2 p, ceil(W / 2) + 2 p)``, ``p = fuse_padding``."""
        return self.fuse(torch.cat([self.plain(x), self.difference(x)], dim=1))
