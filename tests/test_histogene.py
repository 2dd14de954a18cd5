"""HisToGene: architecture, learning on the synthetic cohort, super-resolution, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from he2st.errors import He2stInputError
from he2st.evaluate.metrics import evaluate_slide
from he2st.methods import create_method, load_method
from he2st.methods.histogene import HisToGene, HisToGeneNet
from he2st.methods.nn.transformer import count_parameters

# CPU budget: one small Transformer layer, a larger learning rate, 30 epochs. With 0-255
# pixels (the default) an Adam step moves the patch embedding's output ~255x more than
# with [0, 1] pixels, so the CPU learning rate stays small.
FAST = {"patch_px": 32, "dim": 64, "depth": 1, "heads": 4, "dim_head": 16, "mlp_dim": 128, "lr": 3e-4, "epochs": 30}


@pytest.fixture(scope="module")
def fitted(cohort, genes):
    return create_method("histogene", **FAST).fit(cohort[:2], genes)


def _score(model, slide):
    return evaluate_slide(model.targets(slide), model.predict(slide), model.genes).as_dict()


def test_defaults_are_the_papers() -> None:
    d = HisToGene.defaults
    assert (d["patch_px"], d["dim"], d["depth"], d["heads"], d["n_pos"]) == (112, 1024, 8, 16, 64)
    assert (d["lr"], d["epochs"], d["optimizer"], d["augment"]) == (1e-5, 100, "adam", "none")
    # The code's inputs and targets: raw 0-255 pixels, scprep's panel log-normalisation.
    assert (d["pixel_scale"], d["train_normalization"]) == ("uint8", "hist2st_lognorm")
    assert (d["attention"], d["window_px"]) == ("full", 4000.0)
    # Parameter count of the paper-size network, by hand (built on the meta device: no memory).
    with torch.device("meta"):
        net = HisToGeneNet(patch_px=112, n_genes=785)
    dim, mlp = 1024, 2048
    block = 2 * 2 * dim + dim * 3 * dim + (dim * dim + dim) + (dim * mlp + mlp) + (mlp * dim + dim)
    expected = (3 * 112 * 112 * dim + dim) + 2 * 64 * dim + 8 * block + (2 * dim + dim * 785 + 785)
    assert count_parameters(net) == expected
    assert len(net.transformer.blocks) == 8 and net.transformer.blocks[0].attn.heads == 16


def test_beats_mean_on_held_out_slide(cohort, genes, fitted) -> None:
    mean = _score(create_method("mean").fit(cohort[:2], genes), cohort[2])
    ev = _score(fitted, cohort[2])
    assert ev["n_nan(ACG)"] == 0
    assert ev["PCC(ACG)"] > 0.2
    assert ev["MSE(ACG)"] < mean["MSE(ACG)"]
    assert len(fitted.history_["train"]) == FAST["epochs"]


def test_training_loss_goes_clearly_below_the_mean_predictors(cohort, genes) -> None:
    # The issue-12 failure: with augmentation and [0, 1] pixels against N(0, 1)
    # position tables the loss never left the mean predictor's. The loss is
    # measured in eval mode (no dropout) on the training slides; the synthetic
    # targets are Poisson-noise dominated, so the reachable gap is a few percent.
    model = create_method("histogene", **{**FAST, "lr": 1e-4, "epochs": 20}).fit(cohort[:2], genes)
    y = [model.train_targets(s) for s in cohort[:2]]
    mean = np.concatenate(y).mean(axis=0)
    mean_loss = float(np.mean([((t - mean) ** 2).mean() for t in y]))
    loss = float(np.mean([((model._predict_data(model.slide_data(s)) - t) ** 2).mean() for s, t in zip(cohort[:2], y)]))
    assert loss < 0.98 * mean_loss
    # The same comparison is recorded in the fit history (pooled over spots and genes), which
    # the her2st benchmark reports for HisToGene.
    fit = model.history_["train_fit"]
    pred = [model._predict_data(model.slide_data(s)) for s in cohort[:2]]
    pooled = np.concatenate([(p - t) ** 2 for p, t in zip(pred, y)]).mean()
    pooled_mean = np.concatenate([(t - mean) ** 2 for t in y]).mean()
    assert fit["mse_model"] == pytest.approx(pooled, rel=1e-5)
    assert fit["mse_mean_predictor"] == pytest.approx(pooled_mean, rel=1e-5)
    assert fit["mse_model"] < fit["mse_mean_predictor"]


def test_pixel_scale_and_augmentation_are_options(cohort, genes) -> None:
    with pytest.raises(He2stInputError, match="pixel_scale"):
        create_method("histogene", pixel_scale="float")
    m = create_method("histogene", **{**FAST, "epochs": 2}, pixel_scale="unit", augment="histogene").fit(cohort[:2], genes)
    assert np.isfinite(m.predict(cohort[2])).all()


def test_save_load_roundtrip(cohort, fitted, tmp_path) -> None:
    pred = fitted.predict(cohort[2])
    fitted.save(tmp_path / "m")
    loaded = load_method(tmp_path / "m")
    assert isinstance(loaded, HisToGene) and loaded.params == fitted.params
    np.testing.assert_array_equal(loaded.predict(cohort[2]), pred)


def test_local_attention_over_all_spots_equals_full_attention(cohort, fitted, tmp_path) -> None:
    fitted.save(tmp_path / "m")
    local = load_method(tmp_path / "m")
    local.params.update(attention="knn", attention_k=10_000)
    local.set_state(fitted.get_state())  # rebuild the network with local attention, same weights
    np.testing.assert_allclose(local.predict(cohort[2]), fitted.predict(cohort[2]), atol=2e-4, rtol=1e-4)
    local.params.update(attention="knn", attention_k=4)
    local.set_state(fitted.get_state())
    # Above float noise (~1e-6): with 0-255 pixels the image part of each token dominates, so
    # attention moves the output little, but it does move it.
    assert np.abs(local.predict(cohort[2]) - fitted.predict(cohort[2])).max() > 1e-5


def test_superresolution(cohort, fitted) -> None:
    slide = cohort[2]
    same = fitted.predict_superres(slide, factor=1)
    np.testing.assert_allclose(same.X, fitted.predict(slide), atol=1e-5)
    np.testing.assert_allclose(same.obsm["spatial"], slide.obsm["spatial"])
    sr = fitted.predict_superres(slide, factor=2)
    assert sr.n_obs == 4 * slide.n_obs
    assert list(sr.var_names) == fitted.genes and np.isfinite(sr.X).all()
    # Each spot is split into 4 sub-spots at (+-pitch/4, +-pitch/4) around its centre (pitch 32 px).
    first = sr.obs["spot"] == slide.obs_names[0]
    offsets = sr.obsm["spatial"][first.to_numpy()] - slide.obsm["spatial"][0]
    np.testing.assert_allclose(sorted(map(tuple, offsets)), [(-8, -8), (-8, 8), (8, -8), (8, 8)], atol=1e-6)
    # Sub-spot predictions vary within a spot (their patches differ) around the spot's own.
    per_spot = sr.X.reshape(slide.n_obs, 4, -1)
    assert per_spot.std(axis=1).mean() > 0
    with pytest.raises(He2stInputError):
        fitted.predict_superres(slide, factor=0)


def test_bad_parameters_and_unfitted_use(cohort) -> None:
    with pytest.raises(He2stInputError, match="attention"):
        create_method("histogene", attention="sparse")
    with pytest.raises(He2stInputError, match="attention_radius"):
        create_method("histogene", attention="radius")
    with pytest.raises(He2stInputError, match="window_overlap"):
        create_method("histogene", window_overlap=1.0)
    with pytest.raises(He2stInputError, match="unknown parameter"):
        create_method("histogene", layers=3)
    with pytest.raises(He2stInputError, match="fit"):
        create_method("histogene").predict(cohort[0])
