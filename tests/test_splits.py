"""Splits: LOSO, LOPO, k-fold, nested, named files and their validation."""

from __future__ import annotations

import json

import pytest

from he2st.evaluate.splits import (
    Fold,
    SplitError,
    kfold_by_slide,
    leave_one_patient_out,
    leave_one_slide_out,
    make_splits,
    named_split,
    nested_leave_one_out,
)

IDS = ["A1", "A2", "B1", "B2", "C1"]
PATIENTS = {"A1": "A", "A2": "A", "B1": "B", "B2": "B", "C1": "C"}


def test_loso() -> None:
    folds = leave_one_slide_out(IDS)
    assert [f.name for f in folds] == IDS
    assert folds[2].test == ("B1",) and folds[2].train == ("A1", "A2", "B2", "C1") and folds[2].val == ()
    with pytest.raises(SplitError, match="at least 2"):
        leave_one_slide_out(["A1"])


def test_lopo_keeps_patients_together() -> None:
    folds = leave_one_patient_out(IDS, PATIENTS)
    assert [f.name for f in folds] == ["patient-A", "patient-B", "patient-C"]
    assert folds[0].test == ("A1", "A2") and folds[0].train == ("B1", "B2", "C1")
    with pytest.raises(SplitError, match="no patient"):
        leave_one_patient_out(IDS, {"A1": "A"})


def test_kfold_covers_each_slide_once_and_is_seeded() -> None:
    folds = kfold_by_slide(IDS, k=2, seed=3)
    tested = [s for f in folds for s in f.test]
    assert sorted(tested) == sorted(IDS)
    assert sorted(len(f.test) for f in folds) == [2, 3]
    for f in folds:
        assert set(f.train) | set(f.test) == set(IDS) and not set(f.train) & set(f.test)
    assert kfold_by_slide(IDS, k=2, seed=3) == folds
    assert any(kfold_by_slide(IDS, k=2, seed=s) != folds for s in range(4, 10))
    with pytest.raises(SplitError, match="only 5 slides"):
        kfold_by_slide(IDS, k=6)
    with pytest.raises(SplitError, match=">= 2"):
        kfold_by_slide(IDS, k=1)


def test_nested_inner_folds_only_use_outer_training_slides() -> None:
    folds = nested_leave_one_out(IDS)
    assert len(folds) == 5
    for f in folds:
        assert len(f.inner) == 4
        for inner in f.inner:
            assert set(inner.slides) <= set(f.train)
            assert f.test[0] not in inner.slides
    assert folds[0].inner[0].name == "A1-inner-A2"
    by_patient = nested_leave_one_out(IDS, group="patient", patients=PATIENTS)
    assert [len(f.inner) for f in by_patient] == [2, 2, 2]
    assert by_patient[0].inner[0].test == ("B1", "B2")
    # two slides: each outer fold has one training slide, so no inner folds
    assert [f.inner for f in nested_leave_one_out(["x", "y"])] == [(), ()]


def test_named_split_json_and_toml(tmp_path) -> None:
    js = tmp_path / "ood.json"
    js.write_text(json.dumps({"train": ["A1", "A2", "B1", "B2"], "validation": ["C1"], "test": ["X"]}))
    (f,) = named_split(js)
    assert f.name == "ood" and f.train == ("A1", "A2", "B1", "B2") and f.val == ("C1",) and f.test == ("X",)
    toml = tmp_path / "two.toml"
    toml.write_text(
        '[[folds]]\nname = "f0"\ntrain = ["A1", "A2"]\ntest = ["B1"]\n'
        '[[folds]]\nname = "f1"\ntrain = ["B1"]\nval = ["A2"]\ntest = ["A1"]\n'
    )
    folds = named_split(toml, IDS)
    assert [x.name for x in folds] == ["f0", "f1"] and folds[1].val == ("A2",)
    assert make_splits(str(toml), IDS) == folds
    assert Fold.from_dict(folds[1].to_dict()) == folds[1]


