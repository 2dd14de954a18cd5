"""Omni-dimensional dynamic convolution (ODConv), THItoGene's image stem.

Li, Zhou & Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022. A bank of
``kernel_num`` convolution kernels is mixed per input image: four attention
vectors computed from the globally pooled input scale the kernel's spatial
positions, input channels, output filters, and the kernels of the bank. Each
patch therefore gets its own kernel, adapted to its content (THItoGene uses it
to extract fine-grained features from spot patches adaptively).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ODConv2d"]


class ODConv2d(nn.Module):
    """Dynamic 2-D convolution with attention over all four kernel dimensions.

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding
        As :class:`torch.nn.Conv2d` (square kernels, no dilation, no groups).
    kernel_num
        Kernels in the bank (ODConv's default 4).
    reduction, min_hidden
        Width of the attention branch: ``max(in_channels * reduction, min_hidden)``.
    temperature
        Softmax temperature of the kernel attention.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        kernel_num: int = 4,
        reduction: float = 0.0625,
        min_hidden: int = 16,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.kernel_num, self.temperature = kernel_num, temperature
        hidden = max(int(in_channels * reduction), min_hidden)
        self.squeeze = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()
        )
        self.channel_att = nn.Conv2d(hidden, in_channels, 1)
        self.filter_att = nn.Conv2d(hidden, out_channels, 1)
        self.spatial_att = nn.Conv2d(hidden, kernel_size * kernel_size, 1)
        self.kernel_att = nn.Conv2d(hidden, kernel_num, 1)
        self.weight = nn.Parameter(torch.empty(kernel_num, out_channels, in_channels, kernel_size, kernel_size))
        for w in self.weight:
            nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")

    def attentions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Channel ``(B, in)``, filter ``(B, out)``, spatial ``(B, k*k)`` and kernel ``(B, K)`` attentions."""
        a = self.squeeze(x)
        b = x.shape[0]
        channel = torch.sigmoid(self.channel_att(a)).view(b, -1)
        filt = torch.sigmoid(self.filter_att(a)).view(b, -1)
        spatial = torch.sigmoid(self.spatial_att(a)).view(b, -1)
        kernel = torch.softmax(self.kernel_att(a).view(b, -1) / self.temperature, dim=1)
        return channel, filt, spatial, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.kernel_size
        channel, filt, spatial, kernel = self.attentions(x)
        # Per-sample kernel: sum_n kernel_n * (spatial ⊙ W_n); the channel and
        # filter attentions act on the input and output instead, which is
        # equivalent and cheaper than scaling the kernel itself.
        weight = torch.einsum("bn,noikl->boikl", kernel, self.weight) * spatial.view(b, 1, 1, k, k)
        x = x * channel.view(b, c, 1, 1)
        out = F.conv2d(
            x.reshape(1, b * c, h, w),
            weight.reshape(b * self.out_channels, c, k, k),
            stride=self.stride,
            padding=self.padding,
            groups=b,
        )
        out = out.view(b, self.out_channels, out.shape[-2], out.shape[-1])
        return out * filt.view(b, self.out_channels, 1, 1)
