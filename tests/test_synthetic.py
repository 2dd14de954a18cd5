"""The synthetic cohort: layout, determinism, caching, and expression learnable from the image."""

from __future__ import annotations

import os

import numpy as np
import pytest

import he2st
from he2st.data import meta
from he2st.pp import Normalizer
from he2st.datasets._synthetic import REGIONS
from he2st.errors import He2stInputError


def _bytes(slide):
    with open(meta(slide).image_path, "rb") as fh:
        return fh.read()


def test_layout_and_metadata(tmp_path):
    cohort = he2st.datasets.synthetic(n_slides=2, n_spots=80, n_genes=12, patch_px=24, seed=5, root=tmp_path)
    assert cohort.slide_ids == ["syn0", "syn1"] and cohort.patient_ids == ["P0", "P1"]
    for s in cohort:
        m = meta(s)
        assert s.shape == (80, 12) and list(s.var_names[:2]) == ["GENE000", "GENE001"]
        assert m.counts and m.spot_diameter_px == pytest.approx(0.55 * 24) and m.mpp == pytest.approx(100 / 24)
        assert m.image_path.startswith(str(tmp_path)) and m.image_path.endswith(".png")
        X = s.X.toarray()
        assert (X == np.round(X)).all() and X.sum() > 0
        assert set(s.obs["label"]) <= set(REGIONS)
        assert s.obsm["true_mean"].shape == (80, 12) and (s.obsm["true_mean"] > 0).all()
        # Visium hex grid: array_col has the parity of array_row; neighbours one pitch apart.
        assert ((s.obs["array_col"] - s.obs["array_row"]) % 2 == 0).all()
        xy = s.obsm["spatial"]
        d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1)) + np.eye(len(xy)) * 1e9
        np.testing.assert_allclose(d.min(axis=1), 24.0, rtol=1e-6)
        with he2st.image.open_image(m.image_path) as img:
            assert (xy[:, 0] < img.width).all() and (xy[:, 1] < img.height).all()


def test_same_seed_identical_other_seed_different(tmp_path):
    kw = dict(n_slides=2, n_spots=60, n_genes=10, patch_px=16)
    a = he2st.datasets.synthetic(seed=3, root=tmp_path / "a", **kw)
    b = he2st.datasets.synthetic(seed=3, root=tmp_path / "b", **kw)  # drawn again from scratch
    c = he2st.datasets.synthetic(seed=4, root=tmp_path / "c", **kw)
    for sa, sb, sc in zip(a, b, c):
        np.testing.assert_array_equal(sa.X.toarray(), sb.X.toarray())
        np.testing.assert_array_equal(sa.obsm["spatial"], sb.obsm["spatial"])
        assert _bytes(sa) == _bytes(sb)
        assert _bytes(sa) != _bytes(sc)
        assert sa.X.shape != sc.X.shape or not np.array_equal(sa.X.toarray(), sc.X.toarray())
    # Slide k does not depend on how many slides are asked for.
    kw["n_slides"] = 3
    more = he2st.datasets.synthetic(seed=3, root=tmp_path / "d", **kw)
    np.testing.assert_array_equal(more[1].X.toarray(), a[1].X.toarray())


def test_cache_is_reused(tmp_path):
    kw = dict(n_slides=1, n_spots=40, n_genes=8, patch_px=16, seed=1, root=tmp_path)
    first = he2st.datasets.synthetic(**kw)
    path = meta(first[0]).image_path
    stamp = os.stat(path).st_mtime_ns
    second = he2st.datasets.synthetic(**kw)
    assert meta(second[0]).image_path == path and os.stat(path).st_mtime_ns == stamp
    np.testing.assert_array_equal(first[0].X.toarray(), second[0].X.toarray())
    # Default location: under the (test-isolated) cache dir.
    default = he2st.datasets.synthetic(n_slides=1, n_spots=40, n_genes=8, patch_px=16)
    from he2st._utils import default_cache_dir

    assert meta(default[0]).image_path.startswith(str(default_cache_dir() / "synthetic"))


def test_large_images_are_written_as_tiled_tiff(tmp_path):
    from he2st.datasets._synthetic import _write_image

    rgb = np.random.default_rng(0).integers(0, 256, (300, 520, 3), dtype=np.uint8)
    _write_image(tmp_path / "big.tif", rgb)
    import tifffile

    with tifffile.TiffFile(tmp_path / "big.tif") as tf:
        assert tf.pages[0].is_tiled and tf.pages[0].tilewidth == 256
    with he2st.image.open_image(tmp_path / "big.tif") as img:
        np.testing.assert_array_equal(img.read_region(250, 40, 100, 70), rgb[40:110, 250:350])


def test_bad_parameters():
    with pytest.raises(He2stInputError, match="n_spots"):
        he2st.datasets.synthetic(n_spots=3)
    with pytest.raises(He2stInputError, match="patch_px"):
        he2st.datasets.synthetic(patch_px=2.5)
    with pytest.raises(He2stInputError, match="n_genes"):
        he2st.datasets.synthetic(n_genes="50")


def _colour_stats(slide):
    """Mean and std of R, G, B over the patch_px square around each spot."""
    p = int(slide.uns["he2st_synthetic"]["patch_px"])
    feats = []
    with he2st.image.open_image(meta(slide).image_path) as img:
        for x, y in np.round(slide.obsm["spatial"]).astype(int):
            patch = img.read_region(x - p // 2, y - p // 2, p, p).reshape(-1, 3).astype(float)
            feats.append(np.r_[patch.mean(0), patch.std(0)])
    return np.asarray(feats)


def _pcc(pred, obs):
    """Per-gene Pearson r; a constant prediction counts as 0."""
    out = []
    for g in range(obs.shape[1]):
        if np.ptp(pred[:, g]) == 0 or np.ptp(obs[:, g]) == 0:
            out.append(0.0)
        else:
            out.append(np.corrcoef(pred[:, g], obs[:, g])[0, 1])
    return np.asarray(out)


def test_expression_is_learnable_from_colour_statistics():
    from sklearn.linear_model import Ridge

    cohort = he2st.datasets.synthetic()  # the defaults: 4 slides x 300 spots, 50 genes
    train, test = list(cohort[:3]), cohort[3]
    genes = list(test.var_names)
    norm = Normalizer().fit(train, genes)
    Xtr = np.vstack([_colour_stats(s) for s in train])
    Ytr = np.vstack([norm.transform(s) for s in train])
    mu, sd = Xtr.mean(0), Xtr.std(0)
    model = Ridge(alpha=1.0).fit((Xtr - mu) / sd, Ytr)
    Xte = (_colour_stats(test) - mu) / sd
    Yte = norm.transform(test)

    ridge = _pcc(model.predict(Xte), Yte).mean()
    mean_pred = _pcc(np.tile(Ytr.mean(0), (len(Yte), 1)), Yte).mean()
    # Control: the same model on patches of the wrong spots carries no signal.
    shuffled = _pcc(model.predict(Xte[np.random.default_rng(0).permutation(len(Xte))]), Yte).mean()
    assert ridge > 0.3, ridge
    assert mean_pred == 0.0
    assert abs(shuffled) < 0.1, shuffled
