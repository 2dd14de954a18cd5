"""he2st.image.stain: Macenko, Reinhard, Vahadane normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from he2st.errors import He2stInputError
from he2st.image.stain import StainNormalizer, learn_stain_matrix, nonneg_lasso_2, optical_density

#: Macenko's reference stain vectors (rows: haematoxylin, eosin), unit length.
W_REF = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])
W_REF = W_REF / np.linalg.norm(W_REF, axis=1, keepdims=True)
#: Another lab's stains: bluer haematoxylin, more orange eosin.
W_SHIFT = np.array([[0.65, 0.68, 0.33], [0.30, 0.85, 0.43]])
W_SHIFT = W_SHIFT / np.linalg.norm(W_SHIFT, axis=1, keepdims=True)


def synth_he(W: np.ndarray, seed: int, n: int = 6, s: int = 40, scale=(1.0, 1.0)) -> np.ndarray:
    """H&E-like uint8 images: nuclei (mostly H), stroma (mostly E), glass; Beer-Lambert with stains ``W``."""
    r = np.random.default_rng(seed)
    cls = r.choice(3, (n, s, s), p=[0.3, 0.5, 0.2])
    h = np.where(cls == 0, r.gamma(4, 0.25, (n, s, s)), r.gamma(1, 0.03, (n, s, s))) * (cls != 2)
    e = np.where(cls == 1, r.gamma(4, 0.12, (n, s, s)), r.gamma(1, 0.05, (n, s, s))) * (cls != 2)
    conc = np.stack([h * scale[0], e * scale[1]], -1)
    return np.clip(np.rint(255 * np.exp(-(conc @ W)) - 1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sets() -> dict[str, np.ndarray]:
    return {
        "reference": synth_he(W_REF, seed=1),  # what the normaliser is fitted on
        "shifted": synth_he(W_SHIFT, seed=0, scale=(1.3, 0.8)),  # same tissue as "truth", other stains
        "truth": synth_he(W_REF, seed=0),  # that tissue stained like the reference
    }


def _err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


@pytest.mark.parametrize(("method", "max_ratio"), [("macenko", 0.5), ("vahadane", 0.3), ("reinhard", 0.95)])
def test_normalisers_move_shifted_stains_towards_reference(sets, method: str, max_ratio: float) -> None:
    before = _err(sets["shifted"], sets["truth"])
    norm = StainNormalizer(method).fit(sets["reference"])
    out = norm.transform(sets["shifted"])
    assert out.shape == sets["shifted"].shape and out.dtype == np.uint8
    after = _err(out, sets["truth"])
    assert before > 8  # the shift is visible: ~10 grey levels per channel
    assert after < max_ratio * before, (method, before, after)
    # per-batch estimation works as well
    out_b = StainNormalizer(method, source="batch").fit(sets["reference"]).transform(sets["shifted"])
    assert _err(out_b, sets["truth"]) < max_ratio * before


def test_reinhard_matches_lab_statistics(sets) -> None:
    from torchstain.numpy.utils.rgb2lab import rgb2lab

    norm = StainNormalizer("reinhard", source="batch").fit(sets["reference"])
    out = norm.transform(sets["shifted"])

    def stats(x: np.ndarray) -> np.ndarray:
        lab = rgb2lab(x.reshape(-1, 1, 3).astype(np.float32) / 255).reshape(-1, 3)
        return np.r_[lab.mean(0), lab.std(0)]

    d_before = np.abs(stats(sets["shifted"]) - stats(sets["reference"])).max()
    d_after = np.abs(stats(out) - stats(sets["reference"])).max()
    assert d_after < 0.2 * d_before


def test_vahadane_recovers_stain_vectors(sets) -> None:
    norm = StainNormalizer("vahadane").fit(sets["reference"])
    W = norm.fitted_["stain_matrix"]
    assert W.shape == (2, 3) and (W >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1.0, atol=1e-9)
    cos = (W * W_REF).sum(axis=1)
    assert (cos > 0.995).all(), cos  # haematoxylin first, eosin second, both found
    W2 = learn_stain_matrix(optical_density(sets["shifted"].reshape(-1, 3))[::3], lam=0.1)
    assert ((W2 * W_SHIFT).sum(axis=1) > 0.99).all()


def test_stain_dictionary_agrees_with_sklearn(sets) -> None:
    """Our sparse NMF reaches the same stain vectors as scikit-learn's positive DictionaryLearning."""
    import warnings

    from sklearn.decomposition import DictionaryLearning

    od = optical_density(sets["reference"].reshape(-1, 3))
    od = od[od.mean(axis=1) > 0.15][::4]
    ours = learn_stain_matrix(od, lam=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dl = DictionaryLearning(
            2, alpha=0.1, fit_algorithm="cd", transform_algorithm="lasso_cd", positive_code=True,
            positive_dict=True, random_state=0, max_iter=200,
        )
        W = dl.fit(od).components_
    W = W / np.linalg.norm(W, axis=1, keepdims=True)
    W = W[np.argsort(-W[:, 0])]  # haematoxylin (larger red OD) first
    assert ((ours * W).sum(axis=1) > 0.995).all()


def test_nonneg_lasso_matches_sklearn() -> None:
    from sklearn.decomposition import sparse_encode

    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(0, 0.6, (400, 3)))
    X[:50] = 0.0  # glass
    for W in (W_REF, W_SHIFT, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])):
        for lam in (0.005, 0.01, 0.3):
            ours = nonneg_lasso_2(X, W, lam)
            ref = sparse_encode(X, W, algorithm="lasso_cd", alpha=lam, positive=True, max_iter=5000)
            np.testing.assert_allclose(ours, ref, atol=1e-5)
            assert (ours >= 0).all()
    # a pure-haematoxylin pixel decodes to (c, 0)
    np.testing.assert_allclose(nonneg_lasso_2(0.8 * W_REF[:1], W_REF, 0.0), [[0.8, 0.0]], atol=1e-9)


