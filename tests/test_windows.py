"""Windowed training and blended prediction (he2st.methods.nn.windows and the slide-level base)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from he2st.errors import He2stInputError
from he2st.methods.nn.windows import (
    blend,
    prediction_windows,
    training_windows,
    use_windows,
)


@pytest.fixture()
def coords() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1000, size=(500, 2))


def test_training_windows_partition_the_slide(coords) -> None:
    wins = training_windows(coords, 300.0)
    allidx = np.concatenate(wins)
    assert len(allidx) == len(coords)
    assert np.array_equal(np.sort(allidx), np.arange(len(coords)))  # every spot exactly once
    for w in wins:
        span = coords[w].max(axis=0) - coords[w].min(axis=0)
        assert (span < 300.0).all()
    # 1000 px of spots in 300 px windows: 4 columns x 4 rows of windows.
    assert len(wins) == 16


def test_prediction_windows_cover_every_spot_with_weights_summing_to_one(coords) -> None:
    wins = prediction_windows(coords, 300.0, overlap=0.5)
    total = np.zeros(len(coords))
    count = np.zeros(len(coords), dtype=int)
    for w in wins:
        np.add.at(total, w.index, w.weight)
        np.add.at(count, w.index, 1)
        assert (w.weight > 0).all()
    np.testing.assert_allclose(total, 1.0, rtol=1e-12)
    assert count.min() >= 1 and count.max() > 1  # overlapping
    # Blending a per-spot quantity that every window predicts exactly returns it.
    truth = coords[:, :1] * 2.0 + 1.0
    out = blend(len(coords), wins, [truth[w.index] for w in wins])
    np.testing.assert_allclose(out, truth, rtol=1e-5)


def test_blending_weights_by_hand() -> None:
    # Spots on a line; window 100 px, overlap 0.5 -> windows start at 0, 50, 100.
    pts = np.array([[0.0, 0.0], [25.0, 0.0], [50.0, 0.0], [75.0, 0.0], [150.0, 0.0]])
    wins = prediction_windows(pts, 100.0, overlap=0.5)
    assert [w.origin for w in wins] == [(0.0, 0.0), (50.0, 0.0), (100.0, 0.0)]
    weights = {}
    for k, w in enumerate(wins):
        for i, wt in zip(w.index, w.weight):
            weights[(int(i), k)] = wt
    # Spot at x=25: taper 0.5 in window 0 (t=0.25) and ~0 in none other -> all weight to window 0.
    assert weights[(1, 0)] == pytest.approx(1.0)
    # Spot at x=75: taper 0.5 in window 0 (t=0.75) and 0.5 in window 1 (t=0.25) -> 1/2 each.
    assert weights[(3, 0)] == pytest.approx(0.5) and weights[(3, 1)] == pytest.approx(0.5)
    # Spot at x=50: the centre of window 0 (taper 1) and the left border of window 1
    # (taper 0, floored at 1e-3).
    assert weights[(2, 0)] == pytest.approx(1.0 / (1.0 + 1e-3))
    assert weights[(2, 1)] == pytest.approx(1e-3 / (1.0 + 1e-3))
    # Spot at x=150 sits on window 1's far edge (excluded) and window 2's centre.
    assert weights[(4, 2)] == pytest.approx(1.0)
    # Predictions 10 (window 0) and 20 (window 1) blend to 15 for the spot at x=75.
    preds = [np.full((len(w.index), 1), 10.0 * (k + 1)) for k, w in enumerate(wins)]
    assert blend(len(pts), wins, preds)[3, 0] == pytest.approx(15.0)


def test_small_slide_is_one_window_and_thresholds() -> None:
    pts = np.array([[10.0, 10.0], [20.0, 30.0], [40.0, 5.0]])
    wins = prediction_windows(pts, 4000.0)
    assert len(wins) == 1 and wins[0].index.tolist() == [0, 1, 2]
    np.testing.assert_allclose(wins[0].weight, 1.0)
    assert training_windows(pts, 4000.0)[0].tolist() == [0, 1, 2]
    assert not use_windows(700, 4000.0, 1000) and use_windows(1500, 4000.0, 1000)
    assert not use_windows(5000, None, 0)
    with pytest.raises(He2stInputError):
        training_windows(pts, 0.0)
    with pytest.raises(He2stInputError):
        prediction_windows(pts, 100.0, overlap=1.0)
    with pytest.raises(ValueError):
        blend(3, wins, [])


def test_spot_on_the_last_edge_is_covered() -> None:
    # Span exactly a multiple of the stride: the far spot must still fall inside a window.
    pts = np.array([[0.0, 0.0], [200.0, 0.0]])
    for overlap in (0.0, 0.5):
        wins = prediction_windows(pts, 100.0, overlap=overlap)
        covered = np.zeros(2)
        for w in wins:
            np.add.at(covered, w.index, w.weight)
        np.testing.assert_allclose(covered, 1.0)
    assert sorted(np.concatenate(training_windows(pts, 100.0)).tolist()) == [0, 1]


def test_windowed_method_predicts_blend_of_window_predictions(tmp_path) -> None:
    """A slide-level method in windowed mode: trains on windows, predicts the blend of its windows."""
    from he2st.datasets import synthetic
    from he2st.methods import create_method

    cohort = synthetic(n_slides=2, n_spots=60, n_genes=6, patch_px=16, seed=3, root=tmp_path)
    genes = list(map(str, cohort[0].var_names))
    params = {
        "patch_px": 16, "dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32, "epochs": 2,
        "lr": 1e-3, "augment": "none", "window_px": 60.0, "window_min_spots": 0, "window_overlap": 0.5,
    }
    m = create_method("histogene", **params).fit(cohort[:1], genes)
    data = m.slide_data(cohort[0], train=True)
    units = m._units(data)
    assert len(units) > 1 and sorted(np.concatenate(units).tolist()) == list(range(cohort[0].n_obs))
    pred = m.predict(cohort[1])
    data = m.slide_data(cohort[1])
    wins = prediction_windows(data.coords, 60.0, 0.5)
    with torch.no_grad():
        per = [m._forward(m.model_, m.make_batch(data, w.index)).numpy() for w in wins]
    # The blend is made on the training scale; predict() then maps it to the evaluation scale.
    np.testing.assert_allclose(pred, m.to_eval_scale(blend(data.n, wins, per)), rtol=1e-5, atol=1e-5)
    assert len(wins) > 1 and np.isfinite(pred).all()