@pytest.mark.parametrize(
    "content, match",
    [
        ({"train": ["A1", "ZZ9"], "test": ["B1"]}, r"'ZZ9'.*not in the cohort"),
        ({"train": ["A1", "B1"], "test": ["B1"]}, r"\['B1'\] are in both train and test"),
        ({"train": ["A1"], "validation": ["A1"], "test": ["B1"]}, "both train and validation"),
        ({"train": [], "test": ["B1"]}, "no training slides"),
        ({"train": ["A1"], "test": []}, "no test slides"),
        ({"train": ["A1"]}, "missing the 'test'"),
        ({"train": "A1", "test": ["B1"]}, "must be a list"),
        ({"train": ["A1"], "test": ["B1"], "tset": ["C1"]}, "unknown key"),
        ({"train": ["A1", "A1"], "test": ["B1"]}, "listed twice"),
    ],
)
def test_bad_split_files(tmp_path, content, match) -> None:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(content))
    with pytest.raises(SplitError, match=match) as info:
        named_split(p, IDS)
    assert "bad.json" in str(info.value)


def test_unreadable_split_files(tmp_path) -> None:
    with pytest.raises(SplitError, match="does not exist"):
        named_split(tmp_path / "nope.json")
    p = tmp_path / "broken.toml"
    p.write_text("train = [")
    with pytest.raises(SplitError, match="not valid TOML"):
        named_split(p)
    y = tmp_path / "split.yaml"
    y.write_text("train: [A1]")
    with pytest.raises(SplitError, match=".json or .toml"):
        named_split(y)


def test_make_splits_specs() -> None:
    assert len(make_splits("loso", IDS)) == 5
    assert len(make_splits("kfold:2", IDS, seed=1)) == 2
    assert all(f.inner for f in make_splits("nested", IDS))
    with pytest.raises(SplitError, match="unknown split"):
        make_splits("leave-some-out", IDS)
    with pytest.raises(SplitError, match="kfold:K"):
        make_splits("kfold:x", IDS)


def test_named_split_validation_mode(tmp_path) -> None:
    from he2st.evaluate.splits import with_validation

    js = tmp_path / "ood.json"
    js.write_text(json.dumps({"train": ["A1", "A2"], "validation": ["C1"], "test": ["X"]}))
    (f,) = named_split(js)
    assert f.val_mode == "score"  # Jiang et al.: validation slides are an ID test, never tuned on
    assert named_split(js, validation="select")[0].val_mode == "select"
    assert make_splits(str(js), ["A1", "A2", "C1", "X"], validation="select")[0].val_mode == "select"
    js.write_text(json.dumps({"train": ["A1"], "validation": ["C1"], "test": ["X"], "validation_mode": "select"}))
    assert named_split(js)[0].val_mode == "select"
    toml = tmp_path / "two.toml"
    toml.write_text(
        'validation_mode = "select"\n[[folds]]\ntrain = ["A1"]\nval = ["A2"]\ntest = ["B1"]\n'
        '[[folds]]\ntrain = ["B1"]\nval = ["A2"]\ntest = ["A1"]\nvalidation_mode = "score"\n'
    )
    assert [x.val_mode for x in named_split(toml)] == ["select", "score"]
    # Folds built in code pick the epoch on their validation slides, as before.
    assert Fold("f", ("A1",), ("A2",), ("B1",)).val_mode == "select"
    g = Fold.from_dict(f.to_dict())
    assert g == f and f.to_dict()["validation_mode"] == "score"
    assert with_validation([g], "select")[0].val_mode == "select"
    with pytest.raises(SplitError, match="validation mode"):
        Fold("f", ("A1",), ("A2",), ("B1",), val_mode="tune")
    with pytest.raises(SplitError, match="validation"):
        make_splits(str(js), ["A1", "A2", "C1", "X"], validation="tune")
