"""he2st.inference: the prediction AnnData, the model folder and its card, maps, and real data."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import he2st
from he2st.data.slide import make_slide, meta
from he2st.errors import GenePanelError, He2stInputError
from he2st.inference import (
    ModelTamperedError,
    ModelVersionError,
    image_only,
    load_model,
    plot_maps,
    predict,
    save_model,
)
from he2st.methods import create_method

RIDGE = {"encoder": "color_stats", "weights": None, "patch_px": 32, "n_components": 8}


@pytest.fixture(scope="module")
def cohort4(tmp_path_factory):
    from he2st.datasets import synthetic

    return synthetic(n_slides=4, n_spots=80, n_genes=12, patch_px=32, seed=0, root=tmp_path_factory.mktemp("syn4"))


@pytest.fixture(scope="module")
def model(cohort4):
    return create_method("ridge", **RIDGE).fit(list(cohort4)[:3], list(cohort4[0].var_names))


def _unsequenced(slide):
    """The slide as an H&E image with spot positions and no expression, built by hand."""
    m = meta(slide)
    return make_slide(
        None, slide.obs_names, [], slide.obsm["spatial"], slide_id=m.slide_id, patient=m.patient,
        image_path=m.image_path, spot_diameter_px=m.spot_diameter_px, counts=False, mpp=m.mpp,
    )


def test_predict_layout(cohort4, model):
    assert he2st.predict is predict
    slide = cohort4[3]
    pred = he2st.predict(model, slide)
    assert isinstance(pred.X, np.ndarray) and pred.X.dtype == np.float32
    assert pred.shape == (slide.n_obs, len(model.genes))
    assert list(pred.var_names) == list(model.genes)
    assert list(pred.obs_names) == list(slide.obs_names)
    np.testing.assert_array_equal(pred.obsm["spatial"], slide.obsm["spatial"])
    for col in ("array_row", "array_col", "slide", "label"):
        assert col in pred.obs
    assert "sd" not in pred.layers  # ridge states no uncertainty
    lib = pred.uns["spatial"]["syn3"]
    thumb = lib["images"]["hires"]
    assert thumb.dtype == np.uint8 and thumb.ndim == 3 and thumb.std() > 5
    sf = lib["scalefactors"]
    from he2st.image import open_image

    with open_image(meta(slide).image_path) as img:
        assert sf["tissue_hires_scalef"] == pytest.approx(thumb.shape[1] / img.width)
    assert sf["spot_diameter_fullres"] == pytest.approx(meta(slide).spot_diameter_px)
    assert sf["fiducial_diameter_fullres"] > sf["spot_diameter_fullres"]
    info = pred.uns["he2st_prediction"]
    assert info["scale"] == "cpm_log1p" and info["method"] == "ridge" and info["slide_id"] == "syn3"
    small = he2st.predict(model, slide, thumbnail_max_side=64)
    t = small.uns["spatial"]["syn3"]["images"]["hires"]
    assert max(t.shape[:2]) == 64
    assert small.uns["spatial"]["syn3"]["scalefactors"]["tissue_hires_scalef"] == pytest.approx(t.shape[1] / thumb.shape[1] * sf["tissue_hires_scalef"], rel=0.02)


def test_image_only_prediction_equals_the_sequenced_one(cohort4, model, tmp_path):
    original = cohort4[3]
    blind = _unsequenced(original)
    assert meta(blind).image_only and blind.n_vars == 0
    expected = model.predict(original)
    pred = predict(model, blind)
    np.testing.assert_array_equal(pred.X, expected)
    assert pred.uns["he2st_prediction"]["input_image_only"] is True or pred.uns["he2st_prediction"]["input_image_only"] == 1
    # image_only() of a sequenced slide keeps spots, positions, labels and image.
    copy = image_only(original)
    assert copy.n_vars == 0 and list(copy.obs["label"]) == list(original.obs["label"])
    # A model folder round trip predicts the same.
    folder = save_model(model, tmp_path / "model", training_slides=list(cohort4)[:3])
    loaded, card = load_model(folder)
    np.testing.assert_array_equal(predict(loaded, blind).X, expected)
    np.testing.assert_array_equal(predict(folder, blind).X, expected)  # a folder path works too
    assert predict(loaded, blind).uns["he2st_prediction"]["card_sha256"] == card["card_sha256"]


def test_uncertainty_goes_to_layer_sd(cohort4):
    params = {"encoder": "color_stats", "weights": None, "patch_px": 32, "stain": None, "n_models": 1, "lr": 3e-2, "epochs": 2}
    m = create_method("stimage", **params).fit(list(cohort4)[:2], list(cohort4[0].var_names)[:5])
    pred = predict(m, _unsequenced(cohort4[3]))
    assert pred.layers["sd"].shape == pred.shape and (pred.layers["sd"] >= 0).all() and pred.layers["sd"].max() > 0
    assert pred.uns["he2st_prediction"]["sd_layer"] == "sd"
    assert "sd" not in predict(m, cohort4[3], uncertainty=False).layers


def test_card_contents(cohort4, model, tmp_path):
    folder = save_model(model, tmp_path / "m", training_slides=list(cohort4)[:3], cv_metrics={"PCC(ACG)": 0.5},
                        options={"genes": "all"})
    card = json.loads((folder / "card.json").read_text())
    assert card["he2st_version"] == he2st.__version__
    assert [s["slide_id"] for s in card["training"]["slides"]] == ["syn0", "syn1", "syn2"]
    assert card["training"]["patients"] == ["P0", "P1", "P2"]
    assert card["genes"] == list(model.genes) and card["normalization"]["evaluation"] == "cpm_log1p"
    assert card["model"]["encoders"][0]["encoder"] == "color_stats"
    assert card["model"]["patch_px"] == 32 and card["model"]["patch_um"] == pytest.approx(32 * meta(cohort4[0]).mpp)
    assert card["cv_metrics"] == {"PCC(ACG)": 0.5} and card["options"] == {"genes": "all"}
    assert set(card["files"]) == {"method.json", "state.safetensors"}


def test_tampered_or_foreign_model_folders_are_refused(cohort4, model, tmp_path):
    folder = save_model(model, tmp_path / "m", training_slides=list(cohort4)[:3])
    card_file = folder / "card.json"
    good = card_file.read_text()
    # Another he2st major.minor version.
    card = json.loads(good)
    card["he2st_version"] = "0.0.9"
    card_file.write_text(json.dumps(card))
    with pytest.raises(ModelVersionError, match=r"he2st 0\.0\.9"):
        load_model(folder)
    # An edited card (the genes it claims).
    card = json.loads(good)
    card["genes"] = card["genes"][::-1]
    card_file.write_text(json.dumps(card))
    with pytest.raises(ModelTamperedError, match="edited"):
        load_model(folder)
    # Changed learned arrays.
    card_file.write_text(good)
    state = folder / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(ModelTamperedError, match="does not match"):
        load_model(folder)
    # No card at all.
    with pytest.raises(He2stInputError, match="card.json"):
        load_model(model.save(tmp_path / "bare"))


def test_model_folder_is_written_whole_or_not_at_all(cohort4, model, tmp_path, monkeypatch):
    out = tmp_path / "m"

    def broken(self, path):
        (path / "method.json").write_text("{}")
        raise OSError("disk trouble")

    monkeypatch.setattr(type(model), "save", broken)
    with pytest.raises(OSError, match="disk trouble"):
        save_model(model, out, training_slides=list(cohort4)[:3])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]
    monkeypatch.undo()
    # A non-empty folder that is not a model is never replaced.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(He2stInputError, match="holds no he2st model"):
        save_model(model, other, training_slides=list(cohort4)[:3])
    assert (other / "keep.txt").read_text() == "x"


def test_maps_and_unknown_genes(cohort4, model, tmp_path):
    from PIL import Image

    pred = predict(model, cohort4[3], thumbnail_max_side=300)
    genes = list(model.genes)[:2]
    files = plot_maps(pred, genes, tmp_path / "maps", prefix="p_")
    assert [f.name for f in files] == [f"p_{g}.png" for g in genes]
    with Image.open(files[0]) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[0] > 100 and rgb.std() > 10
    with pytest.raises(GenePanelError, match=r"NOPE.*predicts 12 genes, e.g."):
        plot_maps(pred, ["NOPE", genes[0]], tmp_path / "none")
    assert not (tmp_path / "none").exists()


def _draws(fig, n_spots):
    """The figure shows an image and a scatter with one point per spot."""
    images = sum(len(ax.images) for ax in fig.axes)
    # A scatter (offsets) or a PatchCollection of circles (paths), one per spot.
    sizes = [n for ax in fig.axes for c in ax.collections for n in (len(c.get_offsets()), len(c.get_paths()))]
    return images >= 1 and n_spots in sizes


def test_scanpy_draws_the_prediction_as_is(cohort4, model, tmp_path):
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    path = tmp_path / "p.h5ad"
    predict(model, cohort4[3], thumbnail_max_side=300).write_h5ad(path)
    a = ad.read_h5ad(path)
    plt.close("all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scanpy points to squidpy's spatial_scatter
        sc.pl.spatial(a, color=str(a.var_names[0]), library_id="syn3", show=False)
    fig = plt.gcf()
    assert _draws(fig, a.n_obs)
    fig.savefig(tmp_path / "sc.png")
    assert (tmp_path / "sc.png").stat().st_size > 5000
    plt.close("all")


def test_squidpy_draws_the_prediction_as_is(cohort4, model, tmp_path):
    sq = pytest.importorskip("squidpy", reason="squidpy is not installed (checked by hand with squidpy 1.8.2)")
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "p.h5ad"
    predict(model, cohort4[3], thumbnail_max_side=300).write_h5ad(path)
    a = ad.read_h5ad(path)
    plt.close("all")
    sq.pl.spatial_scatter(a, color=str(a.var_names[0]))
    fig = plt.gcf()
    assert _draws(fig, a.n_obs)
    plt.close("all")


def test_predict_refuses_what_is_not_a_fitted_model(cohort4):
    with pytest.raises(He2stInputError, match="not fitted"):
        predict(create_method("mean"), cohort4[3])
    with pytest.raises(He2stInputError, match="card.json|not a folder"):
        predict("/nonexistent/model", cohort4[3])


@pytest.mark.slow
def test_her2st_train_c2_c5_predict_c6_from_its_image(her2st_root, tmp_path):
    # The issue's real-data path: a model trained on C2-C5, then `he2st predict` on C6's H&E image
    # with C6's legacy ST spot file (array x, y and pixel_x, pixel_y; selected spots only).
    import anndata as ad
    from typer.testing import CliRunner

    from he2st._stats import pearson_per_gene
    from he2st.cli import app
    from he2st.evaluate.protocol import choose_panel

    cohort = he2st.datasets.her2st(root=her2st_root, sections=["C2", "C3", "C4", "C5", "C6"])
    train, test = list(cohort)[:4], cohort[4]
    panel = choose_panel(train, "mean:50")
    # Standard scaling: the "slide" kind that ridge's inner CV may choose centres each slide on its own spots'
    # mean, so a spot file with one spot more than the count matrix would shift every prediction a little.
    m = create_method("ridge", encoder="color_stats", weights=None, patch_px=112, n_components=32,
                      feature_scaling="standard").fit(train, panel)
    folder = save_model(m, tmp_path / "model", training_slides=train)
    spot_file = her2st_root / "ST-spotfiles" / "C6_selection.tsv"
    out = tmp_path / "C6.h5ad"
    result = CliRunner().invoke(app, ["predict", str(folder), meta(test).image_path, "--spots", str(spot_file),
                                      "--mpp", str(meta(test).mpp), "--out", str(out)])
    assert result.exit_code == 0, result.output
    pred = ad.read_h5ad(out)
    assert pred.uns["he2st_prediction"]["input_image_only"]
    # The spot file's selected spots carry the count matrix's ids ("<x>x<y>"); one has no counts.
    common = pred.obs_names.intersection(test.obs_names)
    assert len(common) == test.n_obs and pred.n_obs >= test.n_obs
    observed = m.targets(test)[test.obs_names.get_indexer(common)]
    predicted = np.asarray(pred[common].X)
    # Same pixels as the reader's: identical to predicting the sequenced slide.
    np.testing.assert_allclose(predicted, m.predict(test)[test.obs_names.get_indexer(common)], rtol=1e-5, atol=1e-5)
    r, _ = pearson_per_gene(observed, predicted)
    assert np.nanmean(r) > 0.08 and np.nanmedian(r) > 0.05, f"mean PCC over 50 genes {np.nanmean(r):.3f}"


def test_demo_prediction_uses_the_best_method_and_draws_its_best_genes(tmp_path, cohort4):
    from types import SimpleNamespace

    import pandas as pd
    from PIL import Image

    from he2st.benchmark.demo import demo_prediction, format_prediction

    summary = pd.DataFrame({"method": ["mean", "ridge", "knn"], "metric": "pcc", "gene_set": "ACG", "mean": [np.nan, 0.2, 0.4]})
    per_gene = pd.DataFrame({"method": "knn", "gene": ["GENE007", "GENE003", "GENE001"], "pcc": [0.9, 0.8, 0.1]})
    info = demo_prediction(tmp_path, SimpleNamespace(summary=summary, per_gene=per_gene), n_maps=2, cohort=cohort4)
    assert info["method"] == "knn" and info["slide"] == "syn3" and info["train_slides"] == ["syn0", "syn1", "syn2"]
    assert [p.rsplit("/", 1)[-1] for p in info["maps"]] == ["syn3_GENE007.png", "syn3_GENE003.png"]
    import anndata as ad

    pred = ad.read_h5ad(info["h5ad"])
    assert pred.n_obs == cohort4[3].n_obs and pred.uns["he2st_prediction"]["input_image_only"]
    with Image.open(info["maps"][0]) as im:
        assert np.asarray(im.convert("RGB")).std() > 10
    assert "predicts syn3 from its image alone" in format_prediction(info)


def test_predict_from_an_image_path(cohort4, model, tmp_path):
    # he2st.predict(model, "image"): the image on a grid like the training spots (the card's layout);
    # a fitted model without a card cannot know that layout and says how to give the spots.
    from he2st.io import read_image

    folder = save_model(model, tmp_path / "m", training_slides=list(cohort4)[:3])
    m = meta(cohort4[3])
    tif = tmp_path / "syn3.tif"
    import tifffile
    from PIL import Image

    with Image.open(m.image_path) as im:
        rgb = np.asarray(im.convert("RGB"))
    # Resolution tags in pixels per centimetre carry the µm per pixel.
    tifffile.imwrite(tif, rgb, photometric="rgb", resolution=(1e4 / m.mpp, 1e4 / m.mpp), resolutionunit="CENTIMETER")
    pred = predict(str(folder), str(tif))
    layout = json.loads((folder / "card.json").read_text())["training"]["spots"]
    expected = read_image(tif, grid=layout)
    assert pred.n_obs == expected.n_obs > 0
    np.testing.assert_allclose(pred.obsm["spatial"], expected.obsm["spatial"])
    assert list(pred.var_names) == list(model.genes) and np.isfinite(pred.X).all()
    with pytest.raises(He2stInputError, match="read_image"):
        predict(model, str(tif))
