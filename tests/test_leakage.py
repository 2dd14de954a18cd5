"""No test-slide information reaches a model, in any fold of a benchmark run.

The cohort gets a gene ``LEAK`` that is expressed (strongly, variably) in
``syn2`` only; the run saves every fitted model, and each fold is checked:

- the panel was chosen from the fold's training slides, and holds ``LEAK``
  only when ``syn2`` is a training slide;
- the target normaliser (min-max: per-gene min/max) equals one fitted on the
  training slides alone;
- the ridge scaler is the mean of the training spots' features;
- the k-NN bank holds exactly the training spots (provenance), no test spot.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _helpers import with_leak_gene

from he2st.benchmark.run import run_benchmark
from he2st.data import meta
from he2st.encoders import get_features
from he2st.methods import create_method, load_method
from he2st.pp.normalize import Normalizer

FEAT = {"encoder": "color_stats", "weights": None, "patch_px": 32}


@pytest.fixture(scope="module")
def leaky_cohort(tmp_path_factory):
    from he2st.datasets import synthetic

    base = synthetic(n_slides=3, n_spots=120, n_genes=20, patch_px=32, seed=0, root=tmp_path_factory.mktemp("syn"))
    return with_leak_gene(base)


@pytest.mark.parametrize("split", ["loso", "kfold:3"])
def test_no_test_information_in_any_fold(leaky_cohort, tmp_path, split) -> None:
    out = tmp_path / "run"
    cfg = {
        "out": str(out),
        "methods": ["mean", "ridge", "knn"],
        "split": split,
        "genes": "hvg:25",
        "min_spots": 10,
        "normalization": "minmax",
        "encoder": "color_stats",
        "method_params": {"ridge": {"patch_px": 32, "feature_scaling": "standard"}, "knn": {"patch_px": 32}},
        "save_models": True,
        "report": False,
        "clustering": False,
        "quiet": True,
    }
    run_benchmark(cfg, cohort=leaky_cohort)
    folds = json.loads((out / "config.json").read_text())["folds"]
    assert len(folds) == 3
    leak_seen = False
    for fold in folds:
        train = [leaky_cohort[i] for i in fold["train"]]
        test_obs = {(t, o) for t in fold["test"] for o in leaky_cohort[t].obs_names}
        for label in ("mean", "ridge", "knn"):
            rec = json.loads((out / "folds" / label / f"{fold['name']}.json").read_text())
            panel = rec["panel"]
            assert panel["params"]["slides"] == fold["train"]
            assert ("LEAK" in panel["genes"]) == ("syn2" in fold["train"])
            leak_seen |= "LEAK" in panel["genes"]
            model = load_method(out / "models" / label / fold["name"])
            assert model.genes == panel["genes"]
            ref = Normalizer("minmax").fit(train, model.genes)
            np.testing.assert_array_equal(model.normalizer_.min_, ref.min_)
            np.testing.assert_array_equal(model.normalizer_.max_, ref.max_)
            if label == "ridge":
                X = np.concatenate([get_features(s, **FEAT) for s in train]).astype(np.float64)
                np.testing.assert_allclose(model.scaler_mean_, X.mean(axis=0), rtol=1e-10)
                assert model.train_slides_ == fold["train"]
            if label == "knn":
                assert model.bank_slides_ == fold["train"]
                bank = {(model.bank_slides_[i], o) for i, o in zip(model.bank_slide_index_, model.bank_obs_)}
                assert not bank & test_obs
                assert bank == {(meta(s).slide_id, o) for s in train for o in s.obs_names}
                assert len(model.bank_targets_) == sum(s.n_obs for s in train)
    assert leak_seen  # the test can fail: LEAK does enter panels when syn2 trains


def _same_patient_copy(slide, new_id: str):
    """The slide under another id, same patient and image (a second section of the patient)."""
    s = slide.copy()
    info = dict(s.uns["he2st"])
    info["slide_id"] = new_id
    s.obs["slide"] = new_id
    s.uns["he2st"] = info
    return s


@pytest.mark.parametrize("name", ["bleep", "mclstexp"])
def test_validation_slide_of_the_test_patient_is_excluded(leaky_cohort, name) -> None:
    """A validation slide of the test patient sits in the bank; the patient-level guard must keep it out."""
    train, test = [leaky_cohort[0], leaky_cohort[1]], leaky_cohort[2]
    genes = [str(g) for g in test.var_names]
    val = _same_patient_copy(test, "syn2_val")
    params = dict(FEAT, epochs=2, batch_size=64, top_k=20, max_positions=64) if name == "mclstexp" else \
        dict(FEAT, epochs=2, batch_size=64, top_k=20)
    m = create_method(name, **params).fit(train, genes, val_slides=[val])
    origins = {s.slide_id: s.origin for s in m.bank_.slides}
    assert origins == {"syn0": "train", "syn1": "train", "syn2_val": "validation"}
    val_rows = set(m.bank_.rows_of(slide_ids=["syn2_val"]).tolist())
    # No training slide is of syn2's patient: "auto" sees a patient-level split and excludes the
    # validation section too, although it is in the bank.
    assert not val_rows & set(m.neighbors(test).indices.ravel().tolist())
    # Without the guard the twin section would be retrieved: the guard is what keeps it out.
    m.params["exclude_test_patient"] = False
    assert val_rows & set(m.neighbors(test).indices.ravel().tolist())
