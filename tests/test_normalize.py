"""Target normalisation against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from he2st.data import make_slide
from he2st.pp import Normalizer, normalize
from he2st.errors import GenePanelError, He2stInputError, NotCountsError


def _slide(sid, X, genes=("G1", "G2", "G3"), counts=True):
    X = np.asarray(X, dtype=float)
    n = X.shape[0]
    xy = np.column_stack([np.arange(n) * 10.0 + 5, np.full(n, 5.0)])
    return make_slide(X, [f"s{i}" for i in range(n)], list(genes), xy, slide_id=sid, spot_diameter_px=5.0, counts=counts)


def test_cpm_log1p_by_hand_uses_all_genes_for_totals():
    s = _slide("A", [[1, 3, 6], [2, 0, 2]])
    # Panel G3, G1 only: totals still 10 and 4 (all genes).
    y = Normalizer("cpm_log1p").transform(s, ["G3", "G1"])
    expected = np.array([[math.log1p(6e5), math.log1p(1e5)], [math.log1p(5e5), math.log1p(5e5)]])
    assert y.dtype == np.float32 and y.shape == (2, 2)
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    np.testing.assert_allclose(Normalizer("log1p").transform(s, ["G2"]), [[math.log(4)], [0.0]], rtol=1e-6)
    np.testing.assert_array_equal(Normalizer("raw").transform(s, ["G2", "G1"]), [[3, 1], [0, 2]])


def test_zero_total_spot_gives_zeros_not_nan():
    s = _slide("Z", [[0, 0, 0], [1, 1, 2]])
    y = Normalizer().transform(s, ["G1", "G2", "G3"])
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[0], [0, 0, 0])
    np.testing.assert_allclose(y[1], np.log1p([2.5e5, 2.5e5, 5e5]), rtol=1e-6)


def test_minmax_fitted_on_train_and_inverted_exactly():
    a = _slide("A", [[1, 3, 6], [2, 0, 2]])
    b = _slide("B", [[0, 5, 5], [4, 1, 5]])
    test = _slide("T", [[9, 1, 0], [1, 1, 1]])
    genes = ["G1", "G2", "G3"]
    norm = Normalizer("minmax").fit([a, b], genes)
    base = Normalizer("cpm_log1p")
    train = np.vstack([base.transform(a, genes), base.transform(b, genes)]).astype(np.float64)
    lo, hi = train.min(axis=0), train.max(axis=0)
    np.testing.assert_allclose(norm.min_, lo, rtol=1e-6)
    np.testing.assert_allclose(norm.max_, hi, rtol=1e-6)

    y = norm.transform(test)  # genes default to the fitted ones
    np.testing.assert_allclose(y, (base.transform(test, genes) - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    assert y[0, 0] > 1.0 and y[0, 2] < 0.0  # test values are not clipped
    np.testing.assert_allclose(norm.inverse_transform(y), base.transform(test, genes), rtol=1e-6, atol=1e-6)
    # Training values span exactly [0, 1].
    ya = np.vstack([norm.transform(a), norm.transform(b)])
    np.testing.assert_allclose(ya.min(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(ya.max(axis=0), 1, atol=1e-6)

    # A reordered subset uses each gene's own min/max.
    np.testing.assert_allclose(norm.transform(test, ["G3", "G1"]), y[:, [2, 0]], rtol=1e-6)
    with pytest.raises(GenePanelError, match="not fitted on genes"):
        norm.transform(_slide("X", [[1, 2]], genes=("G1", "G9")), ["G9"])

    # State survives JSON and gives identical values.
    back = Normalizer.from_state(json.loads(json.dumps(norm.get_state())))
    np.testing.assert_array_equal(back.transform(test), y)
    np.testing.assert_array_equal(back.inverse_transform(y), norm.inverse_transform(y))


def test_minmax_constant_gene_is_still_invertible():
    a = _slide("A", [[0, 3, 6], [0, 1, 2]])  # G1 is zero everywhere: no range
    norm = Normalizer("minmax").fit([a], ["G1", "G2"])
    t = _slide("T", [[5, 5, 0]])
    y = norm.transform(t)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(norm.inverse_transform(y), Normalizer().transform(t, ["G1", "G2"]), rtol=1e-6)


def test_missing_gene_error_versus_zero_fill():
    s = _slide("S7", [[1, 3], [2, 2]], genes=("G1", "G2"))
    with pytest.raises(GenePanelError, match=r"slide 'S7': 1 of 3 panel genes are missing: \['G9'\]"):
        Normalizer().transform(s, ["G2", "G9", "G1"])
    y = Normalizer().transform(s, ["G2", "G9", "G1"], fill_missing=True)
    np.testing.assert_allclose(y, [[math.log1p(7.5e5), 0, math.log1p(2.5e5)], [math.log1p(5e5), 0, math.log1p(5e5)]], rtol=1e-6)
    with pytest.raises(GenePanelError, match="S7"):
        Normalizer("minmax").fit([s], ["G1", "G9"])


def test_non_count_slides():
    s = _slide("N", [[0.5, 1.25, 0.0]], counts=False)
    np.testing.assert_array_equal(Normalizer("raw").transform(s, ["G2", "G1"]), [[1.25, 0.5]])
    for method in ("cpm_log1p", "log1p", "minmax"):
        with pytest.raises(NotCountsError, match="slide 'N'"):
            Normalizer(method).fit([s], ["G1"]).transform(s, ["G1"])
    with pytest.raises(He2stInputError, match="unknown normalisation"):
        Normalizer("zscore")


def test_normalize_returns_new_anndata_on_the_panel():
    s = _slide("A", [[1, 3, 6], [2, 0, 2]])
    s.obs["label"] = ["x", "y"]
    out = normalize(s, "cpm_log1p", genes=["G3", "G1"])
    assert list(out.var_names) == ["G3", "G1"] and list(out.obs_names) == ["s0", "s1"]
    np.testing.assert_allclose(out.X, [[math.log1p(6e5), math.log1p(1e5)], [math.log1p(5e5), math.log1p(5e5)]], rtol=1e-6)
    assert out.uns["he2st"]["counts"] is False and out.uns["he2st"]["normalization"] == "cpm_log1p"
    assert s.uns["he2st"]["counts"] is True  # the input is untouched
    np.testing.assert_array_equal(out.obsm["spatial"], s.obsm["spatial"])
    assert list(out.obs["label"]) == ["x", "y"]
    # A fitted normalizer can be passed instead of a name.
    norm = Normalizer("minmax").fit([s], ["G1", "G2"])
    np.testing.assert_array_equal(normalize(s, norm).X, norm.transform(s))


def test_hist2st_lognorm_is_scprep_on_the_panel_and_not_cpm_log1p():
    s = _slide("A", [[1, 3, 6], [2, 0, 2]])
    # Panel G3, G1: panel totals 7 and 4 (not the all-gene 10 and 4), 1e4 scale, base 10.
    y = Normalizer("hist2st_lognorm").transform(s, ["G3", "G1"])
    expected = np.log10(1 + 1e4 * np.array([[6 / 7, 1 / 7], [2 / 4, 2 / 4]]))
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert not np.allclose(y, Normalizer("cpm_log1p").transform(s, ["G3", "G1"]))
    # ST-Net's --norm: ln((1 + count) / (n_genes + total)) with all genes of the slide.
    z = Normalizer("stnet_norm").transform(s, ["G3"])
    np.testing.assert_allclose(z, np.log([[7 / 13], [3 / 7]]), rtol=1e-6)


def test_convert_uses_training_constants_only_and_round_trips():
    train = [_slide("A", [[1, 3, 6], [2, 0, 2]]), _slide("B", [[5, 5, 0], [1, 1, 8]])]
    test = _slide("C", [[3, 1, 1], [0, 4, 9]])
    panel = ["G1", "G3"]
    common = Normalizer("cpm_log1p").fit(train, panel)
    for method in ("hist2st_lognorm", "stnet_norm", "log1p", "minmax"):
        own = Normalizer(method).fit(train, panel)
        y = own.transform(test, panel)
        mapped = own.convert(y, common)
        assert mapped.dtype == np.float32 and mapped.shape == y.shape and np.isfinite(mapped).all()
        # common -> own -> common is the identity up to float32 rounding (the same constants both ways).
        np.testing.assert_allclose(own.convert(common.convert(mapped, own), common), mapped, rtol=1e-3, atol=1e-2)
        # Per gene the map is monotone: the order of spots is kept.
        for g in range(len(panel)):
            assert (np.argsort(y[:, g], kind="stable") == np.argsort(mapped[:, g], kind="stable")).all() or np.ptp(y[:, g]) == 0
    lognorm = Normalizer("hist2st_lognorm").fit(train, panel)
    # Panel share of each training spot: 7/10, 4/4, 5/10, 9/10; the constant is their geometric mean.
    share = math.exp(np.mean(np.log([0.7, 1.0, 0.5, 0.9])))
    assert lognorm.panel_fraction_ == pytest.approx(share)
    y = lognorm.transform(test, panel)
    expected = np.log1p(1e6 * (10.0 ** y.astype(np.float64) - 1) / 1e4 * share)
    np.testing.assert_allclose(lognorm.convert(y, common), expected, rtol=1e-5)
    # The map does not change with the test slide: the same values convert identically anywhere.
    state = Normalizer.from_state(json.loads(json.dumps(lognorm.get_state())))
    np.testing.assert_array_equal(state.convert(y, common), lognorm.convert(y, common))
    np.testing.assert_array_equal(common.convert(y, common), y)


def test_stnet_norm_convert_keeps_a_mean_prediction_of_a_sparse_gene_above_the_floor():
    # Regression: with n_genes + geometric-mean library as the denominator, a model that
    # predicts the training mean of ST-Net's target for a mostly-zero gene was mapped below
    # zero and clipped, so every spot got the same value (PCC(ACG) 0.026 on her2st).
    train = [_slide("A", [[0, 30, 70], [1, 10, 89]]), _slide("B", [[0, 200, 300], [0, 5, 15]])]
    panel = ["G1", "G2", "G3"]
    own = Normalizer("stnet_norm").fit(train, panel)
    common = Normalizer("cpm_log1p").fit(train, panel)
    # Geometric mean over the four spots of n_genes (3) + total.
    assert own.stnet_denominator_ == pytest.approx(math.exp(np.mean(np.log([103.0, 103.0, 503.0, 23.0]))))
    y = np.concatenate([own.transform(s, panel) for s in train])
    mean_pred = y.mean(axis=0, keepdims=True)
    # e**mean(y) * denominator = e**mean(log(1 + x)) >= 1: a share >= 0 before clipping.
    share = own.to_fraction(mean_pred)
    expected_counts = np.exp(np.log1p(np.array([[0, 1, 0, 0], [30, 10, 200, 5], [70, 89, 300, 15]])).mean(axis=1)) - 1
    np.testing.assert_allclose(share[0] * own.library_, expected_counts, rtol=1e-5)  # float32 targets
    assert share[0, 0] > 0
    # Predictions a little above and below that mean keep their order after conversion.
    mapped = own.convert(mean_pred + np.array([[-0.05], [0.0], [0.05]]), common)
    assert (np.diff(mapped[:, 0]) > 0).all()
