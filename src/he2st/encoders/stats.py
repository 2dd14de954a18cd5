"""``color_stats``: a cheap, deterministic, non-neural encoder.

Thirty colour, stain and texture statistics per patch. It is fast enough for
unit tests and is a sanity baseline: a neural encoder that cannot beat colour
statistics at predicting expression is not learning morphology.

Features (in this order, see :data:`FEATURE_NAMES`):

- RGB mean (3), standard deviation (3) and 10th/50th/90th percentiles (9), on the [0, 1] scale;
- haematoxylin, eosin and DAB optical densities from Ruifrok & Johnston's colour
  deconvolution (fixed stain matrix, no scikit-image): mean (3) and standard deviation (3);
- HSV saturation mean and standard deviation (2);
- background fraction: pixels whose darkest channel is above 0.8 (1);
- grey-level gradient magnitude (central differences) mean and standard deviation (2);
- mean absolute Laplacian (1);
- grey-level entropy over 32 bins, in bits (1);
- fraction of pixels with haematoxylin OD above 0.3, i.e. nuclei (1);
- local contrast: mean ``|grey - 5x5 box mean|`` (1).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from he2st.encoders._base import Encoder, EncoderInfo, register_encoder
from he2st.errors import He2stInputError

FEATURE_NAMES: tuple[str, ...] = (
    *(f"{c}_mean" for c in "RGB"),
    *(f"{c}_std" for c in "RGB"),
    *(f"{c}_p{q}" for q in (10, 50, 90) for c in "RGB"),
    "H_mean", "E_mean", "D_mean", "H_std", "E_std", "D_std",
    "sat_mean", "sat_std", "background_frac",
    "grad_mean", "grad_std", "laplacian_abs_mean", "gray_entropy_bits",
    "nuclei_frac", "local_contrast",
)

#: Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in RGB optical density.
RGB_FROM_HED = torch.tensor(
    [[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]], dtype=torch.float64
)


def _hed_from_rgb() -> torch.Tensor:
    m = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)
    return torch.linalg.inv(m).to(torch.float32)


class ColorStats(Encoder):
    """Colour/stain/texture statistics of ``[0, 1]`` RGB images (``mean=0, std=1`` normalisation)."""

    def __init__(self, info: EncoderInfo) -> None:
        super().__init__(info, torch.nn.Identity())
        self.register_buffer("hed_from_rgb", _hed_from_rgb(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        x = x.float().clamp(0.0, 1.0)
        b = x.shape[0]
        flat = x.flatten(2)  # (B, 3, N)
        mean, std = flat.mean(-1), flat.std(-1, correction=0)
        q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9], device=x.device), dim=-1)  # (3q, B, 3c)
        pct = q.permute(1, 0, 2).reshape(b, 9)

        # Optical density (natural log, floored at 1/255) projected on the stain basis.
        od = -torch.log(flat.clamp_min(1.0 / 255.0))
        hed = torch.einsum("bcn,cs->bsn", od, self.hed_from_rgb.to(x.device)).clamp_min(0.0)
        hed_mean, hed_std = hed.mean(-1), hed.std(-1, correction=0)

        mx, mn = flat.max(1).values, flat.min(1).values
        sat = (mx - mn) / mx.clamp_min(1e-6)
        background = (mn > 0.8).float().mean(-1, keepdim=True)

        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (B, 1, H, W)
        gp = F.pad(gray, (1, 1, 1, 1), mode="replicate")
        gx = (gp[..., 1:-1, 2:] - gp[..., 1:-1, :-2]) / 2
        gy = (gp[..., 2:, 1:-1] - gp[..., :-2, 1:-1]) / 2
        grad = (gx**2 + gy**2).sqrt().flatten(1)
        lap = (gp[..., 1:-1, 2:] + gp[..., 1:-1, :-2] + gp[..., 2:, 1:-1] + gp[..., :-2, 1:-1] - 4 * gray).abs()
        bins = (gray.flatten(1) * 32).long().clamp(0, 31)
        hist = F.one_hot(bins, 32).float().mean(1)
        entropy = -(hist * torch.log2(hist.clamp_min(1e-12))).sum(-1, keepdim=True)
        nuclei = (hed[:, 0] > 0.3).float().mean(-1, keepdim=True)
        local = (gray - F.avg_pool2d(F.pad(gray, (2, 2, 2, 2), mode="replicate"), 5, stride=1)).abs()

        return torch.cat(
            [
                mean, std, pct, hed_mean, hed_std,
                sat.mean(-1, keepdim=True), sat.std(-1, correction=0, keepdim=True), background,
                grad.mean(-1, keepdim=True), grad.std(-1, correction=0, keepdim=True),
                lap.flatten(1).mean(-1, keepdim=True), entropy, nuclei, local.flatten(1).mean(-1, keepdim=True),
            ],
            dim=1,
        )


@register_encoder("color_stats", kind="stats", dim=len(FEATURE_NAMES), description="colour/HED/texture statistics, 30-d")
def color_stats(**kw: Any) -> Encoder:
    """Thirty deterministic colour, stain and texture statistics (see :mod:`he2st.encoders.stats`).

    ``input_size`` (default 112) is the side patches are resized to before the statistics.
    """
    size = int(kw.pop("input_size", 112))
    if kw:
        raise He2stInputError(f"encoder 'color_stats': unknown option(s) {sorted(kw)}; known: input_size")
    info = EncoderInfo(
        name="color_stats", arch="he2st:color_stats", input_size=size, mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0), dim=len(FEATURE_NAMES), has_tokens=False, kind="stats",
        pretrained=False,
    )
    return ColorStats(info)
