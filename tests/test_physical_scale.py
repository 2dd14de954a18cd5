"""Physical scale: a model's field of view is in microns (issue 14).

A model trained at one resolution predicts a slide scanned at another from the same
tissue; same-resolution slides are never resampled (caches keep their keys); the field of
view, the training mpp and the encoder weights are saved with the model; and a slide the
model cannot serve (no mpp, no image, other encoder weights) is refused with a specific error.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

import he2st.encoders
from he2st.data.slide import make_slide, meta
from he2st.errors import MissingImageError, MissingMppError, WeightsMismatchError
from he2st.methods import create_method, load_method
from he2st.methods.baselines import _features

COLOR = {"encoder": "color_stats", "weights": None, "patch_px": 32}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from he2st.datasets import synthetic

    return synthetic(n_slides=3, n_spots=40, n_genes=10, patch_px=32, seed=5, root=tmp_path_factory.mktemp("syn"))


@pytest.fixture(scope="module")
def genes(small):
    return list(map(str, small[0].var_names))


def rescaled(slide, folder: Path, factor: int = 2, slide_id: str | None = None):
    """The slide's image downscaled ``factor`` times (PIL, Lanczos): spatial and spot diameter / factor, mpp x factor."""
    from PIL import Image

    m = meta(slide)
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(m.image_path) as im:
        small_im = im.convert("RGB").resize((im.width // factor, im.height // factor), Image.LANCZOS)
    path = folder / f"{m.slide_id}_x{factor}.png"
    small_im.save(path)
    return make_slide(
        slide.X, list(slide.obs_names), list(slide.var_names), np.asarray(slide.obsm["spatial"]) / factor,
        slide_id=slide_id or m.slide_id, patient=m.patient, image_path=str(path),
        spot_diameter_px=m.spot_diameter_px / factor, mpp=m.mpp * factor,
        array_row=slide.obs["array_row"].to_numpy(), array_col=slide.obs["array_col"].to_numpy(),
    )


def with_meta(slide, **changes):
    s = slide.copy()
    s.uns["he2st"] = {**s.uns["he2st"], **changes}
    return s


def mean_gene_pcc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    r = (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    return float(np.nanmean(r))


@pytest.fixture(scope="module")
def fine(tmp_path_factory):
    """Slides rendered at 1.5625 um/px (64 px = 100 um spot pitch)."""
    from he2st.datasets import synthetic

    return synthetic(n_slides=3, n_spots=40, n_genes=10, patch_px=64, seed=5, root=tmp_path_factory.mktemp("fine"))


def test_field_of_view_from_training_mpp(small, genes) -> None:
    m = create_method("ridge", **COLOR).fit(list(small[:2]), genes)
    assert m.patch_um_ == pytest.approx(32 * meta(small[0]).mpp)  # 100 um
    assert m.train_mpp_ == pytest.approx(meta(small[0]).mpp)
    assert m.read_mpp(small[2]) is None  # same resolution: read as it is


@pytest.mark.slow
def test_two_resolutions_give_the_same_prediction(fine, tmp_path: Path) -> None:
    """Ridge on efficientnet_lite0 ImageNet features of 100 um patches (32 px at 3.125 um/px).

    The test slide is predicted from its 1.5625 um/px image (64 px read, resampled to 32)
    and from that image downscaled 2x with PIL (3.125 um/px: 32 px read as they are).
    """
    genes = list(map(str, fine[0].var_names))
    m = create_method("ridge", encoder="efficientnet_lite0", weights="imagenet", patch_px=32, patch_um=100.0,
                      n_components=16).fit(list(fine[:2]), genes)
    test = fine[2]
    half = rescaled(test, tmp_path / "half")
    assert m.read_mpp(test) == pytest.approx(100.0 / 32) and m.read_mpp(half) is None
    full, low = m.predict(test), m.predict(half)
    physical = mean_gene_pcc(full, low)
    assert physical > 0.9
    # The same model in image pixels (the legacy behaviour) sees 50 um on one and 100 um on the other.
    legacy = copy.copy(m)
    legacy.patch_um_ = None
    assert physical > mean_gene_pcc(legacy.predict(test), low)
    # A saved model predicts at the same microns.
    m.save(tmp_path / "m")
    again = load_method(tmp_path / "m")
    assert again.patch_um_ == pytest.approx(100.0)
    np.testing.assert_allclose(again.predict(test), full, rtol=1e-5, atol=1e-5)


def test_feature_cache_key_includes_the_field_of_view(small, genes) -> None:
    s = small[2]
    a = create_method("ridge", **COLOR, patch_um=100.0).fit(list(small[:2]), genes)
    b = create_method("ridge", **COLOR, patch_um=200.0).fit(list(small[:2]), genes)
    assert a.read_mpp(s) is None and b.read_mpp(s) == pytest.approx(200.0 / 32)
    fa, fb = _features(a, s), _features(b, s)
    assert not np.allclose(fa, fb)
    from he2st._utils import default_cache_dir

    files = {p.name for p in (default_cache_dir() / "features").rglob("*.npy")}
    assert files, "features were not cached"
    assert np.allclose(_features(b, s), fb)  # read back from the cache under its own key


def test_same_mpp_slide_is_not_resampled(small, genes, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = he2st.encoders.get_features

    def spy(*args, **kw):
        calls.append(kw.get("target_mpp"))
        return real(*args, **kw)

    monkeypatch.setattr(he2st.encoders, "get_features", spy)
    legacy = create_method("ridge", **COLOR).fit(list(small[:2]), genes)
    explicit = create_method("ridge", **COLOR, patch_um=32 * meta(small[0]).mpp).fit(list(small[:2]), genes)
    assert calls and all(t is None for t in calls)
    np.testing.assert_array_equal(_features(legacy, small[2]), _features(explicit, small[2]))
    np.testing.assert_array_equal(legacy.predict(small[2]), explicit.predict(small[2]))


def test_mixed_resolution_training_reads_each_slide_at_the_field_of_view(small, genes, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {}
    real = he2st.encoders.get_features

    def spy(slide, *args, **kw):
        calls[meta(slide).slide_id] = kw.get("target_mpp")
        return real(slide, *args, **kw)

    monkeypatch.setattr(he2st.encoders, "get_features", spy)
    half = rescaled(small[1], tmp_path / "half")
    third = rescaled(small[0], tmp_path / "third", factor=1, slide_id="syn0b")
    m = create_method("ridge", **COLOR).fit([small[0], half, third], genes)
    # median mpp of (3.125, 6.25, 3.125) -> 100 um at 3.125 um/px; the coarse slide is resampled.
    assert m.patch_um_ == pytest.approx(100.0)
    assert calls["syn0"] is None and calls["syn0b"] is None
    assert calls["syn1"] == pytest.approx(3.125)


def test_slide_methods_work_in_the_training_pixel_frame(small, genes, tmp_path: Path) -> None:
    m = create_method("histogene", patch_px=32, dim=16, depth=1, heads=2, dim_head=8, mlp_dim=16, epochs=1,
                      attention="radius", attention_radius=80.0, window_px=120.0, window_min_spots=10)
    m.fit(list(small[:2]), genes)
    test = small[2]
    half = rescaled(test, tmp_path / "half")
    assert m.pixel_scale(half) == pytest.approx(2.0) and m.pixel_scale(test) == 1.0
    np.testing.assert_allclose(m.slide_data(half).coords, m.slide_data(test).coords)
    assert np.isfinite(m.predict(half)).all()
    sub = m.predict_superres(half, factor=2)
    assert sub.n_obs == 4 * test.n_obs and np.isfinite(sub.X).all()


def test_training_slides_without_mpp_keep_pixels(small, genes) -> None:
    bare = [with_meta(s, mpp=None) for s in small]
    m = create_method("ridge", **COLOR).fit(bare[:2], genes)
    assert m.patch_um_ is None and m.read_mpp(bare[2]) is None and m.pixel_scale(bare[2]) == 1.0
    np.testing.assert_allclose(m.predict(bare[2]), m.predict(small[2]))
    with pytest.raises(MissingMppError, match="syn0"):
        create_method("ridge", **COLOR, patch_um=100.0).fit(bare[:2], genes)


def test_refuses_a_slide_without_mpp_or_image(small, genes) -> None:
    m = create_method("stnet", **COLOR, epochs=1, tta=False).fit(list(small[:2]), genes)
    with pytest.raises(MissingMppError, match=r"slide 'syn2'.*mpp"):
        m.predict(with_meta(small[2], mpp=None))
    with pytest.raises(MissingImageError, match=r"slide 'syn2'.*no image"):
        m.predict(with_meta(small[2], image_path=None))
    r = create_method("ridge", **COLOR).fit(list(small[:2]), genes)
    with pytest.raises(MissingImageError, match="syn2"):
        r.predict(with_meta(small[2], image_path=None))


@pytest.fixture
def fake_features(monkeypatch: pytest.MonkeyPatch):
    """Frozen 'resnet18' features made up per slide: the weights checks need no network."""

    def fake(slide, encoder=None, weights=None, patch_px=224, **kw):
        seed = int.from_bytes(meta(slide).slide_id.encode(), "little") % 2**32
        return np.random.default_rng(seed).normal(size=(slide.n_obs, 8)).astype(np.float32)

    monkeypatch.setattr(he2st.encoders, "get_features", fake)


def test_refuses_other_encoder_weights(small, genes, fake_features, tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"the training weights")
    m = create_method("ridge", encoder="resnet18", weights=str(weights), patch_px=32).fit(list(small[:2]), genes)
    ok = m.predict(small[2])
    m.save(tmp_path / "m")
    # The saved model pointed at another file (another machine, another checkpoint).
    other = tmp_path / "other.pth"
    other.write_bytes(b"some other checkpoint")
    cfg = tmp_path / "m" / "method.json"
    d = json.loads(cfg.read_text())
    d["params"]["weights"] = str(other)
    cfg.write_text(json.dumps(d))
    with pytest.raises(WeightsMismatchError, match=r"resnet18.*sha256"):
        load_method(tmp_path / "m").predict(small[2])
    # The training file itself replaced by another checkpoint.
    weights.write_bytes(b"a fine-tuned replacement of the weights")
    with pytest.raises(WeightsMismatchError, match="refit"):
        m.predict(small[2])
    weights.write_bytes(b"the training weights")
    np.testing.assert_array_equal(m.predict(small[2]), ok)


def test_old_saved_models_keep_pixels(small, genes, tmp_path: Path) -> None:
    m = create_method("ridge", **COLOR).fit(list(small[:2]), genes)
    m.save(tmp_path / "m")
    cfg = tmp_path / "m" / "method.json"
    d = json.loads(cfg.read_text())
    del d["serving"]
    cfg.write_text(json.dumps(d))
    old = load_method(tmp_path / "m")
    assert old.patch_um_ is None and old.encoder_ids_ == []
    np.testing.assert_allclose(old.predict(small[2]), m.predict(small[2]))


def test_card_info(small, genes, fake_features, tmp_path: Path) -> None:
    from he2st.encoders._base import weights_id

    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"the training weights")
    m = create_method("ridge", encoder="resnet18", weights=str(weights), patch_px=32).fit(list(small[:2]), genes)
    card = m.card_info()
    json.dumps(card)  # JSON values only
    assert card["method"] == "ridge" and card["genes"] == genes and card["fitted"] is True
    assert card["normalization"] == card["train_normalization"] == "cpm_log1p"
    assert card["patch_px"] == 32 and card["patch_um"] == pytest.approx(100.0)
    assert card["train_mpp"] == pytest.approx(meta(small[0]).mpp)
    assert card["pretrained"] is True and card["params"]["encoder"] == "resnet18"
    (enc,) = card["encoders"]
    assert enc["encoder"] == "resnet18" and enc["weights_id"] == weights_id("resnet18", str(weights))
    assert enc["trained"] is False and enc["pretrained"] is True
    m.save(tmp_path / "m")
    assert load_method(tmp_path / "m").card_info() == card

    fresh = create_method("stnet", **COLOR).card_info()
    assert fresh["genes"] is None and fresh["patch_um"] is None and fresh["fitted"] is False
    assert fresh["train_normalization"] == "stnet_norm" and fresh["pretrained"] is None
    ens = create_method("ensemble", method="ridge", n_members=2, params={**COLOR, "alphas": [1.0]})
    assert ens.card_info()["params"]["method"] == "ridge" and ens.card_info()["patch_px"] is None
    ens.fit(list(small[:2]), genes)
    assert ens.card_info()["patch_um"] == pytest.approx(100.0)
