"""The pixel scale of the pixel-input slide methods (HisToGene, Hist2ST, THItoGene)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from he2st.errors import He2stInputError
from he2st.methods import create_method

# The smallest networks of each method's tests (two epochs: only the input scale is under test).
SMALL = {
    "histogene": {"patch_px": 32, "dim": 32, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32, "epochs": 2},
    "hist2st": {"patch_px": 32, "channel": 8, "dim": 32, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32,
                "distill_views": 0, "epochs": 2, "lr": 1e-3},
    "thitogene": {"patch_px": 32, "caps": 4, "route_dim": 8, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32,
                  "gat_heads": 2, "gat_hidden": 16, "gat_out": 16, "head_hidden": 16, "epochs": 2, "lr": 1e-3},
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_pixel_scale_option(name, cohort) -> None:
    m = create_method(name, **SMALL[name])
    x = torch.full((2, 4, 4, 3), 51, dtype=torch.uint8)
    unit = m._pixels(x, train=False)
    assert unit.shape == (2, 3, 4, 4)
    m.params["pixel_scale"] = "uint8"
    np.testing.assert_allclose(m._pixels(x, train=False).numpy(), 51.0)
    m.params["pixel_scale"] = "unit"
    np.testing.assert_allclose(m._pixels(x, train=False).numpy(), 0.2, rtol=1e-6)
    with pytest.raises(He2stInputError, match="pixel_scale must be one of"):
        create_method(name, pixel_scale="float")


def test_defaults_follow_the_fidelity_table() -> None:
    # HisToGene feeds the originals' 0-255 values; Hist2ST and THItoGene keep [0, 1], one parameter away.
    assert create_method("histogene").params["pixel_scale"] == "uint8"
    assert create_method("hist2st").params["pixel_scale"] == "unit"
    assert create_method("thitogene").params["pixel_scale"] == "unit"


@pytest.mark.parametrize("name", ["hist2st", "thitogene"])
def test_the_scale_reaches_the_network(name, cohort, genes) -> None:
    a = create_method(name, **SMALL[name]).fit(cohort[:2], genes)
    b = create_method(name, **SMALL[name], pixel_scale="uint8").fit(cohort[:2], genes)
    pa, pb = a.predict(cohort[2]), b.predict(cohort[2])
    assert np.isfinite(pb).all() and not np.allclose(pa, pb)
