"""Context features (``context`` option): wider fields of view and neighbour means, for every frozen-feature method."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from he2st.data.slide import meta
from he2st.encoders import get_features
from he2st.errors import He2stInputError
from he2st.methods import create_method, load_method
from he2st.methods.base import ContextSpec, parse_context
from he2st.methods.nn.inputs import context_features, encoder_inputs, image_inputs, neighbour_mean

FEAT = {"encoder": "color_stats", "weights": None, "patch_px": 32}


@pytest.fixture(autouse=True)
def _module_feature_cache(syn_root):
    """One feature cache for the module: each view is encoded once."""


def _plain(slide, **kw):
    return np.asarray(get_features(slide, encoder="color_stats", weights=None, patch_px=32, **kw), dtype=np.float32)


def test_width_fov1_identity_and_wider_view(cohort) -> None:
    s = cohort[0]
    plain = _plain(s)
    dim = plain.shape[1]
    x = encoder_inputs(s, "color_stats", None, 32, context={"fov": [1, 3, 5], "neighbours": 6})
    assert x.shape == (s.n_obs, 4 * dim)
    assert encoder_inputs(s, "color_stats", None, 32, context={"fov": [1, 3]}).shape == (s.n_obs, 2 * dim)
    # fov [1] is exactly the plain features
    np.testing.assert_array_equal(encoder_inputs(s, "color_stats", None, 32, context={"fov": [1]}), plain)
    np.testing.assert_array_equal(x[:, :dim], plain)
    # the 3x view = features read directly at 3x the microns per pixel (same 32 px output patches)
    mpp = float(meta(s).mpp)
    np.testing.assert_array_equal(x[:, dim : 2 * dim], _plain(s, target_mpp=3 * mpp))
    assert not np.allclose(x[:, dim : 2 * dim], plain)
    # with a method's own target_mpp, the views scale it
    y = context_features(s, "color_stats", None, 32, {"fov": [1, 3]}, target_mpp=0.5 * mpp)
    np.testing.assert_array_equal(y[:, :dim], _plain(s, target_mpp=0.5 * mpp))
    np.testing.assert_array_equal(y[:, dim:], _plain(s, target_mpp=1.5 * mpp))
    # the neighbour block is the mean 1x features of the 6 nearest other spots
    np.testing.assert_allclose(x[:, 3 * dim :], neighbour_mean(s, plain, 6), rtol=1e-6)


def test_wider_views_are_cached(cohort, monkeypatch) -> None:
    s = cohort[1]
    first = encoder_inputs(s, "color_stats", None, 32, context={"fov": [1, 3]})
    import he2st.encoders.features as F

    def boom(*a, **k):  # a cache hit never runs the encoder again
        raise AssertionError("encoder ran on a cached view")

    monkeypatch.setattr(F, "_extract", boom)
    monkeypatch.setattr(F, "_stream_extract", boom)
    np.testing.assert_array_equal(encoder_inputs(s, "color_stats", None, 32, context={"fov": [1, 3]}), first)


def test_patch_wider_than_spot_spacing_pads_white_outside_image(cohort) -> None:
    from he2st.image import extract_patches

    s = cohort[0]
    xy = np.asarray(s.obsm["spatial"])
    corner = int(np.argmin(xy.sum(axis=1)))  # the spot nearest the image's top-left corner
    far = float(xy[corner].min()) + 1
    fov = int(np.ceil(4 * far / 32)) + 1  # a view reaching well past the image edge
    p = extract_patches(s, size_px=32, target_mpp=fov * float(meta(s).mpp))
    assert p.images.shape == (s.n_obs, 32, 32, 3)
    assert (p.images[corner, 0, 0] == 255).all()


def test_neighbour_mean_by_hand() -> None:
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 0.0]])
    s = ad.AnnData(np.zeros((4, 1), dtype=np.float32))
    s.obsm["spatial"] = xy
    x = np.array([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0], [8.0, 80.0]])
    np.testing.assert_allclose(neighbour_mean(s, x, 1), x[[1, 0, 1, 2]])
    want2 = np.stack([(x[1] + x[2]) / 2, (x[0] + x[2]) / 2, (x[1] + x[0]) / 2, (x[2] + x[1]) / 2])
    np.testing.assert_allclose(neighbour_mean(s, x, 2), want2)
    # more neighbours than other spots: all of them
    np.testing.assert_allclose(neighbour_mean(s, x, 10)[0], x[1:].mean(axis=0))


def test_bad_specs_name_the_option() -> None:
    assert parse_context(None) is None
    assert parse_context({"fov": [1, 3], "neighbours": 6}) == ContextSpec((1.0, 3.0), 6)
    assert parse_context({"neighbours": 4}) == ContextSpec((1.0,), 4)
    for bad in ([1, 3], {"fov": []}, {"fov": [0, 1]}, {"fov": [1, 1]}, {"fov": ["3"]},
                {"neighbours": -1}, {"neighbours": 2.5}, {"size": 3}):
        with pytest.raises(He2stInputError, match="context"):
            create_method("ridge", **FEAT, context=bad)
    with pytest.raises(He2stInputError, match="context"):
        create_method("stnet", **FEAT, mode="finetune", context={"fov": [1, 3]})
    with pytest.raises(He2stInputError, match="context"):
        create_method("cmrcnet", encoder="color_stats", weights=None, patch_px=32, context={"fov": [1, 3]})


def test_tokens_and_finetune_refuse_context(cohort) -> None:
    with pytest.raises(He2stInputError, match="context"):
        encoder_inputs(cohort[0], "color_stats", None, 32, tokens=True, context={"fov": [1, 3]})
    with pytest.raises(He2stInputError, match="context"):
        image_inputs(cohort[0], "finetune", "color_stats", None, 32, context={"fov": [1, 3]})


def test_fov1_context_gives_the_plain_model(cohort, genes) -> None:
    plain = create_method("ridge", **FEAT).fit(cohort[:2], genes)
    same = create_method("ridge", **FEAT, context={"fov": [1]}).fit(cohort[:2], genes)
    np.testing.assert_array_equal(same.predict(cohort[2]), plain.predict(cohort[2]))
    assert create_method("ridge", **FEAT).params["context"] is None


CTX = {"fov": [1, 3], "neighbours": 6}
METHODS = {
    "ridge": {},
    "knn": {"k": 10},
    "stnet": {"epochs": 3, "lr": 1e-3, "tta": False},
    "bleep": {"epochs": 3, "batch_size": 32, "top_k": 10},
    "spahgc": {"hidden": 16, "layers": 1, "epochs": 2, "lr": 1e-3, "top_k": 3},
    "hist2st": {"patch_size": 8, "depth": 1, "heads": 2, "dim_head": 8, "gnn_depth": 1, "distill_views": 1,
                "epochs": 2, "dim": 16, "mode": "frozen"},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_take_context(cohort, genes, name, tmp_path) -> None:
    from he2st.inference import predict

    m = create_method(name, **FEAT, **METHODS[name], context=CTX).fit(cohort[:2], genes)
    pred = m.predict(cohort[2])
    assert pred.shape == (cohort[2].n_obs, len(genes)) and np.isfinite(pred).all()
    dim = _plain(cohort[2]).shape[1]
    if name == "ridge":
        assert m.scaler_mean_.shape == (3 * dim,)
    if name == "knn":
        assert m.bank_features_.shape[1] == 3 * dim
    if name == "stnet":
        assert m.in_dim_ == 3 * dim
    # saved with its parameters; image-only prediction (he2st predict) gives the same numbers
    m2 = load_method(m.save(tmp_path / name))
    assert m2.params["context"] == CTX
    np.testing.assert_allclose(m2.predict(cohort[2]), pred, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predict(m2, cohort[2], thumbnail_max_side=None).X, pred, rtol=1e-5, atol=1e-6)
