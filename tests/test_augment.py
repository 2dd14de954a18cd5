"""he2st.image.augment: presets, operations, dihedral TTA."""

from __future__ import annotations

import pytest
import torch

from he2st.errors import He2stInputError
from he2st.image.augment import (
    PRESETS,
    ColorJitter,
    Flip,
    GaussianBlur,
    HEDJitter,
    Rotate,
    _hsv_to_rgb,
    _rgb_to_hsv,
    _rotate,
    dihedral,
    dihedral_inverse,
    make_augment,
)


def _asym(s: int = 6) -> torch.Tensor:
    """A (1, 3, s, s) image with no symmetry: every pixel distinct."""
    return (torch.arange(3 * s * s, dtype=torch.float32).reshape(1, 3, s, s) / (3 * s * s))


def test_dihedral_eight_distinct_and_invertible() -> None:
    x = _asym()
    outs = [dihedral(x, k) for k in range(8)]
    flat = {tuple(o.flatten().tolist()) for o in outs}
    assert len(flat) == 8  # 8 distinct symmetries
    assert torch.equal(outs[0], x)
    assert torch.equal(outs[1], torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(outs[4], x.flip(-1))
    for k in range(8):
        assert torch.equal(dihedral(outs[k], k, inverse=True), x)
        assert torch.equal(dihedral_inverse(outs[k], k), x)
    # the corner pixel travels to each of the 4 corners, twice (rotations and reflections)
    corners = [(o[0, 0, 0, 0].item()) for o in outs]
    assert corners.count(x[0, 0, 0, 0].item()) == 2
    with pytest.raises(ValueError, match="0..7"):
        dihedral(x, 8)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_keep_shape_range_dtype(preset: str) -> None:
    x = torch.rand(6, 3, 32, 32)
    aug = make_augment(preset, seed=0)
    y = aug(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    single = aug(x[0])
    assert single.shape == (3, 32, 32)
    # seeded: the same draws again
    assert torch.equal(make_augment(preset, seed=3)(x), make_augment(preset, seed=3)(x))
    if preset == "none":
        assert torch.equal(y, x)
    else:
        assert not torch.equal(make_augment(preset, seed=1)(x), x)


def test_geometric_presets_only_permute_pixels() -> None:
    """stnet and bleep use flips and quarter turns: each output is one of the 8 dihedral images."""
    x = torch.rand(16, 3, 8, 8)
    for preset in ("stnet", "bleep"):
        y = make_augment(preset, seed=0)(x)
        for i in range(16):
            assert any(torch.equal(y[i], dihedral(x[i], k)) for k in range(8))


def test_operations_by_hand() -> None:
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(Flip(h=1.0, v=0.0)(x, None), x.flip(-1))
    assert torch.equal(Flip(h=0.0, v=1.0)(x, None), x.flip(-2))
    gray = make_augment([("grayscale", {"p": 1.0})])(x)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(gray[:, c], luma)
    # a 90-degree arbitrary-angle rotation equals rot90 (bilinear on exact grid points)
    r = Rotate(degrees=90.0)
    torch.testing.assert_close(_rotate(x, torch.full((4,), 90.0), 1.0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    assert r(x, None).shape == x.shape
    # rotation by 45 degrees fills the corners with white
    y = _rotate(torch.zeros(1, 3, 32, 32), torch.tensor([45.0]), 1.0)
    assert torch.all(y[..., 0, 0] == 1.0) and torch.all(y[..., 16, 16] == 0.0)
    # HED jitter with zero strength is the identity; blur keeps a flat image flat
    torch.testing.assert_close(HEDJitter(0.0, 0.0)(x.clamp_min(0.01), None), x.clamp_min(0.01), atol=1e-5, rtol=0)
    flat = torch.full((2, 3, 16, 16), 0.6)
    torch.testing.assert_close(GaussianBlur((1.0, 2.0))(flat, None), flat)
    # brightness-only jitter scales all channels by one factor per sample
    g = torch.Generator().manual_seed(0)
    y = ColorJitter(brightness=0.5, contrast=0, saturation=0, hue=0)(x * 0.5, g)
    ratio = y / (x * 0.5)
    assert torch.allclose(ratio.flatten(1).min(1).values, ratio.flatten(1).max(1).values, atol=1e-4)
    # HSV round trip is exact; red (hue 0) shifted by half a turn is cyan
    torch.testing.assert_close(_hsv_to_rgb(_rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    red = torch.zeros(1, 3, 1, 1)
    red[:, 0] = 1.0
    hsv = _rgb_to_hsv(red)
    torch.testing.assert_close(hsv.flatten(), torch.tensor([0.0, 1.0, 1.0]))
    hsv[:, 0] = (hsv[:, 0] + 0.5) % 1.0
    torch.testing.assert_close(_hsv_to_rgb(hsv).flatten(), torch.tensor([0.0, 1.0, 1.0]))


def test_hed_jitter_changes_stain_not_glass() -> None:
    x = torch.ones(3, 3, 8, 8)  # white glass: zero optical density
    x[:, :, :4] = torch.tensor([0.55, 0.35, 0.65]).view(1, 3, 1, 1)  # purple tissue
    y = HEDJitter(sigma=0.2, bias=0.0)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(y[:, :, 4:], x[:, :, 4:])  # glass untouched (scaling zero OD)
    assert (y[:, :, :4] - x[:, :, :4]).abs().max() > 0.01


def test_custom_lists_and_errors() -> None:
    aug = make_augment(["flip", ("rotate", {"degrees": 10.0}), ("blur", {"sigma": (0.5, 1.0), "p": 0.5})], seed=0)
    assert aug.name == "custom" and len(aug.ops) == 3
    assert aug(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)
    with pytest.raises(He2stInputError, match="unknown augmentation preset"):
        make_augment("randaugment")
    with pytest.raises(He2stInputError, match="unknown augmentation"):
        make_augment(["sharpen"])
    with pytest.raises(He2stInputError, match="bad parameters"):
        make_augment([("flip", {"q": 1})])
    with pytest.raises(TypeError, match="float"):
        make_augment("stnet")(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="square"):
        make_augment([("rot90", {"mode": "any"})], seed=0)(torch.rand(8, 3, 8, 12))
