"""SpaHGC and EGGN: the shared exemplar-graph parts, the two methods, leakage and persistence.

Features: the non-neural ``color_stats`` encoder on 32 px patches; small widths so that a
fit takes seconds on a CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _helpers import with_leak_gene

from he2st.errors import He2stInputError
from he2st.evaluate.metrics import evaluate_slide
from he2st.methods import create_method, get_method_class, load_method
from he2st.methods.nn.hetero import (
    CS,
    RS,
    TS,
    CrossNodeAttentionPool,
    CrossNodeDualAttention,
    ExemplarAttentionHead,
    GraphExemplarBridging,
    edge_softmax_sum,
    exemplar_graph,
    feature_masks,
    similarity_graph,
)
from he2st.methods.nn.losses import cosine_consistency_loss, pearson_loss
from he2st.retrieval import BankLeakageError

FEAT = {"encoder": "color_stats", "weights": None, "patch_px": 32}
FAST = {
    "spahgc": {**FEAT, "hidden": 64, "layers": 2, "epochs": 100, "lr": 1e-3},
    "eggn": {**FEAT, "hidden": 32, "layers": 2, "score_dim": 32, "epochs": 60, "lr": 2e-3},
}
METHODS = list(FAST)


# -- graph builder on a hand-made example --------------------------------------------------------


def _toy():
    """Six target spots on a 2 x 3 grid (pitch 1); a bank of 5 rows; two exemplars per spot."""
    xy = np.array([[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]], dtype=float)
    x = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)
    exemplars = np.array([[4, 1], [1, 4], [2, -1], [0, 2], [4, 0], [1, 1]])
    bank_x = np.eye(5, 3, dtype=np.float32) * 10
    bank_y = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    return xy, x, exemplars, bank_x, bank_y


def test_graph_builder_counts_and_directions() -> None:
    xy, x, ex, bx, by = _toy()
    g = exemplar_graph(xy, x, ex, bx, by, q=2, rs_k=1)
    # the reference nodes are the unique retrieved rows, features = [embedding || expression]
    assert g["reference"].rows.tolist() == [0, 1, 2, 4]
    np.testing.assert_array_equal(g["reference"].x.numpy(), np.concatenate([bx[[0, 1, 2, 4]], by[[0, 1, 2, 4]]], 1))
    assert g.n_genes == 2
    # TS: every spot receives exactly q = 2 edges from its nearest spots (ties by index)
    ts = g[TS].edge_index.numpy()
    assert ts.shape == (2, 12)
    assert sorted(ts[0, ts[1] == 0].tolist()) == [1, 3]
    assert sorted(ts[0, ts[1] == 4].tolist()) == [1, 3]  # distance 1: spots 1, 3, 5 -> the two smallest indices
    # CS: reference -> target, one edge per valid retrieved row (spot 2 has one; spot 5 retrieved row 1 twice)
    cs = g[CS].edge_index.numpy()
    assert cs.shape == (2, 11)
    rows = g["reference"].rows.numpy()
    pairs = {(int(rows[s]), int(t)) for s, t in cs.T}
    assert pairs == {(4, 0), (1, 0), (1, 1), (4, 1), (2, 2), (0, 3), (2, 3), (4, 4), (0, 4), (1, 5)}
    assert (cs[1] < 6).all() and (cs[0] < 4).all()
    # RS: each of the 4 reference nodes receives rs_k = 1 edge from another reference node
    rs = g[RS].edge_index.numpy()
    assert rs.shape == (2, 4) and sorted(rs[1].tolist()) == [0, 1, 2, 3] and (rs[0] != rs[1]).all()


@pytest.mark.parametrize("off", ["ts", "cs", "rs"])
def test_each_switch_removes_exactly_its_edge_type(off) -> None:
    xy, x, ex, bx, by = _toy()
    full = exemplar_graph(xy, x, ex, bx, by, q=2, rs_k=1)
    part = exemplar_graph(xy, x, ex, bx, by, q=2, rs_k=1, edges=[e for e in ("ts", "cs", "rs") if e != off])
    gone = {"ts": TS, "cs": CS, "rs": RS}[off]
    assert gone not in part.edge_types
    assert set(full.edge_types) - set(part.edge_types) == {gone}
    for et in part.edge_types:
        assert torch.equal(part[et].edge_index, full[et].edge_index)
    assert torch.equal(part["reference"].x, full["reference"].x)  # the nodes stay


def test_graph_builder_bad_input_and_distance_cap() -> None:
    xy, x, ex, bx, by = _toy()
    with pytest.raises(He2stInputError, match="exemplars"):
        exemplar_graph(xy, x, ex[:3], bx, by)
    with pytest.raises(He2stInputError, match="unknown edge"):
        exemplar_graph(xy, x, ex, bx, by, edges=["ts", "xx"])
    # within 1 pitch a corner spot of the 2 x 3 grid has 2 neighbours, a middle one 3 (capped at q = 5)
    g = exemplar_graph(xy, x, ex, bx, by, q=5, ts_max_distance=1.0)
    ts = g[TS].edge_index.numpy()
    assert np.bincount(ts[1], minlength=6).tolist() == [2, 3, 2, 2, 3, 2]


def test_similarity_graph_excludes_self_even_with_duplicates() -> None:
    x = np.array([[0, 0], [0, 0], [5, 5], [5, 6]], dtype=np.float32)
    e = similarity_graph(x, 1, "l2")
    assert e.tolist() == [[1, 0, 3, 2], [0, 1, 2, 3]]


# -- layers against hand-worked values --------------------------------------------------------------


def test_masks_are_complementary_random_or_none() -> None:
    x = torch.ones(200, 50)
    g = torch.Generator().manual_seed(0)
    a, b = feature_masks(x, 0.8, "complementary", g)
    torch.testing.assert_close(a + b, x)
    assert abs(float((a == 0).float().mean()) - 0.8) < 0.02
    a, b = feature_masks(x, 0.8, "random", g)
    assert not torch.equal(a + b, x) and abs(float((b == 0).float().mean()) - 0.8) < 0.02
    a, b = feature_masks(x, 0.8, "none", g)
    assert a is x and b is x


def test_edge_attention_single_edge_returns_its_value_and_lonely_nodes_get_zero() -> None:
    q, k, v = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    out = edge_softmax_sum(q, k, v, torch.tensor([0, 1, 2]), 4, heads=2)
    torch.testing.assert_close(out[:3], v)  # a softmax over one edge is 1
    assert torch.equal(out[3], torch.zeros(8))
    # two edges into one node with equal logits: the plain mean of their values
    out = edge_softmax_sum(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([[1.0, 2, 3, 4], [3, 4, 5, 6]]),
                           torch.tensor([0, 0]), 1, heads=1)
    torch.testing.assert_close(out, torch.tensor([[2.0, 3, 4, 5]]))


def test_cnap_residual_and_cnda_directions() -> None:
    torch.manual_seed(0)
    pool = CrossNodeAttentionPool(8, heads=4)
    t, r = torch.randn(3, 8), torch.randn(2, 8)
    edges = torch.tensor([[0, 1], [0, 0]])  # both references -> target 0
    out = pool(t, r, edges)
    head = pool.head(t)
    torch.testing.assert_close(out[1:], head[1:])  # targets without references keep W_h t
    assert not torch.allclose(out[0], head[0])
    cnda = CrossNodeDualAttention(8, heads=4, dropout=0.0).eval()
    to_ref, to_t = cnda(r, t, torch.randn(2, 8), edges)
    assert to_ref.shape == (2, 8) and to_t.shape == (3, 8)
    # targets 1 and 2 receive nothing: only the output bias (zero at initialisation)
    torch.testing.assert_close(to_t[1:], torch.zeros(2, 8))


def test_geb_gates_and_head_pooling() -> None:
    torch.manual_seed(0)
    geb = GraphExemplarBridging(8, score_dim=4)
    r, t, y = torch.randn(2, 8), torch.randn(3, 8), torch.randn(2, 8)
    edges = torch.tensor([[0, 1, 1], [0, 0, 2]])
    to_ref, to_t = geb(r, t, y, edges)
    assert to_ref.shape == (2, 8) and to_t.shape == (3, 8)
    # window 1 has no exemplar: its message is the mean of nothing (0) + bias (0) through out_window
    torch.testing.assert_close(to_t[1], geb.out_window.bias)
    with pytest.raises(He2stInputError, match="score_dim"):
        GraphExemplarBridging(8, score_dim=5)
    head = ExemplarAttentionHead(8, temperature=0.1, lam=0.5)
    h = head.head(t)
    out = head(t, r, torch.tensor([[0], [2]]))
    # one exemplar: per-channel softmax weight 1, so out = h + lambda * e
    torch.testing.assert_close(out[2], h[2] + 0.5 * r[0])
    torch.testing.assert_close(out[:2], h[:2])


def test_losses_on_hand_values() -> None:
    y = torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 1.0]])
    assert float(pearson_loss(y, y)) == pytest.approx(0.0, abs=1e-6)
    assert float(pearson_loss(-y, y)) == pytest.approx(2.0, abs=1e-6)
    assert float(pearson_loss(torch.ones(3, 2), y)) == pytest.approx(1.0)  # constant prediction: r = 0
    a = torch.randn(5, 4)
    assert float(cosine_consistency_loss(a, 3 * a)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_consistency_loss(a, -a)) == pytest.approx(4.0, abs=1e-6)


# -- the methods on the synthetic cohort -----------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from he2st.datasets import synthetic

    return synthetic(n_slides=4, n_spots=120, n_genes=20, patch_px=32, seed=0, root=tmp_path_factory.mktemp("syn"))


@pytest.fixture(scope="module")
def genes(cohort):
    return list(map(str, cohort[0].var_names))


@pytest.fixture(scope="module")
def fitted(cohort, genes):
    return {name: create_method(name, **FAST[name]).fit(cohort[:3], genes) for name in METHODS}


def test_defaults_are_the_papers() -> None:
    d = get_method_class("spahgc").defaults
    assert (d["q"], d["top_k"], d["alpha"], d["beta"], d["masking"]) == (5, 7, 0.8, 0.9, "complementary")
    assert (d["layers"], d["heads"], d["hidden"], d["cnda"], d["cnap"]) == (4, 4, 256, True, True)
    assert (d["epochs"], d["lr"], d["weight_decay"], d["optimizer"]) == (200, 1e-4, 1e-4, "adamw")
    assert (d["select_metric"], d["rs_k"], d["rs_metric"]) == ("l1", 3, "l2")
    assert (d["pcc_weight"], d["target_contrast_weight"], d["reference_contrast_weight"]) == (0.5, 0.2, 0.1)
    e = get_method_class("eggn").defaults
    assert (e["encoder"], e["patch_px"], e["top_k"], e["select_metric"], e["q"], e["rs_k"]) == ("resnet18", 256, 6, "l1", 5, 3)
    assert (e["hidden"], e["layers"], e["score_dim"], e["temperature"], e["lam"]) == (512, 4, 128, 0.1, 0.1)
    assert (e["epochs"], e["lr"], e["weight_decay"], e["pcc_weight"]) == (300, 5e-4, 1e-4, 0.5)
    assert e["ts_max_distance"] == pytest.approx(2**0.5, abs=1e-3)
    for name in METHODS:
        assert get_method_class(name).family == "graph"


@pytest.mark.parametrize("name", METHODS)
def test_beats_mean_on_held_out_slide(cohort, genes, fitted, name) -> None:
    test = cohort[3]
    mean = create_method("mean").fit(cohort[:3], genes)
    model = fitted[name]
    y = model.targets(test)
    ev = evaluate_slide(y, model.predict(test), genes).as_dict()
    base = evaluate_slide(y, mean.predict(test), genes).as_dict()
    assert ev["PCC(ACG)"] > 0.25, ev
    assert ev["MSE(ACG)"] < base["MSE(ACG)"], (ev, base)
    assert ev["n_nan(ACG)"] == 0
    fit = model.history_["train_fit"]
    assert fit["mse_model"] < fit["mse_mean_predictor"]
    assert model.history_["train"][-1] < model.history_["train"][0]
    # the bank holds exactly the training spots, with their provenance
    assert model.bank_.slide_ids == ["syn0", "syn1", "syn2"] and model.bank_.n == 360
    assert {s.origin for s in model.bank_.slides} == {"train"}


@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip_and_leakage_guard(cohort, fitted, name, tmp_path) -> None:
    model = fitted[name]
    model.save(tmp_path / "m")
    again = load_method(tmp_path / "m")
    assert type(again) is type(model) and again.params == model.params
    np.testing.assert_array_equal(again.predict(cohort[3]), model.predict(cohort[3]))
    assert again.bank_.slide_ids == model.bank_.slide_ids
    # a training slide cannot be predicted from the bank that holds it ...
    with pytest.raises(BankLeakageError, match="syn0"):
        model.predict(cohort[0])
    # ... and the graph of a new slide holds only bank rows
    g = model.graph(cohort[3])
    assert int(g["reference"].rows.max()) < model.bank_.n


SWITCHES = {
    "spahgc": [{"edges": ["cs", "rs"]}, {"edges": ["ts", "rs"]}, {"edges": ["ts", "cs"]}, {"masking": "random"},
               {"masking": "none"}, {"alpha": 0.3}, {"beta": 0.5}, {"cnda": False}, {"cnap": False}, {"q": 2},
               {"top_k": 3}, {"target_encoder": "frozen_copy"}, {"inference": "unmasked"},
               {"inference": "scaled"}],
    "eggn": [{"edges": ["cs", "rs"]}, {"edges": ["ts", "rs"]}, {"edges": ["ts", "cs"]}, {"bridging": False},
             {"head": "linear"}, {"q": 2}, {"top_k": 3}],
}


@pytest.mark.parametrize("name", METHODS)
def test_every_ablation_switch_changes_the_model(cohort, genes, name) -> None:
    tiny = {**FAST[name], "epochs": 2}
    base = create_method(name, **tiny).fit(cohort[:2], genes).predict(cohort[3])
    for switch in SWITCHES[name]:
        pred = create_method(name, **tiny, **switch).fit(cohort[:2], genes).predict(cohort[3])
        assert np.isfinite(pred).all(), switch
        assert not np.allclose(pred, base, atol=1e-6), switch


def test_bad_parameters_are_specific() -> None:
    with pytest.raises(He2stInputError, match="masking"):
        create_method("spahgc", masking="half")
    with pytest.raises(He2stInputError, match="alpha"):
        create_method("spahgc", alpha=1.0)
    with pytest.raises(He2stInputError, match="unknown edge"):
        create_method("eggn", edges=["ts", "ww"])
    with pytest.raises(He2stInputError, match="head"):
        create_method("eggn", head="mlp")


def test_one_training_slide_is_refused(cohort, genes) -> None:
    with pytest.raises(He2stInputError, match="at least 2 training slides"):
        create_method("eggn", **FAST["eggn"]).fit(cohort[:1], genes)


# -- leakage: a gene expressed only in the test slide -------------------------------------------------


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    from he2st.datasets import synthetic

    base = synthetic(n_slides=4, n_spots=60, n_genes=12, patch_px=32, seed=4, root=tmp_path_factory.mktemp("leak"))
    return with_leak_gene(base)


@pytest.mark.parametrize("split", ["loso", "nested"])
def test_reference_nodes_come_only_from_the_folds_training_slides(leaky, tmp_path, split) -> None:
    from he2st.benchmark.run import run_benchmark

    out = tmp_path / "run"
    tiny = {**FEAT, "hidden": 16, "layers": 1, "epochs": 2, "score_dim": 16}
    cfg = {
        "out": str(out), "methods": ["spahgc", "eggn"], "split": split, "genes": "hvg:13", "min_spots": 10,
        "method_params": {"spahgc": {k: v for k, v in tiny.items() if k != "score_dim"}, "eggn": tiny},
        "save_models": True, "report": False, "clustering": False, "quiet": True,
    }
    if split == "nested":
        # inner leave-one-out over the outer training slides chooses q; each inner fit builds its
        # bank from its own training slides (2 of them), so the outer test slide is never a reference
        cfg["grid"] = {"spahgc": {"q": [2, 3]}}
    run_benchmark(cfg, cohort=leaky)
    folds = json.loads((out / "config.json").read_text())["folds"]
    assert len(folds) == 4
    for fold in folds:
        for label in ("spahgc", "eggn"):
            model = load_method(out / "models" / label / fold["name"])
            bank_ids = model.bank_.slide_ids
            # the bank is the fold's training slides, never the test slide (nor, nested, the validation one)
            assert set(bank_ids) <= set(fold["train"]), (fold, bank_ids)
            assert not set(bank_ids) & set(fold["test"])
            assert not set(bank_ids) & set(fold.get("val", []))
            if "LEAK" in model.genes:
                col = model.genes.index("LEAK")
                # LEAK is expressed only in syn2, so its bank column is all zeros unless syn2 trains
                assert (np.asarray(model.bank_.values)[:, col] != 0).any() == ("syn2" in bank_ids)
            test = leaky[fold["test"][0]]
            g = model.graph(test)
            rows = g["reference"].rows.numpy()
            ref_slides = {s.slide_id for s in model.bank_.slides for r in rows if s.start <= r < s.stop}
            assert fold["test"][0] not in ref_slides
