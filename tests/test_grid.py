"""Spot lattices over an image (he2st.image.grid): geometry worked by hand, tissue filtering, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from he2st.errors import He2stInputError, ImageError
from he2st.image import GridSpec, make_grid
from he2st.image.grid import lattice


def _half_tissue(w: int = 300, h: int = 300, tissue_until: int = 200, seed: int = 0) -> np.ndarray:
    """Pink noisy 'tissue' for x < tissue_until, near-white glass beyond."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float64)
    img[:] = (243, 242, 246)
    img[:, :tissue_until] = (205, 120, 165)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_square_lattice_3x3_by_hand() -> None:
    xy, rows, cols = lattice(300, 300, 100.0, "square")
    expected = [(x, y) for y in (50, 150, 250) for x in (50, 150, 250)]
    np.testing.assert_allclose(xy, expected)
    assert rows.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert cols.tolist() == [0, 1, 2] * 3


def test_hex_lattice_rows_and_offsets_by_hand() -> None:
    xy, rows, cols = lattice(300, 300, 100.0, "hex")
    dy = 100 * math.sqrt(3) / 2  # 86.60
    expected = [
        (50, 50), (150, 50), (250, 50),  # row 0
        (100, 50 + dy), (200, 50 + dy),  # row 1: shifted by half a pitch; (300, .) is outside
        (50, 50 + 2 * dy), (150, 50 + 2 * dy), (250, 50 + 2 * dy),  # row 2 (row 3 at y = 309.8 is outside)
    ]
    np.testing.assert_allclose(xy, expected)
    assert rows.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert cols.tolist() == [0, 2, 4, 1, 3, 0, 2, 4]  # Visium's doubled columns
    # every spot's nearest neighbours are exactly one pitch away
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(d.min(axis=1), 100.0)


def test_pitch_in_microns_uses_mpp() -> None:
    img = _half_tissue(tissue_until=300)
    g = make_grid(img, mpp=2.0, pitch_um=200.0, kind="square")  # 100 px pitch
    assert g.pitch_px == 100.0 and g.spot_diameter_px == pytest.approx(55.0)
    assert len(g) == 9 and g.ids[0] == "0x0" and g.ids[-1] == "2x2"
    fine = make_grid(img, mpp=2.0, pitch_um=50.0, kind="square")  # super-resolution: 4x finer
    assert fine.pitch_px == 25.0 and len(fine) == 144


def test_tissue_filter_drops_the_white_half(tmp_path) -> None:
    img = _half_tissue(tissue_until=200)
    g = make_grid(img, mpp=1.0, pitch_um=100.0, spot_diameter_um=55.0, kind="square")
    assert sorted(set(g.xy[:, 0].tolist())) == [50.0, 150.0]  # the x = 250 column lies on glass
    assert len(g) == 6 and (g.tissue_fraction >= 0.5).all()
    everything = make_grid(img, mpp=1.0, pitch_um=100.0, kind="square", tissue_only=False)
    assert len(everything) == 9 and everything.tissue_fraction is None
    # the same from a file (thumbnail of a LazyImage)
    path = tmp_path / "half.png"
    Image.fromarray(img).save(path)
    from_file = make_grid(path, mpp=1.0, pitch_um=100.0, kind="square")
    np.testing.assert_allclose(from_file.xy, g.xy)


def test_tissue_free_image_is_an_error(tmp_path) -> None:
    path = tmp_path / "glass.png"
    Image.fromarray(_half_tissue(tissue_until=0)).save(path)
    with pytest.raises(ImageError, match="glass.png.*no tissue"):
        make_grid(path, mpp=1.0, pitch_um=50.0)


def test_bad_grid_arguments() -> None:
    img = _half_tissue()
    with pytest.raises(He2stInputError, match="kind"):
        make_grid(img, mpp=1.0, pitch_um=100.0, kind="triangle")
    with pytest.raises(He2stInputError, match="pitch_um"):
        make_grid(img, mpp=1.0, pitch_um=-5)
    with pytest.raises(He2stInputError, match="mpp"):
        make_grid(img, mpp=0, pitch_um=100.0)
    with pytest.raises(He2stInputError, match="no spot inside"):
        make_grid(img, mpp=1.0, pitch_um=1000.0)


def test_grid_spec_coerce() -> None:
    assert GridSpec.coerce(100) == GridSpec(100.0, None, "hex")
    spec = GridSpec.coerce({"pitch_um": 100, "spot_diameter_um": 55, "kind": "square"})
    assert spec.kind == "square" and spec.diameter_um == 55
    assert GridSpec.coerce({"pitch_um": 50}).diameter_um == pytest.approx(27.5)
    with pytest.raises(He2stInputError, match="pitch_um"):
        GridSpec.coerce({"pitch": 100})
