"""BLEEP, mclSTExp and CMRCNet on the synthetic cohort: accuracy, persistence, reference banks, leakage.

Features: the non-neural ``color_stats`` encoder (BLEEP, mclSTExp); tokens: a randomly
initialised Hist2ST ConvMixer (CMRCNet needs tokens), computed once per module.
"""

from __future__ import annotations

import numpy as np
import pytest

from he2st.data.slide import meta
from he2st.errors import He2stInputError
from he2st.evaluate.metrics import evaluate_slide
from he2st.methods import create_method, load_method
from he2st.retrieval import BankLeakageError

FEAT = {"encoder": "color_stats", "weights": None, "patch_px": 32}
TOKENS = {"encoder": "convmixer", "weights": None, "patch_px": 32}
FAST = {
    "bleep": {**FEAT, "epochs": 30, "batch_size": 64, "top_k": 20},
    "mclstexp": {**FEAT, "epochs": 30, "batch_size": 64, "lr": 1e-3, "top_k": 20, "max_positions": 64},
    # lr_min keeps the repository's 10:1 ratio of lr to its cosine floor at the faster test rate.
    "cmrcnet": {**TOKENS, "epochs": 15, "batch_size": 64, "lr": 1e-3, "lr_min": 1e-4, "top_k": 20, "embed_dim": 64,
                "recon_dim": 64},
}
METHODS = list(FAST)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from he2st.datasets import synthetic

    return synthetic(n_slides=4, n_spots=120, n_genes=20, patch_px=32, seed=0, root=tmp_path_factory.mktemp("syn"))


