"""Hist2ST and its variants (Regclass, pretrained encoder, GAT): losses, learning, labels, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from he2st.errors import He2stInputError, SlideError
from he2st.evaluate.metrics import evaluate_slide
from he2st.methods import create_method, load_method
from he2st.methods.hist2st import Hist2ST, Hist2STNet, size_factors
from he2st.methods.nn.transformer import count_parameters

# CPU budget: 32 px patches cut by a 8 px ConvMixer patch embedding (16 channels -> 32-d
# spot features), one Transformer layer, two GraphSAGE layers, two distillation views.
FAST = {
    "patch_px": 32, "patch_size": 8, "channel": 16, "depth": 1, "heads": 4, "dim_head": 16,
    "gnn_depth": 2, "distill_views": 2, "lr": 3e-3, "epochs": 30, "dropout": 0.1,
}


@pytest.fixture(scope="module")
def fitted(cohort, genes):
    return create_method("hist2st", **FAST).fit(cohort[:2], genes)


@pytest.fixture(scope="module")
def regclass(cohort, genes):
    return create_method("hist2st", **FAST, regclass=True, gamma=0.5).fit(cohort[:2], genes)


def _score(model, slide):
    return evaluate_slide(model.targets(slide), model.predict(slide), model.genes).as_dict()


def _mean_mse(cohort, genes):
    return _score(create_method("mean").fit(cohort[:2], genes), cohort[2])["MSE(ACG)"]


def test_defaults_and_paper_architecture() -> None:
    d = Hist2ST.defaults
    assert (d["patch_px"], d["channel"], d["kernel_size"], d["patch_size"], d["convmixer_depth"]) == (112, 32, 5, 7, 2)
    assert (d["depth"], d["heads"], d["gnn_depth"], d["neighbors"]) == (8, 16, 4, 4)
    assert (d["zinb_weight"], d["distill_views"], d["distill_weight"]) == (0.25, 5, 0.5)
    assert (d["lr"], d["epochs"], d["augment"], d["dropout"]) == (1e-5, 350, "hist2st", 0.2)
    from he2st.encoders import create_encoder

    enc = create_encoder("convmixer", device="meta")
    assert enc.info.dim == 1024  # (112 / 7)^2 * 32 / 8
    with torch.device("meta"):
        net = Hist2STNet(n_genes=785, dim=1024, encoder=enc)
    assert len(net.transformer.blocks) == 8 and net.transformer.blocks[0].attn.heads == 16
    assert len(net.sage) == 4 and net.jk.num_layers == 2 and net.gat is None
    assert net.zinb is not None and net.coef is not None and net.classifier is None
    # Transformer: MLP width = dim (Hist2ST passes mlp_dim=dim).
    dim = 1024
    block = 4 * dim + dim * 3 * dim + (dim * dim + dim) + 2 * dim * dim + 2 * dim
    assert count_parameters(net.transformer) == 8 * block
    with torch.device("meta"):
        gat = Hist2STNet(n_genes=10, dim=1024, feature_dim=1280, gat_layers=4, n_classes=6)
        stacked = Hist2STNet(n_genes=10, dim=1024, feature_dim=1280, gat_layers=4, gat_variant="stacked")
    assert gat.transformer is None and gat.sage is None and gat.gat_uses == 4
    # DeepHis2Exp's GAT variant: ONE layer of 8 concatenated heads of 128, no self loops, JK-LSTM.
    assert (gat.gat.heads, gat.gat.out_channels, gat.gat.concat, gat.gat.add_self_loops) == (8, 128, True, False)
    assert gat.gat.negative_slope == 0.2 and gat.jk.num_layers == 2 and gat.x_embed is None
    assert (d["gat_heads"], d["gat_layers"], d["gat_variant"]) == (8, 4, "shared")
    assert len(stacked.gat) == 4 and stacked.jk is None and stacked.x_embed is not None
    # Regclass head: 4 linear layers.
    assert sum(isinstance(m, torch.nn.Linear) for m in gat.classifier) == 4


def test_size_factors_by_hand() -> None:
    counts = np.array([[1, 2], [3, 4], [0, 0], [5, 5]], dtype=np.float32)
    # Totals 3, 7, 0, 10; median 5.
    np.testing.assert_allclose(size_factors(counts), [0.6, 1.4, 0.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(size_factors(np.zeros((3, 2))), [1.0, 1.0, 1.0])


def test_zinb_term_is_the_zinb_nll_of_the_raw_counts(cohort, fitted) -> None:
    model = fitted.model_.eval()
    data = fitted.slide_data(cohort[2], train=True)
    batch = fitted.make_batch(data)
    with torch.no_grad():
        terms = fitted.loss_terms(model, batch)
        h = model.embed(batch.inputs.permute(0, 3, 1, 2).float() / 255, batch.positions, batch.edge_index)
        mu, theta, pi = (t.double().numpy() for t in model.zinb(h))
    counts = np.asarray(cohort[2][:, fitted.genes].X.toarray(), dtype=np.float64)
    totals = counts.sum(axis=1)
    mean = mu * (totals / np.median(totals))[:, None]
    # scipy's negative binomial: n = theta, p = theta / (theta + mean).
    log_nb = stats.nbinom.logpmf(counts, theta, theta / (theta + mean))
    log_p = np.where(counts == 0, np.log(pi + (1 - pi) * np.exp(log_nb)), np.log1p(-pi) + log_nb)
    assert float(terms["zinb"]) == pytest.approx(-log_p.mean(), rel=1e-4)


def test_total_loss_weights_the_terms(cohort, genes) -> None:
    # Without augmentation and dropout the distillation views equal the prediction:
    # their weighted mean is the prediction itself and the distillation term is 0.
    m = create_method("hist2st", **{**FAST, "augment": "none", "epochs": 1}, regclass=True, gamma=0.5)
    m.fit(cohort[:2], genes)
    model = m.model_.eval()
    batch = m.make_batch(m.slide_data(cohort[0], train=True))
    with torch.no_grad():
        t = m.loss_terms(model, batch)
        total = m._loss(model, batch)
    assert set(t) == {"mse", "zinb", "distill", "ce"}
    assert float(t["distill"]) == pytest.approx(0.0, abs=1e-8)
    assert float(t["ce"]) > 0
    expected = t["mse"] + 0.25 * t["zinb"] + 0.5 * t["distill"] + 0.5 * t["ce"]
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    # Switching terms off removes them.
    off = create_method("hist2st", **{**FAST, "epochs": 1, "zinb_weight": 0.0, "distill_views": 0}).fit(cohort[:1], genes)
    with torch.no_grad():
        assert set(off.loss_terms(off.model_, off.make_batch(off.slide_data(cohort[0], train=True)))) == {"mse"}


def test_beats_mean_on_held_out_slide(cohort, genes, fitted) -> None:
    ev = _score(fitted, cohort[2])
    assert ev["n_nan(ACG)"] == 0 and ev["PCC(ACG)"] > 0.2
    assert ev["MSE(ACG)"] < _mean_mse(cohort, genes)


def test_regclass_learns_the_spot_labels(cohort, genes, regclass) -> None:
    assert regclass.dims_["classes"] == sorted(set(cohort[0].obs["label"]) | set(cohort[1].obs["label"]))
    truth = np.asarray(cohort[2].obs["label"]).astype(str)
    pred = regclass.predict_labels(cohort[2])
    assert pred.shape == truth.shape and set(pred) <= set(regclass.dims_["classes"])
    majority = max(np.mean(truth == c) for c in set(truth))
    assert np.mean(pred == truth) > majority  # the classifier uses the labels
    ev = _score(regclass, cohort[2])
    assert ev["PCC(ACG)"] > 0.15 and ev["MSE(ACG)"] < _mean_mse(cohort, genes)
    with pytest.raises(He2stInputError, match="regclass"):
        create_method("hist2st", **FAST).predict_labels(cohort[2])


def test_regclass_refuses_a_slide_without_labels(cohort, genes) -> None:
    unlabelled = cohort[1].copy()
    del unlabelled.obs["label"]
    m = create_method("hist2st", **{**FAST, "epochs": 1}, regclass=True)
    with pytest.raises(SlideError, match=r"syn1.*obs\['label'\]"):
        m.fit([cohort[0], unlabelled], genes)
    assert m.model_ is None  # refused before any training
    undetermined = cohort[1].copy()
    undetermined.obs["label"] = "undetermined"
    with pytest.raises(SlideError, match="syn1"):
        m.fit([cohort[0], undetermined], genes)
    # Opting in trains the regression losses on the unlabelled slide, CE on the labelled one.
    ok = create_method("hist2st", **{**FAST, "epochs": 1}, regclass=True, allow_unlabeled=True)
    ok.fit([cohort[0], unlabelled], genes)
    data = ok.slide_data(unlabelled, train=True)
    assert (data.extras["labels"] == -1).all()


def test_pretrained_encoder_variant_trains_on_frozen_cached_features(cohort, genes, tmp_path) -> None:
    m = create_method("hist2st", **FAST, encoder="color_stats", dim=32).fit(cohort[:2], genes)
    assert m.frozen and m.model_.encoder is None and m.model_.project.in_features == m.dims_["feature_dim"]
    assert "X_color_stats" in cohort[0].obsm  # features from the cache, stored on the slide
    assert not any(k.startswith("model.encoder") for k in m.get_state())
    data = m.slide_data(cohort[0], train=True)
    assert data.extras["views"].shape == (cohort[0].n_obs, 2, m.dims_["feature_dim"])
    ev = _score(m, cohort[2])
    assert ev["PCC(ACG)"] > 0.2 and ev["MSE(ACG)"] < _mean_mse(cohort, genes)
    m.save(tmp_path / "pe")
    np.testing.assert_allclose(load_method(tmp_path / "pe").predict(cohort[2]), m.predict(cohort[2]), rtol=1e-6)
    with pytest.raises(He2stInputError, match="frozen"):
        create_method("hist2st", encoder="color_stats", mode="finetune")
    with pytest.raises(He2stInputError, match="pretrained"):
        create_method("hist2st", mode="frozen")


def test_gat_variant(cohort, genes) -> None:
    m = create_method("hist2st", **FAST, gat=True, gat_layers=2, gat_heads=2).fit(cohort[:2], genes)
    net = m.model_
    assert net.transformer is None and net.gat_shared and net.gat_uses == 2
    # Weight sharing: the GAT's parameters are those of one layer.
    from torch_geometric.nn import GATConv

    d = net.gat.in_channels
    assert count_parameters(net.gat) == count_parameters(GATConv(d, d // 2, heads=2, add_self_loops=False))
    ev = _score(m, cohort[2])
    assert ev["PCC(ACG)"] > 0.2 and ev["MSE(ACG)"] < _mean_mse(cohort, genes)


def test_gat_variant_ignores_positions_and_shares_one_layer() -> None:
    torch.manual_seed(0)
    net = Hist2STNet(n_genes=3, dim=8, feature_dim=5, gat_layers=4, gat_heads=8, zinb=False, distill=False).eval()
    assert not any("embed" in name for name, _ in net.named_parameters())
    x = torch.randn(6, 5)
    edges = torch.tensor([[1, 0, 3, 2, 5, 4], [0, 1, 2, 3, 4, 5]])
    a = net(x, torch.zeros(6, 2, dtype=torch.long), edges)
    b = net(x, torch.randint(0, 64, (6, 2)), edges)
    torch.testing.assert_close(a, b)
    # The four uses run the same layer: a hook on it fires four times per forward.
    calls = []
    net.gat.register_forward_hook(lambda *_: calls.append(1))
    net(x, torch.zeros(6, 2, dtype=torch.long), edges)
    assert len(calls) == 4
    stacked = Hist2STNet(n_genes=3, dim=8, feature_dim=5, gat_layers=4, gat_heads=2, gat_variant="stacked").eval()
    assert not torch.allclose(
        stacked(x, torch.zeros(6, 2, dtype=torch.long), edges), stacked(x, torch.ones(6, 2, dtype=torch.long), edges)
    )
    with pytest.raises(He2stInputError, match="gat_variant"):
        create_method("hist2st", gat_variant="deep")


def test_save_load_roundtrip(cohort, fitted, regclass, tmp_path) -> None:
    for name, m in (("h2", fitted), ("rc", regclass)):
        m.save(tmp_path / name)
        loaded = load_method(tmp_path / name)
        assert loaded.params == m.params and loaded.dims_ == m.dims_
        np.testing.assert_array_equal(loaded.predict(cohort[2]), m.predict(cohort[2]))
    np.testing.assert_array_equal(load_method(tmp_path / "rc").predict_labels(cohort[2]), regclass.predict_labels(cohort[2]))
