"""Batch augmentations of patch tensors, the published methods' presets, and dihedral TTA.

Every augmentation takes a float tensor ``(B, 3, H, W)`` (or ``(3, H, W)``) with
values in ``[0, 1]`` and returns one of the same shape, dtype and device, still
in ``[0, 1]``. Random parameters are drawn **per sample** on the CPU from a
``torch.Generator`` (seeded with ``make_augment(..., seed=)``, so runs repeat),
then applied batched on the tensor's device.

Presets (``make_augment("<name>")``), from the methods' papers and code as
summarised by Jiang et al. 2024 (paper 002, Table S1 and Supplementary 7.1):

=============  ================================================================
``none``       identity
``stnet``      ST-Net: horizontal and vertical flips (p = 0.5 each) and a
               90-degree rotation (p = 0.5)
``histogene``  HisToGene: colour jitter (brightness, contrast, saturation 0.5),
               horizontal flip (p = 0.5), rotation by U(-180, 180) degrees
``hist2st``    Hist2ST's self-distillation views: random grayscale (p = 0.1),
               rotation by U(-90, 90) degrees, horizontal flip (p = 0.2). (Table
               S1 of paper 002 also lists colour jitter; its text and Hist2ST's
               code list exactly these three, which we follow.)
``stimage``    STimage: one of flipping, cropping (rescale), noise, blur, grid
               distortion, contrast, colour shift per image ("random one of",
               Table S1). Vahadane normalisation and the 70 % tissue filter are
               separate steps (:mod:`he2st.image.stain`, :func:`he2st.image.tissue_mask`).
``deepspace``  DeepSpaCE: flipping, cropping, noise, blurring, distortion,
               contrast and colour shift, each applied with p = 0.5 (our
               probabilities: paper 002 names the operations only)
``bleep``      BLEEP: horizontal and vertical flips (p = 0.5) and a rotation by
               a random multiple of 90 degrees
``m2ost``      M2OST: horizontal and vertical flips (p = 0.5) and a rotation by
               U(-180, 180) degrees; any number of channels (stacked levels
               move together)
=============  ================================================================

Rotations by arbitrary angles fill the uncovered corners with white (1.0),
like the white padding of patches at the slide edge; torchvision's default is
black, an artefact that never occurs in real tissue.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from he2st.errors import He2stInputError

Tensor = torch.Tensor

# ----------------------------------------------------------------------------
# Dihedral group (test-time augmentation)
# ----------------------------------------------------------------------------


def dihedral(x: Tensor, k: int, inverse: bool = False) -> Tensor:
    """The ``k``-th of the 8 symmetries of the square, applied to the last two dims.

    ``k = r + 4 f``: rotate by ``r`` quarter turns (counter-clockwise), then mirror
    left-right when ``f = 1``. ``k = 0`` is the identity. ``inverse=True`` undoes
    symmetry ``k``: ``dihedral(dihedral(x, k), k, inverse=True) == x``.

    Parameters
    ----------
    x
        Images; the symmetry acts on the last two dimensions.
    k
        Symmetry index, 0-7.
    inverse
        Apply the inverse of symmetry ``k``.

    Returns
    -------
    torch.Tensor
        ``x`` transformed, same shape for square images.
    """
    k = int(k)
    if not 0 <= k < 8:
        raise ValueError(f"dihedral symmetry index must be in 0..7, got {k}")
    r, f = k % 4, k // 4
    if not inverse:
        y = torch.rot90(x, r, dims=(-2, -1)) if r else x
        return y.flip(-1) if f else y
    y = x.flip(-1) if f else x
    return torch.rot90(y, -r, dims=(-2, -1)) if r else y


def dihedral_inverse(x: Tensor, k: int) -> Tensor:
    """Undo :func:`dihedral` ``k``.

    Parameters
    ----------
    x
        A tensor transformed by ``dihedral(x, k)``.
    k
        The symmetry to undo, 0-7.

    Returns
    -------
    torch.Tensor
        ``dihedral(x, k, inverse=True)``.
    """
    return dihedral(x, k, inverse=True)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _uniform(g: torch.Generator | None, n: int, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _bernoulli(g: torch.Generator | None, n: int, p: float) -> Tensor:
    return torch.rand(n, generator=g) < p


def _gray(x: Tensor) -> Tensor:
    """ITU-R 601 luma, (B, 1, H, W) -- the weights torchvision's Grayscale uses."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """``factor * a + (1 - factor) * b`` with a per-sample factor, clamped to [0, 1]."""
    f = factor.to(a.device, a.dtype).view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp(0, 1)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], dim=1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x[:, 0], x[:, 1], x[:, 2]
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for idx, (rr, gg, bb) in enumerate(table):
        m = i == idx
        out[:, 0] = torch.where(m, rr, out[:, 0])
        out[:, 1] = torch.where(m, gg, out[:, 1])
        out[:, 2] = torch.where(m, bb, out[:, 2])
    return out


