"""TRIPLEX (Chung et al., CVPR 2024): views, APEG, loss, training, persistence, ablations, leakage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import image_only, mean_pcc

from he2st.errors import He2stInputError
from he2st.methods import create_method, load_method
from he2st.methods.nn.position import RelativeGridBias, SpotGridConv
from he2st.methods.triplex import TriplexNet, neighbor_cells, triplex_loss

#: Colour statistics (no tokens: the pooled target), 3 x 3 neighbour cells, a narrow network.
TINY = {
    "encoder": "color_stats", "weights": None, "target_input": "pooled", "patch_px": 32, "n_neighbors": 3,
    "emb_dim": 16, "fusion_heads": 2, "global_heads": 2, "neighbor_heads": 2, "global_depth": 2,
    "neighbor_depth": 1, "fusion_mlp_ratio": 2.0, "global_mlp_ratio": 2.0, "neighbor_mlp_ratio": 2.0,
    "fusion_dropout": 0.0, "global_dropout": 0.0, "neighbor_dropout": 0.0, "batch_size": 32, "lr": 1e-3,
    "scheduler": "none", "normalization": "log1p",
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from he2st.datasets import synthetic

    return synthetic(n_slides=3, n_spots=48, n_genes=12, patch_px=32, seed=0, root=tmp_path_factory.mktemp("syn"))


@pytest.fixture(scope="module")
def fitted(cohort, _module_cache):
    mp = pytest.MonkeyPatch()
    mp.setenv("HE2ST_CACHE", _module_cache)
    try:
        genes = list(map(str, cohort[0].var_names))
        yield create_method("triplex", **TINY, epochs=25).fit([cohort[0], cohort[1]], genes)
    finally:
        mp.undo()


def test_defaults_are_the_authors() -> None:
    d = create_method("triplex").params
    # config/her2st/TRIPLEX.yaml and models/TRIPLEX.py (April 2024 release).
    assert (d["fusion_depth"], d["global_depth"], d["neighbor_depth"]) == (1, 5, 4)
    assert (d["fusion_heads"], d["global_heads"], d["neighbor_heads"]) == (4, 8, 4)
    assert (d["fusion_dropout"], d["global_dropout"], d["neighbor_dropout"]) == (0.4, 0.3, 0.3)
    assert d["fusion_mlp_ratio"] == d["global_mlp_ratio"] == d["neighbor_mlp_ratio"] == 4.0
    assert (d["emb_dim"], d["kernel_size"], d["n_neighbors"], d["patch_px"]) == (512, 3, 5, 224)
    assert (d["alpha"], d["lr"], d["epochs"], d["batch_size"], d["optimizer"]) == (0.3, 1e-4, 200, 128, "adam")
    assert (d["scheduler"], d["lr_step"], d["lr_gamma"]) == ("step", 50, 0.9)
    assert (d["encoder"], d["target_input"], d["views"], d["window_px"]) == (
        "resnet18", "tokens", ["target", "neighbor", "global"], None)


def test_neighbor_cells_by_hand() -> None:
    cells, mask = neighbor_cells(np.array([[10.0, 10.0], [3.0, 10.0]]), 4.0, 3, (20, 20))
    np.testing.assert_array_equal(cells[0, :, 0], [6, 10, 14] * 3)  # row-major: x varies fastest
    np.testing.assert_array_equal(cells[0, :, 1], [6] * 3 + [10] * 3 + [14] * 3)
    assert mask[0].all()
    # Spot 2 at x=3: its left column spans x in [-3, 1], outside the image.
    np.testing.assert_array_equal(mask[1], [False, True, True] * 3)


def test_apeg_on_a_hand_made_grid() -> None:
    conv = SpotGridConv(1, 3)
    with torch.no_grad():
        conv.conv.weight.fill_(1.0)
        conv.conv.bias.zero_()
    x = torch.tensor([[1.0], [2.0], [4.0]])
    grid = torch.tensor([[5, 7], [6, 7], [7, 9]])  # (col, row); shifted to (0,0), (1,0), (2,2)
    # x_i + (sum of the tokens in the 3 x 3 cells around i): 1 + 3, 2 + 3, 4 + 4.
    np.testing.assert_allclose(conv(x, grid).detach().numpy().ravel(), [4.0, 5.0, 8.0])
    perm = torch.tensor([2, 0, 1])
    np.testing.assert_allclose(conv(x[perm], grid[perm]).detach().numpy().ravel(), [8.0, 4.0, 5.0])
    assert conv(x.unsqueeze(0), grid).shape == (1, 3, 1)


def test_relative_grid_bias_shares_one_value_per_offset() -> None:
    rel = RelativeGridBias(3, 3, heads=2)
    with torch.no_grad():
        rel.bias.copy_(torch.arange(18.0).view(2, 9))
    b = rel()
    assert b.shape == (2, 9, 9)
    # Cells 0 = (0, 0) and 5 = (1, 2): offset (1, 2) -> column 1 * 3 + 2.
    assert b[0, 0, 5] == 5 and b[1, 5, 0] == 14 and b[0, 4, 4] == 0
    assert torch.equal(b[:, 1, 3], b[:, 5, 7])  # both offset (1, 1)


def test_loss_against_hand_values() -> None:
    y = torch.zeros(1, 2)
    out = {"fusion": torch.tensor([[1.0, 0.0]]), "target": torch.zeros(1, 2)}
    # MSE(F, y) = 0.5; target: 0.7 * 0 + 0.3 * MSE(F, t) = 0.15.
    assert float(triplex_loss(out, y, 0.3)) == pytest.approx(0.65)
    out["neighbor"] = torch.tensor([[1.0, 2.0]])
    # neighbour: 0.7 * 2.5 + 0.3 * 2.0 = 2.35.
    assert float(triplex_loss(out, y, 0.3)) == pytest.approx(3.0)
    assert float(triplex_loss(out, y, 0.0)) == pytest.approx(0.5 + 0.0 + 2.5)


def test_network_branch_shapes_and_mask() -> None:
    torch.manual_seed(0)
    parts = ("fusion", "global", "neighbor")
    net = TriplexNet(6, 5, ("target", "neighbor", "global"), 8, {k: 1 for k in parts}, {k: 2 for k in parts},
                     {k: 2.0 for k in parts}, {k: 0.0 for k in parts}, 3, 3).eval()
    grid = torch.tensor([[0, 0], [1, 0], [0, 1], [2, 2]])
    g = net.global_tokens(torch.randn(4, 6), grid)
    assert g.shape == (4, 8)
    tgt, nb = torch.randn(4, 7, 6), torch.randn(4, 9, 6)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[:, 0] = False
    out = net(tgt, nb, mask, g)
    assert set(out) == {"fusion", "target", "neighbor", "global"}
    assert all(v.shape == (4, 5) for v in out.values())
    # A masked cell is never attended to: changing its features moves nothing but the mean token.
    nb2 = nb.clone()
    nb2[:, 0] += 100.0
    out2 = net(tgt, nb2, mask, g)
    torch.testing.assert_close(out2["fusion"], out["fusion"])
    torch.testing.assert_close(out2["target"], out["target"])


def test_slide_views_shapes(fitted, cohort, syn_root) -> None:
    s = cohort[2]
    data = fitted.slide_data(s)
    assert data.inputs.shape == (s.n_obs, 1, 30)
    assert data.extras["neighbors"].shape == (s.n_obs, 9, 30) and data.extras["mask"].shape == (s.n_obs, 9)
    assert data.extras["global"].shape == (s.n_obs, 30)
    views = fitted.predict_views(s)
    assert set(views) == {"fusion", "target", "neighbor", "global"}
    assert all(v.shape == (s.n_obs, 12) and np.isfinite(v).all() for v in views.values())
    np.testing.assert_allclose(views["fusion"], fitted.predict(s), rtol=1e-5, atol=1e-6)


def test_trains_beats_the_mean_and_round_trips(fitted, cohort, syn_root, tmp_path) -> None:
    genes = fitted.genes
    test = cohort[2]
    pred = fitted.predict(test)
    y = fitted.targets(test)
    base = create_method("mean", normalization="log1p").fit([cohort[0], cohort[1]], genes).predict(test)
    assert mean_pcc(y, pred) > 0.1
    assert np.mean((pred - y) ** 2) < np.mean((base - y) ** 2)
    again = load_method(fitted.save(tmp_path / "triplex"))
    np.testing.assert_array_equal(again.predict(test), pred)


def test_no_leakage_the_global_view_is_the_slides_own_image(fitted, cohort, syn_root) -> None:
    test = cohort[2]
    pred = fitted.predict(test)
    # Nothing of the training slides is kept: the state is the network's weights only.
    assert all(k.startswith("model.") for k in fitted.get_state())
    # No expression of the slide is read (an image-only copy predicts the same), and
    # predicting other slides in between changes nothing.
    np.testing.assert_array_equal(fitted.predict(image_only(test)), pred)
    fitted.predict(cohort[0])
    np.testing.assert_array_equal(fitted.predict(test), pred)
    # The global view of a spot depends on the other spots of its own slide only:
    # predicting a half of the slide alone changes that half's predictions.
    half = test[: test.n_obs // 2].copy()
    assert not np.allclose(fitted.predict(half), pred[: half.n_obs])


@pytest.mark.parametrize(
    "switch",
    [{"views": ["target", "global"]}, {"views": ["neighbor", "global"]}, {"views": ["target", "neighbor"]},
     {"views": ["global"]}, {"distill": False}],
)
def test_each_ablation_switch_changes_predictions(switch, cohort, syn_root) -> None:
    genes = list(map(str, cohort[0].var_names))
    train, test = [cohort[0], cohort[1]], cohort[2]
    full = create_method("triplex", **TINY, epochs=3).fit(train, genes).predict(test)
    ablated = create_method("triplex", **TINY, **switch, epochs=3)
    pred = ablated.fit(train, genes).predict(test)
    assert pred.shape == full.shape and np.isfinite(pred).all()
    assert not np.allclose(pred, full)
    if "views" in switch:
        assert set(ablated.predict_views(test)) == {"fusion", *switch["views"]}


@pytest.mark.parametrize(
    "bad",
    [{"views": []}, {"views": ["target", "spot"]}, {"views": "global"}, {"n_neighbors": 4}, {"alpha": 1.5},
     {"emb_dim": 15}, {"mode": "finetune"}, {"target_input": "cls"}, {"augment": "hist2st"}, {"global_depth": 0}],
)
def test_bad_parameters_are_refused(bad) -> None:
    with pytest.raises(He2stInputError):
        create_method("triplex", **{**TINY, **bad})