@pytest.fixture(scope="module")
def token_cache(cohort):
    """ConvMixer tokens of the imaged slides, computed once (each test gets a fresh on-disk cache)."""
    from he2st.encoders import get_tokens

    out = {}
    for s in cohort[:3]:
        tok = np.asarray(get_tokens(s, TOKENS["encoder"], patch_px=32), dtype=np.float32)  # (n, 16*16, 32)
        # Average 4x4 blocks of the 16x16 cell grid: 16 tokens keep CMRCNet's attention cheap on a CPU.
        n, t, d = tok.shape
        g = int(round(t**0.5))
        out[meta(s).slide_id] = tok.reshape(n, 4, g // 4, 4, g // 4, d).mean(axis=(2, 4)).reshape(n, 16, d)
    return out


@pytest.fixture(autouse=True)
def _tokens_from_cache(token_cache, monkeypatch):
    import he2st.encoders

    real = he2st.encoders.get_tokens

    def cached(slide, encoder, *args, **kw):
        sid = meta(slide).slide_id
        if encoder == TOKENS["encoder"] and sid in token_cache:
            return token_cache[sid]
        return real(slide, encoder, *args, **kw)

    monkeypatch.setattr(he2st.encoders, "get_tokens", cached)


def expression_only(slide, new_id=None, patient=None):
    """A copy of a slide without its image (and optionally another id / patient)."""
    s = slide.copy()
    info = dict(s.uns["he2st"])
    info["image_path"] = None
    if new_id is not None:
        info["slide_id"] = new_id
        s.obs["slide"] = new_id
    if patient is not None:
        info["patient"] = patient
        s.obs["patient"] = patient
    s.uns["he2st"] = info
    for key in list(s.obsm):
        if key.startswith("X_"):
            del s.obsm[key]
    return s


def score(model, slide):
    return evaluate_slide(model.targets(slide), model.predict(slide), model.genes).as_dict()


@pytest.fixture(scope="module")
def fitted(cohort, genes, token_cache):
    """One model per method, trained on syn0 + syn1 (tokens served from the module cache)."""
    import he2st.encoders

    real = he2st.encoders.get_tokens
    he2st.encoders.get_tokens = lambda slide, encoder, *a, **k: token_cache[meta(slide).slide_id]
    try:
        return {name: create_method(name, **FAST[name]).fit(cohort[:2], genes) for name in METHODS}
    finally:
        he2st.encoders.get_tokens = real


@pytest.mark.parametrize("name", METHODS)
def test_beats_mean_on_held_out_slide(cohort, genes, fitted, name) -> None:
    mean = score(create_method("mean").fit(cohort[:2], genes), cohort[2])
    model = fitted[name]
    ev = score(model, cohort[2])
    assert ev["PCC(ACG)"] > 0.25, ev
    assert ev["MSE(ACG)"] < mean["MSE(ACG)"]
    assert ev["n_nan(ACG)"] == 0
    # training reduced the contrastive loss
    assert model.history_["train"][-1] < model.history_["train"][0]
    # the bank holds exactly the training spots, with their provenance
    assert model.bank_.slide_ids == ["syn0", "syn1"] and model.bank_.n == 240
    assert {s.origin for s in model.bank_.slides} == {"train"}


@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip(cohort, fitted, name, tmp_path) -> None:
    model = fitted[name]
    model.save(tmp_path / "m")
    again = load_method(tmp_path / "m")
    assert type(again) is type(model) and again.params == model.params
    np.testing.assert_array_equal(again.predict(cohort[2]), model.predict(cohort[2]))
    assert again.bank_.slide_ids == model.bank_.slide_ids


@pytest.mark.parametrize("name", METHODS)
def test_expression_only_reference_slide(cohort, genes, fitted, name) -> None:
    ref = expression_only(cohort[3])
    assert meta(ref).image_path is None
    model = create_method(name, **FAST[name], reference_slides=[ref]).fit(cohort[:2], genes)
    base = fitted[name]
    # identical training (same seed), so the only difference is the bank
    assert model.history_["train"] == pytest.approx(base.history_["train"])
    assert model.bank_.slide_ids == ["syn0", "syn1", "syn3"]
    assert [s.origin for s in model.bank_.slides] == ["train", "train", "reference"]
    assert model.params["reference_slides"] == ["syn3"]  # params stay JSON
    nb = model.neighbors(cohort[2])
    assert (nb.indices >= 240).any()  # some spots are predicted from the reference slide
    assert not np.allclose(model.predict(cohort[2]), base.predict(cohort[2]))
    # no test spot is ever in the bank
    assert "syn2" not in model.bank_.slide_ids
    # adding the same slide after fitting gives the same bank
    late = create_method(name, **FAST[name]).fit(cohort[:2], genes)
    late.add_reference_slides([ref])
    np.testing.assert_allclose(late.predict(cohort[2]), model.predict(cohort[2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["bleep", "mclstexp"])
def test_leakage_guards(cohort, genes, fitted, name) -> None:
    model = fitted[name]
    # a slide of the bank cannot be predicted from the bank
    with pytest.raises(BankLeakageError, match="syn0"):
        model.predict(cohort[0])
    # ... unless its own rows are excluded
    loo = create_method(name, **FAST[name], on_bank_overlap="exclude").fit(cohort[:2], genes)
    nb = loo.neighbors(cohort[0])
    assert (nb.indices >= 120).all()  # syn0 occupies rows 0..119
    # A reference section of the TEST patient (here: the test slide's own expression under
    # another id) is never retrieved under a patient-level split ...
    twin = expression_only(cohort[2], new_id="syn2_twin")
    guarded = create_method(name, **FAST[name], reference_slides=[twin]).fit(cohort[:2], genes)
    assert meta(twin).patient == meta(cohort[2]).patient
    nb = guarded.neighbors(cohort[2])
    assert (nb.indices < 240).all()
    np.testing.assert_allclose(guarded.predict(cohort[2]), model.predict(cohort[2]), rtol=1e-5, atol=1e-6)
    # ... and it would be retrieved without the guard: the guard is what keeps it out
    open_ = create_method(name, **FAST[name], reference_slides=[twin], exclude_test_patient=False).fit(cohort[:2], genes)
    assert (open_.neighbors(cohort[2]).indices >= 240).any()
    # a reference slide that is also a training slide is refused
    with pytest.raises(He2stInputError, match="also training"):
        create_method(name, **FAST[name], reference_slides=[cohort[0]]).fit(cohort[:2], genes)


def test_reference_slides_by_id_only_cannot_be_refitted(cohort, genes, fitted, tmp_path) -> None:
    model = create_method("bleep", **FAST["bleep"], reference_slides=[expression_only(cohort[3])]).fit(cohort[:2], genes)
    model.save(tmp_path / "m")
    again = load_method(tmp_path / "m")
    np.testing.assert_array_equal(again.predict(cohort[2]), model.predict(cohort[2]))
    with pytest.raises(He2stInputError, match="by id only"):
        again.fit(cohort[:2], genes)


@pytest.mark.parametrize("search", ["ivf", "hnsw"])
def test_approximate_search_inside_a_method(cohort, genes, fitted, search, tmp_path) -> None:
    exact = fitted["bleep"]
    approx = create_method("bleep", **{**FAST["bleep"], "search": search, "target_recall": 0.99}).fit(cohort[:2], genes)
    idx = approx.bank_.index
    assert idx is not None and idx.kind == search and idx.calibration.recall >= 0.99
    got, want = approx.neighbors(cohort[2]).indices, exact.neighbors(cohort[2]).indices
    from he2st.retrieval import recall_at_k

    assert recall_at_k(got, want) >= 0.95
    # the image queries it was calibrated on are kept and saved: adding a reference slide later
    # re-calibrates on them (not on bank rows, which are in-modality queries)
    assert approx.calibration_queries_ is not None and approx.calibration_queries_.shape[1] == idx.dim
    approx.save(tmp_path / "m")
    np.testing.assert_array_equal(load_method(tmp_path / "m").calibration_queries_, approx.calibration_queries_)
    approx.add_reference_slides([cohort[3]])
    assert approx.bank_.index.kind == search and approx.bank_.index.calibration.n_queries == len(
        approx.calibration_queries_)


@pytest.mark.parametrize("name", METHODS)
def test_finetune_step_on_tiny_patches(cohort, genes, name) -> None:
    from he2st.encoders import create_encoder

    params = {"mode": "finetune", "encoder": "resnet18", "weights": None, "patch_px": 32,
              "input_px": 64 if name == "cmrcnet" else 32, "epochs": 1, "batch_size": 48,
              "top_k": 10}
    if name == "mclstexp":
        params["max_positions"] = 64
    model = create_method(name, **params).fit(cohort[:2], genes)
    fresh = create_encoder("resnet18", weights=None, seed=0)
    trained = dict(model.net_.backbone.named_parameters())
    changed = [k for k, v in fresh.named_parameters() if not np.allclose(v.detach().numpy(), trained[k].detach().numpy())]
    assert changed, "the image encoder did not train"
    assert model._augmenter().name == model.defaults["augment"]  # the paper's augmentation preset
    pred = model.predict(cohort[2])
    assert pred.shape == (cohort[2].n_obs, len(genes)) and np.isfinite(pred).all()


def test_reference_slides_from_a_json_spec(cohort, genes) -> None:
    spec = {"data": "synthetic", "params": {"n_slides": 4, "n_spots": 120, "n_genes": 20, "patch_px": 32, "seed": 0},
            "slides": ["syn3"]}
    model = create_method("bleep", **FAST["bleep"], reference_slides=spec).fit(cohort[:2], genes)
    assert model.bank_.slide_ids == ["syn0", "syn1", "syn3"]
    assert model.params["reference_slides"] == spec  # a spec stays as given (JSON)
    with pytest.raises(He2stInputError, match="selects no slide"):
        create_method("bleep", **FAST["bleep"], reference_slides={**spec, "images": "without"}).fit(cohort[:2], genes)
    with pytest.raises(He2stInputError, match="accepts"):
        create_method("bleep", **FAST["bleep"], reference_slides={"dataset": "x"}).fit(cohort[:2], genes)


def _shallow(slide, fraction: float, new_id: str):
    """An expression-only copy sequenced ``fraction`` as deep (binomial thinning of the counts)."""
    import scipy.sparse as sp

    s = expression_only(slide, new_id=new_id)
    X = sp.csr_matrix(s.X).copy()
    X.data = np.random.default_rng(0).binomial(X.data.astype(np.int64), fraction).astype(np.float32)
    s.X = X
    return s


def test_reference_correction_scale_moves_shallow_slides_to_training_moments(cohort, genes) -> None:
    from he2st.retrieval.correction import moments

    ref = _shallow(cohort[3], 0.1, "shallow")
    plain = create_method("bleep", **FAST["bleep"], reference_slides=[ref]).fit(cohort[:2], genes)
    scaled = create_method("bleep", **FAST["bleep"], reference_slides=[ref], reference_correction="scale").fit(
        cohort[:2], genes)
    # The target moments are the training slides' only (never the query's).
    train = np.concatenate([scaled.targets(s) for s in cohort[:2]])
    np.testing.assert_allclose(scaled.ref_target_, np.stack(moments(train)), rtol=1e-5)
    block = scaled.bank_.slides[-1]
    vals = np.asarray(scaled.bank_.values[block.start : block.stop], dtype=np.float64)
    raw = np.asarray(plain.bank_.values[block.start : block.stop], dtype=np.float64)
    varied = raw.std(axis=0) > 0
    # Means match the training means (clipping at the training minimum only raises a few values).
    err_scaled = np.abs(vals.mean(axis=0) - train.mean(axis=0))[varied].mean()
    err_plain = np.abs(raw.mean(axis=0) - train.mean(axis=0))[varied].mean()
    assert err_scaled < 0.25 * err_plain
    # Training rows are untouched; predictions change.
    np.testing.assert_array_equal(scaled.bank_.values[:240], plain.bank_.values[:240])
    assert not np.allclose(scaled.predict(cohort[2]), plain.predict(cohort[2]))


def test_reference_correction_harmony_keeps_training_keys(cohort, genes, tmp_path) -> None:
    ref = _shallow(cohort[3], 0.1, "shallow")
    plain = create_method("bleep", **FAST["bleep"], reference_slides=[ref]).fit(cohort[:2], genes)
    harm = create_method("bleep", **FAST["bleep"], reference_slides=[ref], reference_correction="scale+harmony").fit(
        cohort[:2], genes)
    np.testing.assert_allclose(harm.bank_.embeddings[:240], plain.bank_.embeddings[:240], rtol=1e-5, atol=1e-6)
    assert not np.allclose(harm.bank_.embeddings[240:], plain.bank_.embeddings[240:])
    again = load_method(harm.save(tmp_path / "h"))
    np.testing.assert_allclose(again.predict(cohort[2]), harm.predict(cohort[2]), rtol=1e-5, atol=1e-6)
    with pytest.raises(He2stInputError, match="reference_correction"):
        create_method("bleep", **FAST["bleep"], reference_correction="combat")


def test_harmonize_to_training_pulls_a_shifted_batch_back() -> None:
    from he2st.retrieval.correction import harmonize_to_training, match_moments

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 8))
    lab = rng.integers(0, 3, 600)
    Z = centres[lab] + rng.normal(0, 0.3, (600, 8))
    batch = np.where(np.arange(600) < 400, np.where(np.arange(600) < 200, "a", "b"), "ref")
    Z[batch == "ref"] += 1.5  # the reference slide's keys are shifted
    out = harmonize_to_training(Z, batch, batch != "ref")
    np.testing.assert_array_equal(out[:400], Z[:400].astype(np.float32))
    before = np.linalg.norm(Z[400:] - centres[lab[400:]], axis=1).mean()
    after = np.linalg.norm(out[400:] - centres[lab[400:]], axis=1).mean()
    assert after < 0.6 * before
    # Moment matching by hand: values (0, 2) -> mean 1, sd 1 becomes mean 5, sd 2 -> (3, 7).
    np.testing.assert_allclose(match_moments(np.array([[0.0], [2.0]]), np.array([5.0]), np.array([2.0])), [[3.0], [7.0]])
    np.testing.assert_allclose(match_moments(np.array([[1.0], [1.0]]), np.array([5.0]), np.array([2.0])), [[5.0], [5.0]])
    np.testing.assert_allclose(match_moments(np.array([[0.0], [2.0]]), np.array([0.5]), np.array([2.0]), np.array([0.0])),
                               [[0.0], [2.5]])