def _rotate(x: Tensor, degrees: Tensor, fill: float) -> Tensor:
    """Rotate each sample counter-clockwise by ``degrees`` about its centre (bilinear), filling with ``fill``."""
    theta_rad = degrees.to(x.device, x.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(theta_rad), torch.sin(theta_rad)
    B, _, H, W = x.shape
    # affine_grid works in normalised coords; correct for non-square aspect.
    a = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    a[:, 0, 0] = cos
    a[:, 0, 1] = -sin * H / W
    a[:, 1, 0] = sin * W / H
    a[:, 1, 1] = cos
    grid = F.affine_grid(a, list(x.shape), align_corners=False)
    # sample (x - fill) with zero padding, add fill back: outside -> fill
    return (F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill).clamp(0, 1)


# ----------------------------------------------------------------------------
# Operations. Each: op(x, g) -> x, per-sample random parameters.
# ----------------------------------------------------------------------------


class Op:
    """Base of the augmentation operations: ``op(x, generator) -> x``."""

    name = "op"

    def __call__(self, x: Tensor, g: torch.Generator | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class Flip(Op):
    """Mirror left-right with probability ``h`` and up-down with probability ``v``.

    Parameters
    ----------
    h
        Probability of a left-right mirror.
    v
        Probability of an up-down mirror.
    """

    name = "flip"

    def __init__(self, h: float = 0.5, v: float = 0.5) -> None:
        self.h, self.v = h, v

    def __call__(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        B = x.shape[0]
        mh = _bernoulli(g, B, self.h).to(x.device).view(-1, 1, 1, 1)
        mv = _bernoulli(g, B, self.v).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(mh, x.flip(-1), x)
        return torch.where(mv, x.flip(-2), x)


class Rot90(Op):
    """Rotate by a multiple of 90 degrees.

    ``mode="any"``: a uniform choice of 0, 90, 180 or 270 degrees (BLEEP);
    ``mode="apply"``: a single 90-degree turn with probability ``p`` (ST-Net's
    ``RandomApply([RandomRotation((90, 90))])``).

    Parameters
    ----------
    mode
        ``"any"`` or ``"apply"``.
    p
        Probability of the turn in ``"apply"`` mode.
    """

    name = "rot90"

    def __init__(self, mode: str = "any", p: float = 0.5) -> None:
        if mode not in ("any", "apply"):
            raise ValueError(f"Rot90 mode must be 'any' or 'apply', got {mode!r}")
        self.mode, self.p = mode, p

    def __call__(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        B, _, H, W = x.shape
        if self.mode == "any":
            ks = torch.randint(0, 4, (B,), generator=g)
        else:
            ks = _bernoulli(g, B, self.p).long()
        if H != W and bool((ks % 2 == 1).any()):
            raise ValueError(f"90-degree rotations need square patches, got {H}x{W}")
        out = x.clone()
        for k in (1, 2, 3):
            idx = torch.nonzero(ks == k).flatten().to(x.device)
            if idx.numel():
                out[idx] = torch.rot90(x[idx], k, dims=(-2, -1))
        return out


class Rotate(Op):
    """Rotate by an angle drawn from U(-degrees, degrees); corners filled with ``fill``.

    Parameters
    ----------
    degrees
        Largest rotation, either way.
    fill
        Value of the corners the rotation uncovers (1.0: white).
    p
        Probability of rotating a sample.
    """

    name = "rotate"

    def __init__(self, degrees: float = 180.0, fill: float = 1.0, p: float = 1.0) -> None:
        self.degrees, self.fill, self.p = degrees, fill, p

    def __call__(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        B = x.shape[0]
        ang = _uniform(g, B, -self.degrees, self.degrees) * _bernoulli(g, B, self.p)
        return _rotate(x, ang, self.fill)


class ColorJitter(Op):
    """torchvision-style colour jitter, per sample, the four adjustments in a random order.

    Factors are drawn from ``U(max(0, 1 - b), 1 + b)`` (brightness, contrast,
    saturation) and the hue shift from ``U(-hue, hue)`` (fraction of the circle).

    Parameters
    ----------
    brightness, contrast, saturation
        Largest relative change of each.
    hue
        Largest hue shift, as a fraction of the colour circle (0 = none).
    """

    name = "color_jitter"

    def __init__(self, brightness: float = 0.5, contrast: float = 0.5, saturation: float = 0.5, hue: float = 0.0) -> None:
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        B = x.shape[0]
        steps: list[Callable[[Tensor], Tensor]] = []
        if self.brightness:
            fb = _uniform(g, B, max(0.0, 1 - self.brightness), 1 + self.brightness)
            steps.append(lambda t, f=fb: _blend(t, torch.zeros_like(t), f))
        if self.contrast:
            fc = _uniform(g, B, max(0.0, 1 - self.contrast), 1 + self.contrast)
            steps.append(lambda t, f=fc: _blend(t, _gray(t).mean(dim=(-3, -2, -1), keepdim=True).expand_as(t), f))
        if self.saturation:
            fs = _uniform(g, B, max(0.0, 1 - self.saturation), 1 + self.saturation)
            steps.append(lambda t, f=fs: _blend(t, _gray(t).expand_as(t), f))
        if self.hue:
            fh = _uniform(g, B, -self.hue, self.hue).to(x.device, x.dtype)

            def hue_shift(t: Tensor, f: Tensor = fh) -> Tensor:
                hsv = _rgb_to_hsv(t)
                hsv[:, 0] = (hsv[:, 0] + f.view(-1, 1, 1)) % 1.0
                return _hsv_to_rgb(hsv)

            steps.append(hue_shift)
        for i in torch.randperm(len(steps), generator=g).tolist():
            x = steps[i](x)
        return x.clamp(0, 1)


class Contrast(ColorJitter):
    """Contrast only: factor from ``U(1 - c, 1 + c)``."""

    name = "contrast"

    def __init__(self, contrast: float = 0.3) -> None:
        super().__init__(brightness=0.0, contrast=contrast, saturation=0.0, hue=0.0)


#: Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) in OD space.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


class HEDJitter(Op):
    """Stain augmentation in HED space (Tellez et al. 2018): ``s' = a s + b`` per stain channel.

    ``a ~ U(1 - sigma, 1 + sigma)``, ``b ~ U(-bias, bias)`` per sample and channel,
    after colour deconvolution with Ruifrok's matrix.

    Parameters
    ----------
    sigma
        Half-width of the multiplicative factor's range.
    bias
        Half-width of the additive shift's range.
    """

    name = "hed_jitter"

    def __init__(self, sigma: float = 0.05, bias: float = 0.05) -> None:
        self.sigma, self.bias = sigma, bias

    def __call__(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        B = x.shape[0]
        a = (1 + (2 * torch.rand(B, 3, generator=g) - 1) * self.sigma).to(x.device, x.dtype)
        b = ((2 * torch.rand(B, 3, generator=g) - 1) * self.bias).to(x.device, x.dtype)
        od = -torch.log(x.clamp_min(1e-6))  # (B, 3, H, W)
        hed_from = HED_FROM_RGB.to(x.device, x.dtype)
        rgb_from = RGB_FROM_HED.to(x.device, x.dtype)
        hed = torch.einsum("bchw,cd->bdhw", od, hed_from)
        hed = hed * a.view(B, 3, 1, 1) + b.view(B, 3, 1, 1)
        od2 = torch.einsum("bdhw,dc->bchw", hed, rgb_from)
        return torch.exp(-od2).clamp(0, 1)


class Grayscale(Op):
    """Replace by the luma (replicated to 3 channels) with probability ``p``."""

    name = "grayscale"

    def __init__(self, p: float = 0.1) -> None:
        self.p = p

    def __call__(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        m = _bernoulli(g, x.shape[0], self.p).to(x.device).view(-1, 1, 1, 1)
        return torch.where(m, _gray(x).expand_as(x), x)


class GaussianBlur(Op):
    """Gaussian blur with sigma from ``U(*sigma)`` (pixels), applied with probability ``p``.

    Parameters
    ----------
    sigma
        ``(low, high)`` of the blur's standard deviation in pixels.
    p
        Probability of blurring a sample.
    """

    name = "blur"

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0), p: float = 1.0) -> None:
        self.sigma, self.p = tuple(sigma), p

    def __call__(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        B, C, H, W = x.shape
        sig = _uniform(g, B, *self.sigma)
        apply = _bernoulli(g, B, self.p)
        radius = max(1, int(math.ceil(3 * max(self.sigma))))
        radius = min(radius, (min(H, W) - 1) // 2) or 1
        t = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (t[None] / sig[:, None].double().clamp_min(1e-3)) ** 2)
        k = (k / k.sum(dim=1, keepdim=True)).to(x.device, x.dtype)  # (B, K)
        kk = k.repeat_interleave(C, dim=0)  # (B*C, K)
        y = x.reshape(1, B * C, H, W)
        y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, kk.view(B * C, 1, 1, -1), groups=B * C)
        y = F.conv2d(y, kk.view(B * C, 1, -1, 1), groups=B * C)
        y = y.view(B, C, H, W)
        return torch.where(apply.to(x.device).view(-1, 1, 1, 1), y, x).clamp(0, 1)


class GaussianNoise(Op):
    """Add N(0, std^2) noise, std from ``U(*std)``, with probability ``p``.

    Parameters
    ----------
    std
        ``(low, high)`` of the noise level, in intensity units of [0, 1].
    p
        Probability of adding noise to a sample.
    """

    name = "noise"

    def __init__(self, std: Sequence[float] = (0.01, 0.05), p: float = 1.0) -> None:
        self.std, self.p = tuple(std), p

    def __call__(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        B = x.shape[0]
        s = (_uniform(g, B, *self.std) * _bernoulli(g, B, self.p)).to(x.device, x.dtype).view(-1, 1, 1, 1)
        noise = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
        return (x + s * noise).clamp(0, 1)


class RandomResizedCrop(Op):
    """Crop a random square of ``U(*scale)`` of the side and resize it back (zoom in), probability ``p``.

    Parameters
    ----------
    scale
        ``(low, high)`` of the crop side as a fraction of the image side.
    p
        Probability of cropping a sample.
    """

    name = "crop"

    def __init__(self, scale: Sequence[float] = (0.8, 1.0), p: float = 1.0) -> None:
        self.scale, self.p = tuple(scale), p

    def __call__(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        B = x.shape[0]
        s = _uniform(g, B, *self.scale)
        s = torch.where(_bernoulli(g, B, self.p), s, torch.ones_like(s))
        # centre offset in normalised coords: |c| <= 1 - s keeps the crop inside
        cx = (2 * torch.rand(B, generator=g) - 1) * (1 - s)
        cy = (2 * torch.rand(B, generator=g) - 1) * (1 - s)
        a = torch.zeros(B, 2, 3, dtype=x.dtype)
        a[:, 0, 0], a[:, 1, 1] = s, s
        a[:, 0, 2], a[:, 1, 2] = cx, cy
        grid = F.affine_grid(a.to(x.device), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp(0, 1)


class GridDistortion(Op):
    """Smooth random warp: a coarse random displacement field (``magnitude`` of the side) upsampled bicubically.

    Parameters
    ----------
    magnitude
        Largest displacement as a fraction of the image side.
    cells
        Side of the coarse displacement grid.
    p
        Probability of warping a sample.
    """

    name = "distort"

    def __init__(self, magnitude: float = 0.03, cells: int = 4, p: float = 1.0) -> None:
        self.magnitude, self.cells, self.p = magnitude, cells, p

    def __call__(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        B, _, H, W = x.shape
        d = (2 * torch.rand(B, 2, self.cells + 1, self.cells + 1, generator=g) - 1) * (2 * self.magnitude)
        d = d * _bernoulli(g, B, self.p).view(-1, 1, 1, 1)
        d = F.interpolate(d.to(x.device, x.dtype), size=(H, W), mode="bicubic", align_corners=True)
        eye = torch.eye(2, 3, dtype=x.dtype, device=x.device).expand(B, 2, 3)
        grid = F.affine_grid(eye, list(x.shape), align_corners=False) + d.permute(0, 2, 3, 1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False).clamp(0, 1)


class RGBShift(Op):
    """Add a per-channel offset from ``U(-shift, shift)`` (colour shift), probability ``p``.

    Parameters
    ----------
    shift
        Largest offset per channel, in intensity units of [0, 1].
    p
        Probability of shifting a sample.
    """

    name = "rgb_shift"

    def __init__(self, shift: float = 0.08, p: float = 1.0) -> None:
        self.shift, self.p = shift, p

    def __call__(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        B = x.shape[0]
        s = (2 * torch.rand(B, 3, generator=g) - 1) * self.shift * _bernoulli(g, B, self.p).view(-1, 1)
        return (x + s.to(x.device, x.dtype).view(B, 3, 1, 1)).clamp(0, 1)


class OneOf(Op):
    """Apply exactly one of ``ops`` to each sample (uniform choice, per sample)."""

    name = "one_of"

    def __init__(self, ops: Sequence[Op]) -> None:
        if not ops:
            raise ValueError("OneOf needs at least one operation")
        self.ops = list(ops)

    def __call__(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        choice = torch.randint(0, len(self.ops), (x.shape[0],), generator=g)
        out = x.clone()
        for j, op in enumerate(self.ops):
            idx = torch.nonzero(choice == j).flatten()
            if idx.numel():
                out[idx.to(x.device)] = op(x[idx.to(x.device)], g)
        return out


class _Maybe(Op):
    """Apply ``op`` to each sample with probability ``p``."""

    name = "maybe"

    def __init__(self, op: Op, p: float) -> None:
        self.op, self.p = op, p

    def __call__(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        m = _bernoulli(g, x.shape[0], self.p)
        idx = torch.nonzero(m).flatten().to(x.device)
        out = x.clone()
        if idx.numel():
            out[idx] = self.op(x[idx], g)
        return out


OPS: dict[str, type[Op]] = {
    cls.name: cls
    for cls in (Flip, Rot90, Rotate, ColorJitter, Contrast, HEDJitter, Grayscale, GaussianBlur, GaussianNoise,
                RandomResizedCrop, GridDistortion, RGBShift)
}


def _stimage_ops() -> list[Op]:
    return [
        Flip(h=0.5, v=0.5),
        RandomResizedCrop(scale=(0.8, 1.0)),
        GaussianNoise(std=(0.01, 0.05)),
        GaussianBlur(sigma=(0.5, 1.5)),
        GridDistortion(magnitude=0.03),
        Contrast(0.3),
        RGBShift(0.08),
    ]


PRESETS: dict[str, Callable[[], list[Op]]] = {
    "none": lambda: [],
    "stnet": lambda: [Flip(h=0.5, v=0.5), Rot90(mode="apply", p=0.5)],
    "histogene": lambda: [ColorJitter(0.5, 0.5, 0.5, 0.0), Flip(h=0.5, v=0.0), Rotate(180.0)],
    "hist2st": lambda: [Grayscale(0.1), Rotate(90.0), Flip(h=0.2, v=0.0)],
    "stimage": lambda: [OneOf(_stimage_ops())],
    "deepspace": lambda: [
        Flip(h=0.5, v=0.5),
        RandomResizedCrop(scale=(0.8, 1.0), p=0.5),
        GaussianNoise(std=(0.01, 0.05), p=0.5),
        GaussianBlur(sigma=(0.5, 1.5), p=0.5),
        GridDistortion(magnitude=0.03, p=0.5),
        _Maybe(Contrast(0.3), 0.5),
        RGBShift(0.08, p=0.5),
    ],
    "bleep": lambda: [Flip(h=0.5, v=0.5), Rot90(mode="any")],
    # M2OST (Dootmaan/M2OST dataset/HBCDataset.py:29-35): flips, then a rotation by any angle, white fill.
    "m2ost": lambda: [Flip(h=0.5, v=0.5), Rotate(180.0)],
}


#: Operations that only move pixels, so any number of stacked RGB images can share them.
_GEOMETRIC: tuple[type, ...] = (Flip, Rot90, Rotate)


class Augment:
    """A composed augmentation: ``aug(x)`` applies its operations in order.

    Create with :func:`make_augment`.

    Parameters
    ----------
    ops
        The operations, applied in order.
    name
        Preset name, or ``"custom"``.
    seed
        Seed of the augmentation's own random generator (None: torch's global RNG).
    """

    def __init__(self, ops: Sequence[Op], name: str = "custom", seed: int | None = None) -> None:
        self.ops = list(ops)
        self.name = name
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, x: Tensor) -> Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"augmentations take a torch tensor (B, 3, H, W) in [0, 1], got {type(x).__name__}")
        single = x.dim() == 3
        if single:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] % 3 or x.shape[1] == 0:
            raise ValueError(f"expected a (B, 3, H, W) or (3, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            # Several RGB images of one sample stacked on the channel axis (M2OST's levels): geometric
            # operations move them together; colour operations are defined on one RGB image.
            colour = [type(op).__name__ for op in self.ops if not isinstance(op, _GEOMETRIC)]
            if colour:
                raise ValueError(f"colour operations {colour} need (B, 3, H, W) images, got {x.shape[1]} channels")
        if not x.is_floating_point():
            raise TypeError(f"expected a float tensor in [0, 1], got {x.dtype} (divide uint8 images by 255)")
        with torch.no_grad():
            for op in self.ops:
                x = op(x, self.generator)
        return x[0] if single else x

    def __repr__(self) -> str:
        return f"Augment({self.name!r}, ops={self.ops!r})"


def make_augment(preset_or_list: str | Sequence[Any] | None = "none", seed: int | None = None) -> Augment:
    """Build an augmentation callable ``aug(x: float (B, 3, H, W) in [0, 1]) -> same``.

    Parameters
    ----------
    preset_or_list
        A preset name (``none``, ``stnet``, ``histogene``, ``hist2st``, ``stimage``,
        ``deepspace``, ``bleep``; see the module docstring) or a list whose items
        are operation names (``flip``, ``rot90``, ``rotate``, ``color_jitter``,
        ``contrast``, ``hed_jitter``, ``grayscale``, ``blur``, ``noise``, ``crop``,
        ``distort``, ``rgb_shift``), ``(name, {params})`` pairs, or :class:`Op`
        instances. None means ``"none"``.
    seed
        Seed of a private generator (reproducible draws); None uses torch's global RNG.

    Returns
    -------
    Augment
        The callable; it draws new parameters for every batch.
    """
    if preset_or_list is None:
        preset_or_list = "none"
    if isinstance(preset_or_list, str):
        name = preset_or_list.lower()
        if name not in PRESETS:
            raise He2stInputError(
                f"unknown augmentation preset {preset_or_list!r}; choose one of {', '.join(PRESETS)} "
                f"or pass a list of operations ({', '.join(OPS)})"
            )
        return Augment(PRESETS[name](), name=name, seed=seed)
    ops: list[Op] = []
    for item in preset_or_list:
        if isinstance(item, Op):
            ops.append(item)
            continue
        params: dict[str, Any] = {}
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict):
            item, params = item
        if not isinstance(item, str) or item not in OPS:
            raise He2stInputError(f"unknown augmentation {item!r}; choose from {', '.join(OPS)}")
        try:
            ops.append(OPS[item](**params))
        except TypeError as exc:
            raise He2stInputError(f"bad parameters for augmentation {item!r}: {exc}") from exc
    return Augment(ops, name="custom", seed=seed)
