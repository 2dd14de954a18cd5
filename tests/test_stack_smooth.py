"""Stacking (``stack``) and spatial smoothing (``smooth``, ``graph_smooth``): hand values, CV, leakage, save/load."""

from __future__ import annotations

import numpy as np
import pytest

from he2st.errors import He2stInputError
from he2st.methods import create_method
from he2st.methods.families.meta import choose_strength, inner_groups
from he2st.methods.nn.graphs import graph_smooth
from he2st.methods.stack import stack_weights

FEAT = {"encoder": "color_stats", "weights": None, "patch_px": 32}
RIDGE = {**FEAT, "alphas": [1.0, 100.0]}
KNN = {**FEAT, "k": 10}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from he2st.datasets import synthetic

    return synthetic(n_slides=4, n_spots=60, n_genes=12, patch_px=32, seed=3, root=tmp_path_factory.mktemp("syn"))


# -- graph smoothing -------------------------------------------------------------------------


def test_graph_smooth_matches_the_hand_solution_on_a_path() -> None:
    # Three spots in a row, one spacing apart: the ring-1 graph is the path 0-1-2.
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    v = np.array([[0.0], [3.0], [0.0]])
    L = np.array([[1, -1, 0], [-1, 2, -1], [0, -1, 1]], dtype=float)
    want = np.linalg.solve(np.eye(3) + 0.5 * L, v)
    np.testing.assert_allclose(graph_smooth(v, xy, 0.5), want, atol=1e-12)
    np.testing.assert_allclose(graph_smooth(v, xy, 0.0), v)
    # The mean of a connected component is kept; strength -> infinity flattens it.
    assert graph_smooth(v, xy, 0.5).mean() == pytest.approx(1.0)
    np.testing.assert_allclose(graph_smooth(v, xy, 1e9), np.ones((3, 1)), atol=1e-6)


def test_graph_smooth_per_gene_strengths_and_isolated_spot() -> None:
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])  # spot 2 is isolated
    v = np.array([[0.0, 0.0], [2.0, 2.0], [5.0, 5.0]])
    out = graph_smooth(v, xy, np.array([0.0, 1.0]))
    np.testing.assert_allclose(out[:, 0], v[:, 0])
    np.testing.assert_allclose(out[:, 1], [2 / 3, 4 / 3, 5.0])  # (I + L)^-1 on the pair; the isolated spot kept
    with pytest.raises(He2stInputError, match="non-negative"):
        graph_smooth(v, xy, -1.0)


def test_choose_strength_prefers_smoothing_only_when_it_helps() -> None:
    class S:  # a slide-like object: only the spot positions are read
        def __init__(self, xy):
            self.obsm = {"spatial": xy}

    rng = np.random.default_rng(0)
    xy = np.stack(np.meshgrid(np.arange(12.0), np.arange(12.0)), -1).reshape(-1, 2)
    truth = np.sin(xy[:, :1] / 3.0) + np.cos(xy[:, 1:] / 4.0)
    noisy = truth + rng.normal(0, 0.8, truth.shape)
    t, scores = choose_strength([noisy], [truth], [S(xy)], [0.0, 0.5, 2.0])
    assert t[0] > 0 and scores["0"] < max(scores.values())
    # Predictions already equal to the truth: any smoothing only hurts; ties go to the weakest.
    t, _ = choose_strength([truth], [truth], [S(xy)], [2.0, 0.0, 0.5])
    assert t[0] == 0.0


def test_inner_groups_by_patient_when_there_are_several(cohort) -> None:
    import anndata as ad

    slides = [ad.AnnData(s.X, obs=s.obs, uns={"he2st": dict(s.uns["he2st"])}) for s in cohort]
    assert inner_groups(slides) == [[0], [1], [2], [3]]  # four patients
    for s, p in zip(slides, ["A", "B", "A", "B"]):
        s.uns["he2st"]["patient"] = p
    assert inner_groups(slides) == [[0, 2], [1, 3]]  # slides of one patient are held out together
    for s in slides:
        s.uns["he2st"]["patient"] = "A"
    assert inner_groups(slides) == [[0], [1], [2], [3]]  # one patient: by slide


# -- stacking weights --------------------------------------------------------------------------


def test_stack_weights_recover_a_known_combination() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 3)), rng.normal(size=(200, 3))
    y = 0.7 * a + 0.2 * b
    w = stack_weights(np.stack([a, b]), y, "nnls", per_gene=True)
    np.testing.assert_allclose(w, np.array([[0.7] * 3, [0.2] * 3]), atol=1e-8)
    # A member anti-correlated with the target gets weight 0, never a negative one.
    w = stack_weights(np.stack([a, -a]), a, "nnls", per_gene=True)
    np.testing.assert_allclose(w, [[1.0] * 3, [0.0] * 3], atol=1e-8)
    w = stack_weights(np.stack([a, b]), y, "convex", per_gene=False)
    assert w[:, 0].sum() == pytest.approx(1.0, abs=1e-4) and np.all(w >= 0)
    np.testing.assert_allclose(stack_weights(np.stack([a, b]), y, "equal", True), 0.5)


