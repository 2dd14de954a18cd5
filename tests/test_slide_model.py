"""The slide data model and cohort."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from he2st.data import Cohort, make_slide, meta, require_counts
from he2st.errors import NotCountsError, SlideError


def _slide(sid="s1", patient="p1", n=4, **kw):
    X = np.arange(n * 3, dtype=float).reshape(n, 3)
    spatial = np.column_stack([np.arange(n) * 10 + 5, np.arange(n) * 10 + 5])
    args = dict(slide_id=sid, patient=patient, spot_diameter_px=8.0)
    args.update(kw)
    return make_slide(X, [f"a{i}" for i in range(n)], ["G1", "G2", "G3"], spatial, **args)


def test_make_slide_layout():
    s = _slide()
    assert sp.isspmatrix_csr(s.X) and s.X.dtype == np.float32
    assert list(s.obs.columns[:4]) == ["array_row", "array_col", "slide", "patient"]
    assert s.obsm["spatial"].shape == (4, 2)
    m = meta(s)
    assert m.slide_id == "s1" and m.patient == "p1" and m.counts and m.spot_diameter_px == 8.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), "empty"),
        (dict(image_size=(20, 20)), "outside"),
    ],
)
def test_make_slide_rejects(kwargs, message):
    with pytest.raises(SlideError, match=message):
        _slide(**kwargs)


def test_duplicate_ids_nan_and_negative():
    X = np.ones((2, 1))
    with pytest.raises(SlideError, match="duplicated spot ids"):
        make_slide(X, ["a", "a"], ["G"], np.zeros((2, 2)), slide_id="x", spot_diameter_px=1)
    with pytest.raises(SlideError, match="NaN"):
        make_slide(X, ["a", "b"], ["G"], np.array([[0, 0], [np.nan, 1]]), slide_id="x", spot_diameter_px=1)
    with pytest.raises(SlideError, match="negative"):
        make_slide(-X, ["a", "b"], ["G"], np.zeros((2, 2)), slide_id="x", spot_diameter_px=1)
    with pytest.raises(SlideError, match="not numeric"):
        make_slide(np.array([["x"], ["y"]]), ["a", "b"], ["G"], np.zeros((2, 2)), slide_id="x", spot_diameter_px=1)


def test_require_counts():
    s = _slide()
    require_counts(s, "test")
    s.uns["he2st"]["counts"] = False
    with pytest.raises(NotCountsError, match="s1"):
        require_counts(s, "HVG selection")


def test_cohort_lookup_and_concat():
    c = Cohort([_slide("a", "p1"), _slide("b", "p1"), _slide("c", "p2")], name="t")
    assert c.slide_ids == ["a", "b", "c"]
    assert c["b"].uns["he2st"]["slide_id"] == "b"
    assert [meta(s).slide_id for s in c.by_patient("p1")] == ["a", "b"]
    assert c.patient_ids == ["p1", "p2"]
    assert len(c[1:]) == 2 and c.subset(["c", "a"]).slide_ids == ["c", "a"]
    big = c.concat()
    assert big.n_obs == 12 and big.obs_names.is_unique
    assert set(big.obs["slide"].cat.categories) == {"a", "b", "c"}
    with pytest.raises(KeyError, match="no slide"):
        c["zz"]
    with pytest.raises(ValueError, match="twice"):
        Cohort([_slide("a"), _slide("a")])
