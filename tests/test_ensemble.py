"""The generic ensemble wrapper (he2st.methods.ensemble)."""

from __future__ import annotations

import numpy as np
import pytest

from he2st.errors import He2stInputError
from he2st.methods import create_method, list_methods, load_method

STNET = dict(encoder="color_stats", weights=None, patch_px=32, tta=False, lr=1e-2, epochs=4)


def test_registered_and_validated() -> None:
    assert {"ensemble", "stnet", "deepspace", "stimage"} <= set(list_methods())
    with pytest.raises(He2stInputError, match="name the method"):
        create_method("ensemble")
    with pytest.raises(He2stInputError, match="unknown method"):
        create_method("ensemble", method="no_such_method")
    with pytest.raises(He2stInputError, match="set by the ensemble"):
        create_method("ensemble", method="stnet", params={"seed": 3})
    m = create_method("ensemble", method="stimage")
    assert m.capabilities.uncertainty and m.capabilities.finetune


def test_identical_members_have_zero_spread(cohort) -> None:
    genes = list(cohort[0].var_names)
    train, test = [cohort[0], cohort[1]], cohort[2]
    # A deterministic method: every member is the same model.
    ens = create_method("ensemble", method="mean", n_members=3).fit(train, genes)
    np.testing.assert_array_equal(ens.predict_uncertainty(test), 0.0)
    np.testing.assert_allclose(ens.predict(test), create_method("mean").fit(train, genes).predict(test), rtol=1e-6)
    # A seeded neural method trained three times with the same seed: identical too.
    ens = create_method("ensemble", method="stnet", n_members=3, vary_seed=False, params=STNET).fit(train, genes)
    np.testing.assert_array_equal(ens.predict_uncertainty(test), 0.0)


def test_mean_and_spread_of_members(cohort, tmp_path) -> None:
    genes = list(cohort[0].var_names)
    train, test = [cohort[0], cohort[1]], cohort[2]
    ens = create_method("ensemble", method="stnet", n_members=3, params={**STNET, "val_fraction": 0.3}).fit(train, genes)
    # Members are exactly stnet runs with seeds 0, 1, 2.
    singles = [create_method("stnet", **STNET, val_fraction=0.3, seed=i).fit(train, genes).predict(test) for i in range(3)]
    singles = np.stack(singles).astype(np.float64)
    pred, sd = ens.predict(test), ens.predict_uncertainty(test)
    np.testing.assert_allclose(pred, singles.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sd, singles.std(axis=0), rtol=1e-4, atol=1e-6)
    assert sd.max() > 0
    m2 = load_method(ens.save(tmp_path / "ens"))
    np.testing.assert_array_equal(m2.predict(test), pred)
    np.testing.assert_array_equal(m2.predict_uncertainty(test), sd)


def test_members_with_their_own_uncertainty(cohort) -> None:
    genes = list(cohort[0].var_names)
    train, test = [cohort[0], cohort[1]], cohort[2]
    params = dict(encoder="color_stats", weights=None, patch_px=32, stain=None, n_models=1, lr=3e-2, epochs=3)
    ens = create_method("ensemble", method="stimage", n_members=2, params=params).fit(train, genes)
    preds = np.stack([m.predict(test) for m in ens.members_]).astype(np.float64)
    own = np.stack([m.predict_uncertainty(test) for m in ens.members_]).astype(np.float64)
    expected = np.sqrt((own**2).mean(axis=0) + preds.var(axis=0))
    np.testing.assert_allclose(ens.predict_uncertainty(test), expected, rtol=1e-5)