# -- the methods ----------------------------------------------------------------------------------


def _mse(model, slide) -> float:
    return float(np.mean((model.predict(slide) - model.targets(slide)) ** 2))


def test_stack_beats_the_mean_and_matches_its_best_member(cohort) -> None:
    train, test = list(cohort[:3]), cohort[3]
    genes = list(map(str, cohort[0].var_names))
    st = create_method("stack", methods=[{"name": "ridge", "params": RIDGE}, {"name": "knn", "params": KNN}])
    st.fit(train, genes)
    mean = create_method("mean").fit(train, genes)
    ridge = create_method("ridge", **RIDGE).fit(train, genes)
    knn = create_method("knn", **KNN).fit(train, genes)
    assert st.weights_.shape == (2, len(genes)) and np.all(st.weights_ >= 0)
    assert _mse(st, test) < _mse(mean, test)
    assert _mse(st, test) <= 1.05 * min(_mse(ridge, test), _mse(knn, test))
    # Members refitted on all training slides predict as the stand-alone methods do.
    np.testing.assert_allclose(st.members_[0].predict(test), ridge.predict(test), rtol=1e-5, atol=1e-6)
    extra = st.get_extra()
    assert extra["member_labels"] == ["ridge", "knn"] and "oof_mse" in extra
    # An executor precomputes the members' features for the stack: exactly their requests.
    unfitted = create_method("stack", methods=[{"name": "ridge", "params": RIDGE}, {"name": "knn", "params": KNN}])
    want = [r for m in (create_method("ridge", **RIDGE), create_method("knn", **KNN))
            for r in m.feature_requests(train, list(cohort))]
    assert unfitted.feature_requests(train, list(cohort)) == want and len(want) == 2 * len(cohort)


def test_stack_weights_never_see_the_test_slide(cohort, monkeypatch) -> None:
    """Every fit inside the stack (inner folds and final members) gets training slides only."""
    from he2st.data.slide import meta
    from he2st.methods.baselines import RidgeProbe

    seen: list[list[str]] = []
    real_fit = RidgeProbe.fit

    def spy(self, slides, genes, val=None):
        seen.append([meta(s).slide_id for s in slides])
        return real_fit(self, slides, genes, val)

    monkeypatch.setattr(RidgeProbe, "fit", spy)
    train, test = list(cohort[:3]), cohort[3]
    create_method("stack", methods=[{"name": "ridge", "params": RIDGE}]).fit(train, list(map(str, cohort[0].var_names)))
    test_id = meta(test).slide_id
    assert len(seen) == 4 and all(test_id not in ids for ids in seen)
    assert sorted(map(len, seen)) == [2, 2, 2, 3]


def test_smooth_save_load_and_strength_choice(cohort, tmp_path) -> None:
    from he2st.methods.base import Method

    train, test = list(cohort[:3]), cohort[3]
    genes = list(map(str, cohort[0].var_names))
    m = create_method("smooth", method="knn", params=KNN).fit(train, genes)
    assert m.strength_.shape == (len(genes),) and set(m.get_extra()["cv_scores"]) >= {"0", "1"}
    back = Method.load(m.save(tmp_path / "m"))
    np.testing.assert_allclose(back.predict(test), m.predict(test))
    fixed = create_method("smooth", method="knn", params=KNN, strengths=[2.0]).fit(train, genes)
    plain = create_method("knn", **KNN).fit(train, genes)
    assert not np.allclose(fixed.predict(test), plain.predict(test))
    # The smoothed map is a per-gene Laplacian solve of the plain one.
    want = graph_smooth(plain.predict(test), np.asarray(test.obsm["spatial"], float), 2.0)
    np.testing.assert_allclose(fixed.predict(test), want, rtol=1e-5, atol=1e-6)
    st = create_method("stack", methods=[{"name": "knn", "params": KNN}], smooth="cv").fit(train, genes)
    np.testing.assert_allclose(Method.load(st.save(tmp_path / "s")).predict(test), st.predict(test))


def test_bad_specs_are_refused() -> None:
    with pytest.raises(He2stInputError, match="name the method"):
        create_method("smooth")
    with pytest.raises(He2stInputError, match=r"methods\[0\]"):
        create_method("stack", methods=[3])
    with pytest.raises(He2stInputError, match="normalization"):
        create_method("stack", methods=[{"name": "ridge", "params": {"normalization": "log1p"}}])
    with pytest.raises(He2stInputError, match="weights must be one of"):
        create_method("stack", weights="softmax")
    with pytest.raises(He2stInputError, match="at least 2 training slides"):
        from he2st.datasets import synthetic

        one = synthetic(n_slides=1, n_spots=20, n_genes=4, patch_px=32, seed=0)
        create_method("stack", methods=[{"name": "ridge", "params": RIDGE}]).fit(list(one), list(map(str, one[0].var_names)))
