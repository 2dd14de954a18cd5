"""Image-only slides (he2st.io.read_image): spots from tables or grids, pixel size, bad input, prediction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from he2st.data import meta, require_counts
from he2st.errors import (
    He2stInputError,
    ImageError,
    NotCountsError,
    SlideError,
    UnknownMppError,
)
from he2st.io import read_image

W, H = 240, 160


def _tissue_image() -> np.ndarray:
    rng = np.random.default_rng(1)
    img = np.empty((H, W, 3), np.float64)
    img[:] = (243, 242, 246)
    img[20:140, 20:200] = (200, 115, 160)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "sec1.png"
    Image.fromarray(_tissue_image()).save(path)
    return path


@pytest.fixture
def tif(tmp_path):
    path = tmp_path / "sec2.tif"
    tifffile.imwrite(path, _tissue_image(), photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    return path


def test_spots_from_tables(png, tmp_path) -> None:
    csv = tmp_path / "spots.csv"
    pd.DataFrame({"id": ["a", "b", "c"], "x": [10.0, 120.5, 230.0], "y": [5.0, 80.0, 150.0]}).to_csv(csv, index=False)
    s = read_image(png, mpp=0.5, spots=csv)
    m = meta(s)
    assert s.shape == (3, 0) and list(s.obs_names) == ["a", "b", "c"]
    np.testing.assert_allclose(s.obsm["spatial"], [[10, 5], [120.5, 80], [230, 150]])
    assert m.image_only and not m.counts and m.slide_id == "sec1"
    assert m.mpp == 0.5 and m.mpp_source == "user"
    assert m.spot_diameter_px == pytest.approx(110.0)  # 55 µm by default for a table
    assert m.image_path == str(png.resolve())
    with pytest.raises(NotCountsError, match="image-only"):
        require_counts(s, "normalisation")

    tsv = tmp_path / "positions.tsv"
    pd.DataFrame({"barcode": ["AC-1", "GT-1"], "pxl_col_in_fullres": [30, 40], "pxl_row_in_fullres": [50, 60]}).to_csv(
        tsv, sep="\t", index=False
    )
    s = read_image(png, mpp=1.0, spots=tsv, spot_diameter_um=100, slide_id="X", patient="P")
    assert list(s.obs_names) == ["AC-1", "GT-1"] and meta(s).spot_diameter_px == 100.0
    np.testing.assert_allclose(s.obsm["spatial"], [[30, 50], [40, 60]])
    assert meta(s).slide_id == "X" and meta(s).patient == "P"

    df = pd.DataFrame({"imagecol": [1.0, 2.0], "imagerow": [3.0, 4.0]}, index=["s1", "s2"])
    assert list(read_image(png, mpp=1.0, spots=df).obs_names) == ["s1", "s2"]
    arr = read_image(png, mpp=1.0, spots=np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert list(arr.obs_names) == ["spot0", "spot1"]


def test_legacy_st_spot_file(png, tmp_path) -> None:
    # her2st's *_selection.tsv: x, y are ARRAY coordinates, pixel_x, pixel_y the pixels, and only
    # spots with selected == 1 were kept for the count matrix (ids "<x>x<y>").
    tsv = tmp_path / "S1_selection.tsv"
    pd.DataFrame({"x": [18, 17, 3], "y": [9, 10, 4], "new_x": [17.9, 16.86, 3.0], "new_y": [9.1, 10.1, 4.0],
                  "pixel_x": [49.5, 46.0, 30.0], "pixel_y": [23.6, 26.5, 12.0], "selected": [1, 1, 0]}
                 ).to_csv(tsv, sep="\t", index=False)
    s = read_image(png, mpp=0.5, spots=tsv)
    assert list(s.obs_names) == ["18x9", "17x10"]
    np.testing.assert_allclose(s.obsm["spatial"], [[49.5, 23.6], [46.0, 26.5]])
    assert list(s.obs["array_col"]) == [18, 17] and list(s.obs["array_row"]) == [9, 10]


def test_mpp_from_the_file(tif) -> None:
    s = read_image(tif, spots=np.array([[50.0, 50.0]]))
    assert meta(s).mpp == pytest.approx(0.5) and meta(s).mpp_source == "file:TIFF XResolution (cm)"
    with pytest.warns(UserWarning, match="records 0.5"):
        s = read_image(tif, mpp=1.0, spots=np.array([[50.0, 50.0]]))
    assert meta(s).mpp == 1.0 and meta(s).mpp_source == "user"


def test_grid_over_the_tissue(png) -> None:
    s = read_image(png, mpp=1.0, grid={"pitch_um": 40, "kind": "square"})
    xy = s.obsm["spatial"]
    assert s.n_obs > 0 and s.n_vars == 0
    assert (xy[:, 0] >= 20).all() and (xy[:, 0] <= 200).all() and (xy[:, 1] >= 20).all() and (xy[:, 1] <= 140).all()
    assert meta(s).spot_diameter_px == pytest.approx(22.0)  # 0.55 x pitch
    hexa = read_image(png, mpp=1.0, grid=40.0)
    assert set(np.unique(np.diff(np.unique(hexa.obsm["spatial"][:, 1]))).round(3)) == {round(40 * np.sqrt(3) / 2, 3)}
    assert read_image(png, mpp=1.0, grid=40.0, spot_diameter_um=10).uns["he2st"]["spot_diameter_px"] == 10.0


def test_no_mpp_anywhere(png) -> None:
    with pytest.raises(UnknownMppError, match=r"sec1\.png.*mpp="):
        read_image(png, grid=100)


def test_spots_and_grid_exclusive(png) -> None:
    with pytest.raises(He2stInputError, match="exactly one of spots= .* got both"):
        read_image(png, mpp=1.0, spots=np.array([[1.0, 1.0]]), grid=100)
    with pytest.raises(He2stInputError, match="got neither"):
        read_image(png, mpp=1.0)


def test_spots_outside_the_image(png, tmp_path) -> None:
    csv = tmp_path / "far.csv"
    pd.DataFrame({"id": ["in", "out1", "out2"], "x": [10, 2400, 5], "y": [10, 30, -1]}).to_csv(csv, index=False)
    with pytest.raises(SlideError, match=r"2 of 3 spots of spot table '.*far\.csv' lie outside the 240x160 image") as err:
        read_image(png, mpp=1.0, spots=csv)
    assert "out1 at (2400.0, 30.0)" in str(err.value) and "sec1.png" in str(err.value)


def test_bad_spot_tables(png, tmp_path) -> None:
    with pytest.raises(SlideError, match="expected pixel columns x, y"):
        read_image(png, mpp=1.0, spots=pd.DataFrame({"row": [1], "col": [2]}))
    with pytest.raises(SlideError, match="missing or non-numeric"):
        read_image(png, mpp=1.0, spots=pd.DataFrame({"x": [1, np.nan], "y": [2, 3]}))
    with pytest.raises(SlideError, match="duplicated spot ids"):
        read_image(png, mpp=1.0, spots=pd.DataFrame({"id": ["a", "a"], "x": [1, 2], "y": [2, 3]}))
    with pytest.raises(SlideError, match=r"\(n, 2\) array"):
        read_image(png, mpp=1.0, spots=np.zeros((3, 3)))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_image(png, mpp=1.0, spots=tmp_path / "nope.csv")


def test_tissue_free_image(tmp_path) -> None:
    path = tmp_path / "glass.png"
    rng = np.random.default_rng(0)
    Image.fromarray(np.clip(243 + rng.normal(0, 3, (H, W, 3)), 0, 255).astype(np.uint8)).save(path)
    with pytest.raises(ImageError, match="glass.png.*no tissue"):
        read_image(path, mpp=1.0, grid=40)


# -- prediction on image-only slides ---------------------------------------------------

FEAT = {"encoder": "color_stats", "weights": None, "patch_px": 32}


@pytest.fixture(scope="module")
def cohort4(tmp_path_factory):
    from he2st.datasets import synthetic

    return synthetic(n_slides=4, n_spots=120, n_genes=20, patch_px=32, seed=0, root=tmp_path_factory.mktemp("syn4"))


@pytest.fixture(scope="module")
def ridge(cohort4):
    from he2st.methods import create_method

    genes = list(map(str, cohort4[0].var_names))
    return create_method("ridge", **FEAT).fit(cohort4[:3], genes)


def test_predict_on_a_grid_tracks_the_synthetic_truth(cohort4, ridge) -> None:
    from he2st.datasets import synthetic_truth

    held_out = cohort4[3]
    m = meta(held_out)
    image_only = read_image(m.image_path, mpp=m.mpp, grid={"pitch_um": 100})
    assert image_only.n_obs > 0.8 * held_out.n_obs
    pred = ridge.predict(image_only)
    assert pred.shape == (image_only.n_obs, held_out.n_vars)
    truth = np.log1p(synthetic_truth(held_out, image_only.obsm["spatial"]))
    pcc = [np.corrcoef(pred[:, g], truth[:, g])[0, 1] for g in range(truth.shape[1]) if truth[:, g].std() > 0]
    assert np.nanmean(pcc) > 0.3


def test_predict_at_the_real_spots_equals_the_slide(cohort4, ridge) -> None:
    held_out = cohort4[3]
    m = meta(held_out)
    spots = pd.DataFrame(held_out.obsm["spatial"], columns=["x", "y"], index=held_out.obs_names)
    image_only = read_image(m.image_path, mpp=m.mpp, spots=spots)
    assert list(image_only.obs_names) == list(held_out.obs_names)
    np.testing.assert_allclose(ridge.predict(image_only), ridge.predict(held_out), rtol=1e-5, atol=1e-6)


def test_synthetic_truth_matches_the_true_mean(cohort4) -> None:
    from he2st.datasets import synthetic_truth

    s = cohort4[1]
    truth = synthetic_truth(s, s.obsm["spatial"])
    # off by a per-spot library factor only, common to all genes
    ratio = np.log(s.obsm["true_mean"]) - np.log(truth)
    assert ratio.std(axis=1).max() < 1e-4
    with pytest.raises(He2stInputError, match="synthetic"):
        synthetic_truth(read_image(meta(s).image_path, mpp=1.0, grid=300), [[1.0, 1.0]])