def test_blank_images_pass_through_and_are_counted(sets) -> None:
    norm = StainNormalizer("macenko").fit(sets["reference"])
    batch = np.concatenate([sets["shifted"][:2], np.full((2, 40, 40, 3), 250, np.uint8)])
    out = norm.transform(batch)
    assert norm.n_unchanged_ == 2
    np.testing.assert_array_equal(out[2:], batch[2:])
    assert _err(out[:2], sets["truth"][:2]) < _err(batch[:2], sets["truth"][:2])
    single = norm.transform(sets["shifted"][0])  # one (h, w, 3) image in, one out
    assert single.shape == (40, 40, 3)


def test_pinned_source_makes_batches_consistent(sets) -> None:
    norm = StainNormalizer("vahadane").fit(sets["reference"])
    src = norm.estimate_source(sets["shifted"])
    whole = norm.transform(sets["shifted"], source=src)
    parts = np.concatenate([norm.transform(sets["shifted"][:2], source=src), norm.transform(sets["shifted"][2:], source=src)])
    np.testing.assert_array_equal(whole, parts)  # batching no longer matters
    np.testing.assert_array_equal(whole, norm.transform(sets["shifted"]))  # same as the batch's own estimate
    assert norm.estimate_source(np.full((2, 20, 20, 3), 255, np.uint8)) is None
    bound = norm.with_source(sets["shifted"])  # the form a batched caller (feature extraction) uses
    np.testing.assert_array_equal(np.concatenate([bound.transform(sets["shifted"][:1]), bound.transform(sets["shifted"][1:])]), whole)
    assert bound.cache_key() == norm.cache_key() and norm.fixed_source_ is None


def test_state_roundtrip_and_cache_key(sets) -> None:
    for method in ("macenko", "reinhard", "vahadane"):
        norm = StainNormalizer(method).fit(sets["reference"])
        state = json.loads(json.dumps(norm.get_state()))  # JSON-safe
        clone = StainNormalizer.from_state(state)
        np.testing.assert_array_equal(clone.transform(sets["shifted"][:2]), norm.transform(sets["shifted"][:2]))
        assert clone.cache_key() == norm.cache_key() and norm.cache_key().startswith(method + "-")
    a = StainNormalizer("macenko").fit(sets["reference"]).cache_key()
    b = StainNormalizer("macenko").fit(sets["shifted"]).cache_key()
    c = StainNormalizer("macenko", alpha=2.0).fit(sets["reference"]).cache_key()
    assert len({a, b, c}) == 3


def test_bad_input_errors(sets) -> None:
    with pytest.raises(He2stInputError, match="unknown stain normalisation"):
        StainNormalizer("ruifrok")
    with pytest.raises(He2stInputError, match="unknown parameters"):
        StainNormalizer("reinhard", lambda_dict=0.1)
    with pytest.raises(He2stInputError, match="not fitted"):
        StainNormalizer("macenko").transform(sets["shifted"])
    with pytest.raises(He2stInputError, match="uint8"):
        StainNormalizer("macenko").fit(sets["reference"].astype(np.float32))
    with pytest.raises(He2stInputError, match="tissue pixels"):
        StainNormalizer("vahadane").fit(np.full((2, 20, 20, 3), 255, np.uint8))


@pytest.mark.realdata
def test_real_patches_colour_shift_undone(her2st_root: Path) -> None:
    """Real C2 tissue re-stained synthetically (other stain vectors, H x1.3, E x0.7), normalised back."""
    from he2st.image import open_image

    path = next((her2st_root / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    with open_image(path) as img:  # 8 patches of tissue near the slide centre
        real = np.stack([img.read_region(5000 + 150 * i, 4000 + 90 * i, 128, 128) for i in range(8)])
    od = optical_density(real.reshape(-1, 3))
    w_img = learn_stain_matrix(od[od.mean(axis=1) > 0.15][::5])  # the slide's own stains
    conc = nonneg_lasso_2(od, w_img, 0.0)

    def render(c: np.ndarray, w: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(255 * np.exp(-(c @ w)) - 1), 0, 255).astype(np.uint8).reshape(real.shape)

    ref = render(conc, w_img)  # the tissue as stained (up to the 2-stain model)
    shifted = render(conc * [1.3, 0.7], W_SHIFT)
    before = _err(shifted, ref)
    for method, ratio in (("macenko", 0.35), ("vahadane", 0.3), ("reinhard", 0.95)):
        out = StainNormalizer(method).fit(ref).transform(shifted)  # per-slide (batch) estimate
        assert _err(out, ref) < ratio * before, (method, before, _err(out, ref))
