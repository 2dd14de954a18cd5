"""ST-Net (he2st.methods.stnet) and the shared spot-regression machinery."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from he2st.errors import He2stInputError
from he2st.methods import create_method, load_method
from he2st.methods.nn.inputs import to_unit
from he2st.methods.nn.train import inner_split
from _helpers import mean_pcc

FAST = dict(encoder="color_stats", weights=None, patch_px=32, tta=False, lr=1e-3, epochs=12)


def test_defaults_are_the_papers() -> None:
    m = create_method("stnet")
    p = m.params
    assert (p["encoder"], p["patch_px"], p["optimizer"], p["momentum"]) == ("densenet121", 224, "sgd", 0.9)
    assert (p["lr"], p["batch_size"], p["epochs"], p["patience"]) == (1e-6, 32, 50, None)
    assert p["tta"] is True and p["augment"] == "stnet" and (p["normalization"], p["train_normalization"]) == ("cpm_log1p", "stnet_norm")
    assert p["mode"] == "frozen"
    assert m.capabilities.finetune and m.capabilities.frozen_features


def test_bad_params() -> None:
    with pytest.raises(He2stInputError, match="mode"):
        create_method("stnet", mode="end2end")
    with pytest.raises(He2stInputError, match="val_fraction"):
        create_method("stnet", val_fraction=1.5)
    with pytest.raises(He2stInputError, match="unknown parameter"):
        create_method("stnet", learning_rate=1.0)


def test_loss_hand_values() -> None:
    m = create_method("stnet")
    out = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = (torch.zeros(2, 2),)
    # Per spot: mean over genes of squared error (2.5, 12.5); summed over the batch as in ST-Net.
    assert m._loss(out, y).item() == pytest.approx(15.0)
    assert m._val_loss(out, y).item() == pytest.approx(7.5)


def test_inner_split() -> None:
    idx = np.repeat(np.arange(4), 10)
    tr, va = inner_split(idx, 4, "auto", 0.25, seed=0)  # 4 slides -> one whole slide held out
    assert len(va) == 10 and len(np.unique(idx[va])) == 1
    assert np.intersect1d(tr, va).size == 0 and len(tr) + len(va) == 40
    tr, va = inner_split(idx[:20], 2, "auto", 0.2, seed=0)  # 2 slides -> random 20 % of spots
    assert len(va) == 4
    tr, va = inner_split(idx, 4, "spot", 0.0, seed=0)
    assert len(va) == 0 and len(tr) == 40
    with pytest.raises(He2stInputError, match="2 training slides"):
        inner_split(idx[:10], 1, "slide", 0.2, seed=0)


def test_starts_from_the_mean_predictor(cohort) -> None:
    genes = list(cohort[0].var_names)
    m = create_method("stnet", **{**FAST, "lr": 0.0, "epochs": 1, "val_fraction": 0.0})
    m.fit([cohort[0], cohort[1]], genes)
    pred = m.predict(cohort[2])
    # The mean of the training targets on ST-Net's own scale, mapped to the evaluation scale.
    train_mean = np.concatenate([m.train_targets(cohort[0]), m.train_targets(cohort[1])]).mean(axis=0)
    expected = m.to_eval_scale(np.broadcast_to(train_mean, pred.shape))
    np.testing.assert_allclose(pred, expected, rtol=1e-5, atol=1e-5)


def test_frozen_learns_and_beats_mean(cohort, tmp_path) -> None:
    genes = list(cohort[0].var_names)
    train, test = [cohort[0], cohort[1]], cohort[2]
    m = create_method("stnet", **FAST).fit(train, genes)
    pred = m.predict(test)
    y = m.targets(test)
    assert pred.shape == (test.n_obs, len(genes)) and pred.dtype == np.float32
    assert mean_pcc(y, pred) > 0.3
    # MSE against the mean predictor on ST-Net's own (training) scale: on the common
    # cpm_log1p scale the pseudocount-1 log of ``--norm`` lifts zero-count spots, which
    # the leak-free map cannot undo (docs/fidelity.md#st-net).
    own = m.train_targets(test)
    base = np.concatenate([m.train_targets(s) for s in train]).mean(axis=0)
    raw = m._member_outputs(test)[0]["mean"]
    assert np.mean((raw - own) ** 2) < 0.8 * np.mean((base - own) ** 2)
    assert 0 <= m.history_[0]["best_epoch"] < FAST["epochs"]
    # Save / load gives identical predictions.
    m2 = load_method(m.save(tmp_path / "stnet"))
    np.testing.assert_array_equal(m2.predict(test), pred)


def test_finetune_step_and_tta(cohort, tmp_path) -> None:
    genes = list(cohort[0].var_names)
    small, test = cohort[0][:24].copy(), cohort[2][:8].copy()  # tiny: a few CPU steps
    params = dict(
        mode="finetune", encoder="resnet18", weights=None, patch_px=32, input_px=32, lr=1e-3, epochs=1,
        batch_size=12, val_fraction=0.0, augment="stnet", tta=True,
    )
    m = create_method("stnet", **params).fit([small], genes)
    model = m.models_[0]
    # End to end: the backbone moved away from its initialisation.
    from he2st.encoders import create_encoder

    init = create_encoder("resnet18", seed=0).model.state_dict()
    moved = model.backbone.model.state_dict()
    assert not torch.equal(init["conv1.weight"], moved["conv1.weight"])
    # Make the head sensitive to orientation so that the 8 views really differ.
    with torch.no_grad():
        torch.manual_seed(1)
        model.head.weight.normal_(0.0, 0.5)
    x = to_unit(torch.from_numpy(m._inputs(test)))
    from he2st.image.augment import dihedral

    with torch.no_grad():
        views = [model(dihedral(x, k)).numpy() for k in range(8)]
    assert np.abs(views[1] - views[0]).max() > 1e-3  # the CNN is not rotation invariant
    pred = m.predict(test)
    # TTA averages on the training scale; predict() then maps to the evaluation scale.
    np.testing.assert_allclose(pred, m.to_eval_scale(np.mean(views, axis=0)), rtol=1e-4, atol=1e-4)
    m.params["tta"] = False
    np.testing.assert_allclose(m.predict(test), m.to_eval_scale(views[0]), rtol=1e-4, atol=1e-4)
    m.params["tta"] = True
    m2 = load_method(m.save(tmp_path / "ft"))
    np.testing.assert_allclose(m2.predict(test), pred, rtol=1e-6, atol=1e-6)
