"""Issue 12, faithful ports: LR schedules, per-slide validation, cosine selection with distance weights,
STimage's reported mean and ensemble spread."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from he2st.methods import create_method
from he2st.methods.nn import train as train_mod
from he2st.methods.nn.train import fit_module, inner_split, scheduled_lr
from he2st.retrieval.bank import ReferenceBank

FEAT = {"encoder": "color_stats", "weights": None, "patch_px": 32}


# -- learning-rate schedules ---------------------------------------------------------------


def _fit_recording_lr(monkeypatch: pytest.MonkeyPatch, epochs: int, **kw: object) -> tuple[list[float], list[float]]:
    """Train a tiny model; return the LR read from the optimiser in every epoch, and History.lr."""
    made: list[torch.optim.Optimizer] = []
    real = train_mod.make_optimizer

    def spy(*a: object, **k: object) -> torch.optim.Optimizer:
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(train_mod, "make_optimizer", spy)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    seen: list[float] = []

    def batches(epoch: int):
        seen.append(made[0].param_groups[0]["lr"])  # the rate this epoch trains at
        yield torch.arange(16)

    hist = fit_module(model, lambda r: ((model(x[r]) - y[r]) ** 2).mean(), batches, epochs=epochs, lr=1e-3,
                      optimizer="adamw", **kw)
    return seen, hist.lr


def test_cosine_schedule_read_from_the_optimizer(monkeypatch) -> None:
    seen, recorded = _fit_recording_lr(monkeypatch, 6, scheduler="cosine", lr_min=1e-5)
    # Stepped before every epoch (CMRCNet's train.py): epoch e trains at the (e+1)-th cosine value.
    want = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * (e + 1) / 6)) / 2 for e in range(6)]
    np.testing.assert_allclose(seen, want, rtol=1e-12)
    np.testing.assert_allclose(recorded, want, rtol=1e-12)
    assert seen[-1] == pytest.approx(1e-5) and all(a > b for a, b in zip(seen, seen[1:]))


def test_step_and_no_schedule(monkeypatch) -> None:
    seen, _ = _fit_recording_lr(monkeypatch, 5, scheduler="step", lr_step=2, lr_gamma=0.5)
    np.testing.assert_allclose(seen, [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])
    seen, _ = _fit_recording_lr(monkeypatch, 3)
    assert seen == [1e-3] * 3
    assert scheduled_lr(0, 10, 0.1, "none") == 0.1
    with pytest.raises(ValueError, match="scheduler"):
        scheduled_lr(0, 10, 0.1, "linear")


def test_cmrcnet_recipe_defaults() -> None:
    p = create_method("cmrcnet").params
    assert (p["scheduler"], p["lr"], p["lr_min"]) == ("cosine", 1e-4, 1e-5)
    assert (p["val_split"], p["val_fraction"], p["patience"]) == ("spot_per_slide", 0.2, None)
    # Every other contrastive and spot method keeps a constant rate unless asked.
    for name in ("bleep", "mclstexp", "stimage", "stnet", "deepspace"):
        assert create_method(name).params["scheduler"] == "none"


def test_spot_per_slide_split_holds_out_a_share_of_every_slide() -> None:
    slide_index = np.repeat([0, 1, 2], [50, 100, 10])
    tr, va = inner_split(slide_index, 3, "spot_per_slide", 0.2, seed=0)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(160))
    assert np.bincount(slide_index[va], minlength=3).tolist() == [10, 20, 2]


def test_contrastive_fit_uses_the_schedule(cohort, genes) -> None:
    m = create_method("bleep", **FEAT, epochs=4, batch_size=64, top_k=10, lr=1e-3, scheduler="cosine", lr_min=1e-4,
                      val_split="spot_per_slide", val_fraction=0.2).fit(cohort[:2], genes)
    assert m.history_["lr"][-1] == pytest.approx(1e-4) and m.history_["lr"][0] < 1e-3
    assert len(m.history_["val"]) == 4  # a validation loss every epoch; the best epoch is kept
    assert m.bank_.n == cohort[0].n_obs + cohort[1].n_obs  # held-out spots stay in the bank


# -- retrieval: select by one metric, weight by another ------------------------------------

Q = np.array([[1.0, 0.0]], dtype=np.float32)
#: cos with Q: a 1, b 0.98, c 0.74, d -1; L2 to Q: a 1, b 0.51, c 0.9, d 2.
EMB = np.array([[2.0, 0.0], [0.5, 0.1], [1.0, 0.9], [-1.0, 0.0]], dtype=np.float32)
VAL = np.array([[10.0], [20.0], [30.0], [40.0]], dtype=np.float32)


def _hand_banked(name: str, cohort, genes, monkeypatch, **params: object):
    """A fitted method whose bank is the 4-row hand example and whose query is ``Q``."""
    m = create_method(name, **FEAT, epochs=1, batch_size=64, top_k=2, **params).fit(cohort[:2], genes)
    m.bank_ = ReferenceBank.from_blocks([(EMB, np.repeat(VAL, len(genes), axis=1), "hand", "P_hand", "train")],
                                        metric=m.params["select_metric"], genes=m.genes)
    monkeypatch.setattr(m, "image_embeddings", lambda slide: Q)
    return m


def test_mclstexp_selects_by_cosine_and_weights_by_inverse_square_l2(cohort, genes, monkeypatch) -> None:
    m = _hand_banked("mclstexp", cohort, genes, monkeypatch, max_positions=64)
    assert (m.params["select_metric"], m.params["weight_metric"], m.params["aggregation"]) == ("cosine", "l2", "inverse_square")
    nb = m.neighbors(cohort[2])
    assert sorted(nb.indices[0].tolist()) == [0, 1]  # the cosine top 2 (a, b); the L2 top 2 would be b, c
    w_nb = m.weighting_neighbors(Q, nb)
    order = np.argsort(w_nb.indices[0])
    np.testing.assert_allclose(w_nb.distances[0][order], [1.0, math.sqrt(0.26)], rtol=1e-6)
    wa, wb = 1 / 1.0**2, 1 / 0.26  # d^-2
    want = (wa * 10 + wb * 20) / (wa + wb)
    np.testing.assert_allclose(m.predict(cohort[2])[0], want, rtol=1e-5)
    # Selecting by L2 too (one metric for both) picks b and c instead.
    m2 = _hand_banked("mclstexp", cohort, genes, monkeypatch, max_positions=64, select_metric="l2")
    assert sorted(m2.neighbors(cohort[2]).indices[0].tolist()) == [1, 2]


def test_bleep_weighted_average_option(cohort, genes, monkeypatch) -> None:
    # BLEEP_inference.ipynb "weighted_average": cosine top k, weights exp(-squared L2 distance).
    m = _hand_banked("bleep", cohort, genes, monkeypatch, aggregation="softmax", weight_metric="l2")
    wa, wb = math.exp(-1.0), math.exp(-0.26)
    np.testing.assert_allclose(m.predict(cohort[2])[0], (wa * 10 + wb * 20) / (wa + wb), rtol=1e-5)
    # The default: the plain mean of the cosine top k.
    np.testing.assert_allclose(_hand_banked("bleep", cohort, genes, monkeypatch).predict(cohort[2])[0], 15.0, rtol=1e-6)


def test_legacy_metric_parameter_selects_and_weights() -> None:
    p = create_method("mclstexp", metric="l1").params
    assert (p["select_metric"], p["weight_metric"]) == ("l1", "l1") and "metric" not in p


# -- STimage ---------------------------------------------------------------------------------

STIMAGE = dict(FEAT, stain=None, normalization="log1p", batch_size=32)


def test_stimage_reports_the_mean_on_the_log_scale(cohort, genes) -> None:
    from he2st.methods.stimage import exact_log1p_moments

    m = create_method("stimage", **STIMAGE, lr=3e-2, epochs=3, n_models=1).fit(cohort[:2], genes)
    assert m.params["moments"] == "exact"
    x = torch.from_numpy(np.ascontiguousarray(m._inputs(cohort[2])))
    with torch.no_grad():
        mu, theta = m.models_[0](x)
    mean, _ = exact_log1p_moments(mu.double(), theta.double(), 1.0)
    np.testing.assert_allclose(m.predict(cohort[2]), mean, rtol=1e-5, atol=1e-6)
    # E[log1p X] < log1p E[X] (Jensen): the delta plug-in is a different, larger number.
    assert (mean <= np.log1p(mu.double().numpy()) + 1e-9).all()


@pytest.mark.parametrize("member_data", ["same", "bootstrap"])
def test_stimage_members_differ_and_spread_is_positive(cohort, genes, member_data) -> None:
    # STimage's own lr (1e-5) and one epoch: what separates the members is their initialisation.
    m = create_method("stimage", **STIMAGE, epochs=1, n_models=3, member_data=member_data).fit(cohort[:2], genes)
    w = [mod.head.mu.weight.detach().numpy() for mod in m.models_]
    assert not np.allclose(w[0], w[1]) and not np.allclose(w[1], w[2])
    outs = m._member_outputs(cohort[2])
    spread = np.stack([o["mean"] for o in outs]).std(axis=0)
    assert spread.mean() > 1e-3
    # Zero-weight heads start every member at the per-gene mean: hardly any spread.
    flat = create_method("stimage", **STIMAGE, epochs=1, n_models=3, head_init="mean").fit(cohort[:2], genes)
    flat_spread = np.stack([o["mean"] for o in flat._member_outputs(cohort[2])]).std(axis=0)
    assert flat_spread.mean() < 0.1 * spread.mean()


def test_member_rows_bootstrap() -> None:
    from he2st.methods.families.spot import member_rows

    rows = np.arange(10, 60)
    assert member_rows(rows, "same", 0) is rows
    a, b = member_rows(rows, "bootstrap", 0), member_rows(rows, "bootstrap", 1)
    assert len(a) == len(rows) and set(a) <= set(rows) and len(set(a)) < len(rows) and not np.array_equal(a, b)

